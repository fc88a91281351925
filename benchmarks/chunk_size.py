"""Fused KD loss time by chunk size (rows per [c, V] buffer), with and without the head gradient.

    python benchmarks/chunk_size.py                                  # N = 1,024, V = 262,144, d = 640, fkl
    python benchmarks/chunk_size.py --sizes 32,64,128 --rows 2048 --dim 1024

Larger chunks make each GEMM longer (faster per row on CPU) but hold c × V × 4 bytes per buffer (about six
such buffers per call). Variants interleaved in one process, 3 reps (benchmarks/harness.py); ratios against
the first size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.harness

from benchmarks.harness import interleaved, start_load  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,128,256")
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument("--dim", type=int, default=640)
    parser.add_argument("--name", default="fkl")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    print(f"# load average {start_load():.2f} at the start")
    import torch

    from dualkd.losses import fused_divergence

    sizes = [int(x) for x in args.sizes.split(",")]
    g = torch.Generator().manual_seed(0)
    n, v, d = args.rows, args.vocab, args.dim
    for head_grad in (False, True):
        hs = torch.empty(n, d).normal_(generator=g).requires_grad_(True)
        ws = torch.empty(v, d).normal_(generator=g).mul_(d**-0.5).requires_grad_(head_grad)
        ht = torch.empty(n, d).normal_(generator=g)
        wt = torch.empty(v, d).normal_(generator=g).mul_(d**-0.5)

        def run(c: int, hs=hs, ws=ws, ht=ht, wt=wt):  # noqa: ANN001, ANN202  (this group's tensors)
            def go() -> None:
                hs.grad = ws.grad = None
                loss = fused_divergence(args.name, hs, ws, ht, wt, temperature=2.0, reduction="sum", chunk_size=c)
                loss.backward()
            return go

        names = {c: f"chunk {c}, MiB/buffer {c * v * 4 / 2**20:,.0f}, head grad {head_grad}" for c in sizes}
        timing = interleaved({names[c]: run(c) for c in sizes}, reps=args.reps, threads=torch.get_num_threads())
        print(timing.table(baseline=names[sizes[0]], unit="s", scale=1.0), flush=True)


if __name__ == "__main__":
    main()
