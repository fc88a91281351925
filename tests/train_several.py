"""Run by tests/test_sharded_head_readers.py under a launcher (or alone): `dualkd train` for several configs, one
after the other in the same processes, so that their start-up (imports: ~8 s a process on 2 CPU cores, most of a tiny
run's time) is paid once for all of them. A failed run stops the rest (its exit code is this one's).

    python tests/train_several.py A.yaml B.yaml ...
    accelerate launch --config_file configs/accelerate/zero3.yaml tests/train_several.py --resume A.yaml B.yaml
"""

from __future__ import annotations

import sys

from dualkd.cli import main

if __name__ == "__main__":
    flags = [a for a in sys.argv[1:] if a.startswith("--")]
    for config in (a for a in sys.argv[1:] if not a.startswith("--")):
        code = main(["train", config, *flags])
        if code:
            sys.exit(code)
