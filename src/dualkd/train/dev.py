"""Evaluating on the dev set during training: the objective's loss and metrics (token-weighted over all
processes), sampled ROUGE-L when the run selects by it, and whether a result is the best so far."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn

from dualkd.config import RunConfig
from dualkd.eval.harness import sampled_rouge_l
from dualkd.methods import Objective, StepNorm
from dualkd.teachers import Teacher
from dualkd.train.build import Parts
from dualkd.train.checkpoint import TrainerState
from dualkd.train.engine import Engine
from dualkd.train.sources import eval_batches


@torch.no_grad()
def evaluate(engine: Engine, module: nn.Module, objective: Objective, teacher: Teacher | None,
             dataset: Any, batch_size: int, step: int = 0) -> dict[str, float]:
    """Token-weighted mean of the objective's loss and metrics over the dev set (all processes)."""
    raw = engine.unwrap(module)  # no DDP wrapper: processes may run different numbers of batches (not when sharded)
    raw.eval()
    totals: dict[str, float] = defaultdict(float)
    batches: Any = eval_batches(dataset, batch_size, engine.world_size, engine.rank,
                                same_count=engine.shards_parameters)
    if teacher is not None and teacher.works_ahead:  # a server scores the whole dev set while the student waits
        batches = list(batches)
        teacher.prefetch([b.teacher_view for b, _ in batches])
    weight_key = objective.needs().eval_weight
    for batch, counted in batches:
        batch = batch.to(engine.device)
        with engine.autocast():
            teacher_out = objective.teacher_forward(teacher, batch)
            with engine.outside_forward(module):
                teacher_out, counts = objective.prepare(batch, teacher_out, raw.student)
            counts = {k: float(v) for k, v in counts.items()}
            loss, metrics = raw(batch, teacher_out, StepNorm(counts, step=step))
        if not counted:
            continue
        n = counts[weight_key]
        totals["tokens"] += n
        totals["loss"] += float(loss) * n
        for k, v in metrics.items():
            totals[k] += float(v) * n
    raw.train()
    keys = sorted(totals)
    summed = engine.all_reduce_sum(torch.tensor([totals[k] for k in keys], dtype=torch.float64)).tolist()
    by_key = dict(zip(keys, summed))
    n = max(by_key.pop("tokens", 0.0), 1.0)
    return {k: v / n for k, v in by_key.items()}


def improves(select_by: str, dev: dict[str, float], state: TrainerState) -> bool:
    """Whether this dev result beats the best so far (ROUGE-L: higher; loss: lower)."""
    best = state.best_value
    if best is None and select_by == "loss":
        best = state.best_dev_loss  # a checkpoint written before `best_value` existed
    if best is None:
        return True
    return dev[select_by] > best if select_by == "rougeL" else dev[select_by] < best


def dev_rouge_l(engine: Engine, module: nn.Module, parts: Parts, cfg: RunConfig) -> float:
    """Mean ROUGE-L of responses the student samples for the dev prompts; processes share the prompts."""
    assert parts.dev_set is not None
    examples = parts.dev_set.examples[: cfg.eval.rouge_examples]
    gen, data = cfg.generation, cfg.data
    max_length = min(gen.max_length, data.max_length)
    settings = gen.model_copy(update={
        "no_repeat_ngram_size": 0, "max_length": max_length,
        "max_prompt_length": min(gen.max_prompt_length, data.max_prompt_length or max_length - 1, max_length - 1)})
    seeds = [cfg.seed + k for k in range(cfg.eval.rouge_repeats)]
    mine = examples[engine.rank::engine.world_size]
    counted = len(mine)
    if engine.shards_parameters:  # every generate call gathers the layers on all processes: make the same calls
        mine = mine + examples[:len(examples[0::engine.world_size]) - len(mine)]
    with engine.for_generation(module) as raw:
        local = sampled_rouge_l(raw.student, parts.student_tokenizer, mine, settings, seeds, counted=counted)
    total, count = engine.all_reduce_sum(torch.tensor([local, float(counted)], dtype=torch.float64)).tolist()
    return total / max(count, 1.0)
