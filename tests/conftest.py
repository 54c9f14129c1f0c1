"""Shared fixtures: the tiny offline model everything tests with."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

from CLIP.MedVMAD import MedVMAD  # noqa: E402
from tests.helpers import medvmad_logger_kept, tiny_config  # noqa: E402


@pytest.fixture(autouse=True)
def medvmad_logger_restored():
    """Each test starts with the "medvmad" logger as a fresh process has it (no handlers, records
    propagated to caplog), whatever a module-scoped fixture's script left, and its scripts leave it
    as they found it (``medvmad_logger_kept``)."""
    with medvmad_logger_kept():
        logger = logging.getLogger("medvmad")
        logger.handlers[:], logger.propagate = [], True
        logger.setLevel(logging.NOTSET)
        yield


@pytest.fixture
def tiny_model() -> MedVMAD:
    torch.manual_seed(0)
    return MedVMAD(tiny_config())


@pytest.fixture(scope="session")
def biomedclip_name(tmp_path_factory) -> str:
    """``local-dir:`` name of a tiny BiomedCLIP-shaped model, random weights, built offline once
    per test session (bench/biomedclip_like.py)."""
    from bench.biomedclip_like import build

    # timm ViT-Tiny (12 layers, 192 wide), 2-layer 32-wide BERT, 16-d joint space
    return build(tmp_path_factory.mktemp("models") / "tiny-biomedclip", vision="vit_tiny_patch16_224",
                 text_width=32, text_layers=2, embed_dim=16, context_length=32)


def _refuse_constant(constant: str):
    raise ValueError(f"not JSON: {constant}")


@pytest.fixture
def strict_json_files() -> Callable[[Path], list[Path]]:
    """A check: every .json and .jsonl file under a folder parses with a strict parser (NaN,
    Infinity and -Infinity refused, as JSON.parse and RFC 8259 do; .jsonl a line at a time); it
    returns the files' paths relative to the folder (posix)."""
    def check(folder: Path) -> list[str]:
        found = sorted(folder.rglob("*.json")) + sorted(folder.rglob("*.jsonl"))
        for path in found:
            text = path.read_text(encoding="utf-8")
            for part in text.splitlines() if path.suffix == ".jsonl" else [text]:
                try:
                    json.loads(part, parse_constant=_refuse_constant)
                except ValueError as error:
                    raise AssertionError(f"{path}: {error}") from None
        return [path.relative_to(folder).as_posix() for path in found]
    return check
