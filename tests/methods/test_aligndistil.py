"""AlignDistil: the identities of its spec, its fused loss against the naive formula (every variant), the label
shift, its frozen models (never trained, named when missing), and the DPO -> reverse DPO -> AlignDistil
pipeline off and on policy. DPO's own twin: test_dpo.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dualkd.config import validate_config
from dualkd.losses.policy import (
    adaptive_alpha,
    aligndistil_loss,
    contrastive_teacher_logits,
    reverse_kl,
    theorem1_teacher_logits,
    total_variation,
)
from dualkd.methods.base import StepNorm
from dualkd.train.build import build_parts
from dualkd.train.engine import LocalEngine
from dualkd.train.loop import train
from dualkd.train.step import TrainModule
from tests.helpers import read_metrics, tiny_run

ENGINE = LocalEngine()


# ----------------------------------------------------------------------------------------------- data


# ----------------------------------------------------------------------------------------------- pure math


def test_aligndistil_identities() -> None:
    g = torch.Generator().manual_seed(0)
    z_dpo, z_rev = torch.randn(3, 5, 11, generator=g), torch.randn(3, 5, 11, generator=g)
    r, eps = 20.0, 1e-3
    # equal models: α = ε, and the teacher is the DPO model
    alpha = adaptive_alpha(z_dpo, z_dpo, r, eps)
    assert torch.allclose(alpha, torch.full_like(alpha, eps))
    assert torch.allclose(torch.softmax(contrastive_teacher_logits(z_dpo, z_dpo, alpha), -1), torch.softmax(z_dpo, -1))
    # bounds
    tvd = total_variation(z_dpo, z_rev)
    assert bool(((tvd >= 0) & (tvd <= 1)).all())
    alpha = adaptive_alpha(z_dpo, z_rev, r, eps)
    assert bool(((alpha >= eps) & (alpha <= r + eps)).all())
    assert float(total_variation(torch.tensor([[0.0, -1e9]]), torch.tensor([[-1e9, 0.0]]))) == pytest.approx(1.0)
    # a per-position constant on either model's logits changes nothing
    shift = torch.randn(3, 5, 1, generator=g)
    star = torch.softmax(contrastive_teacher_logits(z_dpo, z_rev, alpha), -1)
    assert torch.allclose(adaptive_alpha(z_dpo + shift, z_rev - 2 * shift, r, eps), alpha, atol=1e-6)
    assert torch.allclose(torch.softmax(contrastive_teacher_logits(z_dpo + shift, z_rev + 3 * shift, alpha), -1),
                          star, atol=1e-6)
    # loss >= 0, and 0 when the student is the teacher
    z_star = contrastive_teacher_logits(z_dpo, z_rev, alpha)
    mask = torch.ones(3, 5, dtype=torch.bool)
    student = torch.randn(3, 5, 11, generator=g)
    assert float(aligndistil_loss(student, z_star, 0.1 / alpha, mask)) > 0
    assert float(aligndistil_loss(z_star + 5.0, z_star, 0.1 / alpha, mask)) == pytest.approx(0.0, abs=1e-6)


def test_one_step_bandit_identity_and_convergence() -> None:
    """E_{a~q}[β0·log(p_dpo/p_ref)] − β·KL(q‖p_ref) = −β·KL(q‖π*) + β·log Z with π* ∝ p_dpo^w p_ref^(1−w), w = β0/β;
    gradient descent on free logits of q then reaches π* (Theorem 1's teacher)."""
    g = torch.Generator().manual_seed(1)
    z_dpo, z_ref, z_q = (torch.randn(9, generator=g, dtype=torch.float64) for _ in range(3))
    beta0, beta = 0.1, 0.05
    w = beta0 / beta
    log_dpo, log_ref, log_q = (torch.log_softmax(z, -1) for z in (z_dpo, z_ref, z_q))
    q = log_q.exp()
    rlhf = (q * beta0 * (log_dpo - log_ref)).sum() - beta * (q * (log_q - log_ref)).sum()
    log_unnorm = w * log_dpo + (1 - w) * log_ref
    log_z = torch.logsumexp(log_unnorm, -1)
    log_star = log_unnorm - log_z
    assert torch.allclose(torch.log_softmax(theorem1_teacher_logits(z_dpo, z_ref, w), -1), log_star)
    assert float(rlhf) == pytest.approx(float(-beta * (q * (log_q - log_star)).sum() + beta * log_z), abs=1e-12)
    free = torch.zeros(9, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([free], lr=1.0)
    for _ in range(3000):
        opt.zero_grad()
        reverse_kl(free[None], log_star[None]).sum().backward()
        opt.step()
    assert torch.allclose(torch.softmax(free.detach(), -1), log_star.exp(), atol=1e-4)


# ----------------------------------------------------------------------------------------------- objectives


def _align_cfg(tmp: Path, prefs: tuple[Path, Path], tok: Path, dpo: Path, other: Path, **objective) -> dict:
    role = "reference" if objective.get("teacher_logits") == "theorem1" else "reverse"
    return tiny_run(tmp, prefs[0], tok, teacher=dpo, objective={"name": "aligndistil", **objective},
                    teachers={role: {"path": str(other)}})


@pytest.mark.parametrize("variant", [{}, {"length_norm": False}, {"teacher_logits": "constant", "alpha": 2.0},
                                     {"teacher_logits": "theorem1", "w": 1.5}, {"kd_rate": 0.7}],
                         ids=["adaptive", "token_mean", "constant", "theorem1", "with_ce"])
def test_fused_aligndistil_matches_the_naive_loss(variant: dict, tmp_path: Path, prefs: tuple[Path, Path],
                                                  byte_tokenizer_dir: Path, teacher_dir: Path,
                                                  reverse_model: Path) -> None:
    cfg = validate_config(_align_cfg(tmp_path, prefs, byte_tokenizer_dir, teacher_dir, reverse_model, **variant))
    parts = build_parts(cfg, tmp_path, ENGINE)
    obj, student = parts.objective, parts.student
    student.eval()
    batch = parts.train_set.collate(list(range(5)))
    plan = obj.teacher_forward(parts.teacher, batch)
    counts = {k: float(v) for k, v in obj.counts(batch).items()}
    loss, metrics = TrainModule(student, obj)(batch, plan, StepNorm(counts))

    tokens = batch.student
    with torch.no_grad():
        z_dpo = parts.teacher.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).logits
        other = parts.frozen["reference" if "w" in variant else "reverse"].model
        z_other = other(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).logits
    c = obj.config
    if c.teacher_logits == "adaptive":
        alpha = adaptive_alpha(z_dpo, z_other, c.r, c.eps)
        z_star, weights = contrastive_teacher_logits(z_dpo, z_other, alpha), c.beta0 / alpha
    elif c.teacher_logits == "constant":
        z_star = contrastive_teacher_logits(z_dpo, z_other, c.alpha)
        weights = torch.full(z_dpo.shape[:2], c.beta0 / c.alpha)
    else:
        z_star, weights = theorem1_teacher_logits(z_dpo, z_other, c.w), torch.full(z_dpo.shape[:2], c.beta0 / c.w)
    logits = student(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).logits
    naive = c.kd_rate * aligndistil_loss(logits, z_star, weights, tokens.loss_mask, length_norm=c.length_norm)
    if c.kd_rate < 1:
        ce = F.cross_entropy(logits[tokens.loss_mask], tokens.labels[tokens.loss_mask])
        naive = naive + (1 - c.kd_rate) * ce
    assert float(loss.detach()) == pytest.approx(float(naive.detach()), rel=1e-4)
    grads = torch.autograd.grad(loss, list(student.parameters()))
    naive_grads = torch.autograd.grad(naive, list(student.parameters()))
    for a, b in zip(grads, naive_grads):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)
    assert float(metrics["tvd"]) >= 0 and float(metrics["alpha"]) > 0


