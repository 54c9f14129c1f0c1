"""Training losses: focal + dice on every tapped layer's pixel map, BCE on the image-level terms."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from CLIP.MedVMAD import MedVMADOutput

EPS = 1e-6


def focal_loss(probability: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss, mean over pixels. probability, target [...] with target in {0,1}."""
    probability = probability.clamp(EPS, 1 - EPS)
    positive = -target * (1 - probability) ** gamma * probability.log()
    negative = -(1 - target) * probability ** gamma * (1 - probability).log()
    return (positive + negative).mean()


def dice_loss(probability: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice over the whole batch (smoothing 1, so an all-normal batch is well defined)."""
    intersection = (probability * target).sum()
    return 1 - (2 * intersection + 1) / (probability.sum() + target.sum() + 1)


@dataclass
class LossWeights:
    focal: float = 1.0
    dice: float = 1.0
    image: float = 1.0


def medvmad_loss(output: MedVMADOutput, masks: torch.Tensor, labels: torch.Tensor,
                 has_mask: torch.Tensor, weights: LossWeights) -> dict[str, torch.Tensor]:
    """Combined loss and its parts.

    masks [B,H,W] in {0,1}; labels [B]; has_mask [B] bool: images whose mask is known (normal
    images always; abnormal ones only for datasets with masks). The pixel terms are summed over
    tapped layers and use only images with known masks; the image term is the mean BCE of every
    image-level term (global embedding and each detection layer).
    """
    labels = labels.float()  # losses in fp32, also when the forward pass ran under autocast
    terms = output.image_logits.float().softmax(dim=-1)[..., 1].clamp(EPS, 1 - EPS)   # [B,T]
    image = F.binary_cross_entropy(terms, labels[:, None].expand_as(terms))
    zero = image.new_zeros(())
    focal, dice = zero, zero
    if bool(has_mask.any()):
        maps = output.layer_maps[has_mask].float()                              # [b,L,H,W]
        target = masks[has_mask].float()
        for layer in range(maps.shape[1]):
            focal = focal + focal_loss(maps[:, layer], target)
            dice = dice + dice_loss(maps[:, layer], target)
    total = weights.focal * focal + weights.dice * dice + weights.image * image
    return {"loss": total, "focal": focal.detach(), "dice": dice.detach(), "image": image.detach()}
