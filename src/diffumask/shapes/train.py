"""Train the shapes text-to-image model on the world's image-caption pairs, from scratch or on from saved weights.

    python -m diffumask.shapes.train --out runs/shapes [--steps N] [--minutes M] [--seed S] [--init-from DIR]

Scenes are rendered on the fly (about 0.2 ms each, free next to the UNet), from a seed stream
that is disjoint from the seed ranges ``export_world`` uses, so exported val/test scenes are
never trained on. Masks are never used. The loss is v-prediction with min-SNR weighting, which
the prototype found learns colours and backgrounds far faster than epsilon-prediction at this
size. Captions are varied (colours or background dropped, unknown filler words, empty captions
for classifier-free guidance) so that short prompts such as 'a photo of a circle' work too.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
import transformers
from diffusers import DDPMScheduler
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel, compute_snr

from ..errors import ConfigError
from ..models import is_shapes_folder
from ..workers import start_loader
from .model import (DIT_CONFIG, DIT_SCHEDULER_CONFIG, SCHEDULER_CONFIG, TEXT_CONFIG, UNET_CONFIG, ShapesDiTPipeline,
                    ShapesPipeline, build_pipeline, load_pipeline)
from .world import COUNT_PROBS, Scene, caption_for, render_scene

#: Model-training scenes come from seeds >= 2**40; exported splits use seeds < 2**40.
TRAIN_SEED_BASE = 2**40
#: Filler words outside the vocabulary (they tokenize to <unk>), as prompt templates add them.
FILLER_WORDS = ("photo", "of", "the", "picture", "image", "with", "there", "is")


@dataclass
class TrainSettings:
    """Every knob of a training run; written to ``training.json`` beside the weights."""

    steps: int = 1500
    minutes: float | None = None  # wall-clock cap; the LR schedule still follows ``steps``
    seed: int = 0
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    snr_gamma: float = 5.0
    p_empty_caption: float = 0.1
    p_drop_colours: float = 0.2
    p_drop_background: float = 0.3
    p_filler: float = 0.1
    #: Share of single-object scenes; the rest have two or three objects in the world's 3:2 ratio.
    #: The world's own mix (one half single) left the model at chance on shape words after 1500
    #: steps; mostly single-object scenes teach shapes first and still show how captions compose.
    single_object_share: float = 0.85
    threads: int = 2
    #: "unet" (the shipped model: v-prediction, min-SNR) or "dit" (an SD3-shaped transformer, flow matching
    #: with logit-normal times, as SD3 trains)
    backbone: str = "unet"
    save_every: int = 0  # also write snapshots to OUT/checkpoints/step_N (0: only at the end)
    #: where the model trains; scenes are rendered on the CPU either way
    device: str = "cpu"
    #: processes rendering the next steps' scenes while the model trains (0: in the training loop). On a GPU
    #: the rendering (0.2 ms a scene, 51 ms a batch of 256) would otherwise hold up every step.
    loader_workers: int = 0
    #: a saved pipeline folder (e.g. the shipped weights) to go on training from, with a fresh optimizer and
    #: schedule; None: from scratch
    init_from: str | None = None
    #: a larger UNet than the shipped one: its three blocks' channels (multiples of 16) and layers per block
    #: (None: the shipped (32, 64, 64) and 1)
    unet_channels: tuple[int, ...] | None = None
    layers_per_block: int | None = None

    def __post_init__(self) -> None:
        for name, value in (("--steps", self.steps), ("--batch-size", self.batch_size), ("--threads", self.threads)):
            if value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        for name, value in (("--save-every", self.save_every), ("--warmup-steps", self.warmup_steps),
                            ("--loader-workers", self.loader_workers)):
            if value < 0:
                raise ConfigError(f"{name} must be 0 or more, got {value}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.single_object_share <= 1:
            raise ConfigError(f"--single-object-share is a share in [0, 1], got {self.single_object_share}")
        if self.minutes is not None and not self.minutes > 0:
            raise ConfigError(f"--minutes must be positive, got {self.minutes}")

    def unet_overrides(self) -> dict[str, Any]:
        """What this run's UNet changes of ``UNET_CONFIG`` (empty for the shipped architecture)."""
        out: dict[str, Any] = {}
        if self.unet_channels is not None:
            if len(self.unet_channels) != 3 or any(c <= 0 or c % 16 for c in self.unet_channels):
                raise ConfigError(f"--channels {','.join(map(str, self.unet_channels))}: give three positive "
                                  "multiples of 16 (one per UNet block), e.g. 64,128,128")
            out["block_out_channels"] = tuple(self.unet_channels)
        if self.layers_per_block is not None:
            if self.layers_per_block < 1:
                raise ConfigError(f"--layers-per-block {self.layers_per_block}: give 1 or more")
            out["layers_per_block"] = self.layers_per_block
        if out and (self.backbone != "unet" or self.init_from is not None):
            raise ConfigError("--channels and --layers-per-block shape a new UNet: not with --backbone dit or "
                              "--init-from (a saved model keeps its own architecture)")
        return out


