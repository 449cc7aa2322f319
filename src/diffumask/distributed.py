"""Which share of the work this process does, read from the launcher's environment.

torchrun and ``accelerate launch`` set ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; each task of an
``srun`` step gets ``SLURM_PROCID`` / ``SLURM_STEP_NUM_TASKS`` / ``SLURM_LOCALID`` (the step's own task count:
a batch script outside ``srun`` also sees ``SLURM_NTASKS`` and ``SLURM_PROCID=0``, and must not take 1/N of
the work). Slurm job arrays give every task rank 0 of 1; launch them through ``srun`` instead. generate and
refine use no collectives: every worker enumerates the same work, takes every ``world_size``-th unit from
``rank`` on, and writes only its own items (and its own manifest shard), so workers never wait for each other
and a job resumes with any number of them. train and filter train across the workers through accelerate's
torch.distributed group, so they need torchrun's or ``accelerate launch``'s variables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .errors import ConfigError

T = TypeVar("T")

#: (rank, world size, local rank) variables, in the order they are looked for.
LAUNCHER_VARIABLES = (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"))


@dataclass(frozen=True)
class Worker:
    """One process of a (possibly single-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def take(self, units: Sequence[T]) -> list[T]:
        """This worker's share of ``units``: every ``world_size``-th from ``rank`` on.

        ``units`` must be the same full list on every worker (all work, finished or not), so the
        shares are disjoint and cover everything however the workers' start times interleave.
        """
        return [unit for index, unit in enumerate(units) if index % self.world_size == self.rank]

    def device(self, device: str) -> str:
        """``cuda`` means this worker's own GPU (``cuda:LOCAL_RANK``) when the job is sharded; where the
        launcher shows each task only its own GPUs (``srun --gpus-per-task``), the local rank wraps."""
        if not (self.sharded and device == "cuda"):
            return device
        import torch

        return f"cuda:{self.local_rank % max(1, torch.cuda.device_count())}"


def current_worker(environ: Mapping[str, str] | None = None) -> Worker:
    """The worker this process is, from torchrun / accelerate / Slurm variables; a lone process is 0 of 1."""
    environ = os.environ if environ is None else environ
    for rank_name, size_name, local_name in LAUNCHER_VARIABLES:
        if rank_name in environ and size_name in environ:
            try:
                rank, size = int(environ[rank_name]), int(environ[size_name])
                local = int(environ.get(local_name, rank))
            except ValueError:
                raise ConfigError(f"{rank_name}={environ[rank_name]!r} / {size_name}={environ[size_name]!r} are "
                                  "not whole numbers; unset them or launch with torchrun or srun") from None
            if not 0 <= rank < size or local < 0:
                raise ConfigError(f"{rank_name}={rank} does not lie in 0..{size_name}-1={size - 1}; "
                                  "check the launcher's settings")
            return Worker(rank, size, local)
    return Worker()


def require_one_process(command: str) -> None:
    """Refuse a launcher for a command that does not shard its work: every worker would do all of it, write the
    same files and, appending to one manifest, list each item once per worker."""
    if current_worker().sharded:
        raise ConfigError(f"{command} runs as one process; run it without torchrun/srun (generate, refine, train "
                          "and filter are the commands that share their work between workers)")


def require_torch_launcher(command: str) -> None:
    """Refuse a sharded job whose workers cannot form a torch.distributed group: ``command`` trains across them
    (accelerate joins torchrun's or ``accelerate launch``'s variables, not Slurm's), and each would otherwise
    train alone and write the same run folder."""
    worker = current_worker()
    if worker.sharded and not all(name in os.environ for name in LAUNCHER_VARIABLES[0]):
        raise ConfigError(f"{command} trains across its {worker.world_size} workers through torch.distributed, which "
                          "needs RANK, WORLD_SIZE and LOCAL_RANK: launch it with torchrun or accelerate launch (under "
                          "Slurm: srun torchrun …, one task per node)")


__all__ = ["Worker", "current_worker", "require_one_process", "require_torch_launcher"]

