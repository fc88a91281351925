"""ULD's distance, forward + backward: the fused pass (`losses/sorted_l1.py`) vs the distance as written with
autograd, in checkpointed chunks (what methods/uld.py ran before it; the form a user writes without [P, V]
tensors for the whole batch), interleaved in one process.

    python benchmarks/uld.py                               # SmolLM2 (student) <- Gemma-3 (teacher) head sizes
    python benchmarks/uld.py --rows 256 --reps 3 --threads 2

Sizes default to the prune-and-distill run's pair (experiments/prune_distill_dolly/README.md): student d 576,
V 49,152; teacher d 640, V 262,144; random weights (the sort's cost does not depend on them much). Both paths
produce the same value and gradients (tests/test_losses.py checks it in float64); this prints both values as a
check, the time of each (benchmarks/harness.py: warm-up, interleaved repetitions, load average) and the ratio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.harness

from benchmarks.harness import interleaved, start_load  # noqa: E402


def as_written(hs, ws, ht, wt, chunk: int):  # noqa: ANN001, ANN201
    """Σ_rows Σ_i |sort↓(q)_i − sort↓(p)_i| (zero-padded) with autograd through both sorts, chunk by chunk
    under activation checkpointing (the chunk's [c, V] tensors are recomputed in backward)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    def rows(h_s, h_t):  # noqa: ANN001, ANN202
        q = torch.softmax(F.linear(h_s, ws), -1).sort(-1, descending=True).values
        with torch.no_grad():
            p = torch.softmax(F.linear(h_t, wt), -1).sort(-1, descending=True).values
        width = max(q.shape[-1], p.shape[-1])
        return (F.pad(q, (0, width - q.shape[-1])) - F.pad(p, (0, width - p.shape[-1]))).abs().sum()

    total = hs.new_zeros(())
    for s in range(0, hs.shape[0], chunk):
        total = total + checkpoint(rows, hs[s:s + chunk], ht[s:s + chunk], use_reentrant=False)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256, help="paired positions P")
    parser.add_argument("--student", default="576,49152", help="student d,V")
    parser.add_argument("--teacher", default="640,262144", help="teacher d,V")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    start_load()

    import torch

    from dualkd.losses.fused import default_chunk_size
    from dualkd.losses.sorted_l1 import fused_sorted_l1

    torch.set_num_threads(args.threads)
    (d_s, v_s), (d_t, v_t) = (map(int, s.split(",")) for s in (args.student, args.teacher))
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(args.rows, d_s, generator=g)
    ws = (torch.randn(v_s, d_s, generator=g) * d_s ** -0.5).requires_grad_()
    ht, wt = torch.randn(args.rows, d_t, generator=g), torch.randn(v_t, d_t, generator=g) * d_t ** -0.5
    chunk = default_chunk_size(args.rows, max(v_s, v_t))

    def run(loss_fn):  # noqa: ANN001, ANN202
        def go():  # noqa: ANN202
            h = hs.clone().requires_grad_()
            loss = loss_fn(h)
            loss.backward()
            ws.grad = None
            return float(loss.detach())
        return go

    timing = interleaved({
        "as written (autograd, checkpointed chunks)": run(lambda h: as_written(h, ws, ht, wt, chunk)),
        "fused (losses/sorted_l1.py)": run(lambda h: fused_sorted_l1(h, ws, ht, wt, chunk_size=chunk)),
    }, reps=args.reps, threads=args.threads)
    print(f"ULD distance, P {args.rows}, student d {d_s} V {v_s}, teacher d {d_t} V {v_t}, chunk {chunk}, "
          f"{args.threads} threads; values: " + ", ".join(f"{v:.4f}" for v in timing.last.values()))
    print(timing.table(baseline="as written (autograd, checkpointed chunks)", unit="ms"))


if __name__ == "__main__":
    main()
