#!/usr/bin/env bash
# gpu-check: what only a CUDA machine can check, in one run of under ten minutes; every figure goes to one file.
#
#   scripts/gpu-check.sh [OUT]          (OUT defaults to runs/gpu-check/results.md; needs `make install` first)
#
#   1. the machine: GPUs, driver, torch, bf16 support
#   2. the test suite's GPU tests: the CUDA-marked ones and FSDP2 on the GPUs present (2 or more)
#   3. bf16 autocast: a short KD run (mixed_precision bf16) beside the same run in fp32, final losses compared
#   4. the fused KD loss vs materialized logits at V = 262,144, N = 8,192 (time and peak memory, bf16)
#   5. the KD step benchmark on SmolLM2 <- Gemma-3 (needs ../shared/tools/real-models and Dolly)
#   6. vLLM as the on-policy sampler, if `import vllm` works (the device machine has no network: not installed)
# A step that fails is recorded as failed and the script goes on; the exit status is the number of failures.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-runs/gpu-check/results.md}
mkdir -p "$(dirname "$OUT")"
WORK=$(dirname "$OUT")/work
mkdir -p "$WORK"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
FAILED=0
section() { printf '\n## %s\n\n```\n' "$1" >> "$OUT"; }
endsection() { printf '```\n' >> "$OUT"; }
run() {  # name, timeout seconds, command...: output into the file, failure counted
  local name=$1 limit=$2; shift 2
  section "$name"
  local t0; t0=$(date +%s)
  if timeout "$limit" "$@" >> "$OUT" 2>&1; then
    echo "[ok in $(( $(date +%s) - t0 )) s]" >> "$OUT"
  else
    echo "[FAILED (exit $?) after $(( $(date +%s) - t0 )) s]" >> "$OUT"; FAILED=$((FAILED + 1))
  fi
  endsection
  echo "gpu-check: $name done" >&2
}

echo "# gpu-check $(date -u +%Y-%m-%dT%H:%MZ) on $(hostname)" > "$OUT"
run "machine" 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c '
import torch
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpus\", torch.cuda.device_count())
print(\"bf16 supported:\", torch.cuda.is_available() and torch.cuda.is_bf16_supported())'"

run "GPU tests (CUDA, FSDP2 on the GPUs present)" 240 \
  $PY -m pytest -q -x -p no:cacheprovider tests/test_distributed.py -k "fsdp2 or cuda" -rs

run "bf16 autocast vs fp32 (demo recipes, 30 steps)" 120 $PY - "$WORK" <<'PYEOF'
import json, sys
from pathlib import Path
from dualkd.config import load_config
from dualkd.train.loop import train
work = Path(sys.argv[1])
losses = {}
for precision in ("no", "bf16"):
    cfg = load_config("src/dualkd/recipes/demo-teacher.yaml", [f"output_dir={work}/demo-{precision}",
          "optimization.max_steps=30", f"optimization.mixed_precision={precision}", "checkpoint.resume=never"])
    run_dir = train(cfg)
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    losses[precision] = [r["loss"] for r in rows if r.get("kind") == "train"][-1]
print("final train loss: fp32 %.4f  bf16 %.4f  (relative difference %.2e)" % (
    losses["no"], losses["bf16"], abs(losses["bf16"] - losses["no"]) / losses["no"]))
PYEOF

run "fused KD loss vs materialized logits, V = 262,144, N = 8,192, bf16" 240 \
  $PY benchmarks/losses.py --device cuda --dtype bfloat16 --names fkl --vocab 262144 --rows 8192 --dim 1024 \
      --reps 3 --out "$WORK/losses-gpu.csv" --max-gib 60

run "KD step, SmolLM2 <- Gemma-3" 240 $PY benchmarks/kd_step.py --objectives kd,dskdv2 --device cuda --reps 3

if $PY -c "import vllm" 2>/dev/null; then
  run "vLLM sampler (on-policy KD, 4 steps)" 180 $PY -m pytest -q -p no:cacheprovider tests/test_on_policy.py -k vllm
else
  section "vLLM sampler"; echo "vllm is not installed here: skipped" >> "$OUT"; endsection
fi

echo "gpu-check: $FAILED step(s) failed; results in $OUT" >&2
exit $FAILED
