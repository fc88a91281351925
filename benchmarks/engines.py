"""One KD run under each engine, side by side: step time, throughput, the time split, peak memory per process.

    python benchmarks/engines.py                          # SmolLM2-135M-Instruct <- itself, Dolly, 2 processes
    python benchmarks/engines.py --steps 12 --engines single,ddp,zero2,zero3
    python benchmarks/engines.py --teacher PATH --student PATH --engines ddp,zero3,fsdp2   # on a GPU machine
    python benchmarks/engines.py --qwen2-vocab --engines zero3 --fused off,on   # fused vs logits, V = 151,936

Every engine runs the same config (`kd`; `--fused off` by default: materialized logits; micro-batch 2 x
accumulation 2 per process; `single` is one process with accumulation 4, the same global batch) through the
launch line users
type (`torchrun` for DDP on CPU, `accelerate launch --config_file configs/accelerate/<engine>.yaml` otherwise).
Figures are medians over the steps after the first two (warm-up), read from each run's metrics.jsonl: step
seconds, input tokens per second (global batch), the data/teacher/student/optimizer split, and the peak memory
of the main process (max RSS on CPU, max allocated on GPU). Each engine is its own launch (several processes),
so engines cannot be interleaved in one process as the other benchmarks' variants are: the steps of one run
are its repetitions (step time min / median / max), and the load average is read at the start (it must be
below 0.5: nothing else running) and after each run (a run's own processes make up to their count).
Needs ../shared/tools/real-models and ../shared/data/dolly.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.harness

from benchmarks.harness import QUIET_LOAD, load_average, start_load  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("DUALKD_REAL_MODELS", Path.home() / ".cache" / "dualkd-real"))
DATA = REPO.parent / "shared" / "data" / "dolly" / "train.jsonl"
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--main_process_port", "0"]
LAUNCH = {
    "single": [sys.executable],
    "ddp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "zero2": [*ACCELERATE, "--config_file", str(REPO / "configs/accelerate/zero2.yaml")],
    "zero3": [*ACCELERATE, "--config_file", str(REPO / "configs/accelerate/zero3.yaml")],
    "fsdp2": [*ACCELERATE, "--config_file", str(REPO / "configs/accelerate/fsdp2.yaml")],
}


def tiny_pair(root: Path, tokenizer: Path) -> tuple[str, str]:
    """A random-init 2-layer Qwen2 student (d 64) and teacher (d 96) on a real tokenizer's full vocabulary:
    models whose memory is dominated by [tokens, V] logits, saved as folders (the teacher is loaded from one)."""
    from transformers import AutoTokenizer

    from dualkd.config import ModelConfig
    from dualkd.models import load_model

    tok = AutoTokenizer.from_pretrained(tokenizer)
    paths = []
    for name, d, seed in (("student", 64, 0), ("teacher", 96, 1)):
        arch = {"model_type": "qwen2", "num_hidden_layers": 2, "hidden_size": d, "intermediate_size": 2 * d,
                "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 1024}
        model = load_model(ModelConfig(init="random", arch=arch, tokenizer=str(tokenizer)), tok, role=name, seed=seed)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths.append(str(root / name))
    return paths[0], paths[1]


def run(engine: str, fused: str, args: argparse.Namespace, root: Path) -> dict[str, float]:
    out = root / f"{engine}-fused-{fused}"
    processes = 1 if engine == "single" else 2
    cfg = {"output_dir": str(out), "seed": 1, "student": {"path": args.student},
           "teacher": {"path": args.teacher, "placement": "sharded" if engine == "zero3" else "same"},
           "data": {"train": str(DATA), "max_examples": 256, "max_length": args.max_length,
                    "max_prompt_length": args.max_length // 2},
           "objective": {"name": "kd", "fused": fused},
           "optimization": {"max_steps": args.steps, "micro_batch_size": 2, "grad_accum": 4 // processes,
                            "lr": 1e-5, "warmup_steps": 0},
           "checkpoint": {"every_steps": 10_000}, "eval": {"every_steps": 10_000},
           "logging": {"every_steps": 1, "tensorboard": False, "progress_bar": "off"}}
    path = root / f"{engine}-fused-{fused}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // processes)),
           "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([*LAUNCH[engine], "-m", "dualkd.cli", "train", str(path)], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}  # type: ignore
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["kind"] == "train"][2:]
    med = {k: statistics.median(r[k] for r in rows) for k in ("step_time", "tokens_per_s", "peak_mem_mib",
                                                                 "time/data", "time/teacher", "time/student",
                                                                 "time/optimizer")}
    med["loss_last"] = rows[-1]["loss"]
    med["step_min"], med["step_max"] = min(r["step_time"] for r in rows), max(r["step_time"] for r in rows)
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="single,ddp,zero2,zero3")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--student", default=str(MODELS / "smollm2-135m-instruct"))
    ap.add_argument("--teacher", default=str(MODELS / "smollm2-135m-instruct"))
    ap.add_argument("--fused", default="off", help="kd's `fused` settings to run under each engine: off, on or "
                    "off,on (the fused loss vs materialized logits)")
    ap.add_argument("--qwen2-vocab", action="store_true", help="instead of --student/--teacher: tiny random Qwen2 "
                    "models on the Qwen2 tokenizer (V = 151,936), where the logits dominate memory")
    args = ap.parse_args()
    start = start_load()
    root = Path(tempfile.mkdtemp(prefix="dualkd-bench-engines-"))
    if args.qwen2_vocab:
        args.student, args.teacher = tiny_pair(root, MODELS / "tokenizers" / "qwen2")
    print(f"student {args.student}\nteacher {args.teacher}\nkd (fused {args.fused}), global batch 8 (2 processes "
          f"x 2 x 2; single: 1 x 2 x 4), max length {args.max_length}, {args.steps} steps, medians after 2 "
          f"warm-up steps; load average {start:.2f} at the start"
          + ("" if start <= QUIET_LOAD else " - SHARED MACHINE: these figures are not figures") + "\n")
    print("| engine | fused | step s (min / median / max) | tokens/s | data | teacher | student | optimizer "
          "| peak MiB (rank 0) | last loss | load after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    peaks: dict[str, dict[str, float]] = {}
    for engine in args.engines.split(","):
        for fused in args.fused.split(","):
            m = run(engine, fused, args, root)
            if "error" in m:
                print(f"| {engine} | {fused} | failed: {m['error']} |")
                continue
            peaks.setdefault(engine, {})[fused] = m["peak_mem_mib"]
            split = [f"{m[f'time/{k}'] / m['step_time']:.0%}" for k in ("data", "teacher", "student", "optimizer")]
            print(f"| {engine} | {fused} | {m['step_min']:.2f} / {m['step_time']:.2f} / {m['step_max']:.2f} | "
                  f"{m['tokens_per_s']:.0f} | " + " | ".join(split)
                  + f" | {m['peak_mem_mib']:.0f} | {m['loss_last']:.4f} | {load_average():.2f} |", flush=True)
    for engine, peak in peaks.items():
        if "on" in peak and "off" in peak:
            print(f"{engine}: peak memory, fused ÷ materialized logits: {peak['on'] / peak['off']:.2f}")


if __name__ == "__main__":
    main()
