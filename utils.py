"""Small shared helpers: user-facing errors, flag validators, output folders, atomic writes, seeding,
device choice, logging."""
from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import platform
import random
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import cv2
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
    """Run a script's ``main``; report an ``InputError`` (or a full disk met outside the atomic
    writes) as one line and exit non-zero."""
    rank = os.environ.get("RANK") if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1") else None
    try:
        main()
    except InputError as error:
        print(f"error: {f'[rank {rank}] ' if rank else ''}{one_line(str(error))}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        if error.errno not in DISK_FULL:
            raise
        where = f" writing {error.filename}" if error.filename else ""
        print(f"error: {f'[rank {rank}] ' if rank else ''}no space left on the device{where} ({error.strerror}); "
              f"free some space and run again", file=sys.stderr)
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


SEED_LIMIT = 2 ** 32  # numpy's seeds are 32-bit


def seed_value(text: str) -> int:
    """A seed: an integer in [0, 2**32)."""
    return _bounded(int, text, lambda value: 0 <= value < SEED_LIMIT, "in [0, 2**32)")


MAX_SIGMA = 10_000.0  # pixels: far beyond any map (the blur is flat there), and its kernel stays small


def sigma_value(text: str) -> float:
    """A Gaussian sigma in pixels: in [0, MAX_SIGMA]."""
    return _bounded(float, text, lambda value: 0 <= value <= MAX_SIGMA,
                    f"in [0, {MAX_SIGMA:g}] (wider than any map, where the blur is flat)")


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
                       files: tuple[str, ...] = (), folders: tuple[str, ...] = ()) -> Path:
    """Create the output folder ``path`` (checked before any work starts) and return it.

    Refused with an ``InputError`` naming ``flag``: a path that is a file or lies under one, a
    folder that cannot be written, any of ``files`` (names the run will write there) taken by a
    folder and any of ``folders`` (sub-folders it will write into) taken by a file.
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
    refuse_taken(folder, files, folders, flag)
    return folder


def refuse_taken(folder: str | os.PathLike, files: tuple[str, ...] | list[str] = (),
                 folders: tuple[str, ...] | list[str] = (), flag: str = "--save_path") -> None:
    """An ``InputError`` naming ``flag`` when a name of ``files`` under ``folder`` is a folder
    (or anything but a file), or a name of ``folders`` is not a folder."""
    folder = Path(folder)
    for name in files:
        if (folder / name).exists() and not (folder / name).is_file():
            raise InputError(f"{flag} {folder}: {name} is taken by a folder; move it away or choose another {flag}")
    for name in folders:
        if (folder / name).exists() and not (folder / name).is_dir():
            raise InputError(f"{flag} {folder}: {name} is taken by a file; move it away or choose another {flag}")


def safe_name(text: str, flag: str) -> str:
    """``text`` (a name the user gave, which outputs are named after) if it is one plain file name:
    no folder separator, not ``.`` or ``..``, no NUL; else an ``InputError`` naming ``flag``. Output
    names built from it then stay inside the output folder."""
    if not text or text in (".", "..") or "/" in text or "\\" in text or "\0" in text:
        raise InputError(f"{flag} {text!r}: must be a plain name (no '/', not '.' or '..'): "
                         f"output files are named after it")
    return text


def unique_stems(paths: list[str]) -> list[str]:
    """A distinct output name for each input path: its stem (``.nii.gz`` one suffix); where
    stems clash (``x.png`` and ``x.jpg``), its file name; where file names clash too (one name in
    two folders), the file name with ``-2``, ``-3``, ... in input order."""
    names = [os.path.basename(os.fspath(path).rstrip(os.sep)) for path in paths]
    stems = [name[:-7] if name.lower().endswith(".nii.gz") else os.path.splitext(name)[0] for name in names]
    chosen = [stem if stems.count(stem) == 1 else name for stem, name in zip(stems, names)]
    seen: dict[str, int] = {}
    for index, name in enumerate(chosen):
        if chosen.count(name) > 1:
            seen[name] = seen.get(name, 0) + 1
            chosen[index] = name if seen[name] == 1 else f"{name}-{seen[name]}"
    return chosen


@contextlib.contextmanager
def locked_folder(folder: str | os.PathLike, flag: str = "--save_path") -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``folder/.lock``) while a run writes there.

    A second run into the same folder is refused with an ``InputError`` at once. The OS releases
    the lock when the process ends, so a killed run leaves no stale lock. Inside the lock, temp
    files of interrupted atomic writes (``.<name>.<random>.tmp``) are removed: no live run owns them.
    """
    try:
        handle = open(Path(folder) / ".lock", "a")
    except OSError as error:
        raise InputError(f"{flag} {folder}: cannot open its lock file .lock ({error.strerror}); "
                         f"move away what is in the way") from None
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


