"""Small shared helpers: user-facing errors, flag validators, output folders, atomic writes, seeding,
device choice, logging."""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import platform
import random
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch


class InputError(Exception):
    """Bad user input (missing folder, corrupt file, wrong checkpoint ...).

    Scripts turn it into one clear line on stderr and exit code 2.
    """


def one_line(message: str) -> str:
    """A (possibly multi-line) error message as one line, its lines joined with " | ".

    Raised inside a DataLoader worker, an ``InputError`` is re-raised with the worker's traceback
    in its message: only the original message, after the last ``InputError: ``, is kept.
    """
    message = message.rsplit("InputError: ", 1)[-1]
    return " | ".join(line.strip() for line in message.splitlines() if line.strip()) or "bad input"


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are ``InputError``s: one line, exit code 2."""

    def error(self, message: str):
        raise InputError(message)


def run_cli(main: Callable[[], Any]) -> None:
    """Run a script's ``main``; report an ``InputError`` as one line and exit non-zero."""
    rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None  # set by torchrun
    try:
        main()
    except InputError as error:
        print(f"error: {f'[rank {rank}] ' if rank else ''}{one_line(str(error))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------- flag validators
# argparse ``type=`` functions: a bad value is refused at parse time with the flag's name.

def _number(kind: type, text: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _bounded(kind: type, text: str, holds: Callable[[float], bool], rule: str) -> int | float:
    """``text`` as ``kind`` (finite), refused unless ``holds(value)``; ``rule`` says what is allowed."""
    value = _number(kind, text)
    if not holds(value):
        raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (sizes, counts, epochs)."""
    return _bounded(int, text, lambda value: value >= 1, ">= 1")


def non_negative_int(text: str) -> int:
    """An integer >= 0 (seeds, shots, workers, depths; 0 turns a feature off)."""
    return _bounded(int, text, lambda value: value >= 0, ">= 0")


def finite_float(text: str) -> float:
    """Any finite number (no NaN, no inf)."""
    return _number(float, text)


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates)."""
    return _bounded(float, text, lambda value: value > 0, "> 0")


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (loss weights, smoothing)."""
    return _bounded(float, text, lambda value: value >= 0, ">= 0")


def unit_interval(text: str) -> float:
    """A number in [0, 1] (weights of a mix, thresholds on probabilities, fractions)."""
    return _bounded(float, text, lambda value: 0 <= value <= 1, "in [0, 1]")


DEVICE_NAME = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def device_name(text: str) -> str:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (availability is checked by ``resolve_device``)."""
    if not DEVICE_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text


# ----------------------------------------------------------------------------- output folders

def prepare_output_dir(path: str | os.PathLike, flag: str = "--save_path",
                       files: tuple[str, ...] = ()) -> Path:
    """Create the output folder ``path`` (checked before any work starts) and return it.

    Refused with an ``InputError`` naming ``flag``: a path that is a file or lies under one, a
    folder that cannot be written, and any of ``files`` (names the run will write there) taken by
    a folder.
    """
    folder = Path(path)
    for parent in [folder, *folder.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is" if parent == folder else f"lies under {parent}, which is"
            raise InputError(f"{flag} {path} {where} a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"{flag} {path}: cannot create the folder ({error.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: the folder is not writable")
    for name in files:
        if (folder / name).is_dir():
            raise InputError(f"{flag} {path}: {name} is taken by a folder; move it away or choose another {flag}")
    return folder


@contextlib.contextmanager
def locked_folder(folder: str | os.PathLike, flag: str = "--save_path") -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``folder/.lock``) while a run writes there.

    A second run into the same folder is refused with an ``InputError`` at once. The OS releases
    the lock when the process ends, so a killed run leaves no stale lock. Inside the lock, temp
    files of interrupted atomic writes (``.<name>.<random>.tmp``) are removed: no live run owns them.
    """
    handle = open(Path(folder) / ".lock", "a")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{flag} {folder} is in use by another running process; wait for it to "
                             f"end or choose another {flag}") from None
        remove_stale_temp_files(folder)
        yield
    finally:
        handle.close()


TEMP_FILE = re.compile(r"\..+\.[A-Za-z0-9_]+\.tmp")  # what ``_atomic_write`` names its temp files


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files that interrupted atomic writes left in ``folder``; returns them.

    Only safe while no other process writes into ``folder`` (see ``locked_folder``).
    """
    stale = [path for path in Path(folder).iterdir() if path.is_file() and TEMP_FILE.fullmatch(path.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


# ----------------------------------------------------------------------------- atomic writes

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write through a temp file in the same folder, then ``os.replace`` it into place.

    The file gets the permissions of a plainly created one (0666 less the umask, 0644 usually),
    not mkstemp's 0600, so that a shared results folder stays readable by the group.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` (an encoded PNG, ...) to ``path`` so that readers never see a half-written file."""
    _atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """Atomically ``torch.save`` ``obj`` to ``path``."""
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


MANIFEST = "manifest.json"


def write_result_files(folder: str | os.PathLike, files: dict[str, str], stale: tuple[str, ...] = ()) -> None:
    """Write several result files of one run as one unit: ``folder/manifest.json`` comes last.

    The old manifest is removed first, then the ``stale`` names this run does not write (an older
    run's optional files), and each file is written atomically, so after a kill the folder either
    has a manifest whose files (name -> sha256) all belong to one run, or none.
    ``read_manifest`` tells which case holds.
    """
    folder = Path(folder)
    (folder / MANIFEST).unlink(missing_ok=True)
    for name in set(stale) - set(files) - {MANIFEST}:
        (folder / name).unlink(missing_ok=True)
    for name, text in files.items():
        atomic_write_text(folder / name, text)
    digests = {name: hashlib.sha256(text.encode("utf-8")).hexdigest() for name, text in files.items()}
    atomic_write_json(folder / MANIFEST, {"files": digests})


def read_manifest(folder: str | os.PathLike) -> list[str]:
    """The result files of ``folder`` that ``write_result_files`` finished writing, checked against
    their digests; an ``InputError`` when there is no manifest (an interrupted or older run) or a
    file does not match it."""
    folder = Path(folder)
    try:
        digests = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{folder}: no valid {MANIFEST}; the run that wrote it was interrupted") from None
    for name, digest in digests.items():
        path = folder / name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise InputError(f"{path} does not match {folder / MANIFEST}: files of two runs are mixed")
    return list(digests)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not DEVICE_NAME.fullmatch(name):
        raise InputError(f"--device {name}: expected auto, cpu, cuda, cuda:N or mps")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name} asked for, but CUDA is not available; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {name} asked for, but MPS is not available; use --device cpu")
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


def setup_logging(save_path: str | os.PathLike | None, name: str = "log.txt", rank: int = 0) -> logging.Logger:
    """Log to stderr and, when ``save_path`` is given, to ``save_path/name``. Processes other than
    rank 0 of a torchrun launch log warnings and errors only, marked with their rank."""
    logger = logging.getLogger("medvmad")
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter("%(asctime)s " + (f"[rank {rank}] " if rank else "") + "%(message)s", "%H:%M:%S")
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
