"""Small shared helpers: user-facing errors, atomic writes, seeding, device choice, logging."""
from __future__ import annotations

import json
import logging
import os
import platform
import random
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


class InputError(Exception):
    """Bad user input (missing folder, corrupt file, wrong checkpoint ...).

    Scripts turn it into one clear line on stderr and exit code 2.
    """


def run_cli(main: Callable[[], Any]) -> None:
    """Run a script's ``main``; report an ``InputError`` as one line and exit non-zero."""
    try:
        main()
    except InputError as error:
        # Raised inside a DataLoader worker, the message carries the worker's traceback: keep the
        # last line, which is the original message.
        message = str(error).strip().splitlines()[-1] if str(error).strip() else "bad input"
        print(f"error: {message.split('InputError: ', 1)[-1]}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write through a temp file in the same folder, then ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that readers never see a half-written file."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
    _atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """Atomically ``torch.save`` ``obj`` to ``path``."""
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


QUICK_GELU = {"auto": None, "on": True, "off": False}


def add_backbone_override_args(parser) -> None:
    """The flags that override what a backbone's weights imply (declared once for every script)."""
    parser.add_argument("--quick_gelu", choices=sorted(QUICK_GELU), default="auto",
                        help="QuickGELU activation; auto: on for OpenAI weights (the openai tag, TorchScript "
                             "archives, *-quickgelu names, files or repos whose name says openai)")
    parser.add_argument("--image_mean", type=float, nargs=3, metavar=("R", "G", "B"),
                        help="image normalisation mean (default: the weights' own preprocess config)")
    parser.add_argument("--image_std", type=float, nargs=3, metavar=("R", "G", "B"),
                        help="image normalisation std (default: the weights' own preprocess config)")


def backbone_overrides(args) -> dict[str, Any]:
    """BackboneConfig fields from ``add_backbone_override_args`` flags (None: not overridden)."""
    return {"quick_gelu": QUICK_GELU[args.quick_gelu],
            "image_mean": tuple(args.image_mean) if args.image_mean else None,
            "image_std": tuple(args.image_std) if args.image_std else None}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name} asked for, but CUDA is not available; use --device cpu")
    return device


def versions() -> dict[str, str]:
    """Versions of the libraries that determine results, saved with checkpoints and results."""
    import open_clip

    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "open_clip": str(open_clip.__version__),
        "numpy": str(np.__version__),
    }


def setup_logging(save_path: str | os.PathLike | None, name: str = "log.txt") -> logging.Logger:
    """Log to stderr and, when ``save_path`` is given, to ``save_path/name``."""
    logger = logging.getLogger("medvmad")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler()
    stream.setFormatter(formatter)
    logger.addHandler(stream)
    if save_path is not None:
        Path(save_path).mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(Path(save_path) / name, mode="a", encoding="utf-8")
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)
    return logger


def autocast(device: torch.device, precision: str):
    """Autocast context for ``--precision fp32|amp|bf16`` (fp16 autocast on CUDA, bf16 anywhere)."""
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    if precision == "amp":
        if device.type != "cuda":
            raise InputError("--precision amp needs a CUDA device; use bf16 or fp32 on CPU")
        return torch.autocast("cuda", dtype=torch.float16)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise InputError(f"--precision {precision}: choose fp32, amp or bf16")
