"""Why DSKD-CMA collapses in the methods table, measured (issue 30): its cross-model attention and its projector
at the start and at the end of training, with the table's settings and with the official scripts', in both
settings (students from scratch and pretrained), and at the converged budget (240 epochs, the table's own run).

    python -m experiments.methods_table.cma_collapse          # from the repository root; writes cma-collapse.md
    python -m experiments.methods_table.cma_collapse RUN      # one finished CMA run's figures, printed as JSON

Per variant, one run (seed 10) at the lr the table chose for it (scratch: DSKD-CMA's own grid; pretrained and
240 epochs: the own-tokenizer SFT grid), and on the dev set (300 examples):
- attention entropy: each student response position's entropy over the teacher's response positions, divided
  by log(teacher response tokens) (1 = uniform), averaged over the student's positions;
- own-span mass: the attention a student token puts on the teacher tokens of its span group (align/groups.py:
  the teacher tokens that cover the same text), averaged over the student tokens that have one;
- the t2s projector's CE against the gold token and its agreement (argmax = gold), the student's dev CE and the
  entropy of its predictions (nats), from the objective's own metrics on the dev set;
- test ROUGE-L and the share of samples with an invented word (the table's scoring, 5 sampling seeds).
The variants' runs sit beside the table's (`runs/methods-table/runs/[pretrained/]cma-*`) and stay out of its
record; the 240-epoch one is the table's `e240/own-dskd-cma` run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from dualkd.atomic import write_text_atomic
from dualkd.config import load_config
from dualkd.methods.base import StepNorm
from dualkd.methods.grouped import grouped_tokens
from dualkd.train.build import build_parts
from dualkd.train.engine import LocalEngine
from experiments.methods_table.bench import RECORDS, Bench, table_record
from experiments.methods_table.rows import BY_NAME, Row

HERE = Path(__file__).parent
OUT = Path("runs/methods-table")
_V1 = "name: dskd_cma, version: 1, divergence: fkl"


def variants(lr: float) -> tuple[Row, ...]:
    """The table's DSKD-CMA row, and the same with the official GPT-2 script's ratios: KD τ 2 and the projectors
    at twice the student's lr (its 1e-3 vs 5e-4)."""
    return (Row("cma-table", "own", f"{{{_V1}}}", "as the table trains it (τ 1, projector lr 1e-3)"),
            Row("cma-official", "own", f"{{{_V1}, temperature: 2.0, projector_lr: {2 * lr:g}}}",
                "the official script's ratios (τ 2, projector lr 2x the student's)"))


