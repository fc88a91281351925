"""The loss library against independent float64 references: every divergence (values and gradients), the
identities, masking, temperature, -inf logits, bf16, and the fused chunked path against the plain one."""

from __future__ import annotations

import pytest
import torch

from dualkd.losses import DIVERGENCES, divergence, fused, fused_divergence, masked_reduce, token_cross_entropy
from dualkd.losses.fused import default_chunk_size, fused_argmax, fused_ce_and_divergence
from dualkd.losses.sorted_l1 import fused_sorted_l1

NAMES = ["fkl", "rkl", "js", "tvd", "skl", "srkl", "akl"]


# ------------------------------------------------------------------------------------------- naive twins
# Written from the math, row by row, in float64; autograd through them gives the reference gradients.


def _naive_row(name: str, s: torch.Tensor, t: torch.Tensor, tau: float, **kw: float) -> torch.Tensor:
    keep = torch.isfinite(s) & torch.isfinite(t)  # masked vocabulary entries contribute nothing
    s, t = s / tau, t / tau
    q = torch.exp(s - s[torch.isfinite(s)].max())
    q = q / q.sum()
    p = torch.exp(t - t[torch.isfinite(t)].max())
    p = p / p.sum()
    q, p = q[keep], p[keep]

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return sum((a[i] * (torch.log(a[i]) - torch.log(b[i])) for i in range(len(a)) if a[i] > 0),
                   torch.zeros((), dtype=a.dtype))

    if name == "fkl":
        return kl(p, q)
    if name == "rkl":
        return kl(q, p)
    if name == "js":
        beta = kw.get("beta", 0.5)
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum()
    if name == "skl":
        lam = kw.get("skew_lambda", 0.1)
        return kl(p, lam * p + (1 - lam) * q)
    if name == "srkl":
        lam = kw.get("skew_lambda", 0.1)
        return kl(q, (1 - lam) * p + lam * q)
    if name == "akl":
        alpha = kw.get("akl_alpha", 0.5)
        order = sorted(range(len(p)), key=lambda i: float(p[i].detach()))
        cum, g_head, g_tail = 0.0, 0.0, 0.0
        for i in order:
            cum += float(p[i].detach())
            gap = abs(float(p[i].detach()) - float(q[i].detach()))
            if cum <= alpha:
                g_tail += gap
            else:
                g_head += gap
        total = g_head + g_tail
        w_head = g_head / total if total > 0 else 0.5
        return w_head * kl(p, q) + (1 - w_head) * kl(q, p)
    raise AssertionError(name)


def naive(name: str, s: torch.Tensor, t: torch.Tensor, tau: float = 1.0, **kw: float) -> torch.Tensor:
    flat_s, flat_t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    rows = [_naive_row(name, flat_s[i], flat_t[i], tau, **kw) for i in range(flat_s.shape[0])]
    return torch.stack(rows).reshape(s.shape[:-1])


def _logits(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


# ------------------------------------------------------------------------------------------- plain path


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_values_and_grads_match_naive(name: str, tau: float) -> None:
    s = _logits(3, 5, 23, seed=1).requires_grad_(True)
    t = _logits(3, 5, 23, seed=2)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(3)) > 0.3
    got = divergence(name, s, t, mask=mask, temperature=tau, reduction="none")
    s_ref = s.detach().clone().requires_grad_(True)
    ref = naive(name, s_ref, t, tau) * mask
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-9)
    weights = torch.linspace(0.5, 2.0, 15, dtype=torch.float64).reshape(3, 5)
    (g,) = torch.autograd.grad((got * weights).sum(), s)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), s_ref)
    torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("name,params", [("js", {"beta": 0.2}), ("skl", {"skew_lambda": 0.3}),
                                         ("srkl", {"skew_lambda": 0.25}), ("akl", {"akl_alpha": 0.3})])
