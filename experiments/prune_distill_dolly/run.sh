#!/usr/bin/env bash
# Prune, then distill (Minitron-style), on Dolly, on CPU, offline: experiments/prune_distill_dolly/README.md.
#   prune    SmolLM2-135M-Instruct cut to 6 of its 30 blocks: the student (dualkd prune)
#   teacher  teacher B: Gemma-3-270M after a short LoRA SFT (60 steps x 8) on the first 480 of the students' examples
#   caches   each teacher run once over the students' data (top-64 + hidden states: kd, dskd, dskdv2 read them)
#   grid     SFT at each lr of $LRS, the best dev CE chooses the lr every row trains with
#   route    each training and dev example named for the teacher that predicts its response better (route.py)
#   rows     SFT, KD (fkl), DSKD, DSKDv2 from teacher A; DSKDv2-ETA (cache), ULD, MinED (live) from teacher B;
#            DSKDv2 from both teachers at once (teacher.kind: several): summed, and routed per example
#   eval     every row, both teachers and the cut student: ROUGE-L / exact match on $N_TEST Dolly test prompts
#            x the seeds of $SEEDS (up to 128 new tokens), CE per token and bits per byte on $N_DEV dev responses
#   table    $OUT/results.md (experiments/prune_distill_dolly/table.py)
# What survives a fresh machine is the record ($RECORD, committed: the grid's choice, each row's metrics, each
# evaluation's scores, stage wall times): a row evaluated there is not trained or evaluated again, and the lr
# grid is not rerun once chosen, so a sitting only runs what no earlier sitting recorded.
# Every stage skips what is done and a stopped training run resumes from its last checkpoint, so the script
# continues across sittings: rerun it (or STAGES="rows eval" to run some, ROWS="kd dskd" to train some rows).
# A teacher's cache is built only while one of its rows is unrecorded (teacher B's once teacher B exists); eval
# skips models not trained yet. Wall time per stage goes to stage-seconds.txt. SMOKE=1: a few steps and prompts
# per stage (checks the plumbing in minutes; its record stays in $OUT).
set -euo pipefail
DUALKD=${DUALKD:-.venv/bin/dualkd}
PY=${PY:-.venv/bin/python}
MODELS=${MODELS:-$HOME/.cache/dualkd-real}
DATA=${DATA:-data/dolly}  # a folder with Dolly's train.jsonl, dev.jsonl and test.jsonl (README.md here)
OUT=${OUT:-runs/pdd}
STAGES=${STAGES:-"prune teacher caches grid route rows eval table"}
RECORD=${RECORD:-experiments/prune_distill_dolly/record}
if [ "${SMOKE:-0}" = 1 ]; then
  STEPS=4 TEACHER_STEPS=2 N_TEST=4 N_DEV=4 SEEDS=10 LRS=${LRS:-"1e-3"} OUT=${OUT}-smoke
  RECORD=$OUT/record  # a smoke run records nothing in the repository
fi
STEPS=${STEPS:-150}
TEACHER_STEPS=${TEACHER_STEPS:-60}
N_TRAIN=$((STEPS * 8))                # one epoch of micro-batches of 8
LRS=${LRS:-"3e-4 1e-3 3e-3"}
N_TEST=${N_TEST:-100}
N_DEV=${N_DEV:-200}
SEEDS=${SEEDS:-10,20,30}
CFG=configs/prune-distill-dolly.yaml
STUDENT=$OUT/smollm2-6l
TEACHER_A=$MODELS/smollm2-135m-instruct
TEACHER_B=$OUT/gemma3-270m-dolly/final
SHORT="eval.every_steps=$(( STEPS < 100 ? STEPS : 100 )) checkpoint.every_steps=$(( STEPS < 50 ? STEPS : 50 ))"
SIZE="student.path=$STUDENT data.train=$DATA/train.jsonl data.dev=$DATA/dev.jsonl data.max_examples=$N_TRAIN \
      optimization.max_steps=$STEPS $SHORT"
