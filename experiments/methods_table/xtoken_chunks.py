"""What X-Token's chunks and projection look like on the methods table's own-tokenizer half (README.md here):

    python -m experiments.methods_table.xtoken_chunks      # from the repository root, after the table's teacher

prints the share of chunks (span groups) of the students' 600 training examples that hold more than one token on
a side, the share of the student's response tokens inside them, and the projection's rows by their number of
teacher tokens. Builds the `own-xtoken-pkl` run's parts (tokenizers, projection) without training anything.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console

from dualkd.methods.grouped import grouped_tokens
from dualkd.train.build import build_parts
from dualkd.train.engine import LocalEngine
from experiments.methods_table.bench import Bench
from experiments.methods_table.rows import BY_NAME


def main() -> int:
    bench = Bench(Path("runs/methods-table"), False, Console(stderr=True))
    cfg = bench.config(BY_NAME["own-xtoken-pkl"], 3e-3, 10, bench.teacher())
    with tempfile.TemporaryDirectory() as tmp:
        parts = build_parts(cfg, Path(tmp), LocalEngine())
    data, obj = parts.train_set, parts.objective
    single = several = tokens = tokens_in_several = 0
    for first in range(0, len(data), 64):
        batch = data.collate(list(range(first, min(first + 64, len(data)))))
        s, t = grouped_tokens(batch.student, batch.teacher_view)
        n_s, n_t = torch.diff(s.bounds), torch.diff(t.bounds)
        wide = (n_s > 1) | (n_t > 1)
        single, several = single + int((~wide).sum()), several + int(wide.sum())
        tokens, tokens_in_several = tokens + int(n_s.sum()), tokens_in_several + int(n_s[wide].sum())
    entries = (obj.proj_indices >= 0).sum(1)
    print(f"chunks: {single + several}, {100 * several / (single + several):.1f}% with several tokens on a side, "
          f"holding {100 * tokens_in_several / tokens:.1f}% of the student's response tokens")
    print(f"projection rows ({len(entries)}): {int((entries == 1).sum())} one teacher token, "
          f"{int((entries > 1).sum())} several, {int((entries == 0).sum())} none; H-KL's matched pairs: "
          f"{obj.s_common.numel()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
