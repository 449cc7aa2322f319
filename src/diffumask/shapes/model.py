"""The shapes text-to-image model: a pixel-space diffusers pipeline small enough to train on a CPU.

It is built from stock parts so that everything downstream treats it like Stable Diffusion:
a ``UNet2DConditionModel`` (cross-attention through the default processors, conditional half of
the guidance batch second), a ``CLIPTextModel`` built from a config, a word-level
``PreTrainedTokenizerFast`` and a diffusers scheduler. There is no VAE: the UNet denoises the
32x32 RGB image itself (``vae_scale_factor = 1``).

Cross-attention sits at 16x16 (latent/2) and 8x8 (latent/4) in the down and up paths, and in
the 8x8 mid block, all inside the paper's latent/1, /2, /4 fusion. An earlier layout with
cross-attention only at 16x16 and a 4x4 mid block learnt colours but drew shapes at chance; with
the prompt read at 8x8, where a shape's outline spans the grid, and a training mix of mostly
one-object scenes (``TrainSettings.single_object_share``), it learns which shape a word names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from diffusers import (DDIMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       UNet2DConditionModel)
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from .world import CLASSES, COLOURS, DEFAULT_SIZE, TEXTURES

WEIGHTS_DIR = Path(__file__).parent / "weights"
SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>", "<unk>")
#: Every word the world's captions use. Anything else maps to <unk>, which the trainer also shows
#: the model (random filler words), so prompt templates with extra words stay harmless.
VOCABULARY = ("a", "an", "and", "on", "background", ",", *CLASSES, *COLOURS, *TEXTURES)
#: Longest caption: 'a red circle, a blue star and a green cross on a striped background' is
#: 15 words; plus <bos>/<eos> and room for a few filler words.
CONTEXT_LENGTH = 20
#: Guidance and γ for this model (``diffumask generate``'s defaults here), chosen with
#: ``bench/bench_shapes.py --tune`` on development seeds disjoint from the reported ones: guidance
#: 2 / 3 / 4 drew the right shape in 83 / 86 / 88 % of one-object images; γ 0.6 was the best mask
#: threshold at each.
DEFAULT_GUIDANCE = 4.0
DEFAULT_THRESHOLD = 0.6
DEFAULT_STEPS = 20

UNET_CONFIG: dict[str, Any] = dict(
    sample_size=DEFAULT_SIZE,
    in_channels=3,
    out_channels=3,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    norm_num_groups=16,
    cross_attention_dim=64,
    attention_head_dim=4,  # diffusers reads this as the number of heads
)
TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=CONTEXT_LENGTH,
    hidden_act="quick_gelu",
)
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="v_prediction",
    clip_sample=False,
    set_alpha_to_one=True,
    timestep_spacing="trailing",
)


#: The diffusion-transformer twin (``ShapesDiTPipeline``): an SD3-shaped MMDiT on the same 32 px pixels, patch
#: 2 (16x16 tokens), joint attention between image and text tokens in every block, trained with flow matching.
DIT_CONFIG: dict[str, Any] = dict(
    sample_size=DEFAULT_SIZE,
    patch_size=2,
    in_channels=3,
    out_channels=3,
    num_layers=8,
    attention_head_dim=16,
    num_attention_heads=6,
    joint_attention_dim=TEXT_CONFIG["hidden_size"],
    caption_projection_dim=96,
    pooled_projection_dim=TEXT_CONFIG["hidden_size"],
    pos_embed_max_size=DEFAULT_SIZE // 2,
)
DIT_SCHEDULER_CONFIG: dict[str, Any] = dict(num_train_timesteps=1000, shift=1.0)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer with CLIP-like behaviour: <bos> words <eos>, padded to the context."""
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *VOCABULARY))}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", pair="<bos> $A <eos> $B <eos>",
        special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=CONTEXT_LENGTH, padding_side="right")


def build_text_encoder(tokenizer: PreTrainedTokenizerFast) -> CLIPTextModel:
    """A two-layer causal CLIP text transformer: each noun's state also carries its adjective."""
    config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            **TEXT_CONFIG)
    return CLIPTextModel(config)


