"""`diffumask refine` at scale: worker processes, the device, training length from epochs, sharding."""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_refine import SIZE, TINY_AFFINITY, dataset, files, template  # noqa: F401 (fixtures)

from diffumask.cli import main
from diffumask.dataset import Dataset
from diffumask.masks.affinity import AffinityConfig
from diffumask.masks.propagate import (grid_affinity_matrix, random_walk, transition_matrix,
                                       transposed_transition, walk)
from diffumask.models import default_device
from diffumask.refine import RefineConfig, refine_dataset
from diffumask.refine_items import item_steps
from diffumask.workers import InlineExecutor, ordered

GAMMAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
PARALLEL_CASES = {
    "otsu + crf": RefineConfig(method="otsu", crf=True),
    "propagate": RefineConfig(method="propagate"),
    "adaptive": RefineConfig(method="adaptive", gammas=GAMMAS, affinity=TINY_AFFINITY),
}


def _refine_lines(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines() if '"refine"' in line]


@pytest.mark.parametrize("config", list(PARALLEL_CASES.values()), ids=list(PARALLEL_CASES))
def test_two_workers_write_what_one_writes(dataset, config):
    """Byte for byte: the masks, and the manifest (refine fields, order) — the AffinityNet's seeds, the
    walks and the CRFs run in worker processes, the commit in this one."""
    root, truths = dataset
    alone = root.parent / "alone"
    shutil.copytree(root, alone)
    one = refine_dataset(alone, config, progress=False, workers=1)
    two = refine_dataset(root, config, progress=False, workers=2)
    assert one.refined == two.refined == len(truths)
    assert files(root, "SegmentationClass") == files(alone, "SegmentationClass")
    assert (root / "manifest.jsonl").read_bytes() == (alone / "manifest.jsonl").read_bytes()
    if config.uses_affinity:
        assert files(root, "refine") == files(alone, "refine")  # the same network, from seeds made by workers


DEVICE_CRF_CASES = {
    "threshold + crf": RefineConfig(method="threshold", crf=True),
    "otsu + crf": RefineConfig(method="otsu", crf=True),
    "propagate + crf": RefineConfig(method="propagate", crf=True),
    "affinity + crf": RefineConfig(method="affinity", crf=True, affinity=TINY_AFFINITY),
}


@pytest.mark.parametrize("config", list(DEVICE_CRF_CASES.values()), ids=list(DEVICE_CRF_CASES))
def test_the_crf_on_the_device_writes_what_the_workers_write(dataset, config):
    """The CRF in torch in this process (where a GPU runs it) against pydensecrf in two worker processes:
    the same masks and manifest lines (otsu's thresholds included)."""
    pytest.importorskip("pydensecrf")
    root, truths = dataset
    in_workers = root.parent / "in-workers"
    shutil.copytree(root, in_workers)
    refine_dataset(in_workers, config, progress=False, workers=2, device_crf=False)
    here = refine_dataset(root, config, progress=False, workers=2, device_crf=True)
    assert here.refined == len(truths)
    assert files(root, "SegmentationClass") == files(in_workers, "SegmentationClass")
    assert (root / "manifest.jsonl").read_bytes() == (in_workers / "manifest.jsonl").read_bytes()


def test_cli_crf_device_puts_the_crf_in_this_process(dataset, monkeypatch):
    """--crf-device device reaches refine as device_crf (the workers' default otherwise), same masks."""
    root, _ = dataset
    seen = []
    monkeypatch.setattr("diffumask.refine.item_steps", lambda *a: seen.append(a[-1]) or item_steps(*a))
    other = root.parent / "other"
    shutil.copytree(root, other)
    assert main(["refine", str(root), "--method", "threshold", "--crf", "--device", "cpu", "--workers", "1"]) in (0, None)
    assert main(["refine", str(other), "--method", "threshold", "--crf", "--device", "cpu", "--workers", "1",
                 "--crf-device", "device"]) in (0, None)
    assert seen == [False, True]
    assert files(root, "SegmentationClass") == files(other, "SegmentationClass")


