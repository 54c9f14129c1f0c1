"""The tensors of a TorchScript archive (OpenAI's CLIP ``.pt``), read without running anything in it.

``torch.jit.load`` compiles the archive's ``code/`` and runs it: a scripted ``__setstate__`` may
write files or never return. This reader never does. A TorchScript ``.pt`` is a zip holding
``<name>/data.pkl`` (the module tree, pickled), ``<name>/data/<key>`` (raw tensor storages) and the
code, which is never opened. ``data.pkl`` is read the way ``torch.load(weights_only=True)`` reads
a checkpoint: a ``pickle.Unpickler`` that resolves only the few globals that rebuild tensors, and
stands an inert ``ScriptObject`` (which records the state pickled for it) in for every scripted
class ``__torch__.*``; anything else is refused. The module tree is then flattened into a state
dict, ``"visual.proj" -> tensor``, as ``torch.jit.load(path).state_dict()`` would give it.
"""
from __future__ import annotations

import collections
import functools
import io
import math
import os
import pickle
import sys
import zipfile
from pathlib import PurePosixPath
from typing import Any, Callable

import torch

# ``torch.<Name>Storage`` globals of a pickled tensor and the dtype of their bytes.
STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
MAX_PICKLE_BYTES = 64 * 2 ** 20  # data.pkl of ViT-L-14-336 is under 100 KB: the tensors are stored apart
MAX_MODULES = 100_000            # scripted objects visited while flattening (a tree shared with itself ends)
MAX_DEPTH = 64                   # nesting of modules ("a.b.c..."): real models stay under 10


class ArchiveError(ValueError):
    """The archive is not a TorchScript archive of tensors this reader accepts."""


class ScriptObject:
    """Stands in for an instance of a scripted class: keeps the state pickled for it and runs none
    of the archive's code (no ``__setstate__`` of its own is ever called)."""

    state: Any = None

    def __init__(self, *args: Any):
        self.state = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _pickled_list(values: list, *type_tag: Any) -> list:
    """``torch.jit._pickle.build_*list``/``restore_type_tag``: each returns its list as it is."""
    return values


