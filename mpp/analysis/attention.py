"""Where a ViT's heads look: attention maps read from timm's own computation, and what the ViT paper and
attention-rollout draw from them.

The maps are the softmax probabilities timm's `Attention` passes through its `attn_drop` (the explicit q @ k
path; the fused kernel never forms them). `attention_hooks` switches every block's attention to that path and
hooks `attn_drop` while it is open, then puts both back, so it can run on a model that is training (and
compiled: nothing it guards on is left changed). timm's `AttentionExtract` does the hooking too, but leaves its
hooks on the model and needs the explicit path set by hand.

The encoder contract: `blocks` (timm blocks, each with one `timm.layers.Attention`), `num_prefix_tokens`
(class and register tokens first), `grid` (tokens per side) and `patch_size` (pixels per token side).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from timm.layers import Attention


def block_attentions(encoder) -> list[Attention] | None:
    """Each block's timm Attention, in depth order; None when a block holds no single one (not a timm ViT)."""
    found = []
    for block in getattr(encoder, "blocks", ()):
        modules = [m for m in block.modules() if isinstance(m, Attention)]
        if len(modules) != 1:
            return None
        found.append(modules[0])
    return found or None


@contextmanager
def attention_hooks(encoder, on_attention: Callable[[int, torch.Tensor], None]):
    """While open, every forward of `encoder` calls on_attention(block index, probabilities (B, heads, T, T))
    for each block, T counting the prefix tokens; reduce them there, as a deep encoder's maps are large."""
    attentions = block_attentions(encoder)
    if attentions is None:
        raise ValueError("the encoder's blocks hold no timm Attention module each: no attention maps to read")
    fused = [a.fused_attn for a in attentions]
    handles = []
    try:
        for index, attention in enumerate(attentions):
            attention.fused_attn = False
            handles.append(attention.attn_drop.register_forward_hook(
                lambda _module, _inputs, probs, index=index: on_attention(index, probs.detach())))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for attention, was in zip(attentions, fused):
            attention.fused_attn = was


def token_centres(grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """(H*W, 2) pixel coordinates of each token's patch centre, raster order (the encoder's token order)."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=-1).float() * patch_size


def mean_distance(probs: torch.Tensor, distances: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ViT paper's mean attention distance of one block: per image and head, the pixel distance from each
    patch query to the patch keys, weighted by its attention, averaged over the queries.

    probs (B, heads, T, T); distances (N, N) between the N = T - prefix patch tokens. The prefix tokens are
    left out as queries and as keys; each query's patch weights are renormalised to sum to 1, so the result is
    a distance wherever a head puts the rest of its attention. Returns (distance (B, heads), the prefix tokens'
    share of the patch queries' attention (B, heads))."""
    patch = probs[..., prefix:, prefix:].float()
    mass = patch.sum(-1)
    per_query = (patch * distances).sum(-1) / mass.clamp(min=1e-12)
    return per_query.mean(-1), (1 - mass).mean(-1)


@torch.no_grad()
def attention_distances(encoder, imgs: torch.Tensor, batch_size: int = 32) -> dict:
    """Mean attention distance (pixels) of every head of every block over `imgs` (normalised, B C H W), and
    the share of attention the patch queries give the prefix (class) tokens: {"distance": [block][head],
    "prefix_share": [block][head], "layer_mean": [block]}, each averaged over the images."""
    prefix = encoder.num_prefix_tokens
    distances = torch.cdist(*(2 * [token_centres(encoder.grid, encoder.patch_size)])).to(imgs.device)
    heads = [a.num_heads for a in block_attentions(encoder) or ()]
    sums = [torch.zeros(2, n, device=imgs.device) for n in heads]

    def add(index: int, probs: torch.Tensor) -> None:
        distance, share = mean_distance(probs, distances, prefix)
        sums[index] += torch.stack([distance.sum(0), share.sum(0)])

    with eval_mode(encoder), attention_hooks(encoder, add):
        for batch in imgs.split(batch_size):
            encoder.forward_features(batch)
    means = [s.cpu() / len(imgs) for s in sums]
    return {"distance": [m[0].tolist() for m in means], "prefix_share": [m[1].tolist() for m in means],
            "layer_mean": [m[0].mean().item() for m in means]}


def distance_metrics(encoder, imgs: torch.Tensor) -> dict[str, float]:
    """{"attention_distance_<block>": the block's mean attention distance (pixels) over its heads} on `imgs`,
    block 0-based: what pretraining logs to watch heads go local or global."""
    return {f"attention_distance_{i}": d for i, d in enumerate(attention_distances(encoder, imgs)["layer_mean"])}


def rollout(head_means: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): each block's head-averaged attention (B, T, T) mixed half and
    half with the identity (the residual path), rows renormalised, multiplied from the first block to the last.
    Returns (B, T, T): how much each output token draws on each input token."""
    eye = torch.eye(head_means[0].shape[-1], device=head_means[0].device)
    total = eye.expand_as(head_means[0])
    for attn in head_means:
        mixed = 0.5 * attn + 0.5 * eye
        total = (mixed / mixed.sum(-1, keepdim=True)) @ total
    return total


@torch.no_grad()
def class_token_maps(encoder, imgs: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """{"last": the last block's class-token attention over the patches, mean of the heads; "rollout": the class
    token's row of the attention rollout over the patches}, each (B, H, W) summing to 1 per image; None when
    the encoder has no class token."""
    if not getattr(encoder, "has_class_token", False) or getattr(encoder, "cls_token", None) is None:
        return None
    prefix, (h, w) = encoder.num_prefix_tokens, encoder.grid
    head_means: list[torch.Tensor | None] = [None] * len(encoder.blocks)

    def keep(index: int, probs: torch.Tensor) -> None:
        head_means[index] = probs.float().mean(1)

    with eval_mode(encoder), attention_hooks(encoder, keep):
        encoder.forward_features(imgs)
    maps = {"last": head_means[-1][:, 0, prefix:], "rollout": rollout(head_means)[:, 0, prefix:]}
    return {name: (m / m.sum(-1, keepdim=True)).reshape(-1, h, w) for name, m in maps.items()}


@contextmanager
def eval_mode(module):
    """Eval mode inside (no dropout, no drop path), each submodule's own mode put back after."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training
