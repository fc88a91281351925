"""Pieces shared by the distillation objectives: the divergence choice in configs, the teacher's rows and head
slice, and projector helpers (pseudo-inverse maps, loading saved projectors)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from dualkd.errors import ModelError
from dualkd.losses.divergences import SPECS
from dualkd.methods.spec import ObjectiveSpec
from dualkd.teachers import Teacher

Divergence = Literal["fkl", "rkl", "js", "tvd", "skl", "srkl", "akl"]


class DistillationConfig(ObjectiveSpec):
    """Config fields of every objective that mixes distillation terms with the gold cross-entropy."""

    kd_rate: float = Field(0.5, ge=0.0, le=1.0)
    """Weight of the distillation terms; the gold CE gets 1 - kd_rate (DSKD scripts: 0.5)."""


class DivergenceChoice(DistillationConfig):
    """Config fields of any objective that takes a divergence from `dualkd.losses`."""

    temperature: float = Field(1.0, gt=0)
    """τ applied to both distributions of each divergence (DSKD scripts use 2.0). No τ² rescaling."""
    divergence: Divergence = "fkl"
    """fkl, rkl, js, tvd, skl, srkl or akl (see dualkd.losses.divergences)."""
    beta: float = Field(0.5, gt=0.0, lt=1.0)
    """js only: weight of KL(p || m), with m = βp + (1-β)q."""
    skew_lambda: float = Field(0.1, ge=0.0, lt=1.0)
    """skl/srkl only: the skew λ."""
    akl_alpha: float = Field(0.5, ge=0.0, le=1.0)
    """akl only: teacher mass that defines the tail."""
    chunk_size: int | None = Field(None, ge=1)
    """Rows per chunk of the fused losses (None: about 16M logits per chunk)."""

    @model_validator(mode="after")
    def _params_belong_to_divergence(self) -> DivergenceChoice:
        allowed = set(SPECS[self.divergence].params)
        fields = type(self).model_fields
        stray = {k for k in ("beta", "skew_lambda", "akl_alpha") if k not in allowed
                 and getattr(self, k) != fields[k].default}  # a default (e.g. in a saved config) is harmless
        if stray:
            raise ValueError(f"{sorted(stray)} do(es) not apply to divergence {self.divergence!r}")
        return self

    @property
    def divergence_params(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in SPECS[self.divergence].params}


class ProjectorChoice(ObjectiveSpec):
    """Config fields of objectives with projectors."""

    projector_lr: float = Field(1e-3, gt=0)
    """Learning rate of the projectors (their own AdamW group, same schedule). DSKD: 1e-3, DSKDv2: 5e-4."""
    projector_path: str | None = None
    """Load projectors saved by an earlier run (`<run>/final/projectors.safetensors`) to continue training."""


@dataclass
class TeacherRows:
    """The teacher at the positions an objective compares: last hidden states and its LM head."""

    hidden: Tensor  # [N, d_t]
    head: Tensor  # [V, d_t]
    bias: Tensor | None  # [V]
    labels: Tensor | None = None  # [N] targets derived from the teacher (e.g. its argmax in student ids)
    mask: Tensor | None = None  # [N] bool, set by `prepare` when a denominator needs it (agreement)


def head_rows_of(teacher: Teacher, rows: int) -> tuple[Tensor, Tensor | None]:
    """The first `rows` rows of the teacher's LM head: weight [rows, d], bias [rows] or None."""
    head, bias = teacher.head()
    return head[:rows], bias[:rows] if bias is not None else None


def pinv_map(source_rows: Tensor, target_rows: Tensor) -> Tensor:
    """P [d_source, d_target] with (h @ P) @ target_rows.T ≈ h @ source_rows.T for every h: the projection
    that makes the target head reproduce the source head's logits over the shared rows (DSKDv2's "ideal
    initialization"): P = source_rows.T @ pinv(target_rows.T). Rows: [K, d] of the shared vocabulary."""
    src, tgt = source_rows.detach().double(), target_rows.detach().double()
    return (src.T @ torch.linalg.pinv(tgt.T)).to(source_rows.dtype)


def load_projectors(module: nn.Module, path: str | None) -> None:
    """Load a saved projector state dict (safetensors) into `module`; shapes must match."""
    if not path:
        return
    from safetensors.torch import load_file

    file = Path(path)
    if file.is_dir():
        file = file / "projectors.safetensors"
    if not file.is_file():
        raise ModelError(f"projector_path: no projector file at {file}")
    state = load_file(str(file))
    own = module.state_dict()
    bad = [k for k in state if k not in own or own[k].shape != state[k].shape]
    missing = [k for k, v in module.named_parameters() if k not in state]
    if bad or missing:
        raise ModelError(f"projector_path {file}: does not fit this objective (unexpected or mis-shaped: "
                         f"{bad[:4]}, missing: {missing[:4]})")
    module.load_state_dict(state, strict=False)
