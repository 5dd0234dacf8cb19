"""Data-parallel Self-NPO over several processes: `torchrun --nproc_per_node N train.py ...`.

torchrun starts N copies of train.py with RANK / WORLD_SIZE / LOCAL_RANK set; `init` joins them into one
process group (nccl on CUDA, gloo on the CPU) and the student is wrapped in PyTorch
DistributedDataParallel, which averages the gradients over ranks during backward.

Each rank gets its own shard of every batch and its own rollout noise, chosen so that N ranks of
--batch-size B compute what one process of --batch-size N x B computes (up to float summation order):
  - data: every rank draws the same global batch of N x B (the same generator state everywhere) and keeps
    rows [rank B, (rank + 1) B) (`ShardedBatches`);
  - noise: inside `self_npo.sharded(rank, N)` each random draw of the rollout and loss is made for the
    global batch and sliced the same way;
  - the loss is a mean over each rank's B rows and DDP averages the gradients over ranks: the gradient of
    the mean over N x B rows.
Only rank 0 writes files (delta, loss.csv, args.json, resume.pt). The authors' batch 80 on 8 GPUs:
`torchrun --nproc_per_node 8 train.py --model sd15 ... --batch-size 10 --grad-accum 1`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place in a data-parallel run."""

    rank: int
    world: int
    local_rank: int
    device: str

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and prints progress."""
        return self.rank == 0


def world_size() -> int:
    """WORLD_SIZE set by torchrun (1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: str) -> Dist | None:
    """Join the process group torchrun set up; None for a single process (nothing changes then).

    device: the --device flag. With CUDA each rank takes cuda:LOCAL_RANK and the nccl backend;
    on the CPU the gloo backend.
    Raises ValueError: CUDA requested but fewer GPUs than ranks on this machine.
    """
    world = world_size()
    if world <= 1:
        return None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"rank {rank} needs cuda:{local_rank} but this machine has {torch.cuda.device_count()} GPUs: "
                             "lower --nproc_per_node or pass --device cpu.")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Dist(rank, world, local_rank, device)


def close(d: Dist | None) -> None:
    if d is not None and dist.is_initialized():
        dist.destroy_process_group()


def mean(value: float, device) -> float:
    """The mean of a float over all ranks (e.g. the logged loss); the value itself in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


class ShardedBatches:
    """This rank's rows of a global batch: `batches` yields `(x0 (W B, ...), cond)`; rows [rank B, (rank + 1) B).

    cond is a tensor `(W B, ...)` or a dict of them (batched entries are sliced, batch-1 entries kept).
    The resumable state is that of the global order (the same on every rank).
    """

    def __init__(self, batches, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self):
        return self

    def _slice(self, x, n: int):
        if isinstance(x, dict):
            return {k: self._slice(v, n) for k, v in x.items()}
        if isinstance(x, torch.Tensor) and x.ndim and x.shape[0] == n:
            b = n // self.world
            return x[self.rank * b : (self.rank + 1) * b]  # (W B, ...) -> (B, ...)
        return x

    def __next__(self):
        x0, cond = next(self.batches)
        n = x0.shape[0]
        if n % self.world:
            raise ValueError(f"a global batch of {n} does not split over {self.world} ranks.")
        return self._slice(x0, n), self._slice(cond, n)

    def state_dict(self):
        return self.batches.state_dict() if hasattr(self.batches, "state_dict") else None

    def load_state_dict(self, state):
        self.batches.load_state_dict(state)
