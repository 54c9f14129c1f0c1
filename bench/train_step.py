"""Time of one MedVMAD training step relative to the bare backbone forward on the same batch.

    python bench/train_step.py [--model_name ViT-B-16 --image_size 240 --batch_size 8 --device cpu]

Both are measured in the same run (random weights, median of repeats, interleaved). The training
step is forward + loss + backward + Adam step of prompts and adapters; the baseline is the same
backbone's plain image pass (no taps, no adapters) under no_grad. Also printed: training steps/s, test images/s (eval forward, text
cached) and, on CUDA, peak GPU memory of each. Last line: ``train_step_ratio R``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from CLIP.MedVMAD import MedVMAD, MedVMADConfig  # noqa: E402
from CLIP.backbone import BackboneConfig  # noqa: E402
from loss import LossWeights, medvmad_loss  # noqa: E402
from utils import autocast  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", default="ViT-B-16")
    parser.add_argument("--image_size", type=int, default=240)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "amp", "bf16"])
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = MedVMAD(MedVMADConfig(BackboneConfig(args.model_name, "none", args.image_size))).to(device)
    size = args.image_size
    images = torch.rand(args.batch_size, 3, size, size, device=device)
    masks = torch.zeros(args.batch_size, size, size, device=device)
    masks[: args.batch_size // 2, size // 4: size // 2, size // 4: size // 2] = 1
    labels = (masks.flatten(1).amax(dim=1) > 0).long()
    has_mask = torch.ones(args.batch_size, dtype=torch.bool, device=device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.5, 0.999))
    backbone = model.backbone

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def bare() -> None:
        with torch.no_grad(), autocast(device, args.precision):
            backbone.encode_image(backbone.normalize(images), [])
        sync()

    def evaluate() -> None:
        model.eval()
        with torch.inference_mode(), autocast(device, args.precision):
            model(images)
        sync()

    def step() -> None:
        model.train()
        with autocast(device, args.precision):
            output = model(images)
        loss = medvmad_loss(output, masks, labels, has_mask, LossWeights())["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync()

    functions = {"bare": bare, "eval": evaluate, "step": step}
    peak_gib: dict[str, float] = {}
    for name, function in functions.items():  # warm-up, and peak memory per phase on CUDA
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        function()
        if device.type == "cuda":
            peak_gib[name] = torch.cuda.max_memory_allocated(device) / 2**30
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(args.repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"model {args.model_name} image_size {size} batch {args.batch_size} device {name} precision {args.precision}")
    print(f"bare encode_image (no_grad)   median {median['bare'] * 1000:.1f} ms")
    print(f"MedVMAD eval forward           median {median['eval'] * 1000:.1f} ms  "
          f"test {args.batch_size / median['eval']:.1f} images/s")
    print(f"MedVMAD training step          median {median['step'] * 1000:.1f} ms  "
          f"train {1 / median['step']:.2f} steps/s")
    if peak_gib:
        print("peak GPU memory GiB: " + " ".join(f"{k} {v:.2f}" for k, v in peak_gib.items()))
    print(f"train_step_ratio {median['step'] / median['bare']:.2f}")


if __name__ == "__main__":
    main()
