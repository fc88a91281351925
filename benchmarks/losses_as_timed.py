"""The fused forward-KL against the plain formula, timed the way a user times it (issue 33's script): one
process, one warm-up of each, then 3 repetitions alternating the order; the student head's gradient
accumulates across calls, as it does when nobody clears it. A cross-check of benchmarks/losses.py, whose
harness clears gradients and also takes the gradient of the student's hidden states.

    python benchmarks/losses_as_timed.py --rows 1024
    python benchmarks/losses_as_timed.py --rows 2048      # plain needs ~14 GiB here

Prints each repetition's seconds, the ratio fused ÷ plain per repetition (min / median / max), torch's thread
count and the load average before and after (a figure taken under load is not a figure).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from dualkd import losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1024, help="N response positions (default 1024)")
    p.add_argument("--dim", type=int, default=640, help="hidden size d of both models (default 640)")
    p.add_argument("--vocab", type=int, default=262144, help="V (default 262,144: Gemma-3's)")
    args = p.parse_args()
    print(f"load average before: {os.getloadavg()}", flush=True)
    torch.manual_seed(0)
    n, d, v = args.rows, args.dim, args.vocab
    hs = torch.randn(n, d)
    ws = (torch.randn(v, d) * 0.05).requires_grad_()
    ht = torch.randn(n, d)
    wt = torch.randn(v, d) * 0.05

    def plain() -> None:
        ls = F.log_softmax(hs @ ws.T / 2, -1)
        lt = F.log_softmax(ht @ wt.T / 2, -1)
        (lt.exp() * (lt - ls)).sum(-1).mean().backward()

    def fused() -> None:
        losses.fused_divergence("fkl", hs, ws, ht, wt, temperature=2.0, reduction="mean").backward()

    def seconds(f) -> float:  # noqa: ANN001
        start = time.perf_counter()
        f()
        return time.perf_counter() - start

    seconds(plain), seconds(fused)  # warm-up
    ratios = []
    for rep in range(3):
        order = (plain, fused) if rep % 2 == 0 else (fused, plain)
        t = {f.__name__: seconds(f) for f in order}
        ratios.append(t["fused"] / t["plain"])
        print(f"rep {rep}: plain {t['plain']:.2f} s, fused {t['fused']:.2f} s, fused ÷ plain {ratios[-1]:.3f}",
              flush=True)
    print(f"fused ÷ plain, N = {n}, d = {d}, V = {v}: min {min(ratios):.2f} / median "
          f"{statistics.median(ratios):.2f} / max {max(ratios):.2f}; {torch.get_num_threads()} threads; "
          f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
