"""MinED: the teacher -> student vocabulary map (one teacher logit reaches at most one student id, on real
tokenizers) and the objective against the formula of methods/mined.py's docstring, in float64:

    aligned pair (j, i): DTW pairs student position j with teacher position i alone, and to_student[y_t,i] = y_j
    target_j = softmax(z̃_t,i / τ), z̃_t,i[s] = z_t,i[partner(s)] (−1e5 where s has no partner)  at aligned j
             = the official pseudo one-hot: softmax([100 at y_j, −1e5 elsewhere] / τ)              elsewhere
    L = (1 − r)·CE(z_s, y)/n + r·Σ_j KL(target_j ‖ softmax(z_s,j / τ))/n
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dualkd.align.mined import mined_vocab_map
from dualkd.align.vocab import bytes_index, token_bytes
from tests.helpers import needs_real_models, student_run
from tests.methods.harness import assert_split_invariant, assert_twin, build64, ce, forward, implementation


def mined_twin(parts, batch, partner: torch.Tensor, to_student: torch.Tensor) -> torch.Tensor:
    cfg = parts.objective.config
    s_tok, t_tok = batch.student, batch.teacher
    z_s = forward(parts.student, s_tok)[0]
    with torch.no_grad():
        z_t = forward(parts.teacher.model, t_tok)[0]
    V_s = z_s.shape[-1]
    al = batch.alignment
    valid = to_student[t_tok.labels[al.batch_index, al.teacher_pos]] == s_tok.labels[al.batch_index, al.student_pos]
    m = s_tok.loss_mask
    # the official pseudo one-hot everywhere, then the re-indexed teacher at the aligned positions
    target = torch.full(z_s.shape, -1e5, dtype=torch.float64).scatter(-1, s_tok.labels[..., None], 100.0)
    mapped = partner[:V_s] >= 0
    for b, j, i in zip(al.batch_index[valid], al.student_pos[valid], al.teacher_pos[valid]):
        target[b, j] = torch.where(mapped, z_t[b, i][partner[:V_s].clamp(min=0)], -1e5)
    tau, r, n = cfg.temperature, cfg.kd_rate, m.sum()
    log_p, log_q = torch.log_softmax(target[m] / tau, -1), torch.log_softmax(z_s[m] / tau, -1)
    kd = (torch.xlogy(log_p.exp(), log_p.exp()) - log_p.exp() * log_q).sum()
    return (1 - r) * ce(z_s[m], s_tok.labels[m]) / n + r * kd / n


@pytest.mark.parametrize("objective", [{"name": "mined", "temperature": 2.0}, {"name": "mined", "kd_rate": 0.3}],
                         ids=["tau2", "tau1"])
def test_mined_is_its_formula(objective: dict, tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path,
                              cross_teacher: Path) -> None:
    parts = build64(student_run(tmp_path, train_file, byte_tokenizer_dir, cross_teacher, objective), tmp_path)
    vocab = mined_vocab_map(parts.student_tokenizer, parts.teacher_tokenizer)
    batch = parts.train_set.collate(list(range(8)))
    valid = parts.objective.teacher_forward(parts.teacher, batch)
    assert 0 < len(valid.batch_index) < int(batch.student.loss_mask.sum())  # both kinds of positions occur
    loss, grads = implementation(parts, [list(range(8))])
    assert_twin(parts, loss, grads, mined_twin(parts, batch, vocab.partner, vocab.to_student))
    assert_split_invariant(parts)


def _check_one_to_one(student_tok, teacher_tok) -> tuple[torch.Tensor, torch.Tensor]:
    vocab = mined_vocab_map(student_tok, teacher_tok)
    partner, to_student = vocab.partner, vocab.to_student
    mapped = torch.nonzero(partner >= 0).squeeze(1)
    # no teacher logit reaches two student ids, and each partner names its student id
    assert partner[mapped].unique().numel() == mapped.numel()
    assert torch.equal(to_student[partner[mapped]], mapped)
    # the KD target of a student id is its partner's teacher probability, renormalized over the mapped ids
    z_t = torch.randn(2, len(teacher_tok), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p_t = torch.softmax(z_t, -1)
    reindexed = torch.full((2, len(student_tok)), -1e5, dtype=torch.float64)
    reindexed[:, mapped] = z_t[:, partner[mapped]]
    target = torch.softmax(reindexed, -1)
    expected = p_t[:, partner[mapped]] / p_t[:, partner[mapped]].sum(-1, keepdim=True)
    torch.testing.assert_close(target[:, mapped], expected)
    # an exact-bytes partner wins wherever one exists (for the student id the tokenizer produces for those
    # bytes: a SentencePiece byte piece `<0x21>` beside the token `!` gets no partner, `!` gets the teacher's)
    t_bytes, s_bytes, s_index = token_bytes(teacher_tok), token_bytes(student_tok), bytes_index(student_tok)
    t_set = set(t_bytes)
    exact = [s for b, s in s_index.items() if b in t_set]
    assert exact and all(t_bytes[int(partner[s])] == s_bytes[s] for s in exact)
    return partner, to_student


@pytest.mark.slow
def test_real_tokenizers_one_teacher_logit_per_student_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPT-2 <- Mistral (SentencePiece, 32k) and Mistral <- GPT-2: what made the old student -> teacher map wrong
    (`▁the` nearest to `Ġthe`, `Ġthre`, `Ġthee`...; `.` and the byte piece `<0x2E>`) now has one partner."""
    from transformers import AutoTokenizer

    real = needs_real_models()
    monkeypatch.setenv("DUALKD_CACHE", str(tmp_path))
    gpt2 = AutoTokenizer.from_pretrained(real / "tokenizers" / "gpt2")
    mistral = AutoTokenizer.from_pretrained(real / "tokenizers" / "mistral-sp32k")
    partner, _ = _check_one_to_one(gpt2, mistral)  # student GPT-2, teacher Mistral
    the_t = mistral.convert_tokens_to_ids("▁the")
    assert int(partner[gpt2.convert_tokens_to_ids("Ġthe")]) == the_t
    assert (partner == the_t).sum() == 1
    partner, _ = _check_one_to_one(mistral, gpt2)  # student Mistral, teacher GPT-2
    dot = gpt2.convert_tokens_to_ids(".")
    assert int(partner[mistral.convert_tokens_to_ids(".")]) == dot
    assert int(partner[mistral.convert_tokens_to_ids("<0x2E>")]) != dot
