"""TIE-KD's hierarchical ranking loss (arXiv 2305.08096; its official criterion, read for the math).

With T = the teacher's top-k ids sorted by p (t_1 its argmax) and S = the student's top-k ids sorted by q:

    L_top1 = Σ_i max(0, q(t_i) − q(t_1))                          the teacher's top-1 ranks first in the student
    L_topk = Σ_{i,j} 1[p(t_i) > p(s_j)] · max(0, q(s_j) − q(t_i))   nothing the teacher ranks lower outranks t_i

on probabilities (not logits), margin 0, per position. The pair gate compares teacher probabilities on both
sides (the NMT code; KDFlow's LLM port gates on the student's own probabilities, which we do not follow).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dualkd.losses.divergences import upcast


def hierarchical_ranking_loss(student_logits: Tensor, teacher_logits: Tensor, k: int = 5) -> Tensor:
    """L_top1 + L_topk per position: [..., V], [..., V] -> [...]. Gradients reach the student only."""
    V = student_logits.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"k must be in [1, V={V}], got {k}")
    q = torch.softmax(upcast(student_logits), dim=-1)
    with torch.no_grad():
        p = torch.softmax(upcast(teacher_logits), dim=-1)
        top_t = p.topk(k, dim=-1).indices  # [..., k] sorted by p
        top_s = q.detach().topk(k, dim=-1).indices
        p_t, p_s = p.gather(-1, top_t), p.gather(-1, top_s)
        gate = (p_t.unsqueeze(-1) > p_s.unsqueeze(-2)).float()  # [..., k(i), k(j)]
    q_t, q_s = q.gather(-1, top_t), q.gather(-1, top_s)
    top1 = torch.relu(q_t - q_t[..., :1]).sum(-1)
    topk = (gate * torch.relu(q_s.unsqueeze(-2) - q_t.unsqueeze(-1))).sum((-1, -2))
    return top1 + topk
