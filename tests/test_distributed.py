"""Two CPU processes (gloo) under each engine follow the single-process loss curve for the same global batch,
and a run checkpointed under the engine resumes to the same curve.

DDP is launched with torchrun (`accelerate launch --cpu --num_processes 2` silently runs one process);
DeepSpeed ZeRO-2 and ZeRO-3 with `accelerate launch --config_file configs/accelerate/zero{2,3}.yaml`, the
files users launch with. FSDP2 needs GPUs (accelerate sets FSDP up only for GPU-like devices): its test runs
where two GPUs are visible; on CPU, an FSDP launch is refused with a clear error (tested).

Start-up (imports, ~8 s a process on 2 CPU cores) is most of a tiny run's time, so runs are made once and
read by several tests (module fixtures), and the head-reading cases train one after the other under one
launch per engine (tests/train_several.py; several runs in one process group is supported: `Engine.end`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers import REPO, make_model_dir, read_metrics, tiny_run

NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
STEPS = 6
ENGINES = {  # name -> launcher prefix (before `-m dualkd.cli ...`)
    "ddp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "zero2": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "configs/accelerate/zero2.yaml"), "--num_processes", "2", "--main_process_port", "0"],
    "zero3": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "configs/accelerate/zero3.yaml"), "--num_processes", "2", "--main_process_port", "0"],
    # every parameter partitioned, however small (tests/data/accelerate/zero3-no-persistence.yaml)
    "zero3_all": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(REPO / "tests/data/accelerate/zero3-no-persistence.yaml"), "--num_processes", "2",
                  "--main_process_port", "0"],
    "fsdp2": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "configs/accelerate/fsdp2.yaml"), "--num_processes", "2", "--main_process_port", "0"],
}
# FSDP2 on CPU processes: torch's fully_shard driven directly (accelerate sets FSDP up only for GPUs)
FSDP2_CPU = [*ENGINES["ddp"], str(REPO / "tests" / "fsdp2_train_worker.py")]
NAMES = {"ddp": "DDP", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3", "zero3_all": "DeepSpeed ZeRO-3",
         "fsdp2": "FSDP2",
         "fsdp2_cpu": "FSDP2"}
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed not installed (`make install` installs it)")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP runs on GPUs only (2 needed)")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory, byte_tokenizer_dir: Path) -> Path:
    """The student starts from saved weights, as in real KD: random init under ZeRO-3 draws differently (each
    process initializes its own partition), which would make the curves differ from step 1 for that reason."""
    return make_model_dir(tmp_path_factory.mktemp("student"), byte_tokenizer_dir, seed=3, **NO_DROPOUT)


def _write(tmp_path: Path, name: str, train_file: Path, student: Path, teacher: Path, micro: int, accum: int,
           placement: str = "auto", dev_file: Path | None = None, objective: dict | None = None,
           extra: dict | None = None) -> Path:
    cfg = tiny_run(tmp_path / name, train_file, student, teacher=teacher,
                   optimization={"max_steps": STEPS, "micro_batch_size": micro, "grad_accum": accum},
                   checkpoint={"every_steps": 3, "keep_last": 2},
                   # 24 dev examples in 5 batches: the processes get 3 and 2 (sharded engines pad, see
                   # sources.eval_batches); 3 ROUGE-L prompts likewise; `best/` is chosen by ROUGE-L
                   eval={"every_steps": 3, "batch_size": 5, "select_by": "rougeL", "rouge_examples": 3,
                         "rouge_repeats": 1},
                   generation={"max_new_tokens": 8})
    cfg["data"]["dev"] = str(dev_file)
    cfg["student"] = {"path": str(student)}
    cfg["teacher"]["placement"] = placement
    if objective is not None:
        cfg["objective"] = objective
    cfg.update(extra or {})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(engine: str, *args: str) -> subprocess.CompletedProcess:
    command = FSDP2_CPU if engine == "fsdp2_cpu" else [*ENGINES[engine], "-m", "dualkd.cli"]
    done = subprocess.run([*command, *args], env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-6000:]
    return done


def _train_several(engine: str | None, configs: list[Path], *flags: str) -> str:
    """Train `configs` one after the other in one launch of `engine` (None: one process, no launcher); start-up
    is most of a tiny run's time. Returns what the processes wrote to stderr."""
    several = str(REPO / "tests" / "train_several.py")
    if engine == "fsdp2_cpu":
        command = [*FSDP2_CPU, "train", *flags]
    else:
        command = [*(ENGINES[engine] if engine else [sys.executable]), several, *flags]
    done = subprocess.run([*command, *map(str, configs)], env=_env(), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-6000:]
    return done.stderr


