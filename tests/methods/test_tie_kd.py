"""TIE-KD against the formula of methods/tie_kd.py's docstring, in float64, with the passes written out:

    pass 1 feeds both decoders [start] + gold[:-1]; pass n + 1 feeds them [start] + argmax(q_n)[:-1]
    L = (1 − λ)·CE_ls(q_1, y) + λ·(1/N)·Σ_n Σ_t [KL(p_n ‖ q_n) + L_top1 + L_topk]      / response tokens
    CE_ls = (1 − ε)·(−log q_y) + (ε/V)·Σ_v (−log q_v)
    KL = Σ_v p_v (log p_v − log q_v), or with `kl_floor` f: Σ_v p_v (log p_v − log(q_v + f))
    L_top1 = Σ_i max(0, q(t_i) − q(t_1)),  L_topk = Σ_{i,j} 1[p(t_i) > p(s_j)]·max(0, q(s_j) − q(t_i))
      (t: the teacher's top-k by p, s: the student's top-k by q, on probabilities)
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dualkd.losses.ranking import hierarchical_ranking_loss
from dualkd.methods.base import StepNorm
from dualkd.methods.tie_kd import next_decoder_inputs
from dualkd.train.build import build_parts
from dualkd.train.engine import LocalEngine
from tests.helpers import marian_run, nmt_run, student_run
from tests.methods.harness import (
    assert_is_its_formula,
    build64,
    forward,
    implementation,
)


def ranking(q: torch.Tensor, p: torch.Tensor, k: int) -> torch.Tensor:
    """L_top1 + L_topk summed over rows, pair by pair: [N, V] probabilities -> []."""
    t = p.topk(k, -1).indices
    s = q.detach().topk(k, -1).indices
    q_t, q_s, p_t, p_s = q.gather(-1, t), q.gather(-1, s), p.gather(-1, t), p.gather(-1, s)
    loss = 0.0
    for i in range(k):
        loss = loss + torch.relu(q_t[:, i] - q_t[:, 0]).sum()
        for j in range(k):
            loss = loss + ((p_t[:, i] > p_s[:, j]) * torch.relu(q_s[:, j] - q_t[:, i])).sum()
    return loss


def tie_kd_twin(parts, batch) -> torch.Tensor:
    cfg = parts.objective.config
    tok = batch.student
    m, y = tok.loss_mask, tok.labels
    config = parts.student.config
    seq2seq = config.is_encoder_decoder

    def logits(model, decoder_inputs):
        if not seq2seq:
            return forward(model, tok)[0]
        return model(input_ids=tok.input_ids, attention_mask=tok.attention_mask,
                     decoder_input_ids=decoder_inputs).logits

    start = torch.full_like(y[:, :1], config.decoder_start_token_id if seq2seq else 0)
    decoder_inputs = torch.cat([start, y.masked_fill(~m, config.pad_token_id)[:, :-1]], 1)
    kd, ce = 0.0, None
    for n in range(cfg.iterations):
        z_s = logits(parts.student, decoder_inputs)
        with torch.no_grad():
            z_t = logits(parts.teacher.model, decoder_inputs)
        V = min(z_s.shape[-1], z_t.shape[-1], len(parts.student_tokenizer))
        log_q_full = torch.log_softmax(z_s[m], -1)
        if n == 0:
            eps = cfg.label_smoothing
            ce = ((1 - eps) * -log_q_full.gather(-1, y[m][:, None]).squeeze(-1) - eps * log_q_full.mean(-1)).sum()
        q = torch.softmax(z_s[m][:, :V] / cfg.temperature, -1)
        p = torch.softmax(z_t[m][:, :V] / cfg.temperature, -1)
        log_q = torch.log(q + cfg.kl_floor) if cfg.kl_floor else torch.log_softmax(z_s[m][:, :V] / cfg.temperature, -1)
        kd = kd + (torch.xlogy(p, p) - p * log_q).sum()
        if cfg.ranking:
            kd = kd + ranking(torch.softmax(z_s[m][:, :V], -1), torch.softmax(z_t[m][:, :V], -1), cfg.top_k)
        decoder_inputs = torch.cat([start, z_s.detach().argmax(-1)[:, :-1]], 1)
    return ((1 - cfg.kd_rate) * ce + cfg.kd_rate * kd / cfg.iterations) / m.sum()


@pytest.mark.parametrize("objective", [{"name": "tie_kd"}, {"name": "tie_kd", "kl_floor": 1e-6, "top_k": 3},
                                       {"name": "tie_kd", "iterations": 2, "ranking": False, "temperature": 2.0}],
                         ids=["3_passes", "3_passes_kl_floor", "2_passes_word_kd"])
def test_tie_kd_marian_is_its_formula(objective: dict, tmp_path: Path, mt_pairs: Path, byte_tokenizer_dir: Path,
                                      marian_teacher: Path) -> None:
    parts = build64(marian_run(tmp_path, mt_pairs, byte_tokenizer_dir, marian_teacher, objective), tmp_path)
    assert_is_its_formula(parts, tie_kd_twin)


@pytest.mark.parametrize("objective", [{"name": "tie_kd", "iterations": 1},
                                       {"name": "tie_kd", "iterations": 1, "kl_floor": 1e-6, "kd_rate": 0.8}],
                         ids=["1_pass", "1_pass_kl_floor"])
def test_tie_kd_decoder_only_is_its_formula(objective: dict, tmp_path: Path, train_file: Path,
                                            byte_tokenizer_dir: Path, teacher_dir: Path) -> None:
    parts = build64(student_run(tmp_path, train_file, byte_tokenizer_dir, teacher_dir, objective), tmp_path)
    assert_is_its_formula(parts, tie_kd_twin)


def test_kl_floor_changes_the_loss(tmp_path: Path, mt_pairs: Path, byte_tokenizer_dir: Path,
                                   marian_teacher: Path) -> None:
    """The switch is not a no-op: at a floor of 1e-2 (large, so a random tiny teacher shows it) the KL differs."""
    losses = []
    for floor in (None, 1e-2):
        out = tmp_path / str(floor)
        parts = build64(marian_run(out, mt_pairs, byte_tokenizer_dir, marian_teacher,
                                   {"name": "tie_kd", "iterations": 1, "ranking": False, "kl_floor": floor}), out)
        losses.append(float(implementation(parts, [list(range(8))])[0].detach()))
    assert abs(losses[0] - losses[1]) > 1e-4 * abs(losses[0])


def test_ranking_loss_hand_cases() -> None:
    p = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.5, 0.2, 0.15, 0.05])
    # T = (0, 1, 2), S = (1, 2, 3); top-1: (0.5 − 0.1) + (0.2 − 0.1) = 0.5; top-k: only t_1 (p 0.4) is outranked,
    # by s = 1, 2, 3: (0.5 − 0.1) + (0.2 − 0.1) + (0.15 − 0.1) = 0.55
    assert float(hierarchical_ranking_loss(q.log(), p.log(), k=3)) == pytest.approx(1.05, abs=1e-6)
    # k = 1: T = (0,), S = (1,): no top-1 term; the student's top token (teacher p 0.3 < 0.4) outranks t_1 by 0.4
    assert float(hierarchical_ranking_loss(q.log(), p.log(), k=1)) == pytest.approx(0.4, abs=1e-6)
    z = torch.randn(4, 7, 30)
    assert float(hierarchical_ranking_loss(z, z, k=5).abs().max()) == pytest.approx(0.0, abs=1e-7)
    assert float(hierarchical_ranking_loss(2.5 * z, z, k=5).abs().max()) == pytest.approx(0.0, abs=1e-7)  # same order
    assert float(hierarchical_ranking_loss(-z, z, k=5).min()) > 0
    with pytest.raises(ValueError, match="k must be"):
        hierarchical_ranking_loss(z, z, k=31)

def test_iterative_kd_inputs_gradients_and_pads(tmp_path: Path, nmt_pairs: tuple[Path, Path], byte_tokenizer_dir: Path,
                                                 nmt_teacher: Path) -> None:
    logits = torch.randn(2, 5, 11)
    assert torch.equal(next_decoder_inputs(logits, 7), torch.cat([torch.full((2, 1), 7), logits.argmax(-1)[:, :-1]], 1))

    parts = build_parts(nmt_run(tmp_path, nmt_pairs, byte_tokenizer_dir, {"name": "tie_kd", "iterations": 3},
                             teacher=nmt_teacher), tmp_path, LocalEngine())
    student, obj = parts.student, parts.objective
    student.eval()  # no dropout: passes are comparable
    seen: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    hook = student.model.decoder.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["input_ids"].clone()), with_kwargs=True)
    out_hook = student.register_forward_hook(lambda m, a, out: outputs.append(out.logits.detach()))
    batch = parts.train_set.collate([0, 1, 2, 3])
    norm = StepNorm({"tokens": float(batch.student.loss_mask.sum())})
    loss, metrics = obj(student, batch, obj.teacher_forward(parts.teacher, batch), norm)
    hook.remove()
    out_hook.remove()
    assert len(seen) == 3
    start = student.config.decoder_start_token_id
    assert torch.equal(seen[1], next_decoder_inputs(outputs[0], start))  # pass 2 reads pass 1's argmax
    assert torch.equal(seen[2], next_decoder_inputs(outputs[1], start))
    loss.backward()
    assert all(p.grad is None for p in parts.teacher.model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert math.isfinite(float(metrics["ranking"])) and float(metrics["kd"]) >= 0

    # pads count nowhere: the summed loss of a batch is the sum over its examples alone
    def summed(indices: list[int]) -> float:
        b = parts.train_set.collate(indices)
        n = float(b.student.loss_mask.sum())
        value, _ = obj(student, b, obj.teacher_forward(parts.teacher, b), StepNorm({"tokens": n}))
        return float(value.detach()) * n

    assert summed([0, 5]) == pytest.approx(summed([0]) + summed([5]), rel=1e-4)
