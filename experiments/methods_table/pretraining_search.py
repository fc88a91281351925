"""Which pretraining helps SFT? A search on dev data only, before the pretrained setting's rows are trained.

    OMP_NUM_THREADS=1 python -m experiments.methods_table.pretraining_search --variants packed4 answers
    python -m experiments.methods_table.pretraining_search --report        # the table of what is measured

Each variant pretrains the student of the teacher's tokenizer (the demo student's GPT-2, seed 10) as a plain LM
on a corpus built by pretraining.py, then fine-tunes it with SFT on the 600 labeled examples at each lr of the
table's grid (seed 10, the table's budget or `--epochs`). A variant's figure is its best dev CE (nats per token
of the teacher's tokenizer, the 300 dev examples' responses), comparable with SFT from random weights because
the tokenizer is the same. No test prompt is read. Results: pretraining_search.json here (one entry per
variant and budget), runs under runs/methods-table/pretraining-search/.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from dualkd.atomic import write_text_atomic
from dualkd.config import load_config
from dualkd.data.dataset import TruncationRules, tokenize_examples
from dualkd.data.formats import parse_record
from dualkd.data.instructions import family_of
from dualkd.data.synthetic import generate
from dualkd.errors import DataError
from dualkd.recipes import recipe
from dualkd.train.loop import train
from experiments.methods_table.bench import PRETRAIN_RECORDS, Bench, _write_jsonl, dev_records
from experiments.methods_table.pretraining import SEED, _key, _taken, outputs, pretraining_corpus
from experiments.methods_table.rows import LRS

HERE = Path(__file__).parent
RESULTS = HERE / "pretraining_search.json"


@dataclass(frozen=True)
class Variant:
    what: str
    corpus: dict
    """pretraining_corpus's keyword arguments."""
    steps: int = 1500
    lr: float = 3e-3
    labeled: bool = False
    """A diagnostic, not a candidate: the corpus's records whole (template, instruction, input and answer), a
    second labeled training set, to tell a start that cannot help from a corpus that does not."""
    shrink: float = 1.0
    """Shrink and perturb (Ash & Adams, 2020): the pretrained weights times `shrink`, plus noise of the random
    init's scale times (1 - `shrink`), before fine-tuning (1: the pretrained weights as they are)."""


VARIANTS = {
    "packed4": Variant("4 shuffled segments (answers, inputs) per document (the first sitting's corpus)", {}),
    "packed4-300": Variant("packed4, 300 pretraining steps", {}, steps=300),
    "packed4-shrink0.5": Variant("packed4, then shrink and perturb (0.5)", {}, shrink=0.5),
    "segments": Variant("each segment (an answer or an input) a document of its own", {"segments_per_document": 1}),
    "answers": Variant("each answer a document of its own, no inputs", {"segments_per_document": 1,
                                                                       "inputs": False}),
    "packed4-repeat": Variant("packed4, each document ending with a verbatim repeat of one of its segments (text "
                              "recurs, as in natural text)", {"repeats": 1}),
    "packed4-repeat-300": Variant("packed4-repeat, 300 pretraining steps", {"repeats": 1}, steps=300),
    "packed8-repeat4": Variant("8 shuffled segments per document, then 4 of them again", {"segments_per_document": 8,
                                                                                 "repeats": 4}),
    "paired": Variant("one record per document: its input, then its answer (no instruction, no template)",
                      {"paired": True}),
    "paired-300": Variant("paired, 300 pretraining steps", {"paired": True}, steps=300),
    "labeled": Variant("a diagnostic, not unlabeled: each disjoint record whole (template, instruction, input, "
                       "answer) as one document", {}, labeled=True),
    "answers+prompts": Variant("each answer a document, and each record's prompt (no answer) another",
                               {"segments_per_document": 1, "inputs": False, "prompt_documents": True}),
}


