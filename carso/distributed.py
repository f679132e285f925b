"""Data-parallel training under `torchrun`, and the same code path as one plain process.

`torchrun --nproc_per_node K -m carso train-classifier ...` starts K copies of the stage; each finds its
rank in the environment torchrun sets. Every process reads the same data and draws the same shuffled
order; each global batch of `batch_size` images is split into K shards (`Team.shard`), so the batch size
in params.yaml means the same thing on one process and on eight GPUs. DistributedDataParallel averages
the gradients, so a step sees the whole global batch. Rank 0 alone logs, monitors and writes files.

Without torchrun (no WORLD_SIZE, or WORLD_SIZE=1) the team is a single process and every helper here
is the identity.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from carso.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Team:
    """The processes training one model together (rank 0 of 1 when there is no torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    backend: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def covers(self, batch_len: int) -> bool:
        """Whether a global batch of `batch_len` points gives every process at least two. The trainings skip
        a last batch that does not: BatchNorm cannot train on a single point, and an empty shard's mean loss
        is NaN, which DistributedDataParallel would average into every process's weights."""
        return batch_len >= 2 * self.size

    def shard(self, items: Sequence | torch.Tensor) -> Sequence | torch.Tensor:
        """This process's share of a global batch: every `size`-th item, starting at `rank`."""
        return items[self.rank::self.size]

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of `values` over the team (the values themselves on one process)."""
        if not self.distributed:
            return [float(v) for v in values]
        device = "cuda" if self.backend == "nccl" else "cpu"  # NCCL reduces GPU tensors only
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.cpu().tolist()

    def describe(self) -> dict[str, int | str]:
        """For the stage's metrics: how many processes trained, over which backend."""
        return {"processes": self.size, "backend": self.backend}


def team_from_env() -> Team:
    """The team torchrun describes in the environment (a single process when it is absent)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return Team()
    return Team(rank=int(os.environ.get("RANK", "0")), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                local_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(size))))


def join(team: Team, device: torch.device) -> Team:
    """Join the process group: NCCL between GPUs, gloo on the CPU. Returns the team with its backend."""
    if not team.distributed:
        return team
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=60)  # rank 0 monitors alone between epochs; the others wait
    dist.init_process_group(backend, timeout=timeout, device_id=device if backend == "nccl" else None)
    joined = Team(team.rank, team.size, team.local_rank, team.local_size, backend)
    if not joined.is_main:  # one log and one progress bar per team
        logging.getLogger().setLevel(logging.WARNING)
    log.info("data-parallel training on %d processes (%s)", team.size, backend)
    return joined


def leave(team: Team) -> None:
    """Wait for every process (rank 0 may still be writing), then leave the group."""
    if team.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def require_single() -> None:
    """Stages other than the two trainings run as one process: refuse a torchrun launch clearly."""
    if team_from_env().distributed:
        raise UserError("this stage runs as a single process; start it with `python -m carso`, not torchrun "
                        "(only train-classifier and train-purifier are data-parallel).")


def parallel(model: nn.Module, team: Team, device: torch.device) -> nn.Module:
    """`model` wrapped for data-parallel training (itself on one process).

    On GPUs, BatchNorm layers become SyncBatchNorm, so the statistics are those of the global batch.
    PyTorch's SyncBatchNorm has no CPU kernel: under gloo each process normalises its own shard and DDP
    broadcasts rank 0's running statistics at every step.
    """
    if not team.distributed:
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
