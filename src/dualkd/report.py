"""`dualkd report RUN_DIR...`: Markdown and PNG plots for one run or several side by side.

    report(["runs/demo/teacher", "runs/demo/student-kd", "runs/demo/student-sft"], "runs/demo/report",
           teacher="runs/demo/teacher")

Reads what training and evaluation wrote: `metrics.jsonl` (train and dev records), `summary.json`, and
`eval/scores.json` when the run was evaluated. Writes `report.md` with
- `loss.png`: training loss and gold-token CE per step (moving mean over 10 steps, raw values faint);
- `dev.png`: dev CE over steps;
- `scores.png`: per test set, the main metric (ROUGE-L, else BLEU) of each model, mean ± std over seeds,
  the teacher hatched.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dualkd.errors import DataError

_SMOOTH = 10


def _records(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # a resumed run logs the steps after its checkpoint again: keep the last record of each (kind, step)
    latest = {(r["kind"], r.get("step")): r for r in rows if r.get("kind") in ("train", "dev")}
    return sorted(latest.values(), key=lambda r: r["step"])


def _scores(run: Path) -> dict[str, Any] | None:
    for path in (run / "eval" / "scores.json", run / "scores.json"):
        if path.exists():
            return json.loads(path.read_text())
    return None


def _moving_mean(values: list[float], k: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - k] if i >= k else 0.0)
        out.append(total / min(i + 1, k))
    return out


def _main_metric(scores: dict[str, Any], set_name: str) -> str:
    metrics = scores["sets"][set_name]["metrics"]
    return "rougeL" if "rougeL" in metrics else metrics[0]


def load_runs(run_dirs: Sequence[str | Path]) -> dict[str, dict[str, Any]]:
    runs: dict[str, dict[str, Any]] = {}
    for d in run_dirs:
        path = Path(d)
        if not path.is_dir():
            raise DataError(f"{path}: not a directory")
        records, scores = _records(path), _scores(path)
        if not records and scores is None:
            raise DataError(f"{path}: neither metrics.jsonl (a training run) nor eval/scores.json (an evaluation)")
        name = path.name if path.name not in runs else str(path)
        summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").exists() else {}
        runs[name] = {"dir": path, "records": records, "scores": scores, "summary": summary}
    return runs


def _finish_axes(ax: Any, title: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig: Any, path: Path) -> str:
    """Write the figure, close it, return its file name (for the Markdown)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _plot_curves(runs: dict[str, dict[str, Any]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    train = {n: [r for r in run["records"] if r["kind"] == "train"] for n, run in runs.items()}
    if any(train.values()):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, key, title in ((axes[0], "loss", "training loss (objective)"), (axes[1], "ce", "gold-token CE")):
            for name, rows in train.items():
                pts = [(r["step"], r[key]) for r in rows if key in r]
                if not pts:
                    continue
                steps, vals = zip(*pts)
                line, = ax.plot(steps, _moving_mean(list(vals), _SMOOTH), label=name)
                ax.plot(steps, vals, color=line.get_color(), alpha=0.15, lw=0.8)
            _finish_axes(ax, title)
        written.append(_save(fig, out / "loss.png"))
    dev = {n: [r for r in run["records"] if r["kind"] == "dev" and "ce" in r] for n, run in runs.items()}
    if any(dev.values()):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, rows in dev.items():
            if rows:
                ax.plot([r["step"] for r in rows], [r["ce"] for r in rows], marker="o", ms=3, label=name)
        _finish_axes(ax, "dev CE (lower is better)")
        written.append(_save(fig, out / "dev.png"))
    return written


def _plot_scores(runs: dict[str, dict[str, Any]], teacher: str | None, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = {n: run["scores"] for n, run in runs.items() if run["scores"]}
    if not scored:
        return []
    sets = list(dict.fromkeys(s for sc in scored.values() for s in sc["sets"]))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(sets) * max(1, len(scored)) / 2), 4))
    width = 0.8 / len(scored)
    for k, (name, sc) in enumerate(scored.items()):
        xs, means, stds = [], [], []
        for i, s in enumerate(sets):
            if s in sc["sets"]:
                m = _main_metric(sc, s)
                xs.append(i + (k - (len(scored) - 1) / 2) * width)
                means.append(sc["sets"][s]["mean"][m])
                stds.append(sc["sets"][s]["std"][m])
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=name,
               hatch="//" if name == teacher else None, edgecolor="black", linewidth=0.5)
    ax.set_xticks(range(len(sets)), sets)
    metric_names = sorted({_main_metric(sc, s) for sc in scored.values() for s in sc["sets"]})
    ax.set_ylabel(" / ".join(metric_names) + " (mean ± std over seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return [_save(fig, out / "scores.png")]


def scores_table(runs: dict[str, dict[str, Any]], teacher: str | None = None) -> list[str]:
    """Markdown rows: one per model; per test set every metric when that fits in six columns, else the main
    metric (ROUGE-L, else BLEU) and the average over sets."""
    scored = {n: run["scores"] for n, run in runs.items() if run["scores"]}
    if not scored:
        return []
    sets = list(dict.fromkeys(s for sc in scored.values() for s in sc["sets"]))
    owner = {s: next(sc for sc in scored.values() if s in sc["sets"]) for s in sets}
    columns = [(s, m) for s in sets for m in owner[s]["sets"][s]["metrics"]]
    if len(columns) > 6:
        columns = [(s, _main_metric(owner[s], s)) for s in sets]
    with_avg = len(sets) > 1
    head = [f"{s} {m}" if len(sets) > 1 else m for s, m in columns] + (["avg"] if with_avg else [])
    lines = ["| model | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for name, sc in scored.items():
        cells, main = [], []
        for s, m in columns:
            if s in sc["sets"] and m in sc["sets"][s]["mean"]:
                cells.append(f"{sc['sets'][s]['mean'][m]:.2f} ± {sc['sets'][s]['std'][m]:.2f}")
            else:
                cells.append("–")
        for s in sets:
            if s in sc["sets"]:
                main.append(sc["sets"][s]["mean"][_main_metric(sc, s)])
        if with_avg:
            cells.append(f"{sum(main) / len(main):.2f}" if len(main) == len(sets) else "–")
        label = f"{name} (teacher)" if name == teacher and "teacher" not in name else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for name in runs:  # trained but never evaluated: named, so a missing row is not mistaken for a dropped one
        if name not in scored:
            lines.append(f"| {name} (not evaluated: run `dualkd eval` on it) | " + " | ".join("–" for _ in head)
                         + " |")
    return lines


def report(run_dirs: Sequence[str | Path], out_dir: str | Path, teacher: str | Path | None = None,
           title: str = "dualkd report") -> Path:
    """Write `out_dir/report.md` and its plots; returns the path of the Markdown file."""
    runs = load_runs(list(run_dirs) + ([teacher] if teacher is not None and Path(teacher) not in
                                       [Path(d) for d in run_dirs] else []))
    teacher_name = next((n for n, r in runs.items() if teacher is not None and r["dir"] == Path(teacher)), None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plot_curves(runs, out) + _plot_scores(runs, teacher_name, out)
    lines = [f"# {title}", ""]
    table = scores_table(runs, teacher_name)
    if table:
        any_scores = next(r["scores"] for r in runs.values() if r["scores"])
        g = any_scores["generation"]
        decoding = "greedy" if not g["do_sample"] else f"sampling at temperature {g['temperature']}, seeds " + \
            ", ".join(map(str, any_scores["seeds"]))
        lines += ["## Test scores", "", f"Mean ± std over seeds ({decoding}).", "", *table, ""]
    lines += ["## Runs", "", "| run | objective | steps | best dev loss | last dev CE |", "|---|---|---|---|---|"]
    for name, run in runs.items():
        dev = [r for r in run["records"] if r["kind"] == "dev" and "ce" in r]
        objective = _objective(run["dir"])
        s = run["summary"]
        best = f"{s['best_dev_loss']:.4f}" if s.get("best_dev_loss") is not None else "–"
        last = f"{dev[-1]['ce']:.4f}" if dev else "–"
        lines.append(f"| {name} | {objective} | {s.get('steps', '–')} | {best} | {last} |")
    lines.append("")
    for plot in plots:
        lines += [f"![{plot[:-4]}]({plot})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _objective(run: Path) -> str:
    cfg = run / "config.yaml"
    if not cfg.exists():
        return "–"
    import yaml

    data = yaml.safe_load(cfg.read_text()) or {}
    return str((data.get("objective") or {}).get("name", "–"))
