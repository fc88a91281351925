#!/usr/bin/env bash
# gpu-check: what only a CUDA machine can check, in one run of under ten minutes; every figure goes to one file.
#
#   scripts/gpu-check.sh [OUT]     (OUT: runs/gpu-check/results.md; PY=python3 where the machine has torch but no .venv)
#
#   1. the machine: GPUs, driver, torch, bf16 support
#   2. the test suite's GPU tests: FSDP2 vs one process (2+ GPUs), vLLM as the on-policy sampler (skipped unless
#      `import vllm` works: the device machine has no network); then FSDP2 training on the GPUs present
#   3. bf16 autocast: a short run of the demo teacher recipe in bf16 beside the same run in fp32, losses compared
#   4. the fused KD loss vs materialized logits at V = 262,144, N = 8,192 (time and peak memory, bf16)
#   5. the KD step benchmark on SmolLM2 <- Gemma-3 (needs ../shared/tools/real-models and Dolly)
# A step that fails is recorded as failed and the script goes on; the exit status is the number of failures.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-runs/gpu-check/results.md}
mkdir -p "$(dirname "$OUT")"
WORK=$(dirname "$OUT")/work
mkdir -p "$WORK"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH="$PWD/src:$PWD:${PYTHONPATH:-}"
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

run "GPU tests (the CUDA-marked ones; FSDP2 vs one process needs 2 GPUs)" 240 \
  $PY -m pytest -q -p no:cacheprovider tests/test_distributed.py tests/test_on_policy.py -k "fsdp2 or cuda or gpu" -rs

NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
run "FSDP2 training on the $NGPU GPU(s) present (demo teacher recipe, 20 steps, one process per GPU)" 180 \
  $PY -m accelerate.commands.launch --config_file configs/accelerate/fsdp2.yaml --num_processes "$NGPU" \
      --main_process_port 0 -m dualkd.cli train src/dualkd/recipes/demo-teacher.yaml output_dir=$WORK/fsdp2 \
      optimization.max_steps=20 "logging.progress_bar='off'"

bf16_vs_fp32() {  # each precision in its own process: accelerate fixes it once per process
  for precision in no bf16; do
    $PY -m dualkd.cli train src/dualkd/recipes/demo-teacher.yaml output_dir=$WORK/demo-$precision \
        optimization.max_steps=30 "optimization.mixed_precision='$precision'" "logging.progress_bar='off'" > $WORK/demo-$precision.log 2>&1 || return 1
  done
  $PY - "$WORK" <<'PYEOF'
import json, sys
from pathlib import Path
final = {}
for precision in ("no", "bf16"):
    rows = [json.loads(l) for l in (Path(sys.argv[1]) / f"demo-{precision}" / "metrics.jsonl").read_text().splitlines()]
    final[precision] = [r for r in rows if r.get("kind") == "train"][-1]
a, b = final["no"], final["bf16"]
print(f"step {a['step']} train loss: fp32 {a['loss']:.4f}  bf16 {b['loss']:.4f}  (relative difference "
      f"{abs(b['loss'] - a['loss']) / a['loss']:.2e}); tokens/s fp32 {a['tokens_per_s']:.0f}  bf16 {b['tokens_per_s']:.0f}")
PYEOF
}
run "bf16 autocast vs fp32 (demo teacher recipe, 30 steps)" 180 bf16_vs_fp32

run "fused KD loss vs materialized logits, V = 262,144, N = 8,192, bf16" 240 \
  $PY benchmarks/losses.py --device cuda --dtype bfloat16 --names fkl --vocab 262144 --rows 8192 --dim 1024 \
      --reps 3 --out "$WORK/losses-gpu.csv" --max-gib 60

run "KD step, SmolLM2 <- Gemma-3" 240 $PY benchmarks/kd_step.py --objectives kd,dskdv2 --device cuda --reps 3 --no-memory


echo "gpu-check: $FAILED step(s) failed; results in $OUT" >&2
exit $FAILED
