"""What the attention recorder costs: SD-1.5-, SDXL-, SD3-medium- or FLUX.1-shaped pipeline (random weights),
with vs without.

Runs are interleaved A/B (order alternating per pair) in one process, so both sides see the same
machine state; the printed figure is the median of the per-pair time ratios. The recorder runs as
``generate`` runs it: the classes' columns and, by default, the self-attention at latent/2 (at most
32x32), at every second step; ``--profile`` adds where the time goes. Memory: the recorder's
accumulation buffers, and the peak live tensor memory of one generation with and without the
recorder (CUDA: max_memory_allocated; CPU: the torch profiler's allocation events).

    python bench/bench_recorder.py --sizes 256 512 --pairs 3 --steps 2                 # CPU
    python bench/bench_recorder.py --device cuda --dtype float16 --sizes 512 --batch 8 --steps 20
    python bench/bench_recorder.py --model sdxl --device cuda --dtype float16 --sizes 1024 --steps 20
    python bench/bench_recorder.py --model sd3 --blocks 3 --sizes 1024 --pairs 2 --steps 1       # CPU, 3 blocks
    python bench/bench_recorder.py --model flux --device cuda --dtype bfloat16 --sizes 1024 --steps 10

For the diffusion transformers (sd3, flux) the recorder runs with its default block window (the first
third of the joint blocks), and the time is the transformer's alone (``output_type="latent"``): with
``--blocks`` cutting the depth for a CPU, a VAE decode would weigh far more than it does beside the full
depth. Their text encoders have the real output widths but one layer each (they run once per call).
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics
import time

import diffusers
import torch

from diffumask.generate import GenerateConfig

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


def _t5(width: int, dtype: torch.dtype):
    """A one-layer T5 encoder of the real output width (T5-XXL's 4096), with the offline test tokenizer."""
    from transformers import T5Config, T5EncoderModel

    from diffumask.testing import t5_tokenizer

    tokenizer = t5_tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=64, d_ff=2 * width, num_layers=1, num_heads=64,
                      dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(config).to(dtype).eval(), tokenizer


def _clip(width: int, dtype: torch.dtype, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1, num_attention_heads=8,
                            max_position_embeddings=77, projection_dim=projection or width)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).to(dtype).eval()


def _dit_vae(dtype: torch.dtype):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=16,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=2, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=0.0609, scaling_factor=1.5035).to(dtype)


def _in_dtype(dtype: torch.dtype):
    """Build modules directly in ``dtype`` (FLUX's 12 B parameters would not fit twice in float32)."""
    class Default:
        def __enter__(self):
            self.saved = torch.get_default_dtype()
            torch.set_default_dtype(dtype)

        def __exit__(self, *exc):
            torch.set_default_dtype(self.saved)
    return Default()


def sd3_pipeline(device: str, dtype: torch.dtype, blocks: int | None = None):
    """SD3-medium's MMDiT (24 joint blocks, width 1536, patch 2, 16 latent channels), random weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from diffumask.testing import clip_tokenizer

    torch.manual_seed(0)
    with torch.device(device), _in_dtype(dtype):
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=blocks or 24,
            attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, pos_embed_max_size=192)
        t5, t5_tokenizer = _t5(4096, dtype)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, vae=_dit_vae(dtype), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            text_encoder=_clip(768, dtype, 768), tokenizer=clip_tokenizer(),
            text_encoder_2=_clip(1280, dtype, 1280), tokenizer_2=clip_tokenizer(pad_token="!"),
            text_encoder_3=t5, tokenizer_3=t5_tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_pipeline(device: str, dtype: torch.dtype, blocks: int | None = None):
    """FLUX.1-dev's transformer (19 double- and 38 single-stream blocks, width 3072, guidance-distilled),
    random weights; ``blocks`` keeps a third of them double-stream."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from diffumask.testing import clip_tokenizer

    double, single = (19, 38) if blocks is None else (max(1, blocks // 3), blocks - max(1, blocks // 3))
    torch.manual_seed(0)
    with torch.device(device), _in_dtype(dtype):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))
        t5, t5_tokenizer = _t5(4096, dtype)
        pipe = FluxPipeline(
            transformer=transformer, vae=_dit_vae(dtype), text_encoder=_clip(768, dtype), tokenizer=clip_tokenizer(),
            text_encoder_2=t5, tokenizer_2=t5_tokenizer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                      max_shift=1.15, base_image_seq_len=256,
                                                      max_image_seq_len=4096))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, size: int, steps: int, record: bool, batch: int = 1, self_attention: int | None = 2,
             self_attention_every: int = GenerateConfig.self_attention_every):
    from diffumask import trace

    transformer = getattr(pipe, "unet", None) is None
    output = "latent" if transformer else "np"  # see the module docstring

    def call():
        return pipe(PROMPT, height=size, width=size, num_inference_steps=steps, num_images_per_prompt=batch,
                    generator=[torch.Generator().manual_seed(i) for i in range(batch)], output_type=output).images

    if not record:
        return call(), None
    with trace(pipe, PROMPT, CLASSES, self_attention=self_attention, self_attention_every=self_attention_every) as recorder:
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
    parser.add_argument("--model", choices=["sd15", "sdxl", "sd3", "flux"], default="sd15", help="pipeline shape")
    parser.add_argument("--blocks", type=int, help="sd3, flux: this many transformer blocks, not the full depth "
                                                   "(for a CPU; flux keeps a third double-stream)")
    parser.add_argument("--batch", type=int, default=1, help="images per pipeline call (num_images_per_prompt)")
    parser.add_argument("--self-attention", type=lambda v: None if v == "none" else int(v), default=2,
                        help="record self-attention at latent/F as generate does (default 2; 'none')")
    parser.add_argument("--self-attention-every", type=int, default=GenerateConfig.self_attention_every,
                        help=f"... at every K-th step, as generate does (default {GenerateConfig.self_attention_every})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one generation each way: device (kernel) time, wall time, and the "
                             "operators whose device time the recorder adds")
    parser.add_argument("--sync-check", action="store_true",
                        help="CUDA: also list the operations that make the host wait for the GPU during one "
                             "3-step generation, with and without the recorder (torch's sync debug mode)")
    parser.add_argument("--save-pipeline", metavar="DIR",
                        help="only save the random-weight pipeline to DIR (for `diffumask generate --model DIR`)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    diffusers.utils.logging.set_verbosity_error()  # the random pipelines' scheduler-config notices
    dtype = getattr(torch, args.dtype)
    if args.model in ("sd3", "flux"):
        pipe = (sd3_pipeline if args.model == "sd3" else flux_pipeline)(args.device, dtype, args.blocks)
    else:
        pipe = (sd15_pipeline if args.model == "sd15" else sdxl_pipeline)(args.device, dtype)
    if args.save_pipeline:
        pipe.save_pretrained(args.save_pipeline)
        print(f"saved the random {args.model.upper()}-shaped pipeline ({args.dtype}) to {args.save_pipeline}")
        return
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    params = sum(p.numel() for p in denoiser.parameters()) / 1e6
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"{args.model.upper()}-shaped {type(denoiser).__name__}, {params:.1f} M parameters, {args.device} "
          f"({device_name}) {args.dtype}, {args.steps} steps, batch {args.batch}"
          f"{'' if args.model == 'flux' else ' with guidance'}, "
          f"self-attention latent/{args.self_attention} every {args.self_attention_every} step(s)")
    run = functools.partial(generate, batch=args.batch, self_attention=args.self_attention,
                            self_attention_every=args.self_attention_every)
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
        if args.profile:
            profile_both(run, pipe, size, args.steps, args.device)
        if args.sync_check and args.device.startswith("cuda"):
            for record in (False, True):
                sources = synchronising_calls(run, pipe, size, record)
                print(f"  host waits for the GPU, {size}px, 3 steps, {'with' if record else 'without'} the recorder: "
                      f"{sum(sources.values())}", flush=True)
                for where, count in sources.most_common(8):
                    print(f"    {count:5d}  {where}")


