"""Train MedVMAD's prompts and adapters on labelled data; keep the checkpoint chosen on validation.

    python train.py --train_data_path data/BMAD/Brain --save_path checkpoint/brain

Without --train_data_path the demo set is built (once) and used. Training images come from
--train_split of each root (default valid: BMAD's labelled split); model selection and the
decision threshold (by --operating_point) and the calibration of scores into probabilities use
--valid_data_path, or a stratified held-out part of the training images (evaluation/calibration.py).
The target's test split is never read. Each epoch writes epoch_<n>.pth; best.pth is the kept one.

    torchrun --nproc_per_node 4 train.py ...      (DDP: --batch_size is the global batch)
"""
from __future__ import annotations

import argparse
import math
import random
import re
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset
from tqdm import tqdm

from CLIP.MedVMAD import IMAGE_SCORES, PARTS, VARIANTS, MedVMAD, MedVMADConfig
from CLIP.checkpoint import checkpoint_config, read_checkpoint, save_checkpoint
from evaluation.calibration import Calibration, describe_fit, operating_point, operating_point_flag
from cli import (MODEL, add_distributed_args, add_fewshot_args, add_model_args, add_runtime_args, apply_recipe,
                 backbone_config, load_recipes)
from curves import CSV_NAME, PNG_NAME, draw, epoch_row, log_epoch, read_rows, tensorboard_writer, write_rows
from dataset import (SUPPORT_FILES, MedicalDataset, Sample, augment_support, dataset_names, describe, has_masks,
                     list_samples, organ_name, patient_of, resolve_support, save_support, split_holdout,
                     support_file_name)
