"""k-nearest-neighbour accuracy of a frozen encoder (DINO's weighted kNN).

    python mpp/knn.py RECIPE ckpt=PATH|none [key=value ...]
    accelerate launch mpp/knn.py recipes/linprobe.yaml ckpt=runs/pretrain data.train=SHARDS

The features of the train split (centre crops) are the bank; each val sample's feature is
compared by cosine similarity (dot product of L2-normalised features) with all of them, and
its k most similar neighbours vote for their class with weight exp(similarity / temperature).
Writes output_dir/knn.json: top1, top5 (fractions), num_eval, the checkpoint, notes and the
resolved config. `OnlineKnn` runs the same inside pretraining every `knn.every` steps.
"""
from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:  # run as a file: import mpp from the repository root
    import _repo_root  # noqa: F401 - mpp/_repo_root.py

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

from mpp import engine
from mpp.classes import class_count
from mpp.config import EvalConfig
from mpp.data import normalizer
from mpp.evaluation import eval_accelerator, eval_loader, require_ckpt, require_data
from mpp.feature_cache import eval_features
from mpp.features import extract_features
from mpp.fileio import write_json
from mpp.models import frozen_encoder
from mpp.recipe import ConfigError, to_dict

SIMILARITY_BUDGET = 2**27  # similarity entries per chunk of queries (512 MB of float32)


