"""The one training loop. Every objective and every batch source runs through `train`.

    dualkd train configs/tiny-kd.yaml optimization.lr=1e-3        # CLI
    from dualkd.train.loop import train; train(cfg)                  # Python

Per optimizer step: take this process's micro-batches from the source; compute the loss denominators of
the global batch; for each micro-batch run the teacher (no grad), then the objective on the student, and
backward (gradients all-reduced on the last micro-batch only); clip, step, schedule; log; maybe evaluate,
checkpoint, or stop on SIGTERM/SIGINT with a checkpoint. A non-finite loss or gradient (train/guard.py), a
teacher that answers garbage (teachers/checks.py) or stops answering ends the run with the model as the last
finished step left it saved, and a non-zero exit.
"""

from __future__ import annotations

import contextlib
import random
import signal
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor, nn

from dualkd.config import RunConfig, save_config
from dualkd.data.collate import Batch
from dualkd.errors import ConfigError, DualKDError
from dualkd.eval.harness import sampled_rouge_l
from dualkd.lm import gold_cross_entropy, head_is_linear
from dualkd.methods import Objective, StepNorm, build_objective
from dualkd.teachers import Teacher
from dualkd.teachers.checks import TeacherOutputError
from dualkd.teachers.server_client import ServerInterrupted, ServerMismatch, ServerUnavailable
from dualkd.train.build import Parts, build_parts
from dualkd.train.checkpoint import CheckpointManager, TrainerState
from dualkd.train.engine import Engine
from dualkd.train.export import export_run
from dualkd.train.guard import NonFiniteStep, check_gradients, check_micro_batch
from dualkd.train.logger import MetricsLogger
from dualkd.train.on_policy import make_source
from dualkd.train.optim import build_optimizer, build_scheduler
from dualkd.train.prepare import prepare_run
from dualkd.train.resume import check_resume, resume_key
from dualkd.train.sources import OffPolicySource, eval_batches
from dualkd.train.telemetry import StepTimer, peak_memory_mib


class TrainingStopped(DualKDError):
    """Raised after a SIGTERM/SIGINT was handled by saving a checkpoint."""

    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint saved at {checkpoint}; "
                         "continue with `dualkd train ... --resume`")
        self.signum = signum


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


