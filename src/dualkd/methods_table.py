"""`dualkd methods-table`: every objective on the demo benchmark, three training seeds, one table.

The shape of the papers' main tables, at demo size (data/instructions.py; the demo's teacher):
1. the demo's data files and teacher (`demo.py`'s recipes), made once;
2. per row, a small learning-rate grid (`LRS`) trained with the first seed and scored by its best dev CE (per
   token of the row's own tokenizer, so rows of one tokenizer are chosen alike); the chosen rate is then
   trained with the other seeds;
3. every chosen run sampled on the test set with the protocol's 5 sampling seeds (ROUGE-L, exact match);
4. `docs/methods-table.md` (+ a plot): mean ± std over training seeds, each run's score being its mean over
   the sampling seeds; rows whose interval (mean ± std) overlaps their SFT baseline's are marked;
5. the ablations (`ABLATIONS`): DSKDv2-ETA with one setting changed (kd_rate, τ, projector lr, the KD's
   space, the teacher's vocabulary size), trained at DSKDv2-ETA's chosen lr with the three seeds, tabled beside it.

Every student is the same GPT-2 (2 layers, d = 64) with a vocabulary of the teacher's size: the same-tokenizer
rows use the teacher's byte-level BPE, the own-tokenizer rows a SentencePiece-style (metaspace) BPE trained on
the students' data. They differ only in the tokenizer.

Resumable: every run is a folder under `<out>/runs/<row>/lr<lr>/seed<seed>`; a finished run (final model and
scores) is skipped and an unfinished one resumes from its last checkpoint, so a stopped table continues where
it was. 124 runs: several hours on 2 CPU cores (3-4 minutes per run and its evaluation with one thread;
`--quick`: a smoke test in a few minutes; `--report-only`: the table of what is finished).
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from dualkd.atomic import write_text_atomic
from dualkd.config import GenerationConfig, RunConfig, load_config
from dualkd.data.synthetic import generate
from dualkd.errors import ConfigError
from dualkd.eval.harness import PROTOCOL_SEEDS, evaluate
from dualkd.eval.suites import resolve_test_sets
from dualkd.recipes import recipe
from dualkd.train.loop import train

LRS = (1e-3, 3e-3, 1e-2)
SEEDS = (10, 11, 12)
_ON_POLICY = "{kind: on_policy, student_gen_ratio: 0.5, on_policy_after: 10, on_policy_after_unit: epochs}"
_GENERATION = "{do_sample: true, max_length: 64, max_prompt_length: 40, no_repeat_ngram_size: 0, batch_size: 64}"


@dataclass(frozen=True)
class Row:
    name: str
    tokenizer: str  # "teacher" | "own"
    objective: str
    what: str
    source: str | None = None
    base: str | None = None
    """An ablation: the row it varies, whose chosen lr it trains with (no grid of its own)."""
    teacher_vocab: int | None = None
    """An ablation of the teacher's tokenizer: a teacher trained with this vocabulary size (the students' own
    tokenizer stays that of the main teacher's size)."""


