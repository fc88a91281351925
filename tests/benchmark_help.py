"""Run by tests/test_benchmarks.py: each benchmark script named on the command line as `python SCRIPT --help`
would run it (as `__main__`, its own folder first on sys.path), one after the other in this one process, so
that torch and transformers are imported once rather than once per script. Prints one JSON object:
{script: {"code": exit code, "stdout": ..., "stderr": ...}}.

    python tests/benchmark_help.py benchmarks/losses.py benchmarks/kd_step.py ...
"""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys
import traceback
from pathlib import Path


def help_of(script: Path) -> dict[str, object]:
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [str(script), "--help"]
    sys.path.insert(0, str(script.parent))
    code: object = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as e:
            code = e.code or 0
        except BaseException:  # an import error, a broken parser: what the test is for
            traceback.print_exc()
            code = 1
    sys.path.remove(str(script.parent))
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


if __name__ == "__main__":
    results = {Path(s).name: help_of(Path(s).resolve()) for s in sys.argv[1:]}
    print(json.dumps(results))
