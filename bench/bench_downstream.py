"""The paper's Table 1 in miniature: segmenters trained on real, synthetic and mixed shapes data.

    python bench/bench_downstream.py [--work DIR] [--n 600] [--steps 2500] [--rows a,b,c,d,oracle,silhouette,scale,zeroshot]
                                     [--augment LIST] [--crop PX] [--max-grad-norm N] [--seed S]
                                     [--model DIR] [--guidance G]

Everything is scored on the shapes world's held-out real test split (scenes of 1-3 objects, exact
masks). The same segmenter preset (``tiny`` unless --preset) is trained, with the same steps, on:

  (a) real        the world's train split with its exact masks, N scenes
  (b) raw         N images from ``diffumask generate`` with their fixed-γ masks
  (c) refined     the same N images refined with ``refine --method propagate --crf`` (the refine table's best)
  (d) real + synthetic (c), sampled half and half
  oracle          the same N images as (c) with their objects' own pixels as masks (read back by chroma, as
                  bench_shapes.py scores masks): what perfect masks of these images give; also prints how well
                  the raw and refined masks cover those pixels (foreground IoU per class and pooled)
  silhouette      the oracle's masks redrawn as the world draws: each object's pixels in its prompt's colour
                  on one of the world's grey textures (the generator's shapes, sizes and places, the world's look)
  scale           (c) with 2N and 4N images
  zeroshot        real masks for 4 shapes only (ring and cross pixels ignored), synthetic data for all 6 (row c),
                  and both: seen / unseen / harmonic mIoU, background excluded (the paper's Protocol II)

Data is made once in --work and reused (generation and refinement resume); every run folder too,
so a killed benchmark continues where it stopped. Prints per-class IoU, mIoU over the six shapes (the
target's figure) and with background, the ratio to (a), the mIoU over the shapes on the test split's
one-object scenes and on its two- and three-object scenes apart, and the training minutes of each row; then,
for each row, the share of the test objects' pixels it gives their class by object area, in one-object
scenes and in the others apart (does it miss the small objects, or the crowded scenes?).

--augment trains every row with other on-the-fly augmentation than the preset's (train's --augment; e.g.
+mosaic,paste: the preset's, and mosaics with copy-paste made for each sample), in run folders of their own,
and the ratios are to row (a) trained the same way. --crop and --max-grad-norm do the same for the preset's
training crop and gradient clipping (e.g. --crop 64 --max-grad-norm 0: the tiny preset as it was before crop 80
and clipping).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from diffumask.dataset import IGNORE_INDEX, Dataset, write_palette_png
from diffumask.generate import GenerateConfig, generate_dataset
from diffumask.refine import RefineConfig, refine_dataset
from diffumask.formats import open_source
from diffumask.segment import TrainConfig, train
from diffumask.segment.evaluate import Evaluation, Scorer
from diffumask.segment.predict import iter_predictions
from diffumask.segment.run import RunFolder
from diffumask.segment.train import train_summary
from diffumask.shapes import CLASSES, export_world
from diffumask.shapes.classifier import clean, foreground
from diffumask.shapes.world import COLOURS, PALETTE, TEXTURES, background

GENERATE_SEED = 7_000_000
TEST_SCENES = 300
UNSEEN = ("ring", "cross")
#: Edges (px of a 32x32 scene) of the object-area bins the benchmark reports recall in: one-object scenes
#: draw larger radii (0.25-0.4 of the side) than scenes of several (0.18-0.3), and a star or a ring covers
#: less than a circle of its radius.
AREA_EDGES = (100, 200, 300)
AREA_BINS = (f"<{AREA_EDGES[0]}", *(f"{lo}-{hi - 1}" for lo, hi in zip(AREA_EDGES, AREA_EDGES[1:])), f">={AREA_EDGES[-1]}")


def subset(source: Dataset, out: Path, ids: list[str], mask_of: Callable[[dict], np.ndarray] | None = None) -> Path:
    """A dataset of some of ``source``'s items, all in split train: files hard-linked (so images stay
    byte-identical), masks rewritten only when ``mask_of`` (manifest record -> label map) gives new ones."""
    if (out / "ImageSets" / "Segmentation" / "train.txt").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    info = json.loads((source.root / "dataset.json").read_text())
    target = Dataset.create(tmp, source.classes, info["settings"], image_format=info["image_format"])
    records = {r["id"]: r for r in source.records()}
    lines = []
    for item_id in ids:
        for path in (source.image_path(item_id), source.soft_maps_path(item_id), source.mask_path(item_id)):
            if path.is_file() and not (mask_of and path == source.mask_path(item_id)):
                (tmp / path.parent.name).mkdir(exist_ok=True)
                os.link(path, tmp / path.parent.name / path.name)
        if mask_of:
            write_palette_png(target.mask_path(item_id), mask_of(records[item_id]))
        lines.append(json.dumps({**records[item_id], "split": "train"}) + "\n")
    target.manifest_path.write_text("".join(lines))
    target.finalize()
    os.replace(tmp, out)
    return out


def first_per_class(dataset: Dataset, per_class: int) -> list[str]:
    """The first ``per_class`` items of each class (ids end in their index)."""
    return [r["id"] for r in dataset.records() if int(r["id"].rsplit("_", 1)[1]) < per_class]


def read_back_mask(dataset: Dataset, record: dict) -> np.ndarray:
    """A one-object generated image's true label map: its object's pixels (chroma above the grey
    background's, specks dropped) as its class, the rest background."""
    (name,) = record["classes"]
    return np.where(clean(foreground(dataset.read_image(record["id"]))), dataset.class_index(name), 0).astype(np.uint8)


def prepare(work: Path, n: int, sizes: list[int], model: str = "shapes", guidance: float | None = None) -> dict[str, Path]:
    """Real scenes, synthetic images (raw and refined) from ``model`` at ``guidance`` (None: the model's own) and
    the subsets the rows train on."""
    real = export_world(work / "real", n_train=n, n_val=0, n_test=TEST_SCENES)
    per_class = max(sizes) // len(CLASSES)
    raw = generate_dataset(GenerateConfig(classes=list(CLASSES), out=str(work / "synthetic-raw"), model=model,
                                          images_per_class=per_class, seed=GENERATE_SEED, batch_size=120,
                                          guidance=guidance))
    paths = {"real": Path(real), "test": Path(real)}
    for size in sizes:
        ids = first_per_class(raw, size // len(CLASSES))
        paths[f"raw-{size}"] = subset(raw, work / f"raw-{size}", ids)
        paths[f"refined-{size}"] = subset(raw, work / f"refined-{size}", ids)
        refine_dataset(paths[f"refined-{size}"], RefineConfig(method="propagate", crf=True))
    paths[f"oracle-{n}"] = subset(raw, work / f"oracle-{n}", first_per_class(raw, n // len(CLASSES)),
                                  mask_of=lambda record: read_back_mask(raw, record))
    paths[f"silhouette-{n}"] = in_world_style(Dataset(paths[f"oracle-{n}"]), work / f"silhouette-{n}")
    real_ds = Dataset(real)
    unseen = np.arange(256, dtype=np.uint8)
    unseen[[CLASSES.index(c) + 1 for c in UNSEEN]] = IGNORE_INDEX
    paths["real-seen"] = subset(real_ds, work / "real-seen", real_ds.split_ids("train"),
                                mask_of=lambda record: unseen[real_ds.read_mask(record["id"])])
    return paths


def in_world_style(source: Dataset, out: Path, seed: int = 123) -> Path:
    """``source``'s one-object items redrawn as the world draws them: each mask's object pixels in the
    palette colour its prompt names (a random one if none) on a random grey world texture, the masks kept.
    Trained on, they tell whether the gap to real data follows the generated shapes or the generated look."""
    if (out / "ImageSets" / "Segmentation" / "train.txt").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    info = json.loads((source.root / "dataset.json").read_text())
    target = Dataset.create(tmp, source.classes, info["settings"], image_format="png")
    rng = np.random.default_rng(seed)
    for record in source.records():
        mask = source.read_mask(record["id"])
        image = np.repeat(background(rng, str(rng.choice(TEXTURES)), mask.shape[0])[..., None], 3, axis=2)
        named = [c for c in COLOURS if re.search(rf"\b{c}\b", record["prompt"])]
        image[mask > 0] = PALETTE[named[0] if named else str(rng.choice(COLOURS))]
        target.write_item(record["id"], image, record, mask=mask)
    target.finalize()
    os.replace(tmp, out)
    return out


def agreement(masks: Dataset, truth: Dataset) -> dict[str, float]:
    """Per class and over all ("all"), how well ``masks`` cover the objects' read-back pixels in ``truth``
    (same ids, one object each): foreground IoU with pixels summed over the images, 255 counted as not the
    object."""
    inter, union = dict.fromkeys((*CLASSES, "all"), 0), dict.fromkeys((*CLASSES, "all"), 0)
    for record in truth.records():
        name, mine, true = record["classes"][0], masks.read_mask(record["id"]), truth.read_mask(record["id"]) > 0
        found = (mine > 0) & (mine != IGNORE_INDEX)
        for key in (name, "all"):
            inter[key] += int((found & true).sum())
            union[key] += int((found | true).sum())
    return {key: inter[key] / union[key] for key in inter if union[key]}


def percent(value: float) -> str:
    """A score as a table cell: "-" for a group with no scenes (NaN)."""
    return "-" if np.isnan(value) else f"{100 * value:.1f}"


def shapes_miou(evaluation: Evaluation) -> float:
    """mIoU over the six shapes (background aside): the targets' figure."""
    iou = [v for c, v in zip(evaluation.classes, evaluation.iou) if c in CLASSES and not np.isnan(v)]
    return float(np.mean(iou)) if iou else float("nan")


def confusions(scorer: Scorer) -> dict[str, list]:
    """Per true shape, the other class that takes the largest share of its pixels: [name, share]."""
    counts = scorer.matrix.counts[:, : len(scorer.classes)]
    out = {}
    for i, name in enumerate(scorer.classes):
        if name in CLASSES and counts[i].sum():
            others = [j for j in range(len(scorer.classes)) if j != i]
            j = max(others, key=lambda k: counts[i, k])
            out[name] = [scorer.classes[j], round(float(counts[i, j] / counts[i].sum()), 3)]
    return out


def area_bin(area: int) -> str:
    """The name of the object-area bin that ``area`` (px) falls in."""
    return AREA_BINS[int(np.searchsorted(AREA_EDGES, area, side="right"))]


def named_right(prediction: np.ndarray, truth: np.ndarray, scorer: Scorer) -> list[tuple[int, int]]:
    """Per shape in ``truth`` (a scene holds each shape once): (its visible pixels, how many of them the
    prediction gives its class). Prediction (run indices) and truth (source values) are first mapped to the
    scorer's class indices, so names match as ``evaluate`` matches them."""
    truth, prediction = scorer.truth_lut[truth], scorer.prediction_lut[prediction]
    shapes = [i for i, name in enumerate(scorer.classes) if name in CLASSES]
    return [(int(mask.sum()), int((prediction[mask] == i).sum())) for i in shapes if (mask := truth == i).any()]


def scored(run_root: Path, test: Path, unseen: tuple[str, ...] | None) -> tuple[Evaluation, dict[str, Evaluation],
                                                                                dict[str, list], dict[str, dict]]:
    """The run on the test split as ``diffumask evaluate`` scores it, the same on its one-object and its
    two- and three-object scenes apart (where a synthetic-only segmenter loses most), its confusions, and per
    group and object-area bin the share of the objects' pixels given their class (pooled) and the objects'
    count: whether what it misses is the small objects or the crowded scenes."""
    run, source = RunFolder(run_root), open_source(str(test))
    objects = {r["id"]: len(r["objects"]) for r in Dataset(test).records()}
    scorers = {group: Scorer(run.classes, source.label_names, None, unseen if group == "all" else None)
               for group in ("all", "one", "several")}
    sizes = {group: {name: np.zeros(3, np.int64) for name in AREA_BINS}  # pixels right, pixels, objects
             for group in ("one", "several")}
    for item_id, prediction, truth in iter_predictions(run, source, "test", progress=False):
        group = "one" if objects[item_id] == 1 else "several"
        scorers["all"].update(prediction, truth)
        scorers[group].update(prediction, truth)
        for area, right in named_right(prediction, truth, scorers["all"]):
            sizes[group][area_bin(area)] += (right, area, 1)
    by_area = {group: {name: {"recall": round(float(right / pixels), 3), "objects": int(count)}
                       for name, (right, pixels, count) in bins.items() if count}
               for group, bins in sizes.items()}
    return (scorers["all"].result(), {group: scorers[group].result() for group in ("one", "several")},
            confusions(scorers["all"]), by_area)


def print_by_area(rows: list[dict]) -> None:
    """The rows' recall by object area: the share of the test objects' pixels given their class."""
    cells = [(group, name) for group in ("one", "several") for name in AREA_BINS]
    print("\nshare of the test objects' pixels given their class (%), by object area in px (objects), "
          "in one-object scenes | in scenes of two or three")
    half = len(AREA_BINS)
    print(f"{'row':<24}" + "".join(f"{name:>14}" for _, name in cells[:half]) + "  |"
          + "".join(f"{name:>14}" for _, name in cells[half:]))
    for r in rows:
        shown = [r["by_area"][group].get(name) for group, name in cells]
        text = [f"{100 * c['recall']:6.1f} ({c['objects']:3d})" if c else "-" for c in shown]
        print(f"{r['row']:<24}" + "".join(f"{t:>14}" for t in text[:half]) + "  |"
              + "".join(f"{t:>14}" for t in text[half:]))


def run_row(name: str, data: list[Path], work: Path, args: argparse.Namespace, test: Path,
            weights: list[float] | None = None, unseen: tuple[str, ...] | None = None, label: str | None = None,
            augment: list[str] | None = None, extra: dict | None = None) -> dict:
    """Train (or reuse) the run ``name`` and score it on the real test split (``augment``, ``extra``: TrainConfig's;
    ``augment`` defaults to ``args.augment``, where the run folder's name gets it, else the preset's own; a
    crop, a gradient clip or a seed other than the preset's and 0 are in the folder's name too, so such runs sit
    beside the default ones in the same --work)."""
    folder = name if args.preset == "tiny" else f"{name}-{args.preset}"
    if augment is None and getattr(args, "augment", None):
        augment, folder = args.augment.split(","), f"{folder}-augment={args.augment}"
    crop, clip = getattr(args, "crop", None), getattr(args, "max_grad_norm", None)
    if crop:
        folder = f"{folder}-crop={crop}"
    if clip is not None:
        folder, extra = f"{folder}-clip={clip:g}", {"max_grad_norm": clip, **(extra or {})}
    if args.seed:  # another seed's run beside seed 0's, in the same --work
        folder = f"{folder}-seed={args.seed}"
    out = work / "runs" / folder
    run = train(TrainConfig(data=[str(d) for d in data], out=str(out), preset=args.preset, steps=args.steps,
                            crop=crop, weights=weights, seed=args.seed, workers=args.workers, augment=augment,
                            extra=extra or {}),
                progress=not args.quiet)
    minutes = train_summary(run)["minutes"]  # training time as logged by the run (resumes included)
    evaluation, by_count, confused, by_area = scored(run.root, test, unseen)
    iou = dict(zip(evaluation.classes, evaluation.iou))
    row = {"row": label or name, "iou": iou, "miou_shapes": shapes_miou(evaluation), "miou_with_background": evaluation.miou,
           "minutes": minutes, "seen": evaluation.seen, "unseen": evaluation.unseen, "harmonic": evaluation.harmonic,
           **{f"miou_{group}": shapes_miou(e) for group, e in by_count.items()},
           "confused": confused,  # per true shape: the other class given most of its pixels, and their share of them
           "by_area": by_area}  # per scene group and object-area bin: share of the objects' pixels named right
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("bench_downstream_work"))
    parser.add_argument("--n", type=int, default=600, help="N: real scenes and synthetic images per row")
    parser.add_argument("--steps", type=int, default=2500, help="training steps of every row")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--augment", help="every row's on-the-fly augmentation (train's --augment, e.g. +mosaic,paste; "
                        "default: the preset's); the ratios are then to row (a) trained the same way")
    parser.add_argument("--crop", type=int, help="every row's training crop (train's --crop; default: the preset's)")
    parser.add_argument("--max-grad-norm", type=float,
                        help="clip every row's gradients to this norm (train's --max-grad-norm; default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="data-loading processes")
    parser.add_argument("--rows", default="a,b,c,d,oracle,silhouette,scale,zeroshot")
    parser.add_argument("--model", default="shapes",
                        help="the generator of the synthetic rows: the built-in shapes model (default) or another "
                             "saved shapes pipeline, e.g. one from `diffumask shapes train`; give it its own --work")
    parser.add_argument("--guidance", type=float,
                        help="the generator's guidance scale (generate's --guidance; default: the model's own, 4 for "
                             "shapes); 1 turns classifier-free guidance off; give it its own --work")
    parser.add_argument("--prepare-only", action="store_true", help="make the data and stop")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    wanted = set(args.rows.split(","))
    sizes = [args.n] + ([2 * args.n, 4 * args.n] if "scale" in wanted else [])
    paths = prepare(args.work, args.n, sizes, args.model, args.guidance)
    if args.prepare_only:
        return
    test = paths["test"]
    rows = []
    plan = {
        "a": ("a-real", [paths["real"]], None),
        "b": ("b-raw", [paths[f"raw-{args.n}"]], None),
        "c": ("c-refined", [paths[f"refined-{args.n}"]], None),
        "d": ("d-real+refined", [paths["real"], paths[f"refined-{args.n}"]], [1.0, 1.0]),
        "oracle": ("oracle-read-back", [paths[f"oracle-{args.n}"]], None),
        "silhouette": ("silhouette-world-style", [paths[f"silhouette-{args.n}"]], None),
    }
    for key in ("a", "b", "c", "d", "oracle", "silhouette"):
        if key in wanted:
            name, data, weights = plan[key]
            rows.append(run_row(name, data, args.work, args, test, weights))
    if "oracle" in wanted:
        truth = Dataset(paths[f"oracle-{args.n}"])
        for kind in ("raw", "refined"):
            iou = agreement(Dataset(paths[f"{kind}-{args.n}"]), truth)
            print(f"{kind} masks against the read-back pixels, foreground IoU %: "
                  + "  ".join(f"{c} {100 * v:.1f}" for c, v in iou.items()), flush=True)
    if "scale" in wanted:
        for size in sizes[1:]:
            rows.append(run_row(f"c-refined-{size}", [paths[f"refined-{size}"]], args.work, args, test))
    if "zeroshot" in wanted:
        rows.append(run_row("zs-real-seen", [paths["real-seen"]], args.work, args, test, unseen=UNSEEN))
        rows.append(run_row("c-refined", [paths[f"refined-{args.n}"]], args.work, args, test, unseen=UNSEEN,
                            label="zs-refined (= c)"))
        rows.append(run_row("zs-real-seen+refined", [paths["real-seen"], paths[f"refined-{args.n}"]], args.work,
                            args, test, weights=[1.0, 1.0], unseen=UNSEEN))
    ceiling = next((r["miou_shapes"] for r in rows if r["row"] == "a-real"), None)
    print(f"\n{'row':<24}" + "".join(f"{c:>9}" for c in CLASSES)
          + f"{'mIoU':>8}{'+bg':>7}{'/real':>7}{'1 obj':>7}{'2-3':>7}{'min':>6}")
    for r in rows:
        ratio = f"{r['miou_shapes'] / ceiling:7.2f}" if ceiling else "      -"
        print(f"{r['row']:<24}" + "".join(f"{100 * r['iou'][c]:9.1f}" for c in CLASSES)
              + f"{100 * r['miou_shapes']:8.1f}{100 * r['miou_with_background']:7.1f}{ratio}"
              + f"{percent(r['miou_one']):>7}{percent(r['miou_several']):>7}{r['minutes']:6.1f}")
        if r["seen"] is not None:
            print(f"{'':<24}zero-shot: seen {100 * r['seen']:.1f}  unseen {100 * r['unseen']:.1f}  "
                  f"harmonic {100 * r['harmonic']:.1f}")
    print_by_area(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
