"""One optimizer step: the student and objective as one module, and the step the loop repeats.

    record = train_step(engine, module, objective, teacher, optimizer, scheduler, source, timer, opt, step)

Take this process's micro-batches from the source; compute the loss denominators of the global batch (after
running the teacher first where the objective's counts need it); for each micro-batch run the teacher (no
grad), then the objective on the student, and backward (gradients all-reduced on the last micro-batch only);
clip, step, schedule. Returns the step's record (the global means of the loss and metrics, lr, throughput).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import Tensor, nn

from dualkd.data.collate import Batch
from dualkd.lm import gold_cross_entropy, head_is_linear
from dualkd.methods import Objective, StepNorm
from dualkd.teachers import Teacher
from dualkd.train.engine import Engine
from dualkd.train.guard import check_gradients, check_micro_batch
from dualkd.train.telemetry import StepTimer, peak_memory_mib


class TrainModule(nn.Module):
    """Student + objective (with its projectors) as one module: what the engine wraps and the optimizer trains."""

    def __init__(self, student: nn.Module, objective: Objective):
        super().__init__()
        self.student = student
        self.objective = objective
        self._fused_gold: bool | None = None  # the gold CE from hidden states (known at the first sampled step)

    def forward(self, batch: Batch, teacher_out: Any, norm: StepNorm, gold: Batch | None = None,
                gold_norm: StepNorm | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The objective on `batch`. On a student-sampled step `batch` holds the samples (`norm.ce_weight`
        is 0) and `gold` the dataset micro-batch they replace: its CE is added here, in the same forward call,
        so that DDP sees one forward per backward. The logged `ce` and `acc` are then the gold ones."""
        loss, metrics = self.objective(self.student, batch, teacher_out, norm)
        if gold is None:
            return loss, metrics
        assert gold_norm is not None
        gold_loss, gold_metrics = self._gold_ce(gold, gold_norm)
        return loss + gold_loss, {**metrics, **gold_metrics}

    def _gold_ce(self, gold: Batch, norm: StepNorm) -> tuple[Tensor, dict[str, Tensor]]:
        """(1 - kd_rate)·CE on the dataset responses, normalized by their tokens; fused over the vocabulary when
        the student's logits are its last hidden states times its head."""
        weight, tokens, n = self.objective.gold_weight(), gold.student, norm["tokens"]
        if weight == 0.0:  # kd_rate = 1: no gold term (DistiLLM's setting)
            return torch.zeros((), device=tokens.input_ids.device), {}
        if self._fused_gold is None:
            self._fused_gold = head_is_linear(self.student)
        ce, hits, _ = gold_cross_entropy(self.student, tokens, fused=self._fused_gold)
        return weight * ce / n, {"ce": ce.detach() / n, "acc": hits / n}


def train_step(engine: Engine, module: nn.Module, objective: Objective, teacher: Teacher | None,
                optimizer: torch.optim.Optimizer, scheduler: Any, source: Any, timer: StepTimer,
                opt: Any, step_index: int) -> dict[str, float]:
    timer.start_step()
    step = source.next_step(timer)
    with timer.section("data"):
        gold = [b.to(engine.device) for b in step.gold]
        sampled = [b.to(engine.device) for b in step.sampled] if step.sampled is not None else None
    # what the objective trains on: the gold micro-batches, or on a sampled step their sampled twins
    batches = sampled if sampled is not None else gold
    if teacher is not None and teacher.works_ahead:  # a server starts on this step's and the next step's batches
        teacher.prefetch([b.teacher_view for b in batches + source.upcoming()])
    teacher_outs: list[Any] | None = None
    if objective.needs().counts_need_teacher:  # denominators depend on the teacher: run it on every micro-batch first
        with timer.section("teacher"), torch.no_grad(), engine.autocast():
            teacher_outs = [objective.teacher_forward(teacher, b) for b in batches]
    with timer.section("data"):
        student = engine.unwrap(module).student
        local: dict[str, float] = defaultdict(float)
        with engine.outside_forward(module):  # FSDP2: the root unit (head, projectors) whole for `prepare`
            for i, b in enumerate(batches):
                prepared, counts = objective.prepare(b, teacher_outs[i] if teacher_outs else None, student)
                if teacher_outs is not None:
                    teacher_outs[i] = prepared
                for k, v in counts.items():
                    local[k] += float(v)
                local["input_tokens"] += b.student.num_input_tokens
        if sampled is not None:  # the gold CE keeps its own denominator: the gold response tokens
            for b in gold:
                local["gold_tokens"] += b.student.num_loss_tokens
                local["input_tokens"] += b.student.num_input_tokens
        keys = sorted(local)
        totals = engine.all_reduce_sum(torch.tensor([local[k] for k in keys], dtype=torch.float64))
        totals_by_key = dict(zip(keys, totals.tolist()))
        norm = StepNorm({k: v / engine.world_size for k, v in totals_by_key.items()}, step=step_index,
                        ce_weight=0.0 if sampled is not None else 1.0)  # samples have no gold: CE from `gold`
        gold_norm = StepNorm({"tokens": totals_by_key.get("gold_tokens", 0.0) / engine.world_size}, step=step_index)

    sums: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64))
    for i, batch in enumerate(batches):
        with engine.accumulate(module, sync=i == len(batches) - 1):
            if teacher_outs is not None:
                teacher_out, teacher_outs[i] = teacher_outs[i], None  # free it once used
            else:
                with timer.section("teacher"), torch.no_grad(), engine.autocast():
                    teacher_out = objective.teacher_forward(teacher, batch)
            with timer.section("student"):
                if sampled is None:
                    loss, metrics = module(batch, teacher_out, norm)
                else:
                    loss, metrics = module(batch, teacher_out, norm, gold[i], gold_norm)
                check_micro_batch(engine, step_index, loss, metrics, batch.indices)  # before it reaches a gradient
                engine.backward(loss)
        sums["loss"] += loss.detach().double().cpu()
        for k, v in metrics.items():
            sums[k] += v.detach().double().cpu()

    with timer.section("optimizer"):
        if opt.max_grad_norm is not None:
            grad_norm = engine.clip_grad_norm(module, opt.max_grad_norm)
        else:
            grad_norm = engine.grad_norm(module)
        if opt.mixed_precision != "fp16":  # under fp16 scaling an inf gradient is the scaler's: it skips the step
            check_gradients(float(grad_norm), step_index, applied=engine.is_deepspeed)
        lrs = [g["lr"] for g in optimizer.param_groups]
        optimizer.step()
        if not engine.optimizer_step_was_skipped:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    keys = sorted(sums)
    reduced = engine.all_reduce_sum(torch.stack([sums[k] for k in keys])) / engine.world_size
    record: dict[str, float] = dict(zip(keys, reduced.tolist()))
    step_time = timer.step_seconds()
    gold_tokens = totals_by_key["gold_tokens"] if sampled is not None else totals_by_key["tokens"]
    record.update({
        "lr": lrs[0],
        "grad_norm": float(grad_norm),
        "tokens": gold_tokens,
        "sampled": float(sampled is not None),
        "sampled_tokens": totals_by_key["tokens"] if sampled is not None else 0.0,
        "replayed": float(step.kind == "replay"),
        "tokens_per_s": totals_by_key["input_tokens"] / max(step_time, 1e-9),
        "step_time": step_time,
        "peak_mem_mib": peak_memory_mib(engine.device),
        **timer.as_dict(),
    })
    return record
