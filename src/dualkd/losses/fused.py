"""Fused, chunked KD losses computed from hidden states and LM-head weights: no [N, V] tensor is ever alive.

    loss = fused_divergence("fkl", h_s, W_s, h_t, W_t, mask=m, temperature=2.0)
    # same value and gradients as divergence("fkl", h_s @ W_s.T, h_t @ W_t.T, mask=m, temperature=2.0)

How: the counted rows are processed `chunk_size` at a time. For each chunk the logits of both models are
computed ([c, V]), then the loss values and, analytically, dL/dz_student (divergences.py gives r = q ⊙ ∂L/∂q,
and dL/dz = (r - q Σr) / τ); the chunk's gradients for the student hidden states, head and bias are
accumulated and the chunk's [c, V] buffers are dropped. With a sum/mean reduction this happens in the
forward pass (as Liger-Kernel does), and backward only scales the stored gradients by the incoming scalar.
With reduction="none" the incoming gradient differs per token, so backward recomputes the chunks instead.
The teacher side never gets gradients.

`fused_ce_and_divergence` is the same machinery for the objectives: ce_weight·CE + div_weight·D in one pass,
so that the student's logits are computed once per chunk for both terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from dualkd.losses.divergences import SPECS, Dists, DivergenceSpec, resolve_params, upcast
from dualkd.losses.reduce import Reduction

_TARGET_ELEMENTS = 1 << 24  # per [c, V] buffer: 64 MiB in fp32 (see benchmarks/losses.py for the trade-off)
_BLOCK_ELEMENTS = 1 << 18  # per column block of a divergence's elementwise work: 1 MiB in fp32
_ARGMAX_MIN_ROWS, _ARGMAX_MIN_SIZE = 32, 1 << 20  # where `_argmax` beats torch's on CPU


def default_chunk_size(n_rows: int, vocab: int) -> int:
    """Rows per chunk: about 16M logits per buffer (64 MiB fp32), between 16 and 1024 rows. Smaller chunks
    save little memory (the head gradient dominates) and make the GEMMs slower on CPU."""
    return max(1, min(n_rows, max(16, min(1024, _TARGET_ELEMENTS // max(vocab, 1)))))


@dataclass(frozen=True)
class _Plan:
    """What to compute per row: ce_weight·CE(z_s, y) + div_weight·D(z_s[:, :V], z_t) at temperature τ."""

    divergence: str | None
    params: dict[str, float] = field(default_factory=dict)
    temperature: float = 1.0
    ce_weight: float = 0.0
    div_weight: float = 1.0
    div_vocab: int | None = None  # V compared by D (the student head may have extra padding rows)
    chunk_size: int = 256


class _Scratch:
    """[c, V] buffers that every chunk of one call reuses, by name. Why: a fresh 64 MiB buffer per chunk is
    page-faulted in anew each time (glibc maps allocations that large afresh and unmaps them on free): with
    reuse the loss takes 0.81-0.83x the time on CPU at V = 262,144 (docs/benchmark-losses.md). The last chunk, shorter,
    takes the front of each buffer (contiguous)."""

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}

    def take(self, name: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
        need = shape[0] * shape[1]
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < need or buf.dtype != dtype or buf.device != device:
            buf = self._bufs[name] = torch.empty(need, dtype=dtype, device=device)
        return buf[:need].view(shape)

    def rows(self, name: str, c: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """[c, cols] in the layout of the GEMM outputs (`_logits`: a [cols, c] buffer, transposed), so that
        elementwise work between them runs over one contiguous range."""
        return self.take(name, (cols, c), dtype, device).t()


def _logits(h: Tensor, head: Tensor, bias: Tensor | None, out: Tensor | None = None) -> Tensor:
    """h @ head.T (+ bias) as a [c, V] view of a [V, c] buffer (`out`, or a new one): on CPU the GEMM with the
    vocabulary as its long side is the faster layout for small c, and the head-gradient GEMM then reads the
    buffer contiguously (benchmarks/losses.py times the whole loss)."""
    z = torch.mm(head, h.t(), out=out) if bias is None else torch.addmm(bias[:, None], head, h.t(), out=out)
    return z.t()


def _softmax_(z: Tensor, temperature: float, probs: Tensor, log: bool) -> tuple[Tensor, Tensor]:
    """softmax(z / τ) over the last dim into `probs` (fp32/fp64, z's shape); with `log`, log_softmax(z / τ) in
    place in z (fp32/fp64; an fp32 copy of a half z), else z is left as it was. Returns (z, log Σ_v exp(z_v / τ)
    [c, 1]). One exp pass serves both: the probabilities are the normalizer's own exp terms, rescaled."""
    z = upcast(z)
    if log and temperature != 1.0:
        z.div_(temperature)
    top = z.amax(-1, keepdim=True)  # of z / τ when `log`, else of z
    top = torch.where(torch.isfinite(top), top, torch.zeros((), dtype=top.dtype, device=top.device))
    shifted = torch.sub(z, top, out=probs)
    if not log and temperature != 1.0:
        shifted.div_(temperature)
        top = top / temperature
    total = shifted.exp_().sum(-1, keepdim=True)
    log_total = total.log().add_(top)
    if log:
        z.sub_(log_total)
    probs.div_(total)
    return z, log_total


def _argmax(z: Tensor, scratch: _Scratch) -> Tensor:
    """z.argmax(-1) of a [c, V] view of a [V, c] buffer (`_logits`): the first index of each row's maximum, as
    torch's. On CPU torch's argmax over that strided dim is slow for many rows, while a max (contiguous
    reads), an equality mask and its nonzero entries are not; for few rows or small buffers torch's argmax is
    the faster one, so those keep it (`_ARGMAX_MIN_ROWS`, `_ARGMAX_MIN_SIZE`)."""
    if z.device.type != "cpu" or z.stride(0) != 1 or z.shape[0] < _ARGMAX_MIN_ROWS or z.numel() < _ARGMAX_MIN_SIZE:
        return z.argmax(-1)
    c, V = z.shape
    top = z.amax(-1, keepdim=True)
    at_top = torch.eq(z, top, out=scratch.rows("at_top", c, V, torch.bool, z.device))
    vocab_id, row = at_top.t().nonzero().unbind(1)  # in the buffer's order: one pass
    first = torch.full((c,), V, dtype=torch.long).scatter_reduce_(0, row, vocab_id, "amin")
    nan = first == V  # a row with a NaN: nothing equals its max (NaN); torch's argmax points at the NaN
    if nan.any():
        first[nan] = z[nan].argmax(-1)
    return first


def _divergence_rows(spec: DivergenceSpec, params: dict[str, float], log_q: Tensor, log_p: Tensor,
                     valid: Tensor | None, p: Tensor, q: Tensor, r_out: Tensor | None) -> Tensor:
    """The divergence's value per row [c] and, into `r_out`, r = q ⊙ ∂L/∂q [c, V], from the log-probabilities
    and probabilities of both models ([c, V] each; p, q are 0 where not `valid`). `r_out` may be `p`: a block of
    r is written once its block's value and r are computed, and nothing reads p after that. A columnwise row is
    evaluated on column blocks of ~1 MiB: its temporaries (log p - log q, p ⊙ (...), -p) then come from the heap
    and stay in cache, where over a whole [64, 262,144] chunk each would be a fresh 64 MiB mapping, page-faulted
    in on every use (docs/benchmark-losses.md). On CPU only."""
    c, V = log_q.shape
    # on a GPU the caching allocator already reuses memory, and 64 blocks would be 64x the kernel launches
    blocks = spec.columnwise and log_q.device.type == "cpu"
    width = max(1, _BLOCK_ELEMENTS // max(c, 1)) if blocks else V
    value = torch.zeros(c, dtype=log_q.dtype, device=log_q.device)
    for v0 in range(0, V, width):
        cols = slice(v0, min(v0 + width, V))
        d = Dists(log_q[:, cols], log_p[:, cols], valid[cols] if valid is not None else None, p[:, cols], q[:, cols])
        value += spec.value(d, **params)
        if r_out is not None:
            r_out[:, cols] = spec.q_grad(d, **params)
    return value


def _run_chunks(plan: _Plan, hs: Tensor, ws: Tensor, bs: Tensor | None, ht: Tensor, wt: Tensor, bt: Tensor | None,
                labels: Tensor | None, div_mask: Tensor | None, row_weights: Tensor | None,
                want: tuple[bool, bool, bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, list[Tensor | None]]:
    """One pass over the rows. Returns per-row (loss, ce, div, hit) and the gradients asked for by `want`
    (hidden, head, bias), each weighted per row by `row_weights` (None: weight 1). `div_mask` [n] bool keeps
    the divergence on some rows only (the CE stays on all). `hit` is 1 where the student's argmax is the label
    (0 without labels)."""
    n = hs.shape[0]
    V = plan.div_vocab or ws.shape[0]
    want_h, want_w, want_b = want
    any_grad = want_h or want_w or want_b
    acc = torch.promote_types(hs.dtype, torch.float32)  # accumulation dtype: fp32, or fp64 for fp64 inputs
    loss = torch.zeros(n, dtype=acc, device=hs.device)
    ce_rows, div_rows, hits = torch.zeros_like(loss), torch.zeros_like(loss), torch.zeros_like(loss)
    grad_h = torch.empty_like(hs) if want_h else None
    # torch.empty: the first chunk writes it (zero-filling 1 GiB first costs a whole extra pass)
    grad_w = torch.empty(ws.shape, dtype=acc, device=ws.device) if want_w else None
    grad_b = torch.zeros(ws.shape[0], dtype=acc, device=ws.device) if want_b else None
    spec = SPECS[plan.divergence] if plan.divergence else None
    scratch = _Scratch()
    teacher_head = wt[:V]
    teacher_bias = bt[:V] if bt is not None else None
    # logits can only be -inf through a bias (a masked vocabulary entry): find those columns once
    col_valid = None
    biases = [b for b in (bs[:V] if bs is not None else None, teacher_bias) if b is not None]
    if any(torch.isinf(b).any() for b in biases):
        col_valid = torch.ones(V, dtype=torch.bool, device=ws.device)
        for b in biases:
            col_valid &= torch.isfinite(b)

    for start in range(0, n, plan.chunk_size):
        rows = slice(start, min(start + plan.chunk_size, n))
        h = hs[rows]
        c = h.shape[0]

        z_s = _logits(h, ws, bs, out=scratch.take("z_s", (ws.shape[0], c), hs.dtype, hs.device))  # [c, V_s]
        dz: Tensor | None = None  # dL/dz_s, fp32 [c, V_s]
        if plan.ce_weight:
            assert labels is not None
            y = labels[rows]
            hits[rows] = (_argmax(z_s, scratch) == y).to(hits.dtype)
            # the softmax into the "ce" buffer, where it becomes dL/dz; z_s stays the logits (the divergence's)
            softmax = scratch.rows("ce", c, ws.shape[0], acc, hs.device)
            log_total = _softmax_(z_s, 1.0, softmax, log=False)[1][:, 0]
            ce = log_total - upcast(z_s.gather(-1, y[:, None])[:, 0])
            ce_rows[rows] = ce
            loss[rows] += plan.ce_weight * ce
            if any_grad:
                dz = softmax
                dz[torch.arange(c, device=dz.device), y] -= 1.0
                dz.mul_(plan.ce_weight)
            del softmax
        if spec is not None and plan.div_weight:
            with torch.no_grad():
                z_t = _logits(ht[rows], teacher_head, teacher_bias,
                              out=scratch.take("z_t", (V, c), ht.dtype, ht.device))  # [c, V]
            # log-softmax in place in the logits' buffers (z_s is not needed any more after CE), probabilities in p, q
            p, q = (scratch.rows(name, c, V, acc, hs.device) for name in ("p", "q"))
            log_q = _softmax_(z_s[:, :V], plan.temperature, q, log=True)[0]
            log_p = _softmax_(z_t, plan.temperature, p, log=True)[0]
            r = p if any_grad else None  # each column block of r overwrites p's once the block is done with it
            d = _divergence_rows(spec, plan.params, log_q, log_p, col_valid, p, q, r)
            if div_mask is not None:
                d = d * div_mask[rows]
            div_rows[rows] = d
            loss[rows] += plan.div_weight * d
            if r is not None:
                if div_mask is not None:
                    r.mul_(div_mask[rows, None])
                # dL/dz = (r - q Σr) / τ, computed in place in r
                r.addcmul_(q, r.sum(-1, keepdim=True), value=-1.0).mul_(plan.div_weight / plan.temperature)
                if dz is None and ws.shape[0] == V:
                    dz = r
                else:
                    if dz is None:
                        dz = torch.zeros(z_s.shape, dtype=acc, device=z_s.device)
                    dz[:, :V] += r
                del r
            del log_q, log_p, z_t
        del z_s
        if dz is None:  # nothing to differentiate in this chunk (no CE, zero divergence weight)
            dz = torch.zeros((h.shape[0], ws.shape[0]), dtype=acc, device=h.device) if any_grad else None
        if dz is None:
            continue
        if row_weights is not None:
            dz.mul_(row_weights[rows, None])
        if want_h:
            grad_h[rows] = dz.to(ws.dtype) @ ws
        if want_w:
            if start == 0:
                torch.mm(dz.t(), upcast(h), out=grad_w)
            else:
                grad_w.addmm_(dz.t(), upcast(h))
        if want_b:
            grad_b += dz.sum(0)
        del dz
    if grad_w is not None and n == 0:
        grad_w.zero_()  # no chunk ran to write it
    grads = [grad_h, grad_w.to(ws.dtype) if grad_w is not None else None,
             grad_b.to(bs.dtype) if grad_b is not None and bs is not None else None]
    return loss, ce_rows, div_rows, hits, grads


class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, labels, div_mask, plan: _Plan, per_token: bool):  # type: ignore
        want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bs is not None and ctx.needs_input_grad[2])
        ctx.plan, ctx.per_token, ctx.want = plan, per_token, want
        if per_token:
            # gradients depend on the per-token upstream gradient: recompute in backward
            loss, ce, div, hits, _ = _run_chunks(plan, hs, ws, bs, ht, wt, bt, labels, div_mask, None,
                                                 (False, False, False))
            ctx.save_for_backward(hs, ws, bs, ht, wt, bt, labels, div_mask)
        else:
            loss, ce, div, hits, grads = _run_chunks(plan, hs, ws, bs, ht, wt, bt, labels, div_mask, None, want)
            ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in grads))
            loss, ce, div, hits = loss.sum(), ce.sum(), div.sum(), hits.sum()
        ctx.mark_non_differentiable(ce, div, hits)
        return loss, ce, div, hits

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_div, _grad_hits):  # type: ignore[override]
        if ctx.per_token:
            hs, ws, bs, ht, wt, bt, labels, div_mask = ctx.saved_tensors
            weights = upcast(grad_loss)
            _, _, _, _, grads = _run_chunks(ctx.plan, hs, ws, bs, ht, wt, bt, labels, div_mask, weights, ctx.want)
        else:
            # scale the stored gradients in place: a copy would double the head-sized gradient in memory
            grads = [g.mul_(grad_loss.to(g.dtype)) if want else None for g, want in zip(ctx.saved_tensors, ctx.want)]
        grad_h, grad_w, grad_b = grads
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


