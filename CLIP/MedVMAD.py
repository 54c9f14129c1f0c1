"""MedVMAD: a frozen CLIP with learnable text prompts and residual adapters on tapped ViT layers.

No I/O and no argument parsing: ``MedVMAD(config)`` builds the model, ``forward(images)`` scores.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from CLIP.backbone import Backbone, BackboneConfig, default_features_list
from CLIP.factory import build_backbone
from CLIP.memory_bank import MemoryBank
from prompt_ensemble import ENSEMBLE_WORDINGS, LEARNABLE_WORDINGS, LearnablePrompts, ensemble_text_features
from utils import MAX_SIGMA


# Model variants of the paper's tables (train.py --variant), on one backbone, data and selection:
# the parts each switches on, and the wording and image-level rule it uses unless the config names
# others (see MedVMAD._score and the README's variant table). Training recipes: recipes.json.
VARIANTS: dict[str, dict[str, object]] = {
    # the seed (deeptiguntur/MedVMAD): learnable prompts + residual seg/det adapters; CLIP's learned
    # logit scale (the seed's code has none: --seed_code)
    "medvmad": {"adapters": True, "learnable_prompts": True, "wording": "report", "image_score": "mean_patch",
                "logit_scale": "learned"},
    # the report's "just learnable text embeddings": the seed without its adapters
    "text_only": {"adapters": False, "learnable_prompts": True, "wording": "report", "image_score": "mean_patch",
                  "logit_scale": "learned"},
    # MVFA-AD: adapters, its own fixed prompt ensemble, cosines x 100 (its code's constant)
    "mvfa": {"adapters": True, "learnable_prompts": False, "wording": "mvfa", "image_score": "mean_patch",
             "logit_scale": 100.0},
    # AnomalyCLIP: object-agnostic learnable prompts + DPAM, no adapters, cosines / 0.07 (its code's temperature)
    "anomalyclip": {"adapters": False, "learnable_prompts": True, "wording": "object", "image_score": "global",
                    "logit_scale": 1 / 0.07},
}
PARTS = ("adapters", "learnable_prompts")  # what a variant must have (medvmad without both: the baseline)

# Image-level rules (MedVMADConfig.image_score); the output's image_logits are their terms.
#   mean_patch      per detection layer the mean abnormal probability of its patches (the seed, MVFA);
#                   score: their mean over layers. Without adapters: the tapped layers' projected patches
#   max_patch       the global embedding and each detection layer's most abnormal patch; score: the
#                   mean of their probabilities averaged with the map's maximum (an option; the
#                   zero-training baseline's rule)
#   global          the global embedding as AnomalyCLIP's code makes it: class token @ proj, no ln_post
#   global_ln_post  the global embedding with ln_post (checkpoints of the anomalyclip variant
#                   written before the line above was followed)
IMAGE_SCORES = ("mean_patch", "max_patch", "global", "global_ln_post")


def upgrade_config(values: dict) -> dict:
    """A stored model config (dict) in today's field names and meanings: ``dataset`` became
    ``organ``; a config written before ``wording`` and ``image_score`` existed rebuilds with the
    rules it was trained with (medical wording, or AnomalyCLIP's object-agnostic prompts; the
    image-level rules of that time)."""
    values = dict(values)
    if "dataset" in values and "organ" not in values:
        values["organ"] = values.pop("dataset")
    variant = values.get("variant", "medvmad")
    if "wording" not in values:
        values["wording"] = "object" if variant == "anomalyclip" else "medical"
    if "image_score" not in values:
        values["image_score"] = {"mvfa": "mean_patch", "anomalyclip": "global_ln_post"}.get(variant, "max_patch") \
            if isinstance(variant, str) else None
    values.setdefault("logit_scale", "learned")
    values.setdefault("blur_boundary", "mirror")  # smoothed with scipy's mode "mirror" until the codes' reflect
    if variant == "anomalyclip" and "dpam_from" not in values:  # DPAM started at the first tapped layer
        layers = values.get("features_list")
        values["dpam_from"] = layers[0] if isinstance(layers, list) and layers else None
    return values


@dataclass
class MedVMADConfig:
    """Everything that rebuilds the model; stored in checkpoints as a plain dict."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    variant: str = "medvmad"                 # a VARIANTS row
    organ: str = "brain"                     # the organ named in the prompts / ensemble
    features_list: list[int] | None = None   # 1-based tapped layers (-1: the last); None: 4 evenly spaced
    adapters: bool = True                    # False: zero-training baseline (projected tokens)
    learnable_prompts: bool = True           # False: fixed prompt ensemble
    wording: str | None = None               # prompt_ensemble's LEARNABLE/ENSEMBLE_WORDINGS; None: the variant's
    image_score: str | None = None           # IMAGE_SCORES; None: the variant's
    logit_scale: float | str | None = None   # cosine multiplier: "learned" (CLIP's own), a number; None: the variant's
    seed_code: bool = False                  # the seed code's rules: logit scale 1, its wording (train.py: loss)
    dpam_from: int | None = None             # anomalyclip: first layer (1-based) of DPAM's v-v stream; None: variant's
    alpha: float = 0.1                       # stream = (1-2a) x + a seg + a det
    n_ctx: int = 12
    depth: int = 9
    t_n_ctx: int = 4
    sigma: float = 4.0                       # Gaussian smoothing of the final map, in pixels
    blur_boundary: str = "reflect"           # its boundary, scipy's mode: reflect (the codes'); mirror (before)
    fewshot_weight: float = 0.5              # weight of the memory-bank map when a bank is built

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "MedVMADConfig":
        """Inverse of ``to_dict``; older configs are read as ``upgrade_config`` says."""
        values = upgrade_config(values)
        values["backbone"] = BackboneConfig.from_dict(values["backbone"])
        return cls(**values)