TEMP_FILE = re.compile(r"\..+\.[A-Za-z0-9_]+\.tmp")  # what ``atomic_write`` names its temp files


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files that interrupted atomic writes left in ``folder``; returns them.

    Only safe while no other process writes into ``folder`` (see ``locked_folder``).
    """
    stale = [path for path in Path(folder).iterdir() if path.is_file() and TEMP_FILE.fullmatch(path.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


# ----------------------------------------------------------------------------- atomic writes

# Errors of a write that more space would cure (a full disk, a quota, a file size limit).
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
STAGING, COMMIT_NOTE = ".staging", "commit.json"  # see ``staging_folder``


class DiskFullError(InputError):
    """A write that failed for lack of space; nothing half-written was kept."""


def write_error(path: str | os.PathLike, error: OSError) -> InputError:
    """The one-line error for a failed write of ``path``: a full disk names the output folder (the
    one above ``staging_folder``'s for a staged file)."""
    path = Path(path)
    if error.errno in DISK_FULL:
        folder = path.parent.parent if path.parent.name == STAGING else path.parent
        return DiskFullError(f"no space left to write {path.name} in {folder} ({error.strerror}); free some "
                             f"space and run again (no half-written file was kept)")
    if error.errno == errno.EISDIR or path.is_dir():
        return InputError(f"cannot write {path}: a folder of that name is in the way; move it away")
    return InputError(f"cannot write {path} ({error.strerror or error})")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (file systems that cannot sync a folder are let be)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError as error:
        if error.errno in DISK_FULL:
            raise
    finally:
        os.close(handle)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` whole or not at all: ``write(handle)`` fills a temp file beside it
    (``.<name>.<random>.tmp``), which is flushed, fsynced and renamed over ``path``.

    Any failure removes the temp file; an ``OSError`` (a full disk, a folder in the way, no
    permission) becomes an ``InputError`` naming the path (``DiskFullError`` for lack of space).
    ``write`` must write through ``handle`` (whose errors raise), never to a path of its own.
    The file gets the permissions of a plainly created one (0666 less the umask, 0644 usually),
    not mkstemp's 0600, so that a shared results folder stays readable by the group.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise write_error(path, error) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(error, OSError):
            raise write_error(path, error) from None
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` (an encoded PNG, ...) to ``path`` so that readers never see a half-written file."""
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` so that readers never see a half-written file."""
    atomic_write_bytes(path, text.encode("utf-8"))


def json_ready(obj: Any) -> Any:
    """``obj`` with every NaN or infinite number (an undefined metric) replaced by None, and numpy
    numbers and arrays as plain ones, so that it encodes as strict JSON (RFC 8259 has no NaN)."""
    if isinstance(obj, dict):
        return {key: json_ready(value) for key, value in obj.items()}
    if isinstance(obj, (np.ndarray, np.generic)):
        obj = obj.tolist()
    if isinstance(obj, (list, tuple)):
        return [json_ready(value) for value in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def strict_json(obj: Any, indent: int | None = 2) -> str:
    """``obj`` as strict JSON text: undefined numbers (NaN, infinities) as null (``json_ready``),
    objects JSON has no type for as their ``str``. Every .json and .jsonl the scripts write is this."""
    return json.dumps(json_ready(obj), indent=indent, default=str, allow_nan=False)


def undefined_as_nan(value: Any) -> Any:
    """A number read back from strict JSON, or each number of a list: null (an undefined metric) as NaN."""
    if isinstance(value, list):
        return [undefined_as_nan(item) for item in value]
    return math.nan if value is None else value


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented strict JSON (``strict_json``)."""
    atomic_write_text(path, strict_json(obj) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """Atomically ``torch.save`` ``obj`` to ``path``: serialised in memory first, since torch's own
    file writer can leave a short file on a full disk without saying so."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_write_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """Encode ``image`` (uint8 RGB [H,W,3], or a single-channel uint8/uint16 [H,W]) in the format
    of ``path``'s suffix (.png, .jpg, .tif, ...) and write it atomically; an image the format
    cannot hold is an ``InputError`` (``cv2.imwrite`` would only return False)."""
    path = Path(path)
    pixels = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    try:
        encoded, data = cv2.imencode(path.suffix or ".png", pixels)
    except cv2.error:
        encoded = False
    if not encoded:
        raise InputError(f"cannot write {path}: no {path.suffix or 'image'} encoding of a {image.dtype} "
                         f"{'x'.join(map(str, image.shape))} image")
    atomic_write_bytes(path, data.tobytes())


def _whole_length(fd: int, size: int) -> int:
    """How many bytes of the file ``fd`` (``size`` long) end with its last newline."""
    position = size
    while position > 0:
        start = max(0, position - (1 << 16))
        os.lseek(fd, start, os.SEEK_SET)
        newline = os.read(fd, position - start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        position = start
    return 0


def append_line(path: str | os.PathLike, line: str, at: int | None = None) -> None:
    """Append ``line`` (one record, without its newline) to the text file ``path``, whole or not at all.

    A partial last line (left by a run killed while appending) is cut off first. ``at``, for a
    commit that ``recover_staged`` replays, is the length of the file's whole lines when the line
    was due: when the file already reaches past it by the line, it was appended and is not again.
    On any failure the file is cut back to its whole lines, and removed when this call created it.
    """
    path = Path(path)
    data = (line + "\n").encode("utf-8")
    try:
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    except OSError as error:
        raise write_error(path, error) from None
    whole = 0
    try:
        whole = _whole_length(fd, os.fstat(fd).st_size)
        if at is not None and whole >= at + len(data):
            return
        os.ftruncate(fd, whole)
        os.lseek(fd, whole, os.SEEK_SET)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, whole)
        if created and whole == 0:
            with contextlib.suppress(OSError):
                path.unlink()
        if isinstance(error, OSError):
            raise write_error(path, error) from None
        raise
    finally:
        os.close(fd)


def whole_lines_length(path: str | os.PathLike) -> int:
    """The length of the text file ``path`` up to its last newline (0 when it does not exist)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        return _whole_length(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def staging_folder(folder: str | os.PathLike) -> Path:
    """A fresh hidden folder, ``folder/.staging``, to write one unit of output files into (each
    whole and synced: ``atomic_write*`` or ``sync_file``) before ``commit_staged`` moves them in."""
    staging = Path(folder) / STAGING
    try:
        if staging.is_dir():
            shutil.rmtree(staging)
        staging.mkdir()
    except OSError as error:
        raise write_error(staging, error) from None
    return staging


def discard_staged(folder: str | os.PathLike) -> None:
    """Drop what was staged in ``folder/.staging`` (a unit that failed before ``commit_staged``)."""
    shutil.rmtree(Path(folder) / STAGING, ignore_errors=True)


def sync_file(path: str | os.PathLike) -> None:
    """fsync a file that a library wrote by its path (its data on disk before it is committed)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as error:
        raise write_error(path, error) from None


def commit_staged(folder: str | os.PathLike, record_file: str, record: str) -> None:
    """Move the files of ``folder/.staging`` into ``folder`` and append ``record`` (a line naming
    them) to ``folder/record_file``, as one unit. The commit note written first lets
    ``recover_staged`` finish the move after a kill, so a record never names a missing file and no
    file is left without its record."""
    staging = Path(folder) / STAGING
    names = sorted(path.name for path in staging.iterdir() if path.name != COMMIT_NOTE)
    atomic_write_json(staging / COMMIT_NOTE, {"files": names, "record": record,
                                              "at": whole_lines_length(Path(folder) / record_file)})
    _finish_commit(Path(folder), record_file)


def recover_staged(folder: str | os.PathLike, record_file: str) -> bool:
    """Finish the commit that a killed run left in ``folder/.staging`` (its note was written, so its
    files are whole), or drop files staged without one; call it under the folder's lock. Returns
    whether a commit was finished."""
    staging = Path(folder) / STAGING
    if not staging.is_dir():
        return False
    try:
        note = json.loads((staging / COMMIT_NOTE).read_text(encoding="utf-8"))
        finish = (isinstance(note.get("files"), list) and isinstance(note.get("record"), str)
                  and isinstance(note.get("at"), int))
    except (OSError, ValueError, AttributeError):
        finish = False
    if finish:
        _finish_commit(Path(folder), record_file)
    else:
        discard_staged(folder)
    return finish


def _finish_commit(folder: Path, record_file: str) -> None:
    staging = folder / STAGING
    note = json.loads((staging / COMMIT_NOTE).read_text(encoding="utf-8"))
    for name in note["files"]:
        if (staging / name).exists():  # a replayed commit may have moved it already
            try:
                os.replace(staging / name, folder / name)
            except OSError as error:
                raise write_error(folder / name, error) from None
    _fsync_folder(folder)
    append_line(folder / record_file, note["record"], at=note["at"])
    discard_staged(folder)


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


def available_memory() -> int:
    """Bytes of memory available now (free physical pages)."""
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


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
        try:
            Path(save_path).mkdir(parents=True, exist_ok=True)
            file_handler = LogFileHandler(Path(save_path) / name, mode="a", encoding="utf-8")
        except OSError as error:
            raise write_error(Path(save_path) / name, error) from None
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)
    return logger


class LogFileHandler(logging.FileHandler):
    """A log file that, when it cannot be written (a full disk), says so in one line on stderr and
    stops writing, instead of printing a traceback for every record."""

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        print(f"warning: cannot write the log {self.baseFilename} "
              f"({getattr(error, 'strerror', None) or error}); logging to the screen only", file=sys.stderr)
        logging.getLogger("medvmad").removeHandler(self)
        with contextlib.suppress(Exception):
            self.close()


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
