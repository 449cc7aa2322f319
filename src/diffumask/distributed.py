"""Which share of the work this process does, read from the launcher's environment.

torchrun and ``accelerate launch`` set ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; each task of an
``srun`` step gets ``SLURM_PROCID`` / ``SLURM_STEP_NUM_TASKS`` / ``SLURM_LOCALID`` (the step's own task count:
a batch script outside ``srun`` also sees ``SLURM_NTASKS`` and ``SLURM_PROCID=0``, and must not take 1/N of
the work). A job array, or any set of independent jobs on one file system, names each job's share in
``DIFFUMASK_SHARD=INDEX/COUNT`` (``--shard`` of generate and refine sets it), e.g. ``$SLURM_ARRAY_TASK_ID/16``:
the scheduler's own variables are not read, as an array may as well run one whole job per task. A launcher
inside each share splits it further. generate and refine use no collectives: every worker enumerates the same
work, takes every ``world_size``-th unit from ``rank`` on, and writes only its own items (and its own manifest
shard), so workers never wait for each other and a job resumes with any number of them. train and filter train
across the workers through accelerate's torch.distributed group, so they need torchrun's or ``accelerate
launch``'s variables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")

#: (rank, world size, local rank) variables, in the order they are looked for.
LAUNCHER_VARIABLES = (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"))
#: What names one launch, the same on all its workers, by the launcher's rank variable: torchrun's (and accelerate
#: launch's) rendezvous, an srun step. Not MASTER_ADDR: a static rendezvous gives each node the text it was started
#: with (10.0.0.1 on one, node0 on another); two launches on one host take two ports.
LAUNCH_VARIABLES = {"RANK": ("MASTER_PORT", "TORCHELASTIC_RUN_ID"),
                    "SLURM_PROCID": ("SLURM_JOB_ID", "SLURM_STEP_ID")}
#: ``INDEX/COUNT``: this job's share of the work when independent jobs (a job array) split it.
SHARD_VARIABLE = "DIFFUMASK_SHARD"


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


def parse_shard(text: str, name: str = "--shard") -> tuple[int, int]:
    """``INDEX/COUNT`` → (index, count), with 0 ≤ index < count; a one-line error naming ``name`` otherwise."""
    index, slash, count = text.strip().partition("/")
    try:
        parsed = int(index), int(count)
    except ValueError:
        parsed = None
    if not slash or parsed is None or not 0 <= parsed[0] < parsed[1]:
        raise ConfigError(f"{name} {text!r} is not INDEX/COUNT with 0 <= INDEX < COUNT, e.g. 3/16 for the fourth of "
                          "16 shares (in a Slurm array --array=0-15: $SLURM_ARRAY_TASK_ID/16)")
    return parsed


def current_worker(environ: Mapping[str, str] | None = None) -> Worker:
    """The worker this process is, from torchrun / accelerate / Slurm variables and :data:`SHARD_VARIABLE`; a lone
    process is 0 of 1. Worker r of a launcher's N inside share INDEX of COUNT is worker r·COUNT + INDEX of
    COUNT·N: it takes the units u with u mod COUNT = INDEX (the share's) and (u div COUNT) mod N = r, so a share
    is the same whatever launcher runs it, and each share may run a different one."""
    environ = os.environ if environ is None else environ
    inner = launcher_worker(environ)
    if SHARD_VARIABLE not in environ:
        return inner
    index, count = parse_shard(environ[SHARD_VARIABLE], SHARD_VARIABLE)
    return Worker(inner.rank * count + index, count * inner.world_size, inner.local_rank)


def job_terms(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What every worker of one job shares, and a worker of another job beside it does not: the ``--shard`` COUNT
    of independent jobs (each share may run a launcher of its own, which splits it further); else the launcher's
    size and which launch it is (torchrun's rendezvous, the srun step), so a second launch beside the first differs."""
    environ = os.environ if environ is None else environ
    if SHARD_VARIABLE in environ:
        return {"shares": parse_shard(environ[SHARD_VARIABLE], SHARD_VARIABLE)[1]}
    launcher = next((rank for rank, size, _ in LAUNCHER_VARIABLES if rank in environ and size in environ), None)
    launch = {name: environ.get(name) for name in LAUNCH_VARIABLES.get(launcher, ())}
    return {"workers": launcher_worker(environ).world_size, "launch": launch}


def launcher_worker(environ: Mapping[str, str] | None = None) -> Worker:
    """The worker this process is within its launcher (torchrun, accelerate, srun), leaving out any shard."""
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
        raise ConfigError(f"{command} runs as one process; run it without torchrun/srun{_unset_shard()} (generate, "
                          "refine, train and filter are the commands that share their work between workers)")


def _unset_shard() -> str:
    return f" and with {SHARD_VARIABLE} unset" if SHARD_VARIABLE in os.environ else ""


def require_no_shard(command: str) -> None:
    """Refuse :data:`SHARD_VARIABLE` for a command whose workers must meet (train and filter train together)."""
    if SHARD_VARIABLE in os.environ:
        raise ConfigError(f"{command} trains across its workers through torch.distributed, and {SHARD_VARIABLE} "
                          f"(--shard) splits only generate's and refine's work between independent jobs: unset it and "
                          f"run {command} as one job (with torchrun inside it for several GPUs)")


def require_torch_launcher(command: str) -> None:
    """Refuse a sharded job whose workers cannot form a torch.distributed group: ``command`` trains across them
    (accelerate joins torchrun's or ``accelerate launch``'s variables, not Slurm's), and each would otherwise
    train alone and write the same run folder."""
    require_no_shard(command)
    worker = current_worker()
    if worker.sharded and not all(name in os.environ for name in LAUNCHER_VARIABLES[0]):
        raise ConfigError(f"{command} trains across its {worker.world_size} workers through torch.distributed, which "
                          "needs RANK, WORLD_SIZE and LOCAL_RANK: launch it with torchrun or accelerate launch (under "
                          "Slurm: srun torchrun …, one task per node)")


__all__ = ["SHARD_VARIABLE", "Worker", "current_worker", "job_terms", "launcher_worker", "parse_shard",
           "require_no_shard", "require_one_process", "require_torch_launcher"]

