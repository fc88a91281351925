"""Token-level divergences between teacher and student next-token distributions.

p = softmax(teacher_logits / τ), q = softmax(student_logits / τ), computed in fp32 whatever the input dtype.
Each function maps logits [..., V] to per-token values [...]. Following the papers, there is no τ² factor.
Vocabulary entries with -inf logits (masked out) contribute nothing and produce no NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dualkd.losses.reduce import Reduction, masked_reduce


def _upcast(x: Tensor) -> Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    return F.log_softmax(_upcast(logits) / temperature, dim=-1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) over the last dim; terms with p = 0 are 0 (also where both are -inf)."""
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), p.new_zeros(()))
    return terms.sum(-1)


def fkl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Forward KL(p || q): the student covers the teacher's mass (vanilla KD)."""
    return _kl(_log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature))


DIVERGENCES: dict[str, Callable[..., Tensor]] = {"fkl": fkl}


def divergence(
    name: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    **params: float,
) -> Tensor:
    """Divergence `name` between logits [..., V]; `mask` [...] bool marks counted tokens."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; choose from {sorted(DIVERGENCES)}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    values = DIVERGENCES[name](student_logits, teacher_logits, temperature=temperature, **params)
    return masked_reduce(values, mask, reduction)
