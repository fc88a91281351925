"""The end of a run: the final student (and the best one by the dev selection) exported as folders that plain
transformers loads, the objective's own modules (projectors) beside them, and `summary.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from dualkd.config import RunConfig
from dualkd.models import attribute_state_dict, export_model, is_lora
from dualkd.train.build import Parts
from dualkd.train.checkpoint import CheckpointManager, TrainerState, read_trainable
from dualkd.train.engine import Engine
from dualkd.train.logger import MetricsLogger


def export_run(cfg: RunConfig, engine: Engine, module: nn.Module, ckpt: CheckpointManager, state: TrainerState,
            parts: Parts, run_dir: Path, log: MetricsLogger) -> None:
    """Export the final student (and the best one by dev loss) as folders plain transformers loads."""
    raw = engine.unwrap(module)
    with engine.gathered(module):  # ZeRO-3, FSDP2: whole parameters to write
        if engine.is_main:
            _export(cfg, raw, ckpt, state, parts, run_dir, log)
    engine.barrier()


def _export(cfg: RunConfig, raw: nn.Module, ckpt: CheckpointManager, state: TrainerState, parts: Parts,
            run_dir: Path, log: MetricsLogger) -> None:
    best_dir = None
    if cfg.checkpoint.keep_best and state.best_step is not None and state.best_step != state.step:
        best_dir = _export_best(raw, ckpt.path_for(state.best_step), parts.student_tokenizer, run_dir / "best")
    final_dir = export_model(raw.student, parts.student_tokenizer, run_dir / "final", overwrite=True)
    _save_projectors(raw.objective, final_dir)
    summary = {"steps": state.step, "tokens_seen": state.tokens_seen, "best_dev_loss": state.best_dev_loss,
               "best_by": cfg.eval.select_by, "best_value": state.best_value,
               "best_step": state.best_step, "final": str(final_dir),
               "best": str(best_dir or final_dir) if state.best_step is not None else None}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.event("finished", f"done: {state.step} steps; student saved to {final_dir}", step=state.step)


def _save_projectors(objective: nn.Module, out: Path) -> None:
    """An objective's own trained modules (projectors) beside the student, to continue from them later."""
    # cloned: tied weights (a CBMI LM's embedding and head) share storage, which safetensors refuses
    state = {k: v.detach().cpu().clone().contiguous() for k, v in attribute_state_dict(objective).items()}
    if state:
        save_file(state, str(out / "projectors.safetensors"))


def _export_best(raw: nn.Module, checkpoint: Path, tokenizer: Any, out: Path) -> Path:
    """The best checkpoint's weights written into the gathered parameters, exported, and the final ones put
    back. In place (`copy_`), not `load_state_dict`: FSDP2's state-dict hooks would reshard the parameters first
    and refuse whole tensors; the parameters here are the gathered whole ones under every engine."""
    params = dict(raw.named_parameters())
    best = read_trainable(raw, checkpoint / "trainable.safetensors")
    current = {n: params[n].detach().clone() for n in best}
    _copy_into(params, best)
    if is_lora(raw.student):  # a merged export would change the module in place: write the adapter only
        raw.student.save_pretrained(out / "adapter")
        tokenizer.save_pretrained(out)
    else:
        export_model(raw.student, tokenizer, out, overwrite=True)  # inside the run's own folder
    _save_projectors(raw.objective, out)
    _copy_into(params, current)
    return out


@torch.no_grad()
def _copy_into(params: dict[str, nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    for name, value in values.items():
        params[name].copy_(value)
