"""MedVMAD eval forward (text cached) vs the same backbone's bare tapped-free image pass.

    python bench/model_overhead.py [--model_name ViT-B-16 --image_size 240 --batch_size 8]

Random weights, CPU by default; both are timed in the same run, interleaved, median of repeats.
Last line: ``overhead_ratio R`` (target <= 1.15).
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


def timed(function, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", default="ViT-B-16")
    parser.add_argument("--image_size", type=int, default=240)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    config = MedVMADConfig(BackboneConfig(args.model_name, "none", args.image_size))
    model = MedVMAD(config).to(device).eval()
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device)
    backbone = model.backbone

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def bare() -> None:
        backbone.encode_image(backbone.normalize(images), [])
        sync()

    def medvmad() -> None:
        model(images)
        sync()

    with torch.inference_mode():
        model.text_features()  # cached once, as at test time
        bare(), medvmad()      # warm-up
        bare_times, model_times = [], []
        for _ in range(args.repeats):  # interleave so drift hits both alike
            bare_times += timed(bare, 1)
            model_times += timed(medvmad, 1)
    bare_s, model_s = statistics.median(bare_times), statistics.median(model_times)
    print(f"model {args.model_name} image_size {args.image_size} batch {args.batch_size} "
          f"device {device} threads {torch.get_num_threads()}")
    print(f"encode_image  median {bare_s * 1000:.1f} ms")
    print(f"MedVMAD eval  median {model_s * 1000:.1f} ms  (features_list {model.features_list})")
    print(f"overhead_ratio {model_s / bare_s:.3f}")


if __name__ == "__main__":
    main()
