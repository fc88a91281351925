"""ULD's distance, fused: the L1 distance between two models' sorted next-token distributions, computed from
hidden states and LM heads, chunk by chunk, with its gradient computed analytically in the forward pass.

    D(row) = Σ_i | sort↓(q)_i − sort↓(p)_i |      q = softmax(h_s W_sᵀ + b_s) [V_s],  p = softmax(h_t W_tᵀ + b_t) [V_t]
             (the shorter vector zero-padded)

Two facts make it cheap where the vocabularies differ in size (Gemma-3's 262,144 against SmolLM2's 49,152):
- past the student's width K = V_s the padded student entries are 0, so the teacher's ranks ≥ K only add their
  mass: D = Σ_{i<K} |sort↓(q)_i − t_i| + (1 − Σ_{i<K} t_i) with t the teacher's top-K, sorted (a partial sort,
  `topk`, where a full sort would order ranks that only add their mass);
- the gradient needs no autograd graph through the sorts: ∂D/∂q_v = sign(sort↓(q)_i − t_i) at the rank i of
  v (what torch's sort backward scatters), and through the softmax ∂D/∂z = q ⊙ (g − Σ q⊙g). So each chunk is
  computed once (an autograd graph under activation checkpointing runs the teacher's sort twice: forward and
  recomputation) and only the gradients for h_s, W_s, b_s are kept; backward scales them.
The teacher side gets no gradient. Its "mass below the top-K" is Σ p − Σ top-K summed in float64 (1 − Σ top-K
would lose the softmax's own rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dualkd.losses.divergences import upcast
from dualkd.losses.fused import default_chunk_size


def _teacher_side(h_t: Tensor, w_t: Tensor, b_t: Tensor | None, width: int, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """([c, width] the teacher's probabilities sorted descending, cut or zero-padded to `width`; [c] the mass
    of the ranks past `width`)."""
    p = torch.softmax(upcast(F.linear(h_t, w_t, b_t)).to(acc), dim=-1)
    if p.shape[-1] > width:
        top = p.topk(width, dim=-1, sorted=True).values
        rest = p.sum(-1, dtype=torch.float64) - top.sum(-1, dtype=torch.float64)
        return top, rest.to(acc)
    top = p.sort(dim=-1, descending=True).values
    return F.pad(top, (0, width - top.shape[-1])), p.new_zeros(p.shape[0])


def _run_chunks(hs: Tensor, ws: Tensor, bs: Tensor | None, ht: Tensor, wt: Tensor, bt: Tensor | None,
                chunk_size: int, want: tuple[bool, bool, bool]) -> tuple[Tensor, list[Tensor | None]]:
    """The summed distance over the rows and the gradients asked for by `want` (hidden, head, bias). Runs
    inside `_SortedL1.forward`, where autograd records nothing."""
    want_h, want_w, want_b = want
    acc = torch.promote_types(hs.dtype, torch.float32)
    total = torch.zeros((), dtype=acc, device=hs.device)
    grad_h = torch.empty_like(hs) if want_h else None
    grad_w = torch.zeros(ws.shape, dtype=acc, device=ws.device) if want_w else None
    grad_b = torch.zeros(ws.shape[0], dtype=acc, device=ws.device) if want_b else None
    for start in range(0, hs.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        h = hs[rows]
        t, rest = _teacher_side(ht[rows], wt, bt, ws.shape[0], acc)  # [c, V_s], [c]
        q = torch.softmax(upcast(F.linear(h, ws, bs)).to(acc), dim=-1)  # [c, V_s]
        q_sorted, rank_to_id = q.sort(dim=-1, descending=True)
        diff = q_sorted.sub_(t)
        total += diff.abs().sum() + rest.sum()
        if not any(want):
            continue
        g = torch.empty_like(q).scatter_(-1, rank_to_id, diff.sign_())  # ∂D/∂q, [c, V_s]
        del diff, rank_to_id, t
        dz = g.sub_((q * g).sum(-1, keepdim=True)).mul_(q)  # ∂D/∂z = q ⊙ (g − Σ q⊙g), in g's buffer
        if want_h:
            grad_h[rows] = dz.to(ws.dtype) @ ws
        if want_w:
            grad_w.addmm_(dz.t(), upcast(h).to(acc))
        if want_b:
            grad_b += dz.sum(0)
    grads = [grad_h, grad_w.to(ws.dtype) if grad_w is not None else None,
             grad_b.to(bs.dtype) if grad_b is not None and bs is not None else None]
    return total, grads


class _SortedL1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, chunk_size: int):  # type: ignore[override]
        ctx.want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bs is not None and ctx.needs_input_grad[2])
        total, grads = _run_chunks(hs, ws, bs, ht, wt, bt, chunk_size, ctx.want)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in grads))
        return total

    @staticmethod
    def backward(ctx, grad_total):  # type: ignore[override]
        # scale the stored gradients in place: a copy would double the head-sized gradient in memory
        grads = [g.mul_(grad_total.to(g.dtype)) if want else None for g, want in zip(ctx.saved_tensors, ctx.want)]
        return (*grads, None, None, None, None)


def fused_sorted_l1(student_hidden: Tensor, student_head: Tensor, teacher_hidden: Tensor, teacher_head: Tensor,
                    student_bias: Tensor | None = None, teacher_bias: Tensor | None = None,
                    chunk_size: int | None = None) -> Tensor:
    """Σ over the rows of D (module docstring), [N, d_s] and [N, d_t] paired rows -> a scalar (fp32, fp64 for
    fp64 inputs) whose gradients reach the student's hidden states, head and bias."""
    n = student_hidden.shape[0]
    step = chunk_size or default_chunk_size(max(n, 1), max(student_head.shape[0], teacher_head.shape[0]))
    return _SortedL1.apply(student_hidden, student_head, student_bias, teacher_hidden.detach(),
                           teacher_head.detach(), teacher_bias.detach() if teacher_bias is not None else None, step)
