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
    """A random-weight pipeline shaped like SD 1.x (``sd1``), SD 2.x v-prediction (``sd2``), SDXL, SD3 or FLUX.

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
    if kind == "sd3":
        return _tiny_sd3()
    if kind == "flux":
        return _tiny_flux()
    raise ValueError(f"unknown tiny pipeline kind {kind!r}; use sd1, sd2, sdxl, sd3 or flux")


#: Words the test T5 tokenizer holds whole ("▁dog"); others are spelled from pieces and letters, as
#: real sentencepiece vocabularies spell rare words ("aeroplane" -> ▁aero|plane, "sheepdog" -> ▁sheep|d|o|g).
T5_WORDS = ("a an the photo of dog cat car tree sheep person potted plant on sofa in street with and "
            "red blue green circle square triangle star ring cross mat sitting next to").split()


def t5_tokenizer() -> Any:
    """A T5-style sentencepiece (Unigram, "▁" word starts, ``</s>`` appended) tokenizer built offline."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -10.0)]
    pieces += [("▁" + w, -5.0) for w in T5_WORDS] + [("▁aero", -6.0), ("plane", -6.0), ("▁hot", -6.0)]
    letters = string.ascii_letters + string.digits + string.punctuation
    pieces += [(c, -12.0) for c in letters] + [("▁" + c, -11.0) for c in letters]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)


def _t5_encoder(hidden: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer()), d_model=hidden, d_kv=8, d_ff=2 * hidden,
                                   num_layers=2, num_heads=2, relative_attention_num_buckets=8,
                                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=1)).eval()


def _tiny_sd3() -> Any:
    """SD3-shaped: an MMDiT (4 joint blocks, patch 2) on a 16x16 latent (image 32 px), two CLIP encoders
    and a T5, whose joint context is CLIP's 77 columns then T5's."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                        caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=32)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, layers_per_block=1, shift_factor=0.0609, scaling_factor=1.5035)
    return StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=_text_encoder(32, projection=True), tokenizer=clip_tokenizer(),
        text_encoder_2=_text_encoder(32, projection=True), tokenizer_2=clip_tokenizer(pad_token="!"),
        text_encoder_3=_t5_encoder(64), tokenizer_3=t5_tokenizer(),
    )


def _tiny_flux() -> Any:
    """FLUX-shaped: 2 double-stream and 2 single-stream blocks, latents packed 2x2 (image 32 px: a 16x16
    latent, 8x8 tokens), CLIP for the pooled vector and T5 for the token sequence."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, layers_per_block=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    return FluxPipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                        text_encoder=_text_encoder(32), tokenizer=clip_tokenizer(),
                        text_encoder_2=_t5_encoder(32), tokenizer_2=t5_tokenizer())


def sd15_unet_config() -> dict[str, Any]:
    """Stable Diffusion 1.5's UNet config (859.5 M parameters), for benchmarks with random weights."""
    return dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
        attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280), norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
