"""The fused engine at another git revision vs this tree's, interleaved in one process (a change's own effect).

    python benchmarks/fused_ab.py --base 432fda3            # DSKDv2's three fused passes at real sizes
    python benchmarks/fused_ab.py --base 432fda3 --step     # + the whole dskdv2 step (kd_step.py's, real models)

`losses/fused.py` and `losses/divergences.py` of --base are written to a temporary folder and imported beside
this tree's as `base_fused`; each variant swaps the fused names that dskdv2.py looks up. Passes: the
teacher-space fkl (P x d_t -> V_t, with its gradient), the student-space CE + fkl (with the head gradient) and
the teacher argmax, at the long Dolly batch's sizes of SmolLM2 <- Gemma-3 (random weights). Same harness as the
other benchmarks (benchmarks/harness.py): warm-up, --reps interleaved repetitions, load average checked.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.harness, benchmarks.kd_step

from benchmarks.harness import interleaved, start_load  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
P, D_T, D_S, V_T, V_S = 789, 640, 576, 262144, 49152  # the longest-256 batch: 789 pairs; Gemma-3 / SmolLM2 heads
SWAPPED = ("fused_argmax", "fused_ce_and_divergence", "fused_cross_entropy", "fused_divergence")


def load_base(rev: str, folder: Path):  # noqa: ANN201
    """The revision's fused.py (importing its own divergences.py) as a module."""
    for name in ("fused", "divergences"):
        text = subprocess.run(["git", "show", f"{rev}:src/dualkd/losses/{name}.py"], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout
        text = text.replace("from dualkd.losses.divergences import", "from base_divergences import")
        (folder / f"base_{name}.py").write_text(text)
    sys.path.insert(0, str(folder))
    return importlib.import_module("base_fused")


def passes(mod):  # noqa: ANN001, ANN201
    import torch

    g = torch.Generator().manual_seed(0)
    w_t = torch.randn(V_T, D_T, generator=g) * 0.03
    w_s = (torch.randn(V_S, D_S, generator=g) * 0.03).requires_grad_(True)
    h_t, h_s2t = torch.randn(P, D_T, generator=g), torch.randn(P, D_T, generator=g).requires_grad_(True)
    h_s, target = torch.randn(P, D_S, generator=g).requires_grad_(True), torch.randn(P, D_S, generator=g)
    labels = torch.randint(0, V_S, (P,), generator=g)
    kd_rows = (torch.rand(P, generator=g) > 0.3).float()

    def teacher_space() -> float:
        h_s2t.grad = None
        loss = mod.fused_divergence("fkl", h_s2t, w_t, h_t, w_t, temperature=2.0, reduction="sum")
        loss.backward()
        return loss.item()

    def student_space() -> float:
        h_s.grad = w_s.grad = None
        loss = mod.fused_ce_and_divergence(h_s, w_s, target, w_s.detach(), labels, divergence="fkl", ce_weight=0.5,
                                           div_weight=0.5, div_mask=kd_rows, temperature=2.0)[0]
        loss.backward()
        return loss.item()

    return {"teacher-space fkl": teacher_space, "student-space CE + fkl": student_space,
            "teacher argmax": lambda: mod.fused_argmax(h_t, w_t)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision whose fused engine is the baseline")
    parser.add_argument("--step", action="store_true", help="also the whole dskdv2 step on real models")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    start_load()
    import torch

    import dualkd.methods.dskdv2 as dskdv2
    from dualkd.losses import fused

    with tempfile.TemporaryDirectory() as tmp:
        base = load_base(args.base, Path(tmp))
        before, after = passes(base), passes(fused)
        for name in before:
            t = interleaved({"base": before[name], "this tree": after[name]}, reps=args.reps,
                            threads=torch.get_num_threads())
            a, b = t.last["base"], t.last["this tree"]
            same = bool(torch.equal(a, b)) if isinstance(a, torch.Tensor) else f"{a:.6f} vs {b:.6f}"
            print(f"\n## {name}: values {same}; quiet {t.quiet}\n{t.table(baseline='base', unit='s', scale=1.0)}",
                  flush=True)
        if args.step:
            from benchmarks import kd_step

            kd = kd_step.build("dskdv2", "longest-256", "cpu", "float32")[0]["kd"]

            def using(mod):  # noqa: ANN001, ANN202
                def run() -> None:
                    for name in SWAPPED:
                        setattr(dskdv2, name, getattr(mod, name))
                    kd()
                return run

            t = interleaved({"base": using(base), "this tree": using(fused)}, reps=args.reps,
                            threads=torch.get_num_threads())
            print(f"\n## the dskdv2 step, longest-256; quiet {t.quiet}\n"
                  f"{t.table(baseline='base', unit='s', scale=1.0)}")


if __name__ == "__main__":
    main()