def test_loss_positions_follow_the_label_shift(tmp_path: Path, prefs: tuple[Path, Path], byte_tokenizer_dir: Path,
                                               teacher_dir: Path, reverse_model: Path) -> None:
    """The prediction of the first response token (at the last prompt position) counts; the position after the
    EOS (padding) does not. The official off-policy trainer gets both wrong."""
    cfg = validate_config(_align_cfg(tmp_path, prefs, byte_tokenizer_dir, teacher_dir, reverse_model))
    parts = build_parts(cfg, tmp_path, ENGINE)
    ex = parts.train_set.student[0]
    batch = parts.train_set.collate([0, 1])
    row = 0 if len(parts.train_set.student[0].ids) >= len(parts.train_set.student[1].ids) else 1
    ex = parts.train_set.student[row]
    mask, labels = batch.student.loss_mask[row], batch.student.labels[row]
    first = ex.prompt_len - 1
    assert bool(mask[first]) and int(labels[first]) == ex.ids[ex.prompt_len]
    assert not bool(mask[:first].any())
    assert int(mask.sum()) == len(ex.ids) - ex.prompt_len  # response tokens + EOS, nothing after it
    assert int(labels[mask][-1]) == ex.ids[-1]
    plan = parts.objective.teacher_forward(parts.teacher, batch)
    assert plan.hidden.shape[0] == int(batch.student.loss_mask.sum())


