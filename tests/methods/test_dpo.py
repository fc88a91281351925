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

from dualkd.data.preferences import pairs_of
from tests.methods.conftest import student_run
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
