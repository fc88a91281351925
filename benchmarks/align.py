"""Cross-tokenizer alignment throughput: ours vs straightforward pure-Python versions, in one run.

    python benchmarks/align.py            # Dolly test outputs, SmolLM2 (student) vs Gemma-3 (teacher) tokenizers

- ETA: `dualkd.align.exact_alignment` on character offsets (NumPy arrays, as the data pipeline holds them)
  vs DSKDv2's string walk (two pointers over token strings with Ġ/▁ stripped, comparing prefix texts).
- MinED: `dualkd.align.mined.mined_alignment` (rapidfuzz cost matrix over distinct texts + compiled DTW)
  vs a pure-Python O(n·m) DTW whose cells call a C edit distance (rapidfuzz's Levenshtein, as the official
  code calls `editdistance`), on the first --dtw-pairs pairs.
- ETA as the pipeline calls it: `ExactAligner` over whole tokenized examples (prompt + response + EOS).
- ETA as a user calls it: `exact_alignment` on the `offset_mapping` lists a Hugging Face tokenizer returns, and
  on its `return_tensors="np"` arrays, for three real pairs (SmolLM2 <- Gemma-3, GPT-2 <- Qwen2, Mistral <-
  SmolLM2; student <- teacher).
One process, one thread, variants interleaved in rotating order after a warm-up (benchmarks/harness.py):
7 repetitions for ETA, 3 for MinED; min / median / max of each and of the ratios; the load average before and
after (the CSV is written only on a quiet machine). Also prints the share of student response tokens each ETA
aligns. Needs ../shared/tools/real-models and ../shared/data/dolly.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks.harness
MODELS = Path(os.environ.get("DUALKD_REAL_MODELS", Path.home() / ".cache" / "dualkd-real"))
DATA = REPO.parent / "shared" / "data" / "dolly" / "test.jsonl"


def string_walk_eta(student_tokens: list[str], teacher_tokens: list[str]) -> list[tuple[int, int]]:
    """DSKDv2's alignment, restated: walk both token lists, pair identical tokens whose prefixes match."""
    s = [t.replace("Ġ", "").replace("▁", "") for t in student_tokens]
    t = [x.replace("Ġ", "").replace("▁", "") for x in teacher_tokens]
    i = j = 0
    s_prefix = t_prefix = ""
    pairs = []
    while i < len(s) and j < len(t):
        if s_prefix == t_prefix and s[i] == t[j]:
            pairs.append((i, j))
            s_prefix += s[i]
            t_prefix += t[j]
            i += 1
            j += 1
        elif len(s_prefix) + len(s[i]) <= len(t_prefix) + len(t[j]):
            s_prefix += s[i]
            i += 1
        else:
            t_prefix += t[j]
            j += 1
    return pairs


