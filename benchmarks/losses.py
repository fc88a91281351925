"""Fused chunked KD loss vs the plain torch formula a user would write: time (interleaved) and peak memory.

    python benchmarks/losses.py --names fkl,rkl --vocab 262144 --rows 1024,2048 --dim 640
    python benchmarks/losses.py --names all --vocab 32000 --rows 1024      # a quick look at every divergence
    python benchmarks/losses.py --device cuda --dtype bfloat16             # on a GPU

Plain = what a user writes: logits materialized (`h_s @ W_s.T`, `h_t @ W_t.T` without grad), `log_softmax`,
`exp`, the divergence's sum, autograd (fkl, rkl, js; other divergences fall back to our dense `divergence`,
marked "ours (dense)"). Fused = `fused_divergence` with its default chunk size.
Time: both paths in this process, interleaved in rotating order after a warm-up, --reps repetitions
(benchmarks/harness.py): min / median / max of each and of the per-repetition ratio fused ÷ plain.
Memory: each case's forward + backward once in a fresh subprocess, so that its peak is its own (CPU: peak
RSS minus the RSS once the inputs exist; CUDA: peak allocation minus the inputs). The plain path is skipped
when a small calibration run predicts it would not fit in --max-gib. The CSV is written only when the load
average says the machine was not shared.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.harness

ALL = ["fkl", "rkl", "js", "tvd", "skl", "srkl", "akl"]
PLAIN = ("fkl", "rkl", "js")  # written out in plain torch below; the others fall back to our dense loss


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def plain_loss(name: str, student_logits, teacher_logits, temperature: float):
    """The divergence as a user writes it in torch: Σ over rows and vocabulary (None: not written here)."""
    import math

    import torch

    logq = torch.log_softmax(student_logits / temperature, -1)
    logp = torch.log_softmax(teacher_logits / temperature, -1)
    if name == "fkl":
        return (logp.exp() * (logp - logq)).sum()
    if name == "rkl":
        return (logq.exp() * (logq - logp)).sum()
    if name == "js":
        logm = torch.logaddexp(logp, logq) - math.log(2.0)
        return 0.5 * (logp.exp() * (logp - logm)).sum() + 0.5 * (logq.exp() * (logq - logm)).sum()
    return None


def forward(path: str, name: str, hs, ws, ht, wt, temperature: float):
    import torch

    from dualkd.losses import divergence, fused_divergence

    if path == "fused":
        return fused_divergence(name, hs, ws, ht, wt, temperature=temperature, reduction="sum")
    with torch.no_grad():
        teacher_logits = ht @ wt.T
    student_logits = hs @ ws.T
    loss = plain_loss(name, student_logits, teacher_logits, temperature)
    if loss is None:  # ours, dense: for divergences without a plain formula here
        loss = divergence(name, student_logits, teacher_logits, temperature=temperature, reduction="sum")
    return loss


def time_case(name: str, n: int, v: int, args: argparse.Namespace, with_plain: bool):
    """Both paths in this process, interleaved (benchmarks/harness.py)."""
    import torch

    from benchmarks.harness import interleaved

    dt, dev, d = getattr(torch, args.dtype), torch.device(args.device), args.dim
    g = torch.Generator(device="cpu").manual_seed(0)
    hs = torch.empty(n, d).normal_(generator=g).to(dev, dt).requires_grad_(True)
    ws = torch.empty(v, d).normal_(generator=g).mul_(d**-0.5).to(dev, dt).requires_grad_(True)
    ht = torch.empty(n, d).normal_(generator=g).to(dev, dt)
    wt = torch.empty(v, d).normal_(generator=g).mul_(d**-0.5).to(dev, dt)

    def step(path: str):
        def go():
            hs.grad = ws.grad = None
            loss = forward(path, name, hs, ws, ht, wt, args.temperature)
            loss.backward()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return float(loss.detach())
        return go

    variants = {"fused": step("fused")} | ({"plain": step("plain")} if with_plain else {})
    return interleaved(variants, reps=args.reps, threads=torch.get_num_threads())


def worker(path: str, name: str, n: int, v: int, d: int, device: str, dtype: str, temperature: float) -> dict:
    """One forward + backward in this (fresh) process; returns seconds and peak MiB above the inputs."""
    import torch

    dt = getattr(torch, dtype)
    dev = torch.device(device)

    def make(rows: int, vocab: int):
        g = torch.Generator(device="cpu").manual_seed(0)
        hs = torch.empty(rows, d).normal_(generator=g).to(dev, dt).requires_grad_(True)
        ws = torch.empty(vocab, d).normal_(generator=g).mul_(d**-0.5).to(dev, dt).requires_grad_(True)
        ht = torch.empty(rows, d).normal_(generator=g).to(dev, dt)
        wt = torch.empty(vocab, d).normal_(generator=g).mul_(d**-0.5).to(dev, dt)
        return hs, ws, ht, wt

    def run(hs, ws, ht, wt):
        loss = forward(path, name, hs, ws, ht, wt, temperature)
        loss.backward()
        return loss

    run(*make(8, 64))  # warm up kernels on tiny inputs
    inputs = make(n, v)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mib()
    start = time.perf_counter()
    loss = run(*inputs)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"seconds": seconds, "peak_mib": peak - base, "loss": float(loss)}


def measure(path: str, name: str, n: int, v: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", path, name, str(n), str(v), "--dim", str(args.dim),
           "--device", args.device, "--dtype", args.dtype, "--temperature", str(args.temperature)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["killed"])[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=4, metavar=("PATH", "NAME", "N", "V"), help=argparse.SUPPRESS)
    parser.add_argument("--names", default="fkl,rkl,js", help="comma-separated divergences, or 'all'")
    parser.add_argument("--vocab", default="32000,151936,262144", help="comma-separated vocabulary sizes")
    parser.add_argument("--rows", default="1024,4096", help="comma-separated token counts N")
    parser.add_argument("--dim", type=int, default=1024, help="hidden size d of both models")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--max-gib", type=float, default=20.0, help="skip plain cases predicted above this")
    parser.add_argument("--reps", type=int, default=3, help="interleaved timed repetitions per case")
    parser.add_argument("--out", default="benchmarks/results/losses.csv")
    parser.add_argument("--shared-ok", action="store_true", help="write the CSV even if the machine was shared")
    args = parser.parse_args()

    if args.worker:
        path, name, n, v = args.worker
        print(json.dumps(worker(path, name, int(n), int(v), args.dim, args.device, args.dtype, args.temperature)))
        return

    import torch

    from benchmarks.harness import may_write, start_load

    names = ALL if args.names == "all" else args.names.split(",")
    vocabs = [int(x) for x in args.vocab.split(",")]
    rows = [int(x) for x in args.rows.split(",")]
    cpu = platform.processor() or platform.machine()
    print(f"# torch {torch.__version__}, {args.device} ({cpu}, {torch.get_num_threads()} threads), {args.dtype}, "
          f"d={args.dim}, tau={args.temperature}, load average {start_load():.2f} at start")

    # plain memory grows as N*V on top of a fixed part (the head gradient): calibrate the bytes per logit
    # from two small cases, per divergence
    per_logit, fixed = {}, {}
    for name in names:
        a = measure("plain", name, 256, 32000, args).get("peak_mib", 0.0)
        b = measure("plain", name, 768, 32000, args).get("peak_mib", 0.0)
        per_logit[name] = max(b - a, 0.0) * 2**20 / (512 * 32000)
        fixed[name] = (a * 2**20 - per_logit[name] * 256 * 32000) / 32000  # bytes per vocab row

    # memory first, every case in its own subprocess: a child's peak RSS counts what its parent held when it
    # was started, so the in-process timing (which holds the plain path's gigabytes) must come after
    cases = [(v, n, name) for v in vocabs for n in rows for name in names]
    memory = {}
    for v, n, name in cases:
        predicted_gib = (per_logit[name] * n * v + fixed[name] * v) / 2**30
        fits = predicted_gib <= args.max_gib
        plain = measure("plain", name, n, v, args) if fits else {"skipped": f"needs ~{predicted_gib:.0f} GiB"}
        memory[v, n, name] = (predicted_gib, fits, plain, measure("fused", name, n, v, args))
    results, timings = [], []
    for v, n, name in cases:
        predicted_gib, fits, plain, fused = memory[v, n, name]
        timing = time_case(name, n, v, args, with_plain=fits and "error" not in plain)
        timings.append(timing)
        row = {"divergence": name, "plain_formula": name in PLAIN, "vocab": v, "rows": n, "dim": args.dim,
               "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(), "reps": args.reps,
               "plain_peak_mib": plain.get("peak_mib"), "fused_peak_mib": fused.get("peak_mib"),
               "plain_note": plain.get("skipped") or plain.get("error", ""),
               "fused_note": fused.get("error", ""), "plain_predicted_gib": round(predicted_gib, 1),
               "load_before": timing.load_before, "load_after": timing.load_after}
        for path in timing.seconds:
            row |= {f"{path}_{k}": x for k, x in timing.summary(path).items()}
        if "plain" in timing.seconds:
            ratios = timing.summary("fused", "plain")
            row |= {f"time_{k}": x for k, x in ratios.items() if k.startswith("ratio")}
        if row["plain_peak_mib"] and row["fused_peak_mib"]:
            row["mem_ratio"] = row["fused_peak_mib"] / max(row["plain_peak_mib"], 1e-9)
        results.append(row)
        plain_mib = f"{row['plain_peak_mib']:.0f}" if row["plain_peak_mib"] else "-"
        print(f"\n{name} V={v} N={n} d={args.dim}: memory plain "
              f"{plain_mib} MiB{' (' + row['plain_note'] + ')' if row['plain_note'] else ''}"
              f", fused {row['fused_peak_mib']:.0f} MiB"
              + (f" ({100 * row['mem_ratio']:.1f}%)" if "mem_ratio" in row else ""), flush=True)
        print(timing.table(baseline="plain" if "plain" in timing.seconds else None, unit="s", scale=1.0),
              flush=True)

    if all(may_write(t, args.shared_ok) for t in timings):
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=sorted({k for r in results for k in r}))
            writer.writeheader()
            writer.writerows(results)
        print(f"# wrote {out}")


if __name__ == "__main__":
    main()
