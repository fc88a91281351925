"""Training and scoring the table's runs, resumably, and the committed record that outlives the run folders.

Every run is a folder `<out>/runs/[pretrained/]<row>/lr<lr>/seed<seed>`: a finished run (final model and
scores) is skipped and an unfinished one resumes from its last checkpoint. What the table reads of a finished
run (its dev curve, summary and scores) also goes to the record, one JSON line per run and one file per table
(`records/<table>.jsonl`, committed beside the document), so a table continues on another machine without
redoing what is recorded.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from dualkd.atomic import write_text_atomic
from dualkd.config import GenerationConfig, RunConfig, load_config
from dualkd.data.synthetic import generate
from dualkd.data.tokenizers import train_tokenizer
from dualkd.eval.harness import PROTOCOL_SEEDS, evaluate
from dualkd.eval.suites import resolve_test_sets
from dualkd.recipes import recipe
from dualkd.train.loop import train
from experiments.methods_table.pretraining import outputs, pretraining_corpus
from experiments.methods_table.rows import BY_NAME, GENERATION, LRS, SEEDS, Row

RECORDS = Path(__file__).parent / "records"
"""The committed records, one file per table (`<table>.jsonl`, `table_name`): one file for every table would
grow past what a diff or a reader takes in (1 MB at the fourth table)."""
SETTINGS = ("scratch", "pretrained")
"""`scratch`: every student starts from random weights. `pretrained`: each tokenizer's student is first
trained as a plain LM on unlabeled in-domain text (pretraining.py) and every row fine-tunes from it."""
PRETRAIN_RECORDS, PRETRAIN_STEPS = 6000, 1500
"""The pretraining corpus's generated records and the steps of each student's pretraining (one budget for
both tokenizers)."""
PRETRAIN_CORPUS = {"repeats": 1}
"""pretraining_corpus's options: documents of 4 shuffled segments that end with a verbatim repeat of one of
them (chosen on dev among the variants of pretraining_search.py; README.md here)."""

_WORD = re.compile(r"\w+|[^\w\s]")


class Record:
    """Finished runs by key (`row/lr<lr>/seed<seed>`): {"run", "dev": [dev records], "summary", "scores"?}, one
    JSON line each, sorted by key so that a diff shows what a sitting added."""

    def __init__(self, path: Path):
        self.path = path
        lines = path.read_text().splitlines() if path.exists() else []
        self.entries: dict[str, dict[str, Any]] = {e["run"]: e for e in map(json.loads, lines) if e}

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, entry: dict[str, Any]) -> None:
        if self.entries.get(entry["run"]) == entry:
            return
        self.entries[entry["run"]] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, "".join(json.dumps(self.entries[k]) + "\n" for k in sorted(self.entries)))


def table_name(setting: str, epochs: int | None) -> str:
    """A table's name: its setting, and its budget where it is not the recipe's (`scratch-e240`). It names the
    table's record file and its section of the document."""
    return setting + ("" if epochs is None else f"-e{epochs}")


def table_record(records: Path, setting: str, epochs: int | None) -> Record:
    """The record of one table in a folder of records (`<records>/<table>.jsonl`)."""
    return Record(records / f"{table_name(setting, epochs)}.jsonl")


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
    return path