def _resumable_copy(run: Path, cfg: Path) -> Path:
    """A copy of the 6-step run `run` cut back to its step-3 checkpoint, and its config (returned)."""
    resumed = run.with_name(f"{run.name}-resumed")
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000006")
    shutil.rmtree(resumed / "final")
    (resumed / "summary.json").unlink()
    resumed_cfg = cfg.with_name(f"{resumed.name}.yaml")
    resumed_cfg.write_text(cfg.read_text().replace(str(run), str(resumed)))
    return resumed_cfg


def _assert_like_one_process(engine: str, said: str, single: Path, double: Path, resumed: Path) -> None:
    """`double` (2 processes under `engine`) follows the one-process curve `single` for the same global batch,
    checkpoints each rank's RNG, and `resumed` (from its step-3 checkpoint under the engine) repeats steps 4-6."""
    said = said.replace("\n", " ")  # the console wraps long lines at spaces
    assert re.search(rf"2 process\(es\) on \S+ \({NAMES[engine]}\); global batch 8 \(2 x 2 x 2\)", said), said[-3000:]

    # the same loss curve as one process with the same global batch
    a, b = read_metrics(single), read_metrics(double)
    assert len(a) == len(b) == STEPS
    for ra, rb in zip(a, b):
        assert ra["tokens"] == rb["tokens"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-6)
        assert ra["lr"] == pytest.approx(rb["lr"])
    dev_a, dev_b = read_metrics(single, "dev"), read_metrics(double, "dev")
    assert [d["step"] for d in dev_a] == [d["step"] for d in dev_b] == [3, 6]
    for da, db in zip(dev_a, dev_b):  # the dev loss is the same; ROUGE-L samples differ by process layout
        assert da["loss"] == pytest.approx(db["loss"], rel=1e-5)
        assert 0.0 <= db["rougeL"] <= 100.0
    pa = load_file(str(single / "final" / "model.safetensors"))
    pb = load_file(str(double / "final" / "model.safetensors"))
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], atol=1e-5, rtol=1e-4)
    ckpt = double / "checkpoints" / "step-00000003"
    assert (ckpt / "rng-rank0.pt").exists() and (ckpt / "rng-rank1.pt").exists()

    # resumed under the engine from the step-3 checkpoint: steps 4-6 as in the uninterrupted run
    after = read_metrics(resumed)[-3:]
    assert [r["step"] for r in after] == [4, 5, 6]
    for ra, rb in zip(b[3:], after):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-6)
    pr = load_file(str(resumed / "final" / "model.safetensors"))
    for k in pb:
        torch.testing.assert_close(pb[k], pr[k], atol=1e-6, rtol=1e-5)


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


@pytest.fixture(scope="module")
def cross_teacher(tmp_path_factory: pytest.TempPathFactory, meta_tokenizer_dir: Path) -> Path:
    """A Llama-style teacher (d=48) with the SentencePiece-style tokenizer: vocabularies differ."""
    return make_model_dir(tmp_path_factory.mktemp("cross_teacher"), meta_tokenizer_dir, model_type="llama",
                          hidden_size=48, intermediate_size=96, seed=2)