def test_parameters_match_naive(name: str, params: dict) -> None:
    s, t = _logits(4, 31, seed=4).requires_grad_(True), _logits(4, 31, seed=5)
    got = divergence(name, s, t, reduction="none", **params)
    torch.testing.assert_close(got, naive(name, s.detach(), t, **params), atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_odd_shape_against_naive(name: str) -> None:
    s, t = _logits(3, 47, 123, seed=6), _logits(3, 47, 123, seed=7)
    mask = torch.rand(3, 47, generator=torch.Generator().manual_seed(8)) > 0.5
    got = divergence(name, s, t, mask=mask, temperature=2.0, reduction="sum")
    ref = (naive(name, s, t, 2.0) * mask).sum()
    torch.testing.assert_close(got, ref, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_inputs(name: str) -> None:
    """bf16 logits are upcast: the result equals the fp64 result on the bf16-rounded logits (tolerance 1e-5),
    and is within 2% of the result on the unrounded logits (bf16 has ~3 significant digits)."""
    s32, t32 = _logits(6, 301, seed=9, dtype=torch.float32), _logits(6, 301, seed=10, dtype=torch.float32)
    s16, t16 = s32.bfloat16(), t32.bfloat16()
    got = divergence(name, s16, t16, reduction="none")
    assert got.dtype == torch.float32
    on_rounded = naive(name, s16.double(), t16.double())
    torch.testing.assert_close(got.double(), on_rounded, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.double(), naive(name, s32.double(), t32.double()), atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("name", NAMES)
def test_zero_when_student_equals_teacher(name: str) -> None:
    x = _logits(4, 9, 50, seed=11).requires_grad_(True)
    v = divergence(name, x, x.detach(), reduction="none")
    assert v.abs().max() < 1e-12
    if name != "tvd":  # |p - q| has a kink at 0
        (g,) = torch.autograd.grad(v.sum(), x)
        assert g.abs().max() < 1e-10


def test_js_symmetric_and_tvd_bounded() -> None:
    a, b = _logits(8, 40, seed=12), _logits(8, 40, seed=13)
    torch.testing.assert_close(divergence("js", a, b, reduction="none"), divergence("js", b, a, reduction="none"))
    tvd = divergence("tvd", a * 5, b * 5, reduction="none")
    assert (tvd >= 0).all() and (tvd <= 1).all()
    far = torch.full((1, 4), -50.0, dtype=torch.float64)
    near = far.clone()
    far[0, 0], near[0, 1] = 50.0, 50.0
    assert divergence("tvd", far, near).item() == pytest.approx(1.0)
    for name in NAMES:
        assert (divergence(name, a, b, reduction="none") >= -1e-12).all()


@pytest.mark.parametrize("name", NAMES)
def test_masked_positions_change_nothing(name: str) -> None:
    s, t = _logits(2, 6, 17, seed=14), _logits(2, 6, 17, seed=15)
    mask = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 1, 1]], dtype=torch.bool)
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = 1e3 * torch.randn_like(s2[~mask])  # garbage where nothing is counted
    t2[~mask] = float("nan")
    outs = []
    for a, b in ((s, t), (s2, t2)):
        a = a.clone().requires_grad_(True)
        v = divergence(name, a, b, mask=mask, reduction="mean")
        (g,) = torch.autograd.grad(v, a)
        outs.append((v, g))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])
    assert outs[1][1][~mask].abs().max() == 0


@pytest.mark.parametrize("name", NAMES)
def test_temperature_scales_logits(name: str) -> None:
    s, t = _logits(5, 29, seed=16), _logits(5, 29, seed=17)
    torch.testing.assert_close(divergence(name, s, t, temperature=3.0, reduction="none"),
                               divergence(name, s / 3.0, t / 3.0, reduction="none"))
    with pytest.raises(ValueError, match="temperature must be positive"):
        divergence(name, s, t, temperature=0.0)


@pytest.mark.parametrize("name", NAMES)
def test_all_masked_is_zero_with_finite_grads(name: str) -> None:
    s = _logits(2, 3, 11, seed=18).requires_grad_(True)
    v = divergence(name, s, _logits(2, 3, 11, seed=19), mask=torch.zeros(2, 3, dtype=torch.bool))
    (g,) = torch.autograd.grad(v, s)
    assert v.item() == 0.0 and torch.isfinite(g).all() and g.abs().sum() == 0


@pytest.mark.parametrize("name", NAMES)
def test_minus_inf_logits(name: str) -> None:
    s, t = _logits(4, 20, seed=20), _logits(4, 20, seed=21)
    s[:, :3] = float("-inf")  # entries masked in both (e.g. padding rows)
    t[:, :3] = float("-inf")
    t[0, 5] = float("-inf")  # masked on one side only
    s[1, 7] = float("-inf")
    s_var = s.clone().requires_grad_(True)
    v = divergence(name, s_var, t, temperature=2.0, reduction="none")
    (g,) = torch.autograd.grad(v.sum(), s_var)
    assert torch.isfinite(v).all() and torch.isfinite(g).all()
    torch.testing.assert_close(v, naive(name, s, t, 2.0), atol=1e-10, rtol=1e-9)
    assert g[:, :3].abs().max() == 0


