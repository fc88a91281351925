"""KD against a teacher known only by its top-k tokens plus a tail bucket (an offline teacher cache).

The teacher distribution is kept as k + 1 buckets: its k most likely tokens with their log-probabilities,
and one bucket holding the remaining mass 1 − Σ_topk p. The student's full softmax is folded into the same
buckets (its probabilities of the k tokens, and everything else in the tail), and the divergence is taken
between the two (k + 1)-bucket distributions. With τ ≠ 1 the teacher's buckets are tempered as buckets
(p_b^(1/τ), renormalized) because the cache does not know how the tail mass splits; the student is tempered
over its whole vocabulary, then folded. At τ = 1 this is exactly the forward KL of the dense distributions
restricted to the support {top-k, tail} (tested against the dense loss).

    targets = topk_targets(teacher_logits_rows, k=64)                    # from a live teacher, or a cache
    loss = sparse_kl(student_hidden_rows, student_head, targets, reduction="sum")   # chunked over rows
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from dualkd.losses.divergences import upcast
from dualkd.losses.fused import default_chunk_size


@dataclass
class TopKTargets:
    """The teacher at N positions: top-k ids [N, k] (long), their log-probabilities [N, k] and the log of
    the remaining mass [N] (fp32)."""

    ids: Tensor
    logprobs: Tensor
    tail: Tensor

    def to(self, device: torch.device | str) -> TopKTargets:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def log_tail_mass(topk_logprobs: Tensor) -> Tensor:
    """log(1 − Σ exp(topk_logprobs)) per row, stable, floored at log(1e-12) (the mass can round to 0)."""
    covered = torch.logsumexp(upcast(topk_logprobs), dim=-1).clamp(max=0.0)
    return torch.log((-torch.expm1(covered)).clamp(min=1e-12))


@torch.no_grad()
def topk_targets(logits: Tensor, k: int) -> TopKTargets:
    """Top-k of a teacher's logits rows [N, V] (log-softmax in fp32, fp64 for fp64 logits)."""
    logp = torch.log_softmax(upcast(logits), dim=-1)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return TopKTargets(ids=ids, logprobs=values, tail=log_tail_mass(values))


def _bucket_kl(z: Tensor, ids: Tensor, t_logprobs: Tensor, t_tail: Tensor, temperature: float) -> Tensor:
    """Forward KL(teacher buckets ‖ student buckets) per row: z [c, V], ids/logprobs [c, k], tail [c]."""
    s_logp = torch.log_softmax(upcast(z) / temperature, dim=-1)
    s_top = s_logp.gather(-1, ids)  # [c, k]
    s_tail = log_tail_mass(s_top)
    s = torch.cat([s_top, s_tail[:, None]], dim=-1)
    t = torch.cat([t_logprobs, t_tail[:, None].to(t_logprobs.dtype)], dim=-1).to(s.dtype)
    if temperature != 1.0:
        t = t / temperature
    t = torch.log_softmax(t, dim=-1)  # the buckets sum to 1 up to rounding; at τ ≠ 1, the tempered buckets
    return (t.exp() * (t - s)).sum(-1)


def sparse_kl(student_hidden: Tensor, student_head: Tensor, targets: TopKTargets, *, temperature: float = 1.0,
              student_bias: Tensor | None = None, reduction: str = "sum", chunk_size: int | None = None
              ) -> Tensor:
    """Σ (or mean, or per row) of the bucket KL over N rows from the student's hidden states [N, d] and head
    [V, d], chunk by chunk (each chunk's [c, V] logits are recomputed in backward, never kept)."""
    n = student_hidden.shape[0]
    out = []
    step = chunk_size or default_chunk_size(max(n, 1), student_head.shape[0])

    def chunk(h: Tensor, w: Tensor, b: Tensor | None, ids: Tensor, lp: Tensor, tail: Tensor) -> Tensor:
        z = h @ w.t() if b is None else torch.addmm(b, h, w.t())
        return _bucket_kl(z, ids, lp, tail, temperature)

    for s in range(0, n, step):
        rows = slice(s, s + step)
        args = (student_hidden[rows], student_head, student_bias, targets.ids[rows], targets.logprobs[rows],
                targets.tail[rows])
        out.append(checkpoint(chunk, *args, use_reentrant=False) if torch.is_grad_enabled() else chunk(*args))
    per_row = torch.cat(out) if out else student_hidden.new_zeros(0, dtype=torch.float32)
    if reduction == "none":
        return per_row
    if reduction == "mean":
        return per_row.sum() / max(n, 1)
    return per_row.sum()


@torch.no_grad()
def topk_rows(hidden: Tensor, head: Tensor, bias: Tensor | None, k: int, chunk_size: int | None = None
              ) -> TopKTargets:
    """The teacher's top-k targets at N rows from its hidden states, chunk by chunk (no [N, V] logits)."""
    n = hidden.shape[0]
    step = chunk_size or default_chunk_size(max(n, 1), head.shape[0])
    parts = [topk_targets(hidden[s:s + step] @ head.t() + (bias if bias is not None else 0), k)
             for s in range(0, n, step)]
    if not parts:
        empty = hidden.new_zeros((0, k))
        return TopKTargets(empty.long(), empty.float(), hidden.new_zeros(0).float())
    return TopKTargets(torch.cat([p.ids for p in parts]), torch.cat([p.logprobs for p in parts]),
                       torch.cat([p.tail for p in parts]))