A="teacher.path=$TEACHER_A teacher.cache=$OUT/cache-a"
B_CACHE="teacher.path=$TEACHER_B teacher.cache=$OUT/cache-b"
B_LIVE="teacher.path=$TEACHER_B"
BOTH="teacher.kind=several teacher.members.a.path=$TEACHER_A teacher.members.a.cache=$OUT/cache-a \
      teacher.members.b.path=$TEACHER_B teacher.members.b.cache=$OUT/cache-b"
ROUTED="data.train=$OUT/train-routed.jsonl data.dev=$OUT/dev-routed.jsonl"
for split in train dev test; do  # every stage but the table reads the data
  [ "$STAGES" = table ] || [ -f $DATA/$split.jsonl ] || { echo "no $DATA/$split.jsonl: set DATA to a folder holding Dolly's train/dev/test.jsonl" >&2; exit 2; }
done
mkdir -p $OUT $RECORD
timed() {  # stage name, command: run it, append its wall time to the run's and the record's stage-seconds.txt
  local stage=$1; shift; local t0; t0=$(date +%s); "$@"
  echo "$stage $(( $(date +%s) - t0 ))" | tee -a $OUT/stage-seconds.txt >> $RECORD/stage-seconds.txt
}
has() { [[ " $STAGES " == *" $1 "* ]]; }
lr() { cat $OUT/lr.txt; }
keep() { mkdir -p "$(dirname "$RECORD/$1")"; cp "$OUT/$1" "$RECORD/$1"; }  # OUT/path -> RECORD/path
recorded() { [ -f $RECORD/eval/$1/scores.json ] && [ -f $RECORD/eval/$1/likelihood.json ]; }
pending() { local n; for n in "$@"; do recorded $n || return 0; done; return 1; }  # any of these unrecorded
if [ -f $RECORD/grid.json ] && [ ! -f $OUT/lr.txt ]; then  # an earlier sitting chose the lr
  $PY -c "import json, sys; print(json.load(open(sys.argv[1]))['chosen'])" $RECORD/grid.json > $OUT/lr.txt
fi

# the rows: name -> objective and teacher (the lr comes from the grid)
declare -A ROW=(
  [kd]="objective={name: kd, divergence: fkl}|$A"
  [dskd]="objective={name: dskd, divergence: fkl, temperature: 2.0}|$A"
  [dskdv2]="objective={name: dskdv2, divergence: fkl, temperature: 2.0}|$A"
  [dskdv2-eta]="objective={name: dskdv2, alignment: eta, divergence: fkl, temperature: 2.0}|$B_CACHE"
  [uld]="objective={name: uld}|$B_LIVE"
  [mined]="objective={name: mined, temperature: 2.0}|$B_LIVE"
  [both-sum]="objective={name: multi_teacher, combine: sum, each: {name: dskdv2, divergence: fkl, temperature: 2.0}}|$BOTH"
  [both-route]="objective={name: multi_teacher, combine: route, each: {name: dskdv2, divergence: fkl, temperature: 2.0}}|$BOTH $ROUTED"
)
ROW_ORDER=${ROWS:-"kd dskd dskdv2 dskdv2-eta uld mined both-sum both-route"}  # ROWS="kd dskd" trains some

train_row() {  # name, objective override, teacher overrides
  local name=$1 objective=$2 teacher=$3
  { recorded $name || [ -d $OUT/rows/$name/final ]; } && return 0
  # shellcheck disable=SC2086
  timed "row:$name" $DUALKD train $CFG $SIZE output_dir=$OUT/rows/$name optimization.lr=$(lr) "$objective" \
      $teacher checkpoint.resume=auto
  keep rows/$name/metrics.jsonl; keep rows/$name/summary.json
}

if has prune && [ ! -d $STUDENT ]; then
  timed prune $DUALKD prune $TEACHER_A --keep 6 --out $STUDENT
fi

if has teacher && [ ! -d $TEACHER_B ] && pending teacher-b dskdv2-eta uld mined both-sum both-route; then
  timed teacher $DUALKD train configs/prune-distill-dolly-teacher-gemma3.yaml output_dir=$OUT/gemma3-270m-dolly \
      student.path=$MODELS/gemma-3-270m data.train=$DATA/train.jsonl data.dev=$DATA/dev.jsonl \
      data.max_examples=$((TEACHER_STEPS * 8)) optimization.max_steps=$TEACHER_STEPS checkpoint.resume=auto \
      $( [ "${SMOKE:-0}" = 1 ] && echo "eval.every_steps=2 checkpoint.every_steps=2" )