ROWS = (
    Row("sft", "teacher", "{name: sft}", "SFT"),
    Row("kd-fkl", "teacher", "{name: kd, divergence: fkl}", "KD, forward KL"),
    Row("kd-rkl", "teacher", "{name: kd, divergence: rkl}", "KD, reverse KL"),
    Row("kd-js", "teacher", "{name: kd, divergence: js}", "KD, Jensen-Shannon"),
    Row("kd-tvd", "teacher", "{name: kd, divergence: tvd}", "KD, total variation"),
    Row("kd-skl", "teacher", "{name: kd, divergence: skl}", "KD, skewed KL (λ 0.1)"),
    Row("kd-srkl", "teacher", "{name: kd, divergence: srkl}", "KD, skewed RKL (λ 0.1)"),
    Row("kd-akl", "teacher", "{name: kd, divergence: akl}", "KD, adaptive KL"),
    Row("dskd-fkl", "teacher", "{name: dskd, divergence: fkl}", "DSKD, forward KL"),
    Row("dskd-rkl", "teacher", "{name: dskd, divergence: rkl}", "DSKD, reverse KL"),
    Row("dskdv2", "teacher", "{name: dskdv2, divergence: fkl}", "DSKDv2, same vocabulary"),
    Row("seqkd", "teacher", "{name: sft}", "SeqKD (teacher's greedy outputs)", "{kind: seqkd}"),
    Row("on-policy-kd-fkl", "teacher", "{name: kd, divergence: fkl}", "on-policy KD, forward KL", _ON_POLICY),
    Row("own-sft", "own", "{name: sft}", "SFT"),
    Row("own-dskd-cma", "own", "{name: dskd_cma, version: 1, divergence: fkl}", "DSKD-CMA (v1)"),
    Row("own-dskdv2-eta", "own", "{name: dskdv2, alignment: eta, divergence: fkl}", "DSKDv2-ETA"),
    Row("own-dskdv2-cma", "own", "{name: dskdv2, alignment: cma, divergence: fkl}", "DSKDv2-CMA"),
    Row("own-uld", "own", "{name: uld}", "ULD"),
    Row("own-mined", "own", "{name: mined}", "MinED"),
    Row("own-gold", "own", "{name: gold}", "GOLD (TRL's cross-tokenizer loss)"),
    Row("own-shared-vocab-kd", "own", "{name: shared_vocab_kd}", "KD over the shared vocabulary (KDFlow)"),
    Row("own-on-policy-dskdv2-eta", "own", "{name: dskdv2, alignment: eta, divergence: fkl}",
        "on-policy DSKDv2-ETA", _ON_POLICY),
)
_ETA = "name: dskdv2, alignment: eta, divergence: fkl"
_ETA_5E4 = _ETA + ", projector_lr: 5.0e-4"
_OLD = "eta-projector_lr-5e-4"
# what moves the cross-tokenizer result: DSKDv2-ETA with one setting changed, at DSKDv2-ETA's chosen lr, 3
# seeds (on-policy sampling is a row of the table: own-on-policy-dskdv2-eta). They vary the projector lr of
# the DSKDv2 scripts (5e-4), the default before these ablations showed that a projector learned from random
# weights needs the student's pace (now the default: methods/dskdv2.py)
ABLATIONS = (
    Row(_OLD, "own", f"{{{_ETA_5E4}}}", "DSKDv2-ETA, projector lr 5e-4 (the DSKDv2 scripts'; the old default)",
        base="own-dskdv2-eta"),
    Row("eta-projector_lr-5e-5", "own", f"{{{_ETA}, projector_lr: 5.0e-5}}", "… projector lr 5e-5", base=_OLD),
    Row("eta-projector_lr-5e-3", "own", f"{{{_ETA}, projector_lr: 5.0e-3}}", "… projector lr 5e-3", base=_OLD),
    Row("eta-kd_rate-0.1", "own", f"{{{_ETA_5E4}, kd_rate: 0.1}}", "… kd_rate 0.1", base=_OLD),
    Row("eta-kd_rate-0.9", "own", f"{{{_ETA_5E4}, kd_rate: 0.9}}", "… kd_rate 0.9", base=_OLD),
    Row("eta-tau-2", "own", f"{{{_ETA_5E4}, temperature: 2.0}}", "… τ 2 (the papers')", base=_OLD),
    Row("eta-spaces-teacher", "own", f"{{{_ETA_5E4}, spaces: teacher}}",
        "… KD in the teacher's space only (no projected target)", base=_OLD),
    Row("eta-spaces-student", "own", f"{{{_ETA_5E4}, spaces: student}}", "… KD in the student's space only",
        base=_OLD),
    Row("eta-teacher_vocab-300", "own", f"{{{_ETA_5E4}}}", "… a teacher tokenizer of 300 tokens", base=_OLD,
        teacher_vocab=300),
)
ALL_ROWS = ROWS + ABLATIONS
_BY_NAME = {row.name: row for row in ALL_ROWS}
# the order runs are made in: the comparison the issue is about first, then the rest, the ablations last
_FIRST = ("sft", "own-sft", "own-dskdv2-eta", "kd-fkl", "dskd-fkl")
_WORD = re.compile(r"\w+|[^\w\s]")


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
    return path


