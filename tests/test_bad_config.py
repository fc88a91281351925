"""Config mistakes a new user makes stop before training with one message naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from dualkd.config import validate_config
from dualkd.errors import DualKDError
from dualkd.train.loop import train
from tests.helpers import tiny_run


def _student(**changes):
    def edit(cfg: dict, tmp: Path) -> None:
        cfg["student"] = {**cfg["student"], **changes}
    return edit


def _arch(**changes):
    def edit(cfg: dict, tmp: Path) -> None:
        cfg["student"]["arch"] = {**cfg["student"]["arch"], **changes}
    return edit


def _teacher_path(path: str):
    def edit(cfg: dict, tmp: Path) -> None:
        cfg["teacher"] = {"path": path}
        cfg["objective"] = {"name": "kd"}
    return edit


def _source(**source):
    def edit(cfg: dict, tmp: Path) -> None:
        cfg["source"] = source
    return edit


def _output_is_a_file(cfg: dict, tmp: Path) -> None:
    (tmp / "out.txt").write_text("not a folder")
    cfg["output_dir"] = str(tmp / "out.txt")


CASES = {  # name -> (edit of a tiny run config, the message)
    "arch typo": (_arch(n_layers=2), r"student\.arch\.n_layers: not a field of GPT2Config; did you mean 'n_layer'\?"),
    "unknown model type": (_arch(model_type="gtp2"),
                           r"student\.arch\.model_type: unknown model type 'gtp2'; did you mean gpt2"),
    "missing teacher folder": (_teacher_path("runs/no-such-teacher/final"),
                               r"teacher\.path: folder not found: runs/no-such-teacher/final"),
    "missing absolute folder": (_teacher_path("/nonexistent/teacher"), r"teacher\.path: folder not found"),
    "missing tokenizer folder": (_student(tokenizer="./no-such-tokenizer"),
                                 r"student\.tokenizer: folder not found: \./no-such-tokenizer"),
    "output_dir is a file": (_output_is_a_file, r"output_dir: .*out\.txt is a file, not a folder"),
    "a key of another source kind": (_source(kind="on_policy", replay_capacity=5),
                                     r"source\.replay_capacity: unknown key; allowed: temperature, .*, "
                                     r"student_gen_ratio"),
    "an unknown objective": (lambda cfg, tmp: cfg.update(objective={"kd_rate": 0.5}),
                             r"objective\.name: is missing; choose from \['aligndistil', 'cbmi', 'dpo', 'dskd', "),
    "an unknown source kind": (_source(kind="offline"), r"source\.kind: unknown source 'offline'; choose from "
                                                         r"\['off_policy', 'on_policy', 'replay', 'seqkd'\]"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_mistake_is_named(case: str, tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path) -> None:
    edit, message = CASES[case]
    cfg = tiny_run(tmp_path / "run", train_file, byte_tokenizer_dir)
    edit(cfg, tmp_path)
    with pytest.raises(DualKDError, match=message):
        train(validate_config(cfg))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_arch_fields_of_every_shipped_recipe_are_known() -> None:
    """The check must not refuse what the recipes (and the papers' configs) use: every arch of configs/."""
    import yaml

    from dualkd.models import check_arch

    configs = Path(__file__).parents[1] / "configs"
    checked = 0
    for path in sorted(configs.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        for section in ("student", "teacher"):
            arch = (raw.get(section) or {}).get("arch")
            if arch and "model_type" in arch:
                check_arch(arch, section)
                checked += 1
    assert checked > 0
