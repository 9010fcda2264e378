"""Mask-aware convolutional networks (SparK: Tian et al., 2023, "Designing BERT for Convolutional Networks").

A convolution's windows overlap, so a masked pixel would reach the visible positions around it and, through
the next layers, the whole map; a norm's statistics would carry it everywhere at once. `mask_aware(cnn)` makes
a timm CNN keep masked positions out, without changing its weights, keys or unmasked output:
- every convolution and pooling layer's output is set to 0 at masked positions (a "sparse" convolution is a
  dense one whose output is masked again: the next layer reads zeros there, never a masked pixel);
- every norm takes its statistics over the visible positions only, and sets the masked ones to 0.
The input's masked pixels must be zero too (the caller's first step). By induction every visible position
then depends on visible pixels only, and every masked position holds 0.

Which positions are visible is set per forward pass on the shared `Visibility` the converted layers read
(`visibility.showing(visible)`), on the token grid; each layer takes it at its own resolution. With nothing
set, the layers are timm's own.
"""
from __future__ import annotations

import contextlib

import torch
from timm.layers import GroupNormAct
from torch import nn


class Visibility:
    """The visible positions of the batch a mask-aware CNN is encoding: (B, 1, h, w) bool on the token grid
    (every map of the CNN has a multiple of its resolution), or None: everything visible."""

    def __init__(self):
        self.grid: torch.Tensor | None = None

    @contextlib.contextmanager
    def showing(self, visible: torch.Tensor | None):
        self.grid = visible
        try:
            yield
        finally:
            self.grid = None

    def at(self, x: torch.Tensor) -> torch.Tensor | None:
        """(B, 1, H, W) bool at the resolution of the map x (B, C, H, W); None when nothing is hidden."""
        if self.grid is None:
            return None
        (h, w), (H, W) = self.grid.shape[-2:], x.shape[-2:]
        if H % h or W % w:
            raise ValueError(f"a {H}x{W} map of the CNN is not a multiple of the {h}x{w} mask grid")
        return self.grid.repeat_interleave(H // h, dim=2).repeat_interleave(W // w, dim=3)

    def hide(self, x: torch.Tensor) -> torch.Tensor:
        visible = self.at(x)
        return x if visible is None else torch.where(visible, x, 0.0)

    def hide_output(self, _module, _args, output: torch.Tensor) -> torch.Tensor:
        """A forward hook (a bound method, so a deep copy of the CNN hooks its own copy of this object)."""
        return self.hide(output)


class SparseGroupNormAct(GroupNormAct):
    """timm's GroupNormAct with each image's group statistics over its visible positions."""
    visibility: Visibility

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        visible = self.visibility.at(x)
        if visible is None:
            return super().forward(x)
        b, c, h, w = x.shape
        groups = x.float().view(b, self.num_groups, c // self.num_groups, h * w)
        weight = visible.view(b, 1, 1, h * w).float()
        count = weight.sum(-1, keepdim=True) * (c // self.num_groups)
        mean = (groups * weight).sum((2, 3), keepdim=True) / count
        var = ((groups - mean).pow(2) * weight).sum((2, 3), keepdim=True) / count
        y = ((groups - mean) * torch.rsqrt(var + self.eps)).view(b, c, h, w)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        y = self.act(self.drop(y.to(x.dtype)))
        return torch.where(visible, y, 0.0)


class SparseBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose batch statistics (and so its running statistics) cover the visible positions only."""
    visibility: Visibility

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        visible = self.visibility.at(x)
        if visible is None:
            return super().forward(x)
        if self.training or not self.track_running_stats:
            weight = visible.float()
            count = weight.sum()
            xf = x.float()
            mean = (xf * weight).sum((0, 2, 3)) / count
            var = ((xf - mean.view(1, -1, 1, 1)).pow(2) * weight).sum((0, 2, 3)) / count
            if self.training and self.track_running_stats:
                self._update_running_stats(mean.detach(), var.detach() * count / (count - 1).clamp(min=1))
        else:
            mean, var = self.running_mean, self.running_var
        y = (x.float() - mean.view(1, -1, 1, 1)) * torch.rsqrt(var.view(1, -1, 1, 1) + self.eps)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return torch.where(visible, y.to(x.dtype), 0.0)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        # nn.BatchNorm2d's rule: momentum, or the cumulative average when momentum is None.
        self.num_batches_tracked += 1
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(var.to(self.running_var.dtype), momentum)


SPARSE_NORMS = {GroupNormAct: SparseGroupNormAct, nn.BatchNorm2d: SparseBatchNorm2d}
MASKED_OUTPUTS = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


def mask_aware(cnn: nn.Module) -> Visibility:
    """Make `cnn` (a timm ResNet or ResNetV2, in place) keep masked positions out; returns the Visibility its
    layers read. Norms become their sparse subclass (the same module, its class swapped as torch's
    convert_sync_batchnorm swaps norms, but keeping the object: parameters, buffers and keys stay as they are);
    convolutions and pools get a forward hook that masks their output. A layer of another kind that mixes
    positions would let the mask through: it is refused."""
    visibility = Visibility()
    for name, module in cnn.named_modules():
        if type(module) in SPARSE_NORMS:
            module.__class__ = SPARSE_NORMS[type(module)]
            module.visibility = visibility
        elif isinstance(module, MASKED_OUTPUTS):
            module.register_forward_hook(visibility.hide_output)
        elif isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.modules.pooling._MaxPoolNd,
                                 nn.modules.pooling._AvgPoolNd, nn.modules.conv._ConvNd)):
            raise TypeError(f"{name}: {type(module).__name__} has no mask-aware form (mpp.models.sparse)")
    return visibility