def _lr_name(lr: float) -> str:
    return f"lr{lr:g}"


@dataclass
class Bench:
    out: Path
    quick: bool
    console: Console
    record: Path | None = None
    """A folder (committed beside the docs) that keeps each finished run's dev curve, summary and scores, so a
    table continues on another machine without the run folders: trained or scored runs are not redone."""

    def __post_init__(self) -> None:
        n_test = 24 if self.quick else 200
        teacher_data = load_config(recipe("demo-teacher")).data
        sets = {"teacher-train": (teacher_data.train.num_examples, teacher_data.train.seed),
                "dev": (teacher_data.dev.num_examples, teacher_data.dev.seed),
                "student-train": (600, 3), "test": (n_test, 4)}
        self.data = {k: _write_jsonl(self.out / "data" / f"{k}.jsonl", generate("instructions", n, seed))
                     for k, (n, seed) in sets.items()}
        self.short = (["optimization.max_steps=4", "eval.every_steps=2", "checkpoint.every_steps=2"]
                      if self.quick else [])
        self.sampling_seeds = PROTOCOL_SEEDS[:2] if self.quick else PROTOCOL_SEEDS
        self.lrs = LRS[1:2] if self.quick else LRS
        self.seeds = SEEDS[:2] if self.quick else SEEDS
        self._words: set[str] | None = None  # every word and symbol of the students' training data
        self.teacher_vocab = 0

    def _data_overrides(self, train_set: str) -> list[str]:
        return [f"data.train.path={self.data[train_set]}", "data.train.synthetic=null",
                f"data.dev.path={self.data['dev']}", "data.dev.synthetic=null"]

    def teacher(self, vocab: int | None = None) -> Path:
        """The demo's teacher (`vocab`: with a tokenizer of that many tokens instead of the recipe's)."""
        run = self.out / ("teacher" if vocab is None else f"teacher-vocab{vocab}")
        if not (run / "final").is_dir():
            self.console.rule("[bold]teacher: SFT from scratch on the demo's 6,000 examples"
                              + (f", a {vocab}-token tokenizer" if vocab is not None else ""))
            tokenizer = [] if vocab is None else [f"student.train_tokenizer.vocab_size={vocab}"]
            train(load_config(recipe("demo-teacher"), [f"output_dir={run}", *self._data_overrides("teacher-train"),
                                                       "checkpoint.resume=auto", *tokenizer, *self.short]))
        return run / "final"

    def config(self, row: Row, lr: float, seed: int, teacher: Path) -> RunConfig:
        """The run's config: the demo student's recipe with the row's objective, source and tokenizer
        (`teacher`: the main teacher, whose vocabulary size the own-tokenizer students take)."""
        run = self.path(row, lr, seed)
        vocab = len(json.loads((teacher / "tokenizer.json").read_text())["model"]["vocab"])  # 733
        if row.teacher_vocab is not None:
            teacher = self.teacher(row.teacher_vocab)
        # one architecture for every student: the own-tokenizer rows differ only in their tokenizer
        student = ([f"student.tokenizer={teacher}"] if row.tokenizer == "teacher"
                   else ["student.tokenizer=null",
                         f"student.train_tokenizer={{vocab_size: {vocab}, style: metaspace}}"])
        overrides = [f"output_dir={run}", f"seed={seed}", f"optimization.lr={lr}", f"objective={row.objective}",
                     *student, *self._data_overrides("student-train"), "checkpoint.resume=auto",
                     "teacher=null" if row.objective == "{name: sft}" and row.source is None
                     else f"teacher.path={teacher}", *self.short]
        if row.source is not None:
            overrides += [f"source={row.source}", f"generation={_GENERATION}"]
        return load_config(recipe("demo-student"), overrides)

    def _recorded(self, run: Path) -> Path | None:
        return self.record / run.relative_to(self.out / "runs") if self.record is not None else None

    def trained(self, run: Path) -> bool:
        recorded = self._recorded(run)
        return (run / "final").is_dir() or (recorded is not None and (recorded / "summary.json").exists())

    def scored(self, run: Path) -> bool:
        recorded = self._recorded(run)
        return (run / "scores.json").exists() or (recorded is not None and (recorded / "scores.json").exists())

    def run(self, row: Row, lr: float, seed: int, need_model: bool = False) -> Path:
        """Train one run (or resume / skip it); returns its folder. `need_model`: the weights are needed (to
        evaluate), so a run known only from the record is trained again (the same run: seeded)."""
        run = self.path(row, lr, seed)
        if self.trained(run) and (not need_model or (run / "final").is_dir()):
            return run
        cfg = self.config(row, lr, seed, self.teacher())
        self.console.rule(f"[bold]{row.name} ({row.what}), lr {lr:g}, seed {seed}")
        train(cfg)
        self._keep(run)
        return run

    def _keep(self, run: Path) -> None:
        """Copy what the table reads of a finished run (dev curve, summary, scores) into the record."""
        recorded = self._recorded(run)
        if recorded is None or not (run / "final").is_dir():
            return
        recorded.mkdir(parents=True, exist_ok=True)
        dev = [line for line in (run / "metrics.jsonl").read_text().splitlines() if json.loads(line)["kind"] == "dev"]
        write_text_atomic(recorded / "dev.jsonl", "\n".join(dev) + "\n")
        write_text_atomic(recorded / "summary.json", (run / "summary.json").read_text())
        if (run / "scores.json").exists():
            write_text_atomic(recorded / "scores.json", (run / "scores.json").read_text())

    def best_dev_ce(self, run: Path) -> float:
        if (run / "final").is_dir():
            lines = (run / "metrics.jsonl").read_text().splitlines()
        else:
            recorded = self._recorded(run)
            assert recorded is not None, f"{run} is not trained"
            lines = (recorded / "dev.jsonl").read_text().splitlines()
        return min(r["ce"] for r in map(json.loads, lines) if r["kind"] == "dev")

    def scores(self, run: Path) -> dict[str, float]:
        """Test ROUGE-L, exact match (means over the sampling seeds) and the share of samples with an invented
        word of a run: computed once, kept in the run folder and the record."""
        recorded = self._recorded(run)
        for folder in (run, recorded):
            if folder is not None and (folder / "scores.json").exists():
                result = json.loads((folder / "scores.json").read_text())
                if "invented" not in result:  # scored before the column existed: from the saved samples
                    result["invented"] = self.invented(run)
                    write_text_atomic(folder / "scores.json", json.dumps(result, indent=2))
                if folder == run:
                    self._keep(run)
                return result
        sets = [replace(s, name="test") for s in resolve_test_sets([self.data["test"]])[0]]
        settings = GenerationConfig(max_length=64, max_prompt_length=40, batch_size=50)
        s = evaluate(run, sets, settings, seeds=self.sampling_seeds, out_dir=run / "eval",
                     progress=False)["sets"]["test"]
        result = {"rougeL": s["mean"]["rougeL"], "exact_match": s["mean"]["exact_match"],
                  "dev_ce": self.best_dev_ce(run), "invented": self.invented(run)}
        write_text_atomic(run / "scores.json", json.dumps(result, indent=2))
        self._keep(run)
        return result

    def invented(self, run: Path) -> float:
        """% of a run's test samples (all sampling seeds) with a word or symbol that occurs nowhere in the
        students' training data: text a tokenizer can spell but the data never taught (a diagnostic of
        probability mass on pieces that only recombine into junk)."""
        if self._words is None:
            self._words = set()
            for line in self.data["student-train"].read_text().splitlines():
                record = json.loads(line)
                outputs = record["output"] if isinstance(record["output"], list) else [record["output"]]
                for text in (record["prompt"], *outputs):
                    self._words.update(_WORD.findall(text))
        flagged = total = 0
        for seed in self.sampling_seeds:
            for line in (run / "eval" / "generations" / f"test.seed{seed}.jsonl").read_text().splitlines():
                words = _WORD.findall(json.loads(line)["generation"])
                flagged += any(w not in self._words for w in words)
                total += 1
        return 100.0 * flagged / max(total, 1)

    def path(self, row: Row, lr: float, seed: int) -> Path:
        return self.out / "runs" / row.name / _lr_name(lr) / f"seed{seed}"

    def finished(self, row: Row) -> dict[str, Any]:
        """What is done of a row, training nothing: the grid's dev CE, the chosen lr once the grid is complete,
        and the scores of the chosen lr's seeds that are evaluated (an ablation: its base row's grid and lr)."""
        grid_row = _BY_NAME[row.base] if row.base is not None else row
        for lr in self.lrs:
            self._keep(self.path(grid_row, lr, self.seeds[0]))  # runs trained before there was a record
        grid = {f"{lr:g}": self.best_dev_ce(self.path(grid_row, lr, self.seeds[0])) for lr in self.lrs
                if self.trained(self.path(grid_row, lr, self.seeds[0]))}
        entry: dict[str, Any] = {"tokenizer": row.tokenizer, "what": row.what, "lr": None, "dev_ce_by_lr": grid,
                                 "seeds": {}, "base": row.base}
        if len(grid) == len(self.lrs):
            entry["lr"] = min(self.lrs, key=lambda lr: (not math.isfinite(grid[f"{lr:g}"]), grid[f"{lr:g}"]))
            for seed in self.seeds:
                run = self.path(row, entry["lr"], seed)
                self._keep(run)
                if self.scored(run):
                    entry["seeds"][str(seed)] = self.scores(run)
        return entry

    def chosen_lr(self, row: Row) -> float:
        if row.base is not None:
            return self.chosen_lr(_BY_NAME[row.base])
        runs = {lr: self.run(row, lr, self.seeds[0]) for lr in self.lrs}
        ce = {lr: self.best_dev_ce(run) for lr, run in runs.items()}
        return min(ce, key=lambda lr: (not math.isfinite(ce[lr]), ce[lr]))


