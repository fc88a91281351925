"""CBMI adaptive training against the formula of methods/cbmi.py's docstring, in float64, sentence by sentence:

    CBMI_t = log p_NMT(y_t) − log p_LM(y_t)        (compat: − log(p_LM(y_t) + 1e-9))
    w_tok = max(0, 1 + λ_tok·(CBMI_t − μ_s)/σ_s),  μ_s, σ_s over sentence s's n_s target tokens
    w_snt = max(0, 1 + λ_snt·(μ_s − μ_B)/σ_B),     μ_B, σ_B over the batch's sentences
    σ = sqrt(Σ dev² / n + ε)                       (compat: sqrt(Σ dev² / T), T the padded length)
    L = Σ_t w_tok·w_snt·CE_ls(NMT) + λ_LM·Σ_t CE_ls(LM)   / target tokens;   w = 1 before `pretrain_steps`

The sentence weights normalize over the micro-batch (the paper's batch statistics), so an update equals its
micro-batch split only where they are off: before the switch, or with λ_snt = 0 (and not compat, whose σ
divides by the padded length).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dualkd.lm import lm_forward
from dualkd.methods.base import StepNorm
from dualkd.methods.cbmi import cbmi_values
from dualkd.train.build import build_parts
from dualkd.train.engine import LocalEngine
from dualkd.train.loop import train
from tests.helpers import marian_run, nmt_run, read_metrics
from tests.methods.harness import assert_split_invariant, assert_twin, build64, implementation


def ce_ls(logits: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    log_q = torch.log_softmax(logits, -1)
    return (1 - eps) * -log_q.gather(-1, y[:, None]).squeeze(-1) - eps * log_q.mean(-1)


def cbmi_twin(parts, batch, weighting: bool) -> torch.Tensor:
    cfg, lm = parts.objective.config, parts.objective.lm
    tok, model = batch.student, parts.student
    m, y = tok.loss_mask, tok.labels
    start = torch.full_like(y[:, :1], model.config.decoder_start_token_id)
    decoder_inputs = torch.cat([start, y.masked_fill(~m, model.config.pad_token_id)[:, :-1]], 1)
    z_nmt = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask, decoder_input_ids=decoder_inputs).logits
    with torch.set_grad_enabled(not (weighting and cfg.freeze_lm)):
        z_lm = lm(input_ids=decoder_inputs).logits[..., : len(parts.student_tokenizer)]
    T, eps = y.shape[1], cfg.eps
    loss, mus, rows = 0.0, [], []
    for b in range(y.shape[0]):
        yb = y[b, m[b]]
        log_nmt = torch.log_softmax(z_nmt[b, m[b]].detach(), -1).gather(-1, yb[:, None]).squeeze(-1)
        p_lm = torch.softmax(z_lm[b, m[b]].detach(), -1).gather(-1, yb[:, None]).squeeze(-1)
        cbmi = log_nmt - torch.log(p_lm + 1e-9 if cfg.compat else p_lm)
        mu = cbmi.mean()
        sigma = ((cbmi - mu).pow(2).sum() / T).sqrt() if cfg.compat else ((cbmi - mu).pow(2).mean() + eps).sqrt()
        mus.append(mu)
        rows.append((torch.relu(1 + cfg.token_scale * (cbmi - mu) / sigma), ce_ls(z_nmt[b, m[b]], yb,
                                                                                  cfg.label_smoothing)))
        loss = loss + cfg.lm_rate * ce_ls(z_lm[b, m[b]], yb, cfg.label_smoothing).sum()
    mu_b = torch.stack(mus).mean()
    dev2 = (torch.stack(mus) - mu_b).pow(2).sum()
    sigma_b = (dev2 / T).sqrt() if cfg.compat else (dev2 / len(mus) + eps).sqrt()
    for mu, (w_tok, ce) in zip(mus, rows):
        w = w_tok * torch.relu(1 + cfg.sentence_scale * (mu - mu_b) / sigma_b) if weighting else 1.0
        loss = loss + (w * ce).sum()
    return loss / m.sum()


CASES = {"default": {"name": "cbmi", "pretrain_steps": 2},
         "compat": {"name": "cbmi", "pretrain_steps": 2, "compat": True, "token_scale": 0.5},
         "lm_trained": {"name": "cbmi", "pretrain_steps": 2, "freeze_lm": False, "sentence_scale": 0.0,
                        "lm_rate": 0.5}}


@pytest.mark.parametrize("step", [0, 2], ids=["phase1", "phase2"])
@pytest.mark.parametrize("case", list(CASES))
def test_cbmi_is_its_formula(case: str, step: int, tmp_path: Path, mt_pairs: Path, byte_tokenizer_dir: Path) -> None:
    parts = build64(marian_run(tmp_path, mt_pairs, byte_tokenizer_dir, None, CASES[case]), tmp_path)
    if case == "compat":  # a peaked LM, so that p_LM(gold) < 1e-9 occurs and the official floor matters
        with torch.no_grad():
            parts.objective.lm.transformer.ln_f.weight.mul_(40.0)
    weighting = step >= CASES[case]["pretrain_steps"]
    loss, grads = implementation(parts, [list(range(8))], step=step)
    twin = cbmi_twin(parts, parts.train_set.collate(list(range(8))), weighting)
    assert_twin(parts, loss, grads, twin)
    lm_grads = [g for k, g in grads.items() if k.startswith("objective.lm.")]
    lm_trained = not weighting or not parts.objective.config.freeze_lm
    assert lm_grads and any(g.abs().max() > 0 for g in lm_grads) == lm_trained
    if not weighting or (parts.objective.config.sentence_scale == 0 and not parts.objective.config.compat):
        assert_split_invariant(parts, step=step)


def test_weights_are_not_all_one(tmp_path: Path, mt_pairs: Path, byte_tokenizer_dir: Path) -> None:
    """After the switch the weights move away from 1 (else the twin above would not test them)."""
    parts = build64(marian_run(tmp_path, mt_pairs, byte_tokenizer_dir, None, CASES["default"]), tmp_path)
    before = implementation(parts, [list(range(8))], step=0)[0]
    after = implementation(parts, [list(range(8))], step=2)[0]
    assert abs(float((before - after).detach())) > 1e-4


def test_compat_floor_where_p_lm_is_tiny() -> None:
    """Where p_LM(gold) ≈ 1e-10 the official +1e-9 changes CBMI by about log(11): compat has it, exact does not.
    (A random LM gives p_LM ≈ 1/V, where the floor is below the twin's tolerance: hence the peaked LM above.)"""
    nmt = torch.zeros(1, 1, 4, dtype=torch.float64)
    lm = torch.tensor([[[0.0, -23.0, 0.0, 0.0]]], dtype=torch.float64)  # p_LM(1) ≈ 1e-10 / 3
    y = torch.tensor([[1]])
    p_lm = torch.softmax(lm, -1)[0, 0, 1]
    exact, compat = cbmi_values(nmt, lm, y), cbmi_values(nmt, lm, y, lm_floor=1e-9)
    log_nmt = torch.log(torch.tensor(0.25, dtype=torch.float64))
    torch.testing.assert_close(exact[0, 0], log_nmt - torch.log(p_lm))
    torch.testing.assert_close(compat[0, 0], log_nmt - torch.log(p_lm + 1e-9))
    assert float(exact - compat) > 2.0


def test_cbmi_weights() -> None:
    from dualkd.methods.cbmi import cbmi_weights

    g = torch.Generator().manual_seed(0)
    c = torch.randn(4, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]]).bool()
    w = cbmi_weights(c, mask, 0.1, 0.3)
    assert bool((w >= 0).all()) and not w.requires_grad and torch.isfinite(w).all()  # one-token row: no NaN
    assert bool((w[~mask] == 0).all())
    # the normalized CBMI has mean 0 in each sentence: with λ_sent = 0 the token weights average to 1
    w_tok = cbmi_weights(c, mask, 0.1, 0.0)
    assert torch.allclose((w_tok * mask).sum(-1) / mask.sum(-1), torch.ones(4), atol=1e-5)
    assert torch.equal(cbmi_weights(c, mask, 0.0, 0.0), mask.float())  # λ = 0: plain CE
    # compat: the official denominators (padded length T = 6, no ε) on a hand-checked row and the batch
    row = torch.tensor([[1.0, 2.0, 4.0, 0.0, 0.0, 0.0]])
    mask_row = torch.tensor([[1, 1, 1, 0, 0, 0]]).bool()
    two = torch.cat([row, torch.tensor([[3.0, 3.0, 3.0, 3.0, 3.0, 3.0]])])
    two_mask = torch.cat([mask_row, torch.ones(1, 6, dtype=torch.bool)])
    w_c = cbmi_weights(two, two_mask, 1.0, 1.0, compat=True)
    mu, sigma = 7 / 3, (((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 6) ** 0.5
    mu_b = (7 / 3 + 3) / 2
    sigma_b = (((7 / 3 - mu_b) ** 2 + (3 - mu_b) ** 2) / 6) ** 0.5
    expected = max(0.0, 1 + (1 - mu) / sigma) * max(0.0, 1 + (7 / 3 - mu_b) / sigma_b)
    assert float(w_c[0, 0]) == pytest.approx(expected, rel=1e-5)
    one = cbmi_weights(torch.tensor([[2.0, 0.0]]), torch.tensor([[True, False]]), 0.1, 0.3, compat=True)
    assert torch.isnan(one).any()  # what the official code does on a one-token sentence

def test_cbmi_switch_and_frozen_lm(tmp_path: Path, nmt_pairs: tuple[Path, Path], byte_tokenizer_dir: Path) -> None:
    cfg = nmt_run(tmp_path / "cbmi", nmt_pairs, byte_tokenizer_dir, {"name": "cbmi", "pretrain_steps": 3},
               optimization={"max_steps": 6})
    parts = build_parts(cfg, tmp_path, LocalEngine())
    obj, student = parts.objective, parts.student
    batch = parts.train_set.collate([0, 1, 2])
    n = float(batch.student.loss_mask.sum())
    for step, weighted in ((0, False), (2, False), (3, True), (5, True)):
        obj.zero_grad(set_to_none=True)
        student.zero_grad(set_to_none=True)
        loss, metrics = obj(student, batch, None, StepNorm({"tokens": n}, step=step))
        loss.backward()
        lm_grads = [p.grad for p in obj.lm.parameters()]
        assert float(metrics["weighting"]) == pytest.approx(float(weighted))
        if not weighted:
            assert float(metrics["weight"]) == pytest.approx(1.0)  # w = 1 before the switch
        assert all(g is None for g in lm_grads) == weighted  # the LM is frozen after it
        assert any(p.grad is not None for p in student.parameters())
    # λ = 0 and before the switch: label-smoothed CE of the NMT model + 0.01 x the LM's
    from dualkd.losses.cross_entropy import label_smoothed_cross_entropy

    student.eval()
    obj.lm.eval()
    loss, _ = obj(student, batch, None, StepNorm({"tokens": n}, step=0))
    tokens = batch.student
    nmt = label_smoothed_cross_entropy(lm_forward(student, tokens).logits, tokens.labels, tokens.loss_mask, 0.1)
    dec = student.prepare_decoder_input_ids_from_labels(labels=tokens.labels.masked_fill(~tokens.loss_mask, -100))
    lm = label_smoothed_cross_entropy(obj.lm(input_ids=dec).logits, tokens.labels, tokens.loss_mask, 0.1)
    assert float(loss.detach()) == pytest.approx(float((nmt.sum() + 0.01 * lm.sum()).detach() / n), rel=1e-5)
    records = read_metrics(train(cfg))  # and the whole run, with the switch at step 3
    assert len(records) == 6 and all(math.isfinite(r["loss"]) for r in records)
    assert [r["weighting"] for r in records] == pytest.approx([0.0] * 3 + [1.0] * 3)
