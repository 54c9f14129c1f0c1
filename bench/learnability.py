"""Do the prompts, adapters and losses learn, without pretrained weights? (demo set, tiny model, CPU)

    python -m bench.learnability [--epoch 15 --image_size 224] [any further train.py flags, e.g. --wording medical]

Trains the tiny random-weight backbone on the demo set's valid split (train.py, selection on a
held-out part), then scores the test split with the FINAL weights (``--evaluate best``: best.pth,
the epoch train.py kept). Prints the
test pixel AUROC before and after training, over all pixels and over pixels inside the brain only
(background is easy: raw intensity alone separates it), beside a no-learning baseline that uses the
raw image intensity as the anomaly map. Last line: ``pixel_auroc_after X brain_pixel_auroc_after Y``
(targets: >= 0.95 and >= 0.90).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from evaluation import metrics
import train
from CLIP.checkpoint import load_model
from CLIP.MedVMAD import MedVMAD
from dataset import MedicalDataset, list_samples
from generate_dataset.demo import ensure_demo
from evaluation.predict import Predictions, predict


def pixel_aurocs(predictions: Predictions, brain: np.ndarray) -> tuple[float, float]:
    """Pixel AUROC over all pixels and over brain pixels only."""
    masks, maps = predictions.masks, predictions.maps
    return metrics.pixel_auroc(masks, maps), metrics.pixel_auroc(masks[brain], maps[brain])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epoch", type=int, default=15)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=111)
    parser.add_argument("--save_path", help="keep the run here (default: a temporary folder)")
    parser.add_argument("--evaluate", choices=["final", "best"], default="final",
                        help="score the final epoch's weights or best.pth (what --keep chose)")
    args, train_flags = parser.parse_known_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))

    root = ensure_demo()
    save_path = args.save_path or tempfile.mkdtemp(prefix="medvmad_learnability_")
    flags = ["--train_data_path", root, "--model_name", "tiny", "--pretrained", "none",
             "--image_size", str(args.image_size), "--epoch", str(args.epoch), "--batch_size", str(args.batch_size),
             "--learning_rate", str(args.learning_rate), "--seed", str(args.seed), "--num_workers", "2",
             "--device", "cpu", "--save_path", save_path, *train_flags]

    test_set = MedicalDataset(list_samples(root, "test"), args.image_size)
    loader = DataLoader(test_set, batch_size=16, num_workers=2)
    intensity = np.stack([test_set[i]["image"].mean(0).numpy() for i in range(len(test_set))])
    brain = intensity > 1e-3                     # demo images are exactly 0 outside the brain
    device = torch.device("cpu")

    train_args = train.parse_args(flags)
    torch.manual_seed(train_args.seed)
    untrained = MedVMAD(train.model_config(train_args, "brain"))
    before = pixel_aurocs(predict(untrained, loader, device, desc="before"), brain)

    started = time.time()
    train.main(flags)
    seconds = time.time() - started
    final, _ = load_model(Path(save_path) / ("best.pth" if args.evaluate == "best" else f"epoch_{args.epoch}.pth"),
                          device)
    after_predictions = predict(final, loader, device, desc="after")
    after = pixel_aurocs(after_predictions, brain)
    raw = pixel_aurocs(Predictions(after_predictions.paths, after_predictions.labels, after_predictions.scores,
                                   intensity.astype(np.float16), after_predictions.masks, True), brain)
    image_after = metrics.image_auroc(after_predictions.labels, after_predictions.scores)

    print(f"training: {args.epoch} epochs in {seconds:.0f} s (CPU, tiny random-weight backbone, "
          f"image_size {args.image_size}{', ' + ' '.join(train_flags) if train_flags else ''}); run in {save_path}")
    print(f"{'':28s} {'all pixels':>10s} {'brain only':>10s}")
    print(f"{'raw intensity (no learning)':28s} {raw[0]:10.3f} {raw[1]:10.3f}")
    print(f"{'MedVMAD before training':28s} {before[0]:10.3f} {before[1]:10.3f}")
    print(f"{'MedVMAD after (' + ('best.pth' if args.evaluate == 'best' else 'final epoch') + ')':28s} "
          f"{after[0]:10.3f} {after[1]:10.3f}")
    print(f"image_auroc_after {image_after:.3f}")
    print(f"pixel_auroc_after {after[0]:.3f} brain_pixel_auroc_after {after[1]:.3f}")


if __name__ == "__main__":
    main()