def _shrink_perturb(model_dir: Path, out: Path, shrink: float, seed: int = 10) -> Path:
    """A copy of a saved model whose every weight matrix is shrink·W + (1 − shrink)·noise (noise: N(0, 0.02),
    GPT-2's init scale; biases and layer norms kept)."""
    if not (out / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(shrink).add_(torch.randn(p.shape, generator=g) * 0.02 * (1 - shrink))
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def pretrain(bench: Bench, name: str, variant: Variant) -> Path:
    """The teacher-tokenizer student pretrained on the variant's corpus (resumable); its folder."""
    root = bench.out / "pretraining-search" / name
    run = root / "pretrain"
    if not (run / "final").is_dir():
        labeled = [bench.data[k] for k in ("teacher-train", "dev", "student-train", "test")]
        if variant.labeled:
            taken = _taken(labeled)
            docs = [{"prompt": "", "output": r["prompt"] + outputs(r)[0]} for r in generate(
                "instructions", PRETRAIN_RECORDS, SEED) if _key(r) not in taken]
        else:
            docs = pretraining_corpus(PRETRAIN_RECORDS, labeled, **variant.corpus)
        cut = len(docs) // 20
        dev = _write_jsonl(root / "corpus-dev.jsonl", docs[:cut])
        corpus = _write_jsonl(root / "corpus.jsonl", docs[cut:])
        train(load_config(recipe("demo-student"), [
            f"output_dir={run}", "objective={name: sft}", "teacher=null", f"student.tokenizer={bench.teacher()}",
            "seed=10", f"data.train.path={corpus}", "data.train.synthetic=null", f"data.dev.path={dev}",
            "data.dev.synthetic=null", "data.max_prompt_length=null", f"optimization.max_steps={variant.steps}",
            f"optimization.lr={variant.lr}", "checkpoint.resume=auto", "eval.every_steps=100",
            "checkpoint.every_steps=500"]))
    start = run / "final"
    return start if variant.shrink == 1.0 else _shrink_perturb(start, root / f"shrink{variant.shrink:g}",
                                                              variant.shrink)


def fine_tune(bench: Bench, start: Path | None, lr: float, epochs: int, out: Path) -> float:
    """SFT on the 600 labeled examples from `start` (None: random weights); its best dev CE."""
    if not (out / "final").is_dir():
        student = ([f"student.tokenizer={bench.teacher()}"] if start is None else
                   [f"student.path={start}", "student.init=pretrained", "student.arch={}", "student.tokenizer=null"])
        train(load_config(recipe("demo-student"), [
            f"output_dir={out}", "seed=10", f"optimization.lr={lr}", "objective={name: sft}", "teacher=null",
            *student, *bench._data_overrides("student-train"), "checkpoint.resume=auto",
            f"optimization.epochs={epochs}"]))
    return min(r["ce"] for r in dev_records(out))


def ce_by_family(model_dir: Path, dev_file: Path) -> dict[str, float]:
    """Mean CE per response token of a model on the dev examples, per task family (data/instructions.py): where
    a pretrained start helps or hurts the fine-tuning."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = [parse_record(json.loads(line), f"{dev_file}:{i}")
                for i, line in enumerate(dev_file.read_text().splitlines(), 1)]
    rules = TruncationRules(max_length=64, max_prompt_length=40)
    sums: dict[str, list[float]] = {}
    with torch.no_grad():
        for ex, tok in zip(examples, tokenize_examples(examples, tokenizer, rules)):
            assert not isinstance(tok, DataError), tok
            ids = torch.tensor([tok.ids])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            nll = -logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]][tok.prompt_len - 1:]
            acc = sums.setdefault(family_of(ex.prompt), [0.0, 0.0])
            acc[0] += nll.sum().item()
            acc[1] += nll.numel()
    return {family: total / n for family, (total, n) in sorted(sums.items())}


def search(names: list[str], epochs: int, out: Path, lrs: tuple[float, ...] = LRS) -> dict:
    console = Console(stderr=True)
    bench = Bench(out, False, console, None, "pretrained")
    results: dict = {}
    for name in names:
        start = None if name == "scratch" else pretrain(bench, name, VARIANTS[name])
        grid = {}
        for lr in lrs:
            console.rule(f"[bold]{name}: SFT at lr {lr:g}, {epochs} epochs")
            grid[f"{lr:g}"] = fine_tune(bench, start, lr, epochs,
                                        out / "pretraining-search" / name / f"e{epochs}" / f"sft-lr{lr:g}")
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}  # another process may have added
        best_lr = min(grid, key=grid.__getitem__)
        best_run = out / "pretraining-search" / name / f"e{epochs}" / f"sft-lr{best_lr}"
        best_run = best_run / "best" if (best_run / "best").is_dir() else best_run / "final"
        results[f"{name}/e{epochs}"] = {"what": "random weights" if start is None else VARIANTS[name].what,
                                        "dev_ce_by_lr": grid, "best": grid[best_lr],
                                        "by_family": ce_by_family(best_run, bench.data["dev"])}
        write_text_atomic(RESULTS, json.dumps(results, indent=2, sort_keys=True) + "\n")
    return results


def report(results: dict) -> str:
    """Two markdown tables: each variant's grid (best dev CE per lr) and its best run's dev CE per task family."""
    def what(name: str) -> str:
        return "random weights" if name == "scratch" else VARIANTS[name].what

    keys = sorted(results, key=lambda k: (k.split("/")[1] != "e30", k != "scratch/" + k.split("/")[1], k))
    families = sorted(next(iter(results.values()))["by_family"]) if results else []
    grid = ["| variant | budget | corpus | " + " | ".join(f"lr {lr:g}" for lr in LRS) + " | best |",
            "|---|---|---|" + "---|" * (len(LRS) + 1)]
    by_family = ["| variant | budget | " + " | ".join(families) + " |", "|---|---|" + "---|" * len(families)]
    for key in keys:
        name, budget = key.split("/")
        e = results[key]
        grid.append(f"| {name} | {budget} | {what(name)} | "
                    + " | ".join(f"{e['dev_ce_by_lr'][f'{lr:g}']:.3f}" if f"{lr:g}" in e["dev_ce_by_lr"] else "—"
                                 for lr in LRS) + f" | {e['best']:.3f} |")
        by_family.append(f"| {name} | {budget} | " + " | ".join(f"{e['by_family'][f]:.3f}" for f in families)
                         + " |")
    return ("\n".join(grid) + "\n\nDev CE per task family (nats per token; the best run of each variant's grid):"
            "\n\n" + "\n".join(by_family))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.methods_table.pretraining_search",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", choices=["scratch", *VARIANTS], default=["scratch", *VARIANTS])
    p.add_argument("--epochs", type=int, default=30, help="the fine-tuning's budget (default: the table's 30)")
    p.add_argument("--lrs", nargs="+", type=float, default=list(LRS), help="the fine-tuning's lr grid "
                                                                         "(default: the table's)")
    p.add_argument("--output-dir", type=Path, default=Path("runs/methods-table"))
    p.add_argument("--report", action="store_true", help="print the table of what is measured, train nothing")
    args = p.parse_args(argv)
    results = (json.loads(RESULTS.read_text()) if RESULTS.exists() else {}) if args.report else \
        search(args.variants, args.epochs, args.output_dir, tuple(args.lrs))
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
