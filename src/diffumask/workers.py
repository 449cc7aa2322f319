"""A pool of CPU worker processes for per-item work, with results streamed back in the items' order.

Processes, not threads: the dense CRF (pydensecrf), connected components and the image codecs run
single-threaded and mostly under the GIL. The parent keeps what must stay in one process — the
accelerator (CUDA does not survive a fork) and the dataset's commit (only it appends manifest
lines) — and a bounded number of items is in flight, so memory stays flat however long the run.
"""

from __future__ import annotations

import ctypes
import functools
import multiprocessing
import os
import select
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def available_cores() -> int:
    """The cores this process may run on (its affinity mask: what Slurm or taskset gave it), shared with
    the other processes torchrun started on this node (``LOCAL_WORLD_SIZE``), which see the same mask."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))


def check_workers(workers: int) -> None:
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1 (one is this process alone), got {workers}")


class InlineExecutor(Executor):
    """One worker: each task runs at once in this process, through the same code path as the pool."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as error:  # raised again by .result(), where a pool's would be
            future.set_exception(error)
        return future


#: glibc's mallopt parameters; the largest mmap threshold older glibc versions accept (half their 64 MiB heap).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLDS = (256 << 20, 32 << 20)
_TRIM_THRESHOLD = 512 << 20
#: the user's own malloc settings, which reuse_freed_memory leaves as they are.
_MALLOC_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def reuse_freed_memory() -> bool:
    """Keep freed blocks of up to 256 MiB in this process for the next allocation, instead of glibc's default of
    returning every block above 32 MiB (and, until its threshold adapts, above 128 KiB) to the kernel, which
    then faults in and zeroes the next one page by page. Refinement allocates such blocks per item (the
    AffinityNet's full-size activations are 32 MiB and a page at 512 px, five per image, 128 MiB at 1024 px): a
    worker spent 0.09 of its 0.28 s per 512 px affinity item in the kernel (``bench_refine_512.py``), and a second
    worker brought 1.35× instead of 1.9×. The price: a process keeps the memory of its largest item (at most
    512 MiB freed at the top of its heap) between items. Returns whether it applied: only on Linux with glibc,
    and not where the user set malloc's own variables (``MALLOC_*_``, ``GLIBC_TUNABLES``)."""
    if not sys.platform.startswith("linux") or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(
            name in os.environ for name in _MALLOC_ENVIRONMENT):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    # Both set: glibc stops adapting them. A threshold refused (an older glibc's limit, musl) leaves the trim
    # threshold alone too: set alone, it would freeze glibc's threshold at 128 KiB.
    if not any(mallopt(_M_MMAP_THRESHOLD, threshold) for threshold in _MMAP_THRESHOLDS):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def _worker_setup(parent: int) -> None:
    """Each worker is one core's worth: torch's own thread pool would oversubscribe the machine. ^C reaches
    every process of the terminal's group: the parent stops the run, the workers do not each print a traceback.
    A worker exits when ``parent`` (the process that made the pool) does, however it ends."""
    import torch

    torch.set_num_threads(1)
    reuse_freed_memory()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_after, args=(parent,), name="diffumask-parent-watch", daemon=True).start()


