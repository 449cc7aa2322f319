"""Benchmark the shapes model against issue 4's targets and draw the README's picture grid.

    python bench/bench_shapes.py [--weights DIR] [--per-class 20] [--gamma G] [--guidance W] [--grid docs/shapes_grid.png]

Prints, for single-object and two-object prompts: generation seconds per image (batched, default
settings, without and with the recorder), the % of requested objects present, the % with the
requested shape (shape classifier trained on the world's exact masks), and the class masks' mIoU
against the objects' chroma-read pixels with the recorder's default aggregation and a fixed gamma.
--tune reports on development seeds instead (the ones gamma and guidance were chosen on).
--compose N also measures what `diffumask generate --compose N` writes for the six classes (two
objects per image, captioned by the shapes bank): the same figures, from the dataset's own images
and soft maps, each object's colour read back from its prompt.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from diffumask.generate import GenerateConfig, generate_dataset
from diffumask.shapes.classifier import load_classifier
from diffumask.shapes.evaluate import Sample, generate, judge, prompts_for, summarise
from diffumask.shapes.model import DEFAULT_GUIDANCE, DEFAULT_STEPS, DEFAULT_THRESHOLD, WEIGHTS_DIR, load_pipeline
from diffumask.shapes.world import CLASSES, COLOURS

REPORT_SEED = 1_000_000
TUNE_SEED = 2_000_000


def seconds_per_image(pipe, batch: int, seed: int, **call: object) -> float:
    """Plain generation time per image for one batch of prompts."""
    prompts = [p for p, _ in prompts_for(1, batch // 6 + 1, seed)][:batch]
    generators = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
    pipe(prompts[:2], num_inference_steps=2)  # warm-up
    start = time.perf_counter()
    pipe(prompts, generator=generators, output_type="np", **call)
    return (time.perf_counter() - start) / batch


def grid(samples, gamma: float, path: str, rows: int = 6, scale: int = 4) -> None:
    """Rows of (image | soft map | mask at gamma | true object), one sample per class, 4x nearest."""
    tiles = []
    picked = [next(s for s in samples if s.objects[0][0] == c) for c in
              dict.fromkeys(s.objects[0][0] for s in samples)][:rows]
    for s in picked:
        c = s.objects[0][0]
        soft = (np.repeat(s.maps[c][..., None], 3, axis=2) * 255).astype(np.uint8)
        mask = np.repeat(((s.maps[c] >= gamma) * 255).astype(np.uint8)[..., None], 3, axis=2)
        truth = np.repeat((s.truth[c] * 255).astype(np.uint8)[..., None], 3, axis=2)
        gap = np.full((s.image.shape[0], 2, 3), 255, np.uint8)
        tiles.append(np.concatenate([s.image, gap, soft, gap, mask, gap, truth], axis=1))
        tiles.append(np.full((2, tiles[-1].shape[1], 3), 255, np.uint8))
    picture = np.concatenate(tiles[:-1], axis=0)
    Image.fromarray(picture).resize((picture.shape[1] * scale, picture.shape[0] * scale),
                                    Image.NEAREST).save(path)


def composed(pipe, per_class: int, seed: int, guidance: float, steps: int) -> tuple[list[Sample], float]:
    """Samples from a `generate --compose` dataset of the six classes, with seconds per image."""
    objects = re.compile(rf"an? ({'|'.join(COLOURS)}) ({'|'.join(CLASSES)})")
    with tempfile.TemporaryDirectory() as folder:
        config = GenerateConfig(classes=list(CLASSES), out=folder, images_per_class=0, compose=per_class, seed=seed,
                                guidance=guidance, steps=steps, batch_size=per_class)
        start = time.perf_counter()
        dataset = generate_dataset(config, pipe=pipe, progress=False)
        seconds = (time.perf_counter() - start) / len(dataset.records())
        samples = []
        for record in dataset.records():
            found = [(shape, colour) for colour, shape in objects.findall(record["prompt"])]
            if [c for c, _ in found] != record["classes"]:
                raise RuntimeError(f"cannot read the objects of {record['prompt']!r} back: {found}")
            soft = dataset.read_soft_maps(record["id"], record["classes"])
            samples.append(Sample(record["prompt"], found, dataset.read_image(record["id"]), soft))
    return samples, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default=str(WEIGHTS_DIR))
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--gamma", type=float, default=DEFAULT_THRESHOLD)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="classifier-free guidance scale")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="denoising steps")
    parser.add_argument("--batch", type=int, default=120, help="images per pipeline call")
    parser.add_argument("--tune", action="store_true", help="use the development seeds")
    parser.add_argument("--grid", default=None, help="write the picture grid PNG here")
    parser.add_argument("--json", default=None, help="also write the figures as JSON here")
    parser.add_argument("--compose", type=int, default=0, metavar="N",
                        help="also measure `generate --compose N` (N two-object images per class; default: off)")
    parser.add_argument("--only-compose", action="store_true", help="measure only the --compose dataset")
    args = parser.parse_args()
    torch.set_num_threads(2)
    seed = TUNE_SEED if args.tune else REPORT_SEED
    pipe = load_pipeline(path=args.weights)
    classifier = load_classifier()

    call = {"guidance_scale": args.guidance, "num_inference_steps": args.steps}
    report: dict[str, object] = {"weights": args.weights, "seed": seed, **call}
    if not args.only_compose:
        report["seconds_per_image"] = seconds_per_image(pipe, args.batch, seed, **call)
        for n in (1, 2):
            samples, spi = generate(pipe, prompts_for(n, args.per_class, seed + n), seed + 10 * n,
                                    batch_size=args.batch, **call)
            judge(samples, classifier)
            figures = summarise(samples, args.gamma)
            figures["seconds_per_image_with_recorder"] = spi
            report[f"{n}-object"] = figures
            if n == 1 and args.grid:
                grid(samples, args.gamma, args.grid)
        print(f"generation: {report['seconds_per_image']:.3f} s/image (batch {args.batch}, guidance {args.guidance}, "
              f"{args.steps} steps)")
    if args.compose:
        samples, spi = composed(pipe, args.compose, seed + 30, args.guidance, args.steps)
        judge(samples, classifier)
        report["generate --compose"] = {**summarise(samples, args.gamma), "seconds_per_image_with_recorder": spi}
    for key in [k for k in ("1-object", "2-object", "generate --compose") if k in report]:
        f = report[key]
        sweep = "  ".join(f"{g}:{v:.3f}" for g, v in f["miou_sweep"].items())
        print(f"{key}: {f['images']} images, {f['objects']} objects | present {100 * f['present']:.1f} % | "
              f"right shape {100 * f['right_shape']:.1f} % | mIoU {f['miou']:.3f} (gamma {f['gamma']}) | "
              f"sweep {sweep}")
        print("   per class: " + ", ".join(
            f"{c} {100 * v['present']:.0f}/{100 * v['right_shape']:.0f}" for c, v in f["per_class"].items())
            + "  (present % / right shape %)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
