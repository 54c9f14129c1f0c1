#!/usr/bin/env bash
# Score one image, DICOM file, NIfTI volume or folder, and draw its heatmap. Example:
#   IMAGE_PATH=scan.nii.gz CHECKPOINT_PATH=checkpoint/indomain/Brain/best.pth bash test_one_example.sh
# Without IMAGE_PATH, one abnormal demo slice is scored.
set -euo pipefail
cd "$(dirname "$0")"

CHECKPOINT_PATH=${CHECKPOINT_PATH:-checkpoint/indomain/Brain/best.pth}
SAVE_PATH=${SAVE_PATH:-results/one_example}
DEVICE=${DEVICE:-auto}
EXTRA=${EXTRA:-}                     # e.g. --window_preset liver, --slices 60 99, --threshold 0.5

if [ -z "${IMAGE_PATH:-}" ]; then
  root=$(python -c "from generate_dataset.demo import ensure_demo; print(ensure_demo())")
  IMAGE_PATH=$(ls "$root"/test/Ungood/img/*.png | head -n 1)
fi
checkpoint=()
[ -f "$CHECKPOINT_PATH" ] && checkpoint=(--checkpoint_path "$CHECKPOINT_PATH")
[ ${#checkpoint[@]} -eq 0 ] && echo "no checkpoint at $CHECKPOINT_PATH: scoring with the zero-training baseline"
python test_one_example.py --image_path "$IMAGE_PATH" "${checkpoint[@]}" --save_path "$SAVE_PATH" \
  --device "$DEVICE" $EXTRA