def test_parameter_validation() -> None:
    s, t = _logits(2, 5), _logits(2, 5, seed=1)
    with pytest.raises(ValueError, match="unknown divergence 'kl2'"):
        divergence("kl2", s, t)
    with pytest.raises(ValueError, match=r"'fkl' takes no parameter \['beta'\]"):
        divergence("fkl", s, t, beta=0.3)
    with pytest.raises(ValueError, match="beta must be in"):
        divergence("js", s, t, beta=1.0)
    with pytest.raises(ValueError, match="skew_lambda must be in"):
        divergence("skl", s, t, skew_lambda=-0.1)
    with pytest.raises(ValueError, match="differ in shape"):
        divergence("fkl", s, _logits(2, 6))
    assert set(DIVERGENCES) == set(NAMES)


def test_masked_reduce_and_cross_entropy() -> None:
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    m = torch.tensor([[True, False], [True, True]])
    assert masked_reduce(v, m, "sum").item() == 8.0
    assert masked_reduce(v, m, "mean").item() == pytest.approx(8 / 3)
    assert masked_reduce(v, m, "none").tolist() == [[1.0, 0.0], [3.0, 4.0]]
    logits = _logits(2, 4, 9, seed=22)
    labels = torch.randint(0, 9, (2, 4), generator=torch.Generator().manual_seed(0))
    ref = -torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    mask = torch.tensor([[False, True, True, False], [True, True, True, True]])
    assert token_cross_entropy(logits, labels, mask, "sum").item() == pytest.approx(ref[mask].sum().item())
    torch.testing.assert_close(token_cross_entropy(logits, labels, mask, "none"), ref * mask)


# ------------------------------------------------------------------------------------------- fused path


