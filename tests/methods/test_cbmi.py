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

from pathlib import Path

import pytest
import torch

from dualkd.methods.cbmi import cbmi_values
from tests.methods.conftest import marian_run
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
