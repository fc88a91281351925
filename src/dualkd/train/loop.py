"""The one training loop. Every objective and every batch source runs through `train`: resume or start, build
the run's parts, repeat the optimizer step (train/step.py), evaluate on dev (train/dev.py), checkpoint, stop on
a signal (train/signals.py), export.

    dualkd train configs/tiny-kd.yaml optimization.lr=1e-3        # CLI
    from dualkd.train.loop import train; train(cfg)                  # Python

After each step: log; maybe evaluate, checkpoint, or stop on SIGTERM/SIGINT with a checkpoint. A non-finite
loss or gradient (train/guard.py), a teacher that answers garbage (teachers/checks.py) or stops answering ends
the run with the model as the last finished step left it saved, and a non-zero exit.
"""

from __future__ import annotations

import contextlib
import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from dualkd.config import RunConfig, save_config
from dualkd.errors import ConfigError
from dualkd.methods import Objective, build_objective
from dualkd.teachers.checks import TeacherOutputError
from dualkd.teachers.server_client import ServerInterrupted, ServerMismatch, ServerUnavailable
from dualkd.train.announce import announce, format_record
from dualkd.train.build import build_parts
from dualkd.train.checkpoint import CheckpointManager, TrainerState
from dualkd.train.dev import dev_rouge_l, evaluate, improves
from dualkd.train.engine import Engine
from dualkd.train.export import export_run
from dualkd.train.guard import NonFiniteStep
from dualkd.train.logger import MetricsLogger
from dualkd.train.on_policy import make_source
from dualkd.train.optim import build_optimizer, build_scheduler
from dualkd.train.prepare import prepare_run
from dualkd.train.resume import check_resume, resume_key
from dualkd.train.signals import StopSignals, TrainingStopped
from dualkd.train.sources import OffPolicySource
from dualkd.train.step import TrainModule, train_step
from dualkd.train.telemetry import StepTimer


def train(cfg: RunConfig, resume: bool | Literal["auto"] = False, accept_changes: bool = False) -> Path:
    """Run training; returns the run directory. `resume`: continue from the latest complete checkpoint (True),
    or do so when one exists and start otherwise ("auto", for requeued jobs). `accept_changes`: resume even
    though settings of the resume key changed (train/resume.py), logging each change. Several runs may follow
    one another in one process, launched or not: a launch's process group stays up until the process exits."""
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
    announce(log, cfg, parts, source, total_steps, engine, start)
    for name, old_value, new_value in changed:
        log.event("resume_changed", f"resumed with {name}: {old_value!r} -> {new_value!r}", setting=name,
                  old=old_value, new=new_value)

    stop = StopSignals(on_signal=teacher.interrupt if teacher is not None else None)
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
                    record = train_step(engine, module, objective, teacher, optimizer, scheduler, source, timer,
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
                    log.print(format_record(record, total_steps))

                epoch_done = source.epoch != epoch_before
                last = state.step == total_steps
                new_best = False
                if parts.dev_set is not None and _due(cfg.eval.every_steps, state.step, epoch_done, last):
                    dev = evaluate(engine, module, objective, dev_teacher, parts.dev_set,
                                   cfg.eval.batch_size or opt.micro_batch_size, state.step)
                    log.print(f"  dev @ {state.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in dev.items()))
                    if cfg.eval.select_by == "rougeL":
                        dev["rougeL"] = dev_rouge_l(engine, module, parts, cfg)
                        log.print(f"  dev @ {state.step}: rougeL {dev['rougeL']:.2f} (sampled, "
                                  f"{cfg.eval.rouge_repeats} per prompt)")
                    log.write("dev", {"step": state.step, **dev})
                    source.observe_dev_loss(dev["loss"])
                    state.source = source.state_dict()
                    if improves(cfg.eval.select_by, dev, state):
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


@contextlib.contextmanager
def _student_for_sampling(engine: Engine, module: nn.Module) -> Iterator[nn.Module]:
    with engine.for_generation(module) as raw:
        yield raw.student


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


__all__ = ["TrainingStopped", "train"]
