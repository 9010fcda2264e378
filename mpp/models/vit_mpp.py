"""The ViT paper's masked patch prediction (Dosovitskiy et al., 2020, appendix B.1.2), BERT's recipe on patches.

The masking draws the corrupted tokens (the ViT paper: 50%, model.mask.ratio 0.5). Of those, after the patch
embedding and before the position embedding, 80% are replaced by a learned [mask] embedding, 10% by the
embedding of another patch of the same image, and 10% are left unchanged. A linear head on the encoder's
output predicts each corrupted token's target (the paper: its 3-bit mean colour, 512-way cross-entropy);
the loss counts every corrupted token and no other.

The random replacements come from uncorrupted patches, so the pixels of a [mask]-replaced patch reach the
encoder nowhere.
"""
from __future__ import annotations

import torch
from torch import nn

from .masking import Mask
from .model import MaskedImageModel, Prediction, mean_over
from .patches import gather_tokens


class ViTMPPHead(nn.Module):
    def __init__(self, width: int, target_dim: int):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))  # the paper's [mask] embedding
        self.pred = nn.Linear(width, target_dim)


def corruption_plan(corrupted: torch.Tensor, to_mask: float, to_random: float, generator=None):
    """Split the corrupted tokens (B, N) bool: (replaced by [mask], replaced by another patch), each token's
    fate drawn independently with probabilities to_mask, to_random (the rest are left unchanged)."""
    u = torch.rand(corrupted.shape, device=corrupted.device, generator=generator)
    return corrupted & (u < to_mask), corrupted & (u >= to_mask) & (u < to_mask + to_random)


class ViTMPP(MaskedImageModel):
    def build_head(self, cfg, target_dim: int) -> nn.Module:
        self.corruption = cfg.corruption
        return ViTMPPHead(self.encoder.width, target_dim)

    def predict(self, imgs: torch.Tensor, mask: Mask) -> Prediction:
        enc, corrupted = self.encoder, mask.masked
        to_mask, to_random = corruption_plan(corrupted, self.corruption.mask_token, self.corruption.random_patch)
        tokens = enc.embed(imgs, to_mask)
        # Another patch for each token: a uniformly drawn one of the image's uncorrupted patches (mask.ids_keep).
        pick = torch.randint(0, mask.ids_keep.shape[1], corrupted.shape, device=imgs.device)
        others = gather_tokens(tokens, torch.gather(mask.ids_keep, 1, pick))
        tokens = torch.where(to_random.unsqueeze(-1), others, tokens)
        tokens = torch.where(to_mask.unsqueeze(-1), self.head.mask_token.to(tokens.dtype), tokens)
        out = self.encode(enc.add_positions(tokens))[:, enc.num_prefix_tokens:]
        return Prediction(self.head.pred(out), hidden=to_mask, scored=corrupted,
                          features=mean_over(out, ~corrupted))
