"""Loading models and checkpoints, hardened (issue #25, items 1, 6, 7 and 9): no code runs from a
weights file, a checkpoint never reads a weights file it names on its own, tampered checkpoint
configs are refused field by field before anything is built, and errors of a ``local-dir:`` model
name the folder the user gave. Every crafted file is built here, with ``torch.jit.script``/``save``."""
from __future__ import annotations

from unittest import mock

import contextlib
import json
import re
import os
import pickle
import signal
import warnings
import zipfile
from pathlib import Path
from typing import Iterator, Tuple

import cv2
import numpy as np
import open_clip
import pytest
import torch

import test_one_example
import train
from CLIP.MedVMAD import MedVMAD
from CLIP.backbone import BackboneConfig
from CLIP.checkpoint import load_model, save_checkpoint
from CLIP.factory import build_backbone, reads_weights_file
from CLIP.torchscript_weights import ArchiveError, read_torchscript_state_dict
from generate_dataset.demo import build_demo
from tests.helpers import ROOT, TINY, TINY_SIZE, tiny_config
from utils import InputError

DROPPED = ("input_resolution", "context_length", "vocab_size", "attn_mask")  # not weights of open_clip's CLIP

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # TorchScript is deprecated; OpenAI shipped it


# ----------------------------------------------------------------------------- crafted TorchScript

