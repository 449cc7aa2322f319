"""The paper's Table 4 (c) and (d) in miniature: noise learning and augmentation on the shapes world.

    python bench/bench_noise.py [--work DIR] [--n 600] [--steps 2500] [--fold-steps 1200] [--rows catch,alpha,augment]
                                [--alphas 0.3,0.5,0.7] [--fold-repeats 1] [--model shapes] [--fold-augment LIST]
                                [--guidance G]

Data is bench_downstream's (the same --work layout and seeds): N synthetic images refined with
``propagate --crf`` (row c of Table 1), scored on the world's real test split.

  catch    ``diffumask filter`` (3 folds, the tiny preset, --fold-steps) on the N images; then, for each
           α, the share of wrong-shape images it prunes against the share of right-shape ones (the
           shape classifier judges each image's object, read back by chroma), and the same for items
           whose mask disagrees with the object's true pixels (IoU < 0.5) against those that agree; with
           --fold-repeats R, again for R-1 more runs (fold split r, fold models' seed + r, each on a
           hard-linked copy of the images), with each run's score correlation and pruned-set overlap with the
           first, and for the runs' scores averaged
  alpha    the synthetic-only segmenter trained on what each α keeps (α = 0 is Table 1's row c)
  random   not in the default run: the same segmenter on a seeded random share of each class, as many items as
           each α keeps: the control that tells what noise learning's choice adds to (or takes from) having
           fewer items
  augment  on the best α's items (or --augment-alpha's; 0: every refined image, no filter needed) plus
           their augmented copies (``diffumask augment``, as many items): Φ1, Φ1+Φ2, Φ1+Φ2+Φ3, all four
           (Table 4 (d)); --augment-rows also takes Φ1-k23 (2×2 and 3×3 mosaics), paste (copy-paste of
           random items' objects, ours), Φ1+paste (both), Φ1+paste-small (1-3 pasted objects, down to 0.3
           of the side), k12+paste (a mosaic or a single item, each with copy-paste), Φ1+paste-3x,
           Φ1+paste-10x and Φ1+paste-20x (three, ten and twenty augmented items per item), and
           Φ1+paste-share91 (Φ1+paste's items drawn for 10 of 11 training samples, as the 10x row draws its
           own), and Φ1+paste-live-75, -90, -all and -50 (mosaics with copy-paste made afresh for each training
           sample, nothing written: train --augment +mosaic,paste, for 75, 90, 100 and 50 % of the samples):
           AUGMENT_ROWS holds each one's AugmentConfig fields

Every run folder and dataset is kept in --work, so a killed benchmark continues where it stopped (folds trained
with another --fold-steps are refused: delete DATA/noise to train them again). The fold models train for 1200
steps, half the rows' 2500, so that the whole default run fits in two hours on 2 cores (115.1 minutes on
2026-12-06 at the tiny preset's crop 80, 19 of them for images and folds; 93.9 at its former crop 64): they only score
items, and on 2026-11-27 fold models of 600, 1200 and 2500 steps pruned 16, 20 and 17 of the 40 wrong-shape images
at α 0.3 (ratios 1.37, 1.75, 1.46), against 29.3, 28.6 and 29.1 % of the right ones. The rows' table is followed
by bench_downstream's recall by object area, and the run ends with its wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np

from bench_downstream import percent, prepare, print_by_area, run_row, subset

from diffumask.augment import AugmentConfig, augment_dataset
from diffumask.dataset import Dataset
from diffumask.noise import FilterConfig, filter_dataset, primary_class
from diffumask.segment import TrainConfig
from diffumask.shapes import CLASSES
from diffumask.shapes.classifier import clean, foreground, is_present, load_classifier

ALPHAS = (0.3, 0.5, 0.7)
PLAIN = dict(blur=0.0, occlusion=0.0, perspective=0.0)  # AugmentConfig's defaults turn Φ2-Φ4 on; a row names what it adds
AUGMENT_ROWS = {  # AugmentConfig's fields, per row
    "Φ1": dict(PLAIN, grids=(2,)),
    "Φ1+Φ2": dict(PLAIN, grids=(2,), blur=0.5),
    "Φ1+Φ2+Φ3": dict(PLAIN, grids=(2,), blur=0.5, occlusion=0.5),
    "Φ1+Φ2+Φ3+Φ4": dict(grids=(2,), blur=0.5, occlusion=0.5, perspective=0.5),
    # not the paper's (real scenes hold 1-3 objects of several sizes): 2x2 and 3x3 mosaics; copy-paste of
    # 1-2 other items' objects onto each item, alone and onto 2x2 mosaics
    "Φ1-k23": dict(PLAIN, grids=(2, 3)),
    "paste": dict(PLAIN, grids=(1,), paste=1.0),
    "Φ1+paste": (PASTE := dict(PLAIN, grids=(2,), paste=1.0)),
    # half the test split's objects cover under 100 of its 1024 pixels: 1-3 pasted objects down to 0.3 of
    # the side; one mosaic or one item with copy-paste; three, ten and twenty times as many augmented items
    "Φ1+paste-small": dict(PASTE, paste_objects=(1, 3), paste_scale=(0.3, 0.9)),
    "k12+paste": dict(PASTE, grids=(1, 2)),
    "Φ1+paste-3x": dict(PASTE, copies=3),
    "Φ1+paste-10x": dict(PASTE, copies=10),
    "Φ1+paste-20x": dict(PASTE, copies=20),
    # Φ1+paste's items drawn as often as the 10x row draws its own: the share apart from the count
    "Φ1+paste-share91": dict(PASTE, share=10 / 11),
    # mosaics with copy-paste made afresh for each training sample, never written (train --augment +mosaic,paste),
    # for three in four of the samples (train's default), for nine in ten, for all and for half
    "Φ1+paste-live-75": dict(live=0.75),
    "Φ1+paste-live-90": dict(live=0.9),
    "Φ1+paste-live-all": dict(live=1.0),
    "Φ1+paste-live-50": dict(live=0.5),
}  # copies: augmented items per item of the row's base (1: as many, AugmentConfig's default); share: the augmented
#    items' share of the training samples (default: in proportion to the item counts, train's own default); live:
#    no augmented dataset, train's composite share instead
TABLE_4D = ("Φ1", "Φ1+Φ2", "Φ1+Φ2+Φ3", "Φ1+Φ2+Φ3+Φ4")


def judged(dataset: Dataset) -> dict[str, tuple[bool, float, str]]:
    """Per item: (the object has its class's shape, IoU of the class mask with the object's pixels, the
    shape the classifier sees, or "none")."""
    classifier = load_classifier()
    out = {}
    for record in dataset.records():
        truth = clean(foreground(dataset.read_image(record["id"])))
        name = record["classes"][0]
        seen = classifier.predict([truth])[0] if is_present(truth) else "none"
        labelled = dataset.read_mask(record["id"]) == dataset.class_index(name)
        union = (labelled | truth).sum()
        out[record["id"]] = (seen == name, float((labelled & truth).sum() / union) if union else 0.0, seen)
    return out


def random_cut(dataset: Dataset, alpha: float, seed: int) -> list[str]:
    """Ids that a random cut keeps: in each class, the same number noise learning keeps at ``alpha``."""
    rng = np.random.default_rng([seed, round(alpha * 1000)])
    dropped = {i for name, ids in sorted(by_class(dataset).items())
               for i in rng.permutation(sorted(ids))[:math.floor(alpha * len(ids))]}
    return [r["id"] for r in dataset.records() if r["id"] not in dropped]


def by_class(dataset: Dataset) -> dict[str, list[str]]:
    """Item ids by the class each was drawn for, as filter ranks them."""
    out: dict[str, list[str]] = {}
    for record in dataset.records():
        out.setdefault(primary_class(record), []).append(record["id"])
    return out


def recut(config: FilterConfig, alphas: list[float]) -> dict[float, list[str]]:
    """What each α keeps of ``config``'s dataset: filter's re-cut of its recorded scores, into split filtered-α."""
    return {a: filter_dataset(dataclasses.replace(config, prune=a, name=f"filtered-{a}"), progress=False,
                              recut=True).kept for a in alphas}


def chance_overlap(dataset: Dataset, alpha: float) -> float:
    """How many items two independent random cuts at ``alpha`` would share, on average."""
    return sum(math.floor(alpha * len(ids)) ** 2 / len(ids) for ids in by_class(dataset).values())


def repeat_folds(refined: Dataset, config: FilterConfig, repeat: int, work: Path,
                 alphas: list[float], quiet: bool) -> tuple[dict[float, list[str]], dict[str, float]]:
    """Noise learning again on a hard-linked copy of the refined images, with fold split ``repeat`` and the fold
    models' seed + ``repeat``: what each α keeps, and the scores."""
    data = subset(refined, work / f"{refined.root.name}-folds-{repeat}", [r["id"] for r in refined.records()])
    again = dataclasses.replace(config, dataset=str(data), seed=config.seed + repeat,
                                training=dataclasses.replace(config.training, seed=config.training.seed + repeat))
    filter_dataset(again, progress=not quiet)
    return recut(again, alphas), {r["id"]: r["noise"]["score"] for r in Dataset(data).records()}


