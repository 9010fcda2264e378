"""The streaming loader: an exact per-epoch plan over shard slices, resumable mid-epoch.

Plan (a pure function of the shard counts, seed, epoch, rank, world size, worker count, batch size):

* Epoch e permutes the shards with an RNG seeded by (seed, e) (training; evaluation keeps their
  order) and concatenates their samples into one global sequence of N samples.
* Training: every rank yields n = floor(N / (world x batch)) batches (the tail is dropped; it differs
  from epoch to epoch as the shard order does). Rank r reads the contiguous range
  [r n B, (r+1) n B) of the sequence; inside the rank, worker w of K takes n//K + (w < n%K) batches
  and a contiguous sub-range of the rank's range. A worker's work is a list of shard slices
  (url, skip, take), so several workers (or ranks) can share one shard: fewer shards than
  ranks x workers needs no resampling and cannot hang.
* Evaluation: ranks take contiguous ranges differing by at most one sample, and each yields
  ceil(ceil(N / world) / batch) batches of exactly `batch` entries; entries past its range are
  padding with valid=False. Gathering the batches of all ranks and keeping the valid entries
  counts every sample exactly once.
* The DataLoader asks its workers for batches in turn, so batch b of a rank is batch b // K of
  worker b % K; the loader checks this on every batch.

Training shuffles each worker's raw (undecoded) samples through a buffer seeded by (seed, epoch,
rank, worker), then decodes, transforms and batches inside the worker. Each sample's crop and flip
are drawn from an RNG seeded by (seed, epoch, sample key) alone, so the pixels of a sample in an
epoch do not depend on where in the stream it lands, on the worker or on where a run resumed. Batch j of a worker is
always made of shuffle outputs j*B .. (j+1)*B-1: a corrupt sample is replaced by a repeat of a
good one of the same batch (the previous good batch's, if none is good), and a worker whose shards
hold fewer samples than planned (truncated tar, short shard) fills its last batches the same way,
so the batch count per rank never changes. Repeats and skipped samples are counted.

Resume: `state_dict()` holds the epoch and the batches consumed in it (the same on every rank, so
the main process's copy serves all ranks). After `load_state_dict()`, each worker replays its
epoch's plan, pulls the consumed batches' raw samples through the shuffle buffer without decoding
them, and goes on from there: the batches, keys and pixels, are exactly those the uninterrupted run
would have yielded.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .decode import MODES, CropTransform, build_transform, image_bytes, warn_if_no_region_decoder
from .ring import BatchRing
from .shards import SliceStats, count_samples, estimate_counts, read_slice, resolve_shards

log = logging.getLogger("mpp.data")

STATE_VERSION = 1


def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints and strings (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def split_batches(n: int, workers: int) -> list[int]:
    return [n // workers + (w < n % workers) for w in range(workers)]


def consumed_by_worker(consumed: int, workers: int, worker: int) -> int:
    """Batches of `worker` among the first `consumed` batches of a rank (batch b is worker b % K's)."""
    return consumed // workers + (worker < consumed % workers)


@dataclass(frozen=True)
class Slice:
    url: str
    skip: int
    take: int


@dataclass
class WorkerPlan:
    worker: int
    batches: int        # batches this worker yields in the epoch
    samples: int        # real samples planned for it (eval: may be fewer than batches x batch_size)
    slices: list[Slice]


class EpochPlan:
    """Which shard slices each worker of this rank reads in one epoch, and how many batches it yields."""

    def __init__(self, urls, counts, *, epoch: int, seed: int, rank: int, world_size: int, workers: int,
                 batch_size: int, training: bool):
        self.urls, self.counts = list(urls), list(counts)
        self.epoch, self.rank, self.world_size, self.workers = epoch, rank, world_size, workers
        self.batch_size, self.training = batch_size, training
        total = sum(self.counts)
        self.total = total
        if training:
            order = list(range(len(self.urls)))
            random.Random(derive_seed(seed, epoch, "shards")).shuffle(order)
            n = total // (world_size * batch_size)
            rank_start, rank_len = rank * n * batch_size, n * batch_size
        else:
            order = list(range(len(self.urls)))
            base, extra = divmod(total, world_size)
            rank_start, rank_len = rank * base + min(rank, extra), base + (rank < extra)
            n = -(-(-(-total // world_size)) // batch_size)  # ceil(ceil(N / W) / B)
        self.order, self.batches, self.rank_start, self.rank_len = order, n, rank_start, rank_len
        offsets = np.cumsum([0] + [self.counts[i] for i in order])
        self.worker_plans = []
        first = 0
        for w, nw in enumerate(split_batches(n, workers)):
            lo = min(first * batch_size, rank_len)
            hi = min((first + nw) * batch_size, rank_len)
            slices = self._slices(order, offsets, rank_start + lo, rank_start + hi)
            self.worker_plans.append(WorkerPlan(w, nw, hi - lo, slices))
            first += nw

    def _slices(self, order, offsets, start: int, stop: int) -> list[Slice]:
        out = []
        if stop <= start:
            return out
        i = int(np.searchsorted(offsets, start, side="right")) - 1
        pos = start
        while pos < stop and i < len(order):
            shard_start, shard_stop = int(offsets[i]), int(offsets[i + 1])
            if shard_stop > pos:
                take = min(stop, shard_stop) - pos
                out.append(Slice(self.urls[order[i]], pos - shard_start, take))
                pos += take
            i += 1
        return out


def shuffled(samples, bufsize: int, rng: random.Random, initial: int = 100):
    """webdataset's shuffle buffer (fills two for one until full), drawing from `rng`."""
    samples = iter(samples)
    initial = min(initial, bufsize)
    buf = []

    def pick():
        k = rng.randrange(len(buf))
        buf[k], buf[-1] = buf[-1], buf[k]
        return buf.pop()

    for sample in samples:
        buf.append(sample)
        if len(buf) < bufsize:
            nxt = next(samples, None)
            if nxt is not None:
                buf.append(nxt)
        if len(buf) >= initial:
            yield pick()
    while buf:
        yield pick()


def _label(sample) -> int:
    raw = sample.get("cls")
    if raw is None:
        return -1
    try:
        return int(raw.decode().strip() if isinstance(raw, bytes) else raw)
    except ValueError:
        return -1


def augment_seed(seed: int, epoch: int, key: str) -> int:
    """The seed of one sample's crop and flip in one epoch: independent of the rank, the worker and the
    sample's place in the stream, so a resumed epoch draws exactly the crops the uninterrupted one did."""
    return derive_seed(seed, epoch, key, "augment")


@contextlib.contextmanager
def seeded_global_rng(seed: int, restore: bool):
    """The global random / numpy / torch (CPU) RNGs seeded with `seed` for a call: timm's transforms draw from
    them. restore=True puts the caller's states back afterwards (in the main process, the trainer's draws
    must not move)."""
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state()) if restore else None
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that reseeds the GPUs' generators too
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


def batch_buffer_spec(transform, batch_size: int) -> tuple[tuple, torch.dtype]:
    """(shape, dtype) of a batch's image buffer: (B, S, S, 3) for channels-last transforms."""
    size = transform.size
    shape = (batch_size, size, size, 3) if transform.channels_last else (batch_size, 3, size, size)
    return shape, transform.dtype


class EpochDataset(IterableDataset):
    """One epoch of one rank, from batch `start_batch` on; each DataLoader worker plays one planned worker."""

    def __init__(self, plan: EpochPlan, transform, *, seed: int, start_batch: int, shuffle_buffer: int,
                 ring: BatchRing | None = None):
        self.plan, self.transform, self.seed = plan, transform, seed
        self.start_batch, self.shuffle_buffer = start_batch, shuffle_buffer
        self.ring = ring  # the DataLoader workers' batch buffers (see ring.py); None: fresh ones per batch

    def __iter__(self):
        plan, K, B = self.plan, self.plan.workers, self.plan.batch_size
        info = get_worker_info()
        # Rotated so that DataLoader worker 0, asked first, holds batch `start_batch` of the rank.
        worker = ((info.id if info is not None else 0) + self.start_batch) % K
        wplan = plan.worker_plans[worker]
        done = consumed_by_worker(self.start_batch, K, worker)
        if done >= wplan.batches:
            return
        tag = (self.seed, plan.epoch, plan.rank, plan.world_size, K, worker)
        stats = SliceStats()
        raw = self._raw(wplan.slices, stats, tag)
        last_chunk = None
        for _ in range(done):  # consumed batches: through the shuffle buffer, not decoded
            chunk = list(itertools.islice(raw, B))
            last_chunk = chunk or last_chunk
        reported_missing = stats.missing
        in_worker = info is not None

        pool, pool_chunk = None, last_chunk  # good samples to repeat when a batch has none of its own
        for j in range(done, wplan.batches):
            chunk = list(itertools.islice(raw, B))
            slot = None
            if self.ring is not None and info is not None:  # a worker: fill a shared buffer of the ring
                slot, buffer = self.ring.take(info.id)
            else:
                shape, dtype = batch_buffer_spec(self.transform, B)
                buffer = torch.empty(shape, dtype=dtype)
            images = buffer.permute(0, 3, 1, 2) if self.transform.channels_last else buffer
            goods, corrupt = self._decode(chunk, in_worker, images)
            missing, reported_missing = stats.missing - reported_missing, stats.missing
            n, repeated = len(goods), 0
            if plan.training:
                if goods:
                    pool = goods
                elif pool is None:
                    pool = self._fallback_pool(pool_chunk, wplan, in_worker)
                repeated = B - n
                source = goods or pool
                for i in range(repeated):
                    key, label, image = source[i % len(source)]
                    goods.append((key, label, images[n + i].copy_(image)))
            else:
                images[n:].zero_()
            if chunk:
                pool_chunk = chunk
            batch = self._collate(goods, images, worker, j, corrupt + missing, repeated)
            if slot is not None:
                batch["_slot"] = (info.id, slot)
            yield batch

    def _raw(self, slices, stats, tag):
        stream = itertools.chain.from_iterable(read_slice(s.url, s.skip, s.take, stats) for s in slices)
        if self.plan.training and self.shuffle_buffer > 1:
            stream = shuffled(stream, self.shuffle_buffer, random.Random(derive_seed(*tag, "shuffle")))
        return iter(stream)

    def _decode(self, chunk, in_worker: bool, images=None):
        """Decode and transform `chunk` into consecutive slots of `images`: ([(key, label, image)], corrupt count)."""
        goods, corrupt = [], 0
        uses_global_rng = getattr(self.transform, "uses_global_rng", False)
        for sample in chunk:
            data = image_bytes(sample)
            slot = images[len(goods)] if images is not None else None
            try:
                if data is None:
                    raise ValueError("no image in the sample")
                seed = augment_seed(self.seed, self.plan.epoch, sample["__key__"])
                if uses_global_rng:
                    with seeded_global_rng(seed, restore=not in_worker):
                        image = self.transform(data, None, slot)
                else:
                    image = self.transform(data, random.Random(seed), slot)
            except Exception as err:  # noqa: BLE001 - any undecodable sample is skipped and counted
                corrupt += 1
                log.warning("skipped sample %s of %s: %s: %s", sample.get("__key__"), sample.get("__url__"),
                            type(err).__name__, err)
                continue
            goods.append((sample["__key__"], _label(sample), image))
        return goods, corrupt

    def _fallback_pool(self, pool_chunk, wplan, in_worker: bool):
        """Good samples for a worker that has none in its current batch and has yielded none before."""
        if pool_chunk:
            goods, _ = self._decode(pool_chunk, in_worker)
            if goods:
                return goods
        # Nothing readable in this worker's part of the plan: borrow the first readable samples of the rank.
        B = self.plan.batch_size
        slices = [s for w in self.plan.worker_plans for s in w.slices]
        stream = itertools.chain.from_iterable(read_slice(s.url, s.skip, s.take, SliceStats()) for s in slices)
        while True:
            chunk = list(itertools.islice(stream, B))
            if not chunk:
                break
            goods, _ = self._decode(chunk, in_worker)
            if goods:
                return goods
        raise RuntimeError(f"rank {self.plan.rank} could read no sample of its part of the epoch "
                           f"(worker {wplan.worker}'s shards: {sorted({s.url for s in wplan.slices})})")

    @staticmethod
    def _collate(goods, images, worker, index, bad, repeated):
        B, n = len(images), len(goods)
        labels = torch.full((B,), -1, dtype=torch.int64)
        if n:
            labels[:n] = torch.tensor([g[1] for g in goods], dtype=torch.int64)
        valid = torch.zeros(B, dtype=torch.bool)
        valid[:n] = True
        keys = [g[0] for g in goods] + [""] * (B - n)
        return {"image": images, "label": labels, "key": keys, "valid": valid, "bad": bad, "repeated": repeated,
                "_worker": worker, "_index": index}


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class ShardLoader:
    """Batches of one rank from WebDataset shards, epoch by epoch; resumable mid-epoch.

    Iterating yields the rest of the current epoch (all of it after construction or `set_epoch`),
    then moves to the next epoch. Batches are dicts:

      image  uint8 (B, 3, S, S) (pretrain, probe, eval) or normalised float (finetune)
      label  int64 (B,), -1 where the sample has none
      key    list of B sample keys ("" for padding)
      valid  bool (B,): False for evaluation padding and for corrupt samples' slots
      bad    samples this worker skipped (undecodable, or planned but missing) since its last batch
      repeated  entries of the batch that repeat a good sample to make up for skipped ones (training)

    `exact=True` gives any mode the evaluation plan; `augment` passes finetune mode's timm options
    (auto_augment, re_prob) to its transform.
    """

    def __init__(self, spec, *, mode: str = "pretrain", batch_size: int, img_size: int = 224, split: str = "train",
                 num_samples: int | None = None, num_workers: int = 4, shuffle_buffer: int = 5000, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, crop_scale=None, crop_pct: float = 0.875,
                 mean=None, std=None, draft: bool = True, pin_memory: bool | None = None, prefetch_factor: int = 2,
                 epoch: int = 0, exact: bool | None = None, augment: dict | None = None):
        if mode not in MODES:
            raise ValueError(f"loader mode must be one of {', '.join(MODES)}; got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        shards = resolve_shards(spec, split)  # a spec that matches nothing fails here, naming it
        # exact: the evaluation plan (every sample once, in order, padded) whatever the transform; a linear
        # probe with augmentation reads its training split so, with random crops drawn anew each epoch.
        self.spec, self.mode = spec, mode
        self.training = mode in ("pretrain", "probe", "finetune") if exact is None else not exact
        self.urls, self.counts = shards.urls, self._counts(spec, shards, num_samples)
        self.num_samples = sum(self.counts)
        default_rank, default_world = _dist_rank_world()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a world of {self.world_size}")
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.workers = max(1, num_workers)  # the plan's worker count (num_workers=0: one, in this process)
        self.shuffle_buffer = shuffle_buffer if self.training else 0
        self.transform = build_transform(mode, img_size, crop_scale, mean, std, crop_pct, draft, augment)
        if isinstance(self.transform, CropTransform):
            warn_if_no_region_decoder(log)
        self.img_size = img_size
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch_factor = prefetch_factor
        self.epoch, self.batches = epoch, 0
        self.totals = {"bad": 0, "repeated": 0}
        if self.training and len(self) == 0:
            raise ValueError(f"{self.num_samples} samples of {spec!r} do not make one batch of {batch_size} "
                             f"on each of {self.world_size} process(es); lower the batch size")
        if not self.training and self.num_samples == 0:
            raise ValueError(f"shard spec {spec!r} holds no samples")

    @classmethod
    def from_config(cls, data_cfg, *, mode: str, img_size: int, batch_size: int, seed: int, spec=None, **kwargs):
        """From a DataConfig (train spec, split, num_samples, workers, buffer, crop scale, mean/std)."""
        args = dict(split=data_cfg.split, num_samples=data_cfg.num_samples, num_workers=data_cfg.num_workers,
                    shuffle_buffer=data_cfg.shuffle_buffer, mean=data_cfg.mean, std=data_cfg.std)
        if mode == "pretrain":
            args["crop_scale"] = data_cfg.crop_scale
        args.update(kwargs)
        return cls(data_cfg.train if spec is None else spec, mode=mode, batch_size=batch_size, img_size=img_size,
                   seed=seed, **args)

    def _counts(self, spec, shards, num_samples) -> list[int]:
        if shards.counts is not None:
            if num_samples is not None and num_samples != sum(shards.counts):
                log.warning("data.num_samples=%d ignored: the shards' index says %d", num_samples, sum(shards.counts))
            return list(shards.counts)
        if not self.training:  # exact coverage needs exact counts: read them (headers only where it can seek)
            log.info("counting the samples of %d shard(s) of %r (no manifest)", len(shards.urls), spec)
            return [count_samples(u) for u in shards.urls]
        if num_samples is None:
            raise ValueError(f"shard spec {spec!r} has no per-shard sample counts (no data_tools manifest.json or "
                             f"wids shard index): set data.num_samples to the number of samples in it")
        return estimate_counts(len(shards.urls), num_samples)

    # ---- the plan ----

    def plan(self, epoch: int | None = None) -> EpochPlan:
        return EpochPlan(self.urls, self.counts, epoch=self.epoch if epoch is None else epoch, seed=self.seed,
                         rank=self.rank, world_size=self.world_size, workers=self.workers,
                         batch_size=self.batch_size, training=self.training)

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        if self.training:
            return self.num_samples // (self.world_size * self.batch_size)
        return -(-(-(-self.num_samples // self.world_size)) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batches = epoch, 0

    # ---- iteration ----

    def __iter__(self):
        n = len(self)
        if self.batches >= n:
            self.epoch, self.batches = self.epoch + 1, 0
        plan = self.plan()
        start, K = self.batches, self.workers
        ring = None
        if self.num_workers:
            ring = BatchRing(self.num_workers, self.prefetch_factor + 1,
                             *batch_buffer_spec(self.transform, self.batch_size))
        dataset = EpochDataset(plan, self.transform, seed=self.seed, start_batch=start,
                               shuffle_buffer=self.shuffle_buffer, ring=ring)
        # Its own generator: creating the iterator draws seeds, which must not move the caller's global RNG.
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, self.rank, start, "loader"))
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor if self.num_workers else None,
                            persistent_workers=False, generator=generator)
        try:
            for b, batch in enumerate(loader, start):
                worker, index = batch.pop("_worker"), batch.pop("_index")
                if "_slot" in batch:
                    batch["image"] = ring.receive(*batch.pop("_slot"), batch["image"])
                if (worker, index) != (b % K, b // K):
                    raise RuntimeError(f"batch {b} came from worker {worker} (its batch {index}), expected worker "
                                       f"{b % K} (batch {b // K}): the DataLoader did not take workers in turn")
                self.batches = b + 1
                self.totals["bad"] += batch["bad"]
                self.totals["repeated"] += batch["repeated"]
                yield batch
        finally:
            if ring is not None:
                ring.release_all()
        if self.batches != n:
            raise RuntimeError(f"epoch {self.epoch} ended after {self.batches} of {n} batches")
        self.epoch, self.batches = self.epoch + 1, 0

    def forever(self):
        """Batches across epochs, without end."""
        while True:
            yield from self

    # ---- resume ----

    def state_dict(self) -> dict:
        """Where this loader is: the epoch and the batches consumed in it (the same on every rank)."""
        epoch, batches = self.epoch, self.batches
        if batches >= len(self):
            epoch, batches = epoch + 1, 0
        return {"version": STATE_VERSION, "mode": self.mode, "epoch": epoch, "batches": batches,
                "batches_per_epoch": len(self), "seed": self.seed, "world_size": self.world_size,
                "workers": self.workers, "batch_size": self.batch_size, "num_samples": self.num_samples,
                "num_shards": len(self.urls), "shuffle_buffer": self.shuffle_buffer}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`: exactly where it left off when the layout is the same; otherwise at the same
        fraction of the epoch, with a warning (the samples of that epoch then repeat or drop some)."""
        epoch, batches = int(state["epoch"]), int(state["batches"])
        same = {k: state.get(k) for k in ("seed", "world_size", "workers", "batch_size", "num_samples",
                                          "num_shards", "shuffle_buffer")}
        mine = {k: getattr(self, k) if k not in ("num_shards",) else len(self.urls) for k in same}
        changed = {k: (same[k], mine[k]) for k in same if same[k] != mine[k]}
        if changed and batches:
            old_n = int(state.get("batches_per_epoch") or 0)
            new = round(batches / old_n * len(self)) if old_n else 0
            warnings.warn(
                "resuming the loader with a different layout ("
                + ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
                + f"): epoch {epoch} restarts at the same fraction, batch {new} of {len(self)} "
                  f"(was {batches} of {old_n}); some of its samples may repeat or be left out", stacklevel=2)
            batches = new
        if batches >= len(self):
            epoch, batches = epoch + 1, 0
        self.epoch, self.batches = epoch, batches
