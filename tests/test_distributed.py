"""Two CPU processes (gloo) under each engine follow the single-process loss curve for the same global batch,
and a run checkpointed under the engine resumes to the same curve.

DDP is launched with torchrun (`accelerate launch --cpu --num_processes 2` silently runs one process);
DeepSpeed ZeRO-2 and ZeRO-3 with `accelerate launch --config_file configs/accelerate/zero{2,3}.yaml`, the
files users launch with. FSDP2 needs GPUs (accelerate sets FSDP up only for GPU-like devices): its test runs
where two GPUs are visible; on CPU, an FSDP launch is refused with a clear error (tested).
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


@pytest.fixture(scope="module")
def single_run(tmp_path_factory: pytest.TempPathFactory, train_file: Path, dev_file: Path, teacher_dir: Path,
               student_dir: Path) -> Path:
    """The reference: one process, 4 micro-batches of 2 per step (global batch 8)."""
    tmp = tmp_path_factory.mktemp("single")
    cfg = _write(tmp, "single", train_file, student_dir, teacher_dir, micro=2, accum=4, dev_file=dev_file)
    subprocess.run([sys.executable, "-m", "dualkd.cli", "train", str(cfg)], env=_env(), check=True,
                   capture_output=True)
    return tmp / "single"


def _check_engine(engine: str, placement: str, tmp_path: Path, single: Path, train_file: Path, dev_file: Path,
                  teacher_dir: Path, student_dir: Path, objective: dict | None = None, extra: dict | None = None
                  ) -> None:
    cfg = _write(tmp_path, "double", train_file, student_dir, teacher_dir, micro=2, accum=2, placement=placement,
                 dev_file=dev_file, objective=objective, extra=extra)
    done = _launch(engine, "train", str(cfg))
    said = done.stderr.replace("\n", " ")  # the console wraps long lines at spaces
    assert re.search(rf"2 process\(es\) on \S+ \({NAMES[engine]}\); global batch 8 \(2 x 2 x 2\)", said), said[-3000:]

    # the same loss curve as one process with the same global batch
    a, b = read_metrics(single), read_metrics(tmp_path / "double")
    assert len(a) == len(b) == STEPS
    for ra, rb in zip(a, b):
        assert ra["tokens"] == rb["tokens"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-6)
        assert ra["lr"] == pytest.approx(rb["lr"])
    dev_a, dev_b = read_metrics(single, "dev"), read_metrics(tmp_path / "double", "dev")
    assert [d["step"] for d in dev_a] == [d["step"] for d in dev_b] == [3, 6]
    for da, db in zip(dev_a, dev_b):  # the dev loss is the same; ROUGE-L samples differ by process layout
        assert da["loss"] == pytest.approx(db["loss"], rel=1e-5)
        assert 0.0 <= db["rougeL"] <= 100.0
    pa = load_file(str(single / "final" / "model.safetensors"))
    pb = load_file(str(tmp_path / "double" / "final" / "model.safetensors"))
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], atol=1e-5, rtol=1e-4)
    ckpt = tmp_path / "double" / "checkpoints" / "step-00000003"
    assert (ckpt / "rng-rank0.pt").exists() and (ckpt / "rng-rank1.pt").exists()

    # resume under the engine from the step-3 checkpoint: steps 4-6 as in the uninterrupted run
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "double", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000006")
    shutil.rmtree(resumed / "final")
    (resumed / "summary.json").unlink()
    text = cfg.read_text().replace(str(tmp_path / "double"), str(resumed))
    resumed_cfg = tmp_path / "resumed.yaml"
    resumed_cfg.write_text(text)
    _launch(engine, "train", str(resumed_cfg), "--resume")
    after = read_metrics(resumed)[-3:]
    assert [r["step"] for r in after] == [4, 5, 6]
    for ra, rb in zip(b[3:], after):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-6)
    pr = load_file(str(resumed / "final" / "model.safetensors"))
    for k in pb:
        torch.testing.assert_close(pb[k], pr[k], atol=1e-6, rtol=1e-5)


@pytest.mark.distributed
@pytest.mark.parametrize(("engine", "placement"), [
    ("ddp", "same"),
    pytest.param("zero2", "same", marks=needs_deepspeed),
    pytest.param("zero3", "sharded", marks=needs_deepspeed),  # the teacher as a frozen ZeRO-3 model
    pytest.param("fsdp2", "same", marks=needs_two_gpus),
    pytest.param("fsdp2", "sharded", marks=needs_two_gpus),
])
def test_two_processes_match_one(engine: str, placement: str, tmp_path: Path, single_run: Path, train_file: Path,
                                 dev_file: Path, teacher_dir: Path, student_dir: Path) -> None:
    _check_engine(engine, placement, tmp_path, single_run, train_file, dev_file, teacher_dir, student_dir)


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


# what reads an LM head outside the models' own logits: the fused losses (the student's head through
# `lm.through_head`, the teacher's gathered once per micro-batch) and the DSKD projectors
HEAD_READERS = {
    "kd_fused": {"name": "kd", "kd_rate": 0.5, "temperature": 2.0, "fused": "on"},
    "dskd": {"name": "dskd", "temperature": 2.0},
    "dskdv2": {"name": "dskdv2", "temperature": 2.0},
    "dskdv2_eta": {"name": "dskdv2", "temperature": 2.0, "pinv_init": True},  # different tokenizers from here
    "dskd_cma": {"name": "dskd_cma", "temperature": 2.0},
    "uld": {"name": "uld"},
    "mined": {"name": "mined", "temperature": 2.0},
}
CROSS = {"dskdv2_eta", "dskd_cma", "uld", "mined"}


@pytest.fixture(scope="module")
def cross_teacher(tmp_path_factory: pytest.TempPathFactory, meta_tokenizer_dir: Path) -> Path:
    """A Llama-style teacher (d=48) with the SentencePiece-style tokenizer: vocabularies differ."""
    return make_model_dir(tmp_path_factory.mktemp("cross_teacher"), meta_tokenizer_dir, model_type="llama",
                          hidden_size=48, intermediate_size=96, seed=2)


@pytest.fixture(scope="module")
def head_reader_reference(tmp_path_factory: pytest.TempPathFactory, train_file: Path, dev_file: Path,
                          teacher_dir: Path, cross_teacher: Path, student_dir: Path):  # noqa: ANN201
    """The one-process run of each head-reading case (4 micro-batches of 2), made once and read by both engines."""
    made: dict[str, Path] = {}

    def reference(case: str) -> Path:
        if case not in made:
            tmp = tmp_path_factory.mktemp(f"single-{case}")
            teacher = cross_teacher if case in CROSS else teacher_dir
            cfg = _write(tmp, "single", train_file, student_dir, teacher, micro=2, accum=4, dev_file=dev_file,
                         objective=HEAD_READERS[case])
            subprocess.run([sys.executable, "-m", "dualkd.cli", "train", str(cfg)], env=_env(), check=True,
                           capture_output=True)
            made[case] = tmp / "single"
        return made[case]
    return reference


@pytest.mark.distributed
@pytest.mark.parametrize("case", sorted(HEAD_READERS))
@pytest.mark.parametrize("engine", [pytest.param("zero3", marks=needs_deepspeed), "fsdp2_cpu"])
def test_head_readers_under_sharding_engines(engine: str, case: str, tmp_path: Path, train_file: Path,
                                             dev_file: Path, teacher_dir: Path, cross_teacher: Path,
                                             student_dir: Path, head_reader_reference) -> None:  # noqa: ANN001
    """Fused KD, DSKD, DSKDv2 (ETA too), DSKD-CMA, ULD and MinED with the student and the teacher sharded
    (ZeRO-3 with a ZeRO-3 teacher; FSDP2 on CPU with an FSDP2 teacher): the one-process loss curve, resume
    and export."""
    teacher = cross_teacher if case in CROSS else teacher_dir
    _check_engine(engine, "sharded", tmp_path, head_reader_reference(case), train_file, dev_file, teacher,
                  student_dir, HEAD_READERS[case])


@pytest.mark.distributed
@pytest.mark.parametrize("engine", [pytest.param("zero3_all", marks=needs_deepspeed), "fsdp2_cpu"])
def test_aligndistil_under_sharding_engines(engine: str, tmp_path: Path, train_file: Path, dev_file: Path,
                                            teacher_dir: Path, student_dir: Path, byte_tokenizer_dir: Path) -> None:
    """AlignDistil reads the student's head through `through_head` and its two frozen models' heads through the
    teacher protocol (gathered once per micro-batch): with the student, the DPO model and the reverse model
    sharded (ZeRO-3 partitioning every parameter: a tiny model's head would stay whole under DeepSpeed's
    default; FSDP2 on CPU), the one-process loss curve, resume and export."""
    reverse = make_model_dir(tmp_path / "reverse", byte_tokenizer_dir, seed=5, **NO_DROPOUT)
    objective = {"name": "aligndistil", "kd_rate": 0.5}
    extra = {"teachers": {"reverse": {"path": str(reverse)}}}
    (tmp_path / "one").mkdir()
    single = _write(tmp_path / "one", "single", train_file, student_dir, teacher_dir, micro=2, accum=4,
                    dev_file=dev_file, objective=objective, extra=extra)
    subprocess.run([sys.executable, "-m", "dualkd.cli", "train", str(single)], env=_env(), check=True,
                   capture_output=True)
    _check_engine(engine, "sharded", tmp_path, tmp_path / "one" / "single", train_file, dev_file, teacher_dir,
                  student_dir, objective, extra)


class _Payload:
    """A pickle that runs a command when unpickled (what an attacker would plant)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.distributed