def cut_by(refined: Dataset, scores: dict[str, float], out: Path, config: FilterConfig,
           alphas: list[float]) -> dict[float, list[str]]:
    """What each α keeps when items are ranked by ``scores``: filter's own re-cut, on a copy holding them."""
    data = subset(refined, out, [r["id"] for r in refined.records()])
    Dataset(data).update_records({i: {"noise": {"fold": -1, "score": score}} for i, score in scores.items()})
    return recut(dataclasses.replace(config, dataset=str(data)), alphas)


def catch_table(judge: dict[str, tuple[bool, float, str]], kept: dict[float, list[str]], alphas: list[float],
                refined: Dataset) -> None:
    """For each α, the share of wrong- and right-shape images pruned (and of bad and good masks), then per class."""
    wrong = [i for i, (right, _, _) in judge.items() if not right]
    right = [i for i, (r, _, _) in judge.items() if r]
    bad = [i for i, (_, iou, _) in judge.items() if iou < 0.5]
    good = [i for i, (_, iou, _) in judge.items() if iou >= 0.5]
    print(f"{'α':>4}  {'wrong shape pruned':>22}  {'right shape pruned':>22}  {'ratio':>5}  "
          f"{'mask IoU < 0.5 pruned':>22}  {'IoU ≥ 0.5 pruned':>22}")
    for alpha in alphas:
        pruned = set(judge) - set(kept[alpha])
        rates = [len(pruned & set(group)) / max(1, len(group)) for group in (wrong, right)]
        print(f"{alpha:>4g}  {share(pruned, wrong):>22}  {share(pruned, right):>22}  "
              f"{rates[0] / max(rates[1], 1e-9):5.2f}  {share(pruned, bad):>22}  {share(pruned, good):>22}", flush=True)
    classes = {i: name for name, ids in by_class(refined).items() for i in ids}
    print(f"\nwrong-shape images pruned at α {' / '.join(map(str, alphas))}, per class: " + "; ".join(
        f"{name} " + " / ".join(f"{len((set(judge) - set(kept[a])) & set(ids))}" for a in alphas) + f" of {len(ids)}"
        + " (seen as " + ", ".join(f"{seen} {n}" for seen, n in Counter(judge[i][2] for i in ids).most_common()) + ")"
        for name in CLASSES if (ids := [i for i in wrong if classes[i] == name])), flush=True)


