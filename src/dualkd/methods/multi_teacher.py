"""Distillation from several teachers at once (`teacher.kind: several`, teachers/several.py).

One distillation objective, `each` (kd, dskdv2, ...), is bound to every member teacher i, with its own
alignment and projectors where its tokenizer differs from the student's; the members' weights w_i come from
`weights` (equal by default). With L_i = (1 − r)·CE + r·D_i the objective `each` against teacher i:

    combine: sum      L = Σ_i w_i L_i = (1 − r)·CE + r·Σ_i w_i D_i                      (Σ_i w_i = 1)
    combine: route    L = (1/N) Σ_b Σ_{t ∈ b} ℓ_{i(b)}(t),   i(b) = the record's `teacher` field
    combine: average  L = (1 − r)·CE + r·D(p̄ ‖ q),   p̄ = Σ_i w_i softmax(z_i / τ)      (`each: kd`, one vocabulary)

`sum` is a weighted sum of divergences (every teacher reads every example; NeMo RL's "sum"); `route` sends
each example to the one teacher its record names (ℓ_i(t): objective i's per-token terms, N: the global
batch's response tokens, so routing changes which teacher a token learns from, never its weight); `average`
distils the weighted mean of the teachers' distributions at temperature τ ("averaged logits" in TRL and
NeMo RL average probabilities the same way). For forward KL `sum` and `average` have the same gradient:
Σ_i w_i KL(p_i ‖ q) = H(p̄, q) − Σ_i w_i H(p_i), and H(p̄, q) − H(p̄) is KL(p̄ ‖ q); they differ for the
other divergences (reverse KL under `average` is mode-seeking on the mixture).

Normalization: under `sum` each L_i keeps its own denominators (the loop's counts, namespaced `name/key`),
so L_i is exactly the objective `each` run alone against teacher i; under `route` the members' counts share
their keys and sum over the global batch, so every member's terms are divided by the whole batch's counts.
Both are invariant to micro-batching and process count, as every objective is (methods/base.py).

Cost: `sum` runs the student once per member (each L_i is its objective's own pass); `route` once in all
(each example in one member's sub-batch); `average` once. `average` compares dense [N, V] rows (members give
hidden states and head, or logits; a top-k-only member is refused): for 100k+ vocabularies use `sum`.

Metrics: `name/metric` is member i's metric (under `route`, its share of the global mean) and `metric` the
combination (Σ w_i under `sum`, the total under `route`).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import model_validator
from torch import Tensor, nn

from dualkd.data.collate import Batch
from dualkd.errors import ConfigError, DataError, DualKDError
from dualkd.methods.base import Objective, SetupContext, StepNorm
from dualkd.methods.common import TeacherRows
from dualkd.methods.needs import Needs
from dualkd.methods.spec import METHODS, ObjectiveSpec
from dualkd.models import same_vocabulary
from dualkd.schema import of_kind
from dualkd.teachers import Teacher
from dualkd.teachers.several import MEMBERS, SeveralTeachers

WEIGHT_SUM_TOLERANCE = 1e-6


class MultiTeacherConfig(ObjectiveSpec):
    name: Literal["multi_teacher"] = "multi_teacher"
    each: of_kind(ObjectiveSpec)  # type: ignore[valid-type]
    """The distillation objective run against every member teacher (e.g. {name: dskdv2, alignment: eta})."""
    combine: Literal["sum", "route", "average"] = "sum"
    """How the members' terms combine (the module docstring's formulas)."""
    weights: dict[str, float] | None = None
    """Each member's w_i by name (`sum`, `average`); they must sum to 1. None: equal weights. `route` takes
    none: a record's `teacher` field chooses its one teacher."""

    @model_validator(mode="after")
    def _combinable(self) -> MultiTeacherConfig:
        if self.each.name == "multi_teacher":
            raise ValueError("each: one teacher's objective (kd, dskdv2, ...), not multi_teacher")
        if self.combine == "route" and self.weights is not None:
            raise ValueError("weights: combine=route sends each example to the one teacher its record's `teacher` "
                             "field names; weights combine teachers (combine: sum or average)")
        if self.combine == "average" and self.each.name != "kd":
            raise ValueError(f"combine=average distils the teachers' mean distribution over one vocabulary: "
                             f"each.name must be kd, not {self.each.name} (use combine: sum)")
        if self.weights is not None:
            bad = {k: v for k, v in self.weights.items() if not v >= 0}
            total = sum(self.weights.values())
            if bad or abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
                raise ValueError(f"weights must be ≥ 0 and sum to 1 (L = Σ w_i L_i keeps the gold CE's weight "
                                 f"1 − kd_rate); they sum to {total:g}" + (f", negative: {bad}" if bad else ""))
        return self