@dataclass
class Bench:
    out: Path
    quick: bool
    console: Console
    record: Record | None = None
    """The committed record (see the module docstring); None: the run folders only."""
    setting: str = "scratch"
    """Where the students start (`SETTINGS`)."""
    epochs: int | None = None
    """The students' budget in epochs (None: the recipe's 30). Another budget is a table of its own: its runs
    sit under `e<epochs>/`, and its learning rate is chosen once per half on SFT's grid (`grid_row`)."""
    data: dict[str, Path] = field(init=False)

    def __post_init__(self) -> None:
        n_test = 24 if self.quick else 200
        teacher_data = load_config(recipe("demo-teacher")).data
        sets = {"teacher-train": (teacher_data.train.num_examples, teacher_data.train.seed),
                "dev": (teacher_data.dev.num_examples, teacher_data.dev.seed),
                "student-train": (600, 3), "test": (n_test, 4)}
        self.data = {k: _write_jsonl(self.out / "data" / f"{k}.jsonl", generate("instructions", n, seed))
                     for k, (n, seed) in sets.items()}
        if self.setting == "pretrained":  # unlabeled documents, disjoint from every labeled set; 5% held out
            docs = pretraining_corpus(PRETRAIN_RECORDS // (20 if self.quick else 1), list(self.data.values()),
                                      **PRETRAIN_CORPUS)
            cut = len(docs) // 20
            self.data["pretrain-dev"] = _write_jsonl(self.out / "data" / "pretrain-dev.jsonl", docs[:cut])
            self.data["pretrain"] = _write_jsonl(self.out / "data" / "pretrain.jsonl", docs[cut:])
        self.short = (["optimization.max_steps=4", "eval.every_steps=2", "checkpoint.every_steps=2"]
                      if self.quick else [])
        self.sampling_seeds = PROTOCOL_SEEDS[:2] if self.quick else PROTOCOL_SEEDS
        self.lrs = LRS[1:2] if self.quick else LRS
        self.seeds = SEEDS[:2] if self.quick else SEEDS
        self._words: set[str] | None = None  # every word and symbol of the students' training data

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

    def pretrained_student(self, tokenizer: str, teacher: Path) -> Path:
        """The student of one tokenizer (`teacher`'s or its `own`, of the teacher's size) after its pretraining
        as a plain LM on the corpus: the demo student's architecture, SFT with empty prompts, a fixed budget."""
        run = self.out / f"pretrained-student-{tokenizer}"
        if not (run / "final").is_dir():
            self.console.rule(f"[bold]pretraining the student of the {tokenizer} tokenizer on unlabeled text")
            student = [f"student.tokenizer={teacher if tokenizer == 'teacher' else self.own_tokenizer(teacher)}"]
            steps = 4 if self.quick else PRETRAIN_STEPS
            train(load_config(recipe("demo-student"), [
                f"output_dir={run}", "objective={name: sft}", "teacher=null", *student, "seed=10",
                f"data.train.path={self.data['pretrain']}", "data.train.synthetic=null",
                f"data.dev.path={self.data['pretrain-dev']}", "data.dev.synthetic=null", "data.max_prompt_length=null",
                f"optimization.max_steps={steps}", "checkpoint.resume=auto",
                "eval.every_steps=2" if self.quick else "eval.every_steps=100",
                "checkpoint.every_steps=2" if self.quick else "checkpoint.every_steps=500"]))
        return run / "final"

    def own_tokenizer(self, teacher: Path) -> Path:
        """The pretrained setting's own tokenizer: the scratch rows' own (SentencePiece-style, the teacher's size,
        trained on the students' labeled texts; the same texts in the same order, so the same tokenizer), made
        before the pretraining that reads it. So the two settings' own-tokenizer halves differ only in where
        the student starts (a tokenizer that also read the corpus gave a weaker SFT row: README.md here)."""
        out = self.out / "own-tokenizer"
        if not (out / "tokenizer.json").exists():
            labeled = [json.loads(line) for line in self.data["student-train"].read_text().splitlines()]
            texts = [r["prompt"] + outputs(r)[0] for r in labeled]  # as train/prepare.py's training_texts
            train_tokenizer(texts, _vocab_size(teacher), "metaspace").save_pretrained(out)
        return out

    def config(self, row: Row, lr: float, seed: int, teacher: Path) -> RunConfig:
        """The run's config: the demo student's recipe with the row's objective, source and tokenizer
        (`teacher`: the main teacher, whose vocabulary size the own-tokenizer students take)."""
        run = self.path(row, lr, seed)
        vocab = _vocab_size(teacher)
        if row.teacher_vocab is not None:
            teacher = self.teacher(row.teacher_vocab)
        # one architecture for every student: the own-tokenizer rows differ only in their tokenizer
        if self.setting == "pretrained":  # the tokenizer's pretrained student, its tokenizer saved with it
            start = self.pretrained_student(row.tokenizer, self.teacher())
            student = [f"student.path={start}", "student.init=pretrained", "student.arch={}", "student.tokenizer=null",
                       "student.train_tokenizer=null"]
        elif row.tokenizer == "teacher":
            student = [f"student.tokenizer={teacher}"]
        else:
            student = ["student.tokenizer=null", f"student.train_tokenizer={{vocab_size: {vocab}, style: metaspace}}"]
        overrides = [f"output_dir={run}", f"seed={seed}", f"optimization.lr={lr}", f"objective={row.objective}",
                     *student, *self._data_overrides("student-train"), "checkpoint.resume=auto",
                     "teacher=null" if row.objective == "{name: sft}" and row.source is None
                     else f"teacher.path={teacher}", *self.short]
        if row.source is not None:
            overrides += [f"source={row.source}", f"generation={GENERATION}"]
        if self.epochs is not None:
            overrides += [f"optimization.epochs={self.epochs}"]
        return load_config(recipe("demo-student"), overrides)

    def path(self, row: Row, lr: float, seed: int) -> Path:
        setting = [] if self.setting == "scratch" else [self.setting]  # scratch: directly under runs/
        budget = [] if self.epochs is None else [f"e{self.epochs}"]
        return self.out.joinpath("runs", *setting, *budget, row.name, f"lr{lr:g}", f"seed{seed}")

    @property
    def table(self) -> str:
        return table_name(self.setting, self.epochs)

    def _recorded(self, run: Path) -> dict[str, Any] | None:
        return self.record.get(run.relative_to(self.out / "runs").as_posix()) if self.record is not None else None

    def trained(self, run: Path) -> bool:
        return (run / "final").is_dir() or self._recorded(run) is not None

    def scored(self, run: Path) -> bool:
        return (run / "scores.json").exists() or "scores" in (self._recorded(run) or {})

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
        """Put what the table reads of a finished run (dev curve, summary, scores) into the record."""
        if self.record is None or not (run / "final").is_dir():
            return
        entry = {"run": run.relative_to(self.out / "runs").as_posix(), "dev": dev_records(run),
                 "summary": json.loads((run / "summary.json").read_text())}
        if (run / "scores.json").exists():
            entry["scores"] = json.loads((run / "scores.json").read_text())
        self.record.put(entry)

    def dev_curve(self, run: Path) -> list[dict[str, Any]]:
        """A finished run's dev records (step, ce, ...), from its folder or the record."""
        if (run / "final").is_dir():
            return dev_records(run)
        recorded = self._recorded(run)
        assert recorded is not None, f"{run} is not trained"
        return recorded["dev"]

    def best_dev_ce(self, run: Path) -> float:
        return min(r["ce"] for r in self.dev_curve(run))

    def scores(self, run: Path) -> dict[str, float]:
        """Test ROUGE-L, exact match (means over the sampling seeds), best dev CE and the share of samples with
        an invented word of a run: computed once, kept in the run folder and the record."""
        if (run / "scores.json").exists():
            self._keep(run)
            return json.loads((run / "scores.json").read_text())
        recorded = self._recorded(run)
        if recorded is not None and "scores" in recorded:
            return recorded["scores"]
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
                for text in (record["prompt"], *outputs(record)):
                    self._words.update(_WORD.findall(text))
        flagged = total = 0
        for seed in self.sampling_seeds:
            for line in (run / "eval" / "generations" / f"test.seed{seed}.jsonl").read_text().splitlines():
                words = _WORD.findall(json.loads(line)["generation"])
                flagged += any(w not in self._words for w in words)
                total += 1
        return 100.0 * flagged / max(total, 1)

    def finished(self, row: Row) -> dict[str, Any]:
        """What is done of a row, training nothing: the grid's dev CE, the chosen lr once the grid is complete,
        and the scores of the chosen lr's seeds that are evaluated (an ablation: its base row's grid and lr)."""
        grid_row = self.grid_row(row)
        runs = {lr: self.path(grid_row, lr, self.seeds[0]) for lr in self.lrs}
        for run in runs.values():
            self._keep(run)  # a run trained here before the record was named
        grid = {f"{lr:g}": self.best_dev_ce(run) for lr, run in runs.items() if self.trained(run)}
        entry: dict[str, Any] = {"tokenizer": row.tokenizer, "what": row.what, "lr": None, "dev_ce_by_lr": grid,
                                 "seeds": {}, "base": row.base, "grid_from": grid_row.name}
        if len(grid) == len(self.lrs):
            entry["lr"] = _lowest(grid)
            for seed in self.seeds:
                run = self.path(row, entry["lr"], seed)
                self._keep(run)
                if self.scored(run):
                    entry["seeds"][str(seed)] = self.scores(run)
        return entry

    def grid_row(self, row: Row) -> Row:
        """The row whose learning-rate grid chooses `row`'s lr: its own; an ablation's base row's; with
        pretrained students or another budget, the SFT row of its tokenizer (one grid per half, chosen on dev)."""
        if row.base is not None:
            return self.grid_row(BY_NAME[row.base])
        if self.setting == "pretrained" or self.epochs is not None:
            return BY_NAME["sft" if row.tokenizer == "teacher" else "own-sft"]
        return row

    def chosen_lr(self, row: Row) -> float:
        """The row's learning rate: the best dev CE of its grid row's runs with the first seed."""
        grid_row = self.grid_row(row)
        runs = {f"{lr:g}": self.run(grid_row, lr, self.seeds[0]) for lr in self.lrs}
        return _lowest({name: self.best_dev_ce(run) for name, run in runs.items()})