from distributed import SINGLE, Distributed, GlobalBatchSampler, distributed, sharded_loader
from generate_dataset.demo import ensure_demo
from evaluation.metrics import compute_metrics
from evaluation.predict import predict
from evaluation.selection import SELECTION_KEYS, selection_summary
from loss import LossWeights, medvmad_loss
from scans.framing import training_framing
from utils import (SEED_LIMIT, ArgumentParser, DiskFullError, InputError, atomic_torch_save, atomic_write_json,
                   autocast, locked_folder, non_negative_float, non_negative_int, positive_float,
                   positive_int, prepare_output_dir, run_cli, seed_everything, setup_logging, unit_interval, versions)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--train_data_path", nargs="+", help="training dataset roots; default: the demo set")
    data.add_argument("--dataset", nargs="+", help="a name per training root (default: folder names); "
                      "the organ in it (brain, liver, ...) picks the prompts' initial wording")
    data.add_argument("--train_split", default="valid", help="split of the training roots to train on (default valid)")
    data.add_argument("--valid_data_path", nargs="+", help="roots whose --valid_split selects the checkpoint; "
                      "default: a held-out part of the training images")
    data.add_argument("--valid_split", default="valid")
    data.add_argument("--holdout_fraction", type=unit_interval, default=0.2,
                      help="share of training images held out for selection when no --valid_data_path")
    data.add_argument("--skip_bad", action="store_true",
                      help="skip unreadable images and image/mask size mismatches (listed in the log) "
                      "instead of stopping")
    data.add_argument("--operating_point", type=operating_point_flag, default="f1",
                      help="how the stored decision threshold is chosen on the selection images: f1 (F1-max, "
                           "default), youden, sensitivity=X or specificity=X (e.g. sensitivity=0.95)")
    add_fewshot_args(data)
    model = parser.add_argument_group("model")
    add_model_args(model, checkpoint=False)
    model.add_argument("--variant", default=MODEL.variant, choices=list(VARIANTS),
                       help="medvmad (the seed's model); text_only (its learnable prompts, no adapters); mvfa "
                            "(MVFA-AD: adapters, its fixed prompt ensemble, loss and scores); anomalyclip "
                            "(object-agnostic prompts, DPAM, its loss and scores); stored in the checkpoint")
    model.add_argument("--recipe", choices=list(load_recipes()),
                       help="the training recipe (recipes.json) every flag marked 'the recipe's' defaults to: "
                            "default the --variant's own; another name trains this variant with that one's "
                            "(a shared-recipe ablation)")
    model.add_argument("--wording", help="prompt wording (default the variant's: medvmad/text_only report, "
                       "anomalyclip object, mvfa mvfa); learnable prompts: report, seed_code, object or "
                       "medical (option: this project's earlier prompts); fixed ensembles: medical or mvfa")
    model.add_argument("--image_score", choices=list(IMAGE_SCORES),
                       help="image-level terms and score (default the variant's: mean_patch, anomalyclip "
                            "global); max_patch is an option (global embedding + each layer's most abnormal "
                            "patch, averaged with the map's maximum)")
    model.add_argument("--seed_code", action="store_true",
                       help="medvmad/text_only as the seed's code computes them: cosines without CLIP's logit "
                            "scale, BCE with logits on the mean probability, its 'object' / 'abnormal object' "
                            "prompts (README: why the default differs)")
    model.add_argument("--n_ctx", type=positive_int, help="learnable context tokens per prompt (default: the recipe's)")
    model.add_argument("--depth", type=non_negative_int,
                       help="text layers with learnable deep tokens (default: the recipe's)")
    model.add_argument("--t_n_ctx", type=positive_int,
                       help="learnable deep tokens per text layer (default: the recipe's)")
    model.add_argument("--alpha", type=unit_interval,
                       help="adapter weight: (1-2a) x + a seg + a det (default: the recipe's)")
    optim = parser.add_argument_group("optimisation (defaults: the recipe's)")
    optim.add_argument("--epoch", type=positive_int, help="epochs (the recipe's, or its fewshot_epoch with --k_shot)")
    optim.add_argument("--learning_rate", type=positive_float,
                       help="Adam learning rate (the recipe's, or its fewshot_learning_rate with --k_shot)")
    optim.add_argument("--adam_betas", type=unit_interval, nargs=2, metavar=("BETA1", "BETA2"))
    optim.add_argument("--keep", choices=["last", "best"],
                       help="best.pth: the last epoch (the seed's and AnomalyCLIP's code evaluate their final "
                            "epoch) or the one with the best selection score on held-out images (MVFA selects, "
                            "on its test set; here on held-out validation images). Few-shot keeps the last")
    optim.add_argument("--focal_weight", type=non_negative_float)
    optim.add_argument("--dice_weight", type=non_negative_float, help="weight of the abnormal channel's dice")
    optim.add_argument("--normal_dice_weight", type=non_negative_float,
                       help="weight of the normal channel's dice (the seed's and AnomalyCLIP's code: 1, MVFA's: 0)")
    optim.add_argument("--image_weight", type=non_negative_float)
    run = parser.add_argument_group("run")
    run.add_argument("--save_path", default="checkpoint/demo", help="folder for checkpoints, log and args.json")
    add_runtime_args(run, batch_size=None)
    add_distributed_args(run)
    used = run.add_mutually_exclusive_group()
    used.add_argument("--resume", nargs="?", const="latest", default=None,
                      help="continue a stopped run: the latest epoch_<n>.pth in --save_path, or a given file")
    used.add_argument("--overwrite", action="store_true",
                      help="start afresh in a --save_path that holds another run (its checkpoints are deleted)")
    run.add_argument("--grad_checkpointing", action="store_true",
                     help="recompute the frozen backbone's blocks in the backward pass instead of keeping their "
                          "activations: less memory (large --image_size), more compute; same gradients")
    run.add_argument("--tensorboard", action="store_true",
                     help="also log losses and selection metrics to TensorBoard (needs the tensorboard package)")
    args = parser.parse_args(argv)
    args.from_recipe = apply_recipe(args)
    if args.focal_weight + args.dice_weight + args.normal_dice_weight + args.image_weight == 0:
        raise InputError("--focal_weight, --dice_weight, --normal_dice_weight and --image_weight are all 0: "
                         "nothing to train")
    if args.seed_code and args.variant not in ("medvmad", "text_only"):
        raise InputError(f"--seed_code reproduces the seed's code: --variant medvmad or text_only, not {args.variant}")
    return args


# Flags a resumed run must share with the run it continues (the model config is compared too).
RESUME_KEYS = ("train_data_path", "dataset", "train_split", "valid_data_path", "valid_split", "holdout_fraction",
               "k_shot", "fewshot_seed", "support_file", "batch_size", "learning_rate", "adam_betas", "keep",
               "focal_weight", "dice_weight", "normal_dice_weight", "image_weight", "seed", "precision", "skip_bad",
               "operating_point")


