"""The dual-space projectors of DSKD, DSKD-CMA and DSKDv2 (arXiv 2406.17328, 2504.11426), in one place.

    P_t2s: teacher hidden space -> student hidden space, a trained Linear (bias in DSKD and DSKD-CMA v1)
    P_s2t: student hidden space -> teacher hidden space, either
           a trained Linear (DSKD, DSKD-CMA v1, DSKDv2 without pinv_init), or
           the pseudo-inverse map W_s[V']ᵀ · pinv(W_t[V']ᵀ) over the shared vocabulary V', recomputed from
           the detached student head at every use (DSKDv2, DSKD-CMA v2); then P_t2s starts at
           W_t[V']ᵀ · pinv(W_s[V']ᵀ), so that the student head reads projected teacher states as (almost) the
           teacher's own logits on V'.

`DualSpace` is the base of the three objectives: it builds the projectors as their own attributes `t2s` and
`s2t` (the names of saved projector files and checkpoints), P_t2s first (the order fixes their random
initialization), loads saved ones (`projector_path`), and gives them their own optimizer group
(`projector_lr`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dualkd.methods.base import Objective
from dualkd.methods.common import load_projectors, pinv_map


class DualSpace(Objective):
    t2s: nn.Linear
    s2t: nn.Linear | None

    def build_projectors(self, d_s: int, d_t: int, dtype: torch.dtype, *, bias: bool,
                         pinv_rows: tuple[Tensor, Tensor, Tensor] | None = None) -> None:
        """P_t2s and P_s2t. `pinv_rows` = (W_t[V'] [K, d_t], W_s[V'] [K, d_s], the student ids of V' [K]):
        P_s2t is the pseudo-inverse map and P_t2s starts at its pseudo-inverse initialization."""
        self.t2s = nn.Linear(d_t, d_s, bias=bias, dtype=dtype)
        if pinv_rows is None:
            self.s2t = nn.Linear(d_s, d_t, bias=bias, dtype=dtype)
        else:
            teacher_rows, student_rows, student_ids = pinv_rows
            with torch.no_grad():
                self.t2s.weight.copy_(pinv_map(teacher_rows, student_rows).T)
            self.register_buffer("shared_student_ids", student_ids, persistent=False)
            # the teacher half of P_s2t never changes (the teacher is frozen): computed once
            self.register_buffer("teacher_pinv", torch.linalg.pinv(teacher_rows.detach().double().T).to(dtype),
                                 persistent=False)  # [K, d_t]
            self.s2t = None
        load_projectors(self, self.config.projector_path)

    def project_s2t(self, student_hidden: Tensor, student_head: Tensor) -> Tensor:
        """P_s2t(h_s) [..., d_t]; `student_head` [V_s, d_s] is read detached by the pseudo-inverse map."""
        if self.s2t is not None:
            return self.s2t(student_hidden)
        return student_hidden @ (student_head.detach()[self.shared_student_ids].T @ self.teacher_pinv)

    def param_groups(self) -> list[dict]:
        lr = self.projector_lr()
        return [{"params": list(self.parameters()), "name": "projectors", **({"lr": lr} if lr is not None else {})}]

    def projector_lr(self) -> float | None:
        """The projectors' learning rate (None: the student's)."""
        return self.config.projector_lr
