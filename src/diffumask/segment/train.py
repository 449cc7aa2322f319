"""``diffumask train``: a semantic segmenter from one or more labelled folders, through accelerate.

One process or many (``accelerate launch -m diffumask train …``, or ``torchrun``): each process
takes its share of every global batch, gradients are averaged by accelerate's DDP, and only the
main process writes. A checkpoint is written atomically every ``save_every`` steps; re-running the
same command resumes from it and ends with the same weights as an unbroken run, because every
batch and every dropout mask is a function of (seed, step).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..distributed import require_torch_launcher
from ..errors import ConfigError, check_sequences
from ..formats import open_source
from ..formats.readers import DiffumaskSource
from ..models import check_device
from ..workers import start_loader
from .data import StepBatches, TrainingSamples, check_augment, open_splits, union_classes
from .model import Segmenter, build_segmenter, init_from
from .presets import Preset, get_preset, uses_composites
from .run import CHECKPOINT, RunFolder

LOG_EVERY = 10
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")

#: DDP compares a gradient's strides with its bucket's literally, size-1 dimensions included: a depthwise conv's
#: (C, 1, k, k) weight (SegFormer's Mix-FFN) gets its gradient with another stride on that dimension, the same
#: layout in memory, and every rank warned in four lines at its first step. DDP warns once per process, for the
#: first gradient that differs; that warning is silenced only when it is this case (the pattern requires the other
#: three strides to agree), and only while train runs.
SIZE_ONE_STRIDE_WARNING = (r"(?s)Grad strides do not match bucket view strides\b.*"
                           r"grad\.sizes\(\) = \[\d+, 1, \d+, \d+\], strides\(\) = \[(\d+), \d+, (\d+), (\d+)\]\s*"
                           r"bucket_view\.sizes\(\) = \[\d+, 1, \d+, \d+\], strides\(\) = \[\1, \d+, \2, \3\]")


@dataclass
class TrainConfig:
    """What ``diffumask train`` does; ``None`` takes the preset's default."""

    data: Sequence[str]
    out: str
    preset: str = "tiny"
    split: str = "train"
    steps: int | None = None
    batch_size: int | None = None
    crop: int | None = None
    lr: float | None = None
    augment: Sequence[str] | None = None
    save_every: int | None = None
    weights: Sequence[float] | None = None
    #: Datasets whose images teach what the classes are not: their pixels of the run's classes keep them, all
    #: other pixels are background; their classes are not the run's (a dog run with cat images as negatives).
    negatives: Sequence[str] = ()
    negatives_split: str = "train"
    init_from: str | None = None
    seed: int = 0
    device: str | None = None  # runtime only: cpu, cuda, mps (None: cuda when present)
    mixed_precision: str = "auto"  # runtime only: bf16 on a GPU that has it, else off
    workers: int = 2  # runtime only: data-loading processes per training process
    extra: dict[str, Any] = field(default_factory=dict)  # schedule fields without a flag (e.g. scale_range)

    def __post_init__(self) -> None:
        check_sequences("TrainConfig", data=(self.data, '["data/voc"]'), augment=(self.augment, '["+mosaic", "paste"]'),
                        weights=(self.weights, "[1.0, 1.0]"), negatives=(self.negatives, '["data/cats"]'))

    def resolved_preset(self) -> Preset:
        augment = None if self.augment is None else list(self.augment)
        if augment and any(name.startswith("+") for name in augment):  # "+mosaic,paste": besides the preset's own
            augment = list(dict.fromkeys([*get_preset(self.preset).schedule.augment,
                                          *(name.removeprefix("+") for name in augment)]))
        overrides = {"steps": self.steps, "batch_size": self.batch_size, "crop": self.crop, "lr": self.lr,
                     "save_every": self.save_every,
                     "augment": None if augment is None else check_augment(augment), **self.extra}
        preset = get_preset(self.preset).with_schedule(**{k: v for k, v in overrides.items() if v is not None})
        s = preset.schedule
        for name in ("steps", "batch_size", "crop", "save_every"):
            if getattr(s, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(s, name)}")
        if not s.lr > 0:
            raise ConfigError(f"--lr must be positive, got {s.lr}")
        if not 0 <= s.composite_share <= 1:
            raise ConfigError(f"--composite-share is a share of the samples, in [0, 1], got {s.composite_share}")
        if "composite_share" in self.extra and not uses_composites(s.augment):
            raise ConfigError("--composite-share needs mosaic, paste or occlusion in --augment (e.g. --augment "
                              "+mosaic,paste)")
        if s.max_grad_norm is not None and s.max_grad_norm < 0:
            raise ConfigError(f"--max-grad-norm must be positive (0: no clipping), got {s.max_grad_norm}")
        for name in ("weight_decay", "weight_decay_norm", "weight_decay_embed"):
            if (getattr(s, name) or 0) < 0:
                raise ConfigError(f"{name} must be 0 or more (a schedule field, set through TrainConfig.extra), "
                                  f"got {getattr(s, name)}")
        return preset

    def settings(self, preset: Preset) -> dict[str, Any]:
        """What a resumed run must share with the first one (not where or on what it runs)."""
        return {"data": [str(d) for d in self.data], "split": self.split, "preset_name": self.preset,
                "preset": preset.as_dict(), "weights": None if self.weights is None else list(self.weights),
                **({"negatives": [str(d) for d in self.negatives], "negatives_split": self.negatives_split}
                   if self.negatives else {}),
                "init_from": self.init_from, "seed": self.seed}


