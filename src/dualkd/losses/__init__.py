"""Pure loss functions: (student, teacher, mask, params) -> per-token values; reduction is a separate step."""

from dualkd.losses.cross_entropy import token_cross_entropy
from dualkd.losses.divergences import DIVERGENCES, divergence
from dualkd.losses.reduce import masked_reduce

__all__ = ["DIVERGENCES", "divergence", "masked_reduce", "token_cross_entropy"]
