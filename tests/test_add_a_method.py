"""Adding a method that reads what teachers already give: its file (config + objective) and one registry line
(`METHODS`), as README's "Adding a method" shows. Here: squared error between the student's and the teacher's
log-probabilities of the teacher's top-k tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from torch import Tensor, nn

from dualkd.config import load_config, validate_config
from dualkd.data.collate import Batch
from dualkd.errors import ConfigError
from dualkd.lm import lm_forward
from dualkd.losses import token_cross_entropy
from dualkd.losses.sparse import TopKTargets
from dualkd.methods import METHODS, Needs, Objective, StepNorm
from dualkd.methods.base import SetupContext
from dualkd.methods.common import DistillationConfig
from dualkd.models import head_rows
from dualkd.teachers import Teacher
from dualkd.train.loop import train
from tests.helpers import read_metrics, tiny_run

# ---- the method's file -------------------------------------------------------------------------------------

class TopKSquaredConfig(DistillationConfig):
    name: Literal["topk_squared"] = "topk_squared"
    k: int = 4


class TopKSquared(Objective):
    """L = (1 − r)·CE + r·Σ_t Σ_{i ∈ top-k(p_t)} (log q_t,i − log p_t,i)² / #tokens."""

    config: TopKSquaredConfig

    def needs(self) -> Needs:
        return Needs(teacher=(frozenset({"topk"}),))

    def setup(self, ctx: SetupContext) -> None:
        assert ctx.teacher is not None and ctx.same_tokenizer
        self.vocab_size = min(head_rows(ctx.student), ctx.teacher.vocab_rows)

    def teacher_forward(self, teacher: Teacher, batch: Batch) -> TopKTargets:
        return teacher.topk(batch.student, batch.indices, self.config.k, self.vocab_size)

    def forward(self, student: nn.Module, batch: Batch, teacher_out: TopKTargets, norm: StepNorm
                ) -> tuple[Tensor, dict[str, Tensor]]:
        tokens = batch.student
        logits = lm_forward(student, tokens).logits  # [B, T, V]
        ce = token_cross_entropy(logits, tokens.labels, tokens.loss_mask)
        logq = torch.log_softmax(logits[tokens.loss_mask].float(), -1).gather(1, teacher_out.ids)  # [N, k]
        kd = ((logq - teacher_out.logprobs) ** 2).sum()
        n = norm["tokens"]
        return norm.blend(ce, kd, self.config.kd_rate) / n, {"ce": ce.detach() / n, "kd": kd.detach() / n}


# ---- the test ----------------------------------------------------------------------------------------------

@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(METHODS, "topk_squared", (TopKSquaredConfig, TopKSquared))  # the one registry line


def test_a_registered_method_trains_from_its_config(registered: None, tmp_path: Path, train_file: Path,
                                                    byte_tokenizer_dir: Path, teacher_dir: Path) -> None:
    raw = tiny_run(tmp_path / "run", train_file, byte_tokenizer_dir, teacher=teacher_dir,
                   objective={"name": "topk_squared", "kd_rate": 0.5, "k": 3}, optimization={"max_steps": 8})
    cfg = validate_config(raw)
    assert type(cfg.objective) is TopKSquaredConfig and cfg.objective.k == 3
    run = train(cfg)
    rows = read_metrics(run)
    assert len(rows) == 8 and rows[-1]["kd"] < rows[0]["kd"]
    assert load_config(run / "config.yaml").objective == cfg.objective  # the resolved config reads back
    raw["objective"]["kk"] = 2
    with pytest.raises(ConfigError, match=r"objective\.kk: unknown key \(did you mean `k`\?\)"):
        validate_config(raw)


def test_its_needs_are_checked_before_loading(registered: None, tmp_path: Path, train_file: Path,
                                              byte_tokenizer_dir: Path) -> None:
    raw: dict[str, Any] = tiny_run(tmp_path / "run", train_file, byte_tokenizer_dir,
                                   objective={"name": "topk_squared"})
    with pytest.raises(ConfigError, match="objective `topk_squared` needs a teacher"):
        train(validate_config(raw))