@torch.no_grad()
def measure(run: Path, step0: bool) -> dict[str, float]:
    """The attention and projector figures of the module docstring on the dev set: of the run's final student
    and projectors, or (`step0`) of the untrained ones its config builds."""
    start = [] if step0 else [f"student.path={run / 'final'}", "student.init=pretrained", "student.arch={}",
                              "student.tokenizer=null", "student.train_tokenizer=null",
                              f"objective.projector_path={run / 'final'}"]
    cfg = load_config(run / "config.yaml", start)
    torch.manual_seed(cfg.seed)  # the untrained projectors and query: the same start on every call
    parts = build_parts(cfg, run / "analysis", LocalEngine())
    parts.student.eval()
    obj = parts.objective.eval()
    dev = parts.dev_set
    sums = {k: 0.0 for k in ("entropy", "own_mass", "ce", "ce_t2s", "t2s_acc", "student_entropy")}
    tokens = grouped = 0
    for first in range(0, len(dev), 32):
        batch = dev.collate(list(range(first, min(first + 32, len(dev)))))
        teacher = obj.teacher_forward(parts.teacher, batch)
        counts = {k: float(v) for k, v in obj.counts(batch).items()}
        _, metrics = obj(parts.student, batch, teacher, StepNorm(counts))
        n = counts["tokens"]
        for k in ("ce", "ce_t2s", "t2s_acc"):  # per-token means of the batch
            sums[k] += float(metrics[k]) * n
        logits = parts.student(input_ids=batch.student.input_ids, attention_mask=batch.student.attention_mask).logits
        logp = torch.log_softmax(logits[batch.student.loss_mask].float(), -1)
        sums["student_entropy"] += float(-(logp.exp() * logp).sum())
        attn = torch.softmax(obj.attention_scores(parts.student, batch, teacher).float(), -1)  # [B, Ts, Tt]
        s_mask, t_mask = batch.student.loss_mask, batch.teacher_view.loss_mask
        n_t = t_mask.sum(1).clamp(min=2).float()  # [B]
        ent = -(attn * attn.clamp(min=1e-30).log()).sum(-1) / n_t.log()[:, None]  # [B, Ts]
        sums["entropy"] += float(ent[s_mask].sum())
        s_rows, t_rows = s_mask.nonzero(), t_mask.nonzero()  # response row -> (example, position)
        s_groups, t_groups = grouped_tokens(batch.student, batch.teacher_view)
        for g in range(s_groups.bounds.numel() - 1):
            s_at = s_rows[s_groups.rows[s_groups.bounds[g]:s_groups.bounds[g + 1]]]
            t_at = t_rows[t_groups.rows[t_groups.bounds[g]:t_groups.bounds[g + 1]]]
            b = int(s_at[0, 0])
            sums["own_mass"] += float(attn[b][s_at[:, 1]][:, t_at[:, 1]].sum())
            grouped += len(s_at)
        tokens += n
    out = {k: v / tokens for k, v in sums.items() if k != "own_mass"}
    out["own_mass"] = sums["own_mass"] / max(grouped, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv:  # one run folder of the table (DSKD-CMA or DSKDv2-CMA), trained and kept: measure it, train nothing
        run = Path(argv[0])
        print(json.dumps({"run": str(run), "start": measure(run, True), "end": measure(run, False)}, indent=2))
        return 0
    console = Console(stderr=True, soft_wrap=True)
    results: dict[str, Any] = {}
    for setting, epochs in (("scratch", None), ("pretrained", None), ("scratch", 240)):
        table = Bench(OUT, False, console, table_record(RECORDS, setting, epochs), setting, epochs)
        if epochs is None:  # the variants beside the table's runs, at the lr the table chose
            lr = table.finished(BY_NAME["own-dskd-cma" if setting == "scratch" else "own-sft"])["lr"]
            bench, rows = Bench(OUT, False, console, None, setting), variants(lr)
        else:  # at the converged budget: the table's own DSKD-CMA run (its lr: the own-tokenizer SFT grid's)
            lr = table.finished(BY_NAME["own-sft"])["lr"]
            bench, rows = table, (BY_NAME["own-dskd-cma"],)
        for row in rows:
            run = bench.run(row, lr, 10, need_model=True)
            scores = bench.scores(run)
            results[f"{table.table}/{row.name}"] = {
                "what": row.what, "lr": lr, "objective": row.objective, "start": measure(run, True),
                "end": measure(run, False), "rougeL": scores["rougeL"], "invented": scores["invented"],
                "dev_ce": scores["dev_ce"]}
            console.print(results[f"{table.table}/{row.name}"])
    write_text_atomic(HERE / "cma_collapse.json", json.dumps(results, indent=2) + "\n")
    write_text_atomic(HERE / "cma-collapse.md", _markdown(results))
    return 0


def _markdown(results: dict[str, Any]) -> str:
    lines = ["# DSKD-CMA's attention and projector, measured", "",
             "Written by `python -m experiments.methods_table.cma_collapse` (module docstring: what each figure is).",
             "Own-tokenizer students, seed 10, dev set; start = the untrained objective, end = after training.", "",
             "| setting | variant | lr | attention entropy (start → end) | own-span mass (start → end) | t2s CE "
             "(end) | t2s agreement (end) | student entropy (start → end) | best dev CE | ROUGE-L | invented % |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        setting, name = key.split("/")
        s, e = r["start"], r["end"]
        lines.append(f"| {setting} | {name}: {r['what']} | {r['lr']:g} | {s['entropy']:.3f} → {e['entropy']:.3f} | "
                     f"{s['own_mass']:.3f} → {e['own_mass']:.3f} | {e['ce_t2s']:.3f} | {e['t2s_acc']:.3f} | "
                     f"{s['student_entropy']:.2f} → {e['student_entropy']:.2f} | {r['dev_ce']:.3f} | "
                     f"{r['rougeL']:.2f} | {r['invented']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