def run_methods_table(output_dir: str | Path = "runs/methods-table", quick: bool = False,
                      rows: Sequence[str] | None = None, doc: str | Path | None = None,
                      report_only: bool = False, record: str | Path | None = None) -> Path:
    """Train and score every row (resumable); write the table to `<output_dir>/methods-table.md` (and to `doc`,
    a document whose generated part is rewritten, only when given); returns the results file. `report_only`:
    train and evaluate nothing, write the table of what is finished (rows with fewer seeds say how many).
    `record`: the folder that keeps finished runs' results across machines (Bench.record). Nothing outside
    `output_dir` is written unless named: a smoke run never rewrites a committed document."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True, soft_wrap=True)
    bench = Bench(out, quick, console, Path(record) if record is not None else None)
    chosen = [r for r in ALL_ROWS if rows is None or r.name in rows]
    if rows is not None and len(chosen) != len(rows):
        raise ConfigError(f"--rows: unknown rows {sorted(set(rows) - set(_BY_NAME))}; known: {list(_BY_NAME)}")
    order = sorted(chosen, key=lambda r: (r.base is not None,
                                          _FIRST.index(r.name) if r.name in _FIRST else len(_FIRST)))
    command = (f"dualkd methods-table --output-dir {out}" + (" --quick" * quick)
               + (f" --record {record}" if record is not None else "") + (f" --doc {doc}" if doc is not None else ""))
    if report_only:
        results = {row.name: bench.finished(row) for row in order}
        write_text_atomic(out / "results.json", json.dumps(results, indent=2))
        for target in [out / "methods-table.md", *([Path(doc)] if doc is not None else [])]:
            write_doc(results, target, command=command + " --report-only", expected=len(bench.seeds))
        return out / "results.json"
    started = time.perf_counter()
    lrs = {row.name: bench.chosen_lr(row) for row in order}  # the grids first: every row gets a first figure
    results: dict[str, Any] = {}
    for row in order:
        lr = lrs[row.name]
        runs = [bench.path(row, lr, seed) if bench.scored(bench.path(row, lr, seed))
                else bench.run(row, lr, seed, need_model=True) for seed in bench.seeds]
        grid_row = _BY_NAME[row.base] if row.base is not None else row
        grid = {f"{lr_:g}": bench.best_dev_ce(bench.path(grid_row, lr_, bench.seeds[0])) for lr_ in bench.lrs}
        results[row.name] = {"tokenizer": row.tokenizer, "what": row.what, "lr": lr, "dev_ce_by_lr": grid,
                             "seeds": {str(seed): bench.scores(run) for seed, run in zip(bench.seeds, runs)},
                             "base": row.base}
        write_text_atomic(out / "results.json", json.dumps(results, indent=2))
    console.print(f"methods table: {len(order)} rows in {(time.perf_counter() - started) / 60:.1f} min")
    for target in [out / "methods-table.md", *([Path(doc)] if doc is not None else [])]:
        write_doc(results, target, command=command, expected=len(bench.seeds))
    return out / "results.json"


def _summary(values: list[float]) -> tuple[float, float]:
    """Mean and sample std over training seeds (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return abs(a[0] - b[0]) <= a[1] + b[1]


def table_markdown(results: dict[str, Any], expected: int | None = None) -> str:
    """The table: per row mean ± std over training seeds; `~` marks an interval that overlaps SFT's. Rows
    with fewer scored seeds than the others say how many; rows with none are left out (see the grid)."""
    lines = []
    most = expected or max((len(r["seeds"]) for r in results.values()), default=0)  # seeds a full row has
    for tokenizer, title in (("teacher", "Same tokenizer as the teacher"), ("own", "Own tokenizer")):
        names = [n for n, r in results.items() if r["tokenizer"] == tokenizer and r["seeds"] and not r.get("base")]
        if not names:
            continue
        stats = {n: {m: _summary([s[m] for s in results[n]["seeds"].values()])
                     for m in ("rougeL", "exact_match", "dev_ce", "invented")} for n in names}
        base = "sft" if tokenizer == "teacher" else "own-sft"
        lines += [f"### {title}", "", "| row | method | lr | dev CE | ROUGE-L | exact match | invented % |",
                  "|---|---|---|---|---|---|---|"]
        for n in names:
            cells = []
            for m, digits in (("dev_ce", 3), ("rougeL", 2), ("exact_match", 1), ("invented", 1)):
                mean, std = stats[n][m]
                mark = " ~" if n != base and base in stats and m in ("rougeL", "exact_match") and _overlaps(stats[n][m],
                                                                                         stats[base][m]) else ""
                cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}{mark}")
            seeds = len(results[n]["seeds"])
            what = results[n]["what"] + (f" ({seeds} seed{'s' * (seeds > 1)})" if seeds < most else "")
            lines.append(f"| {n} | {what} | {results[n]['lr']:g} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines + ablation_markdown(results, most))


def ablation_markdown(results: dict[str, Any], most: int) -> list[str]:
    """The ablations beside the row they vary and that row's SFT baseline: mean ± std, and the difference
    of means from the base row (`~`: the intervals overlap)."""
    names = [n for n, r in results.items() if r.get("base") and r["seeds"]]
    if not names:
        return []
    lines = ["### Ablations", "", "Δ ROUGE-L: the difference of means from the row each ablation varies "
             "(`…` in its description; `~`: the intervals overlap).", "",
             "| row | what changes | dev CE | ROUGE-L | Δ ROUGE-L | exact match | invented % |",
             "|---|---|---|---|---|---|---|"]
    shown: list[str] = []
    for n in names:
        base = results[n]["base"]
        for ref in ("own-sft" if results[n]["tokenizer"] == "own" else "sft", base):
            if ref in results and results[ref]["seeds"] and ref not in shown:
                shown.append(ref)
        shown.append(n)
    for n in shown:
        stats = {m: _summary([s[m] for s in results[n]["seeds"].values()])
                 for m in ("rougeL", "exact_match", "dev_ce", "invented")}
        base = results[n].get("base")
        delta = "—"
        if base and base in results and results[base]["seeds"]:
            ref = _summary([s["rougeL"] for s in results[base]["seeds"].values()])
            delta = f"{stats['rougeL'][0] - ref[0]:+.2f}" + (" ~" if _overlaps(stats["rougeL"], ref) else "")
        seeds = len(results[n]["seeds"])
        what = results[n]["what"] + (f" ({seeds} seed{'s' * (seeds > 1)})" if seeds < most else "")
        cells = [f"{stats[m][0]:.{d}f} ± {stats[m][1]:.{d}f}" for m, d in (("dev_ce", 3), ("rougeL", 2))]
        cells += [delta] + [f"{stats[m][0]:.{d}f} ± {stats[m][1]:.{d}f}" for m, d in (("exact_match", 1),
                                                                                      ("invented", 1))]
        lines.append(f"| {n} | {what} | " + " | ".join(cells) + " |")
    return lines + [""]


def grid_markdown(results: dict[str, Any]) -> str:
    """The learning-rate search: best dev CE of the first seed per lr (— where not trained yet)."""
    lrs = sorted({lr for r in results.values() for lr in r["dev_ce_by_lr"]}, key=float)
    lines = ["### Learning-rate search (best dev CE, first seed; per token of the row's own tokenizer)", "",
             "| row | " + " | ".join(f"lr {lr}" for lr in lrs) + " | chosen |", "|---|" + "---|" * (len(lrs) + 1)]
    for name, r in results.items():
        if r.get("base"):
            continue  # an ablation trains at its base row's lr
        cells = [f"{r['dev_ce_by_lr'][lr]:.3f}" if lr in r["dev_ce_by_lr"] else "—" for lr in lrs]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['lr']:g} |" if r["lr"] is not None
                     else f"| {name} | " + " | ".join(cells) + " | — |")
    return "\n".join(lines) + "\n"


