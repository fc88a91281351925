"""What the loop tells the user: the start-up lines (data, models, engine, batch, source) and one console
line per logged step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dualkd.config import RunConfig
from dualkd.train.build import Parts
from dualkd.train.engine import Engine
from dualkd.train.logger import MetricsLogger


def announce(log: MetricsLogger, cfg: RunConfig, parts: Parts, source: Any, total_steps: int,
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


def format_record(r: dict[str, Any], total: int) -> str:
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
