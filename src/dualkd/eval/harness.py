"""`dualkd eval`: generate for every test set and seed, score, save generations beside the scores.

    result = evaluate("runs/kd", sets, GenerationConfig(), seeds=(10, 20, 30, 40, 50), out_dir="runs/kd/eval")

Layout of `out_dir`:
    scores.json                       per set: n, per-seed scores, mean and std over seeds; settings; missing sets
    scores.md                         the same as a table (mean ± std)
    generations/<set>.seed<S>.jsonl   one line per example: where, prompt, references, generation, its scores
`rescore(out_dir)` recomputes every number from the saved generations alone.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dualkd.atomic import write_text_atomic
from dualkd.data.formats import Example
from dualkd.errors import DataError
from dualkd.eval.metrics import SENTENCE_METRICS, rouge_l, score
from dualkd.eval.suites import TestSet
from dualkd.generate import GenerationConfig, generate_responses, load_for_generation, resolve_model_dir

PROTOCOL_SEEDS = (10, 20, 30, 40, 50)


def _summarize(per_seed: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    metrics = next(iter(per_seed.values())).keys()
    mean = {m: statistics.fmean(s[m] for s in per_seed.values()) for m in metrics}
    std = {m: statistics.pstdev([s[m] for s in per_seed.values()]) if len(per_seed) > 1 else 0.0 for m in metrics}
    return {"mean": mean, "std": std}


def evaluate(model_path: str | Path, sets: Sequence[TestSet], settings: GenerationConfig,
             seeds: Sequence[int] = PROTOCOL_SEEDS, out_dir: str | Path | None = None,
             missing: dict[str, str] | None = None, dtype: str = "float32", progress: bool | None = None,
             model_and_tokenizer: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Scores of one model on `sets`; greedy decoding runs once whatever `seeds` says."""
    model_dir = resolve_model_dir(model_path)
    model, tokenizer = model_and_tokenizer or load_for_generation(model_dir, dtype)
    seeds = list(seeds) if settings.do_sample else [0]
    out = Path(out_dir) if out_dir is not None else model_dir.parent / "eval"
    (out / "generations").mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"model": str(model_dir), "generation": settings.model_dump(), "seeds": seeds,
                              "sets": {}, "missing": dict(missing or {})}
    for test in sets:
        per_seed: dict[str, dict[str, float]] = {}
        refs = [list(ex.references) for ex in test.examples]
        for seed in seeds:
            texts = generate_responses(model, tokenizer, test.examples, settings, seed=seed,
                                       label=f"{test.name} seed {seed}", progress=progress)
            # sentence metrics once per example (saved with it, averaged here); corpus metrics over the set
            per_example = {m: [SENTENCE_METRICS[m](t, r) for t, r in zip(texts, refs)] for m in test.metrics
                           if m in SENTENCE_METRICS}
            per_seed[str(seed)] = {m: statistics.fmean(per_example[m]) if m in per_example
                                   else score(m, texts, refs) for m in test.metrics}
            lines = []
            for k, (ex, text) in enumerate(zip(test.examples, texts)):
                row = {"where": ex.where, "prompt": ex.prompt, "references": refs[k], "generation": text}
                row.update({m: values[k] for m, values in per_example.items()})
                lines.append(json.dumps(row, ensure_ascii=False))
            write_text_atomic(out / "generations" / f"{test.name}.seed{seed}.jsonl", "\n".join(lines) + "\n")
        result["sets"][test.name] = {"path": test.path, "n": len(test.examples), "metrics": list(test.metrics),
                                     "per_seed": per_seed, **_summarize(per_seed)}
    write_text_atomic(out / "scores.json", json.dumps(result, indent=2))
    write_text_atomic(out / "scores.md", scores_markdown(result))
    result["out_dir"] = str(out)
    return result


def scores_markdown(result: dict[str, Any]) -> str:
    """A table: one row per test set, mean ± std over seeds for each metric."""
    metrics = sorted({m for s in result["sets"].values() for m in s["metrics"]}, key=["rougeL", "exact_match",
                                                                                        "bleu", "chrf"].index)
    seeds = result["seeds"]
    gen = result["generation"]
    if gen["do_sample"]:
        decoding = f"sampling, seeds {', '.join(map(str, seeds))}"
    else:
        decoding = f"beam search, {gen['num_beams']} beams" if gen.get("num_beams", 1) > 1 else "greedy"
    lines = [f"# Evaluation of `{result['model']}`", "", f"Decoding: {decoding}; "
             f"no_repeat_ngram_size {result['generation']['no_repeat_ngram_size']}.", "",
             "| set | n | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for name, s in result["sets"].items():
        cells = [f"{s['mean'][m]:.2f} ± {s['std'][m]:.2f}" if m in s["mean"] else "–" for m in metrics]
        lines.append(f"| {name} | {s['n']} | " + " | ".join(cells) + " |")
    if result.get("missing"):
        lines += ["", "Not evaluated (missing): " + "; ".join(f"{k}: {v}" for k, v in result["missing"].items())]
    return "\n".join(lines) + "\n"


def rescore(out_dir: str | Path) -> dict[str, Any]:
    """Recompute every score in `out_dir/scores.json` from the saved generations alone."""
    out = Path(out_dir)
    path = out / "scores.json"
    if not path.exists():
        raise DataError(f"{out}: no scores.json (not an evaluation directory)")
    saved = json.loads(path.read_text())
    fresh: dict[str, Any] = {}
    for name, s in saved["sets"].items():
        per_seed = {}
        for seed in saved["seeds"]:
            rows = [json.loads(line) for line in (out / "generations" / f"{name}.seed{seed}.jsonl").read_text(
                encoding="utf-8").splitlines()]
            per_seed[str(seed)] = {m: score(m, [r["generation"] for r in rows], [r["references"] for r in rows])
                                   for m in s["metrics"]}
        fresh[name] = {"per_seed": per_seed, **_summarize(per_seed)}
    return fresh


def sampled_rouge_l(model: Any, tokenizer: Any, examples: Sequence[Example], settings: GenerationConfig,
                    seeds: Sequence[int], counted: int | None = None) -> float:
    """Sum over `examples` of ROUGE-L (mean over one sample per seed): the dev selection of the DSKD scripts.
    A sum, so that processes evaluating shards of the dev set can add theirs up. Only the first `counted`
    examples count (the rest pad a process's share so all processes generate together)."""
    total = 0.0
    counted = len(examples) if counted is None else counted
    for seed in seeds:
        texts = generate_responses(model, tokenizer, list(examples), settings, seed=seed, progress=False)
        total += sum(rouge_l(text, ex.references) for text, ex in list(zip(texts, examples))[:counted])
    return total / max(len(seeds), 1)