def test_workers_encode_and_write_the_masks_and_this_process_only_commits(dataset, monkeypatch):
    """With a pool, no mask PNG is encoded in this process (it would be the bottleneck); the result is
    the one-process run's, byte for byte."""
    import diffumask.dataset as dataset_module

    root, truths = dataset
    alone = root.parent / "alone"
    shutil.copytree(root, alone)
    refine_dataset(alone, RefineConfig(method="propagate"), progress=False, workers=1)

    def not_here(mask):
        raise AssertionError("the parent encoded a mask")

    monkeypatch.setattr(dataset_module, "palette_png", not_here)
    assert refine_dataset(root, RefineConfig(method="propagate"), progress=False, workers=2).refined == len(truths)
    assert files(root, "SegmentationClass") == files(alone, "SegmentationClass")
    assert (root / "manifest.jsonl").read_bytes() == (alone / "manifest.jsonl").read_bytes()


@pytest.mark.parametrize("config", [RefineConfig(method="affinity", affinity=TINY_AFFINITY),
                                    RefineConfig(method="adaptive", gammas=GAMMAS, affinity=TINY_AFFINITY),
                                    RefineConfig(method="adaptive", per_class=True, gammas=GAMMAS, affinity=TINY_AFFINITY)],
                         ids=["affinity", "adaptive", "adaptive per class"])
def test_on_a_cpu_the_workers_run_the_affinitynet_and_write_what_this_process_would(dataset, config, monkeypatch):
    """On a CPU the AffinityNet's forward pass and walk run in the workers, from its saved weights (in this
    process they would not scale with the workers); the masks are those of the walk run here, as on a GPU."""
    import diffumask.refine as refine_module
    import diffumask.refine_items as items_module

    root, truths = dataset
    here = root.parent / "here"
    shutil.copytree(root, here)
    accelerator = SimpleNamespace(type="accelerator")  # a device that is not a CPU: the walk runs in this process
    with monkeypatch.context() as patch:
        patch.setattr(refine_module, "item_steps", lambda c, n, g, d, w, crf: item_steps(c, n, g, accelerator, w, crf))
        patch.setattr(refine_module, "curve_steps", lambda c, n, d, w: items_module.curve_steps(c, n, accelerator, w))
        refine_dataset(here, config, progress=False, workers=2, device="cpu")

    def not_here(*args, **kwargs):
        raise AssertionError("this process ran the AffinityNet's walk")

    monkeypatch.setattr(items_module, "walked_grid", not_here)
    assert refine_dataset(root, config, progress=False, workers=2, device="cpu").refined == len(truths)
    assert files(root, "SegmentationClass") == files(here, "SegmentationClass")
    assert _refine_lines(root) == _refine_lines(here)


def test_untrained_affinitynet_weights_are_read_as_they_are_now(dataset, tmp_path):
    """--affinity-steps 0 --affinity-weights W walks with W's current contents, in the workers too: a copy
    or a worker's cached network would serve W's former weights after it is rewritten in place."""
    from diffumask.masks.affinity import build_affinity_net, save_affinity_weights

    root, truths = dataset
    weights = tmp_path / "affinitynet.safetensors"
    stride = TINY_AFFINITY.grid_stride((SIZE, SIZE))

    def refined_with(seed: int, folder: Path) -> dict[str, bytes]:
        save_affinity_weights(build_affinity_net(replace(TINY_AFFINITY, seed=seed, stride=stride), (SIZE, SIZE)), weights)
        config = RefineConfig(method="affinity", affinity=replace(TINY_AFFINITY, train_steps=0),
                              affinity_weights=str(weights))
        refine_dataset(folder, config, progress=False, redo=True, workers=1, device="cpu")  # workers=1: one process
        return files(folder, "SegmentationClass")

    fresh = root.parent / "fresh"
    shutil.copytree(root, fresh)
    first = refined_with(1, root)
    assert refined_with(2, root) == refined_with(2, fresh) != first
    assert not list((root / "refine").glob("*.safetensors"))  # no copy of W to go stale