def stored_run_args(stored: dict) -> dict:
    """A checkpoint's saved arguments as today's: runs from before recipes used Adam betas (0.5,
    0.999), kept the best epoch, added the normal channel's dice (at --dice_weight) for
    anomalyclip alone and chose the F1-max threshold; sequences compare as tuples."""
    legacy = {"adam_betas": (0.5, 0.999), "keep": "best", "operating_point": "f1",
              "normal_dice_weight": stored.get("dice_weight") if stored.get("variant") == "anomalyclip" else 0.0}
    values = {**legacy, **stored}
    return {key: tuple(value) if isinstance(value, list) else value for key, value in values.items()}


def rng_state(device: torch.device) -> dict:
    """Python, numpy, torch and (on a CUDA ``device``) that GPU's RNG states, as plain types and
    tensors (``weights_only`` loadable)."""
    version, python_state, gauss = random.getstate()
    _, keys, position, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(python_state), gauss],
            "numpy": [torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what ``rng_state`` returned (its CUDA state only onto a CUDA ``device``)."""
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":  # a CUDA run resumed on CUDA
        torch.cuda.set_rng_state(state["cuda"], device)


def config_differences(stored: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted names of the config fields that differ between two config dicts, with both values."""
    differing = []
    for key in sorted(set(stored) | set(current)):
        old, new = stored.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differing += config_differences(old, new, f"{prefix}{key}.")
        elif (list(old) if isinstance(old, tuple) else old) != (list(new) if isinstance(new, tuple) else new):
            differing.append(f"{prefix}{key} ({old} vs {new})")
    return differing


RUN_MARKERS = ("args.json", "best.pth", "epoch_*.pth")  # files that show a folder holds a run
RUN_FILES = RUN_MARKERS + ("train_log.txt", SUPPORT_FILES)  # what a run writes
EPOCH_ONLY = ("best", "optimizer", "scaler", "rng")  # what epoch_<n>.pth holds beyond best.pth
OUTPUT_FILES = ("args.json", "best.pth", "train_log.txt", CSV_NAME, PNG_NAME, ".lock")  # checked free before work


def claim_folder(save_path: Path, args: argparse.Namespace) -> list[Path]:
    """Make sure this run does not mix with another in ``save_path`` (call it under the folder's lock).

    A folder holding a run is refused unless ``--resume`` continues it or ``--overwrite`` is given;
    with ``--overwrite`` the old run's files are deleted (so a later ``--resume`` cannot pick up its
    checkpoints) and returned.
    """
    found = sorted(path for pattern in RUN_MARKERS for path in save_path.glob(pattern))
    for path in found:
        if not path.is_file():
            raise InputError(f"--save_path {save_path}: {path.name} is taken by a folder; move it away or choose "
                             f"another --save_path")
    if args.resume or not found:
        return []
    if not args.overwrite:
        raise InputError(f"--save_path {save_path} holds another run ({', '.join(p.name for p in found[:3])}"
                         f"{' ...' if len(found) > 3 else ''}); continue it with --resume, replace it with "
                         f"--overwrite, or choose another --save_path")
    old = sorted(path for pattern in RUN_FILES for path in save_path.glob(pattern))
    for path in old:
        path.unlink()
    return old


def read_resume_state(path: Path, config: MedVMADConfig, args: argparse.Namespace) -> dict:
    """The state of the run to continue, checked to be an epoch checkpoint of this very run."""
    state = read_checkpoint(path, "--resume")
    missing = [key for key in ("optimizer", "rng", "epoch", "best", "args") if key not in state]
    if missing:
        raise InputError(f"--resume {path} holds no {'/'.join(missing)} state ({path.name} keeps only the model, "
                         f"as best.pth does); resume from an epoch_<n>.pth")
    differing = config_differences(checkpoint_config(state, path, "--resume").to_dict(), config.to_dict())
    if differing:
        raise InputError(f"--resume {path}: its model config differs from this run's in "
                         + ", ".join(differing) + " (a checkpoint from before a field existed lacks it)")
    if not isinstance(state["args"], dict):
        raise InputError(f"--resume {path}: its saved arguments are damaged")
    stored = stored_run_args(state["args"])
    current = {key: tuple(value) if isinstance(value, list) else value for key, value in vars(args).items()}
    changed = [key for key in RESUME_KEYS if stored.get(key) != current.get(key)]
    if changed:
        shown = lambda key: (" ".join(map(str, stored[key])) if isinstance(stored.get(key), tuple)  # noqa: E731
                             else stored.get(key))
        raise InputError(f"--resume {path}: the run was started with other "
                         + ", ".join(f"--{key} {shown(key)}" for key in changed))
    return state


def diverged(what: str, where: str, last_good: Path | None) -> InputError:
    """The one-line error that stops a diverging run and names the checkpoint to go back to."""
    return InputError(f"{what} {where} (try a lower --learning_rate or --precision fp32); "
                      f"last good checkpoint: {last_good or 'none yet'}")


def epoch_checkpoints(save_path: Path) -> list[Path]:
    """The epoch_<n>.pth files in ``save_path``, the highest n first."""
    found = [(int(m.group(1)), p) for p in save_path.glob("epoch_*.pth")
             if (m := re.fullmatch(r"epoch_(\d+)\.pth", p.name)) and p.is_file()]
    return [path for _, path in sorted(found, reverse=True)]


def latest_epoch_checkpoint(save_path: Path, logger=None) -> Path | None:
    """The readable epoch_<n>.pth with the highest n in ``save_path``: a damaged newer one (written
    by a version that could leave half a file on a full disk) is passed over, with a warning."""
    for path in epoch_checkpoints(save_path):
        try:
            read_checkpoint(path, "--resume")
        except InputError as error:
            if logger is not None:
                logger.warning(f"--resume: passed over {path}: {error}")
            continue
        return path
    return None


def training_data(args, roots: list[str], names: list[str], logger,
                  where: Distributed = SINGLE) -> tuple[torch.utils.data.Dataset, dict[str, list[Sample]]]:
    """The training dataset and, per source, the samples used for model selection (never a test split)."""
    if args.k_shot:
        if len(roots) != 1:
            raise InputError("--k_shot adapts to one target: give exactly one --train_data_path")
        support, _ = resolve_support(roots[0], args.k_shot, args.fewshot_seed, args.support_file)
        if where.is_main:
            support_file = Path(args.save_path) / support_file_name(args.k_shot, args.fewshot_seed)
            save_support(str(support_file), support, roots[0])
            logger.info(f"few-shot support ({len(support)} images) written to {support_file}")
        base = MedicalDataset(support, args.image_size)
        items = [base[i] for i in range(len(base))]
        images, masks = augment_support(torch.stack([it["image"] for it in items]),
                                        torch.stack([it["mask"] for it in items]), seed=args.fewshot_seed)
        repeats = images.shape[0] // len(items)
        labels = torch.tensor([it["label"] for it in items]).repeat(repeats)
        has_mask = torch.tensor([it["has_mask"] for it in items]).repeat(repeats)
        # Selection data for few-shot: the un-augmented support images (no other labelled target data).
        return TensorDataset(images, masks, labels, has_mask), {names[0]: support}
    parts, selection = [], {}
    for root, name in zip(roots, names):
        samples = list_samples(root, args.train_split)
        masks_known = has_masks(samples)  # a source without masks trains with the image loss alone
        if not args.valid_data_path:
            samples, selection[name] = split_holdout(samples, args.holdout_fraction, args.seed)
        logger.info(describe(samples, f"{name}/{args.train_split} (training)")
                    + ("" if masks_known else "; no masks: image loss only"))
        parts.append(MedicalDataset(samples, args.image_size, skip_bad=args.skip_bad, masks_known=masks_known))
    if args.valid_data_path:
        for root, name in zip(args.valid_data_path, dataset_names(args.valid_data_path, None)):
            selection[name] = list_samples(root, args.valid_split)
    selection = {name: samples for name, samples in selection.items() if samples}
    if not selection:
        raise InputError("no images to select the checkpoint on: give --valid_data_path or a "
                         "--holdout_fraction above 0")
    for name, samples in selection.items():
        logger.info(describe(samples, f"{name} (model selection)"))
    return ConcatDataset(parts), selection


def model_config(args: argparse.Namespace, prompt_name: str) -> MedVMADConfig:
    """The model a run's flags describe; ``prompt_name`` picks the prompts' initial wording."""
    return MedVMADConfig(
        backbone=backbone_config(args), variant=args.variant, **{part: VARIANTS[args.variant][part] for part in PARTS},
        organ=prompt_name, wording=args.wording, image_score=args.image_score, seed_code=args.seed_code,
        features_list=args.features_list, alpha=args.alpha, n_ctx=args.n_ctx, depth=args.depth,
        t_n_ctx=args.t_n_ctx, sigma=args.sigma)


def loss_weights(args: argparse.Namespace, config: MedVMADConfig) -> LossWeights:
    """The loss weights of the flags and the forms of the model's rules: the image BCE is summed
    over the terms (mean under max_patch), and taken with logits on the mean probability as MVFA's
    code (and the seed's, with --seed_code) does."""
    return LossWeights(args.focal_weight, args.dice_weight, args.image_weight, args.normal_dice_weight,
                       image_terms_mean=config.image_score == "max_patch",
                       probability_as_logit=config.variant == "mvfa" or config.seed_code)


def batch_tensors(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, masks, labels, has_mask) from a MedicalDataset dict batch or a TensorDataset tuple."""
    if isinstance(batch, dict):
        return batch["image"], batch["mask"], batch["label"], batch["has_mask"]
    return tuple(batch)


def resume_checkpoint(args: argparse.Namespace, save_path: Path, logger=None) -> Path | None:
    """The epoch checkpoint ``--resume`` continues from (None without --resume)."""
    if not args.resume:
        return None
    resume_from = latest_epoch_checkpoint(save_path, logger) if args.resume == "latest" else Path(args.resume)
    if resume_from is None:
        raise InputError(f"--resume: no whole epoch_<n>.pth in {save_path} to continue from (the run stopped "
                         f"before its first epoch was saved); start afresh with --overwrite")
    return resume_from


def reconcile_best(save_path: Path, best: dict, logger) -> None:
    """Make best.pth hold the epoch that the records (``best``, from the resumed epoch_<n>.pth)
    call best: a run stopped after writing best.pth but before its epoch_<n>.pth leaves a best.pth
    of an epoch that the resumed run redoes; it is rebuilt from epoch_<best>.pth."""
    if best.get("epoch") is None:
        return
    best_path = save_path / "best.pth"
    try:
        held = torch.load(best_path, map_location="cpu", weights_only=True).get("epoch")
    except Exception:  # noqa: BLE001 - missing or unreadable: rebuilt below
        held = None
    if held == best["epoch"]:
        return
    source = save_path / f"epoch_{best['epoch']}.pth"
    state = read_checkpoint(source, "--resume")
    atomic_torch_save({key: value for key, value in state.items() if key not in EPOCH_ONLY}, best_path)
    logger.warning(f"--resume: best.pth held epoch {held}, the records say epoch {best['epoch']}: "
                   f"rebuilt from {source.name}")


def reconcile_history(save_path: Path, epochs_done: int, logger) -> None:
    """Make metrics.csv hold a row for every finished epoch: when it is damaged or lacks one, it is
    rebuilt from the losses and selection metrics that each epoch_<n>.pth stores."""
    try:
        rows = read_rows(save_path / CSV_NAME)
        if {int(row["epoch"]) for row in rows} >= set(range(1, epochs_done + 1)):
            return
        reason = "lacks finished epochs"
    except InputError as error:
        reason = str(error)
    rows = []
    for epoch in range(1, epochs_done + 1):
        path = save_path / f"epoch_{epoch}.pth"
        if path.is_file():
            state = read_checkpoint(path, "--resume")
            rows.append(epoch_row(epoch, state.get("train_loss", {}), state.get("selection_metrics", {})))
    write_rows(save_path / CSV_NAME, rows)
    draw(save_path / PNG_NAME, rows)
    logger.warning(f"--resume: {CSV_NAME} {reason}; rebuilt from the epoch checkpoints ({len(rows)} rows)")


def build_model_and_optimizer(config: MedVMADConfig, args: argparse.Namespace, device: torch.device,
                              logger) -> tuple[MedVMAD, torch.optim.Optimizer, torch.amp.GradScaler]:
    """The model on ``device``, Adam over its learnable weights, and the gradient scaler of --precision amp."""
    try:
        model = MedVMAD(config).to(device)
    except ValueError as error:
        raise InputError(str(error)) from None
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=args.learning_rate, betas=tuple(args.adam_betas))
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "amp")
    logger.info(f"model {args.model_name} ({args.pretrained}) image_size {args.image_size} "
                f"layers {model.features_list}; {sum(p.numel() for p in parameters):,} trainable parameters")
    logger.info(f"variant {config.variant} (wording {model.config.wording}, image score {model.config.image_score}, "
                f"logit scale {model.config.logit_scale}{', seed code' if config.seed_code else ''}), "
                f"recipe {args.recipe}: "
                + " ".join(f"--{key} {' '.join(map(str, value)) if isinstance(value, tuple) else value}"
                           for key, value in ((key, getattr(args, key)) for key in args.from_recipe)))
    return model, optimizer, scaler


def restore_run(resume_from: Path, args: argparse.Namespace, model: MedVMAD, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, where: Distributed, logger) -> tuple[int, dict]:
    """Load the stopped run's weights, optimizer, scaler and RNG states; returns (first epoch to run, best so far).
    The stopped run's model config must equal this run's, as resolved by the model. Process 0 reads and
    checks the file and hands it to the others; each process takes its own rank's RNG state."""
    state = where.on_main(read_resume_state, resume_from, model.config, args)
    states = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # a dict before DDP
    if len(states) != where.world_size:
        logger.warning(f"--resume {resume_from}: the run had {len(states)} process(es), this one has "
                       f"{where.world_size}; the data order is the same, the other random states start afresh")
    try:
        model.load_trainable_state_dict(state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):  # empty when the stopped run did not use amp
            scaler.load_state_dict(state["scaler"])
        if where.rank < len(states):
            set_rng_state(states[where.rank], next(model.parameters()).device)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise InputError(f"--resume {resume_from}: its optimizer or RNG state does not fit this run "
                         f"({type(error).__name__}: {error})") from None
    logger.info(f"resumed from {resume_from} (epoch {state['epoch']})")
    return state["epoch"] + 1, state["best"]


def train_loader(train_set: torch.utils.data.Dataset, args: argparse.Namespace, epoch: int,
                 where: Distributed) -> DataLoader:
    """This process's share of the epoch's global batches of --batch_size (``GlobalBatchSampler``:
    one permutation of (seed, epoch); the processes' k-th batches together are one process's)."""
    sampler = GlobalBatchSampler(train_set, args.batch_size, args.seed, where)
    sampler.set_epoch(epoch)
    return DataLoader(train_set, batch_size=args.batch_size // where.world_size, sampler=sampler,
                      num_workers=args.num_workers)


def train_epoch(model: MedVMAD | DistributedDataParallel, train_set: torch.utils.data.Dataset,
                optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, weights: LossWeights,
                device: torch.device, args: argparse.Namespace, epoch: int, last_good: Path | None,
                where: Distributed = SINGLE) -> dict[str, float]:
    """One pass over ``train_set``; returns the mean of each loss term over the global batches."""
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    loader = train_loader(train_set, args, epoch, where)
    sums: dict[str, float] = {}
    progress = tqdm(loader, desc=f"epoch {epoch}/{args.epoch}", unit="batch", leave=False, disable=not where.is_main)
    for step, batch in enumerate(progress, start=1):
        images, masks, labels, has_mask = (t.to(device) for t in batch_tensors(batch))
        # Under DDP the loss terms are divided by the global batch's counts per process.
        counts = [value / where.world_size for value in where.sum([len(labels), float(has_mask.sum())])] \
            if where.enabled else [None, None]
        with autocast(device, args.precision):
            output = model(images)
        parts = medvmad_loss(output, masks.float(), labels, has_mask.bool(), weights, *counts)
        if not torch.isfinite(parts["loss"]):
            raise diverged(f"loss became {parts['loss'].item()}", f"at epoch {epoch} step {step}", last_good)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(parts["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
        if not torch.stack([torch.isfinite(p).all() for p in parameters]).all():  # a NaN gradient
            raise diverged("a weight became NaN or infinite", f"at epoch {epoch} step {step}", last_good)
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach())
        progress.set_postfix({key: f"{value / step:.3f}" for key, value in sums.items()})
    totals = where.sum(list(sums.values()))  # each process's losses are its share of the global batch's
    return {key: total / where.world_size / max(len(loader), 1) for key, total in zip(sums, totals)}


def evaluate_selection(model: MedVMAD, loaders: dict[str, DataLoader], device: torch.device,
                       args: argparse.Namespace, epoch: int, last_good: Path | None, logger,
                       where: Distributed = SINGLE) -> tuple[float | None, dict[str, float], Calibration] | None:
    """Selection score (None when no source has both classes), per-source metrics, and the
    calibration fitted on the selection images of every source together (their scores kept, to
    choose the decision threshold by --operating_point; patients are told apart by source).

    Each process scores its share of the batches (``sharded_loader``); process 0 gathers every
    image once, in order, and alone computes the figures (None on the other processes).
    """
    per_source, labels, scores, patients = {}, [], [], []
    for name, loader in loaders.items():
        predictions = predict(model, loader, device, args.precision, desc=f"selection {name}", where=where)
        if predictions is None:  # not process 0
            continue
        if not np.isfinite(predictions.scores).all():  # finite weights can still overflow in the forward pass
            raise diverged(f"selection scores on {name} became NaN", f"after epoch {epoch}", last_good)
        per_source[name] = compute_metrics(predictions)
        if math.isnan(per_source[name]["image_auroc"]):
            logger.warning(f"{name}: selection images are all of one class; left out of the selection score")
        labels.append(predictions.labels)
        scores.append(predictions.scores)
        patients += [f"{name}/{patient_of(path)}" for path in predictions.paths]
    if not where.is_main:
        return None
    score, values = selection_summary(per_source)
    images = "support images" if args.k_shot else "validation images"
    return score, values, Calibration.fitted(np.concatenate(scores), np.concatenate(labels), patients, images)


def save_epoch(epoch_path: Path, model: MedVMAD, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               extra: dict, best: dict, improved: bool, rng_states: list[dict], writer=None) -> None:
    """Write an epoch's files: best.pth (when ``improved``), metrics.csv and curves.png, then
    epoch_<n>.pth (with what --resume needs: ``rng_states`` holds every process's, by rank), last:
    it commits the epoch. A run stopped before it redoes the epoch on --resume (``reconcile_best``
    puts back a best.pth written ahead). The same format from one process or several."""
    if improved:
        save_checkpoint(epoch_path.parent / "best.pth", model, **extra)
    log_epoch(epoch_path.parent, extra["epoch"], extra["train_loss"], extra["selection_metrics"], writer)
    save_checkpoint(epoch_path, model, **extra, best=best, optimizer=optimizer.state_dict(),
                    scaler=scaler.state_dict(), rng=rng_states)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with distributed(args.device, args.dist_timeout) as (where, device):
        if not where.is_main:  # process 0 alone claims the folder and writes into it
            return train(args, [], device, where)
        save_path = prepare_output_dir(args.save_path, files=OUTPUT_FILES,
                                       folders=("tensorboard",) if args.tensorboard else ())
        with locked_folder(save_path):  # a second run into this folder is refused while this one lives
            removed = claim_folder(save_path, args)
            return train(args, removed, device, where)


def train(args: argparse.Namespace, removed: list[Path], device: torch.device, where: Distributed = SINGLE) -> dict:
    """The run itself, in ``args.save_path`` (claimed and locked by ``main``); under torchrun one
    process of ``where.world_size``, each seeded with --seed + rank, training one DDP model."""
    save_path = Path(args.save_path)
    logger = setup_logging(save_path if where.is_main else None, "train_log.txt", rank=where.rank)
    if removed:
        logger.info(f"--overwrite: deleted the previous run's {', '.join(p.name for p in removed)}")
    if args.batch_size % where.world_size:
        raise InputError(f"--batch_size {args.batch_size} is the global batch: it must divide evenly over the "
                         f"{where.world_size} processes")
    roots = args.train_data_path or [where.on_main(ensure_demo)]  # built once
    names = dataset_names(roots, args.dataset)
    framing = training_framing(roots)  # how the converters framed the slices, for scoring volumes alike
    resume_from = where.on_main(resume_checkpoint, args, save_path, logger)
    seed_everything((args.seed + where.rank) % SEED_LIMIT)

    train_set, selection_samples = training_data(args, roots, names, logger, where)
    if len(train_set) < where.world_size:
        raise InputError(f"{len(train_set)} training image(s) for {where.world_size} processes: use fewer processes")
    organs = {organ_name(name) for name in names}
    config = model_config(args, organs.pop() if len(organs) == 1 else "organ")
    model, optimizer, scaler = build_model_and_optimizer(config, args, device, logger)
    model.set_grad_checkpointing(args.grad_checkpointing)
    start_epoch, best = 1, {"score": -math.inf, "epoch": None}
    if resume_from is not None:
        start_epoch, best = restore_run(resume_from, args, model, optimizer, scaler, where, logger)
        if where.is_main:  # the files of what is best and of the finished epochs agree with the records
            reconcile_best(save_path, best, logger)
            reconcile_history(save_path, start_epoch - 1, logger)
    # Gradients of the learnable weights only are averaged (the frozen backbone has none); DDP also
    # starts every process from process 0's weights.
    trained = (DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=not model.trains_every_weight)
               if where.enabled else model)
    if where.is_main:
        atomic_write_json(save_path / "args.json", {"args": vars(args), "world_size": where.world_size,
                                                    "versions": versions()})

    selection_loaders = {name: sharded_loader(MedicalDataset(samples, args.image_size, skip_bad=args.skip_bad),
                                              args.batch_size, args.num_workers, where)
                         for name, samples in selection_samples.items()}
    weights = loss_weights(args, model.config)
    last_good = resume_from
    writer = tensorboard_writer(save_path, logger) if args.tensorboard and where.is_main else None
    for epoch in range(start_epoch, args.epoch + 1):
        averages = train_epoch(trained, train_set, optimizer, scaler, weights, device, args, epoch, last_good, where)
        selection = evaluate_selection(model, selection_loaders, device, args, epoch, last_good, logger, where)
        rng_states = where.gather_to_main(rng_state(device))
        last_good = save_path / f"epoch_{epoch}.pth"
        if not where.is_main:
            continue
        score, values, calibration = selection
        score = -averages["loss"] if score is None else score
        point = operating_point(args.operating_point)
        threshold = calibration.threshold(point)
        threshold = 0.5 if threshold is None else threshold  # selection images of one class
        extra = dict(epoch=epoch, threshold=threshold, operating_point=args.operating_point,
                     calibration=calibration.to_dict(), selection_metrics=values, train_loss=averages, args=vars(args),
                     framing=None if framing is None else framing.to_dict())
        # Few-shot has no labelled target data besides the support set it trains on: keep the last epoch.
        improved = bool(args.k_shot) or args.keep == "last" or score > best["score"]
        if improved:
            best = {"score": score, "epoch": epoch}
        try:
            save_epoch(last_good, model, optimizer, scaler, extra, best, improved, rng_states, writer)
        except DiskFullError as error:
            raise DiskFullError(f"{error}; then continue with --resume") from None
        logger.info(f"epoch {epoch}: " + " ".join(f"{k} {v:.4f}" for k, v in averages.items())
                    + " | selection " + " ".join(f"{k} {values[k]:.4f}" for k in sorted(values)
                                                 if k.endswith(SELECTION_KEYS))
                    + (" | kept as best.pth" if improved else ""))
        if improved:
            logger.info(f"epoch {epoch}: threshold {threshold:.6g} at {point.describe(calibration.images)}; "
                        f"calibration {describe_fit(calibration.image, calibration.images)}")
    if where.is_main:
        logger.info(f"best epoch {best['epoch']} (selection score {best['score']:.4f}) -> {save_path / 'best.pth'}")
    return {"best": best, "save_path": str(save_path)}


if __name__ == "__main__":
    run_cli(main)
