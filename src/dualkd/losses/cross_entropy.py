"""Next-token cross-entropy on response tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dualkd.losses.divergences import upcast
from dualkd.losses.reduce import Reduction


def token_cross_entropy(logits: Tensor, labels: Tensor, mask: Tensor, reduction: Reduction = "sum") -> Tensor:
    """CE of `labels` [...] under `logits` [..., V], counted where `mask` [...] is True.

    Selects the counted rows first, so only [N, V] (not [B, T, V]) is upcast to fp32.
    """
    rows = logits[mask]  # [N, V]
    rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
    targets = labels[mask]  # [N]
    if reduction == "none":
        out = logits.new_zeros(mask.shape, dtype=rows.dtype)
        out[mask] = F.cross_entropy(rows, targets, reduction="none")
        return out
    total = F.cross_entropy(rows, targets, reduction="sum")
    if reduction == "sum":
        return total
    return total / mask.sum().clamp(min=1).to(total.dtype)


def label_smoothed_cross_entropy(logits: Tensor, labels: Tensor, mask: Tensor, epsilon: float) -> Tensor:
    """Per-position label-smoothed CE as fairseq computes it: (1 − ε)·(−log q_y) + (ε / V)·Σ_v (−log q_v);
    0 off the mask. [..., V], [...], [...] -> [...] (fp32, or fp64 for fp64 inputs)."""
    logq = torch.log_softmax(upcast(logits), dim=-1)
    nll = -logq.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    smooth = -logq.mean(-1)
    return ((1.0 - epsilon) * nll + epsilon * smooth) * mask