@pytest.fixture(scope="module")
def write_case(tmp_path_factory: pytest.TempPathFactory, train_file: Path, dev_file: Path, teacher_dir: Path,
               cross_teacher: Path, student_dir: Path, byte_tokenizer_dir: Path):  # noqa: ANN201
    """`write_case(folder, name, case, micro, accum, placement)`: a head-reading case's run config."""
    reverse = make_model_dir(tmp_path_factory.mktemp("reverse"), byte_tokenizer_dir, seed=5, **NO_DROPOUT)

    def write(folder: Path, name: str, case: str, micro: int, accum: int, placement: str = "auto") -> Path:
        teacher = cross_teacher if case in CROSS else teacher_dir
        extra = {"teachers": {"reverse": {"path": str(reverse)}}} if case == "aligndistil" else None
        folder.mkdir(parents=True, exist_ok=True)
        return _write(folder, name, train_file, student_dir, teacher, micro=micro, accum=accum, placement=placement,
                      dev_file=dev_file, objective=HEAD_READERS[case], extra=extra)
    return write


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory, train_file: Path, dev_file: Path, teacher_dir: Path,
               student_dir: Path, write_case) -> dict[str, Path]:  # noqa: ANN001
    """The one-process runs every multi-process run is held to (4 micro-batches of 2: global batch 8): "kd"
    (the default objective) and each head-reading case, trained in one process one after the other."""
    tmp = tmp_path_factory.mktemp("single")
    (tmp / "kd").mkdir()
    configs = {"kd": _write(tmp / "kd", "single", train_file, student_dir, teacher_dir, micro=2, accum=4,
                            dev_file=dev_file)}
    configs.update({case: write_case(tmp / case, "single", case, micro=2, accum=4) for case in HEAD_READERS})
    _train_several(None, list(configs.values()))
    return {case: tmp / case / "single" for case in configs}


@pytest.fixture(scope="module")
def launched_runs(tmp_path_factory: pytest.TempPathFactory, train_file: Path, dev_file: Path, teacher_dir: Path,
                  student_dir: Path):  # noqa: ANN201
    """`launched_runs(engine, placement)`: the default objective's run under `engine`, launched as users launch
    (`-m dualkd.cli train CONFIG`), and its copy resumed from step 3 (`--resume`); made once per engine.
    Returns what the first launch said, the run's config and its folder (the copy: "<folder>-resumed")."""
    made: dict[tuple[str, str], tuple[str, Path, Path]] = {}

    def runs(engine: str, placement: str) -> tuple[str, Path, Path]:
        if (engine, placement) not in made:
            tmp = tmp_path_factory.mktemp(f"launched-{engine}-{placement}")
            cfg = _write(tmp, "double", train_file, student_dir, teacher_dir, micro=2, accum=2, placement=placement,
                         dev_file=dev_file)
            said = _launch(engine, "train", str(cfg)).stderr
            _launch(engine, "train", str(_resumable_copy(tmp / "double", cfg)), "--resume")
            made[engine, placement] = said, cfg, tmp / "double"
        return made[engine, placement]
    return runs


@pytest.mark.distributed
@pytest.mark.parametrize(("engine", "placement"), [
    ("ddp", "same"),
    pytest.param("zero2", "same", marks=needs_deepspeed),
    pytest.param("zero3", "sharded", marks=needs_deepspeed),  # the teacher as a frozen ZeRO-3 model
    pytest.param("fsdp2", "same", marks=needs_two_gpus),
    pytest.param("fsdp2", "sharded", marks=needs_two_gpus),
])
def test_two_processes_match_one(engine: str, placement: str, references: dict[str, Path], launched_runs) -> None:  # noqa: ANN001
    said, _, run = launched_runs(engine, placement)
    _assert_like_one_process(engine, said, references["kd"], run, run.with_name("double-resumed"))


