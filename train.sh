#!/usr/bin/env bash
# Train MedVMAD for each protocol (in-domain, leave-one-out zero-shot, few-shot; README "Protocols"):
# edit the variables, then
#   bash train.sh [indomain|zeroshot|fewshot|all|paper]      (default: all)
# indomain also serves the cross-organ protocol (train on one organ, test on the other: test.sh).
# paper (not part of all): the report's Tables 1-2, each of VARIANTS trained (train.py --variant) on the
# first target's labelled valid split with its own recipe (recipes.json: the values of its paper's code),
# into SAVE_ROOT/paper/<variant>; then bash test.sh paper. RECIPE=medvmad bash train.sh paper trains
# every row with that one recipe instead (a controlled ablation), into SAVE_ROOT/paper_recipe_medvmad.
# IMAGE_SIZE, EPOCH, BATCH_SIZE, LEARNING_RATE, FEWSHOT_EPOCH left empty take the recipe's values.
# With no BMAD data under DATA_ROOT, the demo set is built and the tiny offline model is used.
# A run folder that already holds a run is refused; OVERWRITE=1 bash train.sh ... replaces it.
# GPUS=0,1,2,3 bash train.sh fewshot: the protocol's trainings run in parallel, one per GPU, queued
# (jobs.sh, run_jobs.py), logs in LOG_DIR. LAUNCH="torchrun --standalone --nproc_per_node 4" bash
# train.sh indomain: each training in turn on 4 GPUs with DDP (README "Multi-GPU").
set -euo pipefail
cd "$(dirname "$0")"
source jobs.sh
PROTOCOL=${1:-all}
case $PROTOCOL in
  indomain|zeroshot|fewshot|all|paper) ;;
  *) echo "error: unknown protocol '$PROTOCOL': choose indomain, zeroshot, fewshot, all or paper" >&2; exit 2 ;;
esac

DATA_ROOT=${DATA_ROOT:-data/BMAD}            # holds Brain/, Liver/, Retina_RESC/, ... (BMAD layout)
TARGETS=${TARGETS:-"Brain Liver"}            # datasets reported in the tables
SOURCES=${SOURCES:-"Brain Liver Retina_RESC Retina_OCT2017 Chest Histopathology"}  # leave-one-out pool
MODEL_NAME=${MODEL_NAME:-ViT-L-14-336}
PRETRAINED=${PRETRAINED:-openai}              # or /path/to/ViT-L-14-336.pt offline
IMAGE_SIZE=${IMAGE_SIZE:-}                   # empty: the recipe's (recipes.json; medvmad: 336)
EPOCH=${EPOCH:-}                             # empty: the recipe's (medvmad: 10)
BATCH_SIZE=${BATCH_SIZE:-}                   # empty: the recipe's (medvmad: 8)
FEWSHOT_EPOCH=${FEWSHOT_EPOCH:-}             # empty: the recipe's fewshot_epoch (50)
LEARNING_RATE=${LEARNING_RATE:-}             # empty: the recipe's (medvmad: 1e-3, few-shot 1e-3)
RECIPE=${RECIPE:-}                           # paper: empty = each row's own recipe; a variant name = that one for all
K_SHOTS=${K_SHOTS:-"2 4 8 16"}
SEEDS=${SEEDS:-"1 2 3"}
VARIANTS=${VARIANTS:-"medvmad text_only anomalyclip mvfa"}   # paper: the models of the report's tables, in row order
DEVICE=${DEVICE:-auto}
PRECISION=${PRECISION:-fp32}
SAVE_ROOT=${SAVE_ROOT:-checkpoint}
EXTRA=${EXTRA:-}                               # any further train.py flags
OVERWRITE=${OVERWRITE:-}                       # 1: replace earlier runs in the same folders (--overwrite)
GPUS=${GPUS:-}                                 # e.g. 0,1,2,3: one job per GPU in parallel; empty: one after another
LAUNCH=${LAUNCH:-python}                       # or "torchrun --standalone --nproc_per_node N" (without GPUS)
LOG_DIR=${LOG_DIR:-$SAVE_ROOT/logs/$(date +%Y%m%d-%H%M%S)}   # per-job logs of a GPUS run

if [ ! -d "$DATA_ROOT/Brain" ]; then
  echo "no BMAD data in $DATA_ROOT: using the demo set with the tiny offline model"
  DATA_ROOT=data/demo; TARGETS="Brain BrainCoronal"; SOURCES="Brain BrainCoronal"
  MODEL_NAME=tiny; PRETRAINED=none
  if [[ $PROTOCOL != paper ]]; then   # the tiny model's demo settings; paper keeps each row's recipe
    IMAGE_SIZE=${IMAGE_SIZE:-224}; EPOCH=${EPOCH:-15}; FEWSHOT_EPOCH=${FEWSHOT_EPOCH:-3}
  fi
  python -c "from generate_dataset.demo import ensure_demo; ensure_demo('$DATA_ROOT'); ensure_demo('$DATA_ROOT', view='coronal')"
fi
COMMON="--model_name $MODEL_NAME --pretrained $PRETRAINED ${IMAGE_SIZE:+--image_size $IMAGE_SIZE}
        ${BATCH_SIZE:+--batch_size $BATCH_SIZE} ${LEARNING_RATE:+--learning_rate $LEARNING_RATE}
        --device $DEVICE --precision $PRECISION ${OVERWRITE:+--overwrite} $EXTRA"

if [[ $PROTOCOL == indomain || $PROTOCOL == all ]]; then
  for target in $TARGETS; do   # (a) in-domain and (b) cross-organ: train on the target's labelled valid split
    job $LAUNCH train.py --train_data_path "$DATA_ROOT/$target" --train_split valid ${EPOCH:+--epoch $EPOCH} \
      --save_path "$SAVE_ROOT/indomain/$target" $COMMON
  done
fi

if [[ $PROTOCOL == zeroshot || $PROTOCOL == all ]]; then
  for target in $TARGETS; do   # (c) MVFA leave-one-out: train on every other dataset, never on the target
    others=()
    for source in $SOURCES; do
      [[ $source != "$target" && -d $DATA_ROOT/$source ]] && others+=("$DATA_ROOT/$source")
    done
    job $LAUNCH train.py --train_data_path "${others[@]}" --train_split test ${EPOCH:+--epoch $EPOCH} \
      --save_path "$SAVE_ROOT/zeroshot/$target" $COMMON
  done
fi

if [[ $PROTOCOL == fewshot || $PROTOCOL == all ]]; then
  for target in $TARGETS; do   # (d) k normal + k abnormal images of the target's valid split, x11 augmented
    for k in $K_SHOTS; do
      for seed in $SEEDS; do
        job $LAUNCH train.py --train_data_path "$DATA_ROOT/$target" --k_shot "$k" --fewshot_seed "$seed" \
          ${FEWSHOT_EPOCH:+--epoch $FEWSHOT_EPOCH} --save_path "$SAVE_ROOT/fewshot/$target/${k}shot_seed$seed" $COMMON
      done
    done
  done
fi

if [[ $PROTOCOL == paper ]]; then   # Tables 1-2: every variant trained on the first target (Brain) alone
  source=${TARGETS%% *}
  for variant in $VARIANTS; do
    job $LAUNCH train.py --train_data_path "$DATA_ROOT/$source" --train_split valid ${EPOCH:+--epoch $EPOCH} \
      --variant "$variant" ${RECIPE:+--recipe $RECIPE} --save_path "$SAVE_ROOT/paper${RECIPE:+_recipe_$RECIPE}/$variant" $COMMON
  done
fi

run_queued