class WritesOnLoad(torch.nn.Module):
    """A scripted module whose ``__setstate__`` creates the file ``marker`` (``torch.from_file``
    with shared=True creates it): ``torch.jit.load`` runs it."""

    def __init__(self, marker: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
        return (self.weight, self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
        self.marker = state[1]
        self.training = state[2]
        self.weight = state[0] + torch.from_file(self.marker, True, 3)


class Payload:
    """A scripted class (not a module) whose ``__setstate__`` creates the file ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker
        self.count = 0

    def __getstate__(self) -> Tuple[str, int]:
        return (self.marker, self.count)

    def __setstate__(self, state: Tuple[str, int]) -> None:
        self.marker = state[0]
        self.count = torch.from_file(self.marker, True, 3).numel()


class HoldsPayload(torch.nn.Module):
    def __init__(self, marker: str):
        super().__init__()
        self.payload = Payload(marker)
        self.weight = torch.nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class LoopsOnLoad(torch.nn.Module):
    """A scripted module whose ``__setstate__`` never returns."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, bool]:
        return (self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:
        self.training = state[1]
        weight = state[0]
        while bool(weight.sum() > -1.0):
            weight = weight + 1.0
        self.weight = weight


def save_scripted(module: torch.nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(module), str(path))
    return path


def writes_on_load(folder: Path, name: str = "writes.pt") -> tuple[Path, Path]:
    """(a scripted archive whose loading creates a marker file, the marker), checked to really
    create it under ``torch.jit.load`` (on a copy naming another marker)."""
    probe = folder / f"{name}.probe_marker"
    save_scripted(WritesOnLoad(str(probe)), folder / f"{name}.probe")
    torch.jit.load(str(folder / f"{name}.probe"))
    assert probe.exists(), "the crafted archive must run code under torch.jit.load"
    marker = folder / f"{name}.marker"
    return save_scripted(WritesOnLoad(str(marker)), folder / name), marker


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Fail instead of hanging: a SIGALRM after ``seconds``."""
    def stop(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def scripted_tiny(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """OpenAI's format on the tiny CLIP: a scripted open_clip model (weights moved off the seeded
    init), and its state dict as ``torch.jit.load`` gives it (the reference)."""
    source = open_clip.create_model("tiny", pretrained=None, force_image_size=224)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    path = save_scripted(source, tmp_path_factory.mktemp("scripted") / "ViT-tiny.pt")
    return path, torch.jit.load(str(path)).state_dict()


def forbid_jit_load(monkeypatch) -> None:
    """From here on torch.jit.load (which torch.load of an archive calls too) fails: loading must
    not need it. References are computed before."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load was called")

    monkeypatch.setattr(torch.jit, "load", refuse)


def local_dir(folder: Path, weights: Path | None = None, model_cfg: dict | None = None) -> str:
    """A ``local-dir:`` model folder of the tiny config (or ``model_cfg``), with ``weights`` copied
    in as its weights file."""
    folder.mkdir(parents=True, exist_ok=True)
    config = model_cfg or json.loads((ROOT / "CLIP" / "model_configs" / "tiny.json").read_text())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    if weights is not None:
        (folder / "open_clip_pytorch_model.bin").write_bytes(weights.read_bytes())
    return f"local-dir:{folder}"


# ----------------------------------------------------------------------------- 1. real archives

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # OpenAI's archives hold float16
def test_torchscript_reader_gives_what_jit_load_gives(tmp_path, monkeypatch, dtype):
    source = open_clip.create_model("tiny", pretrained=None, force_image_size=224).to(dtype)
    path = save_scripted(source, tmp_path / "ViT-tiny.pt")
    reference = torch.jit.load(str(path)).state_dict()
    forbid_jit_load(monkeypatch)
    state = read_torchscript_state_dict(str(path))
    assert list(state) == list(reference)
    for key, value in reference.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key


def test_openai_style_archive_loads_without_running_it(scripted_tiny, monkeypatch):
    path, reference = scripted_tiny
    forbid_jit_load(monkeypatch)
    loaded = build_backbone(BackboneConfig("tiny", str(path), 224))
    assert loaded.config.quick_gelu is True  # auto-detected for TorchScript archives
    state = loaded.clip.state_dict()
    for key, value in reference.items():
        if key.split(".")[-1] not in DROPPED:
            assert torch.equal(state[key], value), key


def test_local_dir_whose_weights_file_is_torchscript_loads_through_the_same_reader(tmp_path, scripted_tiny,
                                                                                    monkeypatch):
    path, reference = scripted_tiny
    forbid_jit_load(monkeypatch)
    name = local_dir(tmp_path / "tiny-openai-format", path)
    loaded = build_backbone(BackboneConfig(name, "none", 224))
    assert loaded.config.quick_gelu is True
    assert torch.equal(loaded.clip.visual.proj, reference["visual.proj"])
    assert torch.equal(loaded.clip.token_embedding.weight, reference["token_embedding.weight"])


# ----------------------------------------------------------------------------- 1. crafted archives

def holds_payload(folder: Path) -> tuple[Path, Path]:
    """A module holding a scripted class whose __setstate__ creates the marker (checked under jit.load)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(Payload)
    probe = folder / "payload.probe_marker"
    torch.jit.load(str(save_scripted(HoldsPayload(str(probe)), folder / "payload.probe")))
    assert probe.exists(), "the crafted archive must run code under torch.jit.load"
    marker = folder / "payload.marker"
    return save_scripted(HoldsPayload(str(marker)), folder / "payload.pt"), marker


NO_NAMES = ": refusing this TorchScript archive: it holds no weights by name"


@pytest.mark.parametrize("craft, names, refusal", [
    (writes_on_load, set(), NO_NAMES),          # the weight sits in its own __getstate__ tuple
    (holds_payload, {"weight"}, " does not fit (tiny|local-dir:.*): Missing key"),
], ids=["module", "class"])
def test_archive_whose_setstate_writes_a_file_never_runs(tmp_path, craft, names, refusal):
    archive, marker = craft(tmp_path)
    assert set(read_torchscript_state_dict(str(archive))) == names and not marker.exists()
    with pytest.raises(InputError, match=rf"^--pretrained {archive}{refusal}"):
        build_backbone(BackboneConfig("tiny", str(archive), TINY_SIZE))
    with pytest.raises(InputError,
                       match=rf"^--model_name local-dir:{tmp_path / 'folder'} \(weights file .*\){refusal}"):
        build_backbone(BackboneConfig(local_dir(tmp_path / "folder", archive), "none", TINY_SIZE))
    assert not marker.exists()


def test_archive_whose_setstate_never_returns_is_read_at_once(tmp_path):
    archive = save_scripted(LoopsOnLoad(), tmp_path / "loops.pt")
    with time_limit(30):
        assert read_torchscript_state_dict(str(archive)) == {}
        with pytest.raises(InputError, match=rf"^--pretrained {archive}{NO_NAMES}"):
            build_backbone(BackboneConfig("tiny", str(archive), TINY_SIZE))


class _Opens:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def zip_entries_replaced(archive: Path, out: Path, replace: dict[str, bytes]) -> Path:
    """A copy of the zip ``archive`` with some entries' bytes replaced (stored, as torch writes)."""
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            target.writestr(info.filename, replace.get(info.filename, source.read(info)))
    return out


# pickle opcodes of a scripted module M whose attribute "a" is M itself: m = M(); m.__setstate__({"a": m})
SELF_HOLDING_MODULE = (b"\x80\x02" b"c__torch__\nM\n" b"q\x00" b")" b"\x81" b"q\x01" b"}" b"X\x01\x00\x00\x00a"
                       b"h\x01" b"s" b"b" b".")


@pytest.mark.parametrize("change, fragment", [
    ("global", "refers to io.open"),                  # data.pkl names a function to call
    ("storage_short", "is missing, compressed or not"),  # a storage shorter than its tensor claims
    ("garbage_pickle", "damaged"),                     # data.pkl is not a pickle
    ("cycle", "nest or repeat without end"),           # a module that holds itself
])
def test_crafted_archive_contents_are_refused_in_one_line(tmp_path, scripted_tiny, change, fragment):
    path, _ = scripted_tiny
    marker = tmp_path / "code_ran"
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    root = names[0].split("/")[0]
    replace = {"global": {f"{root}/data.pkl": pickle.dumps(_Opens(marker), protocol=2)},
               "storage_short": {f"{root}/data/0": b"\0" * 8},
               "garbage_pickle": {f"{root}/data.pkl": b"not a pickle"},
               "cycle": {f"{root}/data.pkl": SELF_HOLDING_MODULE}}[change]
    crafted = zip_entries_replaced(path, tmp_path / "crafted.pt", replace)
    with pytest.raises(ArchiveError, match=fragment):
        read_torchscript_state_dict(str(crafted))
    with pytest.raises(InputError, match=rf"^--pretrained {crafted}: refusing this TorchScript archive: .*{fragment}"):
        build_backbone(BackboneConfig("tiny", str(crafted), TINY_SIZE))
    assert not marker.exists()


# ----------------------------------------------------------------------------- 1. stored weights paths

@pytest.mark.parametrize("model_name, pretrained, is_file", [
    ("tiny", "none", False), ("tiny", "NONE", False),
    ("ViT-B-32", "openai", False), ("ViT-L-14", "laion2b_s32b_b82k", False),   # open_clip tags
    ("tiny", "/weights/ViT-tiny.pt", True), ("tiny", "weights.bin", True),
    ("tiny", "openai", True),          # not a tag of tiny: open_clip would read a file of that name
    ("local-dir:/models/x", "/weights/ViT-tiny.pt", False),  # ignored: the folder holds the weights
])
def test_what_counts_as_a_weights_file(model_name, pretrained, is_file):
    assert reads_weights_file(BackboneConfig(model_name, pretrained, TINY_SIZE)) is is_file


def checkpoint_naming(path: Path, weights: str) -> Path:
    """A tiny checkpoint whose config.backbone.pretrained is ``weights``."""
    torch.manual_seed(0)
    model = MedVMAD(tiny_config())
    model.config.backbone.pretrained = weights
    save_checkpoint(path, model, epoch=1, threshold=0.5)
    return path


def scan(tmp_path: Path) -> Path:
    image = tmp_path / "scan.png"
    cv2.imwrite(str(image), np.full((TINY_SIZE, TINY_SIZE), 100, np.uint8))
    return image


def test_a_checkpoint_never_loads_the_weights_file_it_names(tmp_path):
    archive, marker = writes_on_load(tmp_path)
    checkpoint = checkpoint_naming(tmp_path / "clean_looking.pth", str(archive))
    refusal = (rf"^--checkpoint_path {checkpoint}: its backbone weights are the file {archive}, "
               rf".*pass --pretrained {archive}$")
    with pytest.raises(InputError, match=refusal):
        load_model(checkpoint, torch.device("cpu"))
    with pytest.raises(InputError, match=refusal):  # through cli.build_model, as test.py and app.py go
        test_one_example.main(["--image_path", str(scan(tmp_path)), "--checkpoint_path", str(checkpoint),
                               "--save_path", str(tmp_path / "out"), "--device", "cpu"])
    # visualize_compare checks every checkpoint before it scores the first (a clean one here)
    import visualize_compare
    from generate_dataset.demo import build_demo
    data = build_demo(str(tmp_path / "data"), n_train=1, n_valid=(1, 1), n_test=(1, 1), image_size=TINY_SIZE)
    clean = checkpoint_naming(tmp_path / "clean.pth", "none")
    with pytest.raises(InputError, match=rf"^--checkpoint_path {checkpoint}: its backbone weights"), \
            mock.patch.object(visualize_compare, "build_model", side_effect=AssertionError("scored before the check")):
        visualize_compare.main(["--checkpoint_path", str(clean), str(checkpoint), "--data_path", data,
                                "--save_path", str(tmp_path / "figure.png"), "--device", "cpu"])
    assert not marker.exists()


@pytest.mark.parametrize("stored", ["local-dir:/any/folder", "hf-hub:someone/any-repo"])
def test_a_checkpoint_never_reads_or_downloads_the_model_it_names(tmp_path, stored, monkeypatch):
    """A local-dir: folder or hf-hub: repo a checkpoint names is read only when --model_name names it
    (a stored name is data too): refused at once, before open_clip is asked for anything."""
    checkpoint = tmp_path / "named.pth"
    payload = torch.load(checkpoint_naming(checkpoint, "none"), weights_only=True)
    payload["config"]["backbone"]["model_name"] = stored
    torch.save(payload, checkpoint)
    monkeypatch.setattr("open_clip.create_model", mock.Mock(side_effect=AssertionError("open_clip was asked")))
    with pytest.raises(InputError, match=rf"^--checkpoint_path {checkpoint}: its backbone is {re.escape(stored)}, "
                                         rf"which is not read .*pass --model_name {re.escape(stored)}$"):
        load_model(checkpoint, torch.device("cpu"))
    with pytest.raises(InputError, match=rf"{checkpoint} was trained on {re.escape(stored)}, not --model_name tiny"):
        load_model(checkpoint, torch.device("cpu"), model_name="tiny")


def test_a_stored_weights_file_loads_when_named_on_the_command_line(tmp_path, scripted_tiny, monkeypatch):
    path, reference = scripted_tiny
    forbid_jit_load(monkeypatch)
    torch.manual_seed(0)
    model = MedVMAD(tiny_config(backbone=BackboneConfig("tiny", str(path), TINY_SIZE)))
    save_checkpoint(tmp_path / "best.pth", model, epoch=1, threshold=0.5)
    flags = ["--image_path", str(scan(tmp_path)), "--checkpoint_path", str(tmp_path / "best.pth"),
             "--save_path", str(tmp_path / "out"), "--device", "cpu"]
    with pytest.raises(InputError, match=rf"pass --pretrained {path}$"):
        test_one_example.main(flags)
    [record] = test_one_example.main([*flags, "--pretrained", str(path)])
    rebuilt, _ = load_model(tmp_path / "best.pth", torch.device("cpu"), pretrained=str(path))
    model.eval()
    with torch.no_grad():
        image = torch.from_numpy(cv2.imread(str(scan(tmp_path)))[..., ::-1].copy()).permute(2, 0, 1)[None] / 255
        assert record["score"] == pytest.approx(float(model(image.float()).image_score), abs=1e-5)
    assert torch.equal(rebuilt.backbone.clip.visual.proj, reference["visual.proj"])


def test_a_stored_tag_reaches_open_clip_as_stored(tmp_path, monkeypatch):
    """A checkpoint naming an open_clip tag builds with it (the build itself is stubbed: no download)."""
    path = tampered(tmp_path / "tagged.pth", backbone_set(model_name="ViT-B-32", pretrained="openai", image_size=224))
    built = []

    def stub(config):
        built.append(config.backbone)
        raise ValueError("stubbed build")

    monkeypatch.setattr("CLIP.checkpoint.MedVMAD", stub)
    with pytest.raises(InputError, match="stubbed build"):
        load_model(path, torch.device("cpu"))
    assert [(b.model_name, b.pretrained) for b in built] == [("ViT-B-32", "openai")]


def test_tags_and_none_in_a_checkpoint_keep_loading(tmp_path):
    checkpoint = checkpoint_naming(tmp_path / "none.pth", "none")
    [record] = test_one_example.main(["--image_path", str(scan(tmp_path)), "--checkpoint_path", str(checkpoint),
                                      "--save_path", str(tmp_path / "out"), "--device", "cpu"])
    assert 0 <= record["score"] <= 1


def test_resume_never_loads_a_weights_file_its_checkpoint_names(tmp_path):
    data = build_demo(str(tmp_path / "data"), n_train=2, n_valid=(2, 2), n_test=(1, 1), image_size=TINY_SIZE)
    run = ["--train_data_path", data, "--save_path", str(tmp_path / "run"), *TINY]
    train.main([*run, "--epoch", "1"])
    archive, marker = writes_on_load(tmp_path)
    state = torch.load(tmp_path / "run" / "epoch_1.pth", weights_only=True)
    state["config"]["backbone"]["pretrained"] = str(archive)
    torch.save(state, tmp_path / "run" / "epoch_1.pth")
    with pytest.raises(InputError,
                       match=rf"config differs from this run's in backbone.pretrained \({archive} vs none\)"):
        train.main([*run, "--epoch", "2", "--resume"])
    assert not marker.exists()


# ----------------------------------------------------------------------------- 6, 7. tampered configs

def tampered(path: Path, change) -> Path:
    torch.manual_seed(0)
    save_checkpoint(path, MedVMAD(tiny_config()), epoch=1, threshold=0.5)
    payload = torch.load(path, weights_only=True)
    change(payload["config"])
    torch.save(payload, path)
    return path


def backbone_set(**values):
    return lambda config: config["backbone"].update(values)


@pytest.mark.parametrize("change, fragment", [
    (backbone_set(image_size="64"), r"config.backbone.image_size '64': an integer >= 1"),
    (backbone_set(image_size=True), r"config.backbone.image_size True: an integer >= 1"),
    (backbone_set(image_size=10 ** 7), r"config.backbone.image_size 10000000: tiny at image size 10000000 "
                                       r"needs at least [\d,]+ GiB .* more than this machine's"),
    (backbone_set(model_name=5), r"config.backbone.model_name 5: an open_clip model name"),
    (backbone_set(pretrained=None), r"config.backbone.pretrained None"),
    (backbone_set(image_mean=5), r"config.backbone.image_mean 5: null or 3 finite numbers"),
    (backbone_set(image_std=[0.5, float("nan"), 0.5]), r"config.backbone.image_std \(0.5, nan, 0.5\)"),
    (backbone_set(quick_gelu="yes"), r"config.backbone.quick_gelu 'yes'"),
    (lambda c: c.update(n_ctx=-3), r"config.n_ctx -3: an integer >= 1"),
    (lambda c: c.update(n_ctx="4"), r"config.n_ctx '4': an integer >= 1"),
    (lambda c: c.update(depth=-1), r"config.depth -1: an integer >= 0"),
    (lambda c: c.update(t_n_ctx=2.0), r"config.t_n_ctx 2.0: an integer >= 1"),
    (lambda c: c.update(alpha="0.1"), r"config.alpha '0.1': a number in \[0, 1\]"),
    (lambda c: c.update(sigma=float("inf")), r"config.sigma inf: a number in \[0, 10000\]"),
    (lambda c: c.update(sigma=1e12), r"config.sigma 1000000000000.0: a number in \[0, 10000\]"),
    (lambda c: c.update(logit_scale=1e308), r"config.logit_scale 1e\+308: null, 'learned' or a number in \(0, 1000\]"),
    (lambda c: c.update(organ="x" * 10000), r"config.organ 'xxx.*: an organ name of at most 64 characters"),
    (lambda c: c.update(fewshot_weight=10 ** 400), r"config.fewshot_weight 1000"),
    (lambda c: c.update(features_list=[1.5, 2, 3, 4]),
     r"config.features_list \[1.5, 2, 3, 4\]: null or a list of integer"),
    (lambda c: c.update(features_list="1234"), r"config.features_list '1234'"),
    (lambda c: c.update(variant=["medvmad"]), r"config.variant \['medvmad'\]: one of"),
    (lambda c: c.update(logit_scale="big"), r"config.logit_scale 'big'"),
    (lambda c: c.update(blur_boundary=3), r"config.blur_boundary 3: reflect or mirror"),
])
def test_tampered_checkpoint_config_is_refused_before_anything_is_built(tmp_path, monkeypatch, change, fragment):
    path = tampered(tmp_path / "tampered.pth", change)

    def never(*args, **kwargs):
        raise AssertionError("a backbone was built from a tampered config")

    monkeypatch.setattr("CLIP.MedVMAD.build_backbone", never)
    with pytest.raises(InputError, match=rf"^--checkpoint_path {path}: bad model config: {fragment}"):
        load_model(path, torch.device("cpu"))


def test_a_context_longer_than_the_text_is_refused_not_tokenised(tmp_path):
    path = tampered(tmp_path / "long.pth", lambda c: c.update(n_ctx=10 ** 9))
    with time_limit(60), pytest.raises(InputError, match=rf"^--checkpoint_path {path}: --n_ctx 1000000000: the "
                                                          rf"prompts must fit the text context of 77 tokens"):
        load_model(path, torch.device("cpu"))


def test_a_local_dir_config_that_asks_for_terabytes_is_refused(tmp_path):
    config = json.loads((ROOT / "CLIP" / "model_configs" / "tiny.json").read_text())
    config["vision_cfg"]["width"] = 10 ** 7
    name = local_dir(tmp_path / "wide", model_cfg=config)
    with pytest.raises(InputError,
                       match=rf"^--image_size {TINY_SIZE}: {name} at image size {TINY_SIZE} needs at least"):
        build_backbone(BackboneConfig(name, "none", TINY_SIZE))
    path = tampered(tmp_path / "wide.pth", backbone_set(model_name=name))
    with pytest.raises(InputError, match=rf"^--checkpoint_path {path}: bad model config: config.backbone.image_size"):
        load_model(path, torch.device("cpu"))


def test_a_huge_image_size_flag_is_refused_before_allocating(tmp_path):
    with pytest.raises(InputError, match=r"^--image_size 10000000: tiny at image size 10000000 needs at least"):
        test_one_example.main(["--image_path", str(scan(tmp_path)), "--save_path", str(tmp_path / "out"),
                               "--model_name", "tiny", "--pretrained", "none", "--image_size", "10000000",
                               "--device", "cpu"])


@pytest.mark.parametrize("layers, expected", [([-1], [4]), ([2, -1], [2, 4]), ([1, 2, 3, 4], [1, 2, 3, 4])])
def test_negative_layers_still_count_from_the_last(layers, expected):
    assert MedVMAD(tiny_config(features_list=layers)).features_list == expected


@pytest.mark.parametrize("layers", [[1.5, 2, 3, 4], [2.0], [True, 2]])
def test_non_integer_layers_are_refused(layers):
    with pytest.raises(ValueError, match="features_list .*: null or a list of integer layers"):
        MedVMAD(tiny_config(features_list=layers))


# ----------------------------------------------------------------------------- 9. local-dir errors

def random_bytes(folder: Path) -> None:
    (folder / "open_clip_pytorch_model.bin").write_bytes(os.urandom(2048))


def other_tensors(folder: Path) -> None:
    torch.save({"visual.proj": torch.zeros(3, 3)}, folder / "open_clip_pytorch_model.bin")


def pickled_code(folder: Path) -> None:
    torch.save({"visual.proj": _Opens(folder / "code_ran")}, folder / "open_clip_pytorch_model.bin")


def bad_json(folder: Path) -> None:
    (folder / "open_clip_config.json").write_text("{not json")
    other_tensors(folder)


def string_width(folder: Path) -> None:
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"]["vision_cfg"]["width"] = "wide"
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    other_tensors(folder)


@pytest.mark.parametrize("damage, fragment", [
    (random_bytes, r" \(weights file .*open_clip_pytorch_model.bin\): not a readable weights file"),
    (other_tensors, r" \(weights file .*open_clip_pytorch_model.bin\) does not fit local-dir:"),
    (pickled_code, r" \(weights file .*\): holds more than tensors; refusing to unpickle it"),
    (bad_json, r": open_clip builds no model from the folder \(ValueError: Could not load valid config"),
    (string_width, r": open_clip builds no model from the folder \(TypeError"),
])
def test_local_dir_problems_name_the_folder_not_a_flag_never_given(tmp_path, damage, fragment):
    name = local_dir(tmp_path / "model")
    damage(tmp_path / "model")
    with pytest.raises(InputError, match=rf"^--model_name {name}{fragment}") as caught:
        test_one_example.main(["--image_path", str(scan(tmp_path)), "--save_path", str(tmp_path / "out"),
                               "--model_name", name, "--image_size", str(TINY_SIZE), "--device", "cpu"])
    assert "--pretrained" not in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "model" / "code_ran").exists()