class ShapesPipeline(DiffusionPipeline):
    """Text-to-image pipeline for the shapes world, called exactly like ``StableDiffusionPipeline``."""

    model_cpu_offload_seq = "text_encoder->unet"
    default_threshold = DEFAULT_THRESHOLD
    model_name = "shapes"  # what generate records and which prompt bank "auto" picks, however it was loaded
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
                 tokenizer: PreTrainedTokenizerFast, scheduler: KarrasDiffusionSchedulers) -> None:
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler)
        self.vae_scale_factor = 1
        self._guidance_scale = DEFAULT_GUIDANCE

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The text encoder's last hidden state (the denoiser's context) and pooled state."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        out = self.text_encoder(ids.to(self.device))
        return out.last_hidden_state.to(self.denoiser.dtype), out.pooler_output.to(self.denoiser.dtype)

    def predict(self, model_in: torch.Tensor, t: torch.Tensor, context: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The denoiser's output for one step (the UNet reads only the hidden states)."""
        return self.unet(self.scheduler.scale_model_input(model_in, t), t, encoder_hidden_states=context[0]).sample

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate images; see ``StableDiffusionPipeline.__call__`` for the arguments."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        height = height or self.denoiser.config.sample_size
        width = width or self.denoiser.config.sample_size
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        if unknown := set(tensor_inputs) - set(self._callback_tensor_inputs):
            raise ValueError(f"callback tensor inputs {sorted(unknown)} not in {self._callback_tensor_inputs}")
        self._guidance_scale = guidance_scale
        batch = len(prompts) * num_images_per_prompt

        context = tuple(c.repeat_interleave(num_images_per_prompt, dim=0) for c in self.encode_prompt(prompts))
        if self.do_classifier_free_guidance:
            negatives = negative_prompt if negative_prompt is not None else ""
            negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
            if len(negatives) != len(prompts):
                raise ValueError("negative_prompt must be one string or one per prompt")
            uncond = [c.repeat_interleave(num_images_per_prompt, dim=0) for c in self.encode_prompt(negatives)]
            context = tuple(torch.cat(pair) for pair in zip(uncond, context))  # conditional half second, as in SD

        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = self.scheduler.timesteps
        if latents is None:
            latents = randn_tensor((batch, self.denoiser.config.in_channels, height, width),
                                   generator=generator, device=self.device, dtype=self.denoiser.dtype)
        else:
            latents = latents.to(device=self.device, dtype=self.denoiser.dtype)
        latents = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)  # flow matching starts at the noise

        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                model_in = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                pred = self.predict(model_in, t, context)
                if self.do_classifier_free_guidance:
                    pred_uncond, pred_cond = pred.chunk(2)
                    pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
                latents = self.scheduler.step(pred, t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    state = {"latents": latents}  # the only tensor input this pipeline offers
                    latents = callback_on_step_end(self, i, t, state).pop("latents", latents)
                progress_bar.update()

        images = (latents.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "pil":
            images = self.numpy_to_pil(images)
        elif output_type != "np":
            raise ValueError(f"output_type must be 'pil' or 'np', not {output_type!r}")
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


class ShapesDiTPipeline(ShapesPipeline):
    """The shapes world's diffusion transformer: the same text encoder, tokenizer and call, an SD3-shaped
    ``SD3Transformer2DModel`` denoising the pixels with flow matching (Euler). The recorder reads its joint
    attention as it reads Stable Diffusion 3's."""

    model_cpu_offload_seq = "text_encoder->transformer"
    model_name = "shapes-dit"

    def __init__(self, transformer: SD3Transformer2DModel, text_encoder: CLIPTextModel,
                 tokenizer: PreTrainedTokenizerFast, scheduler: FlowMatchEulerDiscreteScheduler) -> None:
        DiffusionPipeline.__init__(self)
        self.register_modules(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler)
        self.vae_scale_factor = 1
        self._guidance_scale = DEFAULT_GUIDANCE

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    def predict(self, model_in: torch.Tensor, t: torch.Tensor, context: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.transformer(hidden_states=model_in, encoder_hidden_states=context[0],
                                pooled_projections=context[1], timestep=t.expand(model_in.shape[0])).sample


def build_pipeline(seed: int = 0, backbone: str = "unet", unet: dict[str, Any] | None = None) -> ShapesPipeline:
    """A freshly initialised (untrained) pipeline: the shipped UNet architecture (with ``unet``'s entries in place of
    ``UNET_CONFIG``'s, e.g. wider blocks), or its DiT twin (``"dit"``)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(tokenizer)
    if backbone == "dit":
        return ShapesDiTPipeline(transformer=SD3Transformer2DModel(**DIT_CONFIG), text_encoder=text_encoder,
                                 tokenizer=tokenizer, scheduler=FlowMatchEulerDiscreteScheduler(**DIT_SCHEDULER_CONFIG))
    if backbone != "unet":
        raise ValueError(f"backbone must be 'unet' or 'dit', not {backbone!r}")
    return ShapesPipeline(unet=UNet2DConditionModel(**{**UNET_CONFIG, **(unet or {})}), text_encoder=text_encoder,
                          tokenizer=tokenizer, scheduler=DDIMScheduler(**SCHEDULER_CONFIG))


def load_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  path: str | Path = WEIGHTS_DIR) -> ShapesPipeline:
    """Load the shipped (or another saved) shapes pipeline, the UNet or the diffusion transformer, offline."""
    index = json.loads((Path(path) / "model_index.json").read_text())
    kind = ShapesDiTPipeline if index.get("_class_name") == ShapesDiTPipeline.__name__ else ShapesPipeline
    pipe = kind.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) floats in [0, 1] from ``output_type='np'`` to uint8 images."""
    return np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)
