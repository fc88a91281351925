"""The methods table's document: the table (mean ± std over training seeds, `~` where an interval overlaps the
SFT baseline's), the ablations beside the row they vary, the learning-rate search and a plot, written between
markers so that the prose around them stays."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from dualkd.atomic import write_text_atomic


def _summary(values: list[float]) -> tuple[float, float]:
    """Mean and sample std over training seeds (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return abs(a[0] - b[0]) <= a[1] + b[1]


def table_markdown(results: dict[str, Any], expected: int | None = None) -> str:
    """The table: per row mean ± std over training seeds; `~` marks an interval that overlaps SFT's. Rows
    with fewer scored seeds than the others say how many; rows with none are left out (see the grid)."""
    lines = []
    most = expected or max((len(r["seeds"]) for r in results.values()), default=0)  # seeds a full row has
    for tokenizer, title in (("teacher", "Same tokenizer as the teacher"), ("own", "Own tokenizer")):
        names = [n for n, r in results.items() if r["tokenizer"] == tokenizer and r["seeds"] and not r.get("base")]
        if not names:
            continue
        stats = {n: {m: _summary([s[m] for s in results[n]["seeds"].values()])
                     for m in ("rougeL", "exact_match", "dev_ce", "invented")} for n in names}
        base = "sft" if tokenizer == "teacher" else "own-sft"
        lines += [f"### {title}", "", "| row | method | lr | dev CE | ROUGE-L | exact match | invented % |",
                  "|---|---|---|---|---|---|---|"]
        for n in names:
            cells = []
            for m, digits in (("dev_ce", 3), ("rougeL", 2), ("exact_match", 1), ("invented", 1)):
                mean, std = stats[n][m]
                mark = " ~" if n != base and base in stats and m in ("rougeL", "exact_match") and _overlaps(stats[n][m],
                                                                                         stats[base][m]) else ""
                cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}{mark}")
            seeds = len(results[n]["seeds"])
            what = results[n]["what"] + (f" ({seeds} seed{'s' * (seeds > 1)})" if seeds < most else "")
            lines.append(f"| {n} | {what} | {results[n]['lr']:g} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines + ablation_markdown(results, most))


def ablation_markdown(results: dict[str, Any], most: int) -> list[str]:
    """The ablations beside the row they vary and that row's SFT baseline: mean ± std, and the difference
    of means from the base row (`~`: the intervals overlap)."""
    names = [n for n, r in results.items() if r.get("base") and r["seeds"]]
    if not names:
        return []
    lines = ["### Ablations", "", "Δ ROUGE-L: the difference of means from the row each ablation varies "
             "(`…` in its description; `~`: the intervals overlap).", "",
             "| row | what changes | dev CE | ROUGE-L | Δ ROUGE-L | exact match | invented % |",
             "|---|---|---|---|---|---|---|"]
    shown: list[str] = []
    for n in names:
        base = results[n]["base"]
        for ref in ("own-sft" if results[n]["tokenizer"] == "own" else "sft", base):
            if ref in results and results[ref]["seeds"] and ref not in shown:
                shown.append(ref)
        shown.append(n)
    for n in shown:
        stats = {m: _summary([s[m] for s in results[n]["seeds"].values()])
                 for m in ("rougeL", "exact_match", "dev_ce", "invented")}
        base = results[n].get("base")
        delta = "—"
        if base and base in results and results[base]["seeds"]:
            ref = _summary([s["rougeL"] for s in results[base]["seeds"].values()])
            delta = f"{stats['rougeL'][0] - ref[0]:+.2f}" + (" ~" if _overlaps(stats["rougeL"], ref) else "")
        seeds = len(results[n]["seeds"])
        what = results[n]["what"] + (f" ({seeds} seed{'s' * (seeds > 1)})" if seeds < most else "")
        cells = [f"{stats[m][0]:.{d}f} ± {stats[m][1]:.{d}f}" for m, d in (("dev_ce", 3), ("rougeL", 2))]
        cells += [delta] + [f"{stats[m][0]:.{d}f} ± {stats[m][1]:.{d}f}" for m, d in (("exact_match", 1),
                                                                                      ("invented", 1))]
        lines.append(f"| {n} | {what} | " + " | ".join(cells) + " |")
    return lines + [""]


def grid_markdown(results: dict[str, Any]) -> str:
    """The learning-rate search: best dev CE of the first seed per lr (— where not trained yet)."""
    lrs = sorted({lr for r in results.values() for lr in r["dev_ce_by_lr"]}, key=float)
    lines = ["### Learning-rate search (best dev CE, first seed; per token of the row's own tokenizer)", "",
             "| row | " + " | ".join(f"lr {lr}" for lr in lrs) + " | chosen |", "|---|" + "---|" * (len(lrs) + 1)]
    for name, r in results.items():
        if r.get("base") or r.get("grid_from", name) != name:
            continue  # trained at the lr another row's grid chose
        cells = [f"{r['dev_ce_by_lr'][lr]:.3f}" if lr in r["dev_ce_by_lr"] else "—" for lr in lrs]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['lr']:g} |" if r["lr"] is not None
                     else f"| {name} | " + " | ".join(cells) + " | — |")
    return "\n".join(lines) + "\n"


