"""`refine`'s cost per image on a dataset made elsewhere (e.g. 512 px by bench/gpu_checks.sh), per method.

    python bench/bench_refine_gpu.py DATASET [--methods threshold,propagate] [--workers N] [--device cuda]

Each method runs on a copy of the dataset (the original keeps its masks), every item, through
``refine_dataset``; seconds per image exclude the AffinityNet's seeds and training, printed apart. The CRF
runs in the CPU workers (refine's default), or on the GPU in the ``@gpu`` rows (``--crf-device device``).
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

#: row name: (RefineConfig options, refine's device_crf: the CRF in the CPU workers, or ``@gpu`` on the GPU)
ROWS = {
    "threshold": (dict(method="threshold"), False),
    "threshold+crf": (dict(method="threshold", crf=True), False),
    "threshold+crf@gpu": (dict(method="threshold", crf=True), True),
    "otsu": (dict(method="otsu"), False),
    "propagate": (dict(method="propagate"), False),
    "propagate+crf": (dict(method="propagate", crf=True), False),
    "propagate+crf@gpu": (dict(method="propagate", crf=True), True),
    "affinity": (dict(method="affinity"), False),
    "affinity+crf": (dict(method="affinity", crf=True), False),
    "affinity+crf@gpu": (dict(method="affinity", crf=True), True),
    "adaptive+crf": (dict(method="adaptive", crf=True), False),
    "adaptive+crf+reference-crf": (dict(method="adaptive", crf=True, reference_crf=True), False),
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
        refine_dataset(warm_up, RefineConfig(method="threshold", crf=True), progress=False, redo=True,
                       device=args.device, workers=args.workers, device_crf=True)  # CUDA's start, the CRF's imports
        shutil.rmtree(warm_up)
        rows = args.methods.split(",")
        width = max(map(len, rows))
        for row in rows:
            copy = Path(scratch) / row
            shutil.copytree(args.dataset, copy)
            options, device_crf = ROWS[row]
            try:
                result = refine_dataset(copy, RefineConfig(**options), progress=False, redo=True,
                                        device=args.device, workers=args.workers, device_crf=device_crf)
            except Exception as error:  # one row's failure must not cost the others' figures on a lent GPU
                print(f"{row:{width}s} failed: {type(error).__name__}: {error}", flush=True)
                continue
            finally:
                shutil.rmtree(copy)
            per_image = result.seconds / max(result.refined, 1)
            extra = f"; AffinityNet seeds + training {result.train_seconds:.1f} s" if result.train_seconds else ""
            print(f"{row:{width}s} {per_image * 1000:8.1f} ms/image over {result.refined} images{extra}", flush=True)


if __name__ == "__main__":
    main()