@needs_deepspeed
def test_a_planted_pickle_in_a_deepspeed_checkpoint_never_runs(tmp_path: Path, train_file: Path, dev_file: Path,
                                                               teacher_dir: Path, student_dir: Path) -> None:
    """The manifest beside DeepSpeed's files is rewritten too (whoever can plant a file can): the resume must
    still refuse, naming the file, and nothing in it may run."""
    from dualkd.train.checkpoint import write_manifest

    cfg = _write(tmp_path, "zero2", train_file, student_dir, teacher_dir, micro=2, accum=2, dev_file=dev_file)
    _launch("zero2", "train", str(cfg), "optimization.max_steps=3")
    folder = tmp_path / "zero2" / "checkpoints" / "step-00000003" / "deepspeed"
    target = next((folder / "state").glob("zero_pp_rank_0_*optim_states.pt"))
    state = torch.load(target, weights_only=False)  # our own file, written by this test's run
    marker = tmp_path / "PWNED"
    state["planted"] = _Payload(marker)
    torch.save(state, target)
    write_manifest(folder)
    done = subprocess.run([*ENGINES["zero2"], "-m", "dualkd.cli", "train", str(cfg), "optimization.max_steps=6",
                           "--resume-with-changes"], env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "unsupported GLOBAL posix.system" in done.stderr and target.name in done.stderr
    assert not marker.exists()
