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
# With no BMAD data under DATA_ROOT, the demo set is built in DEMO_ROOT and, unless MODEL_NAME is set, the tiny
# offline model is used (EPOCH 15, IMAGE_SIZE 224 unless set; paper keeps each row's recipe unless set).
# Run folders that already hold a run are refused before any training starts (bash test.sh ... re-tests them);
# OVERWRITE=1 bash train.sh ... replaces them. paper reuses the in-domain run of the first target for a row whose
# training it is (same data, variant, recipe and flags: reuse_run.py), and says which.
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
MODEL_NAME=${MODEL_NAME:-}                   # empty: ViT-L-14-336 (the tiny offline model on the demo set)
PRETRAINED=${PRETRAINED:-}                   # empty: openai (none with the tiny model); or /path/to/ViT-L-14-336.pt
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
DEMO_ROOT=${DEMO_ROOT:-data/demo}            # where the demo set is built when DATA_ROOT has no BMAD data

if [ ! -d "$DATA_ROOT/Brain" ]; then
  echo -n "no BMAD data in $DATA_ROOT: "
  DATA_ROOT=$DEMO_ROOT; TARGETS="Brain BrainCoronal"; SOURCES="Brain BrainCoronal"
  [[ -n $MODEL_NAME ]] || { MODEL_NAME=tiny; PRETRAINED=none; }   # no model chosen: the tiny random one
  if [[ $PROTOCOL != paper ]]; then   # the demo settings; paper keeps each row's recipe
    IMAGE_SIZE=${IMAGE_SIZE:-224}; EPOCH=${EPOCH:-15}; FEWSHOT_EPOCH=${FEWSHOT_EPOCH:-3}
  fi
  echo "the demo set in $DATA_ROOT ($TARGETS) with the $MODEL_NAME model, epochs ${EPOCH:-of each recipe}${FEWSHOT_EPOCH:+ (few-shot $FEWSHOT_EPOCH)}," \
       "image size ${IMAGE_SIZE:-of each recipe} (set EPOCH, IMAGE_SIZE, MODEL_NAME to change them)"
  python -c "from generate_dataset.demo import ensure_demo; ensure_demo('$DATA_ROOT'); ensure_demo('$DATA_ROOT', view='coronal')"
fi
MODEL_NAME=${MODEL_NAME:-ViT-L-14-336}; PRETRAINED=${PRETRAINED:-openai}
COMMON="--model_name $MODEL_NAME --pretrained $PRETRAINED ${IMAGE_SIZE:+--image_size $IMAGE_SIZE}
        ${BATCH_SIZE:+--batch_size $BATCH_SIZE} ${LEARNING_RATE:+--learning_rate $LEARNING_RATE}
        --device $DEVICE --precision $PRECISION ${OVERWRITE:+--overwrite} $EXTRA"

# Each training is planned first (plan SAVE_PATH REUSE_FROM train.py's arguments; REUSE_FROM: a run that
# may be the same training, or empty); the folders are checked before any of them runs.
SAVES=(); REUSE=(); ARGS=()
plan() {
  SAVES+=("$1"); REUSE+=("$2")
  ARGS+=("$(printf '%q ' "${@:3}" --save_path "$1" $COMMON)")
}

if [[ $PROTOCOL == indomain || $PROTOCOL == all ]]; then
  for target in $TARGETS; do   # (a) in-domain and (b) cross-organ: train on the target's labelled valid split
    plan "$SAVE_ROOT/indomain/$target" "" --train_data_path "$DATA_ROOT/$target" --train_split valid \
      ${EPOCH:+--epoch $EPOCH}
  done
fi

if [[ $PROTOCOL == zeroshot || $PROTOCOL == all ]]; then
  for target in $TARGETS; do   # (c) MVFA leave-one-out: train on every other dataset, never on the target
    others=()
    for source in $SOURCES; do
      [[ $source != "$target" && -d $DATA_ROOT/$source ]] && others+=("$DATA_ROOT/$source")
    done
    plan "$SAVE_ROOT/zeroshot/$target" "" --train_data_path "${others[@]}" --train_split test ${EPOCH:+--epoch $EPOCH}
  done
fi

if [[ $PROTOCOL == fewshot || $PROTOCOL == all ]]; then
  for target in $TARGETS; do   # (d) k normal + k abnormal images of the target's valid split, x11 augmented
    for k in $K_SHOTS; do
      for seed in $SEEDS; do
        plan "$SAVE_ROOT/fewshot/$target/${k}shot_seed$seed" "" --train_data_path "$DATA_ROOT/$target" \
          --k_shot "$k" --fewshot_seed "$seed" ${FEWSHOT_EPOCH:+--epoch $FEWSHOT_EPOCH}
      done
    done
  done
fi

if [[ $PROTOCOL == paper ]]; then   # Tables 1-2: every variant trained on the first target (Brain) alone
  source=${TARGETS%% *}
  for variant in $VARIANTS; do   # a row that is the in-domain training of $source reuses that run
    plan "$SAVE_ROOT/paper${RECIPE:+_recipe_$RECIPE}/$variant" "$SAVE_ROOT/indomain/$source" \
      --train_data_path "$DATA_ROOT/$source" --train_split valid ${EPOCH:+--epoch $EPOCH} --variant "$variant" \
      ${RECIPE:+--recipe $RECIPE}
  done
fi

# A folder that holds a run (train.py's args.json, best.pth or epoch_<n>.pth) is refused before anything runs.
taken=()
for save in "${SAVES[@]}"; do
  if [[ -e $save/args.json || -e $save/best.pth ]] || compgen -G "$save/epoch_*.pth" > /dev/null; then
    taken+=("$save")
  fi
done
if (( ${#taken[@]} )) && [[ -z $OVERWRITE ]]; then
  held="${taken[0]} already holds a training run"
  listed=$(printf '%s, ' "${taken[@]:0:3}"); listed=${listed%, }
  (( ${#taken[@]} <= 3 )) || listed+=" and $(( ${#taken[@]} - 3 )) more"
  (( ${#taken[@]} == 1 )) || held="$listed already hold training runs"
  echo "error: $held: bash test.sh $PROTOCOL alone re-tests those checkpoints;" \
       "OVERWRITE=1 bash train.sh $PROTOCOL trains again, replacing them" >&2
  exit 2
fi

for i in "${!ARGS[@]}"; do
  if [[ -n ${REUSE[i]} && -e ${REUSE[i]}/args.json ]]; then
    status=0
    eval "python reuse_run.py $(printf '%q' "${REUSE[i]}") ${ARGS[i]}" || status=$?
    (( status == 0 )) && continue
    (( status == 1 )) || exit "$status"   # 1: not the same training; anything else is an error
  fi
  eval "job $LAUNCH train.py ${ARGS[i]}"
done

run_queued
