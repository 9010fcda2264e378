"""Loss terms that compare every image of a batch with every other: the same on one process or many.

Under DDP each process holds a slice of the global micro-batch. The features of all processes are
gathered (gradients flow back to the process that made them), each process scores its own rows against
every column, and DDP's average of the gradients then makes the update that of the loss over the whole
global micro-batch, as if one process held it: negatives and pairs come from all processes, as SimCLR
and U-MAE have them on many devices. On one process nothing is gathered.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn


def gather_batch(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(x of every process concatenated in rank order, the offset of this process's rows in it).
    Every process must call it with the same shape (DDP micro-batches are equal)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return torch.cat(dist_fn.all_gather(x)), dist.get_rank() * x.shape[0]


def full_precision(fn):
    """Run a batch term in float32 even under autocast: its B x B similarities are cheap, and bf16's 8-bit
    mantissa would round logits of |cos| / temperature (up to 10-20) by 0.05 or more."""
    @functools.wraps(fn)
    def wrapper(x: torch.Tensor, *args):
        with torch.autocast(x.device.type, enabled=False):
            return fn(x.float(), *args)
    return wrapper


@full_precision
def uniformity_loss(features: torch.Tensor) -> torch.Tensor:
    """U-MAE's regulariser: mean over all pairs (i, j) of the batch of cos(f_i, f_j)^2. 1 when all images
    collapse to one direction; at best max(1/B, 1/width), features spread evenly over as many directions
    as there can be."""
    f = nn.functional.normalize(features, dim=-1)
    everyone, _ = gather_batch(f)
    return (f @ everyone.T).pow(2).mean()


@full_precision
def contrastive_loss(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent over 2B embeddings whose first and second halves are two views of the same B
    images: each view's positive is its twin, its negatives all the other views."""
    z = nn.functional.normalize(z, dim=-1)
    b = z.shape[0] // 2
    first, offset = gather_batch(z[:b])
    second, _ = gather_batch(z[b:])
    everyone, total = torch.cat([first, second]), first.shape[0]  # columns: every first view, then every second
    rows = torch.arange(b, device=z.device) + offset
    own = torch.cat([rows, rows + total])         # this process's views among the columns
    twin = torch.cat([rows + total, rows])
    is_self = torch.zeros(2 * b, 2 * total, dtype=torch.bool, device=z.device)
    is_self[torch.arange(2 * b, device=z.device), own] = True  # a view is not its own negative
    logits = (z @ everyone.T / temperature).masked_fill(is_self, float("-inf"))
    return nn.functional.cross_entropy(logits, twin)