class _TensorUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` of a TorchScript archive into ScriptObjects and tensors, nothing else."""

    def __init__(self, pickled: bytes, storage: Callable[[torch.dtype, str, int], torch.Tensor]):
        super().__init__(io.BytesIO(pickled))
        self.storage = storage

    def find_class(self, module: str, name: str) -> Any:
        """The few globals that rebuild tensors. Classes and functions are fresh objects for each
        reference, so that a BUILD setting their attributes changes nothing outside this archive."""
        if module == "__torch__" or module.startswith("__torch__."):
            return type("ScriptObject", (ScriptObject,), {})
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return functools.partial(_rebuild_tensor)
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict  # an immutable type
        if module == "torch.jit._pickle" and name in ("build_intlist", "build_doublelist", "build_boollist",
                                                      "build_tensorlist", "restore_type_tag"):
            return functools.partial(_pickled_list)
        raise ArchiveError(f"it refers to {module}.{name}, which is not part of a tensor")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)
                and isinstance(pid[2], str) and type(pid[4]) is int and pid[4] >= 0):
            raise ArchiveError("it holds a storage reference of an unknown form")
        return self.storage(pid[1], pid[2], pid[4])


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, requires_grad: bool,
                    backward_hooks: Any, metadata: Any = None) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2``: a view of ``storage`` (checked to lie inside it)."""
    shape_ok = (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
                and all(type(v) is int and v >= 0 for v in (offset, *size, *stride)))
    if not shape_ok or not isinstance(storage, torch.Tensor):
        raise ArchiveError("it holds a tensor of an unknown form")
    elements = math.prod(size)
    if elements and (elements > storage.numel()
                     or offset + sum((n - 1) * step for n, step in zip(size, stride)) >= storage.numel()):
        raise ArchiveError(f"a tensor of shape {list(size)} reaches past its storage of {storage.numel()} values")
    return storage.as_strided(size, stride, offset)


def _flatten(tree: ScriptObject) -> dict[str, torch.Tensor]:
    """The tensors of the module tree by dotted name: each module's own attributes, then its
    submodules' in order (attributes are pickled as a dict; the tuple of a custom ``__getstate__``
    names no weights). Each tensor is detached: plain data, whatever was pickled around it."""
    state: dict[str, torch.Tensor] = {}
    pending, visited = [("", tree)], 0
    while pending:
        prefix, node = pending.pop()
        visited += 1
        if visited > MAX_MODULES or prefix.count(".") > MAX_DEPTH:
            raise ArchiveError("its modules nest or repeat without end")
        children = []
        for name, value in (node.state.items() if isinstance(node.state, dict) else ()):
            if isinstance(value, torch.Tensor) and isinstance(name, str):
                state[prefix + name] = value.detach()
            elif isinstance(value, ScriptObject) and isinstance(name, str):
                children.append((f"{prefix}{name}.", value))
        pending.extend(reversed(children))
    return state


def is_torchscript_archive(path: str) -> bool:
    """Whether ``path`` is a TorchScript zip archive (it holds ``code/``), the format of OpenAI's
    CLIP weights; a damaged zip is not (its reader then says what it is)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name or name.startswith("code/") for name in archive.namelist())
    except Exception:  # noqa: BLE001 - zipfile raises many types for a damaged central directory
        return False


def read_torchscript_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The parameters and buffers of the TorchScript archive at ``path`` by dotted name, read
    without running its code. ``ArchiveError`` says why an archive is refused."""
    try:
        with zipfile.ZipFile(path) as archive:
            return _read(archive, os.path.getsize(path))
    except ArchiveError:
        raise
    except Exception as error:  # noqa: BLE001 - zip, pickle and torch raise many types for a damaged or crafted file
        raise ArchiveError(f"it is damaged ({type(error).__name__})") from None


def _read(archive: zipfile.ZipFile, archive_bytes: int) -> dict[str, torch.Tensor]:
    """``read_torchscript_state_dict`` of the open ``archive``, ``archive_bytes`` long."""
    members = {info.filename: info for info in archive.infolist()}
    roots = {PurePosixPath(name).parts[0] for name in members if "/" in name}
    pickled = [f"{root}/data.pkl" for root in roots if f"{root}/data.pkl" in members]
    if len(pickled) != 1:
        raise ArchiveError("it holds no single <name>/data.pkl")
    root = pickled[0].split("/")[0]
    byteorder = archive.read(f"{root}/byteorder").decode().strip() if f"{root}/byteorder" in members else "little"
    if byteorder != sys.byteorder:
        raise ArchiveError(f"its tensors are stored {byteorder}-endian, this machine is {sys.byteorder}-endian")
    storages: dict[str, torch.Tensor] = {}

    def storage(dtype: torch.dtype, key: str, numel: int) -> torch.Tensor:
        """The storage ``<root>/data/<key>``: raw bytes, stored uncompressed as torch writes them."""
        if key not in storages:
            info = members.get(f"{root}/data/{key}")
            itemsize = torch.empty(0, dtype=dtype).element_size()
            if info is None or info.compress_type != zipfile.ZIP_STORED or info.file_size != numel * itemsize \
                    or info.file_size > archive_bytes:  # stored bytes lie in the file: no size is taken on trust
                raise ArchiveError(f"its storage data/{key} is missing, compressed or not {numel} values long")
            buffer = bytearray(info.file_size)
            with archive.open(info) as source:
                if source.readinto(buffer) != info.file_size:
                    raise ArchiveError(f"its storage data/{key} is truncated")
            storages[key] = torch.frombuffer(buffer, dtype=dtype) if numel else torch.empty(0, dtype=dtype)
        if storages[key].dtype != dtype or storages[key].numel() != numel:
            raise ArchiveError(f"its storage data/{key} is used with two types or sizes")
        return storages[key]

    info = members[pickled[0]]
    if info.file_size > MAX_PICKLE_BYTES:
        raise ArchiveError(f"its data.pkl is {info.file_size} bytes, more than a module tree needs")
    tree = _TensorUnpickler(archive.read(info), storage).load()
    if not isinstance(tree, ScriptObject):
        raise ArchiveError("its data.pkl holds no scripted module")
    return _flatten(tree)