def start_loader(loader: Any) -> Iterator[Any]:
    """``iter(loader)`` (a torch DataLoader) whose worker processes end as ^C ends them on SIGTERM. ``timeout``,
    ``scancel`` and a launcher's teardown signal the command's loader workers with it; killed by the signal, a worker
    made torch raise "DataLoader worker ... is killed by signal" in the parent over its clean stop, a traceback in
    place of the one line. The workers are forked holding SIGTERM until their handler is in place (before it,
    torch's own let a worker die by a SIGTERM that came from anyone but its parent)."""
    loader.worker_init_fn = functools.partial(_loader_worker_setup, loader.worker_init_fn)
    if not hasattr(signal, "pthread_sigmask"):
        return iter(loader)
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _loader_worker_setup(then: Callable[[int], None] | None, worker_id: int) -> None:
    """A loader worker's start (after the loader's own ``worker_init_fn``, ``then``, which runs with SIGTERM still
    held): SIGTERM taken as ^C, on which torch's worker loop ends quietly; one that came since the fork is taken now."""
    if then is not None:
        then(worker_id)
    signal.signal(signal.SIGTERM, _stop_loader_worker)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _stop_loader_worker(signum: int, frame: Any) -> None:
    """Once: a second SIGTERM (launchers repeat it; a ``timeout`` inside a job relays the job's) interrupted the
    worker's own exit, which torch reported in the parent as a worker that "exited unexpectedly"."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _exit_after(parent: int) -> None:
    """Wait for ``parent`` to end, then end this process. A parent killed outright (SIGKILL, an OOM kill, a
    torchrun teardown) left its workers waiting for tasks forever, and with them the forkserver they hold open,
    a third of a GB each: nothing else ever closes their task queue."""
    try:
        handle = os.pidfd_open(parent)  # Linux: readable once the parent has ended, zombie or reaped
    except (AttributeError, OSError):  # elsewhere, or the parent is gone already: ask every second
        while _alive(parent):
            time.sleep(1.0)
    else:
        watch = select.poll()
        watch.register(handle, select.POLLIN)
        watch.poll()
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone (or its number now another user's process)
        return False
    return True


@contextmanager
def cpu_pool(workers: int, preload: Sequence[str] = ()) -> Iterator[Executor]:
    """``workers`` processes, or this process alone for 1; unfinished tasks are dropped on the way out
    (a failure or ^C does not wait for the queue).

    Workers are forked from a fresh forkserver where there is one (forking this process is unsafe once
    it holds torch threads or CUDA), which imports the ``preload`` modules once, so that each worker
    starts in milliseconds rather than importing torch again; elsewhere they are spawned.
    """
    check_workers(workers)
    if workers == 1:
        yield InlineExecutor()
        return
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(preload))
    else:
        context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_setup, initargs=(os.getpid(),))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def ordered(pool: Executor, tasks: Iterable[T], prepare: Callable[[T], Any],
            device: Callable[[T, Any], Any] | None = None, finish: Callable[[Any, Any], Any] | None = None,
            window: int = 8) -> Iterator[tuple[T, Any]]:
    """``(task, result)`` in the order of ``tasks``: ``prepare(task)`` runs in the pool, then
    ``device(task, prepared)`` here (the accelerator's part; skipped when None), then
    ``finish(prepared, device's result)`` in the pool (when given); at most ``window`` tasks in flight.

    The parent takes each prepared task as soon as it is ready and leaves the finishing ones running,
    so the pool never idles while the parent waits for the oldest task.
    """
    source = iter(tasks)
    preparing: deque[tuple[T, Future]] = deque()
    finishing: deque[tuple[T, Future]] = deque()
    exhausted = False
    while True:
        while not exhausted and len(preparing) + len(finishing) < window:
            task = next(source, _END)
            if task is _END:
                exhausted = True
            else:
                preparing.append((task, pool.submit(prepare, task)))
        if finishing and (finishing[0][1].done() or not preparing):
            task, future = finishing.popleft()
            yield task, future.result()
        elif not preparing:
            return
        elif finishing and not preparing[0][1].done():
            wait([preparing[0][1], finishing[0][1]], return_when=FIRST_COMPLETED)
        else:
            task, future = preparing.popleft()
            prepared = future.result()
            out = prepared if device is None else device(task, prepared)
            if finish is None:
                future = Future()
                future.set_result(out)
            else:
                future = pool.submit(finish, prepared, out)
            finishing.append((task, future))


_END: Any = object()

__all__ = ["InlineExecutor", "available_cores", "check_workers", "cpu_pool", "ordered", "reuse_freed_memory",
           "start_loader"]