def lr_factor(step: int, schedule: Any) -> float:
    """Linear warm-up (at most a fifth of the run), then the poly decay (1 - t)^power of the
    Mask2Former/mmseg recipes."""
    warmup = min(schedule.warmup_steps, schedule.steps // 5)
    if step < warmup:
        return (step + 1) / warmup
    return (1 - step / schedule.steps) ** schedule.poly_power


def _accelerator(config: TrainConfig, family: str) -> Any:
    from accelerate import Accelerator, DistributedDataParallelKwargs

    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if check_device(device).type not in ("cpu", "cuda", "mps") or ":" in device:
        raise ConfigError(f"--device {device}: train takes cpu, cuda or mps; pick GPUs with CUDA_VISIBLE_DEVICES "
                          "(several GPUs: accelerate launch or torchrun)")
    if config.mixed_precision not in MIXED_PRECISION:
        raise ConfigError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}")
    precision = config.mixed_precision
    if precision == "auto":
        precision = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "no"
    # Swin backbones have a final norm Mask2Former never uses: DDP must not wait for its gradient.
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if family == "mask2former" else []
    return Accelerator(cpu=device == "cpu", mixed_precision=precision, kwargs_handlers=handlers)


def train(config: TrainConfig, progress: bool = True, on_step: Callable[[int], None] | None = None,
          warn_unfinished: bool = True) -> RunFolder:
    """Train (or resume) the run in ``config.out``; ``on_step(step)`` is called after each finished step.
    ``warn_unfinished``: warn of a diffumask dataset that is not whole yet (being written, a stopped run's, items
    unrefined beside refined ones); off for filter's folds, which train on the dataset filter is writing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SIZE_ONE_STRIDE_WARNING, category=UserWarning)
        return _train(config, progress, on_step, warn_unfinished)


def _train(config: TrainConfig, progress: bool, on_step: Callable[[int], None] | None,
           warn_unfinished: bool) -> RunFolder:
    if not config.data:
        raise ConfigError("train needs at least one DATA folder")
    require_torch_launcher("train")
    preset = config.resolved_preset()
    schedule = preset.schedule
    accelerator = _accelerator(config, preset.family)
    sources = [open_source(d) for d in config.data]
    for source in sources if warn_unfinished and accelerator.is_main_process else ():
        if isinstance(source, DiffumaskSource) and (reason := source.dataset.unfinished()):
            warnings.warn(f"{source.root} is not finished: {reason}", stacklevel=3)
    classes = union_classes(sources)
    parts = open_splits(sources, config.split, classes)
    parts += open_splits([open_source(d) for d in config.negatives], config.negatives_split, classes, negatives=True)
    items = [{"data": part.source.spec, "split": part.split, "ids": part.ids} for part in parts]
    samples = TrainingSamples(parts, config.weights, schedule.crop, schedule.scale_range, schedule.augment, config.seed,
                              schedule.composite_share)

    settings = config.settings(preset)
    RunFolder.check(config.out, classes, settings)  # every process, before any waits: a mismatch never hangs
    RunFolder.check_items(config.out, items)
    segmenter: Segmenter | None = None
    if config.init_from and not (Path(config.out) / CHECKPOINT).is_file():  # a bad source fails before --out is made
        torch.manual_seed(config.seed)
        segmenter = build_segmenter(preset, classes)
        init_from(segmenter, config.init_from)
    accelerator.wait_for_everyone()  # and before the main process writes: a check mid-write saw a half-made run
    run = RunFolder.create(config.out, classes, settings) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    run = run or RunFolder(config.out)
    if accelerator.is_main_process:
        run.record_items(items)
    state = run.load_checkpoint()
    start = 0 if state is None else int(state["step"])
    elapsed_before = 0.0 if state is None else float(state.get("elapsed", 0.0))  # training seconds before a resume
    if state is not None and state.get("processes", accelerator.num_processes) != accelerator.num_processes:
        if accelerator.is_main_process:
            warnings.warn(f"{run.root} was trained by {state['processes']} process(es) up to step {start} and goes on with "
                          f"{accelerator.num_processes}: it resumes, but its weights will not be bit-identical to an "
                          "uninterrupted run's (gradients are reduced across another number of processes)", stacklevel=2)
    if start >= schedule.steps and run.model_dir.is_dir():
        return run

    if segmenter is None:  # without --init-from, or resuming (the checkpoint holds the weights)
        torch.manual_seed(config.seed)
        segmenter = build_segmenter(preset, classes)
    optimizer = torch.optim.AdamW(segmenter.parameter_groups(schedule.lr, schedule.backbone_lr_mult,
                                                             schedule.weight_decay, schedule.weight_decay_norm,
                                                             schedule.weight_decay_embed))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, schedule))
    if state is not None:
        segmenter.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    if accelerator.is_main_process:
        run.truncate_log(start)  # entries past the checkpoint (or all, before the first) are redone
    model, optimizer = accelerator.prepare(segmenter, optimizer)

    batches = StepBatches(start, schedule.steps, schedule.batch_size, accelerator.process_index,
                          accelerator.num_processes)
    loader = DataLoader(samples, batch_sampler=batches, num_workers=config.workers,
                        persistent_workers=False, pin_memory=accelerator.device.type == "cuda")
    bar = tqdm(total=schedule.steps, initial=start, unit="step", disable=not (progress and accelerator.is_main_process),
               desc="train")
    losses: list[torch.Tensor] = []
    tick = began = time.perf_counter()
    model.train()
    for step, (pixels, labels) in zip(range(start, schedule.steps), start_loader(loader)):
        torch.manual_seed(config.seed * 1_000_003 + step)  # dropout / drop-path: the same on resume
        pixels = pixels.to(accelerator.device, non_blocking=True)
        labels = labels.to(accelerator.device, non_blocking=True)
        with accelerator.autocast():
            loss = model(pixels, labels)
        accelerator.backward(loss)
        if schedule.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), schedule.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        done = step + 1
        if done % LOG_EVERY == 0 or done == schedule.steps:
            mean_loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
            seconds = (time.perf_counter() - tick) / len(losses)
            if accelerator.is_main_process:
                run.append_log({"step": done, "loss": round(mean_loss, 5), "lr": scheduler.get_last_lr()[-1],
                                "seconds_per_step": round(seconds, 4),
                                "elapsed": round(elapsed_before + time.perf_counter() - began, 1)})
            if not math.isfinite(mean_loss):
                raise ConfigError(f"the loss became {mean_loss} at step {done}; lower --lr")
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            losses.clear()
            tick = time.perf_counter()
        bar.update(1)
        if done % schedule.save_every == 0 or done == schedule.steps:
            if accelerator.is_main_process:
                run.save_checkpoint({"step": done, "model": accelerator.unwrap_model(model).model.state_dict(),
                                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                     "elapsed": elapsed_before + time.perf_counter() - began,
                                     "processes": accelerator.num_processes})
            accelerator.wait_for_everyone()
        if on_step is not None:
            on_step(done)
    bar.close()
    if accelerator.is_main_process:
        run.save_model(accelerator.unwrap_model(model))
    accelerator.wait_for_everyone()
    return run


def train_summary(run: RunFolder) -> dict[str, Any]:
    """The last logged step and loss, and the training time (resumes included), for messages and benchmarks."""
    entries = run.log_entries()
    if not entries:
        return {}
    return {"steps": entries[-1]["step"], "loss": entries[-1]["loss"], "minutes": entries[-1]["elapsed"] / 60}

