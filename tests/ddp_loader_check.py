"""Run ShardLoader epochs in every process of a multi-process launch and record what each rank saw.

    accelerate launch --multi_gpu --num_processes 2 tests/ddp_loader_check.py OUT SCENARIOS_JSON

SCENARIOS_JSON is a list of {"name", "spec", "split", "mode", "batch", "workers", "img_size", "num_samples"}. For each,
every process iterates one epoch of its rank and writes to OUT/rank{R}.json, under the scenario's name:

  batches   the keys of each batch, in order
  valid     per batch, the valid flags
  gathered  (evaluation) the valid keys of all ranks, gathered batch by batch with torch.distributed,
            as an evaluation loop would
  rank, world_size  what the loader took from torch.distributed

After every training batch the processes all-reduce a tensor, as DDP does: unequal batch counts
would hang here (the test's timeout catches it).
"""
from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import PartialState

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    out, scenarios = Path(argv[0]), json.loads(argv[1])
    sys.path.insert(0, str(REPO))
    from mpp.data import ShardLoader

    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    state = PartialState(cpu=cpu, timeout=timedelta(seconds=60))
    assert dist.is_initialized() and dist.get_world_size() == state.num_processes
    record = {}
    for sc in scenarios:
        loader = ShardLoader(sc["spec"], mode=sc["mode"], split=sc.get("split", "train"), batch_size=sc["batch"],
                             img_size=sc.get("img_size", 16), num_workers=sc["workers"], shuffle_buffer=100, seed=11,
                             num_samples=sc.get("num_samples"))
        rec = {"rank": loader.rank, "world_size": loader.world_size, "batches": [], "valid": [], "gathered": [],
               "len": len(loader)}
        for batch in loader:
            rec["batches"].append(batch["key"])
            rec["valid"].append(batch["valid"].tolist())
            if sc["mode"] == "eval":
                # Pad-and-mask: the same shape on every rank, so tensors gather; keep the valid entries.
                valid = [torch.zeros_like(batch["valid"]) for _ in range(state.num_processes)]
                dist.all_gather(valid, batch["valid"])
                keys = [None] * state.num_processes
                dist.all_gather_object(keys, batch["key"])
                rec["gathered"] += [k for ks, vs in zip(keys, valid) for k, v in zip(ks, vs.tolist()) if v]
            else:
                dist.all_reduce(torch.ones(1))  # a DDP step: every rank must get here as often
        record[sc["name"]] = rec
    dist.barrier()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{state.process_index}.json").write_text(json.dumps(record))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
