"""`dualkd demo`: the whole workflow in miniature, on CPU, offline, in about 10 minutes.

1. data: a generated instruction-following set (data/instructions.py) — 6,000 examples for the teacher,
   600 for the students, 300 dev, 200 test — written to `<out>/data/` as jsonl;
2. teacher: a small GPT-2 trained from scratch by SFT, with a byte-level BPE tokenizer trained on its data;
3. students on 600 labeled examples, one GPT-2 for all: with the teacher's tokenizer by SFT, vanilla KD and DSKD;
   with their own SentencePiece-style tokenizer of the teacher's size (a different vocabulary) by SFT and DSKDv2
   with exact token alignment, at the library's defaults;
4. every model sampled on the test set with 5 seeds (the papers' protocol at demo sizes), ROUGE-L and exact
   match scored, and everything written up by `dualkd report`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dualkd.config import GenerationConfig, load_config
from dualkd.data.instructions import MULTI_ANSWER, family_of
from dualkd.data.synthetic import generate
from dualkd.errors import DualKDError
from dualkd.eval.harness import PROTOCOL_SEEDS, evaluate
from dualkd.eval.suites import resolve_test_sets
from dualkd.recipes import recipe
from dualkd.report import report
from dualkd.train.loop import train

_MARKER = ".dualkd-demo"


@dataclass(frozen=True)
class Student:
    name: str
    recipe: str
    objective: str
    what: str


STUDENTS = (
    Student("student-sft", "demo-student", "{name: sft}", "SFT, teacher's vocab"),
    Student("student-kd", "demo-student", "{name: kd, divergence: fkl, kd_rate: 0.5}", "vanilla KD (fkl)"),
    Student("student-dskd", "demo-student", "{name: dskd, divergence: fkl, kd_rate: 0.5}", "DSKD, same vocab"),
    Student("student-own-vocab-sft", "demo-student-own-vocab", "{name: sft}", "SFT, own vocab"),
    Student("student-dskdv2", "demo-student-own-vocab",
            "{name: dskdv2, alignment: eta, divergence: fkl, kd_rate: 0.5}", "DSKDv2-ETA, own vocab"),
)


def _prepare(out: Path) -> None:
    if out.exists():
        if not (out / _MARKER).exists():
            raise DualKDError(f"{out} exists and is not a demo directory; choose another --output-dir")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / _MARKER).touch()


def _vocab_size(model_dir: Path) -> int:
    """The number of tokens of a saved tokenizer."""
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(model_dir))


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_demo(output_dir: str | Path = "runs/demo", quick: bool = False) -> dict[str, dict[str, Any]]:
    """Run the demo; returns per model its dev CE and test scores. `quick`: a few steps each (a smoke test)."""
    out = Path(output_dir)
    _prepare(out)
    console = Console(stderr=True, soft_wrap=True)
    started = time.perf_counter()
    n_test = 24 if quick else 200
    seeds = PROTOCOL_SEEDS[:2] if quick else PROTOCOL_SEEDS
    short = ["optimization.max_steps=4", "eval.every_steps=2", "checkpoint.every_steps=2"] if quick else []

    # the data files make every run reproducible from its config alone; the recipes generate the same sets
    teacher_recipe = load_config(recipe("demo-teacher"), [f"output_dir={out / 'teacher'}"])
    data = teacher_recipe.data
    files = {"teacher-train": (data.train.num_examples, data.train.seed), "dev": (data.dev.num_examples,
                                                                                     data.dev.seed),
             "student-train": (600, 3), "test": (n_test, 4)}
    paths = {k: _write_jsonl(out / "data" / f"{k}.jsonl", generate("instructions", n, seed))
             for k, (n, seed) in files.items()}

    steps = 2 + len(STUDENTS)
    console.rule(f"[bold]1/{steps} teacher: SFT from scratch on {files['teacher-train'][0]} examples")
    teacher_dir = out / "teacher"
    train(load_config(recipe("demo-teacher"), [f"output_dir={teacher_dir}", f"data.train.path={paths['teacher-train']}",
                                               "data.train.synthetic=null", f"data.dev.path={paths['dev']}",
                                               "data.dev.synthetic=null", *short]))
    teacher_model = teacher_dir / "final"
    for k, st in enumerate(STUDENTS, start=2):
        console.rule(f"[bold]{k}/{steps} {st.name}: {st.what}, {files['student-train'][0]} examples")
        overrides = [f"output_dir={out / st.name}", f"objective={st.objective}",
                     f"data.train.path={paths['student-train']}", "data.train.synthetic=null",
                     f"data.dev.path={paths['dev']}", "data.dev.synthetic=null", *short]
        overrides.append("teacher=null" if st.objective == "{name: sft}" else f"teacher.path={teacher_model}")
        if st.recipe == "demo-student":
            overrides.append(f"student.tokenizer={teacher_model}")
        else:  # one architecture for both halves: the own tokenizer gets the teacher's vocabulary size
            overrides.append(f"student.train_tokenizer.vocab_size={_vocab_size(teacher_model)}")
        train(load_config(recipe(st.recipe), overrides))

    console.rule(f"[bold]{steps}/{steps} evaluation: {n_test} test prompts x {len(seeds)} seeds, ROUGE-L and EM")
    sets = [replace(s, name="test") for s in resolve_test_sets([paths["test"]])[0]]
    settings = GenerationConfig(max_length=data.max_length, max_prompt_length=data.max_prompt_length, batch_size=50)
    names = ["teacher", *(st.name for st in STUDENTS)]
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        scores = evaluate(out / name, sets, settings, seeds=seeds, out_dir=out / name / "eval")
        dev = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        dev_ce = [r["ce"] for r in dev if r["kind"] == "dev"][-1]
        s = scores["sets"]["test"]
        results[name] = {"dev_ce": dev_ce, "rougeL": s["mean"]["rougeL"], "rougeL_std": s["std"]["rougeL"],
                         "exact_match": s["mean"]["exact_match"], "exact_match_std": s["std"]["exact_match"]}
    families = _exact_match_by_family(out, names, seeds)
    for name in names:
        results[name]["exact_match_by_family"] = families[name]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    report_path = report([out / n for n in names], out / "report", teacher=out / "teacher",
                         title="dualkd demo: a tiny teacher distilled into 5 students")
    with report_path.open("a", encoding="utf-8") as f:
        f.write("\n" + _families_markdown(families, names))
    _print_table(console, results, names, time.perf_counter() - started)
    console.print(f"report: {report_path}")
    return results


def _exact_match_by_family(out: Path, names: list[str], seeds: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """Exact match (any valid answer) per task family, mean over seeds, from the saved generations."""
    by_model: dict[str, dict[str, float]] = {}
    for name in names:
        hits: dict[str, list[float]] = {}
        for seed in seeds:
            for line in (out / name / "eval" / "generations" / f"test.seed{seed}.jsonl").read_text().splitlines():
                row = json.loads(line)
                hits.setdefault(family_of(row["prompt"]), []).append(row["exact_match"])
        by_model[name] = {fam: sum(v) / len(v) for fam, v in sorted(hits.items())}
    return by_model


def _families_markdown(families: dict[str, dict[str, float]], names: list[str]) -> str:
    cols = sorted({f for fams in families.values() for f in fams}, key=lambda f: (f in MULTI_ANSWER, f))
    head = [f"{c}{' *' if c in MULTI_ANSWER else ''}" for c in cols]
    lines = ["## Exact match by task family", "", "Mean over seeds; * = several valid answers (any counts).", "",
             "| model | " + " | ".join(head) + " |", "|---|" + "---|" * len(cols)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{families[name].get(c, 0.0):.1f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _print_table(console: Console, results: dict[str, dict[str, Any]], names: list[str], seconds: float) -> None:
    what = {"teacher": "SFT, 6,000 examples", **{st.name: st.what for st in STUDENTS}}
    table = Table(title=f"dualkd demo: test set sampled with 5 seeds (mean ± std), {seconds / 60:.1f} min",
                  caption="dev CE is per token of each model's own tokenizer: compare it within one vocabulary")
    for col in ("model", "trained by", "dev CE", "ROUGE-L", "exact match"):
        table.add_column(col, justify="left" if col in ("model", "trained by") else "right", no_wrap=True)
    for name in names:
        r = results[name]
        table.add_row(name, what[name], f"{r['dev_ce']:.3f}", f"{r['rougeL']:.2f} ± {r['rougeL_std']:.2f}",
                      f"{r['exact_match']:.1f} ± {r['exact_match_std']:.1f}")
    out = Console()
    Console(width=max(out.width, 100)).print(table)