def _integer(minimum: float) -> Callable[[object], bool]:
    """An int (not a bool, not a float such as 2.0) >= minimum."""
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _number(low: float, high: float = math.inf) -> Callable[[object], bool]:
    """A finite int or float (not a bool, not a string) in [low, high]."""
    def valid(value: object) -> bool:
        try:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and low <= value <= high
        except OverflowError:  # an int beyond any float
            return False
    return valid


def _one_of(choices: object) -> Callable[[object], bool]:
    return lambda value: isinstance(value, str) and value in choices


def _text(value: object) -> bool:
    return isinstance(value, str) and value != ""


def _flag(value: object) -> bool:
    return isinstance(value, bool)


def _optional(rule: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda value: value is None or rule(value)


def _three(rule: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda value: isinstance(value, (tuple, list)) and len(value) == 3 and all(map(rule, value))


def _layers(value: object) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(map(_integer(-math.inf), value))


# What each config field may hold: the rules of its flag (cli.py, train.py), and the types the
# model code assumes. Checked before anything is built (``check_config``).
CONFIG_RULES: dict[str, tuple[Callable[[object], bool], str]] = {
    "backbone.model_name": (_text, "an open_clip model name"),
    "backbone.pretrained": (_text, "an open_clip tag, a weights file or none"),
    "backbone.image_size": (_integer(1), "an integer >= 1"),
    "backbone.quick_gelu": (_optional(_flag), "true, false or null"),
    "backbone.image_mean": (_optional(_three(_number(-math.inf))), "null or 3 finite numbers"),
    "backbone.image_std": (_optional(_three(lambda value: _number(0)(value) and value > 0)),
                           "null or 3 finite numbers > 0"),
    "variant": (_one_of(VARIANTS), f"one of {', '.join(VARIANTS)}"),
    "organ": (lambda value: _text(value) and len(value) <= 64, "an organ name of at most 64 characters"),
    "features_list": (_optional(_layers), "null or a list of integer layers (1-based; -1 the last)"),
    "adapters": (_flag, "true or false"),
    "learnable_prompts": (_flag, "true or false"),
    "wording": (_optional(_text), "null or a wording name"),
    "image_score": (_optional(_one_of(IMAGE_SCORES)), f"null or one of {', '.join(IMAGE_SCORES)}"),
    "logit_scale": (_optional(lambda value: value == "learned" or (_number(0, 1000)(value) and value > 0)),
                    "null, 'learned' or a number in (0, 1000] (CLIP's learned scale stops at 100)"),
    "seed_code": (_flag, "true or false"),
    "dpam_from": (_optional(_integer(1)), "null or a layer (an integer >= 1)"),
    "alpha": (_number(0, 1), "a number in [0, 1]"),
    "n_ctx": (_integer(1), "an integer >= 1"),
    "depth": (_integer(0), "an integer >= 0"),
    "t_n_ctx": (_integer(1), "an integer >= 1"),
    "sigma": (_number(0, MAX_SIGMA), f"a number in [0, {MAX_SIGMA:g}]"),
    "blur_boundary": (_one_of(("reflect", "mirror")), "reflect or mirror"),
    "fewshot_weight": (_number(0, 1), "a number in [0, 1]"),
}


def check_config(config: MedVMADConfig) -> None:
    """Refuse (``ValueError`` naming the field) a value that its flag would refuse or that the model
    code cannot take (a string where a number belongs, a negative count, a fractional layer)."""
    for name, (valid, rule) in CONFIG_RULES.items():
        value = config
        for part in name.split("."):
            value = getattr(value, part)
        if not valid(value):
            shown = repr(value)
            raise ValueError(f"{name} {shown if len(shown) <= 80 else shown[:80] + '...'}: {rule}")


def resolve_config(config: MedVMADConfig, backbone: Backbone) -> MedVMADConfig:
    """A copy of ``config`` with the backbone's resolved config, the variant's wording and image
    rule where the config names none, and the tapped layers checked (None: 4 evenly spaced; -1 the
    last); what checkpoints store. Every field is checked (``check_config``)."""
    asked, built = config.backbone, backbone.config
    differing = [name for name in ("model_name", "pretrained", "image_size")
                 if getattr(asked, name) != getattr(built, name)]
    if differing:
        raise ValueError(f"the backbone given was built with other {', '.join(differing)} than the config names "
                         f"({', '.join(f'{getattr(built, n)} vs {getattr(asked, n)}' for n in differing)})")
    if not isinstance(config.variant, str) or config.variant not in VARIANTS:
        raise ValueError(f"--variant {config.variant}: one of {', '.join(VARIANTS)}")
    check_config(config)
    variant = VARIANTS[config.variant]
    parts = {part: getattr(config, part) for part in PARTS}
    if config.variant != "medvmad" and parts != {part: variant[part] for part in PARTS}:  # medvmad: also the baseline
        raise ValueError(f"--variant {config.variant} is {({part: variant[part] for part in PARTS})}, not {parts}")
    # The zero-training baseline (medvmad without either part) keeps this project's medical ensemble
    # and the max_patch rule; --seed_code brings the seed code's wording.
    baseline = config.variant == "medvmad" and not config.adapters and not config.learnable_prompts
    wording = config.wording if config.wording is not None else \
        "seed_code" if config.seed_code and config.learnable_prompts else \
        "medical" if config.variant == "medvmad" and not config.learnable_prompts else variant["wording"]
    wordings = LEARNABLE_WORDINGS if config.learnable_prompts else ENSEMBLE_WORDINGS
    if wording not in wordings:
        kind = "learnable prompts take" if config.learnable_prompts else "a fixed ensemble takes"
        raise ValueError(f"--wording {wording}: {kind} one of {', '.join(wordings)}")
    image_score = config.image_score if config.image_score is not None else \
        "max_patch" if baseline else variant["image_score"]
    logit_scale = config.logit_scale if config.logit_scale is not None else \
        1.0 if config.seed_code else variant["logit_scale"]
    if config.variant == "anomalyclip" and not backbone.value_attention:
        raise ValueError("--variant anomalyclip needs an image tower with DPAM's v-v attention "
                         "(open_clip CLIP ViTs with standard attention blocks)")
    if image_score == "global" and not backbone.value_attention:
        raise ValueError("--image_score global (AnomalyCLIP's un-normalised class token) needs an open_clip "
                         "CLIP ViT image tower")
    context = backbone.context_length
    too_long = [f"--{name} {getattr(config, name)}" for name in ("n_ctx", "t_n_ctx")
                if getattr(config, name) >= context]
    if config.learnable_prompts and too_long:
        raise ValueError(f"{', '.join(too_long)}: the prompts must fit the text context of {context} tokens")
    num_layers = backbone.num_layers
    features_list = [layer + num_layers + 1 if layer < 0 else layer
                     for layer in (default_features_list(num_layers) if config.features_list is None
                                   else config.features_list)]
    dpam_from = config.dpam_from
    if config.variant == "anomalyclip":
        # AnomalyCLIP's DAPM_replace(DPAM_layer=20) gives the last 19 blocks the v-v path (6..24 of 24)
        dpam_from = max(1, num_layers - 18) if dpam_from is None else dpam_from
        if not 1 <= dpam_from <= num_layers:
            raise ValueError(f"dpam_from {dpam_from}: a layer of the model's {num_layers}")
    elif dpam_from is not None:
        raise ValueError(f"dpam_from {dpam_from}: DPAM belongs to --variant anomalyclip")
    if not features_list:
        raise ValueError("--features_list: give at least one layer")
    bad = [layer for layer in features_list if not 1 <= layer <= num_layers]
    if bad:
        raise ValueError(f"--features_list {bad}: layers are 1-based, the model has {num_layers}")
    if len(set(features_list)) != len(features_list):
        raise ValueError(f"--features_list {features_list}: layers repeat")
    return replace(config, backbone=replace(built), features_list=features_list, wording=wording,
                   image_score=image_score, logit_scale=logit_scale, dpam_from=dpam_from)


@dataclass
class MedVMADOutput:
    # [B] float64. Without a memory bank: in [0,1], the image_score rule's (see IMAGE_SCORES); with
    # one: the bank's z (memory_bank.py), unbounded, so that no two scores tie by saturation.
    image_score: torch.Tensor
    # [B,H,W] float64. Without a bank: text_map, in [0,1]; with one: the bank's z of text_map and bank_map.
    anomaly_map: torch.Tensor
    layer_logits: torch.Tensor     # [B,L,H,W] abnormal - normal logit per tapped layer, upsampled bilinearly
    # [B,T,2] normal/abnormal logits of the image-level terms (mean_patch: log-probabilities
    # (log(1 - m), log m) of each detection layer's mean patch probability m)
    image_logits: torch.Tensor
    patch_features: list[torch.Tensor]  # per layer [B,N,E], L2-normalised segmentation features
    text_map: torch.Tensor         # [B,H,W] float64, mean over layers of sigmoid(layer_logits), smoothed
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


@functools.lru_cache(maxsize=16)
def _blur_matrix(size: int, sigma: float, boundary: str, dtype: torch.dtype, device: str) -> torch.Tensor:
    """[size,size] matrix of a 1-D Gaussian blur along one axis: radius 4 sigma, scipy's boundary
    ``mode`` "reflect" (d c b a | a b c d | d c b a) or "mirror" (d c b | a b c d | c b a), repeatedly
    when the radius exceeds the size. Built outside inference mode, so the cached matrix also serves
    passes that autograd records."""
    with torch.inference_mode(False):
        radius = int(4 * sigma + 0.5)
        offsets = torch.arange(-radius, radius + 1)
        kernel = torch.exp(-0.5 * (offsets.double() / sigma) ** 2)
        kernel /= kernel.sum()
        # Either boundary repeats with a period: fold the kernel onto one period, then reflect.
        period = 2 * size if boundary == "reflect" else max(2 * (size - 1), 1)
        folded = torch.zeros(period, dtype=torch.float64).index_add_(0, offsets % period, kernel)
        sources = (torch.arange(size)[:, None] + torch.arange(period)[None, :]) % period     # [size,period]
        last = period - 1 if boundary == "reflect" else period                               # the mirror image
        sources = torch.where(sources >= size, last - sources, sources)
        matrix = torch.zeros(size, size, dtype=torch.float64).scatter_add_(1, sources, folded.expand(size, -1))
        return matrix.to(device=device, dtype=dtype)


def gaussian_blur(maps: torch.Tensor, sigma: float, boundary: str = "reflect") -> torch.Tensor:
    """Gaussian smoothing of maps [B,H,W] as the seed's and AnomalyCLIP's test.py do it
    (``scipy.ndimage.gaussian_filter(map, sigma)``: radius 4 sigma, mode "reflect"; ``boundary``
    "mirror" for checkpoints of before), written as two matrix products, rows then columns: exact
    for any sigma, and fast in float64 too."""
    if sigma <= 0:
        return maps
    rows = _blur_matrix(maps.shape[-2], float(sigma), boundary, maps.dtype, str(maps.device))
    columns = _blur_matrix(maps.shape[-1], float(sigma), boundary, maps.dtype, str(maps.device))
    return rows @ maps @ columns.t()


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
        self.prompts = LearnablePrompts(self.backbone, config.organ, config.wording, config.n_ctx, config.depth,
                                        config.t_n_ctx) if config.learnable_prompts else None
        self._text_cache: torch.Tensor | None = None
        self._ensemble_name: str | None = None
        self.memory_bank: MemoryBank | None = None
        self.to(self.backbone.device)

    # ---- parameters ----
    @property
    def trains_every_weight(self) -> bool:
        """Whether every learnable weight reaches the loss. Not with adapters and the mean_patch rule
        (the seed, MVFA): the scores come from the detection layers' patches, not the global
        embedding, so nothing reads the stream after the last tapped layer and that layer's adapter
        up-projections get no gradient (as in the seed's and MVFA's own code). DDP must then look
        for unused weights at every step."""
        return not (self.config.image_score == "mean_patch" and self.seg_adapters is not None)

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

    # ---- switches ----
    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the frozen backbone's blocks in the backward pass instead of keeping their
        activations (memory for compute; the loss and gradients are unchanged)."""
        self.backbone.grad_checkpointing = enabled

    def set_fewshot_weight(self, weight: float) -> None:
        """Weight of the memory-bank map in the combined map and image score (``ValueError`` outside [0, 1])."""
        valid, rule = CONFIG_RULES["fewshot_weight"]
        if not valid(weight):
            raise ValueError(f"fewshot_weight {weight!r}: {rule}")
        self.config.fewshot_weight = weight

    # ---- text ----
    def text_features(self) -> torch.Tensor:
        """[2,E] normal/abnormal text features; cached unless prompts are being trained."""
        if self.prompts is None:
            if self._text_cache is None or self._ensemble_name != self.config.organ:
                self._text_cache = ensemble_text_features(self.backbone, self.config.organ, self.config.wording)
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
        """features [...,E] -> normal/abnormal logits [...,2]: cosines times the config's logit scale
        (CLIP's learned one, 100 for OpenAI CLIP; AnomalyCLIP 1/0.07; MVFA 100; the seed's code 1)."""
        features = features / features.norm(dim=-1, keepdim=True)
        scale = self.config.logit_scale
        return (self.backbone.logit_scale if scale == "learned" else scale) * (features @ text.t())

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
        # AnomalyCLIP's DPAM: the maps read a v-v attention stream from layer dpam_from on.
        vv_from = self.config.dpam_from
        # AnomalyCLIP's code returns the class token @ proj without ln_post (its patches get ln_post).
        global_embedding, tapped = self.backbone.encode_image(images, self.features_list, hook, vv_from,
                                                              global_norm=self.config.image_score != "global")
        if hook is None:
            seg_features = [self.backbone.project_tokens(tapped[layer][:, prefix:]) for layer in self.features_list]

        # Similarities, maps and scores in fp32 even under autocast: low precision ties the scores.
        with torch.autocast(images.device.type, enabled=False):
            return self._score(global_embedding.float(), [f.float() for f in seg_features],
                               [f.float() for f in det_features], text.float(), images.shape[-2:])

    def _score(self, global_embedding: torch.Tensor, seg_features: list[torch.Tensor],
               det_features: list[torch.Tensor], text: torch.Tensor, size: torch.Size) -> MedVMADOutput:
        """Maps and scores from the global embedding [B,E] and per-layer patch features [B,N,E]
        (``det_features`` empty without adapters: mean_patch then reads ``seg_features``).

        Logits are float32; every probability is taken in float64, where sigmoid(g) reaches exactly
        1 only at g > 36.7 instead of 16.6 (a cosine gap of 0.17 at scale 100), so scores of
        confident images and pixels do not tie by saturation.
        """
        size = (int(size[0]), int(size[1]))
        gaps = torch.stack([self._logits(features, text).diff(dim=-1)[..., 0]
                            for features in seg_features], dim=1)                         # [B,L,N]
        # Logits are upsampled (as MVFA does), then turned into probabilities: 2-class softmax of
        # bilinear logits = sigmoid of the bilinear logit gap. The loss works on the same logits.
        layer_logits = self._upsample(gaps, size)                                         # [B,L,H,W]
        text_map = gaussian_blur(torch.sigmoid(layer_logits.double()).mean(dim=1), self.config.sigma,
                                 self.config.blur_boundary)
        image_logits, image_score = self._image_terms(global_embedding, det_features, seg_features, text, text_map)

        normalised = [features / features.norm(dim=-1, keepdim=True) for features in seg_features]
        anomaly_map, bank_map = text_map, None
        if self.memory_bank is not None:
            bank_map = self._bank_map(self.memory_bank.distances(normalised), size)
            anomaly_map, image_score = self.memory_bank.combine(text_map, bank_map, image_score,
                                                                self.config.fewshot_weight)
        return MedVMADOutput(image_score, anomaly_map, layer_logits, image_logits, normalised, text_map, bank_map)

    def _image_terms(self, global_embedding: torch.Tensor, det_features: list[torch.Tensor],
                     seg_features: list[torch.Tensor], text: torch.Tensor,
                     text_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image-level terms [B,T,2] (what the image loss reads) and the image score [B] (float64)
        of the config's ``image_score`` rule (IMAGE_SCORES)."""
        rule = self.config.image_score
        if rule == "mean_patch":
            # The seed and MVFA: per detection layer the mean abnormal probability m of its patches,
            # as log-probabilities (log(1 - m), log m) so that the loss stays in log space; the image
            # score is their mean over layers (both codes sum them: the same ranking, kept in [0,1]).
            image_logits = torch.stack([mean_patch_log_probabilities(self._logits(features, text).double())
                                        for features in det_features or seg_features], dim=1)  # [B,T,2]
            return image_logits, image_logits[..., 1].exp().mean(dim=1)
        if rule in ("global", "global_ln_post"):
            # AnomalyCLIP: the image score and its loss come from the global embedding alone. Its
            # map, the mean over layers of (p_abnormal + 1 - p_normal) / 2, is text_map: with two
            # classes p_normal = 1 - p_abnormal.
            image_logits = self._logits(global_embedding, text)[:, None]                 # [B,1,2]
            return image_logits, image_logits.double().softmax(dim=-1)[:, 0, 1]
        terms = [self._logits(global_embedding, text)]                                   # max_patch: [B,2]
        for features in det_features:
            # Detection branch: the logits of the most abnormal patch (a lesion may be tiny).
            logits = self._logits(features, text)                                          # [B,N,2]
            top = (logits[..., 1] - logits[..., 0]).argmax(dim=1)
            terms.append(logits[torch.arange(logits.shape[0], device=logits.device), top])
        image_logits = torch.stack(terms, dim=1)                                          # [B,T,2]
        # Image score: the image-level terms' mean abnormal probability, averaged with the map's
        # maximum (the map localises small lesions that the image-level terms miss).
        probabilities = image_logits.double().softmax(dim=-1)[..., 1].mean(dim=1)
        return image_logits, 0.5 * probabilities + 0.5 * text_map.flatten(1).amax(dim=1)

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
        return gaussian_blur(self._upsample(distances, size).mean(dim=1), self.config.sigma, self.config.blur_boundary)

    @torch.no_grad()
    def build_memory_bank(self, images: torch.Tensor, groups: torch.Tensor, batch_size: int = 8) -> None:
        """Build the few-shot bank from normal support images [K,3,H,W] in [0,1] (augmentations included).

        groups [K]: the original support image of each row, so that statistics are computed leaving
        each support image out together with its augmentations; the first row of each group is the
        original (``augment_support``'s order), whose left-out scores the bank keeps (``left_out``).
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
        first = torch.stack([torch.nonzero(groups == group)[0, 0] for group in torch.unique(groups)])
        bank.left_out = torch.stack([text_scores[first], bank_scores[first]], dim=1).double()
        self.memory_bank = bank.to(images.device)
