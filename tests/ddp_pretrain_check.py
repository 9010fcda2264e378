"""Run `mpp.pretrain.train` under a multi-process launcher and record what each process ended with.

    accelerate launch --multi_gpu --num_processes 2 tests/ddp_pretrain_check.py OUT key=value ...

The config is recipes/quickstart.yaml with the given overrides. Each process (named by the
launcher's RANK) writes to OUT:

  rank{R}.pt    {"initial": state dict when training began (after DDP's broadcast),
                 "final": state dict of the model `train` returned}
  rank{R}.json  the launcher's rank and world size, the process index and count mpp's
                accelerate state reports, optimizer steps taken and training forward passes

If mpp's accelerate state does not see the launcher's world size, the process records that and
exits with status 3 before any training step, instead of training a run of its own.

MPP_TEST_SIGTERM_RANK1_AFTER=K: process 1 sends itself SIGTERM after its K-th optimizer step (a stop
that only one process is asked for).
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from torch.optim.optimizer import register_optimizer_step_post_hook

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    out, overrides = Path(argv[0]), argv[1:]

    from mpp.config import PretrainConfig
    from mpp.models import MaskedImageModel
    from mpp.pretrain import train
    from mpp.recipe import load_config

    env_rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = {"env_rank": env_rank, "world_size": world, "optimizer_steps": 0, "train_forwards": 0}
    snapshot: dict = {}
    out.mkdir(parents=True, exist_ok=True)

    def write_info():
        (out / f"rank{env_rank}.json").write_text(json.dumps(info))

    original_forward = MaskedImageModel.forward

    def forward(self, imgs, *args, **kwargs):
        if not snapshot:  # the first forward (FLOP count) comes after accelerator.prepare, before any step
            state = PartialState()
            info.update(num_processes=state.num_processes, process_index=state.process_index,
                        distributed_type=str(state.distributed_type))
            if state.num_processes != world:
                write_info()
                sys.exit(3)
            snapshot.update({k: v.detach().cpu().clone() for k, v in self.state_dict().items()})
        if self.training and torch.is_grad_enabled():
            info["train_forwards"] += 1
        return original_forward(self, imgs, *args, **kwargs)

    stop_after = int(os.environ.get("MPP_TEST_SIGTERM_RANK1_AFTER", "0"))

    def count_step(optimizer, args, kwargs):
        info["optimizer_steps"] += 1
        if env_rank == 1 and info["optimizer_steps"] == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)

    MaskedImageModel.forward = forward
    register_optimizer_step_post_hook(count_step)

    cfg = load_config(PretrainConfig, REPO / "recipes" / "quickstart.yaml", overrides)
    model = train(cfg)

    final = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save({"initial": snapshot, "final": final}, out / f"rank{env_rank}.pt")
    write_info()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
