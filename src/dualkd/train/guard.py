"""The non-finite guard: a NaN or infinite loss or gradient never reaches the weights.

Per micro-batch, before its backward: the loss and each of the objective's terms must be finite on every
process (one tiny all-reduce per micro-batch when there are several processes, so that all of them stop
together and none waits in a collective). Per step, before the optimizer: the global gradient norm must be
finite (not under fp16 loss scaling, where an infinite gradient is the scaler's business: it skips that
update and lowers its scale). A failed check raises `NonFiniteStep` naming the step, the terms that went
non-finite and the micro-batch's dataset indices; the loop then saves the model as the last finished step left
it (untouched by this step) and exits non-zero.

One exception: DeepSpeed applies its update inside the last backward, so a NaN *gradient* of a finite loss is
seen only after its step. The run still stops, without saving, and the last checkpoint stays the last good one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dualkd.errors import DualKDError


class NonFiniteStep(DualKDError):
    """A step's loss, one of its terms, or its gradient was NaN or infinite; no update was applied
    (`weights_touched` False), except as the module docstring says for DeepSpeed."""

    def __init__(self, message: str, weights_touched: bool = False):
        super().__init__(message)
        self.weights_touched = weights_touched


def non_finite_terms(loss: Tensor, metrics: dict[str, Tensor]) -> list[str]:
    """The names of the loss (`loss`) and the terms whose value is NaN or infinite. One device sync for all of
    them (this runs on every micro-batch); the names are looked up only when something is wrong."""
    values = {"loss": loss, **metrics}
    sums = torch.stack([v.detach().float().sum().to(loss.device) for v in values.values()])  # inf/NaN survive a sum
    if bool(torch.isfinite(sums).all()):
        return []
    return [k for k, v in values.items() if not bool(torch.isfinite(v.detach()).all())]


def check_micro_batch(engine, step: int, loss: Tensor, metrics: dict[str, Tensor], indices: list[int]) -> None:
    """Raise NonFiniteStep on every process if the loss or a term of this micro-batch is not finite on any."""
    bad = non_finite_terms(loss, metrics)
    if engine.world_size > 1:
        anywhere = int(engine.all_reduce_max(torch.tensor(int(bool(bad)))).item())
    else:
        anywhere = int(bool(bad))
    if not anywhere:
        return
    if bad:
        shown = ", ".join(f"{k} = {float(v.detach().double().sum()):g}" for k, v in {"loss": loss, **metrics}.items()
                          if k in bad)
        where = (f"non-finite {shown} on the micro-batch of examples {_indices(indices)}; if the teacher is "
                 "not the cause, the training diverged (a lower optimization.lr, or max_grad_norm, may help)")
    else:
        where = "a non-finite loss on another process"
    raise NonFiniteStep(f"step {step + 1}: {where}; the step was not applied")


def check_gradients(grad_norm: float, step: int, *, applied: bool) -> None:
    """Raise NonFiniteStep if the global gradient norm is NaN or infinite."""
    if math.isfinite(grad_norm):
        return
    raise NonFiniteStep(
        f"step {step + 1}: the gradient norm is {grad_norm} while the loss was finite (a gradient of a "
        "non-smooth point, or overflow in low precision); " +
        ("DeepSpeed had already applied the update, so nothing is saved: the last checkpoint is the last good "
         "state" if applied else "the step was not applied"), weights_touched=applied)


def _indices(indices: list[int]) -> str:
    return str(indices) if len(indices) <= 16 else f"{indices[:16]}... ({len(indices)} in all)"
