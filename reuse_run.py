"""Reuse a finished training run where train.py would train the very same thing again: what
``bash train.sh paper`` does for a row that is the in-domain run of its dataset (MedVMAD's, with the
same recipe and flags), instead of training it twice.

    python reuse_run.py checkpoint/indomain/Brain --train_data_path data/BMAD/Brain --variant medvmad \
        --save_path checkpoint/paper/medvmad ...                     (RUN, then train.py's arguments)

RUN's args.json is compared with the arguments train.py would run with (its recipe's defaults
filled in, data paths resolved): every flag counts but --save_path, --overwrite, --resume,
--tensorboard and --dist_timeout, which do not change what is trained. When they are the same and
RUN finished (its last epoch_<n>.pth and best.pth are there), its best.pth, args.json, log,
metrics.csv, curves.png and support files are copied into --save_path (a folder holding another run
is refused unless --overwrite, as train.py does) and the exit status is 0; otherwise the status is
1 and train.sh trains. A line says which, and why.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import train
from curves import CSV_NAME, PNG_NAME
from dataset import SUPPORT_FILES
from utils import ArgumentParser, atomic_write, locked_folder, prepare_output_dir, run_cli

NOT_REUSED = 1  # exit status: train instead
# Arguments that do not change what is trained; data paths compare resolved.
NOT_TRAINING = {"save_path", "overwrite", "resume", "tensorboard", "dist_timeout", "from_recipe"}
PATHS = {"train_data_path", "valid_data_path", "support_file"}
COPIED = ("args.json", "train_log.txt", CSV_NAME, PNG_NAME, SUPPORT_FILES, "best.pth")  # best.pth last


def training_of(values: dict) -> dict:
    """The arguments of a run (stored in args.json, or parsed) that decide what it trains: sequences
    as tuples, paths resolved, legacy runs' defaults filled in (``train.stored_run_args``)."""
    values = train.stored_run_args(values)
    for key in PATHS & set(values):
        value = values[key]
        if value is not None:
            values[key] = tuple(map(os.path.realpath, value)) if isinstance(value, tuple) else os.path.realpath(value)
    return {key: value for key, value in values.items() if key not in NOT_TRAINING}


def why_not(run: Path, args: argparse.Namespace) -> str | None:
    """Why ``run`` is not the finished training ``args`` asks for (None: it is)."""
    try:
        stored = json.loads((run / "args.json").read_text(encoding="utf-8"))["args"]
        old = training_of(stored)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{run} holds no readable args.json"
    if not (run / "best.pth").is_file() or not (run / f"epoch_{old.get('epoch')}.pth").is_file():
        return f"{run} has not finished its {old.get('epoch')} epochs"
    new = training_of(vars(args))
    differing = [f"--{key} {old.get(key)} there, {new.get(key)} here" for key in sorted(set(old) | set(new))
                 if old.get(key) != new.get(key)]
    return f"another training ({'; '.join(differing)})" if differing else None


def copy_run(run: Path, save_path: Path) -> list[str]:
    """Copy the finished run's files into ``save_path`` (each written atomically, best.pth last);
    returns their names."""
    copied = []
    for pattern in COPIED:
        for source in sorted(run.glob(pattern)):
            with open(source, "rb") as handle:
                atomic_write(save_path / source.name, lambda out: shutil.copyfileobj(handle, out))
            copied.append(source.name)
    return copied


def main(argv: list[str] | None = None) -> bool:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="the finished run that may be this training (its folder)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="train.py's arguments, --save_path among them")
    given = parser.parse_args(argv)
    args = train.parse_args(given.train_args)
    save_path = Path(args.save_path)
    reason = why_not(given.run, args)
    if reason is not None:
        print(f"{save_path}: training it (not reusing {given.run}: {reason})")
        return False
    prepare_output_dir(save_path, files=train.OUTPUT_FILES)
    with locked_folder(save_path):
        train.claim_folder(save_path, args)  # another run there is refused, or deleted with --overwrite
        copied = copy_run(given.run, save_path)
    print(f"{save_path}: reusing {given.run}, the same training (data, variant, recipe and flags): copied "
          f"{', '.join(copied)}")
    return True


if __name__ == "__main__":
    run_cli(lambda: sys.exit(0 if main() else NOT_REUSED))
