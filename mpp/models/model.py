"""What every masked-image objective shares: an encoder, a target, a mask, the loss, and the optional
parts any objective may add (block fusion, the batch terms). An objective is a subclass that says how
the encoder sees the masked image and how its head predicts the target (`build_head`, `predict`):
mae.py, simmim.py, vit_mpp.py, each read top to bottom.

`forward(imgs)` returns one `ModelOutput`: the loss, its unweighted terms by name, every token's
prediction and which tokens were hidden from the encoder and which the loss scored.

Batch terms, training's only (they compare the images of a micro-batch, gathered over processes
under DDP: batch_losses.py):
- `uniformity` > 0: U-MAE's regulariser (Zhang et al., 2022), the mean squared cosine similarity between the
  batch's images, each the mean of its visible tokens at the encoder's output;
- `contrastive` > 0: a SimCLR term (Chen et al., 2020) as CAN (Mishra et al., 2022) pairs it with MAE: each image
  gets a second view (views.random_view), both are masked and predicted in one pass of twice the batch, and
  an MLP head on each view's mean visible token learns by NT-Xent to pick its twin among the 2B views.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .batch_losses import contrastive_loss, uniformity_loss
from .fusion import BlockFusion
from .masking import Mask, make_mask
from .views import random_view

# The contrastive term's head, SimCLR's MLP: width -> max(width, 512) -> 128 (its output size).
PROJECTOR_MIN_HIDDEN, PROJECTOR_DIM = 512, 128


class Prediction(NamedTuple):
    """What an objective's `predict` returns: pred (B, N, target dim) for every token; hidden (B, N) bool, the
    tokens whose pixels the encoder did not see; scored (B, N) bool, the tokens the loss counts; features
    (B, width), each image's mean visible token at the encoder's output (what the batch terms compare)."""
    pred: torch.Tensor
    hidden: torch.Tensor
    scored: torch.Tensor
    features: torch.Tensor


class ModelOutput(NamedTuple):
    """loss; terms: each unweighted term by name ("reconstruction" always); pred, hidden, scored as in Prediction.
    With the contrastive term on in training, the tensors cover both views (2B, ...), the second half the
    random views'."""
    loss: torch.Tensor
    terms: dict
    pred: torch.Tensor
    hidden: torch.Tensor
    scored: torch.Tensor


class MaskedImageModel(nn.Module):
    def __init__(self, encoder: nn.Module, target: nn.Module, cfg):
        """`cfg`: the model section (config.ModelConfig): mask, fuse_blocks, the batch terms and the objective's
        own section, which `build_head` reads."""
        super().__init__()
        self.encoder, self.mask = encoder, cfg.mask
        # Construction order fixes the random draws of the initialisation: encoder, fusion, head, projector.
        self.fusion = BlockFusion(encoder.width, len(encoder.blocks), cfg.fuse_blocks) if cfg.fuse_blocks else None
        self.head = self.build_head(cfg, target.dim)
        self.target = target  # no weights of its own
        self.uniformity, self.contrastive = cfg.uniformity, cfg.contrastive
        self.contrastive_temperature = cfg.contrastive_temperature
        hidden = max(encoder.width, PROJECTOR_MIN_HIDDEN)
        self.projector = nn.Sequential(nn.Linear(encoder.width, hidden), nn.GELU(),
                                       nn.Linear(hidden, PROJECTOR_DIM)) if cfg.contrastive else None
        self._init_weights()

    # ---- what an objective supplies ----
    def build_head(self, cfg, target_dim: int) -> nn.Module:
        raise NotImplementedError

    def predict(self, imgs: torch.Tensor, mask: Mask) -> Prediction:
        raise NotImplementedError

    # ---- shared ----
    @property
    def grid(self) -> tuple[int, int]:
        return self.encoder.grid

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    def _init_weights(self):
        # MAE's initialisation, for every objective: xavier for linear layers and the patch projection (as if
        # linear), N(0, 0.02) for the class and mask tokens.
        proj = getattr(getattr(self.encoder, "patch_embed", None), "proj", None)
        if isinstance(proj, nn.Conv2d):
            nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        if getattr(self.encoder, "cls_token", None) is not None:
            nn.init.normal_(self.encoder.cls_token, std=0.02)
        if getattr(self.head, "mask_token", None) is not None:
            nn.init.normal_(self.head.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch, for the encoder and a head with transformer blocks (MAE's decoder)."""
        self.encoder.set_grad_checkpointing(enable)
        if hasattr(self.head, "set_grad_checkpointing"):
            self.head.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """Names timm's optimizer factory keeps out of weight decay (norms and biases it finds itself)."""
        return {"encoder.cls_token", "encoder.pos_embed", *(f"head.{n}" for n, _ in self.head.named_parameters()
                                                            if n in ("mask_token", "pos_embed"))}

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens with their positions -> the encoder's output, class token first: blocks (fused, with
        fuse_blocks) and the final norm."""
        return self.encoder.encode(tokens, self.fusion)

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None) -> ModelOutput:
        """imgs: normalised (B, C, H, W); mask_ratio: this step's (masking.ratio_at), default model.mask.ratio."""
        ratio = self.mask.ratio if mask_ratio is None else mask_ratio
        # The batch terms are training's only (they gather across processes under DDP, and a preview runs on
        # one process).
        contrast, uniform = self.training and self.contrastive > 0, self.training and self.uniformity > 0
        if contrast:
            imgs = torch.cat([imgs, random_view(imgs)])
        mask = make_mask(self.mask.kind, imgs.shape[0], self.grid, ratio, self.mask.unit, self.mask.min_block,
                         device=imgs.device)
        p = self.predict(imgs, mask)
        terms = {"reconstruction": self.target.loss(p.pred, self.target(imgs), p.scored)}
        loss = terms["reconstruction"]
        if uniform:
            terms["uniformity"] = uniformity_loss(p.features)
            loss = loss + self.uniformity * terms["uniformity"]
        if contrast:
            terms["contrastive"] = contrastive_loss(self.projector(p.features), self.contrastive_temperature)
            loss = loss + self.contrastive * terms["contrastive"]
        return ModelOutput(loss, terms, p.pred, p.hidden, p.scored)


def mean_over(tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, N, D) tokens, (B, N) bool -> (B, D) the mean of each image's kept tokens."""
    weight = keep.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weight).sum(1) / weight.sum(1)
