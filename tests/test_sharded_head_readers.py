"""The objectives that read LM heads outside the models' own forward (fused KD, the DSKD projectors, AlignDistil's
heads) under the sharding engines, with the student and the teacher(s) sharded: the one-process loss curve,
resume and export, as tests/test_distributed.py checks the default objective under each launch line.

Each engine trains every case one after the other under one launch, then resumes every case under a second
(tests/train_several.py): start-up, not training, is most of a tiny run's time (tests/launch.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import NO_DROPOUT, make_model_dir
from tests.launch import (
    assert_like_one_process,
    needs_deepspeed,
    resumable_copy,
    train_here,
    train_several,
    write,
)

# what reads an LM head outside the models' own logits: the fused losses (the student's head through
# `lm.through_head`, the teacher's gathered once per micro-batch), the DSKD projectors, and AlignDistil (the
# student's head through `through_head`, its DPO and reverse models' heads through the teacher protocol)
HEAD_READERS = {
    "kd_fused": {"name": "kd", "kd_rate": 0.5, "temperature": 2.0, "fused": "on"},
    "dskd": {"name": "dskd", "temperature": 2.0},
    "dskdv2": {"name": "dskdv2", "temperature": 2.0},
    "dskdv2_eta": {"name": "dskdv2", "temperature": 2.0, "pinv_init": True},  # different tokenizers from here
    "dskd_cma": {"name": "dskd_cma", "temperature": 2.0},
    "uld": {"name": "uld"},
    "mined": {"name": "mined", "temperature": 2.0},
    "aligndistil": {"name": "aligndistil", "kd_rate": 0.5},
}
CROSS = {"dskdv2_eta", "dskd_cma", "uld", "mined"}
# the case whose dev evaluations also sample (ROUGE-L): sampling is the student's `generate` under the engine,
# the same whatever the objective, so one case per engine samples and the others select `best/` by dev loss
SAMPLES = "kd_fused"


@pytest.fixture(scope="module")
def cross_teacher(tmp_path_factory: pytest.TempPathFactory, meta_tokenizer_dir: Path) -> Path:
    """A Llama-style teacher (d=48) with the SentencePiece-style tokenizer: vocabularies differ."""
    return make_model_dir(tmp_path_factory.mktemp("cross_teacher"), meta_tokenizer_dir, model_type="llama",
                          hidden_size=48, intermediate_size=96, seed=2)


@pytest.fixture(scope="module")
def write_case(tmp_path_factory: pytest.TempPathFactory, train_file: Path, dev_file: Path, teacher_dir: Path,
               cross_teacher: Path, student_dir: Path, byte_tokenizer_dir: Path):  # noqa: ANN201
    """`write_case(folder, name, case, micro, accum, placement)`: a head-reading case's run config (written)."""
    reverse = make_model_dir(tmp_path_factory.mktemp("reverse"), byte_tokenizer_dir, seed=5, **NO_DROPOUT)

    def case_config(folder: Path, name: str, case: str, micro: int, accum: int, placement: str = "auto") -> Path:
        teacher = cross_teacher if case in CROSS else teacher_dir
        extra = {"teachers": {"reverse": {"path": str(reverse)}}} if case == "aligndistil" else None
        folder.mkdir(parents=True, exist_ok=True)
        return write(folder, name, train_file, student_dir, teacher, micro=micro, accum=accum, placement=placement,
                     dev_file=dev_file, objective=HEAD_READERS[case], extra=extra, rouge=case == SAMPLES)
    return case_config


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory, write_case) -> dict[str, Path]:  # noqa: ANN001
    """Each case's one-process run (4 micro-batches of 2: global batch 8), all trained in one process."""
    tmp = tmp_path_factory.mktemp("single")
    train_here([write_case(tmp / case, "single", case, micro=2, accum=4) for case in HEAD_READERS])
    return {case: tmp / case / "single" for case in HEAD_READERS}


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory: pytest.TempPathFactory, write_case):  # noqa: ANN001, ANN201
    """`sharded_runs(engine)`: every head-reading case trained with the student and the teacher(s) sharded under
    `engine`, all in one launch, then each resumed from its halfway checkpoint in a second launch; made once per
    engine. Returns what the first launch said and the folder holding a folder per case. FSDP2 on CPU also
    checks its checkpoint helpers in the first launch (tests/fsdp2_worker.py), into `fsdp2-helpers.json` there."""
    made: dict[str, tuple[str, Path]] = {}

    def runs(engine: str) -> tuple[str, Path]:
        if engine not in made:
            tmp = tmp_path_factory.mktemp(f"sharded-{engine}")
            configs = {case: write_case(tmp / case, "double", case, micro=2, accum=2, placement="sharded")
                       for case in HEAD_READERS}
            helpers = [f"--helpers-out={tmp / 'fsdp2-helpers.json'}"] if engine == "fsdp2_cpu" else []
            said = train_several(engine, list(configs.values()), *helpers)
            train_several(engine, [resumable_copy(tmp / case / "double", cfg) for case, cfg in configs.items()],
                          "--resume")
            made[engine] = said, tmp
        return made[engine]
    return runs


@pytest.mark.distributed
@pytest.mark.parametrize("case", sorted(HEAD_READERS))
@pytest.mark.parametrize("engine", [pytest.param("zero3_all", marks=needs_deepspeed), "fsdp2_cpu"])
def test_head_readers_under_sharding_engines(engine: str, case: str, references: dict[str, Path],
                                             sharded_runs) -> None:  # noqa: ANN001
    """Fused KD, DSKD, DSKDv2 (ETA too), DSKD-CMA, ULD, MinED and AlignDistil with the student and the teacher(s)
    sharded (ZeRO-3 partitioning every parameter, with ZeRO-3 teachers: a tiny model's head would stay whole
    under DeepSpeed's default; FSDP2 on CPU, with FSDP2 teachers): the one-process loss curve, resume and
    export."""
    said, folder = sharded_runs(engine)
    assert_like_one_process(engine, said, references[case], folder / case / "double",
                            folder / case / "double-resumed", rouge=case == SAMPLES)


@pytest.mark.distributed
def test_fsdp2_state_helpers_on_cpu(sharded_runs) -> None:  # noqa: ANN001
    """The engine's FSDP2 checkpoint pieces, on a model sharded by torch itself over 2 CPU processes: whole
    parameters for export, the optimizer state gathered and loaded back, the step after a reload = the step
    without one."""
    _, folder = sharded_runs("fsdp2_cpu")
    result = json.loads((folder / "fsdp2-helpers.json").read_text())
    assert result["same_after_shard"] and result["restored"]
    assert result["state_keys"] == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert result["moved"] > 1e-4  # the second step changed the parameters ...
    assert result["max_diff"] == 0.0  # ... and repeats exactly after the reload