def _rows(tensor: Tensor, mask_rows: Tensor | None) -> Tensor:
    flat = tensor.reshape(-1, tensor.shape[-1])
    return flat if mask_rows is None else flat.index_select(0, mask_rows)


def _apply(plan: _Plan, student_hidden: Tensor, student_head: Tensor, teacher_hidden: Tensor, teacher_head: Tensor,
           mask: Tensor | None, labels: Tensor | None, reduction: Reduction, student_bias: Tensor | None,
           teacher_bias: Tensor | None, div_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead:
        raise ValueError(f"student hidden {tuple(student_hidden.shape)} and teacher hidden "
                         f"{tuple(teacher_hidden.shape)} differ in their leading (token) dimensions")
    if mask is not None and mask.shape != lead:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the hidden states' {tuple(lead)}")
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"unknown reduction {reduction!r}; use 'none', 'sum' or 'mean'")
    idx = mask.reshape(-1).nonzero().squeeze(1) if mask is not None else None
    hs, ht = _rows(student_hidden, idx), _rows(teacher_hidden.detach(), idx)
    y = labels.reshape(-1)[idx] if labels is not None and idx is not None else (
        labels.reshape(-1) if labels is not None else None)
    dm = None
    if div_mask is not None:
        dm = div_mask.reshape(-1)[idx] if idx is not None else div_mask.reshape(-1)
        dm = dm.to(torch.promote_types(hs.dtype, torch.float32))
    plan = _Plan(**{**plan.__dict__, "chunk_size": plan.chunk_size or default_chunk_size(hs.shape[0],
                                                                                          student_head.shape[0])})
    per_token = reduction == "none"
    tb = teacher_bias.detach() if teacher_bias is not None else None
    outs = _FusedLoss.apply(hs, student_head, student_bias, ht, teacher_head.detach(), tb, y, dm, plan, per_token)
    if per_token:
        n_all = student_hidden.reshape(-1, student_hidden.shape[-1]).shape[0]
        if idx is not None:
            outs = tuple(o.new_zeros(n_all).index_copy(0, idx, o) for o in outs)
        return tuple(o.reshape(lead) for o in outs)  # type: ignore[return-value]
    if reduction == "mean":
        count = float(hs.shape[0]) if hs.shape[0] > 0 else 1.0
        return tuple(o / count for o in outs)  # type: ignore[return-value]
    return outs


