"""What `diffumask generate` adds to the pipeline's own time, and how long the GPU waits between its batches.

    python bench/bench_generate_host.py [--size 512] [--batch 8] [--batches 4] [--compose] [--writers N]   # CPU
    python bench/bench_generate_host.py --model sd15 --device cuda --dtype float16 --batches 6 --steps 20

On a GPU the pipeline runs a batch while the host waits, then hands back the images; whatever the main thread
does before it starts the next call (reading the recorder's buffers, and anything else it does with the batch)
is time the GPU sits idle. This runs `generate_dataset` as the command does (background writer included) and
times each pipeline call and each gap between two calls; then, side by side in the same process, the same
pipeline's bare calls (the same batches, steps and size: no recorder, nothing written). It prints, per image:

- the main thread's gap between two calls of generate (the GPU's wait),
- generate's time and the bare pipeline's, and their ratio (generate's images per hour against the
  pipeline's: the recorder, the gaps, and any wait for the writer),
- the background writer's time after generate's last call (fusing, thresholding, encoding and writing the
  last batch): the writer keeps up as long as this stays below the pipeline's time per image.

``--model narrow`` (the default, for a CPU) is Stable Diffusion 1.x's layout (VAE factor 8, cross-attention at
latent/1, /2, /4 and /8, the self-attention recorded at 32x32 as `generate` records it) with narrow layers, so
that the denoising is cheap and the host's own work shows; ``--model sd15`` is SD 1.5's real shape
(bench_recorder.py's), for a GPU. Random weights either way.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from diffumask.generate import GenerateConfig, generate_dataset
from diffumask.testing import clip_tokenizer

CLASS_NAMES = ["dog", "cat"]


class TimedPipeline(StableDiffusionPipeline):
    """Stable Diffusion that notes when each call starts and ends."""

    calls: list[tuple[float, float]]

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self.calls.append((start, time.perf_counter()))


def narrow_sd1(size: int) -> dict:
    """SD 1.x's layout (four levels, cross-attention at the first three and the middle, VAE factor 8) at
    a width that makes the denoising cheap; random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=size // 8, in_channels=4, out_channels=4, layers_per_block=1, cross_attention_dim=64,
        attention_head_dim=8, block_out_channels=(32, 32, 64, 64), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=8, layers_per_block=1, sample_size=size)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), scheduler=scheduler)


def timed_pipeline(model: str, size: int, device: str, dtype: torch.dtype) -> TimedPipeline:
    if model == "sd15":
        from bench_recorder import sd15_pipeline

        parts = {name: part for name, part in sd15_pipeline(device, dtype).components.items()
                 if name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")}
    else:
        parts = narrow_sd1(size)
    pipe = TimedPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device, dtype)
    pipe.calls = []
    return pipe


def per_image(seconds: list[float], batch: int) -> float:
    return statistics.median(seconds) / batch * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("narrow", "sd15"), default="narrow")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4, help="batches of each (an even number: two classes)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--compose", action="store_true",
                        help="images that name both classes (generate --compose), each class fused and thresholded")
    parser.add_argument("--writers", type=int, help="generate's writer threads (default: generate's own choice)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = timed_pipeline(args.model, args.size, args.device, getattr(torch, args.dtype))
    per_class = args.batch * args.batches // len(CLASS_NAMES)
    with tempfile.TemporaryDirectory() as out:
        config = GenerateConfig(
            classes=CLASS_NAMES, out=str(Path(out) / "data"), images_per_class=0 if args.compose else per_class,
            compose=per_class if args.compose else 0, batch_size=args.batch, steps=args.steps, size=args.size,
            writers=args.writers, device=args.device, dtype=args.dtype,
        )
        generate_dataset(config, pipe, progress=False)
        finished = time.perf_counter()
    generate_calls, pipe.calls = pipe.calls, []
    prompts = [f"a photo of a {CLASS_NAMES[0]}"] * args.batch
    for index in range(args.batches):
        generators = [torch.Generator().manual_seed(index * args.batch + k) for k in range(args.batch)]
        pipe(prompt=prompts, height=args.size, width=args.size, num_inference_steps=args.steps, generator=generators,
             output_type="np")

    gaps = [following - end for (_, end), (following, _) in zip(generate_calls, generate_calls[1:])]
    cycles = [following - start for (start, _), (following, _) in zip(generate_calls, generate_calls[1:])]
    bare = [end - start for start, end in pipe.calls]
    kind = "composed images (both classes each)" if args.compose else "one class per image"
    print(f"{args.model} on {args.device} ({args.dtype}): {len(generate_calls)} batches of {args.batch} at {args.size} px, "
          f"{kind}, {args.steps} steps, torch threads {args.threads}, writers {args.writers or 'default'}")
    print(f"main thread between two pipeline calls of generate (the GPU's wait): {per_image(gaps, args.batch):.1f} ms "
          f"per image (median of {len(gaps)} gaps; {min(gaps) * 1e3:.0f}-{max(gaps) * 1e3:.0f} ms per batch)")
    print(f"generate, from one call's start to the next's: {per_image(cycles, args.batch):.1f} ms per image; the bare "
          f"pipeline: {per_image(bare, args.batch):.1f} ms per image; ratio "
          f"{statistics.median(cycles) / statistics.median(bare):.3f} (medians)")
    print(f"the writer after generate's last call: {(finished - generate_calls[-1][1]) / args.batch * 1e3:.1f} ms "
          f"per image of the last batch")


if __name__ == "__main__":
    main()