def train(cfg: RunConfig, resume: bool | Literal["auto"] = False, accept_changes: bool = False) -> Path:
    """Run training; returns the run directory. `resume`: continue from the latest complete checkpoint (True),
    or do so when one exists and start otherwise ("auto", for requeued jobs). `accept_changes`: resume even
    though settings of the resume key changed (train/resume.py), logging each change."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file load/save bars; ours shows the training progress
    objective = build_objective(cfg.objective)
    engine = Engine(cfg.optimization.mixed_precision,
                    find_unused_parameters=objective.needs().unused_parameters)
    try:
        return _train(cfg, resume or cfg.checkpoint.resume, accept_changes, engine, objective)
    finally:
        engine.end()


def _train(cfg: RunConfig, resume: bool | Literal["auto"], accept_changes: bool, engine: Engine,
           objective: Objective) -> Path:
    run_dir = Path(cfg.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir: {run_dir} is a file, not a folder")
    ckpt = CheckpointManager(run_dir / "checkpoints", engine, cfg.checkpoint.keep_last, cfg.checkpoint.keep_best)
    start = ckpt.latest()
    if resume == "auto":
        resume = start is not None
    if resume and start is None:
        raise ConfigError(f"--resume: no complete checkpoint under {ckpt.dir}")
    if not resume and start is not None:
        raise ConfigError(f"{run_dir} already holds checkpoints of a run; continue it with --resume, or choose "
                          "another output_dir")
    opt = cfg.optimization
    key = resume_key(cfg, opt.micro_batch_size * opt.grad_accum * engine.world_size)
    saved_key = ckpt.read_state(start).resume_key if start is not None else {}
    # the served model's identity joins the key once the teacher is up (below)
    early = {k: v for k, v in saved_key.items() if k != "teacher.identity"}
    changed = [] if start is None else check_resume(early, key, start, accept_changes)
    if engine.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if start is None:  # a resume never rewrites the config of the run it continues
            save_config(cfg, run_dir / "config.yaml")
        elif changed:
            save_config(cfg, run_dir / f"config.resumed-{start.name}.yaml")
    engine.barrier()
    _seed_everything(cfg.seed)

    prepared = prepare_run(cfg, run_dir, engine)  # SeqKD's teacher outputs, a tokenizer trained from the data
    parts = build_parts(cfg, run_dir, engine, objective, prepared)
    if parts.teacher is not None and parts.teacher.identity is not None:  # what a served model is, by content
        key["teacher.identity"] = parts.teacher.identity
        if "teacher.identity" in saved_key:
            changed += check_resume({"teacher.identity": saved_key["teacher.identity"]},
                                    {"teacher.identity": key["teacher.identity"]}, start, accept_changes)
    module = TrainModule(parts.student, parts.objective)
    optimizer = build_optimizer(parts.student, opt, parts.objective.param_groups())
    gold = OffPolicySource(parts.train_set, opt.micro_batch_size, opt.grad_accum, engine.world_size, engine.rank,
                           cfg.seed, cfg.data.bucket_by_length, opt.micro_batch_tokens)
    total_steps = opt.max_steps or opt.epochs * gold.steps_per_epoch
    scheduler = build_scheduler(optimizer, opt, total_steps)
    module, optimizer = engine.prepare(module, optimizer, opt.micro_batch_size, opt.grad_accum, opt.max_grad_norm)
    timer = StepTimer(engine.device)
    teacher = parts.teacher
    for frozen in [teacher, *(parts.frozen or {}).values()]:  # the objective holds them; placed in place
        if frozen is not None:
            frozen.attach(engine.device, engine.place_teacher, engine.autocast, timer, gather_head=engine.head_gathered)
    objective = parts.objective
    source = make_source(cfg, parts, gold, lambda: _student_for_sampling(engine, module), total_steps)

    state = TrainerState(resume_key=key)
    if start is not None:
        fresh = _hyperparameters(optimizer, scheduler)
        state = ckpt.load(start, module, optimizer, scheduler)
        state.resume_key = key
        if changed:  # the new values apply from here on: lr, betas, weight decay, the schedule's base
            _restore_hyperparameters(optimizer, scheduler, fresh)
        source.load_state_dict(state.source)
        rank_state = ckpt.load_rank_state(start)
        if rank_state is not None:
            source.load_rank_state_dict(rank_state)

    log = MetricsLogger(run_dir, enabled=engine.is_main, tensorboard=cfg.logging.tensorboard,
                        resume_step=state.step if start is not None else None)
    _announce(log, cfg, parts, source, total_steps, engine, start)
    for name, old_value, new_value in changed:
        log.event("resume_changed", f"resumed with {name}: {old_value!r} -> {new_value!r}", setting=name,
                  old=old_value, new=new_value)

    stop = _StopSignals(on_signal=teacher.interrupt if teacher is not None else None)
    show_bar = cfg.logging.progress_bar == "on" or (cfg.logging.progress_bar == "auto" and log.console.is_terminal)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=log.console, disable=not (show_bar and engine.is_main))
    last_ckpt_step = state.step if start is not None else -1

    def save_finished(collective: bool) -> str:
        """Checkpoint the model as the last finished step left it (when every process is here to save)."""
        if state.step == 0:
            return "no step finished, nothing to save"
        if last_ckpt_step == state.step:
            return f"checkpoint of step {state.step}: {ckpt.path_for(state.step)}"
        if not collective:
            return f"not saved: the other processes are elsewhere; the last checkpoint is {ckpt.latest()}"
        path = ckpt.save(module, optimizer, scheduler, state, source.rank_state_dict())
        return f"checkpoint of step {state.step}: {path}"

    # a cache reads the dev files (a config without dev data needs none)
    dev_teacher = teacher.for_split("dev") if teacher is not None and parts.dev_set is not None else None
    module.train()
    if source.wants_dev_loss and start is None and parts.dev_set is not None:  # replay: the starting dev loss
        dev = evaluate(engine, module, objective, dev_teacher, parts.dev_set,
                       cfg.eval.batch_size or opt.micro_batch_size)
        log.print("  dev @ 0: " + "  ".join(f"{k} {v:.4f}" for k, v in dev.items()))
        source.observe_dev_loss(dev["loss"])
        state.source = source.state_dict()
    try:
        with stop, progress:
            task = progress.add_task("train", total=total_steps, completed=state.step, info="")
            while state.step < total_steps:
                epoch_before = source.epoch
                try:
                    record = _train_step(engine, module, objective, teacher, optimizer, scheduler, source, timer,
                                         opt, state.step)
                except ServerInterrupted:  # a signal ended the wait for the server: stop as after a step
                    path_note = save_finished(collective=engine.world_size == 1)
                    signum = stop.received or signal.SIGINT
                    log.event("stopped", f"received {signal.Signals(signum).name} during step {state.step + 1}; "
                              f"{path_note}", step=state.step)
                    raise TrainingStopped(signum, ckpt.latest() or run_dir) from None
                except (ServerUnavailable, ServerMismatch, TeacherOutputError, NonFiniteStep) as e:
                    # the model is as the last finished step left it (unless DeepSpeed already stepped): save that
                    touched = isinstance(e, NonFiniteStep) and e.weights_touched
                    collective = isinstance(e, NonFiniteStep) or engine.world_size == 1
                    saved = (f"not saved: the weights took the bad update; the last checkpoint is {ckpt.latest()}"
                             if touched else save_finished(collective))
                    kind = "non_finite" if isinstance(e, NonFiniteStep | TeacherOutputError) else "teacher_unavailable"
                    log.event(kind, f"{e} ({saved})", step=state.step)
                    hint = "; resume with checkpoint.resume=auto" if not touched and state.step else ""
                    raise type(e)(f"{e}\nThe run stopped before step {state.step + 1} ({saved}{hint}).") from None
                state.step += 1
                state.tokens_seen += int(record["tokens"])
                state.source = source.state_dict()
                epoch = source.epoch + source.step_in_epoch / source.steps_per_epoch
                record = {"step": state.step, "epoch": round(epoch, 4), **record}
                log.write("train", record)
                progress.update(task, completed=state.step, info=f"loss {record['loss']:.4f}")
                if state.step % cfg.logging.every_steps == 0 or state.step == total_steps:
                    log.print(_format_record(record, total_steps))

                epoch_done = source.epoch != epoch_before
                last = state.step == total_steps
                new_best = False
                if parts.dev_set is not None and _due(cfg.eval.every_steps, state.step, epoch_done, last):
                    dev = evaluate(engine, module, objective, dev_teacher, parts.dev_set,
                                   cfg.eval.batch_size or opt.micro_batch_size, state.step)
                    log.print(f"  dev @ {state.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in dev.items()))
                    if cfg.eval.select_by == "rougeL":
                        dev["rougeL"] = _dev_rouge_l(engine, module, parts, cfg)
                        log.print(f"  dev @ {state.step}: rougeL {dev['rougeL']:.2f} (sampled, "
                                  f"{cfg.eval.rouge_repeats} per prompt)")
                    log.write("dev", {"step": state.step, **dev})
                    source.observe_dev_loss(dev["loss"])
                    state.source = source.state_dict()
                    if _improves(cfg.eval.select_by, dev, state):
                        state.best_value = dev[cfg.eval.select_by]
                        state.best_dev_loss, state.best_step, new_best = dev["loss"], state.step, True
                if (_due(cfg.checkpoint.every_steps, state.step, epoch_done, False)
                        or (new_best and cfg.checkpoint.keep_best)):
                    ckpt.save(module, optimizer, scheduler, state, source.rank_state_dict())
                    last_ckpt_step = state.step
                signum = int(engine.all_reduce_max(torch.tensor(stop.received or 0)).item())
                if signum:
                    path = ckpt.path_for(state.step)
                    if last_ckpt_step != state.step:
                        path = ckpt.save(module, optimizer, scheduler, state, source.rank_state_dict())
                    log.event("stopped", f"received {signal.Signals(signum).name} at step {state.step}; saved {path}",
                              step=state.step)
                    raise TrainingStopped(signum, path)
        export_run(cfg, engine, module, ckpt, state, parts, run_dir, log)
    finally:
        if teacher is not None:
            teacher.close()
        log.close()
    return run_dir


def _train_step(engine: Engine, module: nn.Module, objective: Objective, teacher: Teacher | None,
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


@contextlib.contextmanager
def _student_for_sampling(engine: Engine, module: nn.Module) -> Iterator[nn.Module]:
    with engine.for_generation(module) as raw:
        yield raw.student


def _improves(select_by: str, dev: dict[str, float], state: TrainerState) -> bool:
    """Whether this dev result beats the best so far (ROUGE-L: higher; loss: lower)."""
    best = state.best_value
    if best is None and select_by == "loss":
        best = state.best_dev_loss  # a checkpoint written before `best_value` existed
    if best is None:
        return True
    return dev[select_by] > best if select_by == "rougeL" else dev[select_by] < best


def _dev_rouge_l(engine: Engine, module: nn.Module, parts: Parts, cfg: RunConfig) -> float:
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


# ----------------------------------------------------------------------------------------------- helpers


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _due(every: int | None, step: int, epoch_done: bool, last: bool) -> bool:
    return last or (step % every == 0 if every is not None else epoch_done)


def _hyperparameters(optimizer: torch.optim.Optimizer, scheduler: Any) -> tuple[list[dict[str, Any]], list[float]]:
    """The param groups' settings (without their parameters) and the schedule's base lrs, as built now."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return groups, list(scheduler.base_lrs)


