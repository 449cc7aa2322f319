"""`refine`'s cost per image on a dataset made elsewhere (e.g. 512 px by bench/gpu_checks.sh), per method.

    python bench/bench_refine_gpu.py DATASET [--methods threshold,propagate] [--workers N] [--device cuda]

Each method runs on a copy of the dataset (the original keeps its masks), every item, through
``refine_dataset``; seconds per image exclude the AffinityNet's seeds and training, printed apart.
One untimed ``threshold`` pass first pays the once-per-process costs (CUDA's start, lazy imports),
which a long run spreads over tens of thousands of items and a short one would put on its first row.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from diffumask.models import default_device
from diffumask.refine import RefineConfig, refine_dataset
from diffumask.workers import available_cores

#: (row name, RefineConfig options)
ROWS = {
    "threshold": dict(method="threshold"),
    "threshold+crf": dict(method="threshold", crf=True),
    "otsu": dict(method="otsu"),
    "propagate": dict(method="propagate"),
    "propagate+crf": dict(method="propagate", crf=True),
    "affinity": dict(method="affinity"),
    "adaptive+crf": dict(method="adaptive", crf=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--methods", default=",".join(ROWS), help=f"rows to run (default: all: {','.join(ROWS)})")
    parser.add_argument("--workers", type=int, default=available_cores(),
                        help="CPU worker processes, as `diffumask refine` defaults to (default: the cores available)")
    parser.add_argument("--device", default=default_device(), help="refine's --device (default: cuda if available)")
    args = parser.parse_args()
    print(f"refine on {args.device} with {args.workers} workers", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        warm_up = Path(scratch) / "warm-up"
        shutil.copytree(args.dataset, warm_up)
        refine_dataset(warm_up, RefineConfig(method="threshold"), progress=False, redo=True, device=args.device,
                       workers=args.workers)
        shutil.rmtree(warm_up)
        for row in args.methods.split(","):
            copy = Path(scratch) / row
            shutil.copytree(args.dataset, copy)
            result = refine_dataset(copy, RefineConfig(**ROWS[row]), progress=False, redo=True, device=args.device,
                                    workers=args.workers)
            per_image = result.seconds / max(result.refined, 1)
            extra = f"; AffinityNet seeds + training {result.train_seconds:.1f} s" if result.train_seconds else ""
            print(f"{row:14s} {per_image * 1000:8.1f} ms/image over {result.refined} images{extra}", flush=True)
            shutil.rmtree(copy)


if __name__ == "__main__":
    main()
