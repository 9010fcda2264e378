"""VT, Visual Transformers (Wu et al., 2020): VT-ResNet, a ResNet whose last stage is replaced by VT modules.

X is a feature map as rows (HW x C), T the visual tokens (L x C). A VT module is, in the paper's equations:
- tokenizer, filter-based (the first module):  T = softmax_HW(X W_A)^T X               W_A: C x L
  or recurrent (the others):                   W_R = T_in W_T->R,  T = softmax_HW(X W_R^T)^T X
- transformer over the tokens:  T' = T + softmax_L((T K)(T Q)^T) T,  T_out = T' + ReLU(T' F1) F2
- projector back into the map:  X_out = X + softmax_L((X W_Q)(T_out W_K)^T) T_out
all matrices C x C but W_A. VT-ResNet-18: timm's resnet18 up to stage 3 (stride 16, 256 channels at 224 px:
14 x 14 x 256), then two VT modules (as many as stage 4 had blocks) with L = 16 tokens instead of stage 4;
the classifier reads the mean of the last module's tokens. For 32-px images the stem is CIFAR's ResNet stem
(one 3x3/1 convolution, no max pool): stride 4, an 8 x 8 map.

A map (B, C, H, W) becomes rows by flattening and *transposing* (B, HW, C): reshaping NCHW memory straight
to (B, HW, C), as a popular copy does, mixes channels and positions.

mpp adds two things a ViT has: a fixed 2-D sin-cos embedding of the map's grid, added to X before the first
module (model.pos_embed: fixed or learned): a token is a weighted mean of map rows, so with it a token
carries where it was drawn from, and a masked position, which holds no feature, knows where it is (the paper
encodes positions its own way, not carried over); and a final LayerNorm on what the encoder outputs (tokens,
map rows): the equations have no normalisation and their residual sums grow from module to module.

Masked pretraining (SimMIM's objective on the projector's map; VT has no published masked recipe): the
hidden tokens' pixels are 0 and the ResNet is mask-aware (sparse.py), so the map's visible positions hold
visible pixels only; its hidden positions get the objective's mask token (+ their position), are kept out of
every tokenizer's spatial softmax (no token is drawn from them), and are filled by the projectors from the
tokens. The head predicts each hidden position's pixels from the last projector's map (a linear layer per
position: SimMIM's 1x1 convolution + pixel shuffle).
"""
from __future__ import annotations

import functools

import timm
import torch
from timm.layers import DropPath, LayerNorm
from timm.models import checkpoint
from torch import nn

from .sparse import mask_aware
from .vit import POS_EMBEDS, sincos_pos_embed

# name -> (timm ResNet, VT modules: stage 4's block count)
VT_SIZES = {"vt_r18": ("resnet18", 2), "vt_r34": ("resnet34", 3)}
VT_STEMS = {"timm": 4, "small": 1}  # stem -> its stride; stages 1-3 add 4
STAGE3_WIDTH = 256


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, HW, C), rows in raster order."""
    return x.flatten(2).transpose(1, 2)


class SpatialSoftmax(nn.Module):
    """softmax_HW: scores (B, HW, L) -> each token's weights over the map's positions (B, HW, L), positions not
    `visible` (B, HW) getting none. A module (with no weights) so that a forward hook can read each token's
    spatial attention (mpp.analysis.visual_tokens)."""

    def forward(self, scores: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        if visible is not None:
            scores = scores.masked_fill(~visible.unsqueeze(-1), float("-inf"))
        return scores.softmax(dim=1)


class FilterTokenizer(nn.Module):
    def __init__(self, width: int, tokens: int):
        super().__init__()
        self.W_A = nn.Linear(width, tokens, bias=False)
        self.spatial_softmax = SpatialSoftmax()

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        return spatial_pool(self.spatial_softmax(self.W_A(x), visible), x)


class RecurrentTokenizer(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.W_TR = nn.Linear(width, width, bias=False)
        self.spatial_softmax = SpatialSoftmax()

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        w_r = self.W_TR(tokens)  # (B, L, C): T_in W_T->R, one row of scoring weights per token
        return spatial_pool(self.spatial_softmax(torch.einsum("bnc,blc->bnl", x, w_r), visible), x)


def spatial_pool(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Tokens (B, L, C): each the mean of the rows of x (B, HW, C) under its weights over the positions (B, HW, L)."""
    return torch.einsum("bnl,bnc->blc", weights, x)


