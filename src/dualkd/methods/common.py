"""Pieces shared by the distillation objectives: the divergence choice in configs, the teacher's rows, LM-head
access and checks, and projector helpers (pseudo-inverse maps, loading saved projectors)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from dualkd.errors import ModelError
from dualkd.losses.divergences import SPECS
from dualkd.schema import StrictModel

Divergence = Literal["fkl", "rkl", "js", "tvd", "skl", "srkl", "akl"]


class DivergenceChoice(StrictModel):
    """Config fields of any objective that takes a divergence from `dualkd.losses`."""

    kd_rate: float = Field(0.5, ge=0.0, le=1.0)
    """Weight of the distillation terms; the gold CE gets 1 - kd_rate (DSKD scripts: 0.5)."""
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


class ProjectorChoice(StrictModel):
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
    mask: Tensor | None = None  # [N] bool, filled by `counts` when a denominator needs it (agreement)


class CachedHead:
    """The teacher's LM head read from an offline cache (bf16 on disk), in the student's dtype, cut to the first
    `rows` rows, and copied to a device once (not per batch). A plain object: never trained, saved or wrapped."""

    def __init__(self, head: tuple[Tensor, Tensor | None], dtype: torch.dtype, rows: int | None = None):
        weight, bias = head
        self.weight = weight[:rows].to(dtype)  # [V, d_t]
        self.bias = bias[:rows].to(dtype) if bias is not None else None  # [V]
        self._on: dict[torch.device, tuple[Tensor, Tensor | None]] = {}

    def on(self, device: torch.device) -> tuple[Tensor, Tensor | None]:
        if device not in self._on:
            self._on[device] = (self.weight.to(device), self.bias.to(device) if self.bias is not None else None)
        return self._on[device]


def head_of(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The LM head's weight [V, d] and bias [V] (or None), for losses that multiply hidden states by it."""
    head = model.get_output_embeddings()
    weight = head.weight
    # ZeRO-3 partitions weights (empty tensors here), FSDP2 shards them (DTensor), CPU offload leaves meta
    # tensors: only the model's own forward gathers them
    if weight.numel() == 0 or weight.is_meta or isinstance(weight, DTensor):
        raise ModelError("this objective reads the LM head weights outside the model's forward (fused loss, "
                         "projectors), but they are partitioned or offloaded (DeepSpeed ZeRO-3, FSDP2, "
                         "teacher.placement: sharded/cpu_offload). Keep this model whole (teacher.placement: "
                         "same; DDP or ZeRO-2 for the student), or set `objective.fused: off` where the "
                         "objective has it")
    bias = getattr(head, "bias", None)
    # Marian/BART add a `final_logits_bias` [1, V] buffer after the head: part of the logits, so part of the bias
    extra = getattr(model, "final_logits_bias", None)
    if isinstance(extra, Tensor):
        bias = extra[0, : weight.shape[0]] if bias is None else bias + extra[0, : weight.shape[0]]
    return weight, bias


@torch.no_grad()
def check_head_is_linear(model: nn.Module, role: str) -> None:
    """The fused losses compute logits as last_hidden @ head.T (+ bias). Models that post-process logits
    (soft-capping, scaling) would silently get a different loss: refuse them with a clear message."""
    device = next(model.parameters()).device
    ids = torch.arange(4, device=device)[None] % max(model.get_input_embeddings().num_embeddings, 1)
    was_training = model.training
    model.eval()
    if getattr(model.config, "is_encoder_decoder", False):
        out = model(input_ids=ids, decoder_input_ids=ids, output_hidden_states=True, use_cache=False)
        last_hidden = out.decoder_hidden_states[-1]
    else:
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        last_hidden = out.hidden_states[-1]
    model.train(was_training)
    weight, bias = head_of(model)
    logits = torch.nn.functional.linear(last_hidden, weight, bias)
    if not torch.allclose(logits.float(), out.logits.float(), atol=1e-3, rtol=1e-3):
        raise ModelError(f"the {role}'s logits are not last_hidden_state @ lm_head (the model post-processes them, "
                         "e.g. logit soft-capping), which the fused losses need")


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
