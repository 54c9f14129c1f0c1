"""Offline backbones (#22 item 8): with no network a download stops at once (the Hub is asked once,
with a short timeout, then only its cache is read, never retried for a minute), naming the ways to
go on offline; cached files still build the model. No test here touches the network: the Hub's
session and open_clip's downloader are stand-ins that record how they were asked."""
from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import open_clip.pretrained
import pytest
import torch
from safetensors.torch import save_file

from CLIP.backbone import BackboneConfig
from CLIP.factory import MODEL_CONFIG_DIR, HUB_TIMEOUT, build_backbone
from utils import InputError

ENDPOINT = huggingface_hub.constants.ENDPOINT


class Hub:
    """The Hub's session and open_clip's ``hf_hub_download`` as stand-ins: ``answers`` says whether
    the endpoint answers a probe; ``cache`` holds the files a download finds in offline mode. Every
    probe (url, timeout) and download (repo, file, offline mode on?) is recorded."""

    def __init__(self, answers: bool, cache: Path | None = None):
        self.answers, self.cache = answers, cache
        self.probes: list[tuple[str, float]] = []
        self.downloads: list[tuple[str, str, bool]] = []

    def head(self, url: str, timeout: float | None = None) -> None:
        self.probes.append((url, timeout))
        if not self.answers:
            raise ConnectionError("[Errno -2] Name or service not known")

    def download(self, repo_id: str, filename: str, **kwargs) -> str:
        offline = huggingface_hub.constants.HF_HUB_OFFLINE
        self.downloads.append((repo_id, filename, offline))
        found = self.cache / filename if self.cache is not None else None
        if offline and found is not None and found.is_file():
            return str(found)
        # what huggingface_hub raises when neither the network nor the cache has the file (at once here,
        # where the real one online would retry for about 20 s a file)
        raise FileNotFoundError("cannot find the requested files in the local cache")


@pytest.fixture
def hub(monkeypatch):
    def make(answers: bool, offline_env: bool = False, cache: Path | None = None) -> Hub:
        stand_in = Hub(answers, cache)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline_env)
        monkeypatch.setattr(huggingface_hub, "get_session", lambda: stand_in)
        monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", stand_in.download)
        return stand_in
    return make


def test_an_unreachable_hub_stops_the_baseline_at_once_naming_the_offline_ways(hub):
    """The zero-training baseline's weights (a tag) with no network: one short probe, then the
    downloads go to the cache only, and the one line names --pretrained, the tiny model and the demo."""
    stand_in = hub(answers=False)
    with pytest.raises(InputError) as caught:
        build_backbone(BackboneConfig("ViT-B-32", "openai", 224))
    message = str(caught.value)
    assert stand_in.probes == [(ENDPOINT, HUB_TIMEOUT)] and HUB_TIMEOUT <= 10
    assert stand_in.downloads and all(offline for _, _, offline in stand_in.downloads)
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # offline mode only while building
    assert f"offline: {ENDPOINT} did not answer within 5 s (ConnectionError), and not in the Hugging Face cache" \
        in message
    assert "--pretrained /path/to/ViT-B-32.pt" in message
    assert "--model_name tiny --pretrained none" in message and "bash train.sh indomain" in message


def test_hf_hub_offline_skips_the_probe(hub):
    stand_in = hub(answers=True, offline_env=True)
    with pytest.raises(InputError, match=r"could not download it from the Hugging Face Hub \(offline: HF_HUB_OFFLINE "
                                         r"is set, .*local-dir:/path, or try the pipeline offline with the tiny"):
        build_backbone(BackboneConfig("hf-hub:nobody/no-model", "none", 224))
    assert stand_in.probes == [] and stand_in.downloads == [("nobody/no-model", "open_clip_config.json", True)]


def test_a_hub_that_answers_is_asked_online(hub):
    stand_in = hub(answers=True)
    with pytest.raises(InputError, match=r"could not download the 'openai' weights of ViT-B-32 \(offline\?\)"):
        build_backbone(BackboneConfig("ViT-B-32", "openai", 224))
    assert stand_in.probes == [(ENDPOINT, HUB_TIMEOUT)]
    assert stand_in.downloads and not any(offline for _, _, offline in stand_in.downloads)


def test_models_that_fetch_nothing_never_ask_the_hub(hub, tmp_path):
    stand_in = hub(answers=False)
    build_backbone(BackboneConfig("tiny", "none", 64))
    weights = tmp_path / "tiny.safetensors"
    save_file(build_backbone(BackboneConfig("tiny", "none", 64)).clip.state_dict(), str(weights))
    build_backbone(BackboneConfig("tiny", str(weights), 64))
    assert stand_in.probes == [] and stand_in.downloads == []


def test_a_cached_hub_model_builds_offline_from_the_cache(hub, tmp_path):
    """An hf-hub: model in the cache: its config, weights and tokenizer come from there with the
    Hub unreachable; the weights are the cached ones."""
    config = {"model_cfg": json.loads((MODEL_CONFIG_DIR / "tiny.json").read_text()),
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(1)
    cached = {key: torch.randn_like(value) for key, value in
              build_backbone(BackboneConfig("tiny", "none", 64)).clip.state_dict().items()}
    save_file(cached, str(tmp_path / "open_clip_model.safetensors"))
    stand_in = hub(answers=False, cache=tmp_path)
    backbone = build_backbone(BackboneConfig("hf-hub:someone/tiny", "none", 224))
    assert stand_in.probes == [(ENDPOINT, HUB_TIMEOUT)] and all(offline for _, _, offline in stand_in.downloads)
    assert torch.equal(backbone.clip.visual.proj, cached["visual.proj"])
    assert backbone.config.image_std == (0.25, 0.25, 0.25)
    assert backbone.encode_text(["a brain"]).shape == (1, 32)