def _restore_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: Any,
                             fresh: tuple[list[dict[str, Any]], list[float]]) -> None:
    """After loading a checkpoint (whose optimizer and scheduler states carry the old settings), put the
    settings of the current config back, with the lr of the current step under the current schedule."""
    groups, base_lrs = fresh
    scheduler.base_lrs = base_lrs
    for g, settings, base, multiplier in zip(optimizer.param_groups, groups, base_lrs, scheduler.lr_lambdas):
        g.update({k: v for k, v in settings.items() if k not in ("lr", "initial_lr")})
        g["initial_lr"] = base
        g["lr"] = base * multiplier(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def _announce(log: MetricsLogger, cfg: RunConfig, parts: Parts, source: Any, total_steps: int,
              engine: Engine, start: Path | None) -> None:
    for report in parts.reports:
        if report.skipped:
            log.event("data_skipped", report.summary(), source=report.source, skipped=len(report.skipped),
                      first=report.skipped[0])
        else:
            log.print(f"[dualkd] data {report.summary()}")
        for who, cut in report.truncated.items():
            if cut:
                log.event("data_truncated", f"{report.source}: {who}: {cut.summary(report.kept)}",
                          source=report.source, tokenizer=who, prompts=cut.prompts, sequences=cut.sequences,
                          cues_cut=cut.cues)
        for warning in report.warnings():
            log.print(f"[dualkd] WARNING: {warning}")
    n_params = engine.count_parameters(parts.student)
    n_train = engine.count_parameters(parts.student, trainable=True)
    teacher = f"; {parts.teacher.describe(engine.count_parameters)}" if parts.teacher is not None else ""
    log.print(f"[dualkd] objective {cfg.objective.name}; student {n_params / 1e6:.2f}M params "
              f"({n_train / 1e6:.2f}M trained){teacher}")
    log.print(f"[dualkd] {engine.world_size} process(es) on {engine.device} ({engine.name}); "
              f"global batch {source.global_batch} "
              f"({cfg.optimization.micro_batch_size} x {cfg.optimization.grad_accum} x {engine.world_size}"
              + (f"; passes of at most {cfg.optimization.micro_batch_tokens} padded tokens"
                 if cfg.optimization.micro_batch_tokens else "")
              + f"); {source.steps_per_epoch} steps/epoch; {total_steps} steps")
    src = cfg.source
    if src.kind == "on_policy":
        first = getattr(source, "start_step", 0)
        log.print(f"[dualkd] on-policy: from step {first} on, a step trains on student samples with probability "
                  f"{src.student_gen_ratio} (backend {src.backend})")
    elif src.kind == "replay":
        log.print(f"[dualkd] replay (DistiLLM): φ starts at {src.replay_init_threshold}, +{src.replay_threshold_step}"
                  f" when the dev loss rises by {src.replay_loss_eps}; buffer of {src.replay_capacity} per process")
    elif src.kind == "seqkd":
        log.print(f"[dualkd] seqkd: training on teacher outputs ({parts.reports[0].source})")
    if source.dropped_per_epoch:
        log.print(f"[dualkd] {source.dropped_per_epoch} examples per epoch do not fill a last global batch and "
                  "wait for the next epoch's shuffle")
    if start is not None:
        log.event("resumed", f"resumed from {start}", checkpoint=str(start))


# what the loop itself logs; the rest of a record are the objective's loss terms and rates
_LOOP_KEYS = {"kind", "time", "step", "epoch", "loss", "lr", "grad_norm", "tokens", "sampled", "sampled_tokens",
              "replayed", "tokens_per_s", "step_time", "peak_mem_mib"}


def _format_record(r: dict[str, Any], total: int) -> str:
    """One console line per logged step: the loss and each of the objective's terms (accuracies aside), lr,
    throughput, the time shares of the sections that took any time, peak memory."""
    parts = [f"step {r['step']}/{total}", f"loss {r['loss']:.4f}"]
    terms = [k for k, v in r.items() if k not in _LOOP_KEYS and isinstance(v, (int, float))
             and not k.startswith("time/") and not k.endswith("acc")]
    parts += [f"{k} {r[k]:.4f}" for k in sorted(terms, key=lambda k: (k not in ("ce", "kd"), k))]
    t = {k.split("/")[1]: v for k, v in r.items() if k.startswith("time/")}
    total_t = max(r["step_time"], 1e-9)
    share = " ".join(f"{k} {100 * v / total_t:.0f}%" for k, v in t.items() if v / total_t >= 0.005)
    parts += [f"lr {r['lr']:.2e}", f"{r['tokens_per_s']:.0f} tok/s", share, f"peak {r['peak_mem_mib']:.0f} MiB"]
    return "  ".join(parts)


class _StopSignals:
    """First SIGTERM/SIGINT: remember it (the loop checkpoints and stops after the current step) and call
    `on_signal` (a served teacher stops waiting, so the step ends at once). A second one: the default
    behaviour (exit at once)."""

    def __init__(self, on_signal: Any = None) -> None:
        self.received: int | None = None
        self._on_signal = on_signal
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        for s, h in self._previous.items():
            signal.signal(s, h)
        if self._on_signal is not None:
            self._on_signal()

    def __enter__(self) -> _StopSignals:
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()


__all__ = ["TrainModule", "TrainingStopped", "evaluate", "train"]
