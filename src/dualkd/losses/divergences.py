"""Token-level divergences between teacher and student next-token distributions (the DSKD paper's KD
framework, arXiv 2406.17328).

p = softmax(teacher_logits / τ), q = softmax(student_logits / τ), computed in fp32 (fp64 stays fp64)
whatever the input dtype. Each divergence maps logits [..., V] to per-token values [...]:

    fkl    KL(p || q)                                   forward KL (vanilla KD)
    rkl    KL(q || p)                                   reverse KL
    js     β KL(p || m) + (1-β) KL(q || m), m = βp + (1-β)q      (β = `beta`, 0.5: DSKD's JS)
    tvd    ½ Σ |p - q|                                   total variation
    skl    KL(p || λp + (1-λ)q)                          skewed forward KL (λ = `skew_lambda`)
    srkl   KL(q || (1-λ)p + λq)                          skewed reverse KL
    akl    g_head/(g_head+g_tail) FKL + g_tail/(g_head+g_tail) RKL   adaptive KL (α = `akl_alpha`); the
           tail is the teacher's smallest probabilities whose cumulative mass is ≤ α, g = Σ |p - q| over
           head/tail, both weights detached

Conventions: no τ² factor (the papers' choice; multiply yourself if you want Hinton's scaling). Vocabulary
entries whose logit is -inf on either side (masked out) contribute nothing and never produce NaN, in
values or gradients. JS, SKL and SRKL use exact log-mixtures (logaddexp), not DSKD's `log(x + 1e-9)`.

Each divergence is defined twice, on purpose: `value` (used with autograd by `divergence`) and `q_grad`,
the analytic gradient r = q ⊙ ∂L/∂q from which dL/dz = (r - q Σr) / τ; the fused chunked loss uses the
latter so that it never needs autograd over [N, V]. Both read a `Dists` (log q, log p, and p, q computed
once). Tests check both against float64 references.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dualkd.losses.reduce import Reduction, masked_reduce

# ----------------------------------------------------------------------------------------------- helpers


def upcast(x: Tensor) -> Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _zero_invalid(x: Tensor, valid: Tensor | None) -> Tensor:
    """A finite stand-in where an entry is masked out (so that no 0 * inf appears, forward or backward)."""
    return x if valid is None else torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _probs(log_x: Tensor, valid: Tensor | None) -> Tensor:
    return _zero_invalid(log_x.exp(), valid)


def _log_mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w·a + (1-w)·b) from log a, log b, exactly."""
    if weight_a <= 0.0:
        return log_b
    if weight_a >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log(1.0 - weight_a))


