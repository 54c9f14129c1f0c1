"""Few-shot memory bank on the demo set with the tiny model: zero-shot vs bank only vs combined.

    python -m bench.fewshot [--epoch 8 --seed 1]

The zero-shot model is trained on the *other* demo domain (coronal slices, BrainCoronal) and tested
on the axial Brain test split; the bank is then built from k normal support images of Brain's valid
split (x11 augmented) with --seed. Prints pixel and image AUROC of: zero-shot (text map), memory
bank only (fewshot weight 1), and combined (weight 0.5) for k = 2 and 8.
Last line: ``combined_pixel_auroc_k8 X``.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from evaluation import metrics
import train
from CLIP.checkpoint import load_model
from dataset import MedicalDataset, list_samples, sample_support
from generate_dataset.demo import ensure_demo
from evaluation.fewshot import memory_bank_from_support
from evaluation.predict import predict

IMAGE_SIZE = 224


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epoch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1, help="support-set seed")
    parser.add_argument("--save_path", help="keep the zero-shot run here (default: a temporary folder)")
    args = parser.parse_args()

    target, source = ensure_demo(view="axial"), ensure_demo(view="coronal")
    save_path = args.save_path or tempfile.mkdtemp(prefix="medvmad_fewshot_")
    train.main(["--train_data_path", source, "--model_name", "tiny", "--pretrained", "none",
                "--image_size", str(IMAGE_SIZE), "--epoch", str(args.epoch), "--learning_rate", "1e-3",
                "--num_workers", "2", "--device", "cpu", "--save_path", save_path])
    device = torch.device("cpu")
    model, _ = load_model(Path(save_path) / f"epoch_{args.epoch}.pth", device)
    loader = DataLoader(MedicalDataset(list_samples(target, "test"), IMAGE_SIZE), batch_size=16, num_workers=2)

    def aurocs(tag: str) -> tuple[float, float]:
        predictions = predict(model, loader, device, desc=tag)
        return (metrics.pixel_auroc(predictions.masks, predictions.maps),
                metrics.image_auroc(predictions.labels, predictions.scores))

    rows = [("zero-shot (trained on BrainCoronal)", "-", *aurocs("zero-shot"))]
    valid = list_samples(target, "valid")
    for k in (2, 8):
        memory_bank_from_support(model, sample_support(valid, k, args.seed), args.seed, device)
        for label, weight in (("memory bank only", 1.0), ("combined (weight 0.5)", 0.5)):
            model.set_fewshot_weight(weight)
            rows.append((label, str(k), *aurocs(f"k={k} w={weight}")))
    print(f"{'':38s} {'k':>3s} {'pixel AUROC':>11s} {'image AUROC':>11s}")
    for label, k, pixel, image in rows:
        print(f"{label:38s} {k:>3s} {pixel:11.3f} {image:11.3f}")
    print(f"combined_pixel_auroc_k8 {rows[-1][2]:.3f}")


if __name__ == "__main__":
    main()
