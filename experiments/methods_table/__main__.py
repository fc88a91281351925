"""The methods table: every objective on the demo benchmark, three training seeds, one table (README.md here).

    python -m experiments.methods_table                    # from the repository root: train, score, write the doc
    python -m experiments.methods_table --report-only      # the table of what the record holds, training nothing
    python -m experiments.methods_table --quick --output-dir /tmp/t --records none --doc none   # a smoke test

1. the demo's data files and teacher (the `demo-teacher` recipe), made once;
2. per row, a small learning-rate grid (`rows.LRS`) trained with the first seed and scored by its best dev CE
   (per token of the row's own tokenizer, so rows of one tokenizer are chosen alike); the chosen rate is then
   trained with the other seeds;
3. every chosen run sampled on the test set with the protocol's 5 sampling seeds (ROUGE-L, exact match);
4. the document (README.md here, + a plot): mean ± std over training seeds, each run's score being its mean
   over the sampling seeds; rows whose interval overlaps their SFT baseline's are marked;
5. the ablations (`rows.ABLATIONS`): DSKDv2-ETA with one setting changed, trained at DSKDv2-ETA's chosen lr
   with the three seeds, tabled beside it.

Resumable (bench.py): rerun the same command to continue. 124 runs: several hours on 2 CPU cores (3-4 minutes
per run and its evaluation with one thread).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console

from dualkd.atomic import write_text_atomic
from experiments.methods_table.bench import RECORDS, SETTINGS, Bench, table_record
from experiments.methods_table.doc import write_dev_curves, write_doc
from experiments.methods_table.rows import ALL_ROWS, BY_NAME, FIRST

HERE = Path(__file__).parent
DOC = HERE / "README.md"


def run_table(out: Path, quick: bool = False, rows: list[str] | None = None, doc: Path | None = DOC,
              records: Path | None = RECORDS, report_only: bool = False, setting: str = "scratch",
              epochs: int | None = None) -> Path:
    """Train and score every row (resumable); write the table to `<out>/methods-table.md` and to `doc`;
    returns the results file. `records`: the folder of the tables' records (the table's is
    `<records>/<table>.jsonl`). `report_only`: train and evaluate nothing, table what is finished (rows with
    fewer seeds say how many). `records` / `doc` None: none."""
    out.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True, soft_wrap=True)
    record = table_record(records, setting, epochs) if records is not None else None
    bench = Bench(out, quick, console, record, setting, epochs)
    chosen = [r for r in ALL_ROWS if rows is None or r.name in rows]
    order = sorted(chosen, key=lambda r: (r.base is not None, FIRST.index(r.name) if r.name in FIRST else len(FIRST)))
    command = ("python -m experiments.methods_table" + (f" --output-dir {out}" if out != Path("runs/methods-table")
                                                         else "") + (" --quick" * quick)
               + (f" --records {records}" if records != RECORDS else "") + (f" --doc {doc}" if doc != DOC else "")
               + (f" --setting {setting}" if setting != "scratch" else "")
               + (f" --epochs {epochs}" if epochs is not None else ""))
    started = time.perf_counter()
    if report_only:
        results = {row.name: bench.finished(row) for row in order}
        command += " --report-only"
    else:
        lrs = {row.name: bench.chosen_lr(row) for row in order}  # the grids first: every row gets a first figure
        results = {}
        for row in order:
            for seed in bench.seeds:
                run = bench.path(row, lrs[row.name], seed)
                if not bench.scored(run):
                    bench.scores(bench.run(row, lrs[row.name], seed, need_model=True))
            results[row.name] = bench.finished(row)
        console.print(f"methods table: {len(order)} rows in {(time.perf_counter() - started) / 60:.1f} min")
    results_file = out / ("results.json" if bench.table == "scratch" else f"results-{bench.table}.json")
    write_text_atomic(results_file, json.dumps(results, indent=2))
    for target in [out / "methods-table.md", *([doc] if doc is not None else [])]:
        write_doc(results, target, command=command, expected=len(bench.seeds), table=bench.table)
        if bench.epochs is not None:  # the SFT grids' dev curves: has the budget converged?
            curves = {f"{name}, lr {lr:g}": bench.dev_curve(run) for name in ("sft", "own-sft") for lr in bench.lrs
                      if bench.trained(run := bench.path(BY_NAME[name], lr, bench.seeds[0]))}
            if curves:
                write_dev_curves(curves, target.parent / f"methods-table-{bench.table}-sft-dev.png",
                                 f"SFT's dev CE at {bench.epochs} epochs (seed {bench.seeds[0]})")
    return results_file


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.methods_table", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/methods-table", type=Path,
                   help="runs, data and teacher (default: runs/methods-table)")
    p.add_argument("--rows", nargs="+", help="only these rows (default: all)")
    p.add_argument("--doc", default=str(DOC), help="the document whose generated part is rewritten (default: "
                                                    "this experiment's README.md; `none`: only <output-dir>'s copy)")
    p.add_argument("--records", default=str(RECORDS), help="the folder of the records of finished runs, one "
                   "<table>.jsonl per table (default: this experiment's records/; `none`: keep none)")
    p.add_argument("--report-only", action="store_true",
                   help="train and evaluate nothing: write the table of the runs that are finished")
    p.add_argument("--setting", choices=SETTINGS, default="scratch",
                   help="where the students start: random weights (scratch) or each tokenizer's student pretrained "
                        "as a plain LM on unlabeled in-domain text (pretrained; pretraining.py)")
    p.add_argument("--epochs", type=int, help="the students' budget in epochs (default: the recipe's 30); another "
                                              "budget is a table of its own, its lr chosen per half on SFT's grid")
    p.add_argument("--quick", action="store_true", help="a few steps per run and a small test set (a smoke test; "
                                                        "needs --records none --doc none or paths of its own)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.rows or []) - set(BY_NAME))
    if unknown:
        p.error(f"--rows: unknown rows {unknown}; known: {list(BY_NAME)}")
    doc = None if args.doc == "none" else Path(args.doc)
    records = None if args.records == "none" else Path(args.records)
    if args.quick and (doc == DOC or records == RECORDS):
        p.error("--quick would write smoke-test figures into the committed table: add --records none --doc none "
                "(or paths of your own)")
    run_table(args.output_dir, args.quick, args.rows, doc, records, args.report_only, args.setting, args.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