def share(pruned: set[str], ids: list[str]) -> str:
    return f"{100 * len(pruned & set(ids)) / len(ids):5.1f} % of {len(ids):3d}" if ids else "    - of   0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("bench_downstream_work"))
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--steps", type=int, default=2500, help="training steps of every table row")
    parser.add_argument("--fold-steps", type=int, default=1200, help="training steps of each fold model")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--fold-repeats", type=int, default=1,
                        help="the catch again with other fold splits and fold-model seeds, each on a hard-linked copy "
                             "of the images, and with the runs' scores averaged; how stable are the scores? (default: 1)")
    parser.add_argument("--fold-augment", help="the fold models' on-the-fly augmentation (train's --augment, e.g. "
                        "+mosaic,paste; default: the preset's); give it its own --work")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rows", default="catch,alpha,augment")
    parser.add_argument("--augment-rows", default=",".join(TABLE_4D),
                        help=f"which augmentation rows (default: Table 4 (d)'s; of {', '.join(AUGMENT_ROWS)})")
    parser.add_argument("--alphas", default=",".join(map(str, ALPHAS)),
                        help="the shares pruned in the catch table and the alpha and random rows (default: %(default)s)")
    parser.add_argument("--augment-alpha", type=float,
                        help="the α whose kept items the augment rows start from (default: the best α row's; "
                             "0 augments every refined image and needs no noise learning)")
    parser.add_argument("--model", default="shapes",
                        help="the generator of the synthetic images: the built-in shapes model (default) or another "
                             "saved shapes pipeline, as bench_downstream's --model; give it its own --work")
    parser.add_argument("--guidance", type=float,
                        help="the generator's guidance scale, as bench_downstream's --guidance: 1 (no classifier-free "
                             "guidance) draws the wrong shape more often; give it its own --work")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    started = time.monotonic()
    wanted = set(args.rows.split(","))
    alphas = [float(a) for a in args.alphas.split(",")]
    if not all(0 < a < 1 for a in alphas):
        parser.error(f"--alphas are shares pruned, each in (0, 1), got {args.alphas}")
    if args.fold_repeats < 1 or (args.fold_repeats > 1 and "catch" not in wanted):
        parser.error("--fold-repeats is how many times the catch row runs noise learning: 1 or more, with --rows catch")
    if args.augment_alpha not in (None, 0.0, *alphas):
        parser.error(f"--augment-alpha {args.augment_alpha} is not among --alphas {args.alphas}")
    if unknown := set(args.augment_rows.split(",")) - set(AUGMENT_ROWS):
        parser.error(f"unknown --augment-rows {', '.join(sorted(unknown))}; choose from {', '.join(AUGMENT_ROWS)}")
    paths = prepare(args.work, args.n, [args.n], args.model, args.guidance)
    refined = Dataset(paths[f"refined-{args.n}"])
    training = TrainConfig(data=[], out="", preset=args.preset, steps=args.fold_steps, seed=args.seed,
                           workers=args.workers, augment=args.fold_augment.split(",") if args.fold_augment else None)
    config = FilterConfig(dataset=str(refined.root), training=training, folds=args.folds, prune=0.0, name="filtered-0")
    kept = {}
    if wanted & {"catch", "alpha"} or ("augment" in wanted and args.augment_alpha != 0):
        filter_dataset(config, progress=not args.quiet)
        kept = recut(config, alphas)
    if "catch" in wanted:
        judge = judged(refined)
        print(f"\nnoise learning on {len(judge)} refined images ({args.folds} folds, {args.fold_steps} steps each)")
        catch_table(judge, kept, alphas, refined)
        if args.fold_repeats > 1:
            repeat_scores = [{r["id"]: r["noise"]["score"] for r in refined.records()}]
            for repeat in range(1, args.fold_repeats):
                repeat_kept, scores = repeat_folds(refined, config, repeat, args.work, alphas, args.quiet)
                repeat_scores.append(scores)
                print(f"\nrepeat {repeat}: another fold split and training seed")
                catch_table(judge, repeat_kept, alphas, refined)
                ids = sorted(scores)
                print(f"its scores against the first run's: correlation "
                      f"{np.corrcoef([scores[i] for i in ids], [repeat_scores[0][i] for i in ids])[0, 1]:.2f}; "
                      "pruned by both at α " + ", ".join(
                          f"{a}: {len(set(ids) - set(kept[a]) - set(repeat_kept[a]))} of {len(ids) - len(kept[a])} "
                          f"({chance_overlap(refined, a):.0f} by chance)" for a in alphas), flush=True)
            mean = {i: float(np.mean([scores[i] for scores in repeat_scores])) for i in repeat_scores[0]}
            print(f"\nthe {args.fold_repeats} runs' scores averaged (repeated cross-validation)")
            catch_table(judge, cut_by(refined, mean, args.work / f"{refined.root.name}-folds-mean", config, alphas), alphas,
                        refined)
    rows = []
    if "alpha" in wanted:
        rows.append(run_row("c-refined", [refined.root], args.work, args, paths["test"], label="α 0 (row c)"))
        for alpha in alphas:
            kept_set = subset(refined, args.work / f"filtered-{args.n}-{alpha}", kept[alpha])
            rows.append(run_row(f"noise-{alpha}", [kept_set], args.work, args, paths["test"], label=f"α {alpha}"))
    if "random" in wanted:
        for alpha in alphas:
            kept_set = subset(refined, args.work / f"random-{args.n}-{alpha}", random_cut(refined, alpha, args.seed))
            rows.append(run_row(f"random-{alpha}", [kept_set], args.work, args, paths["test"], label=f"random {alpha}"))
    if "augment" in wanted:
        best = max((r for r in rows if r["row"].startswith("α")), key=lambda r: r["miou_shapes"], default=None)
        alpha = args.augment_alpha if args.augment_alpha is not None else float(best["row"].split()[1]) if best else alphas[-1]
        base = args.work / f"filtered-{args.n}-{alpha}" if alpha else refined.root
        base = subset(refined, base, kept[alpha]) if alpha else base
        for name in args.augment_rows.split(","):
            fields = dict(AUGMENT_ROWS[name])
            if (live := fields.pop("live", None)) is not None:
                rows.append(run_row(f"aug-{alpha}-{name}", [base], args.work, args, paths["test"],
                                    label=f"α {alpha} + {name}", augment=["+mosaic", "paste"],
                                    extra={"composite_share": live}))
                continue
            if (copies := fields.pop("copies", 1)) != 1:
                fields["items"] = copies * len(Dataset(base).split_ids("train"))
            augmented_share = fields.pop("share", None)  # not `share`: that is the catch table's helper
            weights = None if augmented_share is None else [1 - augmented_share, augmented_share]
            out = args.work / f"augmented-{args.n}-{alpha}-{name}"
            augment_dataset(base, out, AugmentConfig(**fields, seed=args.seed), progress=not args.quiet)
            rows.append(run_row(f"aug-{alpha}-{name}", [base, out], args.work, args, paths["test"], weights=weights,
                                label=f"α {alpha} + {name}"))
    if rows:
        print(f"\n{'row':<24}" + "".join(f"{c:>9}" for c in CLASSES) + f"{'mIoU':>8}{'1 obj':>7}{'2-3':>7}{'min':>6}")
        for r in rows:
            print(f"{r['row']:<24}" + "".join(f"{100 * r['iou'][c]:9.1f}" for c in CLASSES)
                  + f"{100 * r['miou_shapes']:8.1f}{percent(r['miou_one']):>7}{percent(r['miou_several']):>7}"
                  + f"{r['minutes']:6.1f}")
        print_by_area(rows)
        print(json.dumps(rows))
    print(f"\nwall time {(time.monotonic() - started) / 60:.1f} minutes (data, folds, rows; what --work held was reused)")


if __name__ == "__main__":
    main()
