"""Training losses: focal + dice on every tapped layer's pixel map, BCE on the image-level terms.

Everything is computed from logits, in log space: a pixel or image that is confidently wrong (a
logit gap of 40, say) still gets a gradient of about 1, where clamping probabilities before a log
would give exactly zero. For two classes, log-softmax over (normal, abnormal) logits is
``logsigmoid(±gap)`` with ``gap = abnormal - normal``, which is what the functions below take.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from CLIP.MedVMAD import MedVMADOutput


def focal_loss(logit_gap: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss of each image, mean over its pixels: logit_gap [B,...] (abnormal - normal
    logit, p = sigmoid(gap)), target [B,...] in {0,1} -> [B].

    Loss per pixel: -y (1-p)^g log p - (1-y) p^g log(1-p).
    """
    log_p, log_not_p = F.logsigmoid(logit_gap), F.logsigmoid(-logit_gap)
    positive = -target * log_not_p.mul(gamma).exp() * log_p
    negative = -(1 - target) * log_p.mul(gamma).exp() * log_not_p
    return (positive + negative).flatten(1).mean(dim=1)


def dice_loss(logit_gap: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice of sigmoid(logit_gap) of each image (as MVFA and AnomalyCLIP): logit_gap,
    target [B,...] -> [B]; smoothing 1, so an all-normal image is defined."""
    probability = torch.sigmoid(logit_gap).flatten(1)
    target = target.flatten(1)
    intersection = (probability * target).sum(dim=1)
    return 1 - (2 * intersection + 1) / (probability.sum(dim=1) + target.sum(dim=1) + 1)


def image_bce(image_logits: torch.Tensor, labels: torch.Tensor, probability_as_logit: bool = False) -> torch.Tensor:
    """BCE of each image-level term: image_logits [B,T,2] (normal, abnormal), labels [B] -> [B,T].

    ``probability_as_logit``: BCE *with logits* applied to the term's abnormal probability itself,
    as MVFA's and the seed's code do (``BCEWithLogitsLoss()(mean_probability, label)``): the loss of
    a probability m is -y log sigmoid(m) - (1-y) log(1 - sigmoid(m)), which never reaches 0.
    """
    gap = image_logits.softmax(dim=-1)[..., 1] if probability_as_logit else image_logits[..., 1] - image_logits[..., 0]
    return F.binary_cross_entropy_with_logits(gap, labels[:, None].expand_as(gap), reduction="none")


@dataclass
class LossWeights:
    """The loss terms' weights and forms (train.py takes them from the recipe and the variant)."""

    focal: float = 1.0
    dice: float = 1.0
    image: float = 1.0
    normal_dice: float = 0.0  # dice of the normal channel too (the seed's and AnomalyCLIP's code: both channels)
    image_terms_mean: bool = False  # mean over an image's terms instead of the sum (the max_patch rule)
    probability_as_logit: bool = False  # see image_bce (MVFA's code; the seed's with --seed_code)


def medvmad_loss(output: MedVMADOutput, masks: torch.Tensor, labels: torch.Tensor,
                 has_mask: torch.Tensor, weights: LossWeights, images: float | None = None,
                 masked_images: float | None = None) -> dict[str, torch.Tensor]:
    """Combined loss and its parts.

    masks [B,H,W] in {0,1}; labels [B]; has_mask [B] bool: images whose mask is known (normal
    images and abnormal ones with a mask, of sources that have masks). The image term is each image's
    BCE summed over its image-level terms (one per detection layer, as the seed's and MVFA's code
    sum them; ``image_terms_mean``: their mean), summed over images and divided by ``images``.
    The pixel terms are summed over tapped layers, on the upsampled per-layer logits:
    each image's focal and dice, summed over the images with known masks and divided by
    ``masked_images``. Both divisors default to this batch's own counts (means). Under DDP they are
    the global batch's counts over the number of processes, so that the mean of the processes'
    losses, which DDP's gradient averaging takes, is the global batch's loss whichever process
    holds which images.
    """
    labels = labels.float()  # losses in fp32, also when the forward pass ran under autocast
    per_term = image_bce(output.image_logits.float(), labels, weights.probability_as_logit)          # [B,T]
    per_image = per_term.mean(dim=1) if weights.image_terms_mean else per_term.sum(dim=1)
    image = per_image.sum() / (len(labels) if images is None else images)
    zero = image.new_zeros(())
    focal, dice, normal_dice = zero, zero, zero
    # Images without a mask weigh 0 but stay in the graph, so every process's backward reaches the
    # same parameters (DDP) even when its images have no masks.
    known = has_mask.float()
    denominator = float(known.sum()) if masked_images is None else masked_images
    denominator = denominator if denominator > 0 else 1.0  # no masks anywhere: the pixel terms are 0
    logits, target = output.layer_logits.float(), masks.float()                    # [B,L,H,W], [B,H,W]
    for layer in range(logits.shape[1]):
        focal = focal + (focal_loss(logits[:, layer], target) * known).sum() / denominator
        dice = dice + (dice_loss(logits[:, layer], target) * known).sum() / denominator
        if weights.normal_dice:  # normal channel: p_normal = sigmoid(-gap) against 1 - mask
            normal_dice = normal_dice + (dice_loss(-logits[:, layer], 1 - target) * known).sum() / denominator
    total = weights.focal * focal + weights.dice * dice + weights.normal_dice * normal_dice + weights.image * image
    return {"loss": total, "focal": focal.detach(), "dice": (dice + normal_dice).detach(), "image": image.detach()}