class TokenTransformer(nn.Module):
    def __init__(self, width: int, drop_path: float = 0.0):
        super().__init__()
        self.K = nn.Linear(width, width, bias=False)
        self.Q = nn.Linear(width, width, bias=False)
        self.F1 = nn.Linear(width, width, bias=False)
        self.F2 = nn.Linear(width, width, bias=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        attn = torch.einsum("blc,bmc->blm", self.K(t), self.Q(t)).softmax(dim=-1)
        t = t + self.drop_path(attn @ t)
        return t + self.drop_path(self.F2(torch.relu(self.F1(t))))


class Projector(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.W_Q = nn.Linear(width, width, bias=False)
        self.W_K = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        attn = torch.einsum("bnc,blc->bnl", self.W_Q(x), self.W_K(t)).softmax(dim=-1)
        return x + attn @ t


class VTBlock(nn.Module):
    """One VT module: tokenizer (filter-based without input tokens, else recurrent), transformer, projector."""

    def __init__(self, width: int, tokens: int, recurrent: bool, drop_path: float = 0.0):
        super().__init__()
        self.tokenizer = RecurrentTokenizer(width) if recurrent else FilterTokenizer(width, tokens)
        self.transformer = TokenTransformer(width, drop_path)
        self.projector = Projector(width)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None, visible: torch.Tensor | None = None):
        """(map rows x (B, HW, C), tokens of the previous module or None) -> (its tokens, the projected map)."""
        if isinstance(self.tokenizer, RecurrentTokenizer):
            tokens = self.tokenizer(x, tokens, visible)
        else:
            tokens = self.tokenizer(x, visible)
        tokens = self.transformer(tokens)
        return tokens, self.projector(x, tokens)


class VTEncoder(nn.Module):
    """VT-ResNet: what is pretrained, probed, fine-tuned and exported, with the encoder contract of vit.py
    (grid, patch_size, width, blocks, masked_grid, pooled_features) and timm's classifier methods."""
    num_prefix_tokens = 0

    def __init__(self, size: str = "vt_r18", img_size: int = 224, in_chans: int = 3, num_classes: int = 0,
                 tokens: int = 16, stem: str = "timm", pos_embed: str = "sincos", global_pool: str = "avg",
                 drop_path_rate: float = 0.0, drop_rate: float = 0.0):
        super().__init__()
        if size not in VT_SIZES:
            raise ValueError(f"unknown VT size {size!r}; choose one of {', '.join(VT_SIZES)}")
        if stem not in VT_STEMS:
            raise ValueError(f"unknown VT stem {stem!r}; choose one of {', '.join(VT_STEMS)}")
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"unknown position embedding {pos_embed!r}; choose one of {', '.join(POS_EMBEDS)}")
        if global_pool != "avg":
            raise ValueError(f"VT classifies the mean of its tokens (global_pool avg), not {global_pool!r}")
        resnet, depth = VT_SIZES[size]
        stride = VT_STEMS[stem] * 4
        if img_size % stride:
            raise ValueError(f"image size {img_size} is not a multiple of VT's stride {stride} (stem {stem})")
        self.img_size, self.patch_size, self.width = img_size, stride, STAGE3_WIDTH
        self.grid = (img_size // stride, img_size // stride)
        self.num_classes, self.embed_dim = num_classes, STAGE3_WIDTH
        self.backbone = timm.create_model(resnet, pretrained=False, num_classes=0, global_pool="", in_chans=in_chans)
        self.backbone.layer4 = nn.Identity()  # replaced by the VT modules
        if stem == "small":
            self.backbone.conv1 = nn.Conv2d(in_chans, self.backbone.conv1.out_channels, 3, stride=1, padding=1,
                                            bias=False)
            nn.init.kaiming_normal_(self.backbone.conv1.weight, mode="fan_out", nonlinearity="relu")  # timm's
            self.backbone.maxpool = nn.Identity()
        self.visibility = mask_aware(self.backbone)
        self.pos_embed = nn.Parameter(sincos_pos_embed(self.grid, self.width, class_token=False),
                                      requires_grad=pos_embed == "learned")
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(VTBlock(self.width, tokens, recurrent=i > 0, drop_path=rates[i])
                                    for i in range(depth))
        self.norm = LayerNorm(self.width)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.width, num_classes) if num_classes else nn.Identity()
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """As timm's models, for the VT modules (they take the visible positions as an argument). Not for the
        mask-aware ResNet: it reads them from a context (sparse.py) that has ended when the backward pass would
        recompute it."""
        self.grad_checkpointing = enable

    # ---- the map and the modules ----
    def feature_map(self, imgs: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The ResNet's stage-3 map as rows (B, HW, C); with `hidden` (B, HW), the hidden positions' pixels kept
        out (they hold 0)."""
        if hidden is None:
            return as_rows(self.backbone.forward_features(imgs))
        visible = ~hidden.view(imgs.shape[0], 1, *self.grid)
        with self.visibility.showing(visible):
            return as_rows(self.backbone.forward_features(self.visibility.hide(imgs)))

    def run_blocks(self, x: torch.Tensor, visible: torch.Tensor | None = None):
        """Map rows (B, HW, C), positions in place -> (every module's tokens (B, L, C), the last projected map)."""
        x = x + self.pos_embed.to(x.dtype)
        tokens, outputs = None, []
        for block in self.blocks:
            run = functools.partial(checkpoint, block) if self.grad_checkpointing else block
            tokens, x = run(x, tokens, visible)
            outputs.append(tokens)
        return outputs, x

    # ---- the encoder contract ----
    def masked_grid(self, imgs: torch.Tensor, hidden: torch.Tensor, mask_token: torch.Tensor,
                    fusion: nn.Module | None = None) -> torch.Tensor:
        """(B, HW, C): the last projector's map for an image whose `hidden` positions hold `mask_token` in the
        stage-3 map and are no token's source."""
        if fusion is not None:
            raise ValueError("VT has no transformer blocks to fuse (model.fuse_blocks)")
        x = self.feature_map(imgs, hidden)
        x = torch.where(hidden.unsqueeze(-1), mask_token.to(x.dtype), x)
        return self.norm(self.run_blocks(x, ~hidden)[1])

    def pooled_features(self, x: torch.Tensor, pool: str, blocks: int) -> torch.Tensor:
        """(B, blocks * C): the mean token of each of the last `blocks` VT modules after the final norm, oldest
        first (pool "mean")."""
        if pool != "mean":
            raise ValueError(f"VT has no class token: pool its tokens' mean, not {pool!r}")
        outputs, _ = self.run_blocks(self.feature_map(x))
        return torch.cat([self.norm(t).mean(1) for t in outputs[-blocks:]], dim=1)

    # ---- timm's classifier interface ----
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last module's tokens (B, L, C), after the final norm."""
        return self.norm(self.run_blocks(self.feature_map(x))[0][-1])

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(tokens.mean(1))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer groups for layer-wise lr decay: stem, the ResNet's blocks, the VT modules (head: last)."""
        return dict(stem=r"^backbone\.(?:conv1|bn1)|^pos_embed",
                    cnn=r"^backbone\.layer(\d+)" if coarse else r"^backbone\.layer(\d+)\.(\d+)",
                    blocks=r"^blocks\.(\d+)")

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def get_classifier(self) -> nn.Module:
        return self.head
