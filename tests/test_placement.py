"""Teacher placement (`teacher.placement`) in one process: CPU offload gives the same training as a whole
teacher; placements the engine cannot honour are refused with the reason. (Sharded teachers under ZeRO-3
run in tests/test_distributed.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from dualkd.config import validate_config
from dualkd.errors import DualKDError
from dualkd.train.loop import train
from tests.helpers import read_metrics, tiny_run


def _cfg(tmp_path: Path, name: str, train_file: Path, tok: Path, teacher: Path, placement: str, **objective):
    cfg = tiny_run(tmp_path / name, train_file, tok, teacher=teacher, optimization={"max_steps": 4})
    cfg["teacher"]["placement"] = placement
    cfg["objective"].update(objective)
    return validate_config(cfg)


def test_cpu_offloaded_teacher_trains_like_a_whole_one(tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path,
                                                      teacher_dir: Path) -> None:
    whole = read_metrics(train(_cfg(tmp_path, "same", train_file, byte_tokenizer_dir, teacher_dir, "same")))
    offloaded = read_metrics(train(_cfg(tmp_path, "off", train_file, byte_tokenizer_dir, teacher_dir, "cpu_offload")))
    assert [r["loss"] for r in whole] == pytest.approx([r["loss"] for r in offloaded], rel=1e-6)
    assert all(r["time/teacher"] > 0 for r in offloaded)  # the step timer shows the teacher's share


def test_placements_the_engine_cannot_honour_are_refused(tmp_path: Path, train_file: Path,
                                                         byte_tokenizer_dir: Path, teacher_dir: Path) -> None:
    with pytest.raises(DualKDError, match="sharded needs DeepSpeed ZeRO-3 or FSDP2"):
        train(_cfg(tmp_path, "sharded", train_file, byte_tokenizer_dir, teacher_dir, "sharded"))
    # an objective that multiplies hidden states by the teacher's LM head itself cannot use offloaded weights
    with pytest.raises(DualKDError, match="partitioned or offloaded"):
        train(_cfg(tmp_path, "fused", train_file, byte_tokenizer_dir, teacher_dir, "cpu_offload", fused="on"))
    with pytest.raises(DualKDError, match="teacher.placement"):
        _cfg(tmp_path, "typo", train_file, byte_tokenizer_dir, teacher_dir, "gpu")
