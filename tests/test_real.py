"""Slow tests on real models (../shared/tools/real-models) and real data (../shared/data); skipped when absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from dualkd.config import validate_config
from dualkd.train.loop import train
from tests.helpers import needs_real_models, needs_shared_data, read_metrics


@pytest.mark.slow
def test_kd_from_real_smollm2_on_dolly(tmp_path: Path) -> None:
    """A real 135M teacher (vocab 49,152) distilled into a tiny random student with its tokenizer, on Dolly."""
    models = needs_real_models()
    data = needs_shared_data()
    teacher = models / "smollm2-135m-instruct"
    cfg = validate_config({
        "output_dir": str(tmp_path / "run"),
        "student": {"init": "random", "tokenizer": str(teacher),
                    "arch": {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 64,
                             "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 2}},
        "teacher": {"path": str(teacher)},
        "data": {"train": str(data / "dolly" / "dev.jsonl"), "max_examples": 8, "max_length": 192,
                 "max_prompt_length": 128},
        "objective": {"name": "kd", "temperature": 2.0},
        "optimization": {"max_steps": 3, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-3},
        "logging": {"tensorboard": False, "progress_bar": "off"},
    })
    run = train(cfg)
    steps = read_metrics(run)
    assert len(steps) == 3
    assert all(0 < r["kd"] < 50 and r["ce"] > 5 for r in steps)  # random student vs a real teacher
    assert steps[-1]["time/teacher"] > 0
