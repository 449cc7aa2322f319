"""The ``diffumask`` command: one subcommand per stage, thin over the Python API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import DiffumaskError
from .models import SCHEDULERS

EXAMPLES = """\
examples:
  diffumask generate --classes circle,star --images-per-class 20 --out data/shapes
  diffumask generate --model runwayml/stable-diffusion-v1-5 --classes "dog,potted plant" \\
      --images-per-class 1000 --out data/voc --device cuda --dtype float16 --batch-size 8
  diffumask shapes export data/shapes-real --train 2000 --val 200 --test 500
"""


def _csv(text: str) -> list[str]:
    items = [part.strip() for part in text.split(",")]
    return [item for item in items if item]


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _window(text: str) -> tuple[float, float]:
    try:
        start, stop = (float(v) for v in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START,STOP fractions such as 0.6,1.0, got {text!r}") from None
    return start, stop


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="generate images with per-class soft maps and masks into a dataset folder",
        description="Generate images for each class, read each class's map from the UNet's cross-attention "
                    "and write a Pascal-VOC-style dataset (JPEGImages, SegmentationClass, SoftMaps, manifest). "
                    "Re-running the same command resumes; a larger --images-per-class extends the dataset.",
        epilog=EXAMPLES,
    )
    p.add_argument("--classes", type=_csv, required=True,
                   help="comma-separated class names, e.g. 'dog,potted plant'; each must appear in its prompts")
    p.add_argument("--out", required=True, help="dataset folder to create or resume")
    p.add_argument("--model", default="shapes",
                   help="'shapes' (built-in, offline), a local diffusers folder, or a Hugging Face hub id "
                        "(default: shapes)")
    p.add_argument("--images-per-class", type=int, default=10, help="images to generate per class (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="base seed; each item's seed derives from (seed, class, index)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's own, 50 for Stable Diffusion)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's own, 7.5 for SD)")
    p.add_argument("--scheduler", choices=list(SCHEDULERS),
                   help="sampler: pndm (the paper's), ddim, dpm++ or euler (default: the model's own)")
    p.add_argument("--size", type=int, help="image height and width in pixels (default: the model's native size)")
    p.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (default: 4)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="model precision (default: float16 on cuda, float32 elsewhere)")
    p.add_argument("--negative-prompt", help="text to steer away from, used as the unconditional prompt")
    p.add_argument("--prompts", default="auto",
                   help="prompt bank: voc, cityscapes, shapes, default, or a YAML/JSON file "
                        "(default: auto = shapes for the shapes model, else VOC/Cityscapes entries or open vocabulary)")
    p.add_argument("--resolutions", type=_ints,
                   help="attention grid sizes to fuse, e.g. 16,32,64 (default: latent/4, latent/2, latent/1)")
    p.add_argument("--layers", type=_csv,
                   help="record only cross-attention layers whose module path starts with one of these, "
                        "e.g. up_blocks.3 (default: all)")
    p.add_argument("--step-window", type=_window,
                   help="record only this fraction of the denoising steps, e.g. 0.6,1.0 for the last 40%% (default: all)")
    p.add_argument("--self-attention", type=lambda v: None if v == "none" else int(v), default=2, metavar="F",
                   help="also store the mean self-attention at latent/F for self-attention propagation "
                        "(default: 2, i.e. 32x32 at 512 px, 2 MiB per image; 'none' to skip)")
    p.add_argument("--threshold", type=float, default=0.4, help="γ: a pixel belongs to the class when its map exceeds it (default: 0.4)")
    p.add_argument("--uncertain", type=float,
                   help="lower edge of an uncertainty band: pixels with map in (uncertain, threshold] are labelled 255 (ignored)")
    p.add_argument("--image-format", choices=["jpg", "png"], default="jpg", help="image files (default: jpg, quality 95)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) of --model")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> None:
    import torch

    from .generate import GenerateConfig, generate_dataset

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype != "auto" else ("float16" if device.startswith("cuda") else "float32")
    config = GenerateConfig(
        classes=args.classes, out=args.out, images_per_class=args.images_per_class, model=args.model,
        seed=args.seed, steps=args.steps, guidance=args.guidance, scheduler=args.scheduler, size=args.size,
        negative_prompt=args.negative_prompt, prompts=args.prompts, resolutions=args.resolutions,
        layers=args.layers, step_window=args.step_window, self_attention=args.self_attention, threshold=args.threshold, uncertain=args.uncertain,
        image_format=args.image_format, batch_size=args.batch_size, device=device, dtype=dtype,
        revision=args.revision,
    )
    if args.quiet:
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    dataset = generate_dataset(config, progress=not args.quiet)
    print(f"{len(dataset.records())} items in {dataset.root}")


def _add_shapes(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shapes", help="the built-in shapes world: export ground-truth data, train its model")
    shapes = p.add_subparsers(dest="shapes_command", required=True, metavar="{export,train}")
    export = shapes.add_parser(
        "export", help="write procedural scenes with exact masks as a dataset (train/val/test splits)",
        description="Render the shapes world's scenes (images, captions, exact class masks) into one dataset "
                    "folder with train, val and test splits: the 'real data' of experiments.")
    export.add_argument("out", help="dataset folder")
    export.add_argument("--train", type=int, default=1000, help="train scenes (default: 1000)")
    export.add_argument("--val", type=int, default=100, help="val scenes (default: 100)")
    export.add_argument("--test", type=int, default=200, help="test scenes (default: 200)")
    export.add_argument("--seed", type=int, default=0, help="world seed (default: 0)")
    export.set_defaults(run=_run_shapes_export)
    train = shapes.add_parser("train", add_help=False,
                              help="train the shapes text-to-image model from scratch (see --help)")
    train.add_argument("train_args", nargs=argparse.REMAINDER)
    train.set_defaults(run=_run_shapes_train)


def _run_shapes_train(args: argparse.Namespace) -> None:
    from .shapes.train import main as train_main

    train_main(args.train_args)


def _run_shapes_export(args: argparse.Namespace) -> None:
    from .shapes import export_world

    out = export_world(args.out, args.train, args.val, args.test, seed=args.seed)
    print(f"wrote {args.train} train, {args.val} val and {args.test} test scenes to {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffumask", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Semantic-segmentation training data from class names: a text-to-image diffusion model "
                    "generates the images and its cross-attention gives each class's mask (DiffuMask).",
        epilog=EXAMPLES,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"diffumask {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,shapes}")
    _add_generate(sub)
    _add_shapes(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except DiffumaskError as error:
        print(f"diffumask: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffumask: interrupted; finished items are kept, re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
