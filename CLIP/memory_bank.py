"""Few-shot memory bank: adapted patch features of normal support images, and how its map is combined.

A test patch's bank distance is 1 - its highest cosine similarity to the bank's patches of the same
layer. The text map and the bank map live on different scales, so both are standardised with
statistics of the *support* images (never the test set): every normal support image is scored
against the bank built without it (leave one image out, its augmentations included). The combined
map is ``z = (1-w) z_text + w z_bank``; the combined image score is the same rule applied to the
text image score and the maximum of the bank map. Both are kept as z, unbounded, not squashed
into [0,1]: a sigmoid saturates to exactly 1 at z > 16.6 in float32 (36.7 in float64), and
support statistics of a few images make such z common, so distinct scores would tie.
"""
from __future__ import annotations

import torch
from torch import nn

# Elements of one query-vs-bank similarity block; bounds memory (256 MB in fp32) for any bank size.
SIMILARITY_BLOCK = 64 * 1024 * 1024
EPS = 1e-6


class MemoryBank(nn.Module):
    """Per-layer bank of L2-normalised features [M,E] with the support image id of each row."""

    def __init__(self, features: list[torch.Tensor], groups: torch.Tensor):
        super().__init__()
        for layer, bank in enumerate(features):
            self.register_buffer(f"bank_{layer}", bank)
        self.register_buffer("groups", groups)                 # [M] support image id per row
        self.num_layers = len(features)
        # (mean, std) of: text pixel map, bank pixel map, text image score, bank image score.
        self.register_buffer("statistics", torch.tensor([[0.0, 1.0]] * 4))
        # (text image score, bank image score) [S,2] of each support image scored against the bank without it
        self.register_buffer("left_out", torch.zeros(0, 2, dtype=torch.float64))

    def layer(self, index: int) -> torch.Tensor:
        return getattr(self, f"bank_{index}")

    @torch.no_grad()
    def distances(self, patch_features: list[torch.Tensor], exclude: torch.Tensor | None = None) -> torch.Tensor:
        """1 - max cosine to the bank, [B,L,N], for per-layer normalised features [B,N,E].

        exclude [B]: a support image id per query image whose bank rows are ignored (leave-one-out).
        Queries are processed in blocks so that memory stays bounded for large banks.
        """
        result = []
        for index, queries in enumerate(patch_features):
            bank = self.layer(index).to(queries.dtype)
            batch, patches, _ = queries.shape
            flat = queries.reshape(batch * patches, -1)
            owner = None if exclude is None else exclude.repeat_interleave(patches)
            rows = max(1, SIMILARITY_BLOCK // max(bank.shape[0], 1))
            best = []
            for start in range(0, flat.shape[0], rows):
                similarity = flat[start:start + rows] @ bank.t()                       # [r,M]
                if owner is not None:
                    same = owner[start:start + rows, None] == self.groups[None, :]
                    similarity = similarity.masked_fill(same, -1.0)
                best.append(similarity.max(dim=1).values)
            result.append(1 - torch.cat(best).reshape(batch, patches))
        return torch.stack(result, dim=1)

    def combine(self, text_map: torch.Tensor, bank_map: torch.Tensor, text_score: torch.Tensor,
                weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Combined map [B,H,W] and image score [B], both z values in float64 (module docstring)."""
        (mt, st), (mb, sb), _, _ = self.statistics.tolist()
        text_map, bank_map = text_map.double(), bank_map.double()
        pixel = (1 - weight) * (text_map - mt) / (st + EPS) + weight * (bank_map - mb) / (sb + EPS)
        return pixel, self.image_score(text_score, bank_map.flatten(1).max(dim=1).values, weight)

    def image_score(self, text_score: torch.Tensor, bank_score: torch.Tensor, weight: float) -> torch.Tensor:
        """Combined image score [B] (z, float64) of text image scores and bank map maxima [B]."""
        _, _, (ms, ss), (mbs, sbs) = self.statistics.tolist()
        return ((1 - weight) * (text_score.double() - ms) / (ss + EPS)
                + weight * (bank_score.double() - mbs) / (sbs + EPS))

    def left_out_scores(self, weight: float) -> torch.Tensor:
        """Combined image score [S] of each support image (its first row: the original) scored
        against the bank without it and its augmented copies: how a normal image the bank has
        not seen scores, for calibrating on the support set."""
        return self.image_score(self.left_out[:, 0], self.left_out[:, 1], weight)
