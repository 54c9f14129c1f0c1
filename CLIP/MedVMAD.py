"""MedVMAD: a frozen CLIP with learnable text prompts and residual adapters on tapped ViT layers.

No I/O and no argument parsing: ``MedVMAD(config)`` builds the model, ``forward(images)`` scores.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from CLIP.backbone import Backbone, BackboneConfig, build_backbone, default_features_list
from CLIP.memory_bank import MemoryBank
from prompt_ensemble import LearnablePrompts, ensemble_text_features


def upgrade_config(values: dict) -> dict:
    """A stored model config (dict) in today's field names: ``dataset`` became ``organ``."""
    values = dict(values)
    if "dataset" in values and "organ" not in values:
        values["organ"] = values.pop("dataset")
    return values


# Model variants of the paper's tables (train.py --variant), on one backbone, data and selection:
# the parts each switches on, and the scoring rule (see MedVMAD._score and the README).
VARIANTS: dict[str, dict[str, bool]] = {
    "medvmad": {"adapters": True, "learnable_prompts": True},
    "text_only": {"adapters": False, "learnable_prompts": True},   # learnable text embeddings only
    "mvfa": {"adapters": True, "learnable_prompts": False},        # MVFA-AD: adapters, fixed prompts
    "anomalyclip": {"adapters": False, "learnable_prompts": True},  # object-agnostic prompts + DPAM
}