def test_frozen_models_get_no_gradients_and_are_not_trained(tmp_path: Path, prefs: tuple[Path, Path],
                                                           byte_tokenizer_dir: Path, teacher_dir: Path,
                                                           reverse_model: Path) -> None:
    cfg = validate_config(_align_cfg(tmp_path, prefs, byte_tokenizer_dir, teacher_dir, reverse_model))
    parts = build_parts(cfg, tmp_path, ENGINE)
    module = TrainModule(parts.student, parts.objective)
    batch = parts.train_set.collate(list(range(4)))
    plan = parts.objective.teacher_forward(parts.teacher, batch)
    loss, _ = module(batch, plan, StepNorm({k: float(v) for k, v in parts.objective.counts(batch).items()}))
    loss.backward()
    frozen = list(parts.teacher.model.parameters()) + list(parts.frozen["reverse"].model.parameters())
    assert all(p.grad is None and not p.requires_grad for p in frozen)
    assert any(p.grad is not None for p in parts.student.parameters())
    own = {id(p) for p in module.parameters()}
    assert not any(id(p) in own for p in frozen)  # neither wrapped, optimized nor checkpointed
    assert parts.objective.state_dict() == {}


def test_missing_or_stray_frozen_models_are_named(tmp_path: Path, prefs: tuple[Path, Path],
                                                 byte_tokenizer_dir: Path, teacher_dir: Path) -> None:
    from dualkd.errors import ConfigError

    cfg = tiny_run(tmp_path, prefs[0], byte_tokenizer_dir, teacher=teacher_dir, objective={"name": "aligndistil"})
    with pytest.raises(ConfigError, match=r"teachers\.reverse\.path"):
        build_parts(validate_config(cfg), tmp_path, ENGINE)
    cfg["teachers"] = {"reverse": {"path": str(teacher_dir)}, "critic": {"path": str(teacher_dir)}}
    with pytest.raises(ConfigError, match="teachers.critic"):
        build_parts(validate_config(cfg), tmp_path, ENGINE)


def test_dpo_reverse_dpo_then_aligndistil_off_and_on_policy(tmp_path: Path, prefs: tuple[Path, Path],
                                                            byte_tokenizer_dir: Path, teacher_dir: Path) -> None:
    common = dict(student={"path": str(teacher_dir)}, optimization={"lr": 2e-3, "max_steps": 8},
                  data={"train": str(prefs[0]), "dev": str(prefs[1])}, eval={"every_steps": 4})
    dpo = train(validate_config(tiny_run(tmp_path / "dpo", prefs[0], byte_tokenizer_dir, teacher=teacher_dir,
                                         objective={"name": "dpo"}, **common)))
    rdpo = train(validate_config(tiny_run(tmp_path / "rdpo", prefs[0], byte_tokenizer_dir, teacher=teacher_dir,
                                          objective={"name": "dpo", "swap_pairs": True}, **common)))
    dev = read_metrics(dpo, "dev")
    assert dev and all(0 <= d["pref_acc"] <= 1 for d in dev)
    first, last = read_metrics(dpo)[0], read_metrics(dpo)[-1]
    assert last["margin"] > first["margin"]  # DPO pushes chosen over rejected
    assert read_metrics(rdpo)[-1]["margin"] > read_metrics(rdpo)[0]["margin"]
    for kind, source in (("off", {}), ("on", {"kind": "on_policy", "student_gen_ratio": 1.0,
                                              "on_policy_after": 0, "max_new_tokens": 16})):
        cfg = tiny_run(tmp_path / f"ad-{kind}", prefs[0], byte_tokenizer_dir, teacher=dpo / "final",
                       objective={"name": "aligndistil"}, teachers={"reverse": {"path": str(rdpo / "final")}},
                       source=source, **common)
        records = read_metrics(train(validate_config(cfg)))
        assert len(records) == 8 and all(r["loss"] >= 0 and r["alpha"] >= 1e-3 for r in records)
        assert all(r["sampled"] == (1.0 if kind == "on" else 0.0) for r in records)


# ----------------------------------------------------------------------------------------------- commands