def test_ordered_keeps_the_order_and_bounds_the_work_in_flight():
    """Results come back in the tasks' order however the pool finishes them, with at most `window`
    tasks read ahead; the device step runs in the caller, between the two pool steps."""
    started: list[int] = []
    lock = threading.Lock()
    caller = threading.get_ident()

    def prepare(task: int) -> int:
        with lock:
            started.append(task)
        time.sleep(0.002 * ((task * 7) % 5))
        return task * 10

    def device(task: int, prepared: int) -> int:
        assert threading.get_ident() == caller
        return prepared + 1

    seen = []
    with ThreadPoolExecutor(3) as pool:
        for task, result in ordered(pool, range(20), prepare, device, lambda prepared, out: (prepared, out), window=4):
            seen.append((task, result))
            assert len(started) <= task + 4
    assert seen == [(t, (10 * t, 10 * t + 1)) for t in range(20)]
    assert list(ordered(InlineExecutor(), range(3), str)) == [(0, "0"), (1, "1"), (2, "2")]


def test_training_length_follows_the_epochs_up_to_the_cap(dataset):
    config = AffinityConfig(epochs=2, batch_size=4)
    assert config.train_steps_for(12) == 6 and config.train_steps_for(13) == 7
    assert replace(config, max_steps=5).train_steps_for(12) == 5
    assert replace(config, train_steps=9).train_steps_for(12) == 9  # a fixed length wins
    assert AffinityConfig().train_steps_for(20_000) == AffinityConfig().max_steps
    root, truths = dataset
    by_epochs = replace(TINY_AFFINITY, train_steps=None, epochs=2, seed_crf=False)
    first = refine_dataset(root, RefineConfig(method="affinity", affinity=by_epochs), progress=False)
    assert first.train_seconds > 0
    record = Dataset(root).records()[0]["refine"]
    assert record["affinity_train_steps"] == 6 and record["affinity"]["epochs"] == 2  # 2 × 12 images / 4
    assert refine_dataset(root, RefineConfig(method="affinity", affinity=by_epochs), progress=False).refined == 0
    capped = RefineConfig(method="affinity", affinity=replace(by_epochs, max_steps=3))
    assert refine_dataset(root, capped, progress=False).train_seconds > 0  # other settings: another network
    assert Dataset(root).records()[0]["refine"]["affinity_train_steps"] == 3
    assert len(list((root / "refine").glob("affinitynet-*.safetensors"))) == 2


