"""What the attention recorder costs: SD-1.5-shaped pipeline (random weights), with vs without.

Runs are interleaved A/B (order alternating per pair) in one process, so both sides see the same
machine state; the printed figure is the median of the per-pair time ratios. Memory: the
recorder's accumulation buffers, and the peak live tensor memory of one generation with and
without the recorder (CUDA: max_memory_allocated; CPU: the torch profiler's allocation events).

    python bench/bench_recorder.py --sizes 256 512 --pairs 3 --steps 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

PROMPT = "a photo of a dog sitting on a sofa"
CLASSES = ["dog", "sofa"]


def sd15_pipeline(device: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffumask.testing import clip_tokenizer, sd15_unet_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**sd15_unet_config())
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, sample_size=512,
    )
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77))
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text, tokenizer=clip_tokenizer(),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def generate(pipe, size: int, steps: int, record: bool):
    from diffumask import trace

    def call():
        return pipe(PROMPT, height=size, width=size, num_inference_steps=steps,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    if not record:
        return call(), None
    with trace(pipe, PROMPT, CLASSES) as recorder:
        images = call()
    recorder.maps()  # reading the maps is part of the recorder's cost
    return images, recorder


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--pairs", type=int, default=3, help="A/B pairs per size")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per generation")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = sd15_pipeline(args.device, getattr(torch, args.dtype))
    params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    print(f"SD-1.5-shaped UNet, {params:.1f} M parameters, {args.device} {args.dtype}, "
          f"{args.steps} steps, batch 1 with guidance, {torch.get_num_threads()} threads")
    for size in args.sizes:
        generate(pipe, size, 1, True)  # warm-up
        ratios, plain_times = [], []
        for pair in range(args.pairs):
            times = {}
            for record in ((False, True) if pair % 2 == 0 else (True, False)):
                sync(args.device)
                start = time.perf_counter()
                _, recorder = generate(pipe, size, args.steps, record)
                sync(args.device)
                times[record] = time.perf_counter() - start
            ratios.append(times[True] / times[False])
            plain_times.append(times[False])
            print(f"  {size}px pair {pair}: without {times[False]:.2f} s, with {times[True]:.2f} s, "
                  f"ratio {ratios[-1]:.3f}", flush=True)
        buffers = recorder.state_bytes() / 2**20
        line = (f"{size}px: median ratio with/without recorder {statistics.median(ratios):.3f} "
                f"(pairs {', '.join(f'{r:.3f}' for r in ratios)}; generation {statistics.median(plain_times):.1f} s); "
                f"recorder buffers {buffers:.2f} MiB")
        if not args.no_memory:
            without, with_recorder = (peak_memory_mib(pipe, size, r, args.device) for r in (False, True))
            line += (f"; peak tensor memory {without:.1f} MiB without, {with_recorder:.1f} MiB with "
                     f"(+{with_recorder - without:.2f} MiB)")
        print(line, flush=True)


def peak_memory_mib(pipe, size: int, record: bool, device: str) -> float:
    """Peak live tensor memory of one 1-step generation (CUDA: the allocator's peak; CPU: the
    running sum of the profiler's per-op allocations and frees)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        generate(pipe, size, 1, record)
        return torch.cuda.max_memory_allocated() / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        generate(pipe, size, 1, record)
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


if __name__ == "__main__":
    main()