class Dists:
    """Both distributions of a batch of rows at temperature: log q, log p, and p, q computed once on demand.

    `valid` [..., V] bool (or a [V] column mask) marks entries where both logits are finite; None means all.
    Invalid entries read as log-probability 0 and probability 0, so no 0 * inf ever appears. `p`/`q`: the
    probabilities when the caller has them already (the fused loss gets them from its log-softmax's exp terms;
    0 where invalid), else exp(log p), exp(log q) on first use.
    """

    def __init__(self, log_q: Tensor, log_p: Tensor, valid: Tensor | None, p: Tensor | None = None,
                 q: Tensor | None = None):
        self.valid = valid
        self.log_q = _zero_invalid(log_q, valid)
        self.log_p = _zero_invalid(log_p, valid)
        self._p = p
        self._q = q
        self.cache: dict[str, tuple[Tensor, Tensor]] = {}  # e.g. AKL's weights, shared by value and gradient

    @property
    def p(self) -> Tensor:
        if self._p is None:
            self._p = _probs(self.log_p, self.valid)
        return self._p

    @property
    def q(self) -> Tensor:
        if self._q is None:
            self._q = _probs(self.log_q, self.valid)
        return self._q


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Σ_v a_v b_v over the last dim."""
    return (a * b).sum(-1)


# ----------------------------------------------------------------------------------------------- values
# Each maps Dists to per-row values [...].


def _fkl(d: Dists) -> Tensor:
    return _dot(d.p, d.log_p - d.log_q)


def _rkl(d: Dists) -> Tensor:
    return _dot(d.q, d.log_q - d.log_p)


def _js(d: Dists, beta: float = 0.5) -> Tensor:
    log_m = _log_mix(d.log_p, d.log_q, beta)
    return beta * _dot(d.p, d.log_p - log_m) + (1 - beta) * _dot(d.q, d.log_q - log_m)


def _tvd(d: Dists) -> Tensor:
    return 0.5 * (d.p - d.q).abs().sum(-1)


def _skl(d: Dists, skew_lambda: float = 0.1) -> Tensor:
    return _dot(d.p, d.log_p - _log_mix(d.log_p, d.log_q, skew_lambda))


def _srkl(d: Dists, skew_lambda: float = 0.1) -> Tensor:
    return _dot(d.q, d.log_q - _log_mix(d.log_p, d.log_q, 1.0 - skew_lambda))


def akl_weights(d: Dists, akl_alpha: float = 0.5) -> tuple[Tensor, Tensor]:
    """Detached (head, tail) weights of adaptive KL. Tail: the teacher's smallest probabilities whose
    ascending cumulative mass is ≤ α; g = Σ|p - q| over each part; weights g_head/(g_head + g_tail) etc.
    (0.5/0.5 when p == q, where both KLs are 0 anyway). Not under no_grad: `d` caches p and q for the KLs."""
    key = f"akl_weights:{akl_alpha}"
    if key in d.cache:
        return d.cache[key]
    sorted_p, order = d.p.detach().sort(dim=-1)
    gap = (sorted_p - d.q.detach().gather(-1, order)).abs()
    tail = sorted_p.cumsum(-1) <= akl_alpha
    g_tail = (gap * tail).sum(-1)
    g_head = gap.sum(-1) - g_tail
    total = g_head + g_tail
    safe = total > 0
    w_head = torch.where(safe, g_head / torch.where(safe, total, 1.0), 0.5)
    d.cache[key] = (w_head, 1.0 - w_head)
    return d.cache[key]


def _akl(d: Dists, akl_alpha: float = 0.5) -> Tensor:
    w_head, w_tail = akl_weights(d, akl_alpha)
    return w_head * _fkl(d) + w_tail * _rkl(d)


# ----------------------------------------------------------------------------------------------- gradients
# r = q ⊙ ∂L/∂q, per entry [..., V]; then ∂L/∂(z/τ) = r - q Σr.


def _fkl_r(d: Dists) -> Tensor:
    return -d.p  # ∂/∂q of -Σ p log q is -p/q


def _rkl_r(d: Dists) -> Tensor:
    return d.q * (d.log_q - d.log_p + 1.0)


def _js_r(d: Dists, beta: float = 0.5) -> Tensor:
    return (1 - beta) * d.q * (d.log_q - _log_mix(d.log_p, d.log_q, beta))  # ∂L/∂q = (1-β) log(q/m)


def _tvd_r(d: Dists) -> Tensor:
    return 0.5 * d.q * torch.sign(d.q - d.p)


def _skl_r(d: Dists, skew_lambda: float = 0.1) -> Tensor:
    log_m = _log_mix(d.log_p, d.log_q, skew_lambda)
    return -(1 - skew_lambda) * _zero_invalid((d.log_p + d.log_q - log_m).exp(), d.valid)  # ∂L/∂q = -(1-λ)p/m


def _srkl_r(d: Dists, skew_lambda: float = 0.1) -> Tensor:
    log_ratio = d.log_q - _log_mix(d.log_p, d.log_q, 1.0 - skew_lambda)
    return d.q * (log_ratio + 1.0 - skew_lambda * log_ratio.exp())  # ∂L/∂q = log(q/m) + 1 - λq/m


def _akl_r(d: Dists, akl_alpha: float = 0.5) -> Tensor:
    w_head, w_tail = akl_weights(d, akl_alpha)
    return w_head[..., None] * _fkl_r(d) + w_tail[..., None] * _rkl_r(d)


# ----------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DivergenceSpec:
    value: Callable[..., Tensor]
    q_grad: Callable[..., Tensor]
    params: dict[str, float]  # parameter names and defaults
    check: Callable[[dict[str, float]], None] = lambda params: None
    columnwise: bool = True
    """The value is Σ_v of a term of entry v alone, and so is r: the fused loss may evaluate it on column blocks.
    False where a quantity of the whole row enters (AKL's tail, from the sorted row)."""


def _check_beta(params: dict[str, float]) -> None:
    if not 0.0 < params["beta"] < 1.0:
        raise ValueError(f"js: beta must be in (0, 1), got {params['beta']}")


def _check_lambda(params: dict[str, float]) -> None:
    if not 0.0 <= params["skew_lambda"] < 1.0:
        raise ValueError(f"skew_lambda must be in [0, 1), got {params['skew_lambda']}")


def _check_alpha(params: dict[str, float]) -> None:
    if not 0.0 <= params["akl_alpha"] <= 1.0:
        raise ValueError(f"akl: akl_alpha must be in [0, 1], got {params['akl_alpha']}")


SPECS: dict[str, DivergenceSpec] = {
    "fkl": DivergenceSpec(_fkl, _fkl_r, {}),
    "rkl": DivergenceSpec(_rkl, _rkl_r, {}),
    "js": DivergenceSpec(_js, _js_r, {"beta": 0.5}, _check_beta),
    "tvd": DivergenceSpec(_tvd, _tvd_r, {}),
    "skl": DivergenceSpec(_skl, _skl_r, {"skew_lambda": 0.1}, _check_lambda),
    "srkl": DivergenceSpec(_srkl, _srkl_r, {"skew_lambda": 0.1}, _check_lambda),
    "akl": DivergenceSpec(_akl, _akl_r, {"akl_alpha": 0.5}, _check_alpha, columnwise=False),
}


def resolve_params(name: str, params: dict[str, float]) -> dict[str, float]:
    """Defaults filled in; unknown parameters and out-of-range values are errors."""
    if name not in SPECS:
        raise ValueError(f"unknown divergence {name!r}; choose from {sorted(SPECS)}")
    spec = SPECS[name]
    unknown = set(params) - set(spec.params)
    if unknown:
        allowed = ", ".join(spec.params) or "none"
        raise ValueError(f"divergence {name!r} takes no parameter {sorted(unknown)} (its parameters: {allowed})")
    full = {**spec.params, **params}
    spec.check(full)
    return full


def log_probs(student_logits: Tensor, teacher_logits: Tensor, temperature: float
              ) -> tuple[Tensor, Tensor, Tensor | None]:
    """(log q, log p, valid) at temperature τ in fp32; `valid` is None when no logit is -inf."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    s = upcast(student_logits) / temperature
    t = upcast(teacher_logits) / temperature
    valid = None
    if torch.isinf(s).any() or torch.isinf(t).any():
        valid = torch.isfinite(s) & torch.isfinite(t)
    return F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), valid


def _public(name: str) -> Callable[..., Tensor]:
    def fn(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, **params: float) -> Tensor:
        full = resolve_params(name, params)
        return SPECS[name].value(Dists(*log_probs(student_logits, teacher_logits, temperature)), **full)

    fn.__name__ = name
    fn.__doc__ = f"Per-token `{name}` divergence: logits [..., V] -> [...] (see dualkd.losses.divergences)."
    return fn


DIVERGENCES: dict[str, Callable[..., Tensor]] = {name: _public(name) for name in SPECS}
"""Name -> function(student_logits, teacher_logits, temperature=1.0, **params) -> per-token values."""


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
    """Divergence `name` between logits [..., V]; `mask` [...] bool marks counted tokens.

    reduction: "none" -> [...] with 0 at masked positions; "sum"; "mean" = sum / counted tokens (0.0 with
    finite zero gradients when nothing is counted).
    """
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; choose from {sorted(DIVERGENCES)}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    if mask is None:
        values = DIVERGENCES[name](student_logits, teacher_logits, temperature=temperature, **params)
        return masked_reduce(values, None, reduction)
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the logits' "
                         f"{tuple(student_logits.shape[:-1])}")
    # only the counted rows are computed: faster, and whatever sits in the other rows (even NaN) cannot leak
    # into values or gradients
    values = DIVERGENCES[name](student_logits[mask], teacher_logits[mask], temperature=temperature, **params)
    if reduction == "none":
        return values.new_zeros(mask.shape).masked_scatter(mask, values)
    return masked_reduce(values, None, reduction)
