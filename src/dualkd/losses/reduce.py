"""Masked reduction of per-token loss values."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Reduction = Literal["none", "sum", "mean"]


def masked_reduce(values: Tensor, mask: Tensor | None, reduction: Reduction) -> Tensor:
    """`values` [...] -> per-token (0 where masked out), their sum, or their mean over counted tokens.

    "mean" of an all-masked input is 0.0 with zero (finite) gradients, never NaN.
    """
    if mask is not None:
        if mask.shape != values.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match values {tuple(values.shape)}")
        values = torch.where(mask, values, values.new_zeros(()))
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        count = mask.sum() if mask is not None else torch.tensor(values.numel(), device=values.device)
        return total / count.clamp(min=1).to(total.dtype)
    raise ValueError(f"unknown reduction {reduction!r}; use 'none', 'sum' or 'mean'")
