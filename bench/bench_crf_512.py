"""What the dense CRF's cheaper settings cost at 512 px, where bench_refine (the shapes model's 32 px) cannot tell.

    python bench/bench_crf_512.py [--scenes 40] [--size 512] [--device cuda]

Renders shapes-world scenes (one object each) at --size with their exact masks, and makes each a
coarse input mask the way `refine --method propagate` makes one: the truth averaged onto a 32×32
grid (the self-attention's), blurred, upsampled bilinearly, 0.6 threshold with the 0.5–0.6 band
left uncertain (255). Then the result CRF refines it under each setting below; per setting: IoU of
the object (pooled over scenes, 255 pixels left out, as bench_refine scores), CPU seconds per image
of the CRF (kernels and inference), and the share of pixels that differ from the paper's CRF. With
--device, two more rows run the same CRFs in torch there (what `refine` does on a GPU), timed in wall
seconds (the first call, CUDA's start, untimed).

Flat-coloured objects on textured grey are an easy case for the CRF (the paper's settings recover
them exactly), and no attention is involved: this measures what a setting loses at the real image
size, not how good the masks of a real model are.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch
from scipy import ndimage

from diffumask.dataset import IGNORE_INDEX
from diffumask.masks.crf import CRFParams, DenseCRF
from diffumask.masks.propagate import resize_maps
from diffumask.masks.threshold import threshold_masks
from diffumask.shapes.world import render_scene

GRID = 32  # the self-attention grid refine propagates on at 512 px (generate's --self-attention-max)
SETTINGS = {
    "the paper's (10 iterations, full size: --crf-max-size 0)": {"max_size": None},
    "--crf-iterations 5, full size": {"iterations": 5, "max_size": None},
    "--crf-iterations 3, full size": {"iterations": 3, "max_size": None},
    "--crf-max-size 384": {"max_size": 384},
    "--crf-max-size 256 (the default)": {},
    "--crf-max-size 128": {"max_size": 128},
}


def coarse_mask(truth: np.ndarray, label: int) -> np.ndarray:
    """A propagate-like input: the object at the grid's resolution, soft-edged, thresholded at full size."""
    size = truth.shape
    grid = resize_maps(truth.astype(np.float32)[None], (GRID, GRID), "area")[0]
    grid = ndimage.gaussian_filter(grid, 0.7)
    grid = (grid - grid.min()) / max(float(grid.max() - grid.min()), 1e-6)
    return threshold_masks({label: resize_maps(grid[None], size)[0].clip(0, 1)}, 0.6, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=40, help="scenes rendered (default: 40)")
    parser.add_argument("--size", type=int, default=512, help="image side in px (default: 512)")
    parser.add_argument("--seed", type=int, default=10_000, help="first scene seed (default: 10000)")
    parser.add_argument("--device", help="also run the default and the paper's CRF in torch on this device")
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = {name: (replace(CRFParams(), **change), None) for name, change in SETTINGS.items()}
    if args.device:
        params[f"--crf-max-size 256, torch on {args.device} (wall s)"] = (CRFParams(), args.device)
        params[f"full size, torch on {args.device} (wall s)"] = (CRFParams(max_size=None), args.device)
        warm = render_scene(args.seed, args.size, num_objects=1)
        DenseCRF(warm.image, [0, 1], CRFParams(), args.device)(warm.mask.clip(0, 1).astype(np.uint8))
    reference = next(iter(params))
    inter = dict.fromkeys(["input", *params], 0)
    union = dict.fromkeys(inter, 0)
    seconds = dict.fromkeys(params, 0.0)
    differing = dict.fromkeys(params, 0)
    for seed in range(args.seed, args.seed + args.scenes):
        scene = render_scene(seed, args.size, num_objects=1)
        label = int(scene.mask.max())
        truth = scene.mask == label
        labels = coarse_mask(truth, label)
        outputs = {"input": labels}
        for name, (setting, device) in params.items():
            clock = time.process_time if device is None else time.perf_counter
            start = clock()
            outputs[name] = DenseCRF(scene.image, [0, label], setting, device)(labels)
            seconds[name] += clock() - start
        for name, mask in outputs.items():
            kept = mask != IGNORE_INDEX
            inter[name] += int(((mask == label) & truth & kept).sum())
            union[name] += int((((mask == label) | truth) & kept).sum())
            if name in differing:
                differing[name] += int((mask != outputs[reference]).sum())
    pixels = args.scenes * args.size ** 2
    print(f"{args.scenes} scenes of {args.size} px, one object each; input: the truth through a {GRID}×{GRID} grid\n")
    print("| CRF | IoU | CPU s per image | pixels differing from the paper's |\n|---|---|---|---|")
    print(f"| none (the input) | {inter['input'] / union['input']:.4f} | – | – |")
    for name in params:
        print(f"| {name} | {inter[name] / union[name]:.4f} | {seconds[name] / args.scenes:.3f} "
              f"| {100 * differing[name] / pixels:.2f} % |")


if __name__ == "__main__":
    main()
