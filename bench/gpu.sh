#!/usr/bin/env bash
# GPU figures for bench/RESULTS.md: ViT-L-14-336 with random weights, batch 8, at 240 and 336 px,
# fp32 and bf16, then 518 px bf16 with and without --grad_checkpointing -> training steps/s, test
# images/s, peak GPU memory, overhead_ratio and train_step_ratio.  Run on a CUDA machine:
#   bash bench/gpu.sh | tee bench/gpu_output.txt
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch, open_clip; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'open_clip', open_clip.__version__)"
for size in 240 336; do
  for precision in fp32 bf16; do
    python bench/train_step.py --model_name ViT-L-14-336 --image_size "$size" --batch_size 8 \
      --device cuda --precision "$precision" --repeats 20
    echo
  done
done
for checkpointing in "" "--grad_checkpointing"; do
  python bench/train_step.py --model_name ViT-L-14-336 --image_size 518 --batch_size 8 \
    --device cuda --precision bf16 --repeats 10 $checkpointing
  echo
done
