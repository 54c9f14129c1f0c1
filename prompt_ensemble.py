"""Prompt wording: the fixed prompt ensembles (the zero-training baseline's and MVFA-AD's) and the
learnable prompts with their state words (the seed report's, the seed code's, AnomalyCLIP's, ours).

This project's medical text for a dataset is built from its organ entry: an imaging modality,
words for the normal and abnormal states, and templates in the style of the field (WinCLIP /
AnomalyCLIP / MVFA).
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from CLIP.backbone import Backbone, TextFrame

# organ -> (modality phrase, organ phrase, normal states, abnormal states)
ORGANS: dict[str, dict[str, object]] = {
    "brain": {
        "modality": "brain MRI",
        "organ": "brain",
        "normal": ["normal", "healthy", "unremarkable", "tumor-free", "lesion-free"],
        "abnormal": ["abnormal", "tumorous", "diseased", "with a tumor", "with a glioma", "with a lesion"],
    },
    "liver": {
        "modality": "abdominal CT",
        "organ": "liver",
        "normal": ["normal", "healthy", "unremarkable", "tumor-free", "lesion-free"],
        "abnormal": ["abnormal", "tumorous", "diseased", "with a tumor", "with a lesion", "with a mass"],
    },
    "retina": {
        "modality": "retinal OCT",
        "organ": "retina",
        "normal": ["normal", "healthy", "unremarkable"],
        "abnormal": ["abnormal", "diseased", "with fluid", "with a lesion", "with edema"],
    },
    "chest": {
        "modality": "chest X-ray",
        "organ": "chest",
        "normal": ["normal", "healthy", "clear", "unremarkable"],
        "abnormal": ["abnormal", "diseased", "with pneumonia", "with an opacity", "with a lesion"],
    },
    "histopathology": {
        "modality": "histopathology slide",
        "organ": "tissue",
        "normal": ["normal", "healthy", "benign"],
        "abnormal": ["abnormal", "malignant", "cancerous", "with metastasis", "with tumor cells"],
    },
}

TEMPLATES: list[str] = [
    "a {modality} image of a {state} {organ}.",
    "a {modality} scan of a {state} {organ}.",
    "a cropped {modality} image of a {state} {organ}.",
    "a close-up {modality} image of a {state} {organ}.",
    "a low resolution {modality} image of a {state} {organ}.",
    "a slice of a {state} {organ} in a {modality}.",
    "this is a {state} {organ} in a {modality}.",
    "a medical image of a {state} {organ}.",
]

# MVFA-AD's fixed ensemble, as its code builds it (utils.encode_text_with_prompt_ensemble): its
# state words x its templates, on the dataset's name in its prompt.REAL_NAME (MIT licence).
MVFA_NAMES: dict[str, str] = {"brain": "Brain", "liver": "Liver", "retina": "retinal OCT",
                              "chest": "Chest X-ray film", "histopathology": "histopathological image"}
MVFA_NORMAL: list[str] = ["{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw",
                          "{} without defect", "{} without damage"]
MVFA_ABNORMAL: list[str] = ["damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage"]
MVFA_TEMPLATES: list[str] = [
    "a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a bright photo of a {}.", "a dark photo of the {}.", "a photo of my {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a photo of one {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "a low resolution photo of a {}.",
    "a photo of a large {}.", "a blurry photo of a {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a photo of the small {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "a dark photo of a {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "there is a {} in the scene.", "there is the {} in the scene.",
    "this is a {} in the scene.", "this is the {} in the scene.", "this is one {} in the scene.",
]

# Wordings (MedVMADConfig.wording). Learnable prompts: the state words after the learnable context.
#   report     the seed report's "normal [cls]" / "abnormal [cls] with lesion", [cls] the organ
#   seed_code  the seed code's prompt learner: "object" / "abnormal object"
#   object     AnomalyCLIP's object-agnostic "object" / "damaged object"
#   medical    this project's earlier prompts (an option): context initialised from "a <modality>
#              image of a", "healthy brain" / "brain with a tumor", deep tokens in slots of their own
# Fixed ensembles (no learnable prompts): medical (ORGANS x TEMPLATES, the zero-training baseline)
# and mvfa (MVFA-AD's own ensemble above).
LEARNABLE_WORDINGS = ("report", "seed_code", "object", "medical")
ENSEMBLE_WORDINGS = ("medical", "mvfa")


def organ_entry(name: str) -> dict[str, object]:
    """Wording for a dataset name ("brain", "liver", ...); unknown names use generic medical wording."""
    if name in ORGANS:
        return ORGANS[name]
    return {"modality": "medical", "organ": name, "normal": ["normal", "healthy"],
            "abnormal": ["abnormal", "diseased", "with a lesion"]}


def _state_phrase(state: str, organ: str) -> str:
    """'healthy brain' but 'brain with a tumor' (trailing states follow the organ)."""
    return f"{organ} {state}" if state.startswith("with") else f"{state} {organ}"


def ensemble_texts(name: str, wording: str = "medical") -> tuple[list[str], list[str]]:
    """All normal and all abnormal sentences of a fixed ensemble for a dataset: states x templates."""
    if wording == "mvfa":
        subject = MVFA_NAMES.get(name, name)
        return tuple([template.format(state.format(subject)) for state in states for template in MVFA_TEMPLATES]
                     for states in (MVFA_NORMAL, MVFA_ABNORMAL))
    if wording != "medical":
        raise ValueError(f"wording {wording}: a fixed ensemble is one of {', '.join(ENSEMBLE_WORDINGS)}")
    entry = organ_entry(name)

    def sentences(states: list[str]) -> list[str]:
        return [template.replace("{state} {organ}", _state_phrase(state, entry["organ"]))
                .format(modality=entry["modality"]) for state in states for template in TEMPLATES]

    return sentences(entry["normal"]), sentences(entry["abnormal"])


@torch.no_grad()
def ensemble_text_features(backbone: Backbone, name: str, wording: str = "medical") -> torch.Tensor:
    """The fixed text features [2,E] (normal, abnormal): mean of normalised sentences, renormalised."""
    features = []
    for sentences in ensemble_texts(name, wording):
        embedding = backbone.encode_text(sentences)
        embedding = embedding / embedding.norm(dim=-1, keepdim=True)
        mean = embedding.mean(dim=0)
        features.append(mean / mean.norm())
    return torch.stack(features)


def learnable_states(name: str, wording: str) -> tuple[str, str]:
    """The normal and abnormal state words that follow the learnable context."""
    organ = organ_entry(name)["organ"]
    if wording == "report":
        return f"normal {organ}", f"abnormal {organ} with lesion"
    if wording == "seed_code":
        return "object", "abnormal object"
    if wording == "object":
        return "object", "damaged object"
    if wording == "medical":
        entry = organ_entry(name)
        abnormal = next((state for state in entry["abnormal"] if state.startswith("with")), entry["abnormal"][-1])
        return (_state_phrase(entry["normal"][-1 if len(entry["normal"]) < 2 else 1], entry["organ"]),
                _state_phrase(abnormal, entry["organ"]))
    raise ValueError(f"wording {wording}: learnable prompts take one of {', '.join(LEARNABLE_WORDINGS)}")


class LearnablePrompts(nn.Module):
    """One normal and one abnormal prompt with learnable context and learnable deep text tokens.

    Each prompt's token sequence is ``[start] [context x n_ctx] <state words>. [end]`` in the
    backbone's own tokenisation (CLIP: SOS ... EOT; BERT: [CLS] ... [SEP]); the state words come
    from ``wording`` (``learnable_states``). As in the seed's and AnomalyCLIP's prompt learners, the
    context starts random (N(0, 0.02)) and ``t_n_ctx`` deep tokens are written over the first
    context positions before each text layer 2..``depth`` (1-based), so ``depth`` - 1 layers get them.

    ``wording="medical"`` (an option, this project's earlier prompts) differs: the sequence is
    ``[start] [deep slots x t_n_ctx] [context] <state words>. [end]``, the context starts as the
    token embeddings of the organ's sentence prefix (e.g. "a brain MRI image of a", padded with
    small noise when shorter), and the deep slots are rewritten before each of the first ``depth``
    text layers, so they never overwrite a context token.
    """

    def __init__(self, backbone: Backbone, name: str, wording: str = "report", n_ctx: int = 12, depth: int = 9,
                 t_n_ctx: int = 4):
        super().__init__()
        if depth > backbone.text_layers:
            raise ValueError(f"--depth {depth} exceeds the text tower's {backbone.text_layers} layers")
        own_slots = wording == "medical"
        if not own_slots and depth > 1 and t_n_ctx > n_ctx:
            raise ValueError(f"--t_n_ctx {t_n_ctx}: the deep tokens overwrite context positions, "
                             f"at most --n_ctx {n_ctx}")
        width = backbone.text_width
        device = backbone.device
        states = learnable_states(name, wording)
        n_deep = depth if own_slots else max(depth - 1, 0)
        n_slots = t_n_ctx if n_deep else 0

        with torch.no_grad():
            context = torch.randn(2, n_ctx, width, device=device) * 0.02
            if own_slots:
                prefix_embed = backbone.word_embeddings(f"a {organ_entry(name)['modality']} image of a")
                take = min(n_ctx, len(prefix_embed))
                context[:, :take] = prefix_embed[:take]
            # Sequence skeleton: start token, placeholders for slots and context, state words.
            frame = backbone.text_frame([f"{state}." for state in states], n_slots if own_slots else 0, n_ctx)
            if not own_slots:  # deep tokens over the first context positions, from the 2nd layer
                start = frame.context.start
                frame = replace(frame, slots=slice(start, start + n_slots), first_deep_layer=1)
            embeddings = backbone.token_embedding(frame.token_ids)

        self.context = nn.Parameter(context)                                   # [2,n_ctx,Dt]
        self.deep = nn.Parameter(torch.randn(n_deep, n_slots, width, device=device) * 0.02) \
            if n_deep > 0 else None                                             # [D,n,Dt]
        self.register_buffer("frame", embeddings, persistent=False)            # [2,L,Dt]
        self.register_buffer("token_ids", frame.token_ids, persistent=False)   # [2,L]
        self.register_buffer("pooled_index", frame.pooled_index, persistent=False)  # [2] or None
        self.slots, self.context_slice, self.first_deep_layer = frame.slots, frame.context, frame.first_deep_layer

    def forward(self, backbone: Backbone) -> torch.Tensor:
        """Text features [2,E] (normal, abnormal), L2-normalised."""
        context = self.context_slice
        embeddings = torch.cat([self.frame[:, :context.start], self.context.to(self.frame.dtype),
                                self.frame[:, context.stop:]], dim=1)
        frame = TextFrame(self.token_ids, self.slots, self.context_slice, self.pooled_index, self.first_deep_layer)
        features = backbone.encode_text_embeddings(embeddings, frame, self.deep)
        return features / features.norm(dim=-1, keepdim=True)
