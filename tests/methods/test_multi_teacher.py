"""Several teachers against the formulas of methods/multi_teacher.py's docstring, in float64:

    sum      L = (1 − r)·CE + r·Σ_i w_i D(p_i^τ ‖ q^τ)          (kd; dskdv2: Σ_i w_i L_i, each L_i its own run)
    route    L = ((1 − r)·Σ_t CE + r·Σ_t D(p_{i(b)}^τ ‖ q^τ)) / N,  i(b) the record's `teacher`
    average  L = (1 − r)·CE + r·D(p̄ ‖ q^τ),  p̄ = Σ_i w_i p_i^τ

each micro-batch-split invariant (8 × 1 = 2 × 4 = 1 × 8); and the configurations that cannot mean anything
refused before training, with the record or member named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dualkd.config import validate_config
from dualkd.errors import DualKDError
from dualkd.train.build import build_parts
from tests.helpers import make_model_dir, student_run, synthetic_records, write_jsonl
from tests.methods.harness import (
    ENGINE,
    assert_is_its_formula,
    assert_split_invariant,
    ce,
    divergence,
    forward,
    implementation,
)

WEIGHTS = {"a": 0.7, "b": 0.3}


@pytest.fixture(scope="module")
def second_teacher(tmp_path_factory: pytest.TempPathFactory, byte_tokenizer_dir: Path) -> Path:
    """Another teacher of the student's tokenizer (another architecture size and seed than `teacher_dir`)."""
    return make_model_dir(tmp_path_factory.mktemp("teacher_b"), byte_tokenizer_dir, n_embd=40, seed=11)


@pytest.fixture(scope="module")
def routed_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic records, each naming its teacher: a, b, b, a, ... (both in every micro-batch of 4)."""
    records = [{**r, "teacher": "ab"[(i // 2 + i) % 2]} for i, r in enumerate(synthetic_records(24, seed=3))]
    return write_jsonl(tmp_path_factory.mktemp("routed") / "train.jsonl", records)


def several_run(tmp: Path, train: Path, tok: Path, members: dict[str, Path], each: dict[str, Any],
                **objective: Any) -> dict[str, Any]:
    cfg = student_run(tmp, train, tok, members["a"], {"name": "multi_teacher", "each": each, **objective})
    cfg["teacher"] = {"kind": "several", "members": {name: {"path": str(p)} for name, p in members.items()}}
    return cfg


def build64_several(cfg: dict[str, Any], tmp: Path) -> Any:
    parts = build_parts(validate_config(cfg), tmp, ENGINE)
    for model in (parts.student, parts.objective, *(t.model for t in parts.teacher.members.values())):
        model.double()
    parts.student.eval()
    return parts


def dense(parts: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Student logits and labels at the response positions, and each member's logits there (same tokens)."""
    tok = batch.student
    m = tok.loss_mask
    z_s = forward(parts.student, tok)[0][m]
    with torch.no_grad():
        z_t = {n: forward(t.model, tok)[0][m] for n, t in parts.teacher.members.items()}
    V = min(z_s.shape[-1], len(parts.student_tokenizer), *(z.shape[-1] for z in z_t.values()))
    return z_s, tok.labels[m], {n: z[:, :V] for n, z in z_t.items()}


def kd_sum_twin(parts: Any, batch: Any) -> torch.Tensor:
    cfg = parts.objective.config.each
    z_s, y, z_t = dense(parts, batch)
    V = next(iter(z_t.values())).shape[-1]
    kd = sum(WEIGHTS[n] * divergence(cfg.divergence, z, z_s[:, :V], cfg.temperature) for n, z in z_t.items())
    return ((1 - cfg.kd_rate) * ce(z_s, y) + cfg.kd_rate * kd) / y.numel()


def kd_average_twin(parts: Any, batch: Any) -> torch.Tensor:
    cfg = parts.objective.config.each
    z_s, y, z_t = dense(parts, batch)
    V = next(iter(z_t.values())).shape[-1]
    p_mean = sum(WEIGHTS[n] * torch.softmax(z / cfg.temperature, -1) for n, z in z_t.items())
    # D(p̄ ‖ q^τ) through the twin's divergence: logits τ·log p̄ give p̄ at temperature τ
    kd = divergence(cfg.divergence, cfg.temperature * p_mean.log(), z_s[:, :V], cfg.temperature)
    return ((1 - cfg.kd_rate) * ce(z_s, y) + cfg.kd_rate * kd) / y.numel()