def profile_both(run, pipe, size: int, steps: int, device: str, top: int = 12) -> None:
    """Where the recorder's cost goes: kernel time (the GPU's work) against wall time (the GPU's work
    plus any time it waits for Python), per operator, with and without the recorder."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    totals, per_op = {}, {}
    for record in (False, True):
        sync(device)
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            run(pipe, size, steps, record)
            sync(device)
        wall = time.perf_counter() - start
        if device.startswith("cuda"):  # the kernels themselves (their launching operators would count twice)
            ops = {e.key: (e.self_device_time_total, e.count) for e in prof.key_averages()
                   if e.device_type == DeviceType.CUDA}
        else:
            ops = {e.key: (e.self_cpu_time_total, e.count) for e in prof.key_averages()}
        totals[record] = (wall, sum(t for t, _ in ops.values()) / 1e6)
        per_op[record] = ops
        if device.startswith("cuda"):
            print(f"  profile, {'with' if record else 'without'} the recorder: the GPU busy "
                  f"{busy_seconds(prof):.3f} s of {wall:.3f} s wall", flush=True)
    (wall0, busy0), (wall1, busy1) = totals[False], totals[True]
    print(f"  profile, {size}px, {steps} steps: wall {wall0:.3f} -> {wall1:.3f} s ({wall1 / wall0:.3f}x); "
          f"{'kernel' if device.startswith('cuda') else 'operator'} time {busy0:.3f} -> {busy1:.3f} s "
          f"({busy1 / busy0:.3f}x)")
    added = {k: per_op[True][k][0] - per_op[False].get(k, (0, 0))[0] for k in per_op[True]}
    for key in sorted(added, key=added.get, reverse=True)[:top]:
        print(f"    +{added[key] / 1e3:9.2f} ms  {per_op[True][key][1]:6d} calls  {key[:90]}")


def busy_seconds(prof) -> float:
    """Seconds in which at least one kernel or copy ran on the GPU (the union of their intervals): the wall
    time minus this is the GPU waiting for the host."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy / 1e6


def synchronising_calls(run, pipe, size: int, record: bool) -> collections.Counter[str]:
    """Where the host waits for the GPU during one 3-step generation: torch's sync debug mode warns at each
    synchronising operation, and the innermost Python frame outside torch names it. Within the denoising
    loop every wait empties the GPU's queue, which then idles while Python issues the next kernels."""
    import traceback
    import warnings

    sources: collections.Counter[str] = collections.Counter()

    shown = warnings.showwarning

    def note(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return shown(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "/torch/" not in f.filename and not f.filename.endswith("warnings.py")]
        last = frames[-1] if frames else None
        sources[f"{'/'.join(last.filename.rsplit('/', 2)[-2:])}:{last.lineno} {last.name}" if last else "?"] += 1

    with warnings.catch_warnings():  # restores the filters and showwarning
        warnings.simplefilter("always")
        warnings.showwarning = note
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run(pipe, size, 3, record)
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sources


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
