"""The losses the foundation uses (CE, forward KL, masked reduction) against float64 naive references."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dualkd.losses import divergence, masked_reduce, token_cross_entropy


def _naive_fkl(s: torch.Tensor, t: torch.Tensor, tau: float) -> torch.Tensor:
    out = torch.zeros(s.shape[:-1], dtype=torch.float64)
    for idx in itertools.product(*(range(n) for n in s.shape[:-1])):
        p = torch.softmax(t[idx].double() / tau, -1)
        logq = torch.log_softmax(s[idx].double() / tau, -1)
        out[idx] = sum(float(p[v]) * (math.log(float(p[v])) - float(logq[v])) for v in range(s.shape[-1])
                       if p[v] > 0)
    return out


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_fkl_matches_naive_values_and_grads(tau: float) -> None:
    torch.manual_seed(0)
    s = torch.randn(3, 5, 17, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, 17, dtype=torch.float64)
    mask = torch.rand(3, 5) > 0.3
    got = divergence("fkl", s, t, mask=mask, temperature=tau, reduction="none")
    ref = _naive_fkl(s.detach(), t, tau) * mask
    torch.testing.assert_close(got, ref)
    # gradient of the mean: d/ds KL(p||q) = (q - p) / tau, averaged over counted tokens
    divergence("fkl", s, t, mask=mask, temperature=tau, reduction="mean").backward()
    q, p = torch.softmax(s.detach() / tau, -1), torch.softmax(t / tau, -1)
    expected = (q - p) / tau * mask[..., None] / mask.sum()
    torch.testing.assert_close(s.grad, expected)


def test_fkl_identities_and_inf() -> None:
    x = torch.randn(4, 11)
    assert divergence("fkl", x, x, reduction="sum").abs() < 1e-6
    t = x.clone()
    t[:, :3] = float("-inf")  # masked vocabulary entries
    s = x.clone().requires_grad_(True)
    v = divergence("fkl", s, t)
    v.backward()
    assert torch.isfinite(v) and torch.isfinite(s.grad).all()


def test_all_masked_mean_is_zero_with_finite_grads() -> None:
    s = torch.randn(2, 3, 7, requires_grad=True)
    v = divergence("fkl", s, torch.randn(2, 3, 7), mask=torch.zeros(2, 3, dtype=torch.bool))
    v.backward()
    assert v.item() == 0.0 and torch.isfinite(s.grad).all() and s.grad.abs().sum() == 0


def test_masked_reduce() -> None:
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    m = torch.tensor([[True, False], [True, True]])
    assert masked_reduce(v, m, "sum").item() == 8.0
    assert masked_reduce(v, m, "mean").item() == pytest.approx(8 / 3)
    assert masked_reduce(v, m, "none").tolist() == [[1.0, 0.0], [3.0, 4.0]]
    with pytest.raises(ValueError, match="unknown reduction"):
        masked_reduce(v, m, "avg")  # type: ignore[arg-type]


def test_token_cross_entropy() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 9, dtype=torch.float64)
    labels = torch.randint(0, 9, (2, 4))
    mask = torch.tensor([[False, True, True, False], [True, True, True, True]])
    ref = -torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    assert token_cross_entropy(logits, labels, mask, "sum").item() == pytest.approx(ref[mask].sum().item())
    assert token_cross_entropy(logits, labels, mask, "mean").item() == pytest.approx(ref[mask].mean().item())
    torch.testing.assert_close(token_cross_entropy(logits, labels, mask, "none"), ref * mask)


def test_unknown_divergence() -> None:
    with pytest.raises(ValueError, match="unknown divergence 'nope'"):
        divergence("nope", torch.zeros(1, 2), torch.zeros(1, 2))