def _each(config: MultiTeacherConfig) -> Objective:
    """A fresh objective `each` (built by its registry entry, as `build_objective` does)."""
    return METHODS[config.each.name][1](config.each)


class MultiTeacher(Objective):
    config: MultiTeacherConfig

    def __init__(self, config: MultiTeacherConfig):
        super().__init__(config)
        probe = _each(config)  # what one member's objective needs (not kept: its modules are the members')
        self._each_needs, self._gold_weight = probe.needs(), probe.gold_weight()
        if not self._each_needs.distills or self._each_needs.data != "responses" or self._each_needs.frozen:
            raise ConfigError(f"objective.each: `{config.each.name}` is not a one-teacher distillation objective "
                              "over dataset responses (kd, dskd, dskdv2, uld, ...)")
        self.members = nn.ModuleDict()  # name -> objective `each` bound to that teacher (built in setup)
        self.weights: dict[str, float] = {}

    def needs(self) -> Needs:
        each = self._each_needs
        return Needs(teacher=(frozenset({MEMBERS}),), why="objective multi_teacher", teacher_tokens=each.teacher_tokens,
                     aligner=each.aligner, counts_need_teacher=True,
                     unused_parameters=self.config.combine == "route" or each.unused_parameters)

    def gold_weight(self) -> float:
        return self._gold_weight

    def param_groups(self) -> list[dict[str, Any]]:
        return [{**g, "name": f"{name}.{g.get('name', 'objective')}"}
                for name, member in self.members.items() for g in member.param_groups()]

    # ------------------------------------------------------------------------------------------------- setup

    def setup(self, ctx: SetupContext) -> None:
        several = ctx.teacher
        if not isinstance(several, SeveralTeachers):
            raise ConfigError("objective multi_teacher distils several teachers: set teacher.kind: several with "
                              "teacher.members")
        names = list(several.members)
        self.weights = self._weights(names)
        for name in names:
            teacher = several.members[name]
            same = same_vocabulary(ctx.student_tokenizer, teacher.tokenizer)
            if self.config.combine == "average" and not same:
                raise ConfigError(f"teacher.members.{name}: combine=average needs every teacher to share the "
                                  "student's vocabulary; this one's differs (use combine: sum)")
            member = _each(self.config)
            try:
                member.setup(SetupContext(student=ctx.student, teacher=teacher, student_tokenizer=ctx.student_tokenizer,
                                          teacher_tokenizer=teacher.tokenizer, same_tokenizer=same,
                                          student_pretrained=ctx.student_pretrained))
            except DualKDError as e:
                raise type(e)(f"teacher.members.{name}: {e}") from None
            self.members[name] = member
        if self.config.combine == "average":
            self._check_average()
        if self.config.combine == "route":
            self._check_routes(several)

    def _weights(self, names: list[str]) -> dict[str, float]:
        given = self.config.weights
        if given is None:
            return {name: 1.0 / len(names) for name in names}
        unknown, missing = sorted(set(given) - set(names)), sorted(set(names) - set(given))
        if unknown or missing:
            raise ConfigError(f"objective.weights: {'unknown teacher ' + str(unknown) if unknown else ''}"
                              f"{'; ' if unknown and missing else ''}"
                              f"{'no weight for ' + str(missing) if missing else ''}; teacher.members has {names}")
        return {name: given[name] for name in names}

    def _check_average(self) -> None:
        sizes = {name: (member.top_k, member.vocab_size) for name, member in self.members.items()}
        for name, (top_k, _) in sizes.items():
            if top_k is not None:
                raise ConfigError(f"teacher.members.{name}: combine=average reads every teacher's whole "
                                  f"distribution; this one gives its top {top_k} only (use combine: sum)")
        if len({v for _, v in sizes.values()}) > 1:
            raise ConfigError(f"combine=average: the teachers' vocabularies differ in size "
                              f"({ {n: v for n, (_, v) in sizes.items()} }); use combine: sum")

    def _check_routes(self, several: SeveralTeachers) -> None:
        """Every example of every split names a member (before training, with the record's place)."""
        names = list(several.members)
        for dataset in several.views[names[0]].values():  # every member's view holds the same examples
            for example in dataset.examples:
                if example.teacher is None:
                    raise DataError(f"{example.where}: field 'teacher' is missing; objective.combine=route reads "
                                    f"each example's teacher from it (one of {names})")
                if example.teacher not in several.members:
                    raise DataError(f"{example.where}: field 'teacher': {example.teacher!r} is not one of the "
                                    f"run's teachers {names} (teacher.members)")

    # ---------------------------------------------------------------------------------------------- training

    @torch.no_grad()
    def teacher_forward(self, teacher: Teacher | None, batch: Batch) -> dict[str, tuple[Batch, Any]]:
        """Each member's batch (its view of the examples it reads) and its objective's teacher outputs."""
        assert isinstance(teacher, SeveralTeachers)
        if self.config.combine == "route":
            routes = teacher.routes(batch.indices)
            groups = {name: [i for i, r in zip(batch.indices, routes) if r == name] for name in self.members}
        else:
            groups = {name: batch.indices for name in self.members}
        out = {}
        for name, indices in groups.items():
            if not indices:
                continue  # no example of this micro-batch routed here
            whole = indices == batch.indices and teacher.reads_student_tokens(name)
            view = batch if whole else teacher.member_batch(name, indices, batch.student.input_ids.device)
            out[name] = (view, self.members[name].teacher_forward(teacher.members[name], view))
        return out

    @torch.no_grad()
    def prepare(self, batch: Batch, teacher_out: Any, student: nn.Module) -> tuple[Any, dict[str, Tensor]]:
        prepared: dict[str, Any] = {}
        counts: dict[str, Tensor] = {}
        for name, (view, out) in teacher_out.items():
            member_out, member_counts = self.members[name].prepare(view, out, student)
            prepared[name] = (view, member_out)
            for key, value in member_counts.items():
                if self.config.combine == "route":  # disjoint rows, one meaning per key: the global count
                    counts[key] = counts[key] + value if key in counts else value
                else:
                    counts[f"{name}/{key}"] = value
        counts["tokens"] = batch.student.loss_mask.sum()  # every example is some member's (route: the sum)
        if self.config.combine == "average":
            prepared = self._averaged(prepared)
        return prepared, counts

    def _averaged(self, prepared: dict[str, tuple[Batch, Any]]) -> dict[str, tuple[Batch, Tensor]]:
        """The members' outputs replaced by one target: τ·log p̄ [N, V], the logits whose softmax at τ is p̄."""
        tau = self.config.each.temperature
        log_mixture = []
        for name, (_, out) in prepared.items():
            z = out.hidden @ out.head.T + (out.bias if out.bias is not None else 0) \
                if isinstance(out, TeacherRows) else out  # [N, V]
            z = z.to(torch.promote_types(z.dtype, torch.float32))
            log_mixture.append(torch.log_softmax(z / tau, dim=-1) + math.log(self.weights[name]))
        first = next(iter(prepared))
        target = tau * torch.logsumexp(torch.stack(log_mixture), dim=0)
        return {first: (prepared[first][0], target)}

    def forward(self, student: nn.Module, batch: Batch, teacher_out: dict[str, tuple[Batch, Any]], norm: StepNorm
                ) -> tuple[Tensor, dict[str, Tensor]]:
        loss = torch.zeros((), device=batch.student.input_ids.device)
        metrics: dict[str, Tensor] = {}
        for name, (view, out) in teacher_out.items():
            if self.config.combine == "sum":
                member_norm = StepNorm({k.split("/", 1)[1]: v for k, v in norm.counts.items()
                                        if k.startswith(f"{name}/")}, step=norm.step, ce_weight=norm.ce_weight)
                weight = self.weights[name]
            else:  # route: the global counts; average: one target, one pass
                member_norm, weight = norm, 1.0
            member_loss, member_metrics = self.members[name](student, view, out, member_norm)
            loss = loss + weight * member_loss
            for key, value in member_metrics.items():
                if self.config.combine != "average":
                    metrics[f"{name}/{key}"] = value
                metrics[key] = metrics.get(key, 0.0) + weight * value
        return loss, metrics