def _fused_inputs(n: int, ds: int, dt: int, V: int, dtype: torch.dtype = torch.float64, bias: bool = False):
    g = torch.Generator().manual_seed(n * 7 + V)
    hs = torch.randn(n, ds, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    ws = (torch.randn(V, ds, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_(True)
    ht = torch.randn(n, dt, generator=g, dtype=torch.float64).to(dtype)
    wt = (torch.randn(V, dt, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_(True)
    bs = (torch.randn(V, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(True) if bias else None
    bt = (torch.randn(V, generator=g, dtype=torch.float64)).to(dtype) if bias else None
    mask = torch.rand(n, generator=g) > 0.25
    return hs, ws, bs, ht, wt, bt, mask


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("chunk_size", [1, 7, 16, None])
def test_fused_equals_plain(name: str, chunk_size: int | None) -> None:
    hs, ws, bs, ht, wt, bt, mask = _fused_inputs(45, 12, 20, 97, bias=True)
    for reduction in ("mean", "sum", "none"):
        plain = divergence(name, hs @ ws.T + bs, ht @ wt.T + bt, mask=mask, temperature=2.0, reduction=reduction)
        fused = fused_divergence(name, hs, ws, ht, wt, mask=mask, temperature=2.0, reduction=reduction,
                                 chunk_size=chunk_size, student_bias=bs, teacher_bias=bt)
        torch.testing.assert_close(fused, plain, atol=1e-12, rtol=1e-10)
        w = torch.linspace(0.1, 1.0, 45, dtype=torch.float64) if reduction == "none" else torch.ones(())
        g_plain = torch.autograd.grad((plain * w).sum(), (hs, ws, bs))
        g_fused = torch.autograd.grad((fused * w).sum(), (hs, ws, bs))
        for a, b in zip(g_fused, g_plain):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9)


def test_fused_teacher_gets_no_gradient_and_inputs_can_be_3d() -> None:
    hs, ws, _, ht, wt, _, _ = _fused_inputs(24, 8, 8, 33)
    ht = ht.clone().requires_grad_(True)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 2:] = False
    v = fused_divergence("js", hs.reshape(4, 6, 8), ws, ht.reshape(4, 6, 8), wt, mask=mask)
    v.backward()
    assert ht.grad is None and wt.grad is None and hs.grad is not None
    ref = divergence("js", hs.reshape(4, 6, 8) @ ws.T, ht.reshape(4, 6, 8) @ wt.T, mask=mask)
    torch.testing.assert_close(v, ref)


@pytest.mark.parametrize("name", ["fkl", "rkl", "js"])
def test_fused_bf16_matches_plain_bf16(name: str) -> None:
    hs, ws, _, ht, wt, _, mask = _fused_inputs(40, 32, 32, 257, dtype=torch.bfloat16)
    plain = divergence(name, hs @ ws.T, ht @ wt.T, mask=mask)
    fused = fused_divergence(name, hs, ws, ht, wt, mask=mask, chunk_size=9)
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-3)
    g_plain = torch.autograd.grad(plain, (hs, ws))
    g_fused = torch.autograd.grad(fused, (hs, ws))
    for a, b in zip(g_fused, g_plain):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), atol=2e-3, rtol=5e-2)


def test_fused_all_masked_and_minus_inf_bias() -> None:
    hs, ws, bs, ht, wt, bt, _ = _fused_inputs(10, 6, 6, 21, bias=True)
    v = fused_divergence("fkl", hs, ws, ht, wt, mask=torch.zeros(10, dtype=torch.bool))
    v.backward()
    assert v.item() == 0.0 and hs.grad.abs().sum() == 0
    bs2, bt2 = bs.detach().clone(), bt.clone()
    bs2[:4] = float("-inf")  # masked vocabulary
    bt2[:4] = float("-inf")
    bs2.requires_grad_(True)
    for name in NAMES:
        f = fused_divergence(name, hs, ws, ht, wt, student_bias=bs2, teacher_bias=bt2, chunk_size=3)
        p = divergence(name, hs @ ws.T + bs2, ht @ wt.T + bt2)
        torch.testing.assert_close(f, p)
        gf = torch.autograd.grad(f, (hs, ws))
        gp = torch.autograd.grad(p, (hs, ws))
        for a, b in zip(gf, gp):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b)


def test_fused_ce_and_divergence_mixes_ce_and_divergence_over_the_shared_vocab() -> None:
    hs, ws, _, ht, wt, _, _ = _fused_inputs(30, 10, 14, 60)
    labels = torch.randint(0, 50, (30,), generator=torch.Generator().manual_seed(1))
    wt_small = wt.detach()[:50]  # teacher head: 50 rows; student head: 60 (padding rows)
    loss, ce, kd, hits = fused_ce_and_divergence(hs, ws, ht, wt_small, labels, divergence="skl", ce_weight=0.7,
                                                 div_weight=0.3, temperature=2.0, vocab_size=50, chunk_size=7,
                                                 params={"skew_lambda": 0.2})
    z = hs @ ws.T
    ce_ref = torch.nn.functional.cross_entropy(z, labels, reduction="sum")
    kd_ref = divergence("skl", z[:, :50], ht @ wt_small.T, temperature=2.0, reduction="sum", skew_lambda=0.2)
    ref = 0.7 * ce_ref + 0.3 * kd_ref
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(ce, ce_ref.detach())
    torch.testing.assert_close(kd, kd_ref.detach())
    assert hits.item() == (z.argmax(-1) == labels).sum().item()
    g = torch.autograd.grad(loss, (hs, ws))
    g_ref = torch.autograd.grad(ref, (hs, ws))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_default_chunk_size() -> None:
    assert default_chunk_size(4096, 262144) == 64
    assert default_chunk_size(4096, 32000) == 524
    assert default_chunk_size(10, 32000) == 10
    assert default_chunk_size(100000, 1000) == 1024
    assert default_chunk_size(4096, 151936) == 110


def test_fused_ce_and_divergence_with_row_mask() -> None:
    from dualkd.losses.fused import fused_ce_and_divergence

    hs, ws, _, ht, wt, _, mask = _fused_inputs(33, 10, 12, 40)
    labels = torch.randint(0, 40, (33,), generator=torch.Generator().manual_seed(3))
    loss, ce, div, _ = fused_ce_and_divergence(hs, ws, ht, wt.detach(), labels, divergence="js", ce_weight=0.25,
                                               div_weight=0.125, div_mask=mask, temperature=2.0, chunk_size=8)
    z = hs @ ws.T
    ce_ref = torch.nn.functional.cross_entropy(z, labels, reduction="sum")
    div_ref = divergence("js", z, ht @ wt.detach().T, mask=mask, temperature=2.0, reduction="sum")
    ref = 0.25 * ce_ref + 0.125 * div_ref
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(div, div_ref.detach())
    for a, b in zip(torch.autograd.grad(loss, (hs, ws)), torch.autograd.grad(ref, (hs, ws))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_fused_column_blocks_match_plain(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The divergence's elementwise work runs on column blocks (2 columns each here; ~1 MiB at real sizes),
    AKL on whole rows: the same value and gradients as the plain formula, with masks and a -inf bias."""
    monkeypatch.setattr(fused, "_BLOCK_ELEMENTS", 8)
    hs, ws, bs, ht, wt, bt, mask = _fused_inputs(24, 6, 6, 21, bias=True)
    bs2, bt2 = bs.detach().clone(), bt.clone()
    bs2[:2] = float("-inf")
    bt2[:2] = float("-inf")
    bs2.requires_grad_(True)
    f = fused_divergence(name, hs, ws, ht, wt, mask=mask, student_bias=bs2, teacher_bias=bt2, chunk_size=4,
                         temperature=2.0)
    p = divergence(name, hs @ ws.T + bs2, ht @ wt.T + bt2, mask=mask, temperature=2.0)
    torch.testing.assert_close(f, p)
    for a, b in zip(torch.autograd.grad(f, (hs, ws, bs2)), torch.autograd.grad(p, (hs, ws, bs2))):
        torch.testing.assert_close(a, b)


def test_fused_argmax_is_torchs_with_ties_nan_and_minus_inf(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU argmax (max, equality mask, first index; here at any size) returns what torch.argmax does: the
    first maximum, the NaN of a row that holds one, index 0 of an all -inf row."""
    monkeypatch.setattr(fused, "_ARGMAX_MIN_ROWS", 1)
    monkeypatch.setattr(fused, "_ARGMAX_MIN_SIZE", 1)
    g = torch.Generator().manual_seed(0)
    head = torch.randn(40, 8, generator=g)
    head[30] = head[7]  # every row's logits tie at 7 and 30
    hidden = torch.randn(13, 8, generator=g)
    bias = torch.zeros(40)
    bias[7] = bias[30] = 50.0  # ... and there is the maximum
    assert (fused_argmax(hidden, head, bias, chunk_size=5) == 7).all()
    bias[12] = float("nan")
    assert torch.equal(fused_argmax(hidden, head, bias, chunk_size=5), torch.full((13,), 12))
    z = torch.randn(40, 6, generator=g).t()  # [c, V] view of a [V, c] buffer, as the fused passes make
    z[2] = float("-inf")
    z[3, 9] = z[3].max() + 1.0
    z[3, 4] = z[3, 9]
    z[4, 5] = float("nan")
    assert torch.equal(fused._argmax(z, fused._Scratch()), z.argmax(-1))


def _sorted_l1_naive(hs, ws, bs, ht, wt, bt):
    """ULD's distance as written (autograd through both sorts), the fused path's naive twin."""
    q = torch.softmax(hs @ ws.T + bs, -1).sort(-1, descending=True).values
    p = torch.softmax(ht @ wt.T + bt, -1).sort(-1, descending=True).values
    width = max(q.shape[-1], p.shape[-1])
    pad = torch.nn.functional.pad
    return (pad(q, (0, width - q.shape[-1])) - pad(p, (0, width - p.shape[-1]))).abs().sum()


@pytest.mark.parametrize("v_s,v_t", [(40, 300), (300, 40), (64, 64)], ids=["teacher-wider", "student-wider", "same"])
@pytest.mark.parametrize("chunk", [None, 3])
def test_fused_sorted_l1_is_the_sorted_distance(v_s: int, v_t: int, chunk: int | None) -> None:
    """Value and the gradients of hidden, head and bias against the naive formula in float64: the teacher's
    top-V_s + its remaining mass, and the analytic gradient through the sort and the softmax."""
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(10, 6, generator=g, dtype=torch.float64, requires_grad=True)
    ws = (2 * torch.randn(v_s, 6, generator=g, dtype=torch.float64)).requires_grad_()
    bs = torch.randn(v_s, generator=g, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(10, 5, generator=g, dtype=torch.float64)
    wt = 2 * torch.randn(v_t, 5, generator=g, dtype=torch.float64)
    bt = torch.randn(v_t, generator=g, dtype=torch.float64)
    got = fused_sorted_l1(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, chunk_size=chunk)
    want = _sorted_l1_naive(hs, ws, bs, ht, wt, bt)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(3.0 * got, (hs, ws, bs)), torch.autograd.grad(3.0 * want, (hs, ws, bs))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