def write_doc(results: dict[str, Any], doc: Path, command: str, expected: int | None = None) -> None:
    """Write the generated part of the methods table document (between markers) and its plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in results.items() if r["seeds"] and not r.get("base")]
    plot = doc.with_suffix(".png")
    if names:
        fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(names) + 1.5), sharey=True)
        for ax, metric in zip(axes, ("rougeL", "exact_match")):
            stats = [_summary([s[metric] for s in results[n]["seeds"].values()]) for n in names]
            colors = ["tab:blue" if results[n]["tokenizer"] == "teacher" else "tab:orange" for n in names]
            ax.barh(range(len(names)), [m for m, _ in stats], xerr=[s for _, s in stats], color=colors, capsize=3)
            ax.set_title(f"{'ROUGE-L' if metric == 'rougeL' else 'exact match'} (mean ± std over training seeds)")
            ax.grid(axis="x", alpha=0.3)
        axes[0].set_yticks(range(len(names)), names)
        axes[0].invert_yaxis()
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
        plt.close(fig)
    generated = (f"<!-- generated by `{command}`: do not edit between the markers -->\n\n"
                 + table_markdown(results, expected) + (f"\n![methods table]({plot.name})\n\n" if names else "\n")
                 + grid_markdown(results) + "<!-- end generated -->")
    text = doc.read_text() if doc.exists() else "# The methods table\n\n<!-- generated -->\n"
    head, _, rest = text.partition("<!-- generated")
    _, _, tail = rest.partition("<!-- end generated -->")
    write_text_atomic(doc, head + generated + tail)
