"""What the attention recorder costs: SD-1.5- or SDXL-shaped pipeline (random weights), with vs without.

Runs are interleaved A/B (order alternating per pair) in one process, so both sides see the same
machine state; the printed figure is the median of the per-pair time ratios. The recorder runs as
``generate`` runs it: the classes' columns and, by default, the self-attention at latent/2 (at most
32x32). Memory: the recorder's accumulation buffers, and the peak live tensor memory of one
generation with and without the recorder (CUDA: max_memory_allocated; CPU: the torch profiler's
allocation events).

    python bench/bench_recorder.py --sizes 256 512 --pairs 3 --steps 2                 # CPU
    python bench/bench_recorder.py --device cuda --dtype float16 --sizes 512 --batch 8 --steps 20
    python bench/bench_recorder.py --model sdxl --device cuda --dtype float16 --sizes 1024 --steps 20
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import diffusers
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


def sdxl_pipeline(device: str, dtype: torch.dtype):
    """SDXL 1.0's UNet (2.57 B parameters), text encoders (CLIP ViT-L, OpenCLIP bigG) and VAE, random
    weights, built directly on ``device``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffumask.testing import clip_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ).to(dtype)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, sample_size=1024, scaling_factor=0.13025, force_upcast=False,
        ).to(dtype)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=77)).to(dtype)
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)).to(dtype)
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         timestep_spacing="leading", steps_offset=1),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, size: int, steps: int, record: bool, batch: int = 1, self_attention: int | None = 2):
    from diffumask import trace

    def call():
        return pipe(PROMPT, height=size, width=size, num_inference_steps=steps, num_images_per_prompt=batch,
                    generator=[torch.Generator().manual_seed(i) for i in range(batch)], output_type="np").images

    if not record:
        return call(), None
    with trace(pipe, PROMPT, CLASSES, self_attention=self_attention) as recorder:
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
    parser.add_argument("--model", choices=["sd15", "sdxl"], default="sd15", help="pipeline shape")
    parser.add_argument("--batch", type=int, default=1, help="images per pipeline call (num_images_per_prompt)")
    parser.add_argument("--self-attention", type=lambda v: None if v == "none" else int(v), default=2,
                        help="record self-attention at latent/F as generate does (default 2; 'none')")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--save-pipeline", metavar="DIR",
                        help="only save the random-weight pipeline to DIR (for `diffumask generate --model DIR`)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    diffusers.utils.logging.set_verbosity_error()  # the random pipelines' scheduler-config notices
    build = sd15_pipeline if args.model == "sd15" else sdxl_pipeline
    pipe = build(args.device, getattr(torch, args.dtype))
    if args.save_pipeline:
        pipe.save_pretrained(args.save_pipeline)
        print(f"saved the random {args.model.upper()}-shaped pipeline ({args.dtype}) to {args.save_pipeline}")
        return
    params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"{args.model.upper()}-shaped UNet, {params:.1f} M parameters, {args.device} ({device_name}) {args.dtype}, "
          f"{args.steps} steps, batch {args.batch} with guidance, self-attention latent/{args.self_attention}")
    run = functools.partial(generate, batch=args.batch, self_attention=args.self_attention)
    for size in args.sizes:
        run(pipe, size, 1, True)  # warm-up
        run(pipe, size, 1, False)
        ratios, plain_times, recorder = [], [], None
        for pair in range(args.pairs):
            times = {}
            for record in ((False, True) if pair % 2 == 0 else (True, False)):
                sync(args.device)
                start = time.perf_counter()
                _, traced = run(pipe, size, args.steps, record)
                recorder = traced or recorder
                sync(args.device)
                times[record] = time.perf_counter() - start
            ratios.append(times[True] / times[False])
            plain_times.append(times[False])
            print(f"  {size}px pair {pair}: without {times[False]:.2f} s, with {times[True]:.2f} s, "
                  f"ratio {ratios[-1]:.3f}", flush=True)
        buffers = recorder.state_bytes() / 2**20
        plain = statistics.median(plain_times)
        line = (f"{size}px: median ratio with/without recorder {statistics.median(ratios):.3f} "
                f"(pairs {', '.join(f'{r:.3f}' for r in ratios)}; generation {plain:.2f} s, "
                f"{args.batch / plain:.2f} images/s without the recorder); recorder buffers {buffers:.2f} MiB")
        if not args.no_memory:
            without, with_recorder = (peak_memory_mib(run, pipe, size, r, args.device) for r in (False, True))
            line += (f"; peak tensor memory {without:.1f} MiB without, {with_recorder:.1f} MiB with "
                     f"(+{with_recorder - without:.2f} MiB)")
        print(line, flush=True)


def peak_memory_mib(run, pipe, size: int, record: bool, device: str) -> float:
    """Peak live tensor memory of one 1-step generation (CUDA: the allocator's peak; CPU: the
    running sum of the profiler's per-op allocations and frees)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        run(pipe, size, 1, record)
        return torch.cuda.max_memory_allocated() / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run(pipe, size, 1, record)
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


if __name__ == "__main__":
    main()
