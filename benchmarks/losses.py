"""Fused chunked KD loss vs the naive one (logits materialized, autograd): peak memory and time.

    python benchmarks/losses.py                       # V in {32000, 151936, 262144}, N in {1024, 4096}, d=1024
    python benchmarks/losses.py --names all --vocab 32000 --rows 1024      # a quick look at every divergence
    python benchmarks/losses.py --device cuda --dtype bfloat16             # on a GPU

Each case (divergence, V, N, path) runs forward + backward once in a fresh subprocess, so that its peak
memory is its own: on CPU the peak resident set size minus the resident size once the inputs exist; on
CUDA torch's peak allocation minus the inputs. The naive path is skipped (and the table says so) when a
small calibration run predicts it would not fit in --max-gib. Prints a table with the ratios and writes CSV.
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

ALL = ["fkl", "rkl", "js", "tvd", "skl", "srkl", "akl"]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(path: str, name: str, n: int, v: int, d: int, device: str, dtype: str, temperature: float) -> dict:
    """One forward + backward in this (fresh) process; returns seconds and peak MiB above the inputs."""
    import torch

    from dualkd.losses import divergence, fused_divergence

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
        if path == "naive":
            with torch.no_grad():
                teacher_logits = ht @ wt.T
            loss = divergence(name, hs @ ws.T, teacher_logits, temperature=temperature)
        else:
            loss = fused_divergence(name, hs, ws, ht, wt, temperature=temperature)
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
    parser.add_argument("--max-gib", type=float, default=20.0, help="skip naive cases predicted above this")
    parser.add_argument("--out", default="benchmarks/results/losses.csv")
    args = parser.parse_args()

    if args.worker:
        path, name, n, v = args.worker
        print(json.dumps(worker(path, name, int(n), int(v), args.dim, args.device, args.dtype, args.temperature)))
        return

    import torch

    names = ALL if args.names == "all" else args.names.split(",")
    vocabs = [int(x) for x in args.vocab.split(",")]
    rows = [int(x) for x in args.rows.split(",")]
    cpu = platform.processor() or platform.machine()
    print(f"# torch {torch.__version__}, {args.device} ({cpu}, {torch.get_num_threads()} threads), {args.dtype}, "
          f"d={args.dim}, tau={args.temperature}")

    # naive memory grows as N*V on top of a fixed part (the head gradient): calibrate the bytes per logit
    # from two small cases, per divergence
    per_logit, fixed = {}, {}
    for name in names:
        a = measure("naive", name, 256, 32000, args).get("peak_mib", 0.0)
        b = measure("naive", name, 768, 32000, args).get("peak_mib", 0.0)
        per_logit[name] = max(b - a, 0.0) * 2**20 / (512 * 32000)
        fixed[name] = (a * 2**20 - per_logit[name] * 256 * 32000) / 32000  # bytes per vocab row

    results = []
    header = (f"{'div':5} {'V':>7} {'N':>5} | {'naive s':>8} {'fused s':>8} {'time x':>7} | "
              f"{'naive MiB':>9} {'fused MiB':>9} {'mem %':>6}")
    print(header)
    print("-" * len(header))
    for v in vocabs:
        for n in rows:
            for name in names:
                predicted_gib = (per_logit[name] * n * v + fixed[name] * v) / 2**30
                if predicted_gib > args.max_gib:
                    naive = {"skipped": f"needs ~{predicted_gib:.0f} GiB"}
                else:
                    naive = measure("naive", name, n, v, args)
                fused = measure("fused", name, n, v, args)
                row = {"divergence": name, "vocab": v, "rows": n, "dim": args.dim, "device": args.device,
                       "dtype": args.dtype, "naive_s": naive.get("seconds"), "fused_s": fused.get("seconds"),
                       "naive_peak_mib": naive.get("peak_mib"), "fused_peak_mib": fused.get("peak_mib"),
                       "naive_note": naive.get("skipped") or naive.get("error", ""),
                       "fused_note": fused.get("error", ""), "naive_predicted_gib": round(predicted_gib, 1)}
                if row["naive_s"] and row["fused_s"]:
                    row["time_ratio"] = row["fused_s"] / row["naive_s"]
                    row["mem_ratio"] = row["fused_peak_mib"] / max(row["naive_peak_mib"], 1e-9)
                results.append(row)
                print(_line(row), flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in results for k in r}))
        writer.writeheader()
        writer.writerows(results)
    print(f"# wrote {out}")


def _line(r: dict) -> str:
    def num(x, fmt):
        return format(x, fmt) if isinstance(x, (int, float)) else "-"

    note = ""
    if r.get("naive_note") or r.get("fused_note"):
        note = f"  (naive: {r['naive_note']})" if r.get("naive_note") else f"  (fused: {r['fused_note']})"
    mem = f"{100 * r['mem_ratio']:5.1f}%" if "mem_ratio" in r else "     -"
    return (f"{r['divergence']:5} {r['vocab']:>7} {r['rows']:>5} | {num(r['naive_s'], '8.2f'):>8} "
            f"{num(r['fused_s'], '8.2f'):>8} {num(r.get('time_ratio'), '6.2f'):>6}x | "
            f"{num(r['naive_peak_mib'], '9.0f'):>9} {num(r['fused_peak_mib'], '9.0f'):>9} {mem}{note}")


if __name__ == "__main__":
    main()
