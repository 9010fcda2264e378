"""Shared-memory batch buffers that loader workers fill and the main process hands back: reused all epoch.

Why: a worker's batch reaches the main process through shared memory, and a fresh shared-memory
buffer per batch (what PyTorch's default collate does too) is page-faulted and zeroed by the
kernel in the worker, then mapped again in the main process: 7.4 ms for a 64 x 224 x 224 x 3
uint8 batch, against 0.6 ms for an ordinary allocation the allocator reuses. On imagewoof320
shards at 224 px one worker made 1,114 img/s with fresh buffers and 1,395 img/s reusing one
(this project's 2-core CPU; `python -m mpp.bench loader`).

How: the main process creates `slots` buffers per worker before the workers start, so it holds
them already and receiving a batch maps nothing new. Each worker takes a free slot (waiting if
the main process still holds all of them), fills it and sends it; the main process copies the
batch out (an ordinary allocation, reused) and gives the slot back. DataLoader keeps at most
`prefetch_factor` batches of a worker in flight, so prefetch_factor + 1 slots never stall it. Shared
memory held: (prefetch_factor + 1) x workers batches, one batch per worker more than fresh buffers
reach at their peak.
"""
from __future__ import annotations

import torch
import torch.multiprocessing as mp


class BatchRing:
    def __init__(self, workers: int, slots: int, shape: tuple, dtype: torch.dtype):
        self.slots = slots
        self.buffers = [[torch.empty(shape, dtype=dtype).share_memory_() for _ in range(slots)]
                        for _ in range(workers)]
        self.free = [mp.SimpleQueue() for _ in range(workers)]
        for queue in self.free:
            for slot in range(slots):
                queue.put(slot)

    def take(self, worker: int) -> tuple[int, torch.Tensor]:
        """(slot, its buffer) for worker `worker` to fill; waits until the main process gives one back."""
        slot = self.free[worker].get()
        return slot, self.buffers[worker][slot]

    def give_back(self, worker: int, slot: int) -> None:
        self.free[worker].put(slot)

    def receive(self, worker: int, slot: int, images: torch.Tensor) -> torch.Tensor:
        """The images of a batch that came in `slot`, copied out of it (already a copy if the DataLoader
        pinned it), and the slot given back to its worker."""
        if not images.is_pinned():
            images = images.clone()  # keeps the buffer's memory layout (channels-last)
        self.give_back(worker, slot)
        return images

    def release_all(self) -> None:
        """Wake every worker that waits for a slot, so that stopping mid-epoch does not wait for them."""
        for worker in range(len(self.free)):
            for slot in range(self.slots):
                self.give_back(worker, slot)