@dataclass
class MedVMADConfig:
    """Everything that rebuilds the model; stored in checkpoints as a plain dict."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    variant: str = "medvmad"                 # scoring rule of a VARIANTS row (see _score)
    organ: str = "brain"                     # organ wording for prompt initialisation / ensemble
    features_list: list[int] | None = None   # 1-based tapped layers; None: 4 evenly spaced
    adapters: bool = True                    # False: zero-training baseline (projected tokens)
    learnable_prompts: bool = True           # False: fixed prompt ensemble
    alpha: float = 0.1                       # stream = (1-2a) x + a seg + a det
    n_ctx: int = 12
    depth: int = 9
    t_n_ctx: int = 4
    sigma: float = 4.0                       # Gaussian smoothing of the final map, in pixels
    fewshot_weight: float = 0.5              # weight of the memory-bank map when a bank is built

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "MedVMADConfig":
        """Inverse of ``to_dict``; configs written before the organ field was named ``organ``
        call it ``dataset``."""
        values = upgrade_config(values)
        values["backbone"] = BackboneConfig.from_dict(values["backbone"])
        return cls(**values)


def resolve_config(config: MedVMADConfig, backbone: Backbone) -> MedVMADConfig:
    """A copy of ``config`` with the backbone's resolved config and the tapped layers checked
    (None: 4 evenly spaced); what checkpoints store."""
    asked, built = config.backbone, backbone.config
    differing = [name for name in ("model_name", "pretrained", "image_size")
                 if getattr(asked, name) != getattr(built, name)]
    if differing:
        raise ValueError(f"the backbone given was built with other {', '.join(differing)} than the config names "
                         f"({', '.join(f'{getattr(built, n)} vs {getattr(asked, n)}' for n in differing)})")
    if config.variant not in VARIANTS:
        raise ValueError(f"--variant {config.variant}: one of {', '.join(VARIANTS)}")
    parts = {"adapters": config.adapters, "learnable_prompts": config.learnable_prompts}
    if config.variant != "medvmad" and parts != VARIANTS[config.variant]:  # medvmad: also the baseline
        raise ValueError(f"--variant {config.variant} is {VARIANTS[config.variant]}, not {parts}")
    if config.variant == "anomalyclip" and not backbone.value_attention:
        raise ValueError("--variant anomalyclip needs an image tower with DPAM's v-v attention "
                         "(open_clip CLIP ViTs with standard attention blocks)")
    num_layers = backbone.num_layers
    features_list = list(default_features_list(num_layers) if config.features_list is None
                         else config.features_list)
    if not features_list:
        raise ValueError("--features_list: give at least one layer")
    bad = [layer for layer in features_list if not 1 <= layer <= num_layers]
    if bad:
        raise ValueError(f"--features_list {bad}: layers are 1-based, the model has {num_layers}")
    if len(set(features_list)) != len(features_list):
        raise ValueError(f"--features_list {features_list}: layers repeat")
    return replace(config, backbone=replace(built), features_list=features_list)


@dataclass
class MedVMADOutput:
    # [B] in [0,1]. Without a memory bank: (mean image-term probability + text_map max) / 2 (mvfa:
    # the mean image-term probability; anomalyclip: the global embedding's abnormal probability);
    # with one: the bank's combination of that score and the bank map's maximum (memory_bank.py).
    image_score: torch.Tensor
    # [B,H,W] in [0,1]. Without a bank: text_map; with one: the bank's combination of text_map and bank_map.
    anomaly_map: torch.Tensor
    layer_logits: torch.Tensor     # [B,L,H,W] abnormal - normal logit per tapped layer, upsampled bilinearly
    # [B,T,2] normal/abnormal logits of the image-level terms: the global embedding and each
    # detection layer's most abnormal patch (mvfa: log-probabilities of each detection layer's mean)
    image_logits: torch.Tensor
    patch_features: list[torch.Tensor]  # per layer [B,N,E], L2-normalised segmentation features
    text_map: torch.Tensor         # [B,H,W] mean over layers of sigmoid(layer_logits), smoothed
    bank_map: torch.Tensor | None  # [B,H,W] smoothed memory-bank distance map, when a bank is built


class Adapter(nn.Module):
    """Bottleneck width -> embed_dim -> width, LeakyReLU, no bias (MVFA's design)."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(width, bottleneck, bias=False)
        self.up = nn.Linear(bottleneck, width, bias=False)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B,T,W] -> (bottleneck features [B,T,E], residual branch [B,T,W])."""
        hidden = F.leaky_relu(self.down(tokens))
        return hidden, F.leaky_relu(self.up(hidden))


def mean_patch_log_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Patch logits [B,N,2] -> (log(1 - m), log m) [B,2] with m the mean over patches of the
    abnormal softmax probability, computed in log space (logsumexp of log-softmax)."""
    log_probabilities = logits.log_softmax(dim=-1)                                         # [B,N,2]
    return torch.logsumexp(log_probabilities, dim=1) - math.log(logits.shape[1])


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of maps [B,H,W]: radius 4 sigma, mirror padding (scipy mode "mirror")."""
    if sigma <= 0:
        return maps
    radius = int(4 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, device=maps.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(maps.dtype)
    x = maps.unsqueeze(1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


class MedVMAD(nn.Module):
    """Frozen CLIP + learnable prompts + per-layer segmentation/detection adapters."""

    def __init__(self, config: MedVMADConfig, backbone: Backbone | None = None):
        """``config`` is not changed: ``self.config`` is its copy resolved against the backbone
        (see ``resolve_config``); ``backbone`` defaults to the one ``config.backbone`` names."""
        super().__init__()
        self.backbone = backbone if backbone is not None else build_backbone(config.backbone)
        config = self.config = resolve_config(config, self.backbone)
        self.features_list = list(config.features_list)
        width, embed_dim = self.backbone.width, self.backbone.embed_dim
        self.seg_adapters = nn.ModuleList([Adapter(width, embed_dim) for _ in self.features_list]) \
            if config.adapters else None
        self.det_adapters = nn.ModuleList([Adapter(width, embed_dim) for _ in self.features_list]) \
            if config.adapters else None
        self.prompts = LearnablePrompts(self.backbone, config.organ, config.n_ctx, config.depth, config.t_n_ctx,
                                        object_agnostic=config.variant == "anomalyclip") \
            if config.learnable_prompts else None
        self._text_cache: torch.Tensor | None = None
        self._ensemble_name: str | None = None
        self.memory_bank: MemoryBank | None = None
        self.to(self.backbone.device)

    # ---- parameters ----
    @property
    def trains_every_weight(self) -> bool:
        """Whether every learnable weight reaches the loss. Not in mvfa with adapters: its scores come
        from the detection layers' patches, not the global embedding, so nothing reads the stream
        after the last tapped layer and that layer's adapter up-projections get no gradient (as in
        MVFA's own code). DDP must then look for unused weights at every step."""
        return not (self.config.variant == "mvfa" and self.seg_adapters is not None)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Prompts and adapters only (the frozen backbone is rebuilt from its config)."""
        return {name: value.detach().clone() for name, value in self.named_parameters() if value.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load what ``trainable_state_dict`` saved; a mismatch raises ``ValueError`` naming the keys."""
        own = dict(self.named_parameters())
        expected = {name for name, value in own.items() if value.requires_grad}
        missing, unexpected = expected - state.keys(), state.keys() - expected
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit this model (missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]})")
        with torch.no_grad():
            for name, value in state.items():
                if own[name].shape != value.shape:
                    raise ValueError(f"checkpoint tensor {name} has shape {tuple(value.shape)}, "
                                     f"the model expects {tuple(own[name].shape)}")
                own[name].copy_(value)
        self._text_cache = None

    def train(self, mode: bool = True) -> "MedVMAD":
        super().train(mode)
        self._text_cache = None
        return self

    # ---- text ----
    def text_features(self) -> torch.Tensor:
        """[2,E] normal/abnormal text features; cached unless prompts are being trained."""
        if self.prompts is None:
            if self._text_cache is None or self._ensemble_name != self.config.organ:
                self._text_cache = ensemble_text_features(self.backbone, self.config.organ)
                self._ensemble_name = self.config.organ
            return self._text_cache
        if self.training and torch.is_grad_enabled():
            return self.prompts(self.backbone)
        if self._text_cache is None:
            with torch.no_grad():
                self._text_cache = self.prompts(self.backbone)
        return self._text_cache

    def set_organ(self, organ: str) -> None:
        """Select the organ wording of the fixed ensemble (learnable prompts are not affected)."""
        self.config.organ = organ

    # ---- image ----
    def _logits(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """features [...,E] -> normal/abnormal logits [...,2] at CLIP's temperature."""
        features = features / features.norm(dim=-1, keepdim=True)
        return self.backbone.logit_scale * features @ text.t()

    def forward(self, images: torch.Tensor) -> MedVMADOutput:
        """images [B,3,H,W] RGB in [0,1] -> scores, maps and per-layer maps.

        The images are normalised here, with the mean/std of the backbone's weights.
        """
        images = self.backbone.normalize(images)
        text = self.text_features().to(images.dtype)
        seg_features: list[torch.Tensor] = []
        det_features: list[torch.Tensor] = []
        alpha = self.config.alpha
        prefix = self.backbone.num_prefix_tokens  # class (and register) tokens before the patches

        def adapt(layer: int, tokens: torch.Tensor) -> torch.Tensor:
            index = self.features_list.index(layer)
            seg_hidden, seg_out = self.seg_adapters[index](tokens)
            det_hidden, det_out = self.det_adapters[index](tokens)
            seg_features.append(seg_hidden[:, prefix:])
            det_features.append(det_hidden[:, prefix:])
            return (1 - 2 * alpha) * tokens + alpha * seg_out + alpha * det_out

        hook = adapt if self.seg_adapters is not None else None
        # AnomalyCLIP's DPAM: the maps read a v-v attention stream from the first tapped layer on.
        vv_from = self.features_list[0] if self.config.variant == "anomalyclip" else None
        global_embedding, tapped = self.backbone.encode_image(images, self.features_list, hook, vv_from)
        if hook is None:
            seg_features = [self.backbone.project_tokens(tapped[layer][:, prefix:]) for layer in self.features_list]

        # Similarities, maps and scores in fp32 even under autocast: low precision ties the scores.
        with torch.autocast(images.device.type, enabled=False):
            return self._score(global_embedding.float(), [f.float() for f in seg_features],
                               [f.float() for f in det_features], text.float(), images.shape[-2:])

    def _score(self, global_embedding: torch.Tensor, seg_features: list[torch.Tensor],
               det_features: list[torch.Tensor], text: torch.Tensor, size: torch.Size) -> MedVMADOutput:
        """Maps and scores from the global embedding [B,E] and per-layer patch features [B,N,E]."""
        size = (int(size[0]), int(size[1]))
        gaps = torch.stack([self._logits(features, text).diff(dim=-1)[..., 0]
                            for features in seg_features], dim=1)                         # [B,L,N]
        # Logits are upsampled (as MVFA does), then turned into probabilities: 2-class softmax of
        # bilinear logits = sigmoid of the bilinear logit gap. The loss works on the same logits.
        layer_logits = self._upsample(gaps, size)                                         # [B,L,H,W]

        text_map = gaussian_blur(torch.sigmoid(layer_logits).mean(dim=1), self.config.sigma)
        if self.config.variant == "mvfa":
            # MVFA: per detection layer the mean abnormal probability of its patches, as
            # log-probabilities (normal, abnormal) so the loss stays in log space; the image score
            # is their mean over layers (MVFA sums them: the same ranking, kept in [0,1]).
            image_logits = torch.stack([mean_patch_log_probabilities(self._logits(features, text))
                                        for features in det_features], dim=1)          # [B,T,2]
            image_score = image_logits.softmax(dim=-1)[..., 1].mean(dim=1)
        elif self.config.variant == "anomalyclip":
            # AnomalyCLIP: the image score and its loss come from the global embedding alone. Its
            # map, the mean over layers of (p_abnormal + 1 - p_normal) / 2, is text_map: with two
            # classes p_normal = 1 - p_abnormal.
            image_logits = self._logits(global_embedding, text)[:, None]                 # [B,1,2]
            image_score = image_logits.softmax(dim=-1)[:, 0, 1]
        else:
            image_logits = [self._logits(global_embedding, text)]                        # [B,2]
            for features in det_features:
                # Detection branch: the logits of the most abnormal patch (a lesion may be tiny).
                logits = self._logits(features, text)                                      # [B,N,2]
                top = (logits[..., 1] - logits[..., 0]).argmax(dim=1)
                image_logits.append(logits[torch.arange(logits.shape[0], device=logits.device), top])
            image_logits = torch.stack(image_logits, dim=1)                               # [B,T,2]
            # Image score: the image-level terms' mean abnormal probability, averaged with the
            # map's maximum (the map localises small lesions that the image-level terms miss).
            image_score = 0.5 * image_logits.softmax(dim=-1)[..., 1].mean(dim=1) + 0.5 * text_map.flatten(1).amax(dim=1)

        normalised = [features / features.norm(dim=-1, keepdim=True) for features in seg_features]
        anomaly_map, bank_map = text_map, None
        if self.memory_bank is not None:
            bank_map = self._bank_map(self.memory_bank.distances(normalised), size)
            anomaly_map, image_score = self.memory_bank.combine(text_map, bank_map, image_score,
                                                                self.config.fewshot_weight)
        return MedVMADOutput(image_score, anomaly_map, layer_logits, image_logits, normalised, text_map, bank_map)

    def _upsample(self, patch_values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Per-layer patch values [B,L,N] -> bilinear maps [B,L,H,W].

        Each patch value lands on the pixels its patch covers. When the side is not a multiple of
        the patch size, the ViT never sees the last partial patch: the map is upsampled onto the
        covered pixels and its edge repeated over the rest, so it does not shift or stretch.
        """
        batch, layers, _ = patch_values.shape
        grid = patch_values.reshape(batch, layers, *self.backbone.grid_size)
        covered = [cells * patch for cells, patch in zip(self.backbone.grid_size, self.backbone.patch_size)]
        maps = F.interpolate(grid, size=covered, mode="bilinear", align_corners=False)
        if covered == list(size):
            return maps
        return F.pad(maps, (0, size[1] - covered[1], 0, size[0] - covered[0]), mode="replicate")

    def _bank_map(self, distances: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Bank distances [B,L,N] -> smoothed mean map [B,H,W]."""
        return gaussian_blur(self._upsample(distances, size).mean(dim=1), self.config.sigma)

    @torch.no_grad()
    def build_memory_bank(self, images: torch.Tensor, groups: torch.Tensor, batch_size: int = 8) -> None:
        """Build the few-shot bank from normal support images [K,3,H,W] in [0,1] (augmentations included).

        groups [K]: the original support image of each row, so that statistics are computed leaving
        each support image out together with its augmentations.
        """
        self.memory_bank = None
        self.eval()
        layer_features: list[list[torch.Tensor]] = [[] for _ in self.features_list]
        text_maps, text_scores = [], []
        for start in range(0, len(images), batch_size):  # keep only what the bank needs
            output = self(images[start:start + batch_size])
            for kept, features in zip(layer_features, output.patch_features):
                kept.append(features)
            text_maps.append(output.text_map)
            text_scores.append(output.image_score)
        features = [torch.cat(kept) for kept in layer_features]                          # L x [K,N,E]
        text_maps, text_scores = torch.cat(text_maps), torch.cat(text_scores)
        patches = features[0].shape[1]
        bank = MemoryBank([f.reshape(-1, f.shape[-1]) for f in features], groups.repeat_interleave(patches))
        size = (images.shape[-2], images.shape[-1])
        bank_maps = torch.cat([
            self._bank_map(bank.distances([f[start:start + batch_size] for f in features],
                                          exclude=groups[start:start + batch_size]), size)
            for start in range(0, len(images), batch_size)])
        bank_scores = bank_maps.flatten(1).max(dim=1).values
        bank.statistics.copy_(torch.stack([torch.stack([values.mean(), values.std()]) for values in
                                           (text_maps, bank_maps, text_scores, bank_scores)]))
        self.memory_bank = bank.to(images.device)