fi

if has caches; then
  # shellcheck disable=SC2086
  [ -f $OUT/cache-a/done ] || ! pending kd dskd dskdv2 both-sum both-route || { timed cache-a $DUALKD cache-teacher $CFG $SIZE "${ROW[dskdv2]%%|*}" \
      teacher.path=$TEACHER_A --out $OUT/cache-a --hidden && touch $OUT/cache-a/done; }
  # shellcheck disable=SC2086
  [ -f $OUT/cache-b/done ] || [ ! -d $TEACHER_B ] || ! pending dskdv2-eta both-sum both-route || { timed cache-b $DUALKD cache-teacher $CFG $SIZE "${ROW[dskdv2-eta]%%|*}" \
      teacher.path=$TEACHER_B --out $OUT/cache-b --hidden && touch $OUT/cache-b/done; }
fi

if has grid && [ ! -f $OUT/lr.txt ]; then
  for rate in $LRS; do
    [ -d $OUT/rows/sft-lr$rate/final ] && continue
    # shellcheck disable=SC2086
    timed "grid:sft-lr$rate" $DUALKD train $CFG $SIZE output_dir=$OUT/rows/sft-lr$rate optimization.lr=$rate \
        checkpoint.resume=auto
  done
  $PY - "$OUT" $LRS <<'PYEOF'
import json, sys
from pathlib import Path
out, rates = Path(sys.argv[1]), sys.argv[2:]
ce = {r: json.loads((out / "rows" / f"sft-lr{r}" / "summary.json").read_text())["best_dev_loss"] for r in rates}
best = min(ce, key=ce.get)
(out / "grid.json").write_text(json.dumps({"dev_ce": ce, "chosen": best}, indent=2))
(out / "lr.txt").write_text(best + "\n")
print("lr grid (best dev CE):", ce, "-> lr", best)
PYEOF
  ln -sfn sft-lr$(lr) $OUT/rows/sft
  keep grid.json
fi

if has route && [ ! -f $OUT/train-routed.jsonl ] && [ -f $OUT/cache-b/done ] && pending both-route; then
  timed route $PY experiments/prune_distill_dolly/route.py $OUT/cache-a $OUT/cache-b \
      --split train $DATA/train.jsonl $OUT/train-routed.jsonl --split dev $DATA/dev.jsonl $OUT/dev-routed.jsonl
  keep train-routed.jsonl.json; keep dev-routed.jsonl.json
fi

if has rows; then
  # SFT at the chosen lr: the grid's run, or (on a machine without it) trained again
  [ -e $OUT/rows/sft ] || train_row sft "objective={name: sft}" ""
  for name in $ROW_ORDER; do
    spec=${ROW[$name]}
    train_row $name "${spec%%|*}" "${spec#*|}"
  done
fi

evaluate() {  # name, model folder (skipped until it exists)
  local name=$1 model=$2 dir=$OUT/eval/$1
  { recorded $name || [ ! -d $model ]; } && return 0
  [ -f $dir/scores.json ] || timed "eval:$name" $DUALKD eval $model $DATA/test.jsonl --max-examples $N_TEST \
      --seeds $SEEDS --max-new-tokens 128 --max-length 384 --max-prompt-length 256 --out $dir
  keep eval/$name/scores.json
  [ -f $dir/likelihood.json ] || timed "likelihood:$name" $DUALKD likelihood $model --data $DATA/dev.jsonl \
      --max-examples $N_DEV --out $dir/likelihood.json > /dev/null
  keep eval/$name/likelihood.json
}

if has eval; then
  for name in sft $ROW_ORDER; do  # the students first: a sitting that ends early has recorded the rows
    evaluate $name $OUT/rows/$name/final
  done
  evaluate cut-student $STUDENT
  evaluate teacher-a $TEACHER_A
  evaluate teacher-b $TEACHER_B
fi

if has table; then
  $PY experiments/prune_distill_dolly/table.py $RECORD
fi
