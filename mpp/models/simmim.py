"""SimMIM (Xie et al., 2022).

Masked tokens are replaced in place by a learned mask token right after the patch embedding (before the
position embedding), the encoder sees the whole sequence, and a linear layer predicts each token's target
from the encoder's output: for pixels, p*p*3 values per token, which is SimMIM's 1x1 convolution followed
by a pixel shuffle. SimMIM masks 60% of 32-px units (model.mask.unit 2 on patch 16) and scores the masked
pixels by L1 (model.target.loss l1, norm_pix off).

The encoder's `masked_grid` does the encoder's part, so any encoder kind trains by it: a ViT (whose
tokenizer keeps hidden pixels out where its tokens mix them), or VT-ResNet, whose output is the last
projector's map with the mask token at the hidden positions of its CNN's map (vt.py).
"""
from __future__ import annotations

import torch
from torch import nn

from .masking import Mask
from .model import MaskedImageModel, Prediction, mean_over


class SimMIMHead(nn.Module):
    def __init__(self, width: int, target_dim: int):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pred = nn.Linear(width, target_dim)


class SimMIM(MaskedImageModel):
    def build_head(self, cfg, target_dim: int) -> nn.Module:
        return SimMIMHead(self.encoder.width, target_dim)

    def predict(self, imgs: torch.Tensor, mask: Mask) -> Prediction:
        out = self.encoder.masked_grid(imgs, mask.masked, self.head.mask_token, self.fusion)
        return Prediction(self.head.pred(out), hidden=mask.masked, scored=mask.masked,
                          features=mean_over(out, ~mask.masked))
