"""The results table of experiments/prune_distill_dolly/run.sh: every evaluated model's test scores (mean ± std over
sampling seeds), dev CE per token and bits per byte, and the wall time of each stage.

    .venv/bin/python experiments/prune_distill_dolly/table.py runs/pdd      # writes runs/pdd/results.md and prints it
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

WHAT = {
    "cut-student": ("—", "SmolLM2-135M-Instruct cut to 6 blocks, untrained"),
    "teacher-a": ("—", "teacher A: SmolLM2-135M-Instruct (30 blocks)"),
    "teacher-b": ("—", "teacher B: Gemma-3-270M after LoRA SFT on Dolly"),
    "sft": ("—", "SFT"),
    "kd": ("A", "KD, forward KL (teacher's top-64 + tail, from the cache)"),
    "dskd": ("A", "DSKD, forward KL, τ 2 (cached hidden states)"),
    "dskdv2": ("A", "DSKDv2, same vocabulary, τ 2 (cached hidden states)"),
    "dskdv2-eta": ("B", "DSKDv2-ETA, τ 2 (cached hidden states)"),
    "uld": ("B", "ULD (live teacher)"),
    "mined": ("B", "MinED, τ 2 (live teacher)"),
    "both-sum": ("A + B", "DSKDv2 from both (A same vocabulary, B ETA), summed ½ + ½ (cached hidden states)"),
    "both-route": ("A or B", "DSKDv2 from the teacher that predicts each example's response better (cached)"),
}


def main(out: Path) -> None:
    lines = ["| model | teacher | what | ROUGE-L | exact match | dev CE / token | dev bits / byte |",
             "|---|---|---|---|---|---|---|"]
    for name, (teacher, what) in WHAT.items():
        folder = out / "eval" / name
        if not (folder / "scores.json").exists():
            continue
        s = next(iter(json.loads((folder / "scores.json").read_text())["sets"].values()))  # the one test set
        cells = [f"{s['mean'][m]:.2f} ± {s['std'][m]:.2f}" for m in ("rougeL", "exact_match")]
        if (folder / "likelihood.json").exists():
            ll = json.loads((folder / "likelihood.json").read_text())
            cells += [f"{ll['ce_per_token']:.3f}", f"{ll['bits_per_byte']:.3f}"]
        else:
            cells += ["—", "—"]
        lines.append(f"| {name} | {teacher} | {what} | " + " | ".join(cells) + " |")
    if (out / "grid.json").exists():
        grid = json.loads((out / "grid.json").read_text())
        lines += ["", "LR grid (SFT, best dev CE): " + ", ".join(f"{k}: {v:.3f}" for k, v in grid["dev_ce"].items())
                  + f" → {grid['chosen']}"]
    if (out / "stage-seconds.txt").exists():
        lines += ["", "| stage | wall time |", "|---|---|"]
        for line in (out / "stage-seconds.txt").read_text().splitlines():
            stage, seconds = line.rsplit(" ", 1)
            lines.append(f"| {stage} | {int(seconds) / 60:.1f} min |")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
