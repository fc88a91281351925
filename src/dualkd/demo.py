"""`dualkd demo`: the whole workflow in miniature, on CPU, offline, in a few minutes.

1. train a tiny GPT-2 teacher from scratch (SFT) on 8,000 examples of a generated task whose answers are
   sampled from a fixed distribution per prompt (recipe tiny-teacher);
2. distill it into a 6x smaller student with vanilla KD, from only 600 labeled examples (recipe tiny-kd);
3. train the same student on the same 600 examples without a teacher (SFT baseline);
4. compare dev cross-entropy and how often each model's greedy answer agrees with the teacher's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from dualkd.config import load_config
from dualkd.data.formats import Example, render
from dualkd.data.readers import load_examples
from dualkd.errors import DualKDError
from dualkd.recipes import recipe
from dualkd.train.loop import train

_MARKER = ".dualkd-demo"


def run_demo(output_dir: str | Path = "runs/demo", quick: bool = False) -> dict[str, dict[str, float]]:
    out = Path(output_dir)
    if out.exists():
        if not (out / _MARKER).exists():
            raise DualKDError(f"{out} exists and is not a demo directory; choose another --output-dir")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / _MARKER).touch()
    console = Console(stderr=True)
    small = ["optimization.max_steps=6", "eval.every_steps=3", "checkpoint.every_steps=3"] if quick else []

    teacher_dir = out / "teacher" / "final"
    console.rule("[bold]1/3 teacher: SFT from scratch")
    teacher_cfg = load_config(recipe("tiny-teacher"), [f"output_dir={out / 'teacher'}", *small])
    train(teacher_cfg)

    console.rule("[bold]2/3 student: distilled from the teacher (KD)")
    kd_cfg = load_config(recipe("tiny-kd"), [f"output_dir={out / 'student-kd'}", f"teacher.path={teacher_dir}",
                                             f"student.tokenizer={teacher_dir}", *small])
    train(kd_cfg)

    console.rule("[bold]3/3 student: same data, no teacher (SFT baseline)")
    sft_cfg = load_config(recipe("tiny-kd"), [f"output_dir={out / 'student-sft'}", "teacher=null",
                                              "objective={name: sft}", f"student.tokenizer={teacher_dir}", *small])
    train(sft_cfg)

    assert kd_cfg.data.dev is not None
    examples, _ = load_examples(kd_cfg.data.dev, max_examples=128)
    results: dict[str, dict[str, float]] = {}
    teacher_answers: list[str] = []
    for name in ("teacher", "student-kd", "student-sft"):
        results[name], answers = _score(out / name, examples)
        teacher_answers = teacher_answers or answers
        agree = sum(a == b for a, b in zip(answers, teacher_answers)) / len(answers)
        results[name]["agrees_with_teacher"] = agree
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = Table(title="dualkd demo: tiny teacher -> student (dev set)")
    for col in ("model", "params", "train examples", "dev CE (lower is better)", "greedy answer = teacher's"):
        table.add_column(col, justify="right" if col != "model" else "left")
    sizes = {"teacher": teacher_cfg.data.train.num_examples, "student-kd": kd_cfg.data.train.num_examples,
             "student-sft": sft_cfg.data.train.num_examples}
    for name, r in results.items():
        table.add_row(name, f"{r['params'] / 1e6:.2f}M", str(sizes[name]), f"{r['dev_ce']:.4f}",
                      f"{100 * r['agrees_with_teacher']:.0f}%")
    console.print(table)
    console.print(f"runs, metrics and models are in {out}/ (each run: config.yaml, metrics.jsonl, tensorboard/, "
                  "checkpoints/, final/)")
    return results


def _score(run_dir: Path, examples: list[Example]) -> tuple[dict[str, float], list[str]]:
    """Dev CE from the run's last dev record, and the model's greedy answers to `examples`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    dev_ce = [r["ce"] for r in records if r["kind"] == "dev"][-1]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    answers = greedy_answers(model, tokenizer, [render(ex, tokenizer)[0] for ex in examples])
    return {"params": float(sum(p.numel() for p in model.parameters())), "dev_ce": float(dev_ce)}, answers


@torch.no_grad()
def greedy_answers(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 24,
                   batch_size: int = 32) -> list[str]:
    """Greedy continuations of `prompts` (left-padded batches, KV cache), cut at EOS."""
    tokenizer.padding_side = "left"
    outs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        outs += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return outs
