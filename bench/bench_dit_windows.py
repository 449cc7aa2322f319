"""Which joint-attention blocks and steps give the best masks, on the shapes world's diffusion transformer.

    python bench/bench_dit_windows.py --weights DIR [--per-class 10] [--gamma G]

DIR is a shapes DiT (``python -m diffumask.shapes.train --backbone dit --out DIR``): an SD3-shaped
transformer, so its masks come from the same recorder as SD3's. One-object prompts on the development
seeds of ``bench_shapes.py --tune`` are generated once per window (the recorder does not change the
images, so every window sees the same pictures), and each window's class maps are scored against the
objects' exact pixels (read back by chroma): mIoU at ``--gamma`` and at the best γ of the sweep. Block
windows are fractions of the depth: every block alone, thirds, halves, all; then step windows with the best
block window. Also prints presence and right-shape rates, which say whether the model draws the world.
"""

from __future__ import annotations

import argparse
import time

import torch

from diffumask.shapes.classifier import load_classifier
from diffumask.shapes.evaluate import GAMMA_SWEEP, generate, judge, miou, prompts_for
from diffumask.shapes.model import DEFAULT_GUIDANCE, DEFAULT_STEPS, load_pipeline

TUNE_SEED = 2_000_000  # bench_shapes.py's development seeds


def block_windows(depth: int) -> dict[str, tuple[float, float]]:
    windows = {f"block {i}": (i / depth, (i + 1) / depth) for i in range(depth)}
    windows.update({"first third (default)": (0.0, 1 / 3), "middle third": (1 / 3, 2 / 3), "last third": (2 / 3, 1.0),
                    "first half": (0.0, 0.5), "last half": (0.5, 1.0), "middle half": (0.25, 0.75), "all": (0.0, 1.0)})
    return windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="a shapes DiT folder")
    parser.add_argument("--per-class", type=int, default=10, help="one-object prompts per class (default: 10)")
    parser.add_argument("--gamma", type=float, default=0.6, help="the fixed threshold reported beside the best")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    pipe = load_pipeline(path=args.weights)
    depth = len(pipe.transformer.transformer_blocks)
    classifier = load_classifier()
    prompts = prompts_for(1, args.per_class, TUNE_SEED + 1)
    call = {"guidance_scale": args.guidance, "num_inference_steps": args.steps}

    def score(**recorder: object) -> tuple[float, float, float, list]:
        samples, _ = generate(pipe, prompts, TUNE_SEED + 10, recorder=recorder, **call)
        judge(samples, classifier)
        sweep = {g: miou(samples, g) for g in GAMMA_SWEEP}
        best = max(sweep, key=sweep.get)
        return sweep[args.gamma], sweep[best], best, samples

    start = time.perf_counter()
    results = {}
    for name, window in block_windows(depth).items():
        fixed, best, gamma, samples = score(block_window=window, steps=None)
        results[name] = (window, best)
        print(f"{name:24s} blocks {window[0]:.2f}-{window[1]:.2f}: mIoU {fixed:.3f} at γ {args.gamma}, "
              f"{best:.3f} at γ {gamma}", flush=True)
    present = sum(s.present[c] for s in samples for c in s.maps) / len(samples)
    right = sum(s.shape[c] == c for s in samples for c in s.maps) / len(samples)
    print(f"{len(samples)} images per window; object present {100 * present:.1f} %, right shape {100 * right:.1f} %")
    name, (window, _) = max(results.items(), key=lambda item: item[1][1])
    print(f"best block window: {name} ({window[0]:.2f}-{window[1]:.2f})")
    for steps in ((0.0, 0.5), (0.5, 1.0), (0.25, 0.75), (0.75, 1.0)):
        calls = (round(steps[0] * args.steps), round(steps[1] * args.steps))
        fixed, best, gamma, _ = score(block_window=window, steps=calls)
        print(f"  with steps {steps[0]:.2f}-{steps[1]:.2f} of the denoising: mIoU {fixed:.3f} at γ {args.gamma}, "
              f"{best:.3f} at γ {gamma}", flush=True)
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