def markers(table: str) -> tuple[str, str]:
    """Where a table (`Bench.table`: its setting and budget) sits in the document."""
    return ("<!-- generated", "<!-- end generated -->") if table == "scratch" else \
        (f"<!-- {table} generated", f"<!-- end {table} generated -->")


def write_doc(results: dict[str, Any], doc: Path, command: str, expected: int | None = None,
              table: str = "scratch") -> None:
    """Write the generated part of the methods table document (between markers) and its plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in results.items() if r["seeds"] and not r.get("base")]
    plot = doc.parent / ("methods-table.png" if table == "scratch" else f"methods-table-{table}.png")
    start, end = markers(table)
    if names:
        fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(names) + 1.5), sharey=True)
        for ax, metric in zip(axes, ("rougeL", "exact_match")):
            stats = [_summary([s[metric] for s in results[n]["seeds"].values()]) for n in names]
            colors = ["tab:blue" if results[n]["tokenizer"] == "teacher" else "tab:orange" for n in names]
            ax.barh(range(len(names)), [m for m, _ in stats], xerr=[s for _, s in stats], color=colors, capsize=3)
            ax.set_title(f"{'ROUGE-L' if metric == 'rougeL' else 'exact match'} (mean ± std over training seeds)")
            ax.grid(axis="x", alpha=0.3)
        axes[0].set_yticks(range(len(names)), names)
        axes[0].invert_yaxis()
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
        plt.close(fig)
    generated = (f"{start} by `{command}`: do not edit between the markers -->\n\n"
                 + table_markdown(results, expected) + (f"\n![methods table]({plot.name})\n\n" if names else "\n")
                 + grid_markdown(results) + end)
    text = doc.read_text() if doc.exists() else "# The methods table\n"
    if start not in text:  # a table's first sitting: at the end
        text = text.rstrip("\n") + f"\n\n{start} -->\n{end}\n"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    write_text_atomic(doc, head + generated + tail)


def write_dev_curves(curves: dict[str, list[dict[str, Any]]], image: Path, title: str) -> None:
    """Dev CE against the optimizer step, one line per run (label -> its dev records), each run's best step
    marked: where a budget's curves have flattened (issue 30: a budget at which SFT has converged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, dev in curves.items():
        steps, ce = [r["step"] for r in dev], [r["ce"] for r in dev]
        best = min(range(len(ce)), key=ce.__getitem__)
        line = ax.plot(steps, ce, label=f"{label} (best {ce[best]:.3f} at step {steps[best]})")[0]
        ax.plot(steps[best], ce[best], "o", color=line.get_color())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("dev CE (nats per token of the run's tokenizer)")
    ax.set_title(title)
    ax.set_ylim(top=min(2.0, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(image, dpi=110)
    plt.close(fig)
