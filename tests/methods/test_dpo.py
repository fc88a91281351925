"""DPO and reverse DPO against the formula of methods/dpo.py's docstring, in float64, pair by pair:

    log π(y|x) = Σ_t log softmax(z_t)[y_t] over the response tokens (+ EOS), from the dense logits
    L = (1/P)·Σ_pairs −log σ(β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))])
    reverse DPO (`swap_pairs`): y_w and y_l exchanged
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dualkd.config import validate_config
from dualkd.data.preferences import pairs_of
from dualkd.losses.policy import (
    dpo_loss,
    sequence_logprobs,
)
from dualkd.methods.base import StepNorm
from dualkd.train.build import build_parts
from dualkd.train.engine import LocalEngine
from tests.helpers import student_run, tiny_run
from tests.methods.harness import assert_split_invariant, assert_twin, build64, forward, implementation


def sequence_logprob(model, tokens, row: int) -> torch.Tensor:
    m = tokens.loss_mask[row]
    logits = forward(model, tokens)[0][row, m]
    return torch.log_softmax(logits, -1).gather(-1, tokens.labels[row, m][:, None]).sum()


def dpo_twin(parts, batch) -> torch.Tensor:
    cfg, tokens, P = parts.objective.config, batch.student, pairs_of(batch)
    loss = 0.0
    for i in range(P):
        w, l_ = (P + i, i) if cfg.swap_pairs else (i, P + i)  # chosen rows first, their rejected rows after
        with torch.no_grad():
            ref = parts.teacher.model
            ref_w, ref_l = sequence_logprob(ref, tokens, w), sequence_logprob(ref, tokens, l_)
        pi_w, pi_l = sequence_logprob(parts.student, tokens, w), sequence_logprob(parts.student, tokens, l_)
        loss = loss - F.logsigmoid(cfg.beta * ((pi_w - ref_w) - (pi_l - ref_l)))
    return loss / P


@pytest.mark.parametrize("objective", [{"name": "dpo"}, {"name": "dpo", "swap_pairs": True, "beta": 0.5},
                                       {"name": "dpo", "chunk_size": 3}], ids=["dpo", "reverse", "chunk3"])
def test_dpo_is_its_formula(objective: dict, tmp_path: Path, preference_pairs: Path, byte_tokenizer_dir: Path,
                            teacher_dir: Path) -> None:
    parts = build64(student_run(tmp_path, preference_pairs, byte_tokenizer_dir, teacher_dir, objective), tmp_path)
    batch = parts.train_set.collate(list(range(8)))
    assert pairs_of(batch) == 8 and batch.student.input_ids.shape[0] == 16
    loss, grads = implementation(parts, [list(range(8))])
    assert_twin(parts, loss, grads, dpo_twin(parts, batch))
    assert_split_invariant(parts)


def test_dpo_loss_hand_computed() -> None:
    loss, rc, rr = dpo_loss(torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.5]),
                            beta=0.5)
    # rewards: 0.5·(−3 + 4) = 0.5 and 0.5·(−5 + 4.5) = −0.25; loss = −log σ(0.75) = log(1 + e^−0.75)
    assert float(rc) == pytest.approx(0.5) and float(rr) == pytest.approx(-0.25)
    assert float(loss) == pytest.approx(0.3868710, abs=1e-6)
    logits = torch.randn(2, 4, 7)
    labels, mask = torch.randint(0, 7, (2, 4)), torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    expected = [sum(F.log_softmax(logits[b, t], -1)[labels[b, t]] for t in range(4) if mask[b, t]) for b in range(2)]
    assert torch.allclose(sequence_logprobs(logits, labels, mask), torch.stack(expected))

def test_dpo_swap_pairs_flips_the_preference(tmp_path: Path, prefs: tuple[Path, Path], byte_tokenizer_dir: Path,
                                             teacher_dir: Path, reverse_model: Path) -> None:
    out = {}
    for swap in (False, True):
        cfg = tiny_run(tmp_path / str(swap), prefs[0], byte_tokenizer_dir, teacher=reverse_model,
                       student={"path": str(teacher_dir)}, objective={"name": "dpo", "beta": 0.5, "swap_pairs": swap})
        parts = build_parts(validate_config(cfg), tmp_path, LocalEngine())
        parts.student.eval()
        batch = parts.train_set.collate(list(range(6)))
        assert pairs_of(batch) == 6 and batch.student.input_ids.shape[0] == 12
        ref = parts.objective.teacher_forward(parts.teacher, batch)
        counts = {k: float(v) for k, v in parts.objective.counts(batch).items()}
        loss, metrics = parts.objective(parts.student, batch, ref, StepNorm(counts))
        with torch.no_grad():
            lp = sequence_logprobs(parts.student(input_ids=batch.student.input_ids,
                                                 attention_mask=batch.student.attention_mask).logits,
                                   batch.student.labels, batch.student.loss_mask)
            lr = sequence_logprobs(parts.teacher.model(input_ids=batch.student.input_ids,
                                                 attention_mask=batch.student.attention_mask).logits,
                                   batch.student.labels, batch.student.loss_mask)
        w, l_ = (slice(6, 12), slice(0, 6)) if swap else (slice(0, 6), slice(6, 12))
        naive, _, _ = dpo_loss(lp[w], lp[l_], lr[w], lr[l_], 0.5)
        assert float(loss) == pytest.approx(float(naive.mean()), rel=1e-5)
        out[swap] = float(metrics["margin"])
    assert out[True] == pytest.approx(-out[False], rel=1e-5)
