"""Sharded jobs killed outright (SIGKILL of every worker, as a lost node or a preempted Slurm job leaves them) in
the middle of their writes, resumed with other numbers of workers: the finished folder is the one an
uninterrupted single process makes, byte for byte."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataset_factory import snapshot

from diffumask.dataset import Dataset

DIFFUMASK = str(Path(sys.executable).parent / "diffumask")
GENERATE = [DIFFUMASK, "generate", "--classes", "circle,star,ring", "--images-per-class", "6", "--steps", "5",
            "--batch-size", "2", "--device", "cpu", "--quiet"]
REFINE = [DIFFUMASK, "refine", "--method", "propagate", "--crf", "--workers", "1", "--device", "cpu", "--quiet"]


def progress(folder: Path, stage: str) -> int:
    """How far the job is: the manifest's lines (``stage`` generate: an item made, or one marked lost to be made
    again), or the items refined so far, as the dataset's readers see them."""
    if not (folder / "classes.json").is_file():  # written after dataset.json: a Dataset opens
        return 0
    if stage == "generate":
        return len(Dataset(folder)._lines())
    return sum(1 for record in Dataset(folder).records() if "refine" in record)


def without_revs(manifest: bytes) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "rev"} for line in manifest.splitlines()]


def run_workers(argv: list[str], workers: int, kill_after: int | None = None, delay: float = 0.0) -> bool:
    """``workers`` processes of one job (torchrun's variables, so each takes its share); with ``kill_after``
    every one is killed with SIGKILL ``delay`` seconds after they finished that many more items (or when they all
    ended first). Whether a kill hit a running worker."""
    folder = Path(argv[argv.index("--out") + 1] if "--out" in argv else argv[-1])
    stage = argv[1]
    start = progress(folder, stage)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    processes = []
    for rank in range(workers):
        rank_env = {**env, "RANK": str(rank), "WORLD_SIZE": str(workers), "LOCAL_RANK": str(rank)} if workers > 1 \
            else env
        processes.append(subprocess.Popen(argv, env=rank_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          start_new_session=True))  # pool workers die with them
    if kill_after is not None:
        while any(p.poll() is None for p in processes) and progress(folder, stage) < start + kill_after:
            time.sleep(0.005)
        time.sleep(delay)
        for process in processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode in (0, -signal.SIGKILL), err.decode()[-3000:]
    return any(process.returncode == -signal.SIGKILL for process in processes)


def kill_and_resume(argv: list[str], rng: random.Random, rounds: int, item_seconds: float) -> int:
    """Kill the job ``rounds`` times at a random point of its writes (up to about an item's time after its first
    or second finished item), then run it to the end; a random number of workers each time. How many kills hit running
    workers."""
    hits = sum(run_workers(argv, rng.choice([1, 2, 3]), kill_after=rng.randint(1, 2),
                           delay=rng.uniform(0.0, item_seconds)) for _ in range(rounds))
    run_workers(argv, rng.choice([2, 3]))
    return hits


@pytest.mark.slow
def test_generate_and_refine_killed_at_random_resume_with_any_number_of_workers(tmp_path):
    rng = random.Random(20261207)
    reference = tmp_path / "reference"
    run_workers([*GENERATE, "--out", str(reference)], 1)
    killed = tmp_path / "killed"
    assert kill_and_resume([*GENERATE, "--out", str(killed)], rng, rounds=3, item_seconds=0.1) >= 1  # 3 of 3 here
    assert snapshot(killed) == snapshot(reference)

    run_workers([*REFINE, str(reference)], 1)
    refined = tmp_path / "refined"
    shutil.copytree(killed, refined)
    assert kill_and_resume([*REFINE, str(refined)], rng, rounds=2, item_seconds=0.01) >= 1  # 2 of 2 here
    assert snapshot(refined) == snapshot(reference)

    # Files of finished items lost (a disk fault): generate, killed at random while it marks and makes them again,
    # then refine, end as the refined reference, the lines of the remade items with higher revs.
    for number, item_id in enumerate(rng.sample([r["id"] for r in Dataset(refined).records()], 4)):
        folder, suffix = [("JPEGImages", "jpg"), ("SegmentationClass", "png")][number % 2]
        (refined / folder / f"{item_id}.{suffix}").unlink()
    assert kill_and_resume([*GENERATE, "--out", str(refined)], rng, rounds=2, item_seconds=0.1) >= 1
    kill_and_resume([*REFINE, str(refined)], rng, rounds=1, item_seconds=0.01)
    after, before = snapshot(refined), snapshot(reference)
    assert without_revs(after.pop("manifest.jsonl")) == without_revs(before.pop("manifest.jsonl"))
    assert after == before
