"""Parity of a served teacher with the same teacher run locally: the step-1 loss and the first 20 steps.

    python benchmarks/served_parity.py --out benchmarks/results/served-parity-DATE.txt

The teacher: SmolLM2-135M-Instruct, served as its Q4_1 GGUF by `dualkd serve-teacher` (one server: top-k on
/v1/completions for `kind: server`, hidden states for `kind: hidden_server`) and run locally as the float32
folder dequantized from that GGUF (`kind: live`): the same weights, so every difference is the server's
arithmetic (quantized weights, 8-bit activations) or the protocol (top-k entries it cannot name). The student:
a 2-layer GPT-2 of SmolLM2's tokenizer, random init with the same seed in every run, trained 20 steps on 40
Dolly examples (batch 2, sequences ≤ 96 tokens, lr 1e-3). Runs, each against live and served:

- `kd` with the sparse top-8 loss (`objective.top_k: 8`), served by `kind: server`;
- `kd` with the fused full-vocabulary loss, served by `kind: hidden_server`;
- `dskdv2` (same tokenizer), served by `kind: hidden_server`.

Reported per run: the KD term at step 1 (the same student: only the teacher differs) live vs served and its
relative difference, the largest relative difference over the 20 steps, and the student's CE at step 20.
Needs the real models (`$DUALKD_REAL_MODELS`) and Dolly (`$DUALKD_DATA`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.served

from benchmarks.served import _serve  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("DUALKD_REAL_MODELS", Path.home() / ".cache" / "dualkd-real"))
DATA = Path(os.environ.get("DUALKD_DATA", REPO.parent / "shared" / "data")) / "dolly" / "train.jsonl"


def _config(out: Path, data: Path, folder: Path, teacher: dict[str, Any], objective: dict[str, Any],
            steps: int) -> dict[str, Any]:
    return {
        "output_dir": str(out), "seed": 7,
        "student": {"init": "random", "tokenizer": str(folder),
                    "arch": {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 256}},
        "teacher": teacher,
        "data": {"train": str(data), "max_length": 96, "max_prompt_length": 64},
        "objective": objective,
        "optimization": {"lr": 1e-3, "micro_batch_size": 2, "grad_accum": 1, "max_steps": steps,
                         "warmup_steps": 0},
        "checkpoint": {"every_steps": 1000},
        "logging": {"every_steps": 1000, "tensorboard": False, "progress_bar": "off"},
    }


def main() -> None:
    from dualkd.config import validate_config
    from dualkd.train.loop import train
    from tests.helpers import free_port, smollm2_gguf

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    folder = MODELS / "smollm2-135m-instruct"
    runs = {"kd top-8 (server)": ({"name": "kd", "top_k": 8, "kd_rate": 0.5}, "server"),
            "kd fused (hidden_server)": ({"name": "kd", "fused": "on", "kd_rate": 0.5}, "hidden_server"),
            "dskdv2 (hidden_server)": ({"name": "dskdv2"}, "hidden_server")}
    lines = [f"served vs live teacher, SmolLM2-135M-Instruct (Q4_1 GGUF served; its float32 dequantization live), "
             f"{args.steps} steps"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        data = tmp_path / "train.jsonl"
        data.write_text("\n".join(DATA.read_text().splitlines()[:40]) + "\n")
        port = free_port()
        server = _serve(smollm2_gguf(MODELS, tmp_path), port)
        url = f"http://127.0.0.1:{port}"
        try:
            for label, (objective, kind) in runs.items():
                curves, seconds = {}, {}
                served = {"kind": kind, "path": str(folder), "server": {"url": url, "top_k": 8, "concurrency": 2}}
                for name, teacher in (("live", {"path": str(folder)}), ("served", served)):
                    out = tmp_path / f"{label.split()[0]}-{kind}-{name}"
                    started = time.perf_counter()
                    train(validate_config(_config(out, data, folder, teacher, objective, args.steps)))
                    seconds[name] = time.perf_counter() - started
                    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                    curves[name] = [r for r in rows if r.get("kind") == "train"]
                term = "kd" if "kd" in curves["live"][0] else "kd_teacher"  # dskdv2: KD in the teacher space
                live, srv = ([r[term] for r in curves[n]] for n in ("live", "served"))
                rel = [abs(a - b) / abs(a) for a, b in zip(live, srv)]
                lines.append(f"{label}: step-1 {term} live {live[0]:.4f} served {srv[0]:.4f} (rel. diff "
                             f"{rel[0]:.2%}); largest rel. diff over {len(rel)} steps {max(rel):.2%}; step-"
                             f"{len(rel)} ce live {curves['live'][-1]['ce']:.4f} served "
                             f"{curves['served'][-1]['ce']:.4f}; wall {seconds['live']:.0f} s live, "
                             f"{seconds['served']:.0f} s served")
                print(lines[-1], flush=True)
        finally:
            server.kill()
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
