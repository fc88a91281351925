"""Build what a run needs from its config: tokenized data, models, the teacher, the objective (after
train/prepare.py has made what must exist first: the examples and the student's tokenizer).

Everything that can fail because of the user's inputs fails here, before the first training step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from dualkd.config import RunConfig
from dualkd.data.dataset import TokenizedDataset, make_dataset, with_teacher_view
from dualkd.data.formats import Example
from dualkd.data.preferences import make_preference_dataset
from dualkd.data.readers import LoadReport
from dualkd.errors import ConfigError
from dualkd.methods import Needs, Objective, build_objective
from dualkd.methods.base import SetupContext
from dualkd.models import is_encoder_decoder, load_model, same_vocabulary
from dualkd.teachers import Teacher, TeacherSite, open_teacher
from dualkd.teachers.base import CAPABILITIES
from dualkd.train.prepare import Prepared, prepare_run


@dataclass
class Parts:
    objective: Objective
    student: nn.Module
    teacher: Teacher | None
    """Where the teacher's outputs come from: a live model (placed by the loop), an offline cache or a server."""
    student_tokenizer: Any
    teacher_tokenizer: Any | None
    train_set: TokenizedDataset
    dev_set: TokenizedDataset | None
    reports: list[LoadReport]
    aligner: Any | None = None
    """Pairs student/teacher positions of two tokenizations (cross-tokenizer objectives); on-policy sources
    run it on student samples."""
    frozen: dict[str, Teacher] | None = None
    """Extra frozen models of the objective (`teachers.<role>`), opened as teachers and placed with the teacher."""


def build_parts(cfg: RunConfig, run_dir: Path, engine: Any, objective: Objective | None = None,
                prepared: Prepared | None = None) -> Parts:
    """The run's parts. `objective`: one already built from `cfg.objective` (the loop builds it first, to tell
    the engine whether DDP must look for unused parameters); `prepared`: the run's examples and student
    tokenizer (train/prepare.py; prepared here when not given)."""
    objective = objective if objective is not None else build_objective(cfg.objective)
    needs = objective.needs()
    check_needs(cfg, needs)  # before any model loads
    spec = cfg.teacher if needs.distills else None

    data = cfg.data
    prepared = prepared if prepared is not None else prepare_run(cfg, run_dir, engine)
    student_tokenizer = prepared.student_tokenizer
    teacher_tokenizer = spec.load_tokenizer("teacher") if spec is not None else None
    same = teacher_tokenizer is None or same_vocabulary(student_tokenizer, teacher_tokenizer)
    # the teacher reads its own tokenization only when an objective asks for it and the vocabularies differ
    own_teacher_tokens = teacher_tokenizer if needs.teacher_tokens and not same else None
    aligner = needs.aligner(student_tokenizer, teacher_tokenizer) if own_teacher_tokens and needs.aligner else None

    seq2seq = is_encoder_decoder(cfg.student)  # the encoder reads the prompt (source), the decoder the response

    def tokenized(examples: list[Example], report: LoadReport) -> Any:
        if needs.data == "pairs":  # DPO: both responses of each preference pair
            return make_preference_dataset(examples, report, data, student_tokenizer)
        return make_dataset(examples, report, data, student_tokenizer, own_teacher_tokens, aligner, seq2seq)

    train_set = tokenized(prepared.train_examples, prepared.train_report)
    dev_set = tokenized(prepared.dev_examples, prepared.dev_report) if prepared.dev_examples is not None else None

    student = load_model(cfg.student, student_tokenizer, role="student", seed=cfg.seed)
    # what a cache must hold (preference pairs have no teacher view: DPO's reference reads the student's tokens)
    splits = {name: d.teacher_view for name, d in (("train", train_set), ("dev", dev_set))
              if d is not None and needs.data != "pairs"}
    sets = {name: d for name, d in (("train", train_set), ("dev", dev_set)) if d is not None}

    def views(tokenizer: Any) -> dict[str, TokenizedDataset]:
        """The run's data with `tokenizer`'s view of the teacher side (one of several teachers)."""
        if not needs.teacher_tokens or same_vocabulary(student_tokenizer, tokenizer):
            return dict(sets)
        pairs = needs.aligner(student_tokenizer, tokenizer) if needs.aligner else None
        return {name: with_teacher_view(d, data, tokenizer, pairs, f"tokenizing {name} for a teacher")
                for name, d in sets.items()}

    site = TeacherSite(run_dir=run_dir, seed=cfg.seed, seq2seq=seq2seq, dtype=next(student.parameters()).dtype,
                       splits=splits, views=views if needs.data != "pairs" else None)
    teacher = open_teacher(spec, site, teacher_tokenizer) if spec is not None else None
    frozen = _frozen_teachers(cfg, needs, student_tokenizer, site)
    # setup reads the heads (checks, pseudo-inverse projectors) and runs the models once: under ZeRO-3 they
    # were partitioned as they loaded, so they are gathered whole for it (transiently, on every process)
    with contextlib.ExitStack() as whole:
        for module in [student, *(m for t in [teacher, *frozen.values()] if t is not None for m in t.modules())]:
            whole.enter_context(engine.gathered(module))
        objective.setup(SetupContext(student=student, teacher=teacher, student_tokenizer=student_tokenizer,
                                     teacher_tokenizer=teacher_tokenizer, same_tokenizer=same,
                                     student_pretrained=cfg.student.init != "random", frozen=frozen))
    reports = [r for r in (prepared.train_report, prepared.dev_report) if r is not None]
    return Parts(objective, student, teacher, student_tokenizer, teacher_tokenizer, train_set, dev_set, reports,
                 aligner, frozen)


