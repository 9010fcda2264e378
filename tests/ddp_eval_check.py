"""Run the evaluation stages in every process of a launch (or alone) and record what each process got.

    accelerate launch --multi_gpu --num_processes 2 tests/ddp_eval_check.py OUT RECIPE key=value ...
    python tests/ddp_eval_check.py OUT RECIPE key=value ...

With the EvalConfig of RECIPE + overrides, each process writes OUT/rank{R}.pt:

  features, labels, keys  extract_features of the val split (with the sample keys)
  probe, head             run_probe's result (without the config) and its head's state dict
  knn                     run_knn's result (without the config)
  online                  OnlineKnn(...).run(encoder) on the same data, and whether the encoder was
                          put back in train mode (it is in train mode when handed over)
  rank, world_size
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(REPO))
    from accelerate.utils import set_seed

    from mpp.config import EvalConfig, OnlineKnnConfig
    from mpp.data import normalizer
    from mpp.evaluation import eval_accelerator, eval_loader
    from mpp.features import extract_features
    from mpp.knn import OnlineKnn, run_knn
    from mpp.linprobe import run_probe
    from mpp.models import frozen_encoder
    from mpp.recipe import load_config

    out, recipe, overrides = Path(argv[0]), argv[1], argv[2:]
    cfg = load_config(EvalConfig, recipe, overrides)
    accelerator = eval_accelerator(cfg)
    record = {"rank": accelerator.process_index, "world_size": accelerator.num_processes}

    set_seed(cfg.seed)  # ckpt=none: the same random encoder in every process and run
    vit, _ = frozen_encoder(cfg.model, cfg.ckpt)
    loader = eval_loader(cfg.data, "val", cfg.model.img_size, accelerator)
    to_input = normalizer(cfg.data.mean, cfg.data.std, accelerator.device)
    record["features"], record["labels"], record["keys"] = extract_features(
        accelerator, vit, loader, to_input, cfg.features.pool, cfg.features.blocks, with_keys=True)

    probe, head = run_probe(cfg)
    record["probe"] = {k: v for k, v in probe.items() if k != "config"}
    record["head"] = {k: v.cpu() for k, v in head.state_dict().items()}
    record["knn"] = {k: v for k, v in run_knn(cfg).items() if k != "config"}

    online_cfg = OnlineKnnConfig(every=1, data=cfg.data, features=cfg.features, knn=cfg.knn)
    online = OnlineKnn(online_cfg, cfg.model, accelerator, cfg.seed)
    vit.train()
    record["online"] = online.run(vit)
    record["online_restored_train_mode"] = all(m.training for m in vit.modules())

    out.mkdir(parents=True, exist_ok=True)
    torch.save(record, out / f"rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
