#!/usr/bin/env bash
# The AlignDistil pipeline of docs/real-run-aligndistil-smollm2-dolly.md, on CPU, offline:
#   1. a preference set from Dolly: chosen = the Dolly reference, rejected = a Gemma-3-270M (base) sample;
#   2. DPO and reverse DPO of SmolLM2-135M-Instruct;
#   3. AlignDistil with adaptive α and with constant α = 2;
#   4. held-out alignment metrics of every model (reward accuracy, length, KL to the DPO model, ROUGE-L).
# Sizes (N_TRAIN, N_TEST, steps in the configs) fit about an hour of a 2-core CPU.
set -euo pipefail
DUALKD=${DUALKD:-.venv/bin/dualkd}
MODELS=${MODELS:-$HOME/.cache/dualkd-real}
DATA=${DATA:-../shared/data/dolly}
N_TRAIN=${N_TRAIN:-320}
N_TEST=${N_TEST:-100}
OUT=runs/prefs-dolly
GEN="--max-new-tokens 96 --max-length 320 --max-prompt-length 192 --no-repeat-ngram-size 0 --batch-size 16"

mkdir -p $OUT
[ -f $OUT/train.jsonl ] || $DUALKD preference build "$MODELS/gemma-3-270m" --data "$DATA/train.jsonl" \
    --out $OUT/train.jsonl --max-examples $N_TRAIN $GEN
[ -f $OUT/dev.jsonl ] || $DUALKD preference build "$MODELS/gemma-3-270m" --data "$DATA/dev.jsonl" \
    --out $OUT/dev.jsonl --max-examples 48 $GEN
[ -f $OUT/test.jsonl ] || $DUALKD preference build "$MODELS/gemma-3-270m" --data "$DATA/test.jsonl" \
    --out $OUT/test.jsonl --max-examples $N_TEST $GEN

[ -d runs/dpo-smollm2-dolly/final ] || $DUALKD train configs/dpo-smollm2-dolly.yaml
[ -d runs/rdpo-smollm2-dolly/final ] || $DUALKD train configs/dpo-smollm2-dolly.yaml objective.swap_pairs=true \
    output_dir=runs/rdpo-smollm2-dolly
[ -d runs/aligndistil-smollm2-dolly/final ] || $DUALKD train configs/aligndistil-smollm2-dolly.yaml
[ -d runs/aligndistil-const2-smollm2-dolly/final ] || $DUALKD train configs/aligndistil-smollm2-dolly.yaml \
    objective.teacher_logits=constant objective.alpha=2.0 output_dir=runs/aligndistil-const2-smollm2-dolly

EVAL="--pairs $OUT/test.jsonl --dpo runs/dpo-smollm2-dolly/final --reference $MODELS/smollm2-135m-instruct \
      --beta 0.1 --max-new-tokens 128 --max-length 320 --max-prompt-length 192 --batch-size 16 --no-repeat-ngram-size 0"
$DUALKD align-eval "$MODELS/smollm2-135m-instruct" $EVAL --out runs/align-eval/initial
$DUALKD align-eval runs/dpo-smollm2-dolly/final $EVAL --out runs/align-eval/dpo
$DUALKD align-eval runs/aligndistil-smollm2-dolly/final $EVAL --out runs/align-eval/aligndistil-adaptive
$DUALKD align-eval runs/aligndistil-const2-smollm2-dolly/final $EVAL --out runs/align-eval/aligndistil-const2