def kd_route_twin(parts: Any, batch: Any) -> torch.Tensor:
    cfg = parts.objective.config.each
    tok = batch.student
    m = tok.loss_mask
    routes = [parts.train_set.examples[i].teacher for i in batch.indices]
    z_s, y, z_t = dense(parts, batch)
    V = next(iter(z_t.values())).shape[-1]
    row_of = torch.arange(m.shape[0])[:, None].expand_as(m)[m]  # [N] the example of each response token
    kd = sum(divergence(cfg.divergence, z_t[n][row_of == b], z_s[row_of == b][:, :V], cfg.temperature)
             for b, n in enumerate(routes))
    return ((1 - cfg.kd_rate) * ce(z_s, y) + cfg.kd_rate * kd) / y.numel()


@pytest.mark.parametrize("divergence_name", ["fkl", "rkl"])
def test_sum_of_kd_is_its_formula(tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path, teacher_dir: Path,
                                  second_teacher: Path, divergence_name: str) -> None:
    each = {"name": "kd", "temperature": 2.0, "divergence": divergence_name}
    cfg = several_run(tmp_path, train_file, byte_tokenizer_dir, {"a": teacher_dir, "b": second_teacher}, each,
                      weights=WEIGHTS)
    assert_is_its_formula(build64_several(cfg, tmp_path), kd_sum_twin)


@pytest.mark.parametrize("divergence_name", ["fkl", "rkl"])
def test_average_is_kd_to_the_mean_distribution(tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path,
                                                teacher_dir: Path, second_teacher: Path, divergence_name: str) -> None:
    each = {"name": "kd", "temperature": 2.0, "divergence": divergence_name, "fused": "on"}
    cfg = several_run(tmp_path, train_file, byte_tokenizer_dir, {"a": teacher_dir, "b": second_teacher}, each,
                      combine="average", weights=WEIGHTS)
    assert_is_its_formula(build64_several(cfg, tmp_path), kd_average_twin)


def test_forward_kl_sum_and_average_have_one_gradient(tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path,
                                                      teacher_dir: Path, second_teacher: Path) -> None:
    """Σ w_i KL(p_i ‖ q) and KL(p̄ ‖ q) differ by terms free of the student: the same gradients."""
    members, each = {"a": teacher_dir, "b": second_teacher}, {"name": "kd", "temperature": 2.0}
    grads = []
    for combine in ("sum", "average"):
        parts = build64_several(several_run(tmp_path / combine, train_file, byte_tokenizer_dir, members, each,
                                            combine=combine, weights=WEIGHTS), tmp_path / combine)
        grads.append(implementation(parts, [list(range(8))])[1])
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-9, atol=1e-12)


def test_route_is_its_formula(tmp_path: Path, routed_file: Path, byte_tokenizer_dir: Path, teacher_dir: Path,
                              second_teacher: Path) -> None:
    cfg = several_run(tmp_path, routed_file, byte_tokenizer_dir, {"a": teacher_dir, "b": second_teacher},
                      {"name": "kd", "temperature": 2.0}, combine="route")
    parts = build64_several(cfg, tmp_path)
    assert {parts.train_set.examples[i].teacher for i in range(8)} == {"a", "b"}
    assert_is_its_formula(parts, kd_route_twin)


