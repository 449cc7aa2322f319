"""Class names in, a segmentation dataset out: work items → batches → pipeline + recorder → disk.

Work items are enumerated deterministically (class × index → id, seed, prompt), batched per
class in fixed groups, and written one whole item at a time, so a killed run resumes where it
stopped, a larger ``images_per_class`` extends a dataset, and the result does not depend on
how often the run was interrupted. ``compose`` adds, per class, items whose prompt names it with
other classes of the run (the bank's multi-class templates, or a pair); each such item lists all
its classes, and its mask gives every pixel to the class whose map wins there.

Under torchrun, ``accelerate launch`` or Slurm each worker takes every world-size-th batch of the
full list (:mod:`diffumask.distributed`) on its own GPU and appends to its own manifest shard; the
batches are the same whatever the number of workers, so 1, 2 or 3 workers write the same dataset,
and a killed job resumes with any number. Each item's maps are fused and thresholded, and the item
encoded and written, in a background thread while the next batch denoises: the main thread only reads
the recorder's buffers between two pipeline calls, so the GPU does not wait for the host.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import os
import re
import shlex
import shutil
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .attention import ImageMaps, check_pipeline, trace, word_locator
from .dataset import BARE_DATASET, IMAGE_FORMATS, BackgroundWriter, BeingWritten, Dataset
from .distributed import current_worker, job_terms
from .errors import ConfigError, check_sequences
from .masks import threshold_masks
from .masks.threshold import PAPER_THRESHOLD, check_band
from .models import (BUILTIN_MODELS, DTYPES, SCHEDULERS, auto_dtype, dtype_name, resolve_device,
                     library_bars, load_pipeline, model_description, pipeline_name)
from .prompts import PromptBank, resolve_bank
from .softmaps import SELF_ATTENTION_KEEP, pack
from .supported import call_parameters
from .joint_attention import TEXT_PARTS, is_flux_pipeline


@dataclass
class GenerateConfig:
    """Everything that decides what ``generate`` writes (recorded in the dataset)."""

    classes: list[str]
    out: str
    images_per_class: int = 10
    model: str | None = None  # None: the pipeline given to generate_dataset (its own name), else "shapes"
    compose: int = 0  # extra items per class whose prompt names it with other classes of the run
    seed: int = 0
    steps: int | None = None  # None: the pipeline's own default
    guidance: float | None = None  # None: the pipeline's own default
    scheduler: str | None = None  # None: the model's own
    size: int | None = None  # None: the model's native size
    negative_prompt: str | None = None
    prompts: str = "auto"  # a bank name or file
    resolutions: list[int] | None = None  # attention grid heights to fuse; None: latent/4, /2, /1
    layers: list[str] | None = None  # cross-attention module prefixes to record; None: all
    step_window: tuple[float, float] | None = None  # fraction of the UNet calls to record, e.g. (0.6, 1.0)
    self_attention: int | None = 2  # record self-attention at latent/F for refinement; None: off
    self_attention_max: int = 32  # ... halving the grid until no side exceeds this (SDXL 1024 px: 32, not 64)
    self_attention_keep: float = SELF_ATTENTION_KEEP  # share of each self-attention row stored; 1: dense
    #: Record the self-attention at every k-th step: 2 moves propagate's shapes mIoU by -0.001 (bench_softmaps).
    self_attention_every: int = 2
    #: Diffusion transformers (SD3, FLUX) only: the joint blocks recorded, as fractions of the depth (None: the
    #: recorder's default, the first third), and which text tokens give a word's map (None: "both" on SD3).
    block_window: tuple[float, float] | None = None
    text_tokens: str | None = None
    threshold: float | None = None  # None: the model's own γ (see default_threshold)
    uncertain: float | None = None  # lower edge of the 255 band; None: no band
    image_format: str = "jpg"
    #: Images a pipeline's own safety checker flags (one passed in that keeps it; load_pipeline loads none):
    #: "record" writes a manifest line marked flagged and no files, "skip" writes nothing (a re-run retries).
    flagged: str = "record"
    batch_size: int = 4
    #: Threads that fuse, threshold, encode and write items while the next batch denoises (None: 1 on a CPU, whose
    #: cores the pipeline uses; on a GPU 2, where this worker has the cores). The bytes do not depend on it.
    writers: int | None = None
    device: str | None = None  # None: the GPU when there is one (this worker's under a launcher), else the CPU
    dtype: str = "auto"  # auto: float32 off the GPU; on it bfloat16 for SD3 and FLUX, float16 for the rest
    revision: str | None = None

    def __post_init__(self) -> None:
        """Refuse values that cannot work before anything is loaded or written."""
        check_sequences("GenerateConfig", classes=(self.classes, '["dog", "cat"]'),
                        resolutions=(self.resolutions, "[16, 32]"), layers=(self.layers, '["up_blocks"]'),
                        step_window=(self.step_window, "(0.6, 1.0)"),
                        block_window=(self.block_window, "(0.0, 0.33)"))
        if not self.classes:
            raise ConfigError("no classes given: pass at least one class name, e.g. --classes dog,cat")
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"duplicate class names in {self.classes}")
        if self.images_per_class < 0 or self.compose < 0 or self.images_per_class + self.compose < 1:
            raise ConfigError(f"--images-per-class ({self.images_per_class}) and --compose ({self.compose}) must be "
                              "0 or more, and not both 0")
        if self.compose and len(self.classes) < 2:
            raise ConfigError("--compose puts several classes in one image: pass at least two --classes")
        for name, value, least in (("--batch-size", self.batch_size, 1), ("--writers", self.writers, 1),
                                   ("--steps", self.steps, 1),
                                   ("--size", self.size, 8), ("--self-attention", self.self_attention, 1),
                                   ("--self-attention-max", self.self_attention_max, 1),
                                   ("--self-attention-every", self.self_attention_every, 1)):
            if value is not None and value < least:
                raise ConfigError(f"{name} must be at least {least}, got {value}")
        if self.guidance is not None and not self.guidance >= 0:
            raise ConfigError(f"--guidance must be 0 or more, got {self.guidance}")
        if self.resolutions is not None and (not self.resolutions or min(self.resolutions) < 1):
            raise ConfigError(f"--resolutions must be positive grid sizes, got {self.resolutions}")
        if not 0 < self.self_attention_keep <= 1:
            raise ConfigError(f"--self-attention-keep must lie in (0, 1] (1 stores the matrix dense), "
                              f"got {self.self_attention_keep}")
        if self.flagged not in FLAGGED_CHOICES:
            raise ConfigError(f"--flagged must be one of {', '.join(FLAGGED_CHOICES)}, got {self.flagged!r}")
        if self.image_format not in IMAGE_FORMATS:
            raise ConfigError(f"--image-format must be one of {', '.join(IMAGE_FORMATS)}, got {self.image_format!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ConfigError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        check_band(self.threshold, self.uncertain)
        _check_window(self.step_window)
        _check_window(self.block_window, "block window")
        if self.text_tokens is not None and self.text_tokens not in TEXT_PARTS:
            raise ConfigError(f"--text-tokens must be one of {', '.join(TEXT_PARTS)}, got {self.text_tokens!r}")

    def recorder_options(self) -> dict[str, Any]:
        """The options only a diffusion transformer's recorder takes, where set."""
        chosen = {"block_window": self.block_window, "text_tokens": self.text_tokens}
        return {k: v for k, v in chosen.items() if v is not None}

    def settings(self) -> dict[str, Any]:
        """The options that change the data, so a re-run with other ones is refused."""
        values = dataclasses.asdict(self)
        for key in RUNTIME_OPTIONS:
            values.pop(key)
        for key in ("block_window", "text_tokens"):  # absent unless set, so datasets made before still resume
            if values[key] is None:
                values.pop(key)
        if values["self_attention_every"] == 1 or self.self_attention is None:  # as datasets made before it recorded
            values.pop("self_attention_every")
        return values


