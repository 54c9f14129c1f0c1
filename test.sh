#!/usr/bin/env bash
# Evaluate every protocol, each its own table (in-domain, cross-organ, leave-one-out zero-shot,
# few-shot; README "Protocols"): run train.sh first, then
#   bash test.sh [indomain|crossorgan|zeroshot|fewshot|all|paper]      (default: all)
# paper (not part of all; after bash train.sh paper): the report's Table 1 (first target's test split) and
# Table 2 (second target's, trained on the first), a row per variant, as RESULTS/paper/table{1,2}.{md,csv,json},
# and the side-by-side figures RESULTS/paper/figure_<target>.png. RECIPE=medvmad bash test.sh paper: the
# shared-recipe ablation that RECIPE=medvmad bash train.sh paper trained, into RESULTS/paper_recipe_medvmad.
# With no BMAD data under DATA_ROOT, the demo set (DEMO_ROOT) and the model train.sh stored (tiny) are used.
# GPUS=0,1,2,3 bash test.sh all: the evaluations run in parallel, one per GPU, queued (jobs.sh), logs in
# LOG_DIR; the summary tables are the same as from a sequential run. LAUNCH="torchrun --standalone
# --nproc_per_node 4" bash test.sh ...: each evaluation sharded over 4 GPUs.
set -euo pipefail
cd "$(dirname "$0")"
source jobs.sh
PROTOCOL=${1:-all}
case $PROTOCOL in
  indomain|crossorgan|zeroshot|fewshot|all|paper) ;;
  *) echo "error: unknown protocol '$PROTOCOL': choose indomain, crossorgan, zeroshot, fewshot, all or paper" >&2
     exit 2 ;;
esac

DATA_ROOT=${DATA_ROOT:-data/BMAD}
TARGETS=${TARGETS:-"Brain Liver"}
K_SHOTS=${K_SHOTS:-"2 4 8 16"}
SEEDS=${SEEDS:-"1 2 3"}
VARIANTS=${VARIANTS:-"medvmad text_only anomalyclip mvfa"}   # paper: as in train.sh, in row order
RECIPE=${RECIPE:-}                             # paper: as in train.sh (empty: each row's own recipe)
BATCH_SIZE=${BATCH_SIZE:-8}
DEVICE=${DEVICE:-auto}
PRECISION=${PRECISION:-fp32}
SAVE_ROOT=${SAVE_ROOT:-checkpoint}
RESULTS=${RESULTS:-results}
EXTRA=${EXTRA:-}                               # e.g. --visualize 8, --aupro legacy
VISUALIZE=${VISUALIZE:-4}                      # indomain: overlays of this many normal and abnormal images, and ROC/PRO curves; 0 = none
PRETRAINED=${PRETRAINED:-}                     # as given to train.sh when that was a weights file (/path/to/ViT-L-14-336.pt)
MODEL_NAME=${MODEL_NAME:-}                     # as given to train.sh when that was local-dir:/path or hf-hub:...
GPUS=${GPUS:-}                                 # e.g. 0,1,2,3: one job per GPU in parallel; empty: one after another
LAUNCH=${LAUNCH:-python}                       # or "torchrun --standalone --nproc_per_node N" (without GPUS)
LOG_DIR=${LOG_DIR:-$RESULTS/logs/$(date +%Y%m%d-%H%M%S)}     # per-job logs of a GPUS run

DEMO_ROOT=${DEMO_ROOT:-data/demo}              # as in train.sh

if [ ! -d "$DATA_ROOT/Brain" ]; then
  echo "no BMAD data in $DATA_ROOT: using the demo set in $DEMO_ROOT"
  DATA_ROOT=$DEMO_ROOT; TARGETS="Brain BrainCoronal"   # the model as the checkpoints store it
  python -c "from generate_dataset.demo import ensure_demo; ensure_demo('$DATA_ROOT'); ensure_demo('$DATA_ROOT', view='coronal')"
fi
BOOTSTRAP=${BOOTSTRAP:-1000}                    # patient resamples for the 95% intervals; 0 = off
COMMON="--batch_size $BATCH_SIZE --device $DEVICE --precision $PRECISION --bootstrap $BOOTSTRAP
        ${PRETRAINED:+--pretrained $PRETRAINED} ${MODEL_NAME:+--model_name $MODEL_NAME} $EXTRA"
