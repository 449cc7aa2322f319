"""Tiny random-weight Stable Diffusion pipelines built offline, for tests and benchmarks.

Nothing here downloads: the UNet, VAE and text encoders are built from config dicts, and the
CLIP tokenizer from the BPE file that the ``open_clip_torch`` wheel ships
(install it with ``pip install --no-deps open_clip_torch``; it is only needed here).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path
from typing import Any

import torch


@functools.lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the CLIP BPE file comes from the open_clip_torch wheel: pip install --no-deps open_clip_torch"
        )
    bpe = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # the slice CLIP itself uses: 48 894 merges
    # GPT-2's byte-to-unicode table, in CLIP's order.
    byte_values = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = byte_values[:]
    extra = 0
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            chars.append(256 + extra)
            extra += 1
    symbols = [chr(c) for c in chars]
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> Any:
    """The SD 1.x CLIP tokenizer; ``pad_token="!"`` gives SD 2.x's (OpenCLIP pads with id 0)."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], pad_token=pad_token, model_max_length=77)


def _text_encoder(hidden: int, projection: bool = False, act: str = "quick_gelu") -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, hidden_act=act, projection_dim=hidden,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, layers_per_block=1,
    )


def tiny_pipeline(kind: str = "sd1", seed: int = 0) -> Any:
    """A random-weight pipeline shaped like SD 1.x (``sd1``), SD 2.x v-prediction (``sd2``) or SDXL.

    The latent is 16x16 (image 32 px); cross-attention runs at grids 16 and 8 (and 4 in the
    SD 1.x/2.x mid block), so the multi-resolution fusion is exercised.
    """
    from diffusers import (DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)

    torch.manual_seed(seed)
    common: dict[str, Any] = dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    scheduler_args: dict[str, Any] = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if kind == "sd1":
        unet = UNet2DConditionModel(cross_attention_dim=32, attention_head_dim=4, **common)
        return StableDiffusionPipeline(
            unet=unet, vae=_vae(), text_encoder=_text_encoder(32), tokenizer=clip_tokenizer(),
            scheduler=DDIMScheduler(**scheduler_args), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    if kind == "sd2":
        unet = UNet2DConditionModel(cross_attention_dim=32, attention_head_dim=(2, 4, 4),
                                    use_linear_projection=True, **common)
        return StableDiffusionPipeline(
            unet=unet, vae=_vae(), text_encoder=_text_encoder(32, act="gelu"),
            tokenizer=clip_tokenizer(pad_token="!"),
            scheduler=DDIMScheduler(prediction_type="v_prediction", **scheduler_args),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    if kind == "sdxl":
        common["down_block_types"] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
        common["up_block_types"] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
        unet = UNet2DConditionModel(
            cross_attention_dim=64, attention_head_dim=(2, 4, 4), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8, transformer_layers_per_block=(1, 1, 2),
            **common,
        )
        return StableDiffusionXLPipeline(
            unet=unet, vae=_vae(), text_encoder=_text_encoder(32), text_encoder_2=_text_encoder(32, projection=True),
            tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(pad_token="!"),
            scheduler=DDIMScheduler(**scheduler_args), force_zeros_for_empty_prompt=True,
        )
    raise ValueError(f"unknown tiny pipeline kind {kind!r}; use sd1, sd2 or sdxl")


def sd15_unet_config() -> dict[str, Any]:
    """Stable Diffusion 1.5's UNet config (859.5 M parameters), for benchmarks with random weights."""
    return dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
        attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280), norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