FLAGGED_CHOICES = ("record", "skip")

#: Options that may differ between the runs that build one dataset.
RUNTIME_OPTIONS = ("batch_size", "writers", "device", "images_per_class", "compose", "out")


@dataclass
class WorkItem:
    id: str
    class_name: str  # the class it is drawn for (composed items name others too)
    index: int
    seed: int
    compose: bool = False


@dataclass
class GeneratedImage:
    """One generated image with its class maps and thresholded mask.

    The 8-bit pixels and the mask are worked out on first use, not when the batch comes back: ``generate``
    reads them in its background writer, so the GPU starts the next batch instead of waiting while the host
    fuses each class's maps at image size and thresholds them (12.6 ms an image with one class, 18.4 with two,
    at 512 px on a 2-core VM: ``bench/bench_generate_host.py``). They follow ``maps.resolutions`` and
    ``maps.token_average`` as they are at first use.
    """

    output: np.ndarray = field(repr=False)  # (H, W, 3) floats in [0, 1], as the pipeline returned them
    maps: ImageMaps
    classes: list[str]  # the words whose maps make the mask: labels 1..n in this order
    threshold: float
    uncertain: float | None
    prompt: str
    seed: int
    flagged: bool = False  # the pipeline's safety checker replaced the image (black) after the maps were made

    @functools.cached_property
    def image(self) -> np.ndarray:
        """(H, W, 3) uint8."""
        return np.clip(np.rint(np.asarray(self.output) * 255), 0, 255).astype(np.uint8)

    @functools.cached_property
    def mask(self) -> np.ndarray:
        """(H, W) uint8 label indices, in the order of ``classes`` from 1 (255: the uncertain band, if any)."""
        return threshold_masks({i + 1: self.maps[n] for i, n in enumerate(self.classes)}, self.threshold,
                               self.uncertain)


