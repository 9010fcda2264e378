"""Block fusion (MFF: Liu et al., 2023, "Improving Pixel-based MIM by Reducing Wasted Modeling Capability").

The head reads a learned, softmax-weighted sum of the last block's output and those of earlier blocks (each
through its own linear layer) instead of the last block's alone, so that the low-level detail pixel targets ask
for can come from shallow blocks and the deep ones are left for the image's content. Its layers and weights are
pretraining's only, like the head whose input they make."""
from __future__ import annotations

import torch
from timm.models import checkpoint
from torch import nn


class BlockFusion(nn.Module):
    def __init__(self, width: int, depth: int, blocks):
        super().__init__()
        self.blocks = sorted(set(int(i) for i in blocks))
        if not self.blocks or any(not 0 <= i < depth - 1 for i in self.blocks):
            raise ValueError(f"fuse_blocks {list(blocks)}: give blocks 0 to {depth - 2} of the {depth}-block "
                             f"encoder (the last one, {depth - 1}, is always fused)")
        self.proj = nn.ModuleList(nn.Linear(width, width) for _ in self.blocks)
        self.weights = nn.Parameter(torch.ones(len(self.blocks) + 1))  # one per fused block, the last's included

    def forward(self, blocks: nn.Sequential, x: torch.Tensor, checkpointed: bool = False) -> torch.Tensor:
        """Run `blocks` over x, returning the fused output (before the encoder's final norm); `checkpointed`: each
        block's activations recomputed in the backward pass (the encoder's grad_checkpointing)."""
        fused = []
        for i, block in enumerate(blocks):
            x = checkpoint(block, x) if checkpointed else block(x)
            if i in self.blocks:
                fused.append(self.proj[len(fused)](x))
        weights = self.weights.softmax(0)
        return sum(w * f for w, f in zip(weights, fused + [x]))
