#!/usr/bin/env bash
# GPU figures for bench/RESULTS.md: ViT-L-14-336 with random weights, batch 8, at 240 and 336 px,
# fp32 and bf16, then 518 px bf16 with and without --grad_checkpointing -> training steps/s, test
# images/s, peak GPU memory, overhead_ratio and train_step_ratio.  Run on a CUDA machine:
#   bash bench/gpu.sh | tee bench/gpu_output.txt
# Each step runs under `timeout STEP_TIMEOUT` (default 150 s), smallest first, so one stuck step
# costs a bounded part of a lease and the figures before it are kept.
set -uo pipefail
cd "$(dirname "$0")/.."
STEP_TIMEOUT=${STEP_TIMEOUT:-150}
step() {
  echo "## $*"
  timeout "$STEP_TIMEOUT" python -m bench.train_step --model_name ViT-L-14-336 --batch_size 8 --device cuda "$@" \
    || echo "step failed or timed out (exit $?): $*"
  echo
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 60 python -c "import torch, open_clip; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'open_clip', open_clip.__version__, 'gpu', torch.cuda.is_available())" || exit 1
for size in 240 336; do
  for precision in fp32 bf16; do
    step --image_size "$size" --precision "$precision" --repeats 20
  done
done
step --image_size 518 --precision bf16 --repeats 10
step --image_size 518 --precision bf16 --repeats 10 --grad_checkpointing