@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fsdp_on_cpu_is_refused(tmp_path: Path, train_file: Path, dev_file: Path, teacher_dir: Path,
                                student_dir: Path) -> None:
    cfg = _write(tmp_path, "fsdp", train_file, student_dir, teacher_dir, micro=2, accum=2, dev_file=dev_file)
    done = subprocess.run([*ENGINES["fsdp2"], "-m", "dualkd.cli", "train", str(cfg)], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "FSDP needs GPUs" in done.stderr


@pytest.mark.distributed
def test_fsdp2_state_helpers_on_cpu(tmp_path: Path) -> None:
    """The engine's FSDP2 checkpoint pieces, on a model sharded by torch itself over 2 CPU processes: whole
    parameters for export, the optimizer state gathered and loaded back, the step after a reload = the step
    without one."""
    out = tmp_path / "fsdp2.json"
    done = subprocess.run([*ENGINES["ddp"], str(REPO / "tests" / "fsdp2_worker.py"), str(out)], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["same_after_shard"] and result["restored"]
    assert result["state_keys"] == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert result["moved"] > 1e-4  # the second step changed the parameters ...
    assert result["max_diff"] == 0.0  # ... and repeats exactly after the reload


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory: pytest.TempPathFactory, write_case):  # noqa: ANN001, ANN201
    """`sharded_runs(engine)`: every head-reading case trained with the student and the teacher(s) sharded under
    `engine`, all in one launch, then each resumed from its step-3 checkpoint in a second launch; made once per
    engine. Returns what the first launch said and {case: its run folder}."""
    made: dict[str, tuple[str, dict[str, Path]]] = {}

    def runs(engine: str) -> tuple[str, dict[str, Path]]:
        if engine not in made:
            tmp = tmp_path_factory.mktemp(f"sharded-{engine}")
            configs = {case: write_case(tmp / case, "double", case, micro=2, accum=2, placement="sharded")
                       for case in HEAD_READERS}
            said = _train_several(engine, list(configs.values()))
            _train_several(engine, [_resumable_copy(tmp / case / "double", cfg) for case, cfg in configs.items()],
                           "--resume")
            made[engine] = said, {case: tmp / case for case in HEAD_READERS}
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
    said, runs = sharded_runs(engine)
    _assert_like_one_process(engine, said, references[case], runs[case] / "double", runs[case] / "double-resumed")


class _Payload:
    """A pickle that runs a command when unpickled (what an attacker would plant)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.distributed
@needs_deepspeed
def test_a_planted_pickle_in_a_deepspeed_checkpoint_never_runs(tmp_path: Path, launched_runs) -> None:  # noqa: ANN001
    """The manifest beside DeepSpeed's files is rewritten too (whoever can plant a file can): the resume must
    still refuse, naming the file, and nothing in it may run. (On a copy of the ZeRO-2 run cut back to step 3.)"""
    from dualkd.train.checkpoint import write_manifest

    _, launched_cfg, run = launched_runs("zero2", "same")
    mine = tmp_path / "zero2"
    shutil.copytree(run, mine)
    (tmp_path / "zero2.yaml").write_text(launched_cfg.read_text().replace(str(run), str(mine)))
    cfg = _resumable_copy(mine, tmp_path / "zero2.yaml")
    folder = tmp_path / "zero2-resumed" / "checkpoints" / "step-00000003" / "deepspeed"
    target = next((folder / "state").glob("zero_pp_rank_0_*optim_states.pt"))
    state = torch.load(target, weights_only=False)  # our own file, written by the launched run
    marker = tmp_path / "PWNED"
    state["planted"] = _Payload(marker)
    torch.save(state, target)
    write_manifest(folder)
    done = subprocess.run([*ENGINES["zero2"], "-m", "dualkd.cli", "train", str(cfg), "--resume"], env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "unsupported GLOBAL posix.system" in done.stderr and target.name in done.stderr
    assert not marker.exists()