def training_caption(scene, rng: np.random.Generator, s: TrainSettings) -> str:
    """One caption variant for a scene: full, without colours/background, with fillers, or empty."""
    if rng.random() < s.p_empty_caption:
        return ""
    text = caption_for(scene.objects, None if rng.random() < s.p_drop_background else scene.texture,
                       colours=rng.random() >= s.p_drop_colours)
    if rng.random() < s.p_filler:
        words = text.split()
        for _ in range(int(rng.integers(1, 4))):
            words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(FILLER_WORDS)))
        text = " ".join(words)
    return text


def training_scenes(step: int, s: TrainSettings, rng: np.random.Generator) -> list[Scene]:
    """One step's scenes, ``single_object_share`` of them with one object (counts drawn from ``rng``)."""
    first = TRAIN_SEED_BASE + s.seed * 2**32 + step * s.batch_size
    multi = np.asarray(COUNT_PROBS[1:]) / sum(COUNT_PROBS[1:])
    counts = np.where(rng.random(s.batch_size) < s.single_object_share, 1,
                      rng.choice([2, 3], size=s.batch_size, p=multi))
    return [render_scene(first + j, num_objects=int(n)) for j, n in enumerate(counts)]


def training_batch(step: int, s: TrainSettings) -> tuple[torch.Tensor, list[str]]:
    """Images in [-1, 1] (B, 3, H, W) and captions for one step; a pure function of (seed, step)."""
    rng = np.random.default_rng([s.seed, step])
    scenes = training_scenes(step, s, rng)
    images = torch.from_numpy(np.stack([sc.image for sc in scenes])).permute(0, 3, 1, 2)
    return images.float() / 127.5 - 1, [training_caption(sc, rng, s) for sc in scenes]


class _Batches(torch.utils.data.Dataset):
    """Step ``i + 1``'s batch as item ``i``: a pure function of (seed, step), so any number of loader
    processes gives the same batches in the same order."""

    def __init__(self, settings: TrainSettings) -> None:
        self.settings = settings

    def __len__(self) -> int:
        return self.settings.steps

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[str]]:
        return training_batch(index + 1, self.settings)


def scene_batches(s: TrainSettings) -> torch.utils.data.DataLoader:
    """Steps 1, 2, …'s (images, captions), rendered in ``s.loader_workers`` processes (or in the loop). The loader
    seeds its workers from a generator of its own, so the model's random draws are those of a run without it."""
    return torch.utils.data.DataLoader(_Batches(s), batch_size=None, num_workers=s.loader_workers,
                                       pin_memory=torch.device(s.device).type == "cuda", generator=torch.Generator())


def _start_from(path: str, backbone: str) -> ShapesPipeline:
    """A saved pipeline in float32, to train on; its backbone must be the one asked for."""
    if not is_shapes_folder(path):
        raise ConfigError(f"--init-from {path}: no saved shapes pipeline there; give a folder this trainer wrote, "
                          "e.g. src/diffumask/shapes/weights")
    pipe = load_pipeline("cpu", torch.float32, path=path)
    found = "dit" if isinstance(pipe, ShapesDiTPipeline) else "unet"
    if found != backbone:
        raise ConfigError(f"--init-from {path} holds a {found} pipeline; pass --backbone {found}")
    return pipe


def save_fp16(pipe: ShapesPipeline, out: Path) -> None:
    """Write the pipeline folder with fp16 safetensors (half the size; loads into any dtype). Each module is
    halved on its own: the pipeline's ``.to(float16)`` on a CPU warns that such a pipeline cannot run there."""
    half = copy.deepcopy(pipe).to("cpu")
    for component in half.components.values():
        if isinstance(component, torch.nn.Module):
            component.half()
    half.save_pretrained(out, safe_serialization=True)