def python_dtw(student_texts: list[str], teacher_texts: list[str]) -> list[int]:
    """Pure-Python DTW over token texts with an edit-distance cost per cell; one-to-one student partners."""
    from rapidfuzz.distance import Levenshtein

    n, m = len(student_texts), len(teacher_texts)
    inf = float("inf")
    D = [[inf] * (m + 1) for _ in range(n + 1)]
    D[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost = Levenshtein.distance(student_texts[i - 1], teacher_texts[j - 1])
            D[i][j] = cost + min(D[i - 1][j], D[i][j - 1], D[i - 1][j - 1])
    i, j = n, m
    partners: list[list[int]] = [[] for _ in range(n)]
    while i > 0 and j > 0:
        partners[i - 1].append(j - 1)
        step = min((D[i - 1][j - 1], 0), (D[i - 1][j], 1), (D[i][j - 1], 2))[1]
        i, j = (i - 1, j - 1) if step == 0 else ((i - 1, j) if step == 1 else (i, j - 1))
    return [p[0] if len(p) == 1 else -1 for p in partners]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtw-pairs", type=int, default=60, help="pairs timed with the pure-Python DTW")
    parser.add_argument("--reps", type=int, default=7, help="interleaved timed repetitions (MinED: 3)")
    parser.add_argument("--out", default="benchmarks/results/align.csv")
    parser.add_argument("--shared-ok", action="store_true", help="write the CSV even if the machine was shared")
    args = parser.parse_args()
    import torch
    from transformers import AutoTokenizer

    from benchmarks.harness import interleaved, may_write, start_load
    from dualkd.align import exact_alignment
    from dualkd.align.mined import mined_alignment, token_texts
    from dualkd.align.pairs import ExactAligner
    from dualkd.config import DataSource
    from dualkd.data.dataset import TruncationRules, tokenize_examples
    from dualkd.data.readers import load_examples

    torch.set_num_threads(1)
    print(f"# load average {start_load():.2f} at the start")
    s_tok = AutoTokenizer.from_pretrained(MODELS / "smollm2-135m-instruct")
    t_tok = AutoTokenizer.from_pretrained(MODELS / "gemma-3-270m")
    outputs = [json.loads(line)["output"] for line in DATA.read_text().splitlines()]
    outputs = [o if isinstance(o, str) else o[0] for o in outputs]
    s_enc = s_tok(outputs, add_special_tokens=False, return_offsets_mapping=True)
    t_enc = t_tok(outputs, add_special_tokens=False, return_offsets_mapping=True)
    s_off = [np.asarray(o, dtype=np.int64) for o in s_enc["offset_mapping"]]
    t_off = [np.asarray(o, dtype=np.int64) for o in t_enc["offset_mapping"]]
    s_strs = [s_tok.convert_ids_to_tokens(ids) for ids in s_enc["input_ids"]]
    t_strs = [t_tok.convert_ids_to_tokens(ids) for ids in t_enc["input_ids"]]
    st, tt = token_texts(s_tok), token_texts(t_tok)
    s_texts = [[st[i] for i in ids] for ids in s_enc["input_ids"]]
    t_texts = [[tt[i] for i in ids] for ids in t_enc["input_ids"]]
    n_tokens = sum(len(x) for x in s_strs)
    # what the data pipeline hands the aligner: whole tokenized examples (prompt + response + EOS)
    examples, _ = load_examples(DataSource(path=str(DATA)))
    rules = TruncationRules(max_length=4096, max_prompt_length=None)
    s_ex, t_ex = tokenize_examples(examples, s_tok, rules), tokenize_examples(examples, t_tok, rules)
    aligner = ExactAligner(s_tok, t_tok)
    n, k = len(outputs), args.dtw_pairs

    eta = interleaved({
        "ETA: ExactAligner, as the pipeline calls it": lambda: aligner(s_ex, t_ex),
        "ETA: exact_alignment, one call per pair": lambda: [exact_alignment(a, b) for a, b in zip(s_off, t_off)],
        "ETA: DSKDv2 string walk (Python)": lambda: [string_walk_eta(a, b) for a, b in zip(s_strs, t_strs)],
    }, reps=args.reps)
    mined = interleaved({
        f"MinED: compiled DTW, all {n} pairs": lambda: mined_alignment(s_texts, t_texts),
        f"MinED: compiled DTW, first {k} pairs": lambda: mined_alignment(s_texts[:k], t_texts[:k]),
        f"MinED: pure-Python DTW, first {k} pairs": lambda: [python_dtw(a, b) for a, b in zip(s_texts[:k],
                                                                                              t_texts[:k])],
    }, reps=3)

    as_called = _as_called(outputs, args.reps, interleaved, exact_alignment, AutoTokenizer)

    pipeline_cov = sum(len(a) - 1 for a, _ in eta.last["ETA: ExactAligner, as the pipeline calls it"]) / n_tokens
    bare_cov = sum(len(a) for a, _ in eta.last["ETA: exact_alignment, one call per pair"]) / n_tokens
    walk_cov = sum(len(p) for p in eta.last["ETA: DSKDv2 string walk (Python)"]) / n_tokens
    coverage = dict(zip(eta.seconds, (pipeline_cov, bare_cov, walk_cov)))
    pairs = {name: n for name in eta.seconds} | {name: (n if "all" in name else k) for name in mined.seconds}
    print(f"# {n} Dolly test outputs; SmolLM2 {n_tokens} response tokens; one thread")
    print(eta.table(baseline="ETA: DSKDv2 string walk (Python)"))
    print(mined.table(baseline=f"MinED: pure-Python DTW, first {k} pairs"))
    rows = []
    print(f"\n{'implementation':48} {'pairs/s min':>12} {'median':>9} {'max':>9} {'aligned':>8}")
    pairs |= {name: n for name in as_called.seconds}
    for timing in (eta, mined, as_called):
        for name, secs in timing.seconds.items():
            rates = sorted(pairs[name] / t for t in secs)
            cov = coverage.get(name, float("nan"))
            rows.append((name, rates[0], statistics.median(rates), rates[-1], cov, timing.load_before,
                         timing.load_after))
            print(f"{name:48} {rates[0]:12.0f} {statistics.median(rates):9.0f} {rates[-1]:9.0f} "
                  f"{'' if cov != cov else f'{100 * cov:7.1f}%':>8}")
    fast = eta.ratios("ETA: DSKDv2 string walk (Python)", "ETA: ExactAligner, as the pipeline calls it")
    same = mined.ratios(f"MinED: pure-Python DTW, first {k} pairs", f"MinED: compiled DTW, first {k} pairs")
    print(f"pipeline ETA vs string walk: {min(fast):.2f}-{max(fast):.2f}x faster; compiled MinED vs pure-Python "
          f"DTW on the same {k} pairs: {min(same):.0f}-{max(same):.0f}x")
    if all(may_write(t, args.shared_ok) for t in (eta, mined, as_called)):
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["implementation", "pairs_per_s_min", "pairs_per_s_median", "pairs_per_s_max",
                        "aligned_share", "load_before", "load_after"])
            w.writerows(rows)


def _as_called(outputs: list[str], reps: int, interleaved, exact_alignment, AutoTokenizer):  # noqa: N803
    """`exact_alignment` per pair on what a tokenizer returns: offset lists, and the cheaper NumPy arrays."""
    tokenizers = {"SmolLM2": MODELS / "smollm2-135m-instruct", "Gemma-3": MODELS / "gemma-3-270m",
                  "GPT-2": MODELS / "tokenizers" / "gpt2", "Qwen2": MODELS / "tokenizers" / "qwen2",
                  "Mistral": MODELS / "tokenizers" / "mistral-sp32k"}
    lists, arrays = {}, {}
    for name, folder in tokenizers.items():
        tok = AutoTokenizer.from_pretrained(folder)
        lists[name] = tok(outputs, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        arrays[name] = [tok(o, add_special_tokens=False, return_offsets_mapping=True, return_tensors="np")[
            "offset_mapping"] for o in outputs]
    variants = {}
    for student, teacher in (("SmolLM2", "Gemma-3"), ("GPT-2", "Qwen2"), ("Mistral", "SmolLM2")):
        for form, data in (("lists", lists), ("np arrays", arrays)):
            s_off, t_off = data[student], data[teacher]
            variants[f"ETA as called: {student} <- {teacher}, {form}"] = (
                lambda s_off=s_off, t_off=t_off: [exact_alignment(a, b) for a, b in zip(s_off, t_off)])
    timing = interleaved(variants, reps=reps)
    print(timing.table())
    return timing


if __name__ == "__main__":
    main()
