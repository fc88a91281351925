"""Pure functions of preference optimization and AlignDistil (arXiv 2503.02832), on plain logits.

These are the readable definitions (and the reference twins of the fused paths in methods/dpo.py and
methods/aligndistil.py). Shapes: logits [..., V], masks [...] bool, per-sequence values [B].

DPO (Rafailov et al., 2023), with β the DPO temperature:
    margin = β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))],   loss = −log σ(margin)

AlignDistil's teacher, per position t (z = logits of one position):
    contrastive:  z*_t = z_dpo + α_t·(z_dpo − z_rev)            α_t = r·TVD_t + ε,  TVD_t = ½·Σ_v |p_dpo − p_rev|
    theorem 1:    z*   = w·z_dpo + (1 − w)·z_ref                w = β0/β
and the loss is Σ_t (β0/α_t)·KL(q_θ(·|s_t) ‖ softmax(z*_t)), optionally divided by each response's length.
The official code sums |p_dpo − p_rev| without the ½, so its `beta2` r equals our r / 2: its 10 (off-policy)
and 15 (on-policy) are our 20 and 30.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dualkd.losses.divergences import upcast


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor, reference_rejected: Tensor,
             beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per pair: (loss, chosen reward, rejected reward), rewards = β·(log π − log π_ref) of whole responses."""
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    return -F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()


def sequence_logprobs(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Σ_t log p(labels_t) over the masked positions of each row: [B, T, V], [B, T], [B, T] -> [B]."""
    logp = torch.log_softmax(upcast(logits), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def total_variation(dpo_logits: Tensor, rev_logits: Tensor) -> Tensor:
    """TVD_t = ½·Σ_v |p_dpo − p_rev| per position, in [0, 1]."""
    p, q = torch.softmax(upcast(dpo_logits), -1), torch.softmax(upcast(rev_logits), -1)
    return 0.5 * (p - q).abs().sum(-1)


def adaptive_alpha(dpo_logits: Tensor, rev_logits: Tensor, r: float, eps: float = 1e-3) -> Tensor:
    """α_t = r·TVD_t + ε, in [ε, r + ε]."""
    return r * total_variation(dpo_logits, rev_logits) + eps


def contrastive_teacher_logits(dpo_logits: Tensor, rev_logits: Tensor, alpha: Tensor | float) -> Tensor:
    """z* = z_dpo + α·(z_dpo − z_rev); α a scalar or [...] per position."""
    a = alpha.unsqueeze(-1) if isinstance(alpha, Tensor) else alpha
    return dpo_logits + a * (dpo_logits - rev_logits)


def theorem1_teacher_logits(dpo_logits: Tensor, ref_logits: Tensor, w: float) -> Tensor:
    """z* = w·z_dpo + (1 − w)·z_ref (Theorem 1; w = β0/β > 1 extrapolates beyond DPO)."""
    return w * dpo_logits + (1.0 - w) * ref_logits


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(q_student ‖ p_teacher) per position (fp32, or fp64 for fp64 inputs)."""
    logq = torch.log_softmax(upcast(student_logits), -1)
    logp = torch.log_softmax(upcast(teacher_logits), -1)
    return (logq.exp() * (logq - logp)).sum(-1)


def aligndistil_loss(student_logits: Tensor, teacher_logits: Tensor, weights: Tensor, mask: Tensor,
                     length_norm: bool = True) -> Tensor:
    """Mean over sequences of Σ_t w_t·KL(q_t ‖ p*_t) (divided by each sequence's masked length with
    `length_norm`; otherwise the token mean). [B, T, V], [B, T, V], [B, T], [B, T] -> scalar."""
    per_token = reverse_kl(student_logits, teacher_logits) * weights * mask
    if length_norm:
        return (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    return per_token.sum() / mask.sum().clamp(min=1)