def default_threshold(pipe: Any) -> float:
    """The model's own γ: the paper's 0.4 for Stable Diffusion, or what a pipeline declares.

    Fused maps are divided by their maximum, so how high the background sits depends on the model;
    a pipeline may carry the γ measured for it (the shapes model does) as ``default_threshold``.
    """
    return float(getattr(pipe, "default_threshold", PAPER_THRESHOLD))


def item_seed(base_seed: int, class_name: str, index: int) -> int:
    """A seed per item from (base seed, class, index): stable across runs, machines and batchings."""
    digest = hashlib.sha256(f"{base_seed}/{class_name}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def class_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "class"


def work_items(classes: Sequence[str], images_per_class: int, base_seed: int, compose: int = 0) -> list[WorkItem]:
    """Every item of a run: ``images_per_class`` single-class items per class, then ``compose``
    multi-class ones per class (ids ``<class>-compose-<k>``: slugs have no '-', so they never clash). Two classes
    whose slugs are the same are refused: the second's items took the first's ids, so they were never made."""
    named: dict[str, str] = {}
    for name in classes:
        first = named.setdefault(class_slug(name), name)
        if first != name:
            raise ConfigError(f"classes {first!r} and {name!r} would share the item ids {class_slug(name)}_NNNNNN (ids "
                              "keep only the ASCII letters and digits of a class's name): rename one of them, with "
                              "another --out where a dataset was made with both")
    single = [WorkItem(f"{class_slug(c)}_{k:06d}", c, k, item_seed(base_seed, c, k))
              for c in classes for k in range(images_per_class)]
    composed = [WorkItem(f"{class_slug(c)}-compose-{k:06d}", c, k, item_seed(base_seed, f"compose/{c}", k), True)
                for c in classes for k in range(compose)]
    return single + composed


def _pipeline_default(pipe: Any, argument: str) -> Any:
    """The default of the pipeline call's ``argument``, which generate passes when it is not given."""
    parameter = call_parameters(type(pipe)).get(argument)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        option = {"num_inference_steps": "steps", "guidance_scale": "guidance"}[argument]
        raise ConfigError(f"{type(pipe).__name__}'s call has no default {argument}: give --{option} "
                          f"({option}= from Python)")
    return parameter.default


def _check_window(window: tuple[float, float] | None, name: str = "step window") -> None:
    if window is not None and not 0.0 <= window[0] < window[1] <= 1.0:
        raise ConfigError(f"{name} {window} must satisfy 0 <= start < stop <= 1")


def _step_range(window: tuple[float, float] | None, steps: int, pipe: Any) -> tuple[int, int] | None:
    """A window of UNet calls from fractions of the sampler's timesteps."""
    if window is None:
        return None
    _check_window(window)
    start, stop = window
    try:
        pipe.scheduler.set_timesteps(steps)
        calls = len(pipe.scheduler.timesteps)  # PNDM makes one call more than steps
    except ValueError:  # flow matching with a resolution-dependent shift (FLUX) needs its mu: one call per step
        calls = steps
    first = min(int(round(start * calls)), calls - 1)  # a window near the end keeps at least the last call
    return first, max(first + 1, int(round(stop * calls)))


def generate_images(
    pipe: Any,
    prompts: Sequence[str],
    classes: Sequence[Sequence[str]],
    seeds: Sequence[int],
    steps: int | None = None,
    guidance: float | None = None,
    size: int | None = None,
    negative_prompt: str | None = None,
    threshold: float | None = None,
    uncertain: float | None = None,
    resolutions: Sequence[int] | None = None,
    layers: Sequence[str] | None = None,
    step_window: tuple[float, float] | None = None,
    self_attention: int | None = None,
    self_attention_max: int = 32,
    self_attention_every: int = GenerateConfig.self_attention_every,
    **recorder_options: Any,
) -> list[GeneratedImage]:
    """Generate one batch: each prompt with its classes (words in the prompt) and seed. ``recorder_options``:
    a diffusion transformer's (``block_window``, ``text_tokens``)."""
    check_pipeline(pipe, "generate", prompts_only=True)
    steps = steps or _pipeline_default(pipe, "num_inference_steps")
    guidance = _pipeline_default(pipe, "guidance_scale") if guidance is None else guidance
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    threshold = default_threshold(pipe) if threshold is None else threshold
    check_band(threshold, uncertain, names=("threshold", "uncertain"))
    window = _step_range(step_window, steps, pipe)
    with trace(pipe, list(prompts), [list(c) for c in classes], layers=layers, steps=window,
               self_attention=self_attention, self_attention_max=self_attention_max,
               self_attention_every=self_attention_every, **recorder_options) as recorder:
        output = pipe(
            prompt=list(prompts), height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
            negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
            generator=generators, output_type="np",
        )
    results = []
    flags = getattr(output, "nsfw_content_detected", None) or [False] * len(output.images)
    for image, image_maps, names, prompt, seed, flagged in zip(output.images, recorder.maps(), classes, prompts,
                                                               seeds, flags):
        if resolutions is not None:
            image_maps.resolutions = tuple(resolutions)
        results.append(GeneratedImage(image, image_maps, list(names), threshold, uncertain, prompt, int(seed),
                                      bool(flagged)))
    return results


def generate_one(pipe: Any, prompt: str, classes: Sequence[str], seed: int = 0, **options: Any) -> GeneratedImage:
    """One image with its class maps and mask: the five-line entry point."""
    return generate_images(pipe, [prompt], [[classes] if isinstance(classes, str) else list(classes)], [seed],
                           **options)[0]


def _batches(items: list[WorkItem], batch_size: int) -> Iterator[list[WorkItem]]:
    """Fixed groups per class (indices [k·B, (k+1)·B)): the same batches whatever the workers or resumes."""
    groups: dict[tuple[bool, str, int], list[WorkItem]] = {}
    for item in items:
        groups.setdefault((item.compose, item.class_name, item.index // batch_size), []).append(item)
    yield from groups.values()


def _check_size(pipe: Any, size: int | None) -> None:
    """A size the pipeline can make (diffusers' own checks, before any denoising): a UNet's latents need a multiple
    of 8 pixels; a transformer's, a multiple of the VAE's factor times its patch (FLUX packs 2×2 latents: 16 px for
    both on the real models; FLUX would otherwise resize silently, SD3 fail after loading)."""
    if size is None or not hasattr(pipe, "vae_scale_factor"):
        return
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        multiple = 8
    else:
        patch = 2 if is_flux_pipeline(pipe) else int(getattr(transformer.config, "patch_size", 1) or 1)
        multiple = int(pipe.vae_scale_factor) * patch
    if size % multiple:
        raise ConfigError(f"--size {size}: this model makes images whose side is a multiple of {multiple} pixels")


def generate_dataset(config: GenerateConfig, pipe: Any | None = None, progress: bool = True) -> Dataset:
    """Run ``generate`` (see :class:`GenerateConfig`); finished items are skipped on a re-run.

    With ``pipe`` given, the model recorded (and the prompt bank ``auto`` picks) is that pipeline's
    own unless ``config.model`` names one.
    """
    Dataset.check_location(config.out)
    recorded = _recorded_settings(config.out)
    model = config.model if config.model is not None else (pipeline_name(pipe) if pipe is not None else "shapes")
    model = _same_model_as_recorded(model, recorded.get("model"))
    if (isinstance(was := recorded.get("model"), str) and model != was and Path(was).is_absolute()
            and not Path(was).exists() and Path(model).is_dir()):
        link = f"mkdir -p {shlex.quote(str(Path(was).parent))} && ln -sfn {shlex.quote(model)} {shlex.quote(was)}"
        raise ConfigError(f"{config.out} was made with the model folder {was}, which no longer exists; a dataset "
                          f"resumes only with the model it was made with: if {model} is that model moved, link the old "
                          f"path to it ({link}) and re-run, or choose another --out")
    config = dataclasses.replace(config, model=model)
    bank: PromptBank = resolve_bank(config.prompts, model)
    if config.compose:
        for template, slots in bank.undrawable_compose(config.classes).items():
            warnings.warn(f"{bank.source}: compose template {template!r} names {', '.join(map(repr, slots))}, neither "
                          "a class of the bank or of --classes nor a list under slots:, so it is never drawn (a typo?)")
    items = work_items(config.classes, config.images_per_class, config.seed, config.compose)
    drawn = {item.id: (bank.draw_compose(item.class_name, item.seed, config.classes) if item.compose
                       else (bank.draw(item.class_name, item.seed), [item.class_name])) for item in items}
    words = {c: bank.display_name(c) for c in config.classes}
    if len(set(words.values())) < len(words):
        raise ConfigError(f"two classes are the same word in prompts ({words}); name each class once")
    worker = current_worker()
    bank_fingerprint = _bank_fingerprint(bank, recorded.get("prompt_bank_sha256"))

    def dataset_info(config: GenerateConfig) -> dict[str, Any]:
        """dataset.json's contents for these settings, as ``Dataset.create`` compares them."""
        settings = {**config.settings(), "prompt_bank": bank.source, "prompt_bank_sha256": bank_fingerprint}
        return Dataset.info(settings, config.image_format)

    if pipe is None:
        device = resolve_device(config.device)
        if config.dtype == "auto":  # recorded as what it resolves to, as the command line always did
            config = dataclasses.replace(config, dtype=auto_dtype(model, device, config.revision))
        # A resume with other settings is refused before the weights load (on every worker of a sharded job);
        # the model's own threshold is known only once it has.
        Dataset.check_resumable(Path(config.out), config.classes, dataset_info(config),
                                unknown=("threshold",) if config.threshold is None else ())
        with library_bars(progress):
            pipe = load_pipeline(model, device, config.dtype, config.scheduler, config.revision, prompts_only=True)
    check_pipeline(pipe, "generate", prompts_only=True)  # a pipeline passed in: before any word is looked up
    if config.dtype == "auto":  # a pipeline passed in: the precision it is in, or the one its dataset records
        # (datasets made from Python before recorded the config's dtype, float32 by default, whatever the pipeline's)
        was = recorded.get("dtype")
        config = dataclasses.replace(config, dtype=was if isinstance(was, str) else dtype_name(pipe))
    pipe.set_progress_bar_config(disable=True)
    _check_size(pipe, config.size)
    writers = config.writers or _default_writers(pipe)
    if config.negative_prompt and config.guidance is not None and config.guidance <= 1 and not is_flux_pipeline(pipe):
        raise ConfigError(f"--negative-prompt with --guidance {config.guidance}: guidance of 1 or less runs without "
                          "classifier-free guidance, so the negative prompt would do nothing; raise --guidance or "
                          "leave it out")
    if config.negative_prompt and is_flux_pipeline(pipe):
        raise ConfigError("--negative-prompt: FLUX is guidance-distilled and generate calls it without true CFG, "
                          "so a negative prompt would do nothing; leave it out")
    if config.threshold is None:
        check_band(default_threshold(pipe), config.uncertain, names=("the model's threshold", "--uncertain"))
        config = dataclasses.replace(config, threshold=default_threshold(pipe))
    # Every prompt is checked before any denoising: a missing class word or an over-long prompt
    # is an error now, never an empty map later.
    locate = word_locator(pipe, **config.recorder_options())
    tokens = {i: locate(prompt, [words[c] for c in names]) for i, (prompt, names) in drawn.items()}
    # The recorder's options are checked before the dataset exists: a failure after would leave a sharded job's
    # folder bare (one process removes it; a launcher's workers cannot tell whether another one uses it).
    first_prompt, first_classes = next(iter(drawn.values()))
    trace(pipe, [first_prompt], [[words[c] for c in first_classes]], layers=config.layers,
          self_attention=config.self_attention, self_attention_max=config.self_attention_max,
          self_attention_every=config.self_attention_every, **config.recorder_options())
    compose_fingerprint = _digest((bank.compose, bank.pairs))
    fresh = not Path(config.out).exists()
    # What every worker of a sharded job must share: the dataset's settings, and what splits the work items.
    info = dataset_info(config)
    job = {"command": "generate", **job_terms(), "batch_size": config.batch_size,
           "images_per_class": config.images_per_class, "compose": config.compose, "dataset": info}
    dataset = Dataset.create(config.out, config.classes, info["settings"], image_format=config.image_format, job=job)
    if config.compose:
        _check_compose_templates_unchanged(dataset, compose_fingerprint)
    made_here = {item.id for item in items}
    beyond = len(dataset.finished_ids() - made_here)
    if worker.rank == 0 and beyond:  # once, not once per worker
        warnings.warn(f"{dataset.root} holds {beyond} item(s) beyond the {len(items)} this command makes (an earlier "
                      "run asked for more --images-per-class or --compose); they stay in the dataset and its lists, "
                      "nothing is deleted")
    if worker.rank == 0 and (stranded := sorted(dataset.lost_ids() - made_here)):
        warnings.warn(f"{dataset.root} holds {len(stranded)} item(s) beyond the {len(items)} this command makes that "
                      f"lost their files (e.g. {stranded[0]}): run it with the --images-per-class and --compose that "
                      "made them to make them again")
    # Whole batches of the full list by rank: the shares never overlap however the workers interleave.
    # A batch with any item left is made whole again (its finished items are not rewritten), so an
    # item's bytes never depend on where an earlier run was killed.
    batches = worker.take(list(_batches(items, config.batch_size)))
    mine = [item for batch in batches for item in batch]
    steps = config.steps or _pipeline_default(pipe, "num_inference_steps")
    guidance = _pipeline_default(pipe, "guidance_scale") if config.guidance is None else config.guidance
    model_info = model_description(model, pipe)
    name = f"generate [{worker.rank + 1}/{worker.world_size}]" if worker.sharded else "generate"
    counting = threading.Lock()  # the writer threads advance one bar

    def done_one() -> None:
        with counting:
            bar.update()

    def write(item: WorkItem, result: GeneratedImage, record: dict[str, Any], labels: np.ndarray) -> None:
        """Fuse, threshold, encode and write one item: in a background writer, while the next batch denoises."""
        by_word = {words[c]: c for c in record["classes"]}
        logical = {_rename_map_key(k, by_word): v for k, v in result.maps.soft_maps().items()}
        soft = pack(logical, result.image.shape[:2], result.maps.resolutions, result.maps.token_average,
                    config.self_attention_keep)
        dataset.write_item(item.id, result.image, record, mask=labels[result.mask], soft_maps=soft,
                           in_order=writer.in_turn)
        done_one()

    def flag(item: WorkItem, record: dict[str, Any]) -> None:
        writer.in_turn(lambda: dataset.record_flagged(item.id, record))
        done_one()

    def skip(item: WorkItem) -> None:
        writer.in_turn(lambda: dataset.note_skipped(item.id))
        done_one()

    # The lock inside: on NFS a file held open keeps its folder from being removed.
    with _removed_if_left_bare(dataset, fresh and not worker.sharded), dataset.writing(job):
        done = dataset.finished_whole(item.id for item in mine)  # an item whose files are gone is made again
        pending = [item for item in mine if item.id not in done]
        dataset.retry_skipped(item.id for item in pending)  # a flagged image skipped before is tried again
        bar = tqdm(total=len(mine), initial=len(mine) - len(pending), unit="img", desc=name,
                   disable=not progress, dynamic_ncols=True)
        with bar, BackgroundWriter(threads=writers) as writer:
            for batch in (b for b in batches if any(item.id not in done for item in b)):
                results = generate_images(
                    pipe, [drawn[i.id][0] for i in batch], [[words[c] for c in drawn[i.id][1]] for i in batch],
                    [i.seed for i in batch], steps=steps, guidance=guidance, size=config.size,
                    negative_prompt=config.negative_prompt, threshold=config.threshold,
                    uncertain=config.uncertain, resolutions=config.resolutions, layers=config.layers,
                    step_window=config.step_window, self_attention=config.self_attention,
                    self_attention_max=config.self_attention_max, self_attention_every=config.self_attention_every,
                    **config.recorder_options(),
                )
                for item, result in zip(batch, results):
                    if item.id in done:
                        continue
                    names = drawn[item.id][1]
                    labels = np.arange(256, dtype=np.uint8)  # 1..n in prompt order → the dataset's indices
                    labels[1:len(names) + 1] = [dataset.class_index(c) for c in names]
                    record = {
                        "classes": names,
                        "prompt": result.prompt,
                        "negative_prompt": config.negative_prompt,
                        "seed": item.seed,
                        "tokens": {c: tokens[item.id][words[c]] for c in names},
                        **model_info,
                        "scheduler": type(pipe.scheduler).__name__,
                        "steps": steps,
                        "guidance": guidance,
                        "size": list(result.output.shape[:2]),
                        "threshold": config.threshold,
                        "uncertain": config.uncertain,
                        "resolutions": list(result.maps.resolutions),
                        "diffumask": __version__,
                        **({"compose_bank_sha256": compose_fingerprint} if item.compose else {}),
                    }
                    if not result.flagged:
                        writer.submit(write, item, result, record, labels)
                    elif config.flagged == "record":
                        writer.submit(flag, item, record)
                    else:
                        writer.submit(skip, item)
        dataset.finalize(order=[item.id for item in items], complete={item.id for item in items})
    if pending and any("refine" in record for record in dataset.records()):
        warnings.warn(f"{dataset.root} was refined: run the same `diffumask refine` again to refine the "
                      f"{len(pending)} item(s) this run made", stacklevel=2)
    return dataset


def _default_writers(pipe: Any) -> int:
    """Writer threads: 1 beside a pipeline that runs on the CPU (it uses the cores), else 2 where this worker has
    the cores (on two cores 2 write a 512 px item in 34 ms against 54 for 1, their fsyncs overlapping too:
    ``bench/bench_generate_host.py --writers 1|2``). Not more by default: each thread's torch operations take
    torch's whole intra-op thread pool, beside the thread that feeds the GPU."""
    from .workers import available_cores

    try:
        device = torch.device(pipe._execution_device)  # where it runs, model offloading included
    except (AttributeError, RuntimeError, TypeError):
        device = torch.device("cpu")
    return 1 if device.type == "cpu" else min(2, available_cores())


def _recorded_settings(out: str | Path) -> dict[str, Any]:
    """The settings a dataset already at ``out`` was made with ({} when there is none to read)."""
    try:
        settings = json.loads((Path(out) / "dataset.json").read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return settings if isinstance(settings, dict) else {}


def _same_model_as_recorded(model: str, recorded: Any) -> str:
    """How the dataset records the model: a local folder as its absolute path (``./sd15`` and ``/data/sd15`` are one
    model, and a relative path means another folder from another directory), and a folder the dataset recorded
    absolute in that spelling (a symlink to it too). A spelling recorded before, relative or a hub id, resumes as
    it is, and only that way."""
    folder = Path(model).expanduser()
    if model == recorded or model in BUILTIN_MODELS or not folder.is_dir():
        return model
    try:
        if isinstance(recorded, str) and Path(recorded).is_absolute() and os.path.samefile(folder, recorded):
            return recorded
    except OSError:
        pass
    return str(folder.resolve())


def _digest(parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _bank_fingerprint(bank: PromptBank, recorded: Any) -> str:
    """What the single-class prompts depend on, so editing a bank's multi-class templates does not stop a dataset
    from resuming, and ``--compose`` may be added to one made without it (composed items carry their own).
    Datasets that composed before that split recorded one digest of everything, and still resume."""
    single = (bank.templates, bank.slots, bank.classes)
    whole = _digest(single + (bank.compose, bank.pairs))
    return whole if recorded == whole else _digest(single)


def _check_compose_templates_unchanged(dataset: Dataset, fingerprint: str) -> None:
    """Composed items drawn from other multi-class templates than this run's would mix two prompt sets."""
    made = {r.get("compose_bank_sha256") for r in dataset.records() if "compose_bank_sha256" in r}
    if made - {fingerprint}:
        raise ConfigError(f"{dataset.root}: its composed items were drawn from other multi-class templates "
                          "(the bank's compose/pairs changed since); restore them to resume, or choose another "
                          "output folder")


@contextmanager
def _removed_if_left_bare(dataset: Dataset, fresh: bool) -> Iterator[None]:
    """A folder this run created and a failure (a layer or resolution the model lacks, ^C) left holding only its
    settings is removed, so a bad option writes nothing. Not under a launcher: another worker may be writing."""
    try:
        yield
    except BeingWritten:  # the folder is another command's
        raise
    except BaseException:
        if fresh and {p.name for p in dataset.root.iterdir() if not p.name.startswith(".")} <= BARE_DATASET:
            shutil.rmtree(dataset.root, ignore_errors=True)
        raise


def _rename_map_key(key: str, by_word: Mapping[str, str]) -> str:
    """A soft-map key from the prompt's word to the class name: 'potted plant@16' → 'pottedplant@16'."""
    word, at, grid = key.partition("@")
    return f"{by_word.get(word, word)}{at}{grid}"


__all__ = ["GenerateConfig", "GeneratedImage", "generate_dataset", "generate_images", "generate_one",
           "item_seed", "work_items"]