DEV_DIGITS = 8
"""Significant digits a dev metric keeps in the record (the tables print 3 decimals): what keeps the committed
record small, 87 dev evaluations per 240-epoch run."""


def dev_records(run: Path) -> list[dict[str, Any]]:
    """A run's dev evaluations from its metrics.jsonl, as the record keeps them: step and every metric, each to
    `DEV_DIGITS` significant digits, without the wall-clock time. The run folder and the record read alike."""
    dev = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "dev"]
    return [slim_dev(r) for r in dev]


def slim_dev(record: dict[str, Any]) -> dict[str, Any]:
    """One dev evaluation as the record keeps it (see `dev_records`)."""
    return {k: v if k == "step" else float(f"{v:.{DEV_DIGITS}g}") for k, v in record.items()
            if k not in ("kind", "time")}


def _vocab_size(model_dir: Path) -> int:
    """The tokens of a saved byte-level BPE tokenizer's vocabulary (the teacher's: 733)."""
    return len(json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"])


def _lowest(dev_ce_by_lr: dict[str, float]) -> float:
    """The lr (by its name) with the lowest finite dev CE."""
    return float(min(dev_ce_by_lr, key=lambda lr: (not math.isfinite(dev_ce_by_lr[lr]), dev_ce_by_lr[lr])))