@torch.no_grad()
def knn_predict(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, k: int, temperature: float,
                num_classes: int, chunk: int | None = None) -> torch.Tensor:
    """Class scores (N_test, num_classes): the sum of exp(cos / temperature) over each test sample's k most
    similar train samples, per class of those neighbours (DINO's eval_knn). Computed on test_f's device, in
    chunks of `chunk` queries (default: about 512 MB of similarities)."""
    if len(train_f) == 0:
        raise ValueError("kNN needs at least one train feature")
    device = test_f.device
    bank = F.normalize(train_f.to(device, torch.float32), dim=1)
    labels = train_y.to(device)
    queries = F.normalize(test_f.float(), dim=1)
    k = min(k, len(bank))
    chunk = chunk or max(1, min(8192, SIMILARITY_BUDGET // len(bank)))
    scores = []
    for start in range(0, len(queries), chunk):
        similarity = queries[start:start + chunk] @ bank.T
        top, index = similarity.topk(k, dim=1)
        votes = (top / temperature).exp()
        scores.append(torch.zeros(len(top), num_classes, device=device).scatter_add_(1, labels[index], votes))
    return torch.cat(scores) if scores else torch.zeros(0, num_classes, device=device)


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """For each k, how many rows of `scores` have their label among their k highest scores; top-k with k
    past the class count is top-(class count)."""
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = ranked == labels.to(scores.device)[:, None]
    return torch.stack([hits[:, :k].any(dim=1).sum() for k in ks])


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """{"top1": fraction, "top5": ...} (topk_hits over the row count)."""
    n = max(1, len(labels))
    return {f"top{k}": hits / n for k, hits in zip(ks, topk_hits(scores, labels, ks).tolist())}


def knn_accuracy(train_f, train_y, test_f, test_y, knn_cfg, num_classes: int, device) -> dict[str, float]:
    scores = knn_predict(train_f, train_y, test_f.to(device), knn_cfg.k, knn_cfg.temperature, num_classes)
    return topk_accuracy(scores, test_y)


class OnlineKnn:
    """Pretraining's kNN accuracy on a small labelled set (PretrainConfig.knn), every `every` steps.

        knn = OnlineKnn(cfg.knn, cfg.model, accelerator, cfg.seed)   # builds its two loaders once
        metrics.update(knn.run(accelerator.unwrap_model(model).encoder))

    `run` is collective (every process calls it; each gets the same numbers), leaves the encoder's
    train/eval modes as they were and computes nothing with gradients.
    """

    def __init__(self, online_cfg, model_cfg, accelerator, seed: int = 0):
        data = online_cfg.data
        if data.train is None:
            raise ConfigError("knn.every > 0 needs labelled shards for the kNN: set knn.data.train (the bank, split "
                              "knn.data.train_split) and optionally knn.data.val (default: the same spec, split "
                              "knn.data.val_split), e.g. knn.data.train=mpp/sample_data/cifar10; or knn.every=0")
        self.cfg, self.accelerator = online_cfg, accelerator
        self.bank = eval_loader(data, "train", model_cfg.img_size, accelerator, seed=seed)
        self.queries = eval_loader(data, "val", model_cfg.img_size, accelerator, seed=seed)
        self.to_input = normalizer(data.mean, data.std, accelerator.device)
        self.num_classes: int | None = None
        self.counts: dict[str, int] = {}  # samples in the bank and evaluated, at the last run

    def run(self, encoder: torch.nn.Module) -> dict[str, float]:
        """{"knn_top1", "knn_top5"} (fractions) of `encoder` (a timm VisionTransformer, or a model holding one
        as `.encoder`, possibly wrapped by accelerate)."""
        acc, feat = self.accelerator, self.cfg.features
        vit = acc.unwrap_model(encoder)
        vit = getattr(vit, "encoder", vit)
        bank_f, bank_y = extract_features(acc, vit, self.bank, self.to_input, feat.pool, feat.blocks)
        query_f, query_y = extract_features(acc, vit, self.queries, self.to_input, feat.pool, feat.blocks)
        self.counts = {"bank": len(bank_y), "eval": len(query_y)}
        if self.num_classes is None:
            self.num_classes, notes = class_count(self.cfg.data.train, bank_y, query_y)
            for note in notes:
                acc.print(f"note (online kNN): {note}")
        result = knn_accuracy(bank_f, bank_y, query_f, query_y, self.cfg.knn, self.num_classes, acc.device)
        return {"knn_top1": result["top1"], "knn_top5": result["top5"]}


def run_knn(cfg: EvalConfig, recipe: str = "RECIPE") -> dict:
    """The kNN evaluation of an EvalConfig; writes output_dir/knn.json (main process) and returns its dict."""
    require_ckpt(cfg.ckpt, "knn.py", recipe)
    require_data(cfg.data, "knn.py", recipe)
    accelerator = eval_accelerator(cfg)
    start = time.perf_counter()
    notes = [n for n in [engine.precision_note(accelerator, cfg.mixed_precision, "mixed_precision")] if n]
    set_seed(cfg.seed)  # the same random-init encoder on every process
    vit, load_notes = frozen_encoder(cfg.model, cfg.ckpt)
    notes += load_notes
    vit.to(accelerator.device)
    to_input = normalizer(cfg.data.mean, cfg.data.std, accelerator.device)
    bank_loader = eval_loader(cfg.data, "train", cfg.model.img_size, accelerator, seed=cfg.seed)
    query_loader = eval_loader(cfg.data, "val", cfg.model.img_size, accelerator, seed=cfg.seed)
    bank_f, bank_y = eval_features(cfg, accelerator, vit, bank_loader, to_input, cfg.data.train_split)
    query_f, query_y = eval_features(cfg, accelerator, vit, query_loader, to_input, cfg.data.val_split)
    num_classes, class_notes = class_count(cfg.data.train, bank_y, query_y)
    notes += class_notes
    result = knn_accuracy(bank_f, bank_y, query_f, query_y, cfg.knn, num_classes, accelerator.device)
    out = {**result, "num_eval": len(query_y), "num_train": len(bank_y), "num_classes": num_classes,
           "k": cfg.knn.k, "temperature": cfg.knn.temperature, "feature_dim": bank_f.shape[1], "ckpt": cfg.ckpt,
           "notes": notes, "seconds": round(time.perf_counter() - start, 1), "config": to_dict(cfg)}
    if accelerator.is_main_process:
        write_json(Path(cfg.output_dir) / "knn.json", out)
    for note in notes:
        accelerator.print(f"note: {note}")
    accelerator.print(f"kNN (k={cfg.knn.k}, T={cfg.knn.temperature}) of {cfg.ckpt}: top-1 {100 * out['top1']:.2f}%, "
                      f"top-5 {100 * out['top5']:.2f}% on {out['num_eval']} samples; "
                      f"{Path(cfg.output_dir) / 'knn.json'}")
    accelerator.wait_for_everyone()
    return out


def main(argv: list[str] | None = None) -> int:
    return engine.main(run_knn, EvalConfig, __doc__, argv)  # one line per user error, exit 2 for config ones

if __name__ == "__main__":
    sys.exit(main())