def test_dskdv2_across_tokenizers_is_the_weighted_sum_of_single_teacher_runs(
        tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path, teacher_dir: Path, cross_teacher: Path) -> None:
    """Σ_i w_i L_i, each L_i the objective `each` run alone against teacher i (with the same projectors): the
    loss and the student's gradients; teacher b reads its own tokens, aligned by ETA."""
    each = {"name": "dskdv2", "temperature": 2.0}
    members = {"a": teacher_dir, "b": cross_teacher}
    parts = build64_several(several_run(tmp_path / "both", train_file, byte_tokenizer_dir, members, each,
                                        weights=WEIGHTS), tmp_path / "both")
    whole = list(range(8))
    loss, grads = implementation(parts, [whole])
    expected_loss, expected_student = torch.zeros((), dtype=torch.float64), {}
    for name, path in members.items():
        alone = student_run(tmp_path / name, train_file, byte_tokenizer_dir, path, each)
        single = build_parts(validate_config(alone), tmp_path / name, ENGINE)
        for model in (single.student, single.objective, single.teacher.model):
            model.double()
        single.student.eval()
        single.objective.load_state_dict(parts.objective.members[name].state_dict())
        single_loss, single_grads = implementation(single, [whole])
        expected_loss = expected_loss + WEIGHTS[name] * single_loss
        for k, g in single_grads.items():
            if k.startswith("student."):
                expected_student[k] = expected_student.get(k, 0) + WEIGHTS[name] * g
    torch.testing.assert_close(loss, expected_loss, rtol=1e-9, atol=0.0)
    for k, g in expected_student.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-7, atol=1e-12, msg=k)
    assert_split_invariant(parts)
    assert parts.objective.members["b"].state_dict(), "teacher b's projectors are trained"


def test_route_across_tokenizers_is_split_invariant(tmp_path: Path, routed_file: Path, byte_tokenizer_dir: Path,
                                                    teacher_dir: Path, cross_teacher: Path) -> None:
    cfg = several_run(tmp_path, routed_file, byte_tokenizer_dir, {"a": teacher_dir, "b": cross_teacher},
                      {"name": "dskdv2", "temperature": 2.0}, combine="route")
    parts = build64_several(cfg, tmp_path)
    assert_split_invariant(parts)
    grads = implementation(parts, [list(range(8))])[1]
    assert any(float(g.abs().max()) > 0 for k, g in grads.items() if k.startswith("objective.members.b."))


# ------------------------------------------------------------------------------------------ refused configs


def refusal(tmp: Path, cfg: dict[str, Any]) -> str:
    with pytest.raises(DualKDError) as e:
        build_parts(validate_config(cfg), tmp, ENGINE)
    return str(e.value)


def test_bad_configurations_are_refused_with_what_is_wrong(tmp_path: Path, train_file: Path, routed_file: Path,
                                                           byte_tokenizer_dir: Path, teacher_dir: Path,
                                                           second_teacher: Path, cross_teacher: Path) -> None:
    same = {"a": teacher_dir, "b": second_teacher}
    kd = {"name": "kd", "temperature": 2.0}

    def run(train: Path = train_file, members: dict[str, Path] = same, each: dict[str, Any] = kd, **objective: Any):
        return several_run(tmp_path, train, byte_tokenizer_dir, members, each, **objective)

    assert "sum to 1" in refusal(tmp_path, run(weights={"a": 0.5, "b": 0.6}))
    assert "unknown teacher ['c']" in refusal(tmp_path, run(weights={"a": 0.5, "c": 0.5}))
    assert "route sends each example" in refusal(tmp_path, run(routed_file, combine="route", weights=WEIGHTS))
    assert "field 'teacher' is missing" in refusal(tmp_path, run(combine="route"))
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{**r, "teacher": "a" if i else "gemma"} for i, r in
                                                       enumerate(synthetic_records(8, seed=3))])
    message = refusal(tmp_path, run(unknown, combine="route"))
    assert "unknown.jsonl:1: field 'teacher': 'gemma' is not one of the run's teachers ['a', 'b']" in message
    assert "teacher.members.b: objective `kd` needs the student and teacher to share one tokenizer" in refusal(
        tmp_path, run(members={"a": teacher_dir, "b": cross_teacher}))
    assert "teacher.members.b: combine=average needs every teacher" in refusal(
        tmp_path, run(members={"a": teacher_dir, "b": cross_teacher}, combine="average"))
    assert "each.name must be kd" in refusal(tmp_path, run(each={"name": "dskdv2"}, combine="average"))
    one = student_run(tmp_path, train_file, byte_tokenizer_dir, teacher_dir, {"name": "multi_teacher", "each": kd})
    assert "separate teachers' outputs" in refusal(tmp_path, one)
    several_kd = run()
    several_kd["objective"] = kd
    assert "which several teachers (teacher.kind: several) cannot give" in refusal(tmp_path, several_kd)
    on_policy = run()
    on_policy["source"] = {"kind": "on_policy"}
    assert "teacher.kind=several gives each teacher its own tokenization" in refusal(tmp_path, on_policy)