def train(out: str | Path, settings: TrainSettings | None = None, command: str | None = None) -> Path:
    """Train (from scratch, or on from ``settings.init_from``) and write the pipeline, ``train_log.jsonl`` and
    ``training.json`` to ``out``; torch's thread count is set for the run and given back after it."""
    if Path(out).exists() and (not Path(out).is_dir() or any(not p.name.startswith(".") for p in Path(out).iterdir())):
        raise ConfigError(f"{out} exists and is not an empty folder: a run writes a whole pipeline there; choose a new "
                          "--out (to go on from a saved pipeline or snapshot, pass it as --init-from)")
    threads = torch.get_num_threads()
    try:
        return _train(out, settings, command)
    finally:
        torch.set_num_threads(threads)


def _train(out: str | Path, settings: TrainSettings | None, command: str | None) -> Path:
    s = settings or TrainSettings()
    out = Path(out)
    torch.set_num_threads(s.threads)
    torch.set_flush_denormal(True)  # tiny early updates otherwise make denormals: 4x slower steps
    torch.manual_seed(s.seed)
    device = torch.device(s.device)
    overrides = s.unet_overrides()
    pipe = (build_pipeline(s.seed, s.backbone, overrides) if s.init_from is None
            else _start_from(s.init_from, s.backbone))
    pipe = pipe.to(device)
    out.mkdir(parents=True, exist_ok=True)
    denoiser, text_encoder, tokenizer = pipe.denoiser, pipe.text_encoder, pipe.tokenizer
    denoiser.train()
    text_encoder.train()
    noise_scheduler = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items()
                                       if k in ("num_train_timesteps", "beta_schedule", "prediction_type")})
    params = [*denoiser.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, s.warmup_steps, s.steps)
    ema = EMAModel(params, decay=s.ema_decay)

    def snapshot(folder: Path) -> None:
        ema.store(params)
        ema.copy_to(params)
        save_fp16(pipe, folder)
        ema.restore(params)

    log_path = out / "train_log.jsonl"
    log = log_path.open("w")
    start = time.time()
    step = 0
    for step, (images, captions) in enumerate(start_loader(scene_batches(s)), start=1):
        images = images.to(device, non_blocking=True)
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        noise = torch.randn_like(images)
        text = text_encoder(ids)
        if s.backbone == "unet":
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(images),), device=device)
            noisy = noise_scheduler.add_noise(images, noise, t)
            target = noise_scheduler.get_velocity(images, noise, t)
            pred = denoiser(noisy, t, encoder_hidden_states=text.last_hidden_state).sample
            snr = compute_snr(noise_scheduler, t)
            weight = snr.clamp(max=s.snr_gamma) / (snr + 1)  # min-SNR-gamma for v-prediction
        else:  # flow matching: x_σ = (1 - σ)·x + σ·noise, the transformer predicts noise - x
            sigma = torch.sigmoid(torch.randn(len(images), device=device))[:, None, None, None]
            noisy = (1 - sigma) * images + sigma * noise
            target = noise - images
            pred = denoiser(hidden_states=noisy, encoder_hidden_states=text.last_hidden_state,
                            pooled_projections=text.pooler_output, timestep=sigma.flatten() * 1000).sample
            weight = torch.ones(len(images), device=device)
        loss = (weight * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        ema.step(params)

        elapsed = time.time() - start
        if step % 25 == 0 or step == 1:
            entry = {"step": step, "loss": round(loss.item(), 5), "lr": lr_schedule.get_last_lr()[0],
                     "seconds": round(elapsed, 1)}
            print(json.dumps(entry), flush=True)
            log.write(json.dumps(entry) + "\n")
            log.flush()
        if s.save_every and step % s.save_every == 0 and step < s.steps:
            snapshot(out / "checkpoints" / f"step_{step}")
        if s.minutes is not None and elapsed > 60 * s.minutes:
            print(f"stopping at step {step}: {s.minutes} minute cap reached", flush=True)
            break
    log.close()

    ema.copy_to(params)
    save_fp16(pipe, out)
    record = {
        "command": command or f"python -m diffumask.shapes.train --out {shlex.quote(str(out))}",
        "settings": asdict(s),
        "steps_done": step,
        "wall_seconds": round(time.time() - start, 1),
        "unet_config" if s.backbone == "unet" else "transformer_config":
            {**UNET_CONFIG, **overrides} if s.backbone == "unet" else DIT_CONFIG,
        "text_encoder_config": TEXT_CONFIG,
        "scheduler_config": SCHEDULER_CONFIG if s.backbone == "unet" else DIT_SCHEDULER_CONFIG,
        "data": "shapes world scenes rendered on the fly from seeds "
                f"{TRAIN_SEED_BASE} + seed * 2**32 + step * batch_size + j, a share of "
                f"{s.single_object_share} with one object; images and captions only",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
    }
    parent = Path(s.init_from or "") / "training.json"
    if s.init_from is not None and parent.is_file():  # the weights' whole history, run by run
        record["init_from_record"] = json.loads(parent.read_text())
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def _channels(text: str) -> tuple[int, ...]:
    """``--channels 64,128,128`` as numbers."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--channels {text}: give three comma-separated numbers, e.g. 64,128,128") from None


def main(argv: list[str] | None = None, prog: str = "python -m diffumask.shapes.train") -> None:
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (pipeline, logs, training.json)")
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help=f"optimiser steps; the learning-rate schedule ends at the last (default: {defaults.steps})")
    parser.add_argument("--minutes", type=float, default=None,
                        help="wall-clock cap; the schedule still follows --steps (default: none)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help=f"seed of initialisation, scenes and noise (default: {defaults.seed})")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help=f"scenes per step (default: {defaults.batch_size})")
    parser.add_argument("--lr", type=float, default=defaults.lr,
                        help=f"peak learning rate of the cosine schedule (default: {defaults.lr:g})")
    parser.add_argument("--single-object-share", type=float, default=defaults.single_object_share,
                        help="share of one-object scenes in each batch (the rest: two or three objects; default: "
                             f"{defaults.single_object_share})")
    parser.add_argument("--backbone", choices=["unet", "dit"], default=defaults.backbone,
                        help="unet: the shipped model; dit: an SD3-shaped diffusion transformer (flow matching; "
                             f"default: {defaults.backbone})")
    parser.add_argument("--save-every", type=int, default=0,
                        help="also save the pipeline to OUT/checkpoints/step_N every N steps (default: 0, at the end only)")
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps,
                        help=f"steps of linear learning-rate warm-up before the cosine decay (default: "
                             f"{defaults.warmup_steps})")
    parser.add_argument("--init-from", default=None, metavar="DIR",
                        help="go on training a saved pipeline (e.g. src/diffumask/shapes/weights) with a fresh "
                             "optimizer and learning-rate schedule (default: from scratch)")
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help=f"CPU threads torch uses (default: {defaults.threads})")
    parser.add_argument("--channels", default=None, metavar="C1,C2,C3",
                        help="a wider UNet: its three blocks' channels, multiples of 16 "
                             "(default: the shipped 32,64,64)")
    parser.add_argument("--layers-per-block", type=int, default=None,
                        help="a deeper UNet: resnet (and attention) layers per block (default: the shipped 1)")
    parser.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:1 ... (default: cpu)")
    parser.add_argument("--loader-workers", type=int, default=defaults.loader_workers,
                        help="processes rendering scenes ahead of the model (default: 0, in the training loop; "
                             "on a GPU use several)")
    args = parser.parse_args(argv)
    argv_used = sys.argv[1:] if argv is None else argv
    command = "python -m diffumask.shapes.train " + " ".join(shlex.quote(a) for a in argv_used)
    try:
        settings = TrainSettings(steps=args.steps, minutes=args.minutes, seed=args.seed,
                                 batch_size=args.batch_size, lr=args.lr, save_every=args.save_every,
                                 single_object_share=args.single_object_share,
                                 threads=args.threads, backbone=args.backbone, device=args.device,
                                 loader_workers=args.loader_workers, warmup_steps=args.warmup_steps,
                                 init_from=args.init_from, layers_per_block=args.layers_per_block,
                                 unet_channels=None if args.channels is None else _channels(args.channels))
        train(args.out, settings, command)
    except ConfigError as error:  # a bad option: one line, as argparse reports its own
        parser.error(str(error))


if __name__ == "__main__":
    main()