def check_needs(cfg: RunConfig, needs: Needs) -> None:
    """Refuse a run that cannot give the objective what it declares (methods/needs.py), before anything loads:
    a teacher and the capabilities it reads (as far as the teacher's kind says before it opens), the frozen
    models of its roles, and a source that fits its data."""
    name = cfg.objective.name
    if needs.distills and cfg.teacher is None:
        raise ConfigError(f"objective `{name}` needs a teacher: set `teacher.path`")
    known = cfg.teacher.provides() if needs.distills and cfg.teacher is not None else None
    gap = needs.missing(known[1]) if known is not None else None
    if known is not None and gap:
        what, gives = known
        raise ConfigError(f"objective `{name}` reads the teacher's "
                          f"{' and '.join(CAPABILITIES[c] for c in sorted(gap))}"
                          + (f" ({needs.why} reads them)" if needs.why else "")
                          + f", which {what} cannot give (it gives: "
                          f"{', '.join(CAPABILITIES[c] for c in sorted(gives))}); {cfg.teacher.cure(gap, name)}")
    missing = [r for r in needs.frozen if r not in cfg.teachers]
    if missing:
        raise ConfigError(f"objective `{name}` needs " + "; ".join(
            f"`teachers.{r}.path`: {needs.frozen[r]}" for r in missing))
    unused = sorted(set(cfg.teachers) - set(needs.frozen))
    if unused:
        raise ConfigError(f"teachers.{unused[0]}: objective `{name}` reads no such model "
                          f"(it reads: {sorted(needs.frozen) or 'none'})")
    if cfg.source.kind in ("on_policy", "replay") and not needs.trains_on_samples:
        what = "trains on preference pairs, whose responses are data" if needs.data == "pairs" else "has none"
        raise ConfigError(f"source.kind={cfg.source.kind}: student samples train an objective's distillation terms, "
                          f"and `{name}` {what}; use a distillation objective (kd, dskd, dskdv2, ...) or "
                          "source.kind: off_policy")


def _frozen_teachers(cfg: RunConfig, needs: Needs, student_tokenizer: Any, site: TeacherSite
                     ) -> dict[str, Teacher]:
    """The objective's extra frozen models (`teachers.<role>`), opened as teachers; each must read the
    student's tokens."""
    frozen = {}
    for role in needs.frozen:
        spec, field = cfg.teachers[role], f"teachers.{role}"
        tokenizer = spec.load_tokenizer(field)
        if not same_vocabulary(student_tokenizer, tokenizer):
            raise ConfigError(f"{field}: its tokenizer differs from the student's; this objective needs one")
        frozen[role] = open_teacher(spec, replace(site, field=field), tokenizer)
    return frozen