read -r -a targets <<< "$TARGETS"
if [[ $PROTOCOL == crossorgan || $PROTOCOL == all || $PROTOCOL == paper ]] && (( ${#targets[@]} < 2 )); then
  echo "error: test.sh $PROTOCOL: TARGETS must name two datasets (crossorgan tests each on the other's checkpoint;" \
       "paper: Table 1 on the first, Table 2 on the second), got TARGETS='$TARGETS'" >&2
  exit 2
fi

if [[ $PROTOCOL == indomain || $PROTOCOL == all ]]; then
  for target in "${targets[@]}"; do
    job $LAUNCH test.py --data_path "$DATA_ROOT/$target" --checkpoint_path "$SAVE_ROOT/indomain/$target/best.pth" \
      --save_path "$RESULTS/indomain/$target" --visualize "$VISUALIZE" $COMMON
  done
fi

if [[ $PROTOCOL == crossorgan || $PROTOCOL == all ]]; then
  # train on the first target, test on the second, and the reverse
  job $LAUNCH test.py --data_path "$DATA_ROOT/${targets[1]}" \
    --checkpoint_path "$SAVE_ROOT/indomain/${targets[0]}/best.pth" --save_path "$RESULTS/crossorgan/${targets[0]}_to_${targets[1]}" $COMMON
  job $LAUNCH test.py --data_path "$DATA_ROOT/${targets[0]}" \
    --checkpoint_path "$SAVE_ROOT/indomain/${targets[1]}/best.pth" --save_path "$RESULTS/crossorgan/${targets[1]}_to_${targets[0]}" $COMMON
fi

if [[ $PROTOCOL == zeroshot || $PROTOCOL == all ]]; then
  for target in "${targets[@]}"; do
    job $LAUNCH test.py --data_path "$DATA_ROOT/$target" --checkpoint_path "$SAVE_ROOT/zeroshot/$target/best.pth" \
      --save_path "$RESULTS/zeroshot/$target" $COMMON
  done
fi

if [[ $PROTOCOL == fewshot || $PROTOCOL == all ]]; then
  for target in "${targets[@]}"; do
    for k in $K_SHOTS; do
      for seed in $SEEDS; do
        run="$SAVE_ROOT/fewshot/$target/${k}shot_seed$seed"
        job $LAUNCH test.py --data_path "$DATA_ROOT/$target" --checkpoint_path "$run/best.pth" \
          --k_shot "$k" --fewshot_seed "$seed" --save_path "$RESULTS/fewshot/$target/${k}shot_seed$seed" $COMMON
      done
    done
  done
  run_queued   # the summaries below read every run's results
  for target in "${targets[@]}"; do
    runs=()
    for k in $K_SHOTS; do
      for seed in $SEEDS; do
        runs+=("$RESULTS/fewshot/$target/${k}shot_seed$seed/results.json")
      done
    done
    python summarize_results.py --results "${runs[@]}" --save_path "$RESULTS/fewshot/$target"
  done
fi

if [[ $PROTOCOL == paper ]]; then   # each variant trained on the first target, tested on both targets
  paper=paper${RECIPE:+_recipe_$RECIPE}
  recipes=${RECIPE:+"every row with the $RECIPE recipe"}
  runs=(); checkpoints=()
  for variant in $VARIANTS; do
    checkpoints+=("$SAVE_ROOT/$paper/$variant/best.pth")
    job $LAUNCH test.py --data_path "$DATA_ROOT/${targets[0]}" "$DATA_ROOT/${targets[1]}" --checkpoint_path "${checkpoints[-1]}" \
      --save_path "$RESULTS/$paper/$variant" $COMMON
    runs+=("$RESULTS/$paper/$variant/results.json")
  done
  run_queued   # the tables below read every variant's results
  python summarize_results.py --paper --results "${runs[@]}" --dataset "${targets[0]}" --save_path "$RESULTS/$paper" \
    --name table1 --title "Table 1: ${targets[0]} test split (trained on ${targets[0]}; ${recipes:-each row its own recipe})"
  python summarize_results.py --paper --results "${runs[@]}" --dataset "${targets[1]}" --save_path "$RESULTS/$paper" \
    --name table2 --title "Table 2: ${targets[1]} test split (trained on ${targets[0]}; ${recipes:-each row its own recipe})"
  for target in "${targets[@]:0:2}"; do
    python visualize_compare.py --checkpoint_path "${checkpoints[@]}" --data_path "$DATA_ROOT/$target" \
      --save_path "$RESULTS/$paper/figure_$target.png" --batch_size "$BATCH_SIZE" --device "$DEVICE" --precision "$PRECISION"
  done
fi

run_queued
if [[ $PROTOCOL == indomain || $PROTOCOL == all ]]; then
  drawn=""; [[ $VISUALIZE == 0 ]] || drawn="; overlays and ROC/PRO curves in visualization/<target>/"
  echo "in-domain results (results.json, results.csv, results_calibration.csv, reliability_<target>.png, scores.csv$drawn):"
  for target in "${targets[@]}"; do echo "  $RESULTS/indomain/$target"; done
fi
