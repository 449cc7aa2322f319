"""Benchmark `diffumask refine` on the built-in shapes world, where ground truth is exact.

    python bench/bench_refine.py [--weights DIR] [--per-class 50] [--work DIR] [--threads N] [--only REGEX]

Generates a fixed dataset with the shapes model (seeded, resumable in --work), then runs every
refinement method on it and prints one table in the style of the paper's Table 4a: mIoU against
the objects' true pixels and seconds per image for each method with and without the dense CRF.

Ground truth of a generated image: the pixels whose chroma stands out from the background's, a low
percentile of the image's (``diffumask.shapes.classifier.foreground``), cleaned of specks, as in the
shapes benchmark.
mIoU: per class, intersection and union pooled over its images; the mean over classes. Pixels a
method labels 255 (uncertain) are left out of both, as trainers ignore them; the table shows
how many there are. Seconds per image cover everything a method does per item (reading, the
method, cleanup, writing the mask), on the same threads as the generation time it is compared
with, the fastest of ``--repeat`` runs; the AffinityNet's seeds and training are timed separately.

Every CRF and AffinityNet setting is ``RefineConfig``'s default, i.e. what ``diffumask refine``
uses; the options below change them for every row. The "paper's code" rows change one thing each
to what the paper's AffinityNet code (PSA) does, to measure what our defaults differ by.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from diffumask.dataset import IGNORE_INDEX, Dataset
from diffumask.generate import GenerateConfig, generate_dataset
from diffumask.masks.adaptive import DEFAULT_GAMMAS, gamma_range
from diffumask.refine import RefineConfig, refine_dataset
from diffumask.shapes import CLASSES, load_pipeline
from diffumask.shapes.classifier import clean, foreground
from diffumask.shapes.model import WEIGHTS_DIR

BENCH_SEED = 5_000_000


def generated(work: Path, weights: str, per_class: int, batch_size: int) -> tuple[Dataset, float]:
    """The benchmark dataset (generated once, then reused) and generation seconds per image."""
    timing = work / "bench_generate.json"
    config = GenerateConfig(classes=list(CLASSES), out=str(work / "dataset"), images_per_class=per_class,
                            seed=BENCH_SEED, batch_size=batch_size)
    if timing.is_file() and json.loads(timing.read_text())["images"] == per_class * len(CLASSES):
        return Dataset(config.out), json.loads(timing.read_text())["seconds_per_image"]
    pipe = load_pipeline(path=weights)
    start = time.perf_counter()
    dataset = generate_dataset(config, pipe=pipe, progress=True)
    seconds = (time.perf_counter() - start) / len(dataset.records())
    work.mkdir(parents=True, exist_ok=True)
    timing.write_text(json.dumps({"images": len(dataset.records()), "seconds_per_image": seconds}))
    return dataset, seconds


def truths(dataset: Dataset) -> dict[str, np.ndarray]:
    return {r["id"]: clean(foreground(dataset.read_image(r["id"]))) for r in dataset.records()}


class Overlap:
    """Per-class intersection and union of masks with the true pixels, 255 left out, pooled over images."""

    def __init__(self) -> None:
        self.inter: dict[str, int] = {}
        self.union: dict[str, int] = {}

    def add(self, name: str, mask: np.ndarray, true: np.ndarray, label: int = 1) -> None:
        kept, predicted = mask != IGNORE_INDEX, mask == label
        self.inter[name] = self.inter.get(name, 0) + int((predicted & true & kept).sum())
        self.union[name] = self.union.get(name, 0) + int(((predicted | true) & kept).sum())

    def miou(self) -> float:
        return float(np.mean([self.inter[c] / self.union[c] for c in self.inter if self.union[c]]))


def score(dataset: Dataset, truth: dict[str, np.ndarray]) -> tuple[float, float]:
    """(mIoU over classes with pooled pixels and 255 left out, fraction of pixels labelled 255)."""
    overlap = Overlap()
    ignored = total = 0
    for record in dataset.records():
        name = record["classes"][0]
        mask = dataset.read_mask(record["id"])
        overlap.add(name, mask, truth[record["id"]], dataset.class_index(name))
        ignored += int((mask == IGNORE_INDEX).sum())
        total += mask.size
    return overlap.miou(), ignored / total


def rows(args: argparse.Namespace) -> list[tuple[str, RefineConfig]]:
    defaults = RefineConfig()
    srgb = {} if args.crf_srgb is None else {"bilateral_srgb": args.crf_srgb}
    crf = replace(defaults.crf_params, **srgb, **({} if args.crf_iterations is None else {"iterations": args.crf_iterations}))
    seed_crf = replace(defaults.seed_crf_params, **srgb)
    affinity = replace(defaults.affinity, train_steps=args.affinity_steps, background=args.affinity_background)
    common = dict(crf_params=crf, seed_crf_params=seed_crf, affinity=affinity)
    adaptive = dict(common, crf_shortlist=args.crf_shortlist)
    wide = gamma_range(*args.wide_gammas)
    out: list[tuple[str, RefineConfig]] = []
    for with_crf in (False, True):
        tag = " + CRF" if with_crf else ""
        for gamma in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
            out.append((f"fixed γ {gamma}{tag}", RefineConfig(method="threshold", threshold=gamma, crf=with_crf, **common)))
        out.append((f"Otsu{tag}", RefineConfig(method="otsu", crf=with_crf, **common)))
        out.append((f"AffinityNet map alone{tag}", RefineConfig(method="affinity", crf=with_crf, **common)))
        for sweep, name in ((DEFAULT_GAMMAS, "0.35–0.54"), (None, "default (the dataset's γ −0.05…+0.14)"),
                            (wide, f"{wide[0]}–{wide[-1]}")):
            out.append((f"adaptive per image, γ {name}{tag}",
                        RefineConfig(method="adaptive", crf=with_crf, gammas=sweep, **adaptive)))
            out.append((f"adaptive per class, γ {name}{tag}",
                        RefineConfig(method="adaptive", per_class=True, crf=with_crf, gammas=sweep, **adaptive)))
            if with_crf and sweep is None:  # what the shortlist and the reference CRF each change
                for per_class, kind in ((False, "image"), (True, "class")):
                    out.append((f"adaptive per {kind}, γ {name} + CRF, CRF-refined AffinityNet mask as reference",
                                RefineConfig(method="adaptive", per_class=per_class, crf=True, reference_crf=True,
                                             gammas=sweep, **adaptive)))
                    out.append((f"adaptive per {kind}, γ {name}, the paper's way: CRF on every candidate, raw reference",
                                RefineConfig(method="adaptive", per_class=per_class, crf=True, crf_shortlist=0,
                                             reference_crf=False, gammas=sweep, **common)))
        out.append((f"propagate (self-attention){tag}", RefineConfig(method="propagate", crf=with_crf, **common)))
        paper = {"walk 256 (the paper's code: T^256)": dict(walk_steps=256),
                 "no stretch (the paper's code)": dict(stretch=False),
                 "walk 256 and no stretch": dict(walk_steps=256, stretch=False),
                 f"grid stride {args.grid_stride}, unanimous seed cells": dict(stride=args.grid_stride),
                 f"grid stride {args.grid_stride}, seed cells by vote (PSA-like)": dict(stride=args.grid_stride,
                                                                                       seed_grid="vote")}
        for change, fields in paper.items():
            out.append((f"AffinityNet map alone, {change}{tag}",
                        RefineConfig(method="affinity", crf=with_crf, **dict(common, affinity=replace(affinity, **fields)))))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=str(WEIGHTS_DIR), help="shapes pipeline folder (default: the shipped one)")
    parser.add_argument("--per-class", type=int, default=50, help="images per class (default: 50)")
    parser.add_argument("--work", default="bench_refine_work", help="folder for the dataset (reused on a re-run)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--batch-size", type=int, default=50, help="generation batch size (default: 50)")
    parser.add_argument("--crf-srgb", type=float, default=None,
                        help="colour scale of every CRF (the result's and the seeds'; default: RefineConfig's)")
    parser.add_argument("--crf-iterations", type=int, default=None,
                        help="mean-field iterations of the result CRF (default: RefineConfig's; the seeds' CRF keeps its own)")
    parser.add_argument("--affinity-steps", type=int,
                        help="fixed AffinityNet training steps (default: refine's, 8 epochs up to its cap)")
    parser.add_argument("--affinity-background", type=float, default=RefineConfig().affinity.background)
    parser.add_argument("--grid-stride", type=int, default=2,
                        help="AffinityNet stride of the seed-grid rows (the default stride is 1 at 32 px, where the "
                             "rule cannot matter; default: 2)")
    parser.add_argument("--crf-shortlist", type=int, default=RefineConfig.crf_shortlist,
                        help="adaptive + CRF rows: candidates CRF-refined per image (default: refine's)")
    parser.add_argument("--wide-gammas", type=float, nargs=3, default=(0.3, 0.9, 0.05), metavar=("START", "STOP", "STEP"))
    parser.add_argument("--repeat", type=int, default=3,
                        help="run each row this many times and report its fastest (default: 3; this VM's timings "
                             "vary by a fifth from run to run)")
    parser.add_argument("--crf-device", choices=("workers", "device"), default="workers",
                        help="refine's --crf-device: pydensecrf in the workers (default), or the torch CRF in refine's "
                             "own process on --device, as on a GPU (mask quality of the torch CRF; adaptive keeps "
                             "its CRF in the workers)")
    parser.add_argument("--device", default="cpu", help="refine's --device (default: cpu)")
    parser.add_argument("--only", help="run only rows whose name matches this regular expression")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(args.work)
    dataset, generation = generated(work, args.weights, args.per_class, args.batch_size)
    truth = truths(dataset)
    n = len(truth)
    print(f"{n} images ({args.per_class} per class, {len(CLASSES)} classes), generation {generation:.3f} s/image, "
          f"{args.threads} thread(s); CRF colour scale {rows(args)[0][1].crf_params.bilateral_srgb:g}, "
          f"{rows(args)[0][1].crf_params.iterations} mean-field iterations, "
          f"seeds' {rows(args)[0][1].seed_crf_params.bilateral_srgb:g}\n")
    results = []
    train_seconds = None
    for name, config in rows(args):
        if args.only and not re.search(args.only, name):
            continue
        timings = []
        for _ in range(args.repeat):
            result = refine_dataset(dataset.root, config, progress=False, redo=True,  # else a repeat finds nothing to do
                                    device=args.device, device_crf=args.crf_device == "device")
            if result.train_seconds:
                train_seconds = result.train_seconds
            timings.append(result.seconds / max(1, result.refined))
        miou, ignored = score(dataset, truth)
        per_image = min(timings)
        results.append({"method": name, "miou": miou, "ignored": ignored, "seconds_per_image": per_image,
                        "percent_of_generation": 100 * per_image / generation})
        print(f"  {name:<44} mIoU {miou:.3f}  ignored {100 * ignored:4.1f}%  {per_image * 1000:6.1f} ms/img", flush=True)

    print("\n| method | mIoU | 255 px | s / image | % of generation |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['miou']:.3f} | {100 * r['ignored']:.1f} % | {r['seconds_per_image']:.4f} "
              f"| {r['percent_of_generation']:.1f} % |")
    print(f"\ngeneration: {generation:.3f} s/image; AffinityNet seeds + training "
          f"({rows(args)[0][1].affinity.train_steps_for(n)} steps, once per dataset): "
          + (f"{train_seconds:.1f} s ({train_seconds / n:.3f} s/image)" if train_seconds else "loaded from an earlier run"))
    if args.json:
        Path(args.json).write_text(json.dumps({"generation_seconds_per_image": generation, "images": n,
                                               "affinity_train_seconds": train_seconds, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
