"""Cross-tokenizer alignment throughput: ours vs straightforward pure-Python versions, in one run.

    python benchmarks/align.py            # Dolly test outputs, SmolLM2 (student) vs Gemma-3 (teacher) tokenizers

- ETA: `dualkd.align.exact_alignment` on character offsets (NumPy arrays, as the data pipeline holds them)
  vs DSKDv2's string walk (two pointers over token strings with Ġ/▁ stripped, comparing prefix texts).
- MinED: `dualkd.align.mined.mined_alignment` (rapidfuzz cost matrix over distinct texts + compiled DTW)
  vs a pure-Python O(n·m) DTW whose cells call a C edit distance (rapidfuzz's Levenshtein, as the official
  code calls `editdistance`), on the first --dtw-pairs pairs.
Single process, one thread; best of 20 (ETA) or 3 (MinED) timed runs after a warm-up (the pure-Python DTW:
one run). Also prints the share of student tokens each ETA aligns. Needs ../shared/tools/real-models and
../shared/data/dolly.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
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
    parser.add_argument("--out", default="benchmarks/results/align.csv")
    args = parser.parse_args()
    import torch
    from transformers import AutoTokenizer

    from dualkd.align import exact_alignment
    from dualkd.align.mined import mined_alignment, token_texts

    torch.set_num_threads(1)
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
    rows = []

    def timed(fn, reps: int = 1) -> tuple[float, object]:
        """Best of `reps` runs after one untimed warm-up run (imports, JIT cache, allocator)."""
        out = fn()
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - start)
        return best, out

    sec, eta = timed(lambda: [exact_alignment(a, b) for a, b in zip(s_off, t_off)], reps=20)
    eta_cov = sum(len(a) for a, _ in eta) / n_tokens
    rows.append(("ETA", "dualkd offsets (NumPy)", len(outputs) / sec, eta_cov))
    sec_walk, walk = timed(lambda: [string_walk_eta(a, b) for a, b in zip(s_strs, t_strs)], reps=20)
    rows.append(("ETA", "DSKDv2 string walk (Python)", len(outputs) / sec_walk, sum(len(p) for p in walk) / n_tokens))
    sec, _ = timed(lambda: mined_alignment(s_texts, t_texts), reps=3)
    mined_rate = len(outputs) / sec
    rows.append(("MinED", "dualkd compiled DTW", mined_rate, float("nan")))
    k = args.dtw_pairs
    sec_py, _ = timed(lambda: [python_dtw(a, b) for a, b in zip(s_texts[:k], t_texts[:k])])
    rows.append(("MinED", f"pure-Python DTW (first {k} pairs)", k / sec_py, float("nan")))
    # the pure-Python DTW is O(n·m): compare on the same pairs too
    sec_same, _ = timed(lambda: mined_alignment(s_texts[:k], t_texts[:k]), reps=3)
    rows.append(("MinED", f"dualkd compiled DTW (first {k} pairs)", k / sec_same, float("nan")))

    print(f"# {len(outputs)} Dolly test outputs; SmolLM2 {n_tokens} tokens; one thread")
    print(f"{'task':6} {'implementation':36} {'pairs/s':>10} {'aligned':>8}")
    for task, impl, rate, cov in rows:
        print(f"{task:6} {impl:36} {rate:10.0f} {'' if cov != cov else f'{100 * cov:7.1f}%':>8}")
    print(f"ETA speed-up over the string walk: {rows[0][2] / rows[1][2]:.1f}x; "
          f"MinED speed-up over pure-Python DTW on the same {k} pairs: {rows[4][2] / rows[3][2]:.0f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "implementation", "pairs_per_s", "aligned_share"])
        w.writerows(rows)


if __name__ == "__main__":
    main()
