"""Time of a MedVMAD training step and of its eval forward, each relative to the bare backbone forward
on the same batch.

    python -m bench.train_step [--model_name ViT-B-16 --pretrained none --image_size 240 --batch_size 8 --device cpu]

All three are measured in the same run (median of repeats, interleaved so that drift hits them
alike); random weights by default, any backbone through --model_name/--pretrained/--image_size.
The baseline is the backbone's plain image pass (no taps, no adapters, no gradients); the eval
forward is the model in eval mode with its text features cached, as at test time; the training
step is forward + loss + backward + Adam step of prompts and adapters. Also printed: training
steps/s, test images/s and, on CUDA, peak GPU memory of each. Last lines:
``overhead_ratio R`` (eval forward / bare; target <= 1.15) and ``train_step_ratio R`` (training
step / bare). On CPU it also prints how much each phase raised the peak RSS; run it with and
without ``--grad_checkpointing`` to see the activation memory that saves.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from CLIP.MedVMAD import MedVMAD, MedVMADConfig
from CLIP.backbone import BackboneConfig
from loss import LossWeights, medvmad_loss
from utils import autocast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", default="ViT-B-16")
    parser.add_argument("--pretrained", default="none", help="open_clip tag, local weights file, or none")
    parser.add_argument("--image_size", type=int, default=240)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "amp", "bf16"])
    parser.add_argument("--grad_checkpointing", action="store_true",
                        help="recompute the backbone's blocks in the backward pass (train.py --grad_checkpointing)")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = MedVMAD(MedVMADConfig(BackboneConfig(args.model_name, args.pretrained, args.image_size))).to(device)
    size = args.image_size
    images = torch.rand(args.batch_size, 3, size, size, device=device)
    masks = torch.zeros(args.batch_size, size, size, device=device)
    masks[: args.batch_size // 2, size // 4: size // 2, size // 4: size // 2] = 1
    labels = (masks.flatten(1).amax(dim=1) > 0).long()
    has_mask = torch.ones(args.batch_size, dtype=torch.bool, device=device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.5, 0.999))
    model.set_grad_checkpointing(args.grad_checkpointing)
    backbone = model.backbone  # the baseline's bare image pass

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def bare() -> None:
        with torch.inference_mode(), autocast(device, args.precision):
            backbone.encode_image(backbone.normalize(images), [])
        sync()

    def cache_text() -> None:  # untimed: a training step changed the prompts
        model.eval()
        with torch.inference_mode():
            model.text_features()

    def evaluate() -> None:
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

    # name -> (untimed set-up, timed function)
    phases = {"bare": (None, bare), "eval": (cache_text, evaluate), "step": (None, step)}
    peak_gib: dict[str, float] = {}
    rss_growth_mib: dict[str, float] = {}  # on CPU: how far each phase raised the process's peak RSS
    for name, (setup, function) in phases.items():  # warm-up, and peak memory per phase
        if setup:
            setup()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        function()
        rss_growth_mib[name] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        if device.type == "cuda":
            peak_gib[name] = torch.cuda.max_memory_allocated(device) / 2**30
    times: dict[str, list[float]] = {name: [] for name in phases}
    for _ in range(args.repeats):
        for name, (setup, function) in phases.items():
            if setup:
                setup()
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"model {args.model_name} ({args.pretrained}) image_size {size} batch {args.batch_size} device {name} "
          f"threads {torch.get_num_threads()} precision {args.precision} "
          f"grad_checkpointing {args.grad_checkpointing}")
    print(f"bare encode_image (no grad)   median {median['bare'] * 1000:.1f} ms")
    print(f"MedVMAD eval forward           median {median['eval'] * 1000:.1f} ms  "
          f"test {args.batch_size / median['eval']:.1f} images/s  (text cached, features_list {model.features_list})")
    print(f"MedVMAD training step          median {median['step'] * 1000:.1f} ms  "
          f"train {1 / median['step']:.2f} steps/s")
    if peak_gib:
        print("peak GPU memory GiB: " + " ".join(f"{k} {v:.2f}" for k, v in peak_gib.items()))
    else:  # phases run bare, eval, step: the step's growth is the memory its backward pass needs beyond the rest
        print("peak RSS growth MiB (first run of each phase): "
              + " ".join(f"{k} {v:.0f}" for k, v in rss_growth_mib.items()))
    print(f"overhead_ratio {median['eval'] / median['bare']:.3f}")
    print(f"train_step_ratio {median['step'] / median['bare']:.2f}")


if __name__ == "__main__":
    main()
