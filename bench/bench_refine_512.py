"""What `diffumask refine` costs per image at 512 px, for each method, with 1, 2, ... worker processes.

    python bench/bench_refine_512.py [--workers 1 2] [--device cpu|cuda] [--items N] [--work DIR]

The dataset comes from a random-weight pipeline shaped like Stable Diffusion 1.x at 512 px: the
VAE's factor 8 (a 64×64 latent), cross-attention at grids 64, 32, 16 and the mid block's 8, the
self-attention recorded at 32×32 (a 1024×1024 matrix), as `generate` writes for SD 1.5. Only the
widths are small (a real SD 1.5 UNet takes minutes per 512 px image on a CPU), which changes the
generation's cost, not the refinement's inputs: images, soft maps and matrices of the real sizes.
Random weights make textured images rather than photos; the dense CRF's cost grows with the
image's colour spread, so a photo's CRF is, if anything, cheaper. The dataset is made once and
kept in --work.

Per method and worker count: seconds per image of everything a refine run does per item (reading,
the method, CRF, cleanup, writing the mask and its manifest line, worker start-up included), the
fastest of --repeat runs, and the speed-up over the first worker count; then the same runs' CPU
seconds per image, this process and its workers together (the fewest of --repeat runs), which depend
less on what else the machine runs than wall times on a shared VM do; and, at the largest worker
count, this process's own share (it commits every item alone: the part that does not scale). The AffinityNet's seeds
(per image, in the worker pool) and training (per step, on --device) are timed on their own.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing.forkserver
import os
import resource
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from diffumask.dataset import Dataset
from diffumask.generate import GenerateConfig, generate_dataset
from diffumask.masks.affinity import build_affinity_net, train_affinity_net
from diffumask.masks.crf import CRFParams
from diffumask.models import check_device, default_device
from diffumask.refine import RefineConfig, refine_dataset
from diffumask.refine_items import Item, grid_seeds
from diffumask.workers import cpu_pool, ordered, reuse_freed_memory

CLASSES = ["dog", "cat", "car", "tree"]
SIZE = 512
METHODS = {
    "threshold": RefineConfig(method="threshold"),
    "threshold --crf": RefineConfig(method="threshold", crf=True),
    "otsu --crf": RefineConfig(method="otsu", crf=True),
    "propagate": RefineConfig(method="propagate"),
    "propagate --crf": RefineConfig(method="propagate", crf=True),
    "propagate --crf --crf-max-size 0": RefineConfig(method="propagate", crf=True, crf_params=CRFParams(max_size=None)),
    "affinity": RefineConfig(method="affinity"),
    "affinity --crf": RefineConfig(method="affinity", crf=True),
    "adaptive (CRF, shortlist 1)": RefineConfig(method="adaptive"),
}


def sd1_shaped_512() -> object:
    """A random-weight SD 1.x-shaped pipeline (factor-8 VAE, four UNet levels) narrow enough for a CPU."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    from diffumask.testing import tiny_pipeline

    tiny = tiny_pipeline("sd1")  # its text encoder, tokenizer and scheduler
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(block_out_channels=(16, 16, 16, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=8, layers_per_block=1, sample_size=SIZE)
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer,
        scheduler=tiny.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return pipe


def bench_dataset(work: Path, items: int) -> Dataset:
    """The benchmark's dataset, generated once (resumable) and reused."""
    per_class = -(-items // len(CLASSES))
    config = GenerateConfig(classes=CLASSES, model="sd1-shaped-512-random", out=str(work / f"dataset-{per_class}"),
                            images_per_class=per_class, size=SIZE, steps=2, batch_size=2, seed=0)
    return generate_dataset(config, pipe=sd1_shaped_512(), progress=True)


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and by its worker processes that have exited.

    The pool's workers are children of multiprocessing's forkserver, which reaps them (before the pool's
    shutdown returns), so their time is the forkserver's children's time in ``/proc``; spawned workers
    (no forkserver) are this process's children.
    """
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    pid = getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)  # None until it starts
    if pid:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime
    return total


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def per_image(root: Path, config: RefineConfig, workers: int, device: str,
              repeat: int) -> tuple[float, float, float]:
    """Per image, over ``repeat`` whole runs: the fastest run's seconds, the fewest CPU seconds (this process
    and its workers) and the fewest CPU seconds of this process alone."""
    timings, cpu, own = [], [], []
    for _ in range(repeat):
        before, own_before = cpu_seconds(), own_cpu_seconds()
        result = refine_dataset(root, config, progress=False, redo=True, device=device, workers=workers)
        cpu.append((cpu_seconds() - before) / result.refined)
        own.append((own_cpu_seconds() - own_before) / result.refined)
        timings.append(result.seconds / result.refined)
    return min(timings), min(cpu), min(own)


def timed_seeds(dataset: Dataset, workers: int) -> tuple[float, list[np.ndarray]]:
    """The AffinityNet seeds (Otsu levels, two seed CRFs, grid cells) in the worker pool: seconds per
    image, and the seeds."""
    config = RefineConfig()
    items = [Item(dataset, r) for r in dataset.records()]
    make = functools.partial(grid_seeds, config, config.affinity.grid_stride((SIZE, SIZE)))
    with cpu_pool(workers, preload=("diffumask.refine_items",)) as pool:
        list(ordered(pool, items[:workers], make))  # the workers started
        start = time.perf_counter()
        seeds = [seed for _, seed in ordered(pool, items, make, window=2 * workers + 2)]
    return (time.perf_counter() - start) / len(items), seeds


def train_step_seconds(dataset: Dataset, seeds: list[np.ndarray], device: str, steps: int) -> float:
    """Seconds per AffinityNet training step (batch 16, 448 px crops) on ``device``, after one warm-up step."""
    config = RefineConfig().affinity
    items = [Item(dataset, r) for r in dataset.records()]
    times = []
    for n in (1, 1 + steps):
        net = build_affinity_net(config, (SIZE, SIZE))
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_affinity_net(net, lambda i: items[i].image(), seeds, replace(config, train_steps=n), device=device)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return (times[1] - times[0]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare (default: 1 2)")
    parser.add_argument("--device", default=default_device(), help="refine's --device (default: cuda if available)")
    parser.add_argument("--items", type=int,
                        help="images in the dataset (default: 8 per worker of the largest count, at least 16, so "
                             "that start-up and the last round's stragglers do not dominate)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per cell; the fastest counts (default: 2)")
    parser.add_argument("--train-steps", type=int, default=3, help="training steps timed (default: 3; 0 times neither the seeds nor the training)")
    parser.add_argument("--only", nargs="+", choices=list(METHODS), help="methods to run (default: all)")
    parser.add_argument("--work", default="bench_refine_work/512", help="folder for the dataset (reused)")
    args = parser.parse_args()
    reuse_freed_memory()  # as `diffumask refine` does: with 1 worker this process refines
    device = str(check_device(args.device))
    dataset = bench_dataset(Path(args.work), args.items or max(16, 8 * max(args.workers)))
    n = len(dataset.records())
    print(f"{n} images of {SIZE} px, device {device}, {torch.get_num_threads()} torch threads in this process, "
          f"worker counts {args.workers}\n", flush=True)
    refine_dataset(dataset.root, METHODS["affinity"], progress=False, device=device, workers=max(args.workers))
    # (trains the AffinityNet once for the rows that use it, and starts the forkserver)
    header = " | ".join(f"{w} worker{'s' * (w > 1)}" for w in args.workers)
    print(f"| method | {header} | speed-up | CPU s per image: {header} | of which this process, "
          f"{args.workers[-1]} worker{'s' * (args.workers[-1] > 1)} |\n"
          f"|---|{'---|' * len(args.workers)}---|{'---|' * len(args.workers)}---|")
    for name, config in METHODS.items():
        if args.only and name not in args.only:
            continue
        seconds, cpu, own = zip(*(per_image(dataset.root, config, w, device, args.repeat) for w in args.workers))
        cells = " | ".join(f"{s:.3f} s" for s in seconds)
        print(f"| {name} | {cells} | {seconds[0] / seconds[-1]:.2f}× | {' | '.join(f'{c:.3f}' for c in cpu)} "
              f"| {own[-1]:.4f} |", flush=True)
    if args.train_steps == 0:  # the AffinityNet's seeds and training are not timed
        return
    timings, seeds = zip(*(timed_seeds(dataset, w) for w in args.workers))
    print(f"| AffinityNet seeds | {' | '.join(f'{s:.3f} s' for s in timings)} | {timings[0] / timings[-1]:.2f}× |")
    step = train_step_seconds(dataset, seeds[-1], device, args.train_steps)
    steps = RefineConfig().affinity.train_steps_for(n)
    print(f"\nAffinityNet training on {device}: {step:.3f} s/step (batch 16, 448 px crops); this dataset's "
          f"{steps} steps (8 epochs) take {step * steps:.1f} s, the cap of {RefineConfig().affinity.max_steps} steps "
          f"{step * RefineConfig().affinity.max_steps / 60:.1f} min")


if __name__ == "__main__":
    main()
