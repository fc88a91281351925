"""README's command blocks run as written: the Training block, top to bottom, in a fresh folder holding only
the repository's configs (a user's first session after `make install`)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO


def readme_block(heading: str) -> str:
    """The first ```bash block after `heading` in README.md."""
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n{heading}\n")
    found = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert found, f"no bash block after {heading}"
    return found.group(1)


@pytest.mark.distributed
def test_the_training_block_runs_top_to_bottom(tmp_path: Path) -> None:
    block = readme_block("## Training")
    assert "dualkd train configs/tiny-teacher.yaml" in block
    shutil.copytree(REPO / "configs", tmp_path / "configs")  # links to the packaged recipes become files
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    for run in ("tiny-teacher", "tiny-kd", "tiny-kd-t2", "tiny-kd-job", "tiny-kd-ddp", "tiny-kd-zero3"):
        assert (tmp_path / "runs" / run / "final" / "config.json").exists(), run
    assert "FutureWarning" not in done.stderr  # DeepSpeed's deprecations do not drown the log