def test_the_gpu_walk_computes_the_cpu_walk():
    """The sparse-tensor transition that runs on a GPU, checked here on the CPU against scipy's."""
    torch.manual_seed(0)
    features = torch.randn(8, 12, 10)
    maps = np.random.default_rng(0).random((2, 120)).astype(np.float32)
    expected = random_walk(maps, transition_matrix(grid_affinity_matrix(features, 4), 16.0), 20)
    state = torch.from_numpy(np.ascontiguousarray(maps.T))
    got = walk(transposed_transition(features, 4, 16.0), state, 20).T.numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("extra, fragment", [
    (["--workers", "0"], "--workers must be at least 1"),
    (["--device", "gpu7"], "unknown device 'gpu7'"),
    *([] if torch.cuda.is_available() else [(["--device", "cuda"], "no usable CUDA device")]),
])
def test_bad_workers_or_device_are_one_line_errors_that_change_nothing(dataset, capsys, extra, fragment):
    root, _ = dataset
    before = {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    assert main(["refine", str(root), "--method", "otsu", "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("diffumask: error: ") and fragment in err, err
    assert {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} == before


def test_the_cpu_is_the_default_device_without_cuda(dataset, capsys):
    assert default_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    root, truths = dataset
    assert main(["refine", str(root), "--method", "propagate", "--device", "cpu", "--workers", "1", "--quiet"]) == 0
    assert f"refined {len(truths)} of {len(truths)} items" in capsys.readouterr().out


def test_sharded_workers_refine_disjoint_shares_that_add_up_to_one_run(dataset, monkeypatch):
    """Ranks 0 and 1 of 2, one after the other in one folder: each item refined exactly once, as a
    single process refines it, each rank's lines in its own shard; the last rank merges the shards."""
    root, truths = dataset
    alone = root.parent / "alone"
    shutil.copytree(root, alone)
    manifest = alone / "manifest.jsonl"  # the single process reads its items in another order: the same network
    manifest.write_text("".join(reversed(manifest.read_text().splitlines(keepends=True))))
    config = RefineConfig(method="affinity", affinity=replace(TINY_AFFINITY, seed_crf=False))
    refine_dataset(alone, config, progress=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    shares, shard_lines = [], []
    merge = Dataset.compact

    def merge_and_note(self, *args, **kwargs):
        shard_lines.extend(json.loads(line) for path in self.shard_paths() for line in path.read_text().splitlines())
        return merge(self, *args, **kwargs)

    monkeypatch.setattr(Dataset, "compact", merge_and_note)
    staged = Dataset(root).pending_mask_path(next(iter(truths)))
    leftovers = [staged.with_name(f".{staged.name}.x1.tmp"), root / ".manifest.jsonl.x2.tmp"]  # an earlier kill's
    for path in leftovers:
        path.write_bytes(b"partial")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        shares.append(refine_dataset(root, config, progress=False))
        assert bool(Dataset(root).shard_paths()) == (rank == "0")  # merged once every item is refined
        assert all(path.exists() for path in leftovers) == (rank == "0")  # and only then tidied
    assert [s.refined for s in shares] == [s.share for s in shares] == [(len(truths) + 1) // 2, len(truths) // 2]
    assert shares[0].train_seconds > 0 and shares[1].train_seconds == 0  # rank 1 found rank 0's network
    ids = [r["id"] for r in shard_lines]
    assert sorted(ids) == sorted(truths) and len(ids) == len(set(ids))  # each item exactly once
    assert len(_refine_lines(root)) == len(truths) == len((root / "manifest.jsonl").read_text().splitlines())
    assert files(root, "SegmentationClass") == files(alone, "SegmentationClass")
    assert files(root, "refine") == files(alone, "refine")  # one AffinityNet, trained on the items in one order
    with pytest.raises(Exception, match="--per-class pools every image's curve"):
        refine_dataset(root, RefineConfig(method="adaptive", per_class=True, crf=False), progress=False)
    with pytest.raises(Exception, match="redo=True refines every item again"):  # no worker would merge the shards
        refine_dataset(root, config, progress=False, redo=True)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert refine_dataset(root, config, progress=False).refined == 0  # one process afterwards: all done ...
    assert Dataset(root).records() == Dataset(alone).records()[::-1]  # ... and compacted


def test_a_sharded_worker_finishes_its_own_committed_masks_before_staging_new_ones(dataset, monkeypatch):
    """Rank 0's killed run committed a mask but did not rename it; its next run (other settings) is killed
    before committing that item again. The committed mask must still be what readers get with its line, not
    the new one staged over it (sharded workers cannot recover every pending mask: others may be writing)."""
    import os

    import diffumask.dataset as dataset_module

    root, truths = dataset
    whole = root.parent / "whole"
    shutil.copytree(root, whole)
    refine_dataset(whole, RefineConfig(method="otsu"), progress=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    victim, real_replace = sorted(truths)[0], os.replace

    def no_rename(source, target):
        if str(source).endswith(f".{victim}.pending.png"):
            raise KeyboardInterrupt
        real_replace(source, target)

    monkeypatch.setattr(dataset_module.os, "replace", no_rename)
    with pytest.raises(KeyboardInterrupt):
        refine_dataset(root, RefineConfig(method="otsu"), progress=False)
    monkeypatch.setattr(dataset_module.os, "replace", real_replace)
    real_commit = Dataset.commit_mask

    def dying(self, record, sha256):
        if record["id"] == victim:
            raise KeyboardInterrupt
        real_commit(self, record, sha256)

    monkeypatch.setattr(Dataset, "commit_mask", dying)
    with pytest.raises(KeyboardInterrupt):
        refine_dataset(root, RefineConfig(method="threshold", threshold=0.3), progress=False)
    ds = Dataset(root)
    assert {r["id"]: r for r in ds.records()}[victim]["refine"]["method"] == "otsu"
    np.testing.assert_array_equal(ds.read_mask(victim), Dataset(whole).read_mask(victim))


def test_sharded_refine_splits_items_in_shards_disjointly(dataset, monkeypatch):
    """Items spread over two manifest shards (an unmerged sharded generate): a rank that starts after the
    other has appended still takes a disjoint share, so every item is refined exactly once."""
    root, truths = dataset
    lines = (root / "manifest.jsonl").read_text().splitlines(keepends=True)
    (root / "manifest.0.jsonl").write_text("".join(lines[0::2]))
    (root / "manifest.1.jsonl").write_text("".join(lines[1::2]))
    (root / "manifest.jsonl").unlink()
    monkeypatch.setenv("WORLD_SIZE", "2")
    done = []
    for rank in ("0", "1"):  # rank 1 starts after rank 0 appended its lines to shard 0
        monkeypatch.setenv("RANK", rank)
        done.append(refine_dataset(root, RefineConfig(method="threshold"), progress=False).refined)
    records = Dataset(root).records()
    assert sum(done) == len(truths) == len(records)
    assert all(r.get("rev") == 1 and "refine" in r for r in records)  # each refined once, none twice


def test_pool_workers_leave_an_interrupt_to_the_parent():
    """^C reaches the whole process group: the workers ignore it, so only the parent stops (no traceback each)."""
    import signal

    from diffumask.workers import cpu_pool

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell's background job starts ignoring it
    try:
        with cpu_pool(2) as pool:
            assert pool.submit(signal.getsignal, signal.SIGINT).result() == signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the parent's own stays
    finally:
        signal.signal(signal.SIGINT, previous)


def _faults_of_a_second_large_array(_: object) -> int:
    """Minor page faults of allocating and filling a 64 MiB array once three of that size were freed (torch's
    aligned allocation needs a few bytes more than a freed block of the same size: the second grows the heap),
    in 4 KiB pages (transparent huge pages off: with them a fresh mapping faults 32 times, not 16384)."""
    import ctypes
    import resource

    ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE, for this process
    for _ in range(3):
        torch.ones(64 << 18)  # allocated, filled, freed (torch, unlike numpy, asks for no huge pages)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 << 18)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc parameters")
def test_pool_workers_reuse_freed_memory_instead_of_faulting_it_in_again(monkeypatch):
    """glibc gave every freed block above 32 MiB back to the kernel; the next one was faulted in page by page
    (the AffinityNet's full-size activations at 512 px: a third of an item's time in a worker)."""
    from diffumask.workers import _MALLOC_ENVIRONMENT, cpu_pool, reuse_freed_memory

    for name in ("GLIBC_TUNABLES", *_MALLOC_ENVIRONMENT):
        monkeypatch.delenv(name, raising=False)
    with cpu_pool(2) as pool:
        faults = pool.submit(_faults_of_a_second_large_array, None).result()
        if not pool.submit(reuse_freed_memory).result():  # (asked after: a second call changes nothing)
            pytest.skip("this C library takes no such malloc parameters")
    assert faults < 1024  # 16384 pages of 4 KiB before


def test_reuse_freed_memory_leaves_malloc_alone_where_it_cannot_or_should_not_apply(monkeypatch):
    """An older glibc refuses a mmap threshold above 32 MiB; the trim threshold set alone would freeze glibc's
    adaptive mmap threshold at 128 KiB, a slowdown. A user's own malloc variables win."""
    import ctypes

    from diffumask import workers

    calls = []

    class Libc:
        def __init__(self, accepts):
            self.accepts = accepts

        def mallopt(self, parameter, value):
            calls.append((parameter, value))
            return int(parameter != mmap or value <= self.accepts)

    mmap, trim = workers._M_MMAP_THRESHOLD, workers._M_TRIM_THRESHOLD
    monkeypatch.setattr(sys, "platform", "linux")
    for name in ("GLIBC_TUNABLES", *workers._MALLOC_ENVIRONMENT):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc(accepts=0))  # refuses every threshold (musl)
    assert workers.reuse_freed_memory() is False
    assert [parameter for parameter, _ in calls] == [mmap, mmap]  # both thresholds tried, the trim never set
    calls.clear()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc(accepts=32 << 20))  # an older glibc
    assert workers.reuse_freed_memory() is True
    assert calls == [(mmap, 256 << 20), (mmap, 32 << 20), (trim, 512 << 20)]
    calls.clear()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert workers.reuse_freed_memory() is False and calls == []
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1000000")
    assert workers.reuse_freed_memory() is False and calls == []
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert workers.reuse_freed_memory() is False and calls == []


def test_the_refine_command_reuses_freed_memory_in_its_own_process(dataset, monkeypatch):
    """With --workers 1 (and for a GPU's AffinityNet training) the command's own process does the work."""
    from diffumask import workers

    calls = []
    monkeypatch.setattr(workers, "reuse_freed_memory", lambda: calls.append(1))
    root, _ = dataset
    assert main(["refine", str(root), "--method", "threshold", "--workers", "1", "--quiet"]) == 0
    assert calls == [1]


def test_pool_workers_end_with_the_process_that_made_them(tmp_path):
    """A refine killed outright (SIGKILL; torchrun's teardown) left its pool workers waiting for tasks forever,
    and the forkserver they hold open: about a third of a GB each, until the machine restarts."""
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "killed.py"
    script.write_text("""
import os, signal, sys, time
from pathlib import Path
from diffumask.workers import cpu_pool

def pids(_):  # each task waits for the other worker's, so both workers start however slowly one does
    here = Path(sys.argv[1])
    (here / str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while len(list(here.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    return os.getpid(), os.getppid()

if __name__ == "__main__":
    with cpu_pool(2) as pool:
        print(*{p for pair in pool.map(pids, range(2)) for p in pair}, flush=True)
        pool.submit(time.sleep, 60)
        os.kill(os.getpid(), signal.SIGKILL)
""")
    (tmp_path / "started").mkdir()
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "started")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    left = {int(pid) for pid in done.stdout.split()}
    assert len(left) == 3  # two workers and the forkserver that forked them

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] if Path(f"/proc/{pid}").exists() else "?"
        return state != "Z"

    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in left) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in left if alive(pid)]


def test_sigterm_stops_a_command_as_ctrl_c_does(monkeypatch, capsys):
    import os
    import signal

    from diffumask import cli

    during_cleanup = []

    def terminated(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
            raise AssertionError("SIGTERM did not stop the command")
        finally:  # while the command cleans up, a second SIGTERM (launchers repeat it) ends the process
            during_cleanup.append(signal.getsignal(signal.SIGTERM))

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "_run_refine", terminated)
    started = time.monotonic()
    assert main(["refine", "DATA", "--method", "otsu"]) == 143
    assert time.monotonic() - started < 4
    assert capsys.readouterr().err.splitlines() == [
        "diffumask: terminated; finished masks are kept, re-run the same command to resume"]
    assert during_cleanup == [signal.SIG_DFL]
    assert signal.getsignal(signal.SIGTERM) == before  # Python's own handling again once the command returns
