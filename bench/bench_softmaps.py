"""What storing only the largest share of each self-attention row, or recording it at every k-th step
only, costs `propagate`, on the shapes world.

    python bench/bench_softmaps.py [--work DIR] [--keep 1 0.25 0.125 0.0625] [--every 1 2 4] [--crf]

Generates bench_refine's 300 shapes images once with the self-attention stored dense
(``self_attention_keep=1``), then, for each share kept, sparsifies every matrix as ``generate`` would
store it (``softmaps.sparsify_rows``: largest entries, 8-bit values) and reads it back as readers do
(``densify_rows``, rows renormalised), and scores `propagate` (its defaults, with the cleanup) against
the objects' true pixels, as bench_refine does. Also prints the compressed bytes of each share's file.
``--crf`` also scores each mask after the result CRF, as ``refine --method propagate --crf`` makes it.
Each ``--every`` K > 1 generates the same images again with the self-attention recorded at every K-th
step (``generate --self-attention-every K``) and scores each share on them too.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from bench_refine import BENCH_SEED, Overlap, truths

from diffumask.dataset import Dataset
from diffumask.generate import GenerateConfig, generate_dataset
from diffumask.masks.cleanup import cleanup_mask
from diffumask.masks.crf import crf_refine
from diffumask.masks.propagate import propagate_mask
from diffumask.refine import RefineConfig
from diffumask.shapes import CLASSES
from diffumask.softmaps import densify_rows, sparsify_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("bench_refine_work/softmaps"))
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.25, 0.125, 0.0625])
    parser.add_argument("--every", type=int, nargs="+", default=[1], help="self-attention at every K-th step")
    parser.add_argument("--crf", action="store_true", help="also score each mask after the result CRF")
    args = parser.parse_args()
    for every in args.every:
        config = GenerateConfig(classes=list(CLASSES), out=str(args.work / ("dataset" if every == 1 else
                                                                               f"dataset-every-{every}")),
                                images_per_class=args.per_class, seed=BENCH_SEED, batch_size=60,
                                self_attention_keep=1.0, self_attention_every=every)
        score(generate_dataset(config, progress=True), args.keep, every, args.crf)


def score(dataset: Dataset, shares: list[float], every: int, crf: bool) -> None:
    truth = truths(dataset)
    defaults = RefineConfig(method="propagate")
    images = {r["id"]: dataset.read_image(r["id"]) for r in dataset.records()} if crf else {}
    records = dataset.records()
    soft = {r["id"]: dataset.read_soft_maps(r["id"]) for r in records}
    print(f"propagate on {len(records)} shapes images, self-attention at every {every} step(s), stored dense "
          "vs its largest share per row")
    for keep in shares:
        overlap = Overlap()
        after_crf = Overlap()
        stored = 0
        for record in records:
            maps = dict(soft[record["id"]])
            key = next(k for k in maps if k.startswith("__self__@"))
            if keep < 1:
                parts = sparsify_rows(maps[key], keep)
                buffer = io.BytesIO()
                np.savez_compressed(buffer, **parts)
                stored += buffer.tell()
                maps[key] = densify_rows(parts["bits"], parts["values"], parts["scales"])
            name = record["classes"][0]
            mask = propagate_mask(maps, {name: 1}, record.get("resolutions"), tuple(record["size"]), defaults.power,
                                  defaults.propagate_threshold, defaults.propagate_uncertain)
            overlap.add(name, cleanup_mask(mask, defaults.min_area, defaults.max_hole), truth[record["id"]])
            if crf:
                refined = crf_refine(images[record["id"]], mask, [0, 1], defaults.crf_params)
                after_crf.add(name, cleanup_mask(refined, defaults.min_area, defaults.max_hole), truth[record["id"]])
        size = f"{stored / len(records) / 1e3:.1f} kB per matrix" if keep < 1 else "dense"
        with_crf = f", + CRF {after_crf.miou():.4f}" if crf else ""
        print(f"  keep {keep:.4f}: mIoU {overlap.miou():.4f}{with_crf} ({size})", flush=True)


if __name__ == "__main__":
    main()