def fused_divergence(
    name: str,
    student_hidden: Tensor,
    student_head: Tensor,
    teacher_hidden: Tensor,
    teacher_head: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    chunk_size: int | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    **params: float,
) -> Tensor:
    """`divergence(name, student_hidden @ student_head.T (+ bias), teacher_hidden @ teacher_head.T (+ bias), ...)`
    without materializing the logits: hidden [N, d_s] / [N, d_t] (or [..., d]), heads [V, d_s] / [V, d_t],
    mask [N] bool. Gradients flow to the student hidden states, head and bias only."""
    full = resolve_params(name, params)
    if student_head.shape[0] != teacher_head.shape[0]:
        raise ValueError(f"student head has {student_head.shape[0]} rows and teacher head {teacher_head.shape[0]}; "
                         "slice both to the shared vocabulary first")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    plan = _Plan(divergence=name, params=full, temperature=temperature, chunk_size=chunk_size or 0)
    loss, _, _, _ = _apply(plan, student_hidden, student_head, teacher_hidden, teacher_head, mask, None, reduction,
                           student_bias, teacher_bias)
    return loss


def fused_ce_and_divergence(
    student_hidden: Tensor,
    student_head: Tensor,
    teacher_hidden: Tensor,
    teacher_head: Tensor,
    labels: Tensor,
    *,
    divergence: str,
    ce_weight: float,
    div_weight: float,
    div_mask: Tensor | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    reduction: Reduction = "sum",
    chunk_size: int | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    params: dict[str, float] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ce_weight·CE + div_weight·D over the same rows in one pass over the student's logits, with the
    divergence only where `div_mask` [N] is True (teacher rows elsewhere are ignored).

    CE uses the student's whole head; D compares the first `vocab_size` rows of both heads (same-family
    vocab padding). Returns (loss, ce, div, hits): the loss carries the gradients (weights may carry
    normalizers such as 1 / token count); ce, div and hits (argmax == label) are unweighted, for logging."""
    full = resolve_params(divergence, params or {})
    plan = _Plan(divergence=divergence, params=full, temperature=temperature, ce_weight=ce_weight,
                 div_weight=div_weight, div_vocab=vocab_size, chunk_size=chunk_size or 0)
    return _apply(plan, student_hidden, student_head, teacher_hidden, teacher_head, None, labels, reduction,
                  student_bias, teacher_bias, div_mask)


def fused_cross_entropy(
    hidden: Tensor,
    head: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
    reduction: Reduction = "sum",
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """CE(hidden @ head.T (+ bias), labels) chunk by chunk: (loss, hits) where hits counts argmax == label.
    Pass a detached head to train only what produced `hidden` (e.g. a projector)."""
    plan = _Plan(divergence=None, ce_weight=1.0, div_weight=0.0, chunk_size=chunk_size or 0)
    empty = hidden.new_zeros((*hidden.shape[:-1], 1))
    loss, ce, _, hits = _apply(plan, hidden, head, empty, head.new_zeros((head.shape[0], 1)), mask, labels,
                               reduction, bias, None)
    return loss, hits


@torch.no_grad()
def fused_argmax(hidden: Tensor, head: Tensor, bias: Tensor | None = None, chunk_size: int | None = None) -> Tensor:
    """argmax over the vocabulary of hidden @ head.T (+ bias), [N, d] -> [N], without [N, V] logits."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.long, device=hidden.device)
    step = chunk_size or default_chunk_size(flat.shape[0], head.shape[0])
    scratch = _Scratch()
    for start in range(0, flat.shape[0], step):
        h = flat[start:start + step]
        z = _logits(h, head, bias, out=scratch.take("z", (head.shape[0], h.shape[0]), h.dtype, h.device))
        out[start:start + step] = _argmax(z, scratch)
    return out.reshape(hidden.shape[:-1])


@torch.no_grad()
def fused_total_variation(h1: Tensor, head1: Tensor, h2: Tensor, head2: Tensor, bias1: Tensor | None = None,
                          bias2: Tensor | None = None, chunk_size: int | None = None) -> Tensor:
    """½·Σ_v |softmax(h1 @ head1.T) − softmax(h2 @ head2.T)| per row, [N, d1], [N, d2] -> [N] (fp32), chunk by
    chunk without [N, V] tensors (AlignDistil's disagreement between two frozen models; no gradients)."""
    n = h1.shape[0]
    out = torch.zeros(n, dtype=torch.float32, device=h1.device)
    step = chunk_size or default_chunk_size(max(n, 1), head1.shape[0])
    for s in range(0, n, step):
        p = torch.softmax(upcast(_logits(h1[s:s + step], head1, bias1)), -1)
        q = torch.softmax(upcast(_logits(h2[s:s + step], head2, bias2)), -1)
        out[s:s + step] = 0.5 * (p - q).abs().sum(-1)
    return out
