"""Prompt wording per organ, the fixed prompt ensemble (zero-training baseline) and the learnable prompts.

Text for a dataset is built from its organ entry: an imaging modality, words for the normal and
abnormal states, and templates in the style of the field (WinCLIP / AnomalyCLIP / MVFA).
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


def organ_entry(name: str) -> dict[str, object]:
    """Wording for a dataset name ("brain", "liver", ...); unknown names use generic medical wording."""
    if name in ORGANS:
        return ORGANS[name]
    return {"modality": "medical", "organ": name, "normal": ["normal", "healthy"],
            "abnormal": ["abnormal", "diseased", "with a lesion"]}


def _state_phrase(state: str, organ: str) -> str:
    """'healthy brain' but 'brain with a tumor' (trailing states follow the organ)."""
    return f"{organ} {state}" if state.startswith("with") else f"{state} {organ}"


def ensemble_texts(name: str) -> tuple[list[str], list[str]]:
    """All normal and all abnormal sentences for a dataset: states x templates."""
    entry = organ_entry(name)

    def sentences(states: list[str]) -> list[str]:
        return [template.replace("{state} {organ}", _state_phrase(state, entry["organ"]))
                .format(modality=entry["modality"]) for state in states for template in TEMPLATES]

    return sentences(entry["normal"]), sentences(entry["abnormal"])


@torch.no_grad()
def ensemble_text_features(backbone: Backbone, name: str) -> torch.Tensor:
    """The fixed zero-training text features [2,E] (normal, abnormal): mean of normalised sentences."""
    features = []
    for sentences in ensemble_texts(name):
        embedding = backbone.encode_text(sentences)
        embedding = embedding / embedding.norm(dim=-1, keepdim=True)
        mean = embedding.mean(dim=0)
        features.append(mean / mean.norm())
    return torch.stack(features)


class LearnablePrompts(nn.Module):
    """One normal and one abnormal prompt with learnable context, initialised from medical wording.

    Each prompt's token sequence is ``[start] [deep slots] [context x n_ctx] <state words> [end]``
    in the backbone's own tokenisation (CLIP: SOS ... EOT; BERT: [CLS] ... [SEP]). The ``n_ctx``
    context vectors start as the token embeddings of the organ's sentence prefix (e.g. "a brain
    MRI image of a"), padded with small noise when the prefix is shorter. The ``t_n_ctx`` deep
    slots (present when ``depth > 0``) hold learnable tokens that are rewritten before each of the
    first ``depth`` text layers; they never overwrite real word tokens.

    ``object_agnostic`` gives AnomalyCLIP's prompts instead: ``[V1..Vn] object.`` and
    ``[W1..Wn] damaged object.`` with randomly initialised context, and deep tokens written over
    the first ``t_n_ctx`` context positions before text layers 2..``depth`` (1-based).
    """

    def __init__(self, backbone: Backbone, name: str, n_ctx: int = 12, depth: int = 9, t_n_ctx: int = 4,
                 object_agnostic: bool = False):
        super().__init__()
        if depth > backbone.text_layers:
            raise ValueError(f"--depth {depth} exceeds the text tower's {backbone.text_layers} layers")
        if object_agnostic and depth > 1 and t_n_ctx > n_ctx:
            raise ValueError(f"--t_n_ctx {t_n_ctx}: the object-agnostic deep tokens overwrite context "
                             f"positions, at most --n_ctx {n_ctx}")
        width = backbone.text_width
        device = backbone.device
        if object_agnostic:
            states, n_deep = ("object", "damaged object"), max(depth - 1, 0)
        else:
            entry = organ_entry(name)
            abnormal = next((state for state in entry["abnormal"] if state.startswith("with")), entry["abnormal"][-1])
            states = (_state_phrase(entry["normal"][-1 if len(entry["normal"]) < 2 else 1], entry["organ"]),
                      _state_phrase(abnormal, entry["organ"]))
            n_deep = depth
        n_slots = t_n_ctx if n_deep else 0

        with torch.no_grad():
            context = torch.randn(2, n_ctx, width, device=device) * 0.02
            if not object_agnostic:
                prefix_embed = backbone.word_embeddings(f"a {entry['modality']} image of a")
                take = min(n_ctx, len(prefix_embed))
                context[:, :take] = prefix_embed[:take]
            # Sequence skeleton: start token, placeholders for slots and context, state words.
            frame = backbone.text_frame([f"{state}." for state in states],
                                        0 if object_agnostic else n_slots, n_ctx)
            if object_agnostic:  # deep tokens over the first context positions, from the 2nd layer
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
