"""The ``diffumask`` command: one subcommand per stage, thin over the Python API."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import ConfigError, DiffumaskError, one_line
from .models import SCHEDULERS
from .softmaps import SELF_ATTENTION_KEEP

EXAMPLES = """\
examples:
  diffumask generate --classes circle,star --images-per-class 20 --out data/shapes
  diffumask generate --model stable-diffusion-v1-5/stable-diffusion-v1-5 --classes "dog,potted plant" \\
      --images-per-class 1000 --out data/voc --device cuda --dtype float16 --batch-size 8
  diffumask shapes export data/shapes-real --train 2000 --val 200 --test 500
  diffumask train data/shapes --out runs/shapes && diffumask evaluate runs/shapes data/shapes-real --split test
"""


def _csv(text: str) -> list[str]:
    """Comma-separated names; a trailing comma is fine, an empty name between two (a name left out?) is not."""
    items = [part.strip() for part in text.split(",")]
    if not any(items):
        return []  # the command says what it needs
    if len(items) > 1 and not items[-1]:
        items.pop()
    if not all(items):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty name between two commas; list each name once, "
                                         "e.g. dog,cat")
    return items


def _ints(text: str) -> list[int]:
    return _numbers(text, int, "integers")


def _floats(text: str) -> list[float]:
    return _numbers(text, float, "numbers")


def _numbers(text: str, kind: type, what: str) -> list:
    try:
        return [kind(v) for v in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None


def _pair(kind: type, expected: str) -> Callable[[str], tuple]:
    """An argparse type for exactly two comma-separated numbers, e.g. a range."""

    def parse(text: str) -> tuple:
        try:
            low, high = (kind(v) for v in _csv(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        return low, high

    return parse


_window = _pair(float, "START,STOP fractions such as 0.6,1.0")


def _shard(text: str) -> str:
    from .distributed import parse_shard

    try:
        index, count = parse_shard(text, "")
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error).strip()) from None
    return f"{index}/{count}"


SHARD_HELP = ("do share INDEX (from 0) of COUNT independent jobs that write this one dataset, each the same command "
              "but for INDEX, e.g. the tasks of a job array: --shard $SLURM_ARRAY_TASK_ID/16 with sbatch "
              "--array=0-15 (COUNT written out: a resubmitted task's $SLURM_ARRAY_TASK_COUNT is not the array's; PBS "
              "Pro: $PBS_ARRAY_INDEX; LSF and SGE count from 1: $((LSB_JOBINDEX-1)), $((SGE_TASK_ID-1))). The shares "
              "never overlap (a share started with other options than those at work is refused), a share may run "
              "under torchrun or srun, a share killed or failed resumes when run "
              "again, and the job that finishes the last item merges the manifest; the result is the same as one "
              "process's (default: $DIFFUMASK_SHARD, else the whole job)")


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
                   help="'shapes' (built-in, offline), a local diffusers folder, or a Hugging Face hub id of a "
                        "text-to-image Stable Diffusion 1.x/2.x/XL, SD3/3.5 or FLUX.1 pipeline (others are refused "
                        "before any weights load) (default: shapes)")
    p.add_argument("--images-per-class", type=int, default=10, help="images to generate per class (default: 10)")
    p.add_argument("--compose", type=int, default=0, metavar="N",
                   help="also N images per class that show it with other classes of --classes: the prompt bank's "
                        "multi-class templates ('a {person} riding a {horse}') or a pair of classes; each item lists "
                        "all its classes and its mask gives each pixel to the class whose map wins (default: 0)")
    p.add_argument("--seed", type=int, default=0,
                   help="base seed; each item's seed derives from (seed, class, index) (default: 0)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's own, 50 for Stable Diffusion)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's own, 7.5 for SD)")
    p.add_argument("--scheduler", choices=list(SCHEDULERS),
                   help="sampler: pndm (the paper's), ddim, dpm++ or euler (default: the model's own)")
    p.add_argument("--size", type=int, help="image height and width in pixels (default: the model's native size)")
    p.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (default: 4)")
    p.add_argument("--writers", type=int, metavar="N",
                   help="threads that fuse, threshold and write items while the next batch denoises; the bytes do "
                        "not depend on it (default: 1 on a CPU, whose cores the pipeline uses, else 2)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: cuda if available, else cpu)")
    p.add_argument("--shard", type=_shard, metavar="INDEX/COUNT", help=SHARD_HELP)
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="model precision (default: on cuda bfloat16 for SD3 and FLUX, float16 for the rest; "
                        "float32 elsewhere)")
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
    p.add_argument("--block-window", type=_window,
                   help="diffusion transformers (SD3, FLUX): record only this fraction of the joint-attention blocks, "
                        "e.g. 0.25,0.75 (default: the first third, 0,0.333: the best masks on the shapes world's DiT)")
    p.add_argument("--text-tokens", choices=["both", "clip", "t5"],
                   help="SD3: which part of the joint context gives a word's map, its CLIP tokens, its T5 tokens or "
                        "both (default: both; FLUX reads T5 only)")
    p.add_argument("--self-attention", type=lambda v: None if v == "none" else int(v), default=2, metavar="F",
                   help="also store the mean self-attention at latent/F for self-attention propagation "
                        "(default: 2, i.e. 32x32 at 512 px; 'none' to skip)")
    p.add_argument("--self-attention-max", type=int, default=32, metavar="N",
                   help="halve the self-attention grid until no side exceeds N: SDXL at 1024 px records 32x32, "
                        "not 64x64, a 16x larger matrix (default: 32)")
    p.add_argument("--self-attention-every", type=int, default=2, metavar="K",
                   help="record the self-attention at every K-th step only: an affinity between places changes "
                        "slowly over the steps, and on a GPU each recorded matrix costs time; 1 for every step, "
                        "as datasets made before this option did (default: 2)")
    p.add_argument("--self-attention-keep", type=float, default=SELF_ATTENTION_KEEP, metavar="FRACTION",
                   help="share of each self-attention row stored (its largest entries; rows are peaked): "
                        "1/8 keeps a 512 px item near 0.18 MB; 1 stores the 1024x1024 matrix dense, 2 MB more "
                        f"(default: {SELF_ATTENTION_KEEP})")
    p.add_argument("--threshold", type=float,
                   help="γ in (0, 1): a pixel belongs to the class when its map exceeds it (default: the model's own; "
                        "0.4, the paper's, for Stable Diffusion)")
    p.add_argument("--uncertain", type=float,
                   help="lower edge of an uncertainty band, in (0, γ): pixels with map in (uncertain, threshold] are "
                        "labelled 255 (ignored) (default: no band)")
    p.add_argument("--image-format", choices=["jpg", "png"], default="jpg", help="image files (default: jpg, quality 95)")
    p.add_argument("--flagged", default="record", metavar="record|skip",
                   help="an image a pipeline's own safety checker blacked out: 'record' writes a manifest line marked "
                        "flagged and no files, 'skip' writes nothing, so a re-run tries it again (default: record)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) of --model")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> None:
    from .generate import GenerateConfig, generate_dataset, work_items

    config = GenerateConfig(
        classes=args.classes, out=args.out, images_per_class=args.images_per_class, model=args.model,
        compose=args.compose, seed=args.seed, steps=args.steps, guidance=args.guidance, scheduler=args.scheduler, size=args.size,
        negative_prompt=args.negative_prompt, prompts=args.prompts, resolutions=args.resolutions,
        layers=args.layers, step_window=args.step_window, block_window=args.block_window,
        text_tokens=args.text_tokens, self_attention=args.self_attention,
        self_attention_max=args.self_attention_max, self_attention_keep=args.self_attention_keep,
        self_attention_every=args.self_attention_every,
        threshold=args.threshold, uncertain=args.uncertain,
        image_format=args.image_format, batch_size=args.batch_size, writers=args.writers, device=args.device,
        dtype=args.dtype,
        revision=args.revision, flagged=args.flagged,
    )
    dataset = generate_dataset(config, progress=not args.quiet)
    from .distributed import current_worker

    worker = current_worker()
    finished = ""
    if worker.sharded:  # the worker that finishes the last item merges the shards: the dataset is whole
        ids = {item.id for item in work_items(config.classes, config.images_per_class, config.seed, config.compose)}
        finished = (f" (worker {worker.rank + 1} of {worker.world_size} finished the last share: the dataset is "
                    "complete)" if dataset.is_complete(ids) else
                    f" so far (worker {worker.rank + 1} of {worker.world_size} finished its share; the dataset is "
                    "whole once the others have finished theirs)")
    print(f"{len(dataset.records())} items in {dataset.root}{finished}")


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
    train = shapes.add_parser("train", add_help=False,  # its options and --help are the trainer's own
                              help="train the shapes text-to-image model from scratch (see --help)")
    train.set_defaults(run=_run_shapes_train, train_args=[])


def _run_shapes_train(args: argparse.Namespace) -> None:
    from .shapes.train import main as train_main

    train_main(args.train_args, prog="diffumask shapes train")


def _run_shapes_export(args: argparse.Namespace) -> None:
    from .shapes import export_world

    out = export_world(args.out, args.train, args.val, args.test, seed=args.seed)
    print(f"wrote {args.train} train, {args.val} val and {args.test} test scenes to {out}")


def _sweep(text: str) -> tuple[float, float, float]:
    try:
        start, stop, step = (float(v) for v in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START,STOP,STEP such as 0.35,0.54,0.01, got {text!r}") from None
    return start, stop, step


def _add_refine(sub: argparse._SubParsersAction) -> None:
    from .masks.affinity import SEED_GRID_RULES
    from .refine import METHODS, RefineConfig
    from .workers import available_cores

    p = sub.add_parser(
        "refine", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="rewrite a dataset's masks from its soft maps with a better method (adaptive γ, AffinityNet, CRF, ...)",
        description="Recompute every mask of a dataset folder from its soft maps; images and soft maps stay as they "
                    "are. Each new mask is written with its item's manifest line, which records the method and its "
                    "parameters under 'refine', so a killed run resumes where it stopped when the same command is "
                    "re-run.\n\n"
                    "methods:\n"
                    "  threshold  fixed γ (--threshold), optional uncertainty band (--uncertain, labelled 255)\n"
                    "  otsu       Otsu's threshold per image and class: no parameters, no training\n"
                    "  affinity   AffinityNet map alone: seeds → AffinityNet trained on the dataset → random walk\n"
                    "             (64 steps on min-max stretched maps, unanimous seed cells; the paper's code walks\n"
                    "             256 on the maps as they are and votes: see --walk-steps, --no-stretch, --seed-grid)\n"
                    "  adaptive   the paper's adaptive γ: the γ of a sweep whose CRF-refined mask best matches the\n"
                    "             AffinityNet map, per image (or per class with --per-class)\n"
                    "  propagate  Dataset Diffusion's self-attention propagation with its 0.5-0.6 band (255)\n"
                    "Every method can end with a dense CRF (--crf: in pydensecrf, pip install 'diffumask[crf]', "
                    "or in torch, at about half its speed on a CPU, without it) and ends with "
                    "the cleanup (--min-area, --max-hole).",
        epilog="examples:\n  diffumask refine data/shapes --method otsu --crf\n"
               "  diffumask refine data/shapes --method adaptive --per-class\n"
               "  diffumask refine data/shapes --method affinity --crf\n",
    )
    defaults = RefineConfig()  # every default below is the API's own
    crf, seed_crf, affinity = defaults.crf_params, defaults.seed_crf_params, defaults.affinity
    p.add_argument("dataset", help="dataset folder made by `diffumask generate`")
    p.add_argument("--method", choices=list(METHODS), required=True, help="how masks are made (see above)")
    p.add_argument("--threshold", type=float,
                   help="γ in (0, 1) of --method threshold, and adaptive's γ when no candidate matches the "
                        "AffinityNet map (default: the γ the dataset was generated with)")
    p.add_argument("--uncertain", type=float,
                   help="threshold: pixels with map in (uncertain, threshold] become 255; in (0, γ) (default: no band)")
    p.add_argument("--crf", action=argparse.BooleanOptionalAction, default=None,
                   help="dense CRF on the result (adaptive: on its shortlisted candidates; default: on for adaptive, off otherwise)")
    p.add_argument("--crf-srgb", type=float,
                   help="colour scale of every CRF's bilateral kernel (the result's and the AffinityNet seeds'); "
                        "larger groups textured backgrounds (default: " + (
                            f"{crf.bilateral_srgb:g}" if crf.bilateral_srgb == seed_crf.bilateral_srgb else
                            f"{crf.bilateral_srgb:g} for the result, {seed_crf.bilateral_srgb:g} for the seeds") + ")")
    p.add_argument("--crf-sxy", type=float, default=crf.bilateral_sxy,
                   help=f"spatial scale of the bilateral kernel, at {crf.reference_size} px, scaled to the image size "
                        f"(default: {crf.bilateral_sxy:g})")
    p.add_argument("--crf-gt-prob", type=float, default=crf.gt_prob,
                   help=f"how sure the CRF is of each pixel's input label, in (0, 1) (default: {crf.gt_prob:g})")
    p.add_argument("--crf-iterations", type=int, default=crf.iterations,
                   help=f"mean-field iterations of the result CRF, its cost (default: the paper's {crf.iterations})")
    p.add_argument("--crf-max-size", type=int, default=crf.max_size, metavar="PX",
                   help="larger images run the CRFs on a copy shrunk to this longer side, and a guided filter puts "
                        "their edges back on the image's: at 512 px 256 costs about 40 %% of the full-size CRF, at "
                        "1024 px 15 %% (bench/bench_crf_512.py: IoU 0.9999 at both against the full size's "
                        f"1.0000); 0: full size, the paper's (default: {crf.max_size})")
    p.add_argument("--min-area", type=float, default=defaults.min_area,
                   help=f"drop a class's blobs smaller than this fraction of the image (default: {defaults.min_area:g}; "
                        "0 keeps all)")
    p.add_argument("--max-hole", type=float, default=defaults.max_hole,
                   help=f"fill holes up to this fraction of the image (default: {defaults.max_hole:g}; 1 fills all, 0 none)")
    p.add_argument("--per-class", action="store_true", help="adaptive: one γ per class from its IoU-vs-γ curve")
    p.add_argument("--gammas", type=_sweep, metavar="START,STOP,STEP",
                   help="adaptive: the γ sweep (default: the paper's 0.35,0.54,0.01 moved to the dataset's γ: "
                        "γ-0.05 … γ+0.14, e.g. 0.55,0.74,0.01 for the shapes model)")
    p.add_argument("--crf-shortlist", type=int, default=defaults.crf_shortlist, metavar="K",
                   help="adaptive with CRF: score every γ's raw mask against the AffinityNet map and CRF only the K "
                        "best, which then compete (per class: curves from raw masks); 0 CRFs every candidate, as "
                        f"the paper does (default: {defaults.crf_shortlist})")
    p.add_argument("--reference-crf", action=argparse.BooleanOptionalAction, default=defaults.reference_crf,
                   help="adaptive with CRF: match candidates to the CRF-refined AffinityNet map instead of the raw one "
                        "(the paper's): a second CRF per image, 1.4× the cost at 512 px, for +0.006 mIoU per image "
                        "and +0.011 per class on the shapes benchmark (default: off)")
    p.add_argument("--affinity-epochs", type=float, default=affinity.epochs,
                   help="AffinityNet training length in passes over the dataset's images, in crops of "
                        f"{affinity.batch_size} (default: the paper's {affinity.epochs:g})")
    p.add_argument("--affinity-max-steps", type=int, default=affinity.max_steps,
                   help=f"at most this many training steps however large the dataset (default: {affinity.max_steps}; "
                        f"{affinity.epochs:g} epochs of up to {affinity.max_steps * affinity.batch_size // int(affinity.epochs)} "
                        "images, about 5 minutes on an H100)")
    p.add_argument("--affinity-steps", type=int,
                   help="exactly this many training steps instead of epochs (0 with --affinity-weights uses those "
                        "weights as they are)")
    p.add_argument("--affinity-weights", help="initialise the AffinityNet from these weights (.safetensors of the same "
                   "architecture, e.g. DATASET/refine/affinitynet-*.safetensors of another dataset)")
    p.add_argument("--affinity-background", type=float, default=affinity.background,
                   help="background score, in (0, 1), the random-walked maps must beat (default: the paper's "
                        f"{affinity.background:g}; with the stretch below it is a fraction of each map's own range, "
                        "without it of the map's maximum, as in the paper's code)")
    p.add_argument("--walk-steps", type=int, default=affinity.walk_steps,
                   help=f"random-walk steps on the affinity graph (default: {affinity.walk_steps}; the paper's code "
                        "walks 256, i.e. T^256, which on the shapes benchmark gave the AffinityNet map 0.850 mIoU "
                        "instead of 0.834, and 0.984 instead of 0.981 with --crf, for about twice the map's time)")
    p.add_argument("--no-stretch", action="store_true",
                   help="walk the soft maps as they are, as the paper's code does, instead of min-max stretching each "
                        "first (default: stretch; on the shapes benchmark the map without it fell from 0.834 to "
                        "0.770 mIoU, 0.981 to 0.936 with --crf)")
    p.add_argument("--seed-grid", choices=list(SEED_GRID_RULES), default=affinity.seed_grid,
                   help="AffinityNet seeds per feature-grid cell: 'unanimous' keeps cells whose pixels all agree "
                        "(others unsure), 'vote' takes each cell's most frequent seed, like PSA's pooled argmax "
                        f"(default: {affinity.seed_grid}; the same where the grid stride is 1, images up to 64 px; "
                        "at stride 2 on the shapes benchmark vote gave 0.800 mIoU instead of 0.797, 0.962 instead "
                        "of 0.963 with --crf)")
    p.add_argument("--beta", type=float, default=affinity.beta,
                   help=f"affinity power before the walk (default: PSA's {affinity.beta:g})")
    p.add_argument("--no-seed-crf", action="store_true", help="AffinityNet seeds without the CRF")
    p.add_argument("--power", type=int, default=defaults.power,
                   help=f"propagate: self-attention matrix power (default: {defaults.power})")
    p.add_argument("--propagate-threshold", type=float, default=defaults.propagate_threshold,
                   help=f"propagate: foreground above, in (0, 1) (default: {defaults.propagate_threshold:g})")
    p.add_argument("--propagate-uncertain", type=float, default=defaults.propagate_uncertain,
                   help=f"propagate: 255 band lower edge (default: {defaults.propagate_uncertain:g}; a negative value "
                        "disables the band)")
    p.add_argument("--device", help="where the AffinityNet, the random walk and the propagation run: cpu, cuda, "
                   "cuda:N, mps (default: cuda if available, else cpu; under torchrun or srun, cuda is each "
                   "worker's own GPU)")
    p.add_argument("--crf-device", choices=["workers", "device"], default="workers",
                   help="where --crf runs: in the CPU worker processes, or on --device in this process (in torch, "
                        "the same mean field as pydensecrf's; not for adaptive). One GPU call takes ~30 ms, bound "
                        "by its ~1500 kernel launches: 16 CPU workers keep up better (24 against 63 ms per image "
                        "on an H200 host); device helps where a GPU has few CPU cores (default: workers)")
    p.add_argument("--workers", type=int, default=available_cores(),
                   help="processes for the per-item CPU work: reading, CRF, cleanup (default: the cores this "
                        f"process may use, {available_cores()} here); the masks do not depend on it")
    p.add_argument("--shard", type=_shard, metavar="INDEX/COUNT", help=SHARD_HELP.replace("write", "refine"))
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_refine)


def _run_refine(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from .masks.adaptive import gamma_range
    from .refine import RefineConfig, refine_dataset
    from .workers import reuse_freed_memory

    reuse_freed_memory()  # this process refines too, with --workers 1 and on a GPU (the AffinityNet's training)
    defaults = RefineConfig()
    try:
        gammas = None if args.gammas is None else gamma_range(*args.gammas)
    except ValueError as error:
        raise DiffumaskError(str(error)) from None
    shared = {"max_size": args.crf_max_size or None}  # both CRFs, the result's and the AffinityNet seeds'
    if args.crf_srgb is not None:
        shared["bilateral_srgb"] = args.crf_srgb
    config = RefineConfig(
        method=args.method, threshold=args.threshold, uncertain=args.uncertain, crf=args.crf,
        crf_params=replace(defaults.crf_params, gt_prob=args.crf_gt_prob, bilateral_sxy=args.crf_sxy,
                           iterations=args.crf_iterations, **shared),
        seed_crf_params=replace(defaults.seed_crf_params, **shared),
        min_area=args.min_area, max_hole=args.max_hole, per_class=args.per_class, gammas=gammas,
        crf_shortlist=args.crf_shortlist, reference_crf=args.reference_crf,
        affinity=replace(defaults.affinity, train_steps=args.affinity_steps, epochs=args.affinity_epochs,
                         max_steps=args.affinity_max_steps, background=args.affinity_background,
                         walk_steps=args.walk_steps, beta=args.beta, seed_crf=not args.no_seed_crf,
                         stretch=not args.no_stretch, seed_grid=args.seed_grid),
        affinity_weights=args.affinity_weights, power=args.power, propagate_threshold=args.propagate_threshold,
        propagate_uncertain=None if args.propagate_uncertain < 0 else args.propagate_uncertain,
    )
    result = refine_dataset(args.dataset, config, progress=not args.quiet, device=args.device,
                            workers=args.workers, device_crf=args.crf_device == "device")
    share = result.items if result.share is None else result.share
    which = (f"{share} items in {result.dataset.root}" if result.share is None else
             f"this worker's {share} items (of {result.items} in {result.dataset.root})")
    print(f"refined {result.refined} of {which} with --method {args.method}"
          + (f" ({share - result.refined} were already done)" if result.refined < share else ""))


_DATA_HELP = ("a dataset folder: ours (generate / refine / shapes export), or a real benchmark as voc:PATH, "
              "cityscapes:PATH, ade20k:PATH (bare paths are detected)")


def _add_augment(sub: argparse._SubParsersAction) -> None:
    from .augment import AugmentConfig

    d = AugmentConfig()
    p = sub.add_parser(
        "augment", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="mask-consistent augmentation (the paper's splicing, blur, occlusion, perspective) into a new dataset",
        description="Write a new dataset of augmented items made from DATASET's images and masks: each item is a k x k "
                    "mosaic of random items (Φ1 splicing; k=1: one item) at the training size, then, each with its "
                    "probability, Gaussian-blurred (Φ2), occluded by a rectangle of another item with its labels (Φ3) "
                    "and perspective-warped with its mask (Φ4; pixels from outside become 255). Every choice is seeded; "
                    "the manifest names each item's sources and transforms. Re-running resumes. Train on both: "
                    "diffumask train DATASET AUGMENTED; or let train make such items afresh for every sample, "
                    "with nothing written: diffumask train DATASET --augment +mosaic,paste.",
        epilog="examples:\n"
               "  diffumask augment data/voc --out data/voc-aug        # all four, the defaults\n"
               "  diffumask augment data/voc --out data/voc-mosaic --grids 2,3 --blur 0 --occlusion 0 --perspective 0\n"
               "  diffumask augment data/voc --out data/voc-paste --grids 1 --paste 1 --blur 0 --occlusion 0 "
               "--perspective 0\n",
    )
    p.add_argument("dataset", metavar="DATASET", help="a diffumask dataset folder with masks")
    p.add_argument("--out", required=True, help="the new dataset folder (created, or resumed)")
    p.add_argument("--grids", type=_ints, default=list(d.grids),
                   help=f"Φ1: each item is a k x k mosaic, k drawn from these; 1 = a single item "
                        f"(default: {','.join(map(str, d.grids))})")
    p.add_argument("--split", default=d.split, help=f"the items of DATASET to draw from (default: {d.split})")
    p.add_argument("--items", type=int, help="items to write (default: as many as that split has)")
    p.add_argument("--size", type=int, help="side of each item in pixels (default: DATASET's image height)")
    p.add_argument("--blur", type=float, default=d.blur,
                   help=f"Φ2: probability of a Gaussian blur, σ {d.blur_sigma[0]}-{d.blur_sigma[1]} px "
                        f"(default: {d.blur})")
    p.add_argument("--occlusion", type=float, default=d.occlusion,
                   help=f"Φ3: probability of pasting a rectangle of another item, sides {d.occlusion_side[0]}-"
                        f"{d.occlusion_side[1]} of the image's (default: {d.occlusion})")
    p.add_argument("--perspective", type=float, default=d.perspective,
                   help=f"Φ4: probability of a perspective warp (default: {d.perspective})")
    p.add_argument("--perspective-shift", type=float, default=d.perspective_shift,
                   help=f"Φ4: each corner moves by up to this fraction of the side (default: {d.perspective_shift})")
    p.add_argument("--paste", type=float, default=d.paste,
                   help="copy-paste (ours, not the paper's): probability of pasting the objects of random items, "
                        "cut out by their masks, before Φ2-Φ4; turns scenes of one large object into scenes of "
                        f"several at several sizes (default: {d.paste})")
    p.add_argument("--paste-objects", type=_pair(int, "LOW,HIGH counts such as 1,2"), default=d.paste_objects,
                   metavar="LOW,HIGH",
                   help=f"how many objects a pasting item gets (default: {d.paste_objects[0]},{d.paste_objects[1]})")
    p.add_argument("--paste-scale", type=_pair(float, "LOW,HIGH fractions such as 0.5,0.9"),
                   default=d.paste_scale, metavar="LOW,HIGH",
                   help="a pasted item's side before it is cut out, as a fraction of the output's "
                        f"(default: {d.paste_scale[0]},{d.paste_scale[1]})")
    p.add_argument("--paste-keep", type=float, default=d.paste_keep,
                   help="every object already in the image (each connected region of a class, each pasted object) "
                        "keeps at least this share of its pixels visible; a paste that would hide more is placed "
                        f"elsewhere, or left out (default: {d.paste_keep})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of every choice (default: {d.seed})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_augment)


def _run_augment(args: argparse.Namespace) -> None:
    from .augment import AugmentConfig, augment_dataset

    config = AugmentConfig(grids=tuple(args.grids), split=args.split, items=args.items, size=args.size, blur=args.blur,
                           occlusion=args.occlusion, perspective=args.perspective,
                           perspective_shift=args.perspective_shift, paste=args.paste,
                           paste_objects=args.paste_objects, paste_scale=args.paste_scale, paste_keep=args.paste_keep,
                           seed=args.seed)
    dataset = augment_dataset(args.dataset, args.out, config, progress=not args.quiet)
    print(f"{len(dataset.records())} augmented items in {dataset.root}")


def _add_training_options(p: argparse.ArgumentParser) -> None:
    """The options of how a segmenter trains: train's, and filter's for its cross-validation models."""
    from .segment.presets import PRESETS, Schedule

    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="architecture and schedule (default: tiny)")
    p.add_argument("--steps", type=int, help="training steps (default: the preset's)")
    p.add_argument("--batch-size", type=int, help="images per step over all processes (default: the preset's)")
    p.add_argument("--crop", type=int, help="square training crop in pixels; images are resized so their short "
                   "side is the crop times a random ratio, and predicted at that size (default: the preset's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    p.add_argument("--augment", type=_csv, help="on-the-fly augmentations besides resize and crop: flip, rot90, hue, "
                   "channels (a random RGB order), shift (up to crop/8 px, what comes in ignored), blur and "
                   "perspective (`diffumask augment`'s Φ2 and Φ4, each with p 0.5), and the composites mosaic, paste "
                   "and occlusion, which make a sample of several items of one DATA as `diffumask augment` writes "
                   "them (a 2x2 mosaic, copy-paste of 1-2 other items' objects, Φ3 with p 0.5) for --composite-share "
                   "of the samples, with nothing written to disk (square, each tile squeezed to a square; paste needs "
                   "a background class); a + before a name adds the list to the preset's (--augment +mosaic,paste) "
                   "(default: the preset's; 'flip' for r50 and swin-b)")
    p.add_argument("--composite-share", type=float, help="with mosaic, paste or occlusion in --augment: the share of "
                   f"samples made of several items; the others show one item (default: {Schedule.composite_share})")
    p.add_argument("--init-from", help="pretrained weights: a folder (or hub id, when online) holding the same "
                   "segmenter or its backbone (Swin, ResNet, SegFormer MiT)")
    p.add_argument("--negatives", nargs="+", metavar="DATA", default=[],
                   help="datasets of other classes whose images teach what the run's classes are not: their pixels "
                        "of the run's classes keep them, all others are background, and their classes are not added "
                        "(a one-class run, e.g. dog, learns from cat images that a cat is not a dog); their train "
                        "split is read (default: none)")
    clipping = ", ".join(f"{name} {f'{norm:g}' if (norm := preset.schedule.max_grad_norm) else 'none'}"
                         for name, preset in PRESETS.items())
    p.add_argument("--max-grad-norm", type=float, help="clip the whole model's gradient to this L2 norm; 0: no "
                   f"clipping (default: the preset's: {clipping}; Mask2Former's is 0.01)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, sampling and augmentation (default: 0)")
    p.add_argument("--device", help="cpu, cuda or mps (default: cuda if available)")
    p.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], default="auto",
                   help="(default: bf16 on a GPU that supports it, else off)")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes per training process (default: 2)")


def _training_config(args: argparse.Namespace, data: list[str], out: str, split: str = "train",
                     weights: list[float] | None = None) -> Any:
    from .segment.train import TrainConfig

    return TrainConfig(
        data=data, out=out, preset=args.preset, split=split, steps=args.steps, batch_size=args.batch_size,
        crop=args.crop, lr=args.lr, augment=args.augment, save_every=args.save_every, weights=weights,
        negatives=args.negatives, init_from=args.init_from, seed=args.seed, device=args.device, mixed_precision=args.mixed_precision,
        workers=args.workers, extra={name: value for name in ("max_grad_norm", "composite_share")
                                     if (value := getattr(args, name)) is not None},
    )


def _add_filter(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "filter", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="noise learning: drop the items a cross-validated segmenter disagrees with most",
        description="Split DATASET's items into --folds folds (stratified by class), train a segmenter on all folds but "
                    "one with train's code and options, and predict the held-out fold, so every item gets a prediction "
                    "from a model that never saw it. Score each item by the IoU of that prediction with its mask over "
                    "its own classes, rank items within their class, drop the worst --prune share of each, and write "
                    "the kept ids to ImageSets/Segmentation/<--name>.txt: train on them with "
                    "`diffumask train DATASET --split filtered`. Scores and folds are recorded in the manifest, so "
                    "another --prune is a re-cut (--recut) without training. Work lives in DATASET/noise/; a killed "
                    "run resumes and keeps finished folds.",
        epilog="examples:\n"
               "  diffumask filter data/voc --folds 3 --prune 0.7 --preset r50 --init-from ./resnet-50 --device cuda\n"
               "  diffumask filter data/voc --prune 0.5 --recut                 # another cut, no training\n"
               "  torchrun --nproc_per_node 8 -m diffumask filter data/voc      # 8 GPUs train each fold together\n",
    )
    p.add_argument("dataset", metavar="DATASET", help="a diffumask dataset folder with masks")
    p.add_argument("--folds", type=int, default=3, help="cross-validation folds, at least 2 (default: 3)")
    p.add_argument("--prune", type=float, default=0.7, help="share of each class to drop, in [0, 1) (default: 0.7, "
                   "the paper's best)")
    p.add_argument("--split", default="train", help="the items to cross-validate and cut (default: train)")
    p.add_argument("--name", default="filtered", help="the split the kept ids are written to (default: filtered)")
    p.add_argument("--recut", action="store_true", help="re-rank the recorded scores at this --prune; no training")
    p.add_argument("--min-area", type=float, default=0.0,
                   help="drop items whose class covers less than this share of the image (default: 0)")
    p.add_argument("--max-area", type=float, default=1.0,
                   help="drop items whose class covers more than this share of the image (default: 1)")
    _add_training_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_filter)


def _run_filter(args: argparse.Namespace) -> None:
    from .distributed import current_worker
    from .noise import FilterConfig, filter_dataset

    config = FilterConfig(dataset=args.dataset, training=_training_config(args, [args.dataset], ""), folds=args.folds,
                          prune=args.prune, split=args.split, name=args.name, min_area=args.min_area, max_area=args.max_area,
                          seed=args.seed)
    result = filter_dataset(config, progress=not args.quiet, recut=args.recut)
    if current_worker().rank == 0:  # under a launcher the first worker reports
        print(result.table())


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="train a semantic segmenter on one or more dataset folders (real, synthetic or both)",
        description="Train a segmenter (SegFormer or Mask2Former from transformers) on the --split of every DATA "
                    "folder, in one label space matched by class name. RUN holds classes.json, settings.json, "
                    "train_log.jsonl, an atomic checkpoint every --save-every steps and, at the end, model/. "
                    "Re-running the same command resumes from the last checkpoint.\n\n"
                    "presets (defaults as data, in diffumask/segment/presets.py):\n"
                    "  tiny              SegFormer, 2 M parameters, from scratch: the shapes world, CPU-light\n"
                    "  tiny-mask2former  Mask2Former with a tiny Swin, 16 queries, from scratch\n"
                    "  r50, swin-b       the paper's Mask2Former; the Mask2Former recipe (AdamW 1e-4, weight decay\n"
                    "                    0.05, backbone lr x0.1, poly, batch 16, crop 512, 160k steps); weights\n"
                    "                    through --init-from\n\n"
                    "Several GPUs: accelerate launch -m diffumask train ... (or torchrun --nproc_per_node N -m diffumask train ...).",
        epilog="examples:\n"
               "  diffumask train data/shapes-synthetic --out runs/synthetic\n"
               "  diffumask train data/shapes-synthetic --augment +mosaic,paste --out runs/composites  "
               "# + 2x2 mosaics with copy-paste\n"
               "  diffumask train data/voc-synthetic voc:VOCdevkit --weights 3,1 --split train --out runs/mix \\\n"
               "      --preset swin-b --init-from ./swin-base-patch4-window12-384-in22k --device cuda\n",
    )
    p.add_argument("data", nargs="+", metavar="DATA", help=_DATA_HELP)
    p.add_argument("--out", required=True, help="run folder to create or resume")
    p.add_argument("--split", default="train",
                   help="ImageSets/Segmentation/<split>.txt of every DATA, or one per DATA, comma-separated "
                        "(filtered,train: what filter kept of the first, the second's train) (default: train)")
    p.add_argument("--weights", type=_floats, help="sampling weight per DATA (then per --negatives dataset), e.g. 1,1 "
                   "for half real, half synthetic (default: proportional to their sizes)")
    _add_training_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> None:
    from .segment.train import train, train_summary

    run = train(_training_config(args, args.data, args.out, args.split, args.weights), progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun / accelerate every process trains; one reports
    summary = train_summary(run)
    print(f"trained {run.root} ({summary.get('steps', 0)} steps, last loss {summary.get('loss', float('nan')):.4f}); "
          f"evaluate with: diffumask evaluate {run.root} DATA --split test")


def _add_run_and_data(p: argparse.ArgumentParser) -> None:
    """The arguments predict and evaluate share: which run, on which data, how."""
    p.add_argument("run_dir", metavar="RUN", help="run folder made by `diffumask train`")
    p.add_argument("data", metavar="DATA", help=_DATA_HELP)
    p.add_argument("--split", default="test", help="which split of DATA (default: test)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: 16)")
    p.add_argument("--device", help="cpu, cuda or mps (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="write a trained run's label maps for a split as palette PNGs",
                       description="Predict every image of DATA's --split with RUN and write OUT/<id>.png (palette "
                                   "PNGs, indices as in RUN/classes.json, copied to OUT). Finished images are "
                                   "skipped on a re-run; OUT/predicted_by.json names the weights that made them, "
                                   "and another run (or this one trained on since) is refused there.")
    _add_run_and_data(p)
    p.add_argument("--out", required=True, help="folder for the predictions")
    p.set_defaults(run=_run_predict)


def _run_predict(args: argparse.Namespace) -> None:
    from .segment.predict import predict_folder

    out = predict_folder(args.run_dir, args.data, args.out, args.split, args.device,
                         _positive(args.batch_size, "--batch-size"), progress=not args.quiet)
    print(f"predictions in {out}")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    from .segment.evaluate import PROTOCOLS, UNSEEN_SETS

    p = sub.add_parser(
        "evaluate", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="per-class IoU and mIoU of a trained run on a labelled split",
        description="Predict DATA's --split with RUN and print per-class IoU and mIoU, accumulated over the whole "
                    "split (intersections and unions summed over images, 255 ignored), as the papers report it. "
                    "Classes are matched by name (aeroplane = airplane, tvmonitor = tv monitor, ...); a class in "
                    "neither prediction nor truth shows n/a. Classes of DATA that the run does not know are not "
                    "reported, but predictions on their pixels count as errors.",
        epilog="examples:\n  diffumask evaluate runs/synthetic data/shapes-real --split test\n"
               "  diffumask evaluate runs/voc voc:VOCdevkit --split val --unseen voc --json val.json\n"
               "  diffumask evaluate runs/city cityscapes:data/cityscapes --split val "
               "--protocol cityscapes-human-vehicle\n",
    )
    _add_run_and_data(p)
    p.add_argument("--unseen", help="zero-shot report: comma-separated unseen classes, or a named set "
                   f"({', '.join(f'{k}: {chr(44).join(v)}' for k, v in UNSEEN_SETS.items())}); prints seen, unseen "
                   "and harmonic mIoU without background")
    p.add_argument("--protocol", choices=list(PROTOCOLS),
                   help="merge classes first: cityscapes-human-vehicle is the paper's (person+rider = human; car, "
                        "truck, bus, train = vehicle; motorcycle, bicycle ignored)")
    p.add_argument("--json", help="also write the result to this JSON file")
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> None:
    from .segment.evaluate import evaluate_run, parse_unseen

    evaluation = evaluate_run(args.run_dir, args.data, args.split, parse_unseen(args.unseen), args.protocol,
                              args.device, _positive(args.batch_size, "--batch-size"), progress=not args.quiet,
                              json_path=args.json)
    print(evaluation.table())


def _positive(value: int, option: str) -> int:
    if value < 1:
        raise DiffumaskError(f"{option} must be at least 1, got {value}")
    return value


def _add_export(sub: argparse._SubParsersAction) -> None:
    from .formats.export import EXPORT_FORMATS

    p = sub.add_parser(
        "export", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="write a dataset in COCO, Cityscapes, ADE20K or Hugging Face datasets layout",
        description="Write DATASET's images and masks into OUT in another ecosystem's layout, readable there "
                    "with no glue code. OUT must be new or empty; it is written whole or not at all.\n\n"
                    "formats:\n"
                    "  coco        instances_<split>.json (compressed RLE per instance: the items' own objects\n"
                    "              from SegmentationObject/ where present, else connected components per class)\n"
                    "              and panoptic_<split>.json + PNGs; pycocotools, detectron2, mmdet\n"
                    "  cityscapes  gtFine *_labelIds.png / *_labelTrainIds.png (classes matched to the 19 train\n"
                    "              classes by name, others 255) + leftImg8bit; cityscapesscripts, mmseg\n"
                    "  ade20k      ADEChallengeData2016 (0 = other: background and 255); mmseg\n"
                    "  hf          Hugging Face datasets save_to_disk folder (needs pip install 'diffumask[hf]')",
        epilog="examples:\n  diffumask export data/voc --format coco --out data/voc-coco\n"
               "  diffumask export data/city --format cityscapes --out data/city-cs\n"
               "  diffumask export data/voc --format coco --out data/voc-kept --only filtered val\n",
    )
    p.add_argument("dataset", help="dataset folder (generate / refine / shapes export)")
    p.add_argument("--format", required=True, choices=list(EXPORT_FORMATS), help="target layout (see above)")
    p.add_argument("--out", required=True, help="new (or empty) folder for the export")
    p.add_argument("--only", nargs="+", metavar="LIST", default=[],
                   help="export only the items listed in ImageSets/Segmentation/LIST.txt, each under its own split: "
                        "`--only filtered val` writes what `diffumask filter` kept of train, and val")
    p.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> None:
    from .formats.export import export_dataset

    result = export_dataset(args.dataset, args.format, args.out, args.only)
    print(f"exported {result.items} items as {result.format} to {result.out}")
    for note in result.notes:
        print(f"note: {note}")


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate", help="check every item of a dataset folder; one line per problem, non-zero exit if any",
        description="Check DATASET against its contract: each manifest item's image, mask and soft maps exist and "
                    "agree in size; mask values are classes of classes.json or 255; manifest and ImageSets agree; "
                    "no temporary file of an interrupted write and no unmerged manifest shard is left. Prints one "
                    "line per problem and exits with 1 when there is any. While a command writes DATASET, only its "
                    "finished items are checked, a first line says so, and the exit is 1: it is not finished.")
    p.add_argument("dataset", help="dataset folder")
    p.set_defaults(run=_run_validate)


def _run_validate(args: argparse.Namespace) -> int:
    from .validate import validate_dataset

    problems, items = validate_dataset(args.dataset)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem{'s' * (len(problems) != 1)} in {args.dataset} ({items} items)", file=sys.stderr)
        return 1
    print(f"{args.dataset}: {items} items, no problems")
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="write a static HTML report of a dataset: gallery, per-class statistics, figures, results",
        description="Write OUT (an .html file) and OUT's _files folder beside it (thumbnails, the gallery's item "
                    "list): opens offline from disk, no server and no network. Shows a paged gallery (image, mask "
                    "overlay, each class's soft map; filter by class; sort by mask area or noise score), per-class "
                    "counts, area distributions and 255 shares, the adaptive γ curves of refine --per-class (the "
                    "paper's Fig. 3), per-resolution attention maps (Fig. 2), and refine / train / evaluate results.",
        epilog="examples:\n  diffumask report data/shapes --out data/shapes-report.html\n"
               "  diffumask report data/voc --out voc.html --run runs/voc --evaluation runs/voc/val.json\n",
    )
    p.add_argument("dataset", help="dataset folder")
    p.add_argument("--out", required=True, help="the report's .html file (thumbnails go to <name>_files/ beside it)")
    p.add_argument("--run", dest="runs", action="append", default=[], metavar="RUN",
                   help="a training run folder (diffumask train --out RUN) to show; repeatable")
    p.add_argument("--evaluation", action="append", default=[], metavar="FILE",
                   help="the JSON of `diffumask evaluate --json FILE`, shown as a per-class IoU table and chart; repeatable")
    p.add_argument("--fig2-items", type=int, default=4, help="items shown per resolution (Fig. 2; 0: none) (default: 4)")
    p.add_argument("--page-size", type=int, default=48, help="gallery cards per page (default: 48)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_report)


def _run_report(args: argparse.Namespace) -> None:
    from .report import build_report

    result = build_report(args.dataset, args.out, args.runs, args.evaluation, args.fig2_items, args.page_size,
                          progress=not args.quiet)
    print(f"report of {result.items} items in {result.html} (+ {result.assets.name}/, "
          f"{result.size_bytes / 2**20:.1f} MiB, {result.seconds:.1f} s)")


class _Parser(argparse.ArgumentParser):
    """Under a launcher every worker parses the same command line: the first prints the usage with the error,
    the others the error's line alone (eight GPUs printed the usage eight times over)."""

    def error(self, message: str) -> NoReturn:
        if _first_worker():
            super().error(message)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="diffumask", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Semantic-segmentation training data from class names: a text-to-image diffusion model "
                    "generates the images and its cross-attention gives each class's mask (DiffuMask).",
        epilog=EXAMPLES,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"diffumask {__version__}")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{generate,refine,augment,train,filter,predict,evaluate,shapes,export,validate,report}")
    _add_generate(sub)
    _add_refine(sub)
    _add_augment(sub)
    _add_train(sub)
    _add_filter(sub)
    _add_predict(sub)
    _add_evaluate(sub)
    _add_shapes(sub)
    _add_export(sub)
    _add_validate(sub)
    _add_report(sub)
    return parser


