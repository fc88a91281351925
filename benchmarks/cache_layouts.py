"""How the packed cache encoding's layout was chosen: the KD loss error of candidate layouts of top-128 rows.

    python benchmarks/cache_layouts.py            # SmolLM2-135M-Instruct over 50 Dolly training records

Rows: the teacher's top-128 log-probabilities at every position (prompt and response, ≤ 256 tokens) of every 8th
of the first 400 Dolly training records. Students that share the teacher's tokenizer: SmolLM2 without its last
layer (near), without its last 4 (far) and a random-init model of its shape. For each layout (exact float16
values, then (end rank, bits) bins; teachers/cache_codec.py) the forward KL over the top-128 + tail buckets is
computed per position from the decoded rows and from the float32 rows; printed: bytes per position (+ the 4-byte
tail) and, per student, the mean |difference| per position and the difference of the means. One layout is also
decoded without the renormalization against the tail. Not a timing: the load does not matter.
Needs the real models (`$DUALKD_REAL_MODELS`, default ~/.cache/dualkd-real) and the Dolly data.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dualkd.teachers.cache_codec import BINS, EXACT, PackedRows

REPO = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("DUALKD_REAL_MODELS", Path.home() / ".cache" / "dualkd-real"))
DATA = Path(os.environ.get("DUALKD_DATA", REPO.parent / "shared" / "data")) / "dolly" / "train.jsonl"
LAYOUTS = [  # (exact, bins): the candidates compared, the shipped one last
    (2, ((None, 2),)),
    (4, ((16, 4), (None, 2))),
    (4, ((16, 4), (32, 3), (None, 2))),
    (4, ((16, 4), (64, 3), (None, 1))),
    (4, ((16, 5), (64, 3), (None, 1))),
    (4, ((16, 6), (64, 3), (None, 1))),
    (4, ((8, 5), (16, 4), (32, 3), (None, 2))),
    (4, ((16, 6), (40, 3), (None, 1))),
    (EXACT, BINS),
]


def bucket_kl(top: torch.Tensor, tail: torch.Tensor, student_top: torch.Tensor) -> torch.Tensor:
    """KL(teacher buckets ‖ student buckets) per row, in float64: top [N, k] log-probs, tail [N] log-mass."""
    covered = torch.logsumexp(student_top, -1).clamp(max=0)
    student_tail = torch.log((-torch.expm1(covered)).clamp(min=1e-12))
    return (top.exp() * (top - student_top)).sum(-1) + tail.exp() * (tail - student_tail)


def sharing_students(model_dir: Path) -> dict[str, torch.nn.Module]:
    """Students that share SmolLM2's tokenizer, from near the teacher to far: SmolLM2 without its last layer
    ("near"), without its last four ("far": a pruned student before distillation), random init ("random")."""
    students = {}
    for name, layers in (("near", 29), ("far", 26)):
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        m.model.layers = m.model.layers[:layers]
        m.config.num_hidden_layers = layers
        students[name] = m
    torch.manual_seed(0)
    students["random"] = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).eval()
    return students


@torch.no_grad()
def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    model_dir = MODELS / "smollm2-135m-instruct"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    students = sharing_students(model_dir)
    records = [json.loads(line) for line in DATA.open()][:400:8]
    top, ids, student_top = [], [], {name: [] for name in students}
    for r in records:
        tokens = tokenizer(r["prompt"] + r["output"], return_tensors="pt").input_ids[:, :256]
        logp = torch.log_softmax(teacher(tokens).logits[0].double(), -1)
        values, index = logp.topk(128, -1)
        top.append(values)
        ids.append(index)
        for name, student in students.items():
            student_top[name].append(torch.log_softmax(student(tokens).logits[0].double(), -1).gather(-1, index))
    top, ids = torch.cat(top), torch.cat(ids)
    student_top = {name: torch.cat(v) for name, v in student_top.items()}
    covered = torch.logsumexp(top, -1).clamp(max=0)
    tail = torch.log((-torch.expm1(covered)).clamp(min=1e-12)).float()
    exact = {name: bucket_kl(top, tail.double(), s) for name, s in student_top.items()}
    print(f"{len(top)} positions of {len(records)} Dolly records, SmolLM2-135M-Instruct top-128; KD loss vs float32: "
          "mean |difference| per position / difference of the means")
    print("| layout | bytes + 4 | " + " | ".join(students) + " |")
    print("|---|---|" + "---|" * len(students))

    def row(label: str, decoded: torch.Tensor, size: int) -> None:
        cells = []
        for name, s in student_top.items():
            d = bucket_kl(decoded, tail.double(), s) - exact[name]
            cells.append(f"{d.abs().mean():.1e} / {d.mean():+.1e}")
        print(f"| {label} | {size} | " + " | ".join(cells) + " |")

    half = top.half().double()
    row("float16, plain", half, 128 * 4 + 4)
    for m, bins in LAYOUTS:
        codec = PackedRows(128, 49152, exact=m, bins=bins)
        packed = codec.encode(ids.numpy(), top.numpy())
        decoded = torch.from_numpy(codec.decode(packed, tail.numpy())[1]).double()
        label = f"{m} exact + " + ", ".join(f"{'k' if end is None else end}:{bits}b" for end, bits in bins)
        row(label + (" (shipped)" if (m, bins) == (EXACT, BINS) else ""), decoded, codec.row_bytes + 4)
    codec = PackedRows(128, 49152)
    raw = torch.from_numpy(codec.decode(codec.encode(ids.numpy(), top.numpy()), None)[1]).double()
    row("shipped, not renormalized", raw, codec.row_bytes + 4)


if __name__ == "__main__":
    main()
