"""The batch terms (uniformity, contrastive) under 2-process CPU DDP equal one process holding the whole
global micro-batch: in value (mean over processes) and in gradient (after DDP's average)."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mpp.models.batch_losses import contrastive_loss, uniformity_loss

WORLD, PER_RANK, WIDTH, TEMPERATURE = 2, 4, 6, 0.2


def reference_inputs():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(WORLD * PER_RANK, WIDTH, generator=gen)           # uniformity: one per image
    views = torch.randn(2 * WORLD * PER_RANK, WIDTH, generator=gen)         # contrastive: all first views, then all second
    return features, views


def rank_slices(rank: int):
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    twins = slice(WORLD * PER_RANK + rank * PER_RANK, WORLD * PER_RANK + (rank + 1) * PER_RANK)
    return mine, twins


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        features, views = reference_inputs()
        mine, twins = rank_slices(rank)
        f = features[mine].clone().requires_grad_()
        z = torch.cat([views[mine], views[twins]]).clone().requires_grad_()  # this process's micro-batch
        u, c = uniformity_loss(f), contrastive_loss(z, TEMPERATURE)
        (u + c).backward()
        torch.save({"u": u.detach(), "c": c.detach(), "f_grad": f.grad, "z_grad": z.grad}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_batch_losses")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_values_equal_the_whole_batch_on_one_process(ranks):
    features, views = reference_inputs()
    # Each process scores its own rows against everyone's: the mean over processes is the global loss.
    torch.testing.assert_close(sum(r["u"] for r in ranks) / WORLD, uniformity_loss(features), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sum(r["c"] for r in ranks) / WORLD, contrastive_loss(views, TEMPERATURE),
                               rtol=1e-5, atol=1e-6)
    # And no process alone has it: the gathered columns matter.
    assert all(abs(r["c"] - contrastive_loss(views, TEMPERATURE)) > 1e-3 for r in ranks)


def test_gradients_after_ddp_average_equal_the_whole_batch_on_one_process(ranks):
    features, views = reference_inputs()
    features.requires_grad_()
    views.requires_grad_()
    (uniformity_loss(features) + contrastive_loss(views, TEMPERATURE)).backward()
    for rank, result in enumerate(ranks):
        mine, twins = rank_slices(rank)
        # Gradients come back to each process summed over all processes' losses; DDP then divides by the
        # world size, which is what this comparison does.
        torch.testing.assert_close(result["f_grad"] / WORLD, features.grad[mine], rtol=1e-4, atol=1e-6)
        expected = torch.cat([views.grad[mine], views.grad[twins]])
        torch.testing.assert_close(result["z_grad"] / WORLD, expected, rtol=1e-4, atol=1e-6)
