#!/usr/bin/env bash
# The Multi30k De→En pipeline of docs/real-run-mt-multi30k.md, on CPU, offline:
#   1. a Transformer teacher from scratch (with its own shared BPE tokenizer);
#   2. a 4x smaller student from scratch with the same budget under each objective:
#      CE baseline, word-level KD, TIE-KD, CBMI adaptive training, and SeqKD (teacher beam-5 outputs);
#   3. beam-5 BLEU / chrF of every model on test_2016_flickr (sacreBLEU).
# Each stage is skipped when its output exists, so the script resumes after an interruption.
set -euo pipefail
DUALKD=${DUALKD:-.venv/bin/dualkd}
DATA=${DATA:-../shared/data/mt/multi30k_en_de}
STUDENT=configs/mt-student-multi30k.yaml
TEACHER=runs/mt-teacher-multi30k/final
stamp() { echo "[mt-multi30k] $(date -u +%H:%M:%S) $*"; }

stamp teacher
[ -d $TEACHER ] || $DUALKD train configs/mt-teacher-multi30k.yaml
stamp baseline
[ -d runs/mt-student-multi30k/final ] || $DUALKD train $STUDENT
stamp word_kd
[ -d runs/mt-word-kd-multi30k/final ] || $DUALKD train $STUDENT 'objective={name: word_kd, kd_rate: 0.5}' \
    teacher.path=$TEACHER output_dir=runs/mt-word-kd-multi30k
stamp tie_kd
[ -d runs/mt-tie-kd-multi30k/final ] || $DUALKD train $STUDENT 'objective={name: tie_kd}' \
    teacher.path=$TEACHER output_dir=runs/mt-tie-kd-multi30k
stamp cbmi
[ -d runs/mt-cbmi-multi30k/final ] || $DUALKD train $STUDENT 'objective={name: cbmi, pretrain_steps: 900}' \
    output_dir=runs/mt-cbmi-multi30k

EVAL="$DATA/test_2016_flickr.jsonl --translation de:en --num-beams 5 --max-new-tokens 64 --batch-size 64"
for run in mt-teacher-multi30k mt-student-multi30k mt-word-kd-multi30k mt-tie-kd-multi30k mt-cbmi-multi30k; do
    stamp eval $run
    [ -f runs/$run/eval/scores.json ] || $DUALKD eval runs/$run $EVAL
done

stamp seqkd
[ -d runs/mt-seqkd-multi30k/final ] || $DUALKD train $STUDENT source.kind=seqkd teacher.path=$TEACHER \
    output_dir=runs/mt-seqkd-multi30k
[ -f runs/mt-seqkd-multi30k/eval/scores.json ] || $DUALKD eval runs/mt-seqkd-multi30k $EVAL
stamp done
