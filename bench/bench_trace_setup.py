"""What building, attaching and detaching a trace costs the host, once per batch, at each family's real depth.

    python bench/bench_trace_setup.py [--repeat 20] [--batch 8]

`generate` builds a recorder for every batch; while it is built and attached, and after the pipeline returns
while it is detached, the GPU waits. The cost grows with the number of attention layers, not their width, so
each denoiser here has its family's real depth and layout (SD 1.5's UNet, SDXL's with its 70 transformer
layers, SD3-medium's 24 joint blocks, FLUX.1's 19 double- and 38 single-stream blocks) at a narrow width, with
random weights. Side by side, per model: one trace's set-up (as generate runs it: the classes' columns and, on
the UNets, the self-attention) against one whole-model `set_attn_processor` round trip (read every processor,
set them all back), diffusers' own way to swap processors, which the recorder once made twice per batch.
"""

from __future__ import annotations

import argparse
import time

import torch

from diffumask import trace
from diffumask.testing import tiny_pipeline

CLASSES = ["dog"]


def deep_narrow(family: str):
    """``family``'s pipeline (tiny text encoders and VAE) with a denoiser of the family's depth at narrow width."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    torch.manual_seed(0)
    if family == "sd15":
        pipe = tiny_pipeline("sd1")
        unet = UNet2DConditionModel(
            sample_size=64, layers_per_block=2, cross_attention_dim=32, attention_head_dim=8,
            block_out_channels=(32, 32, 64, 64), norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        return type(pipe)(**{**pipe.components, "unet": unet})
    if family == "sdxl":
        pipe = tiny_pipeline("sdxl")
        unet = UNet2DConditionModel(
            sample_size=128, layers_per_block=2, block_out_channels=(32, 64, 64), norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 4, 4), cross_attention_dim=64,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8)
        return type(pipe)(**{**pipe.components, "unet": unet})
    if family == "sd3":
        pipe = tiny_pipeline("sd3")
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=24, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
            pos_embed_max_size=32)
        return type(pipe)(**{**pipe.components, "transformer": transformer})
    pipe = tiny_pipeline("flux")
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=19, num_single_layers=38, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))
    return type(pipe)(**{**pipe.components, "transformer": transformer})


def milliseconds(work, repeat: int) -> float:
    work()
    start = time.perf_counter()
    for _ in range(repeat):
        work()
    return (time.perf_counter() - start) / repeat * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="prompts per trace (each is tokenized and checked)")
    parser.add_argument("--families", nargs="+", default=["sd15", "sdxl", "sd3", "flux"],
                        choices=["sd15", "sdxl", "sd3", "flux"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    prompts = ["a photo of a dog"] * args.batch
    for family in args.families:
        pipe = deep_narrow(family)
        denoiser = pipe.unet if family.startswith("sd") and family != "sd3" else pipe.transformer
        options = {"self_attention": 2} if denoiser is getattr(pipe, "unet", None) else {}

        def set_up() -> None:
            recorder = trace(pipe, prompts, CLASSES, **options)
            recorder.attach()
            recorder.detach()

        def round_trip() -> None:
            denoiser.set_attn_processor(dict(denoiser.attn_processors))

        layers = len(denoiser.attn_processors)
        ours, theirs = milliseconds(set_up, args.repeat), milliseconds(round_trip, args.repeat)
        print(f"{family}: {layers} attention layers; a trace's set-up {ours:.2f} ms; one whole-model "
              f"set_attn_processor round trip {theirs:.2f} ms; ratio {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