KEPT_ON_INTERRUPT = {  # what a killed command leaves for its re-run to resume from
    "generate": "finished items are kept",
    "refine": "finished masks are kept",
    "augment": "finished items are kept",
    "train": "the last checkpoint is kept",
    "filter": "finished folds are kept",
    "predict": "finished predictions are kept",
    "shapes export": "finished items are kept",
}


def _one_line_warnings(show: Callable[..., None]) -> Callable[..., None]:
    """``warnings.showwarning`` that prints diffumask's own warnings as one line a user reads (not a source
    location and line) and leaves the others to ``show``."""
    package = Path(__file__).resolve().parent

    def show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                     line: str | None = None) -> None:
        if category is UserWarning and Path(filename).resolve().is_relative_to(package):
            print(f"diffumask: warning: {message}", file=sys.stderr if file is None else file)
        else:
            show(message, category, filename, lineno, file, line)

    return show_warning


class Terminated(KeyboardInterrupt):
    """SIGTERM (torchrun tearing down the other workers when one fails, ``timeout``, ``scancel``, ``kill``), taken
    as ^C is: the command stops cleanly, its worker processes with it, instead of dying where it stands."""


def _terminate(signum: int, frame: Any) -> None:
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM (launchers repeat it) ends the process at once
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    python_show_warning = warnings.showwarning
    warnings.showwarning = _one_line_warnings(python_show_warning)
    import signal
    import threading

    handles_signals = threading.current_thread() is threading.main_thread()  # only the main thread may
    python_on_term = signal.signal(signal.SIGTERM, _terminate) if handles_signals else None
    try:
        return _main(argv)
    finally:
        warnings.showwarning = python_show_warning
        if handles_signals and python_on_term is not None:  # None: set outside Python, which cannot be restored
            signal.signal(signal.SIGTERM, python_on_term)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "shapes_command", None) == "train":
        args.train_args = extra  # handed to python -m diffumask.shapes.train as they are
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    group_was_open = _process_group_open()
    from .distributed import SHARD_VARIABLE

    shard_before = os.environ.get(SHARD_VARIABLE)
    if getattr(args, "shard", None):  # the process is that share: its datasets' manifest shard, messages, pool
        os.environ[SHARD_VARIABLE] = args.shard
    try:
        status = args.run(args)  # None, or an exit status (validate: 1 when it found problems)
    except DiffumaskError as error:
        print(f"diffumask: error: {one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:  # the disk or the system refused (full, read-only, permissions): no traceback
        where = f": {error.filename}" if error.filename else ""
        print(f"diffumask: error: {error.strerror or one_line(error)}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # under a launcher every worker gets the signal; the first says so
        how = "terminated" if isinstance(stop, Terminated) else "interrupted"
        if _first_worker():
            command = f"shapes {args.shapes_command}" if args.command == "shapes" else args.command
            kept = KEPT_ON_INTERRUPT.get(command)
            print(f"diffumask: {how}; {kept}, re-run the same command to resume" if kept else
                  f"diffumask: {how}", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    finally:  # a gloo group still open at shutdown can abort a torchrun rank after its work is done
        # ("terminate called without an active exception"); closed here, at the command's end, and not
        # by train itself: filter trains several times in one group
        if _process_group_open() and not group_was_open:
            _torch_distributed().destroy_process_group()
        if shard_before is None:
            os.environ.pop(SHARD_VARIABLE, None)
        else:
            os.environ[SHARD_VARIABLE] = shard_before
    return status or 0


def _first_worker() -> bool:
    """Whether this process is the first (or only) worker of its launcher, which shares its output with the others;
    each share of a job array (--shard) is a job of its own, with a log of its own."""
    from .distributed import launcher_worker

    try:
        return launcher_worker().rank == 0
    except ConfigError:  # unreadable launcher variables: a lone process
        return True


def _torch_distributed() -> Any:
    """torch.distributed if this process has imported torch (a command that never did opened no group)."""
    torch = sys.modules.get("torch")
    return torch.distributed if torch is not None and torch.distributed.is_available() else None


def _process_group_open() -> bool:
    distributed = _torch_distributed()
    return distributed is not None and distributed.is_initialized()


if __name__ == "__main__":
    sys.exit(main())
