"""Pure loss functions: (student, teacher, mask, params) -> per-token values; reduction is a separate step.

Public API (stable: other tools call exactly these names):
    DIVERGENCES                      name -> function(student_logits, teacher_logits, temperature=1.0, **params)
    divergence(name, student_logits, teacher_logits, *, mask, temperature, reduction, **params)
    fused_divergence(name, student_hidden, student_head, teacher_hidden, teacher_head, *, mask, temperature,
                     reduction, chunk_size, student_bias, teacher_bias, **params)
    fused_ce_and_divergence(student_hidden, student_head, teacher_hidden, teacher_head, labels, *, divergence,
                            ce_weight, div_weight, ...)   gold CE and a divergence in one pass (the objectives')
"""

from dualkd.losses.cross_entropy import token_cross_entropy
from dualkd.losses.divergences import DIVERGENCES, divergence
from dualkd.losses.fused import fused_ce_and_divergence, fused_divergence
from dualkd.losses.reduce import masked_reduce

__all__ = ["DIVERGENCES", "divergence", "fused_ce_and_divergence", "fused_divergence", "masked_reduce",
           "token_cross_entropy"]
