"""The attention recorder: per-class soft maps from a diffusers UNet's cross-attention.

Hooked only through diffusers' processor API: the cross-attention entries of
``unet.attn_processors`` are replaced by :class:`RecordingProcessor` and the original dict is
set back on exit. The layer output still comes from the fused kernel
(``F.scaled_dot_product_attention``); the probabilities softmax(QKᵀ·scale) are computed
separately, for the conditional half of the guidance batch only, reduced to the requested
classes' token columns, averaged over heads and added in place into one preallocated buffer
per resolution, so memory does not grow with the number of steps.

Usage::

    with trace(pipe, prompts, classes=["dog"]) as tr:
        images = pipe(prompts).images
    maps = tr.maps()          # maps[i]["dog"]: (H, W) float32 in [0, 1]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from .errors import ConfigError, DiffumaskError
from .tokens import class_token_indices

#: Processors whose arithmetic the recording processor reproduces; anything else (xformers,
#: sliced or fused-QKV attention, adapters) would be silently replaced, so it is refused instead.
STOCK_PROCESSORS = (AttnProcessor2_0, AttnProcessor)

#: The paper's fusion: attention grids at latent/4, latent/2 and latent/1.
DEFAULT_FACTORS = (1, 2, 4)

#: Soft-map file key prefix of the recorded self-attention matrix (class names may not use it).
SELF_ATTENTION_KEY = "__self__"


class RecorderError(DiffumaskError, RuntimeError):
    """The recorder cannot give correct maps for this pipeline or this call."""


def _as_2d_grid(tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) attention grid of a layer with ``tokens`` queries on a latent of ``latent_hw``."""
    height, width = latent_hw
    factor = 1
    while factor <= max(height, width):
        h, w = math.ceil(height / factor), math.ceil(width / factor)
        if h * w == tokens:
            return h, w
        factor *= 2
    raise RecorderError(f"an attention layer with {tokens} queries does not fit a {height}x{width} latent")


def fuse(
    grids: dict[int, np.ndarray],
    size: tuple[int, int],
    resolutions: Sequence[int] | None = None,
) -> np.ndarray:
    """The paper's fusion of one class's per-resolution attention grids into one map.

    Each grid (keyed by its height) is upsampled bicubically to ``size`` (H, W), divided by its
    maximum and clipped to [0, 1] (bicubic overshoots); the result is the mean over
    ``resolutions`` (default: all given grids).
    """
    chosen = sorted(grids) if resolutions is None else list(resolutions)
    missing = [r for r in chosen if r not in grids]
    if missing or not chosen:
        raise ConfigError(f"resolutions {missing or chosen} not recorded; available: {sorted(grids)}")
    upsampled = []
    for r in chosen:
        grid = torch.as_tensor(np.asarray(grids[r], dtype=np.float32))[None, None]
        up = F.interpolate(grid, size=size, mode="bicubic", align_corners=False)[0, 0]
        peak = up.max()
        up = up / peak if peak > 0 else torch.zeros_like(up)
        upsampled.append(up.clamp_(0.0, 1.0))
    return torch.stack(upsampled).mean(0).numpy()


@dataclass
class ImageMaps:
    """One image's class maps: raw per-resolution grids and the fused map at image size.

    ``maps["dog"]`` is the fused map at ``resolutions`` (by default the paper's latent/4, /2, /1;
    assign another tuple of grid heights to re-fuse without generating again).
    """

    prompt: str
    tokens: dict[str, list[int]]
    grids: dict[str, dict[int, np.ndarray]]  # class -> grid height -> (h, w) mean attention
    size: tuple[int, int]  # image (H, W)
    resolutions: tuple[int, ...]
    #: Mean self-attention at one grid, (h·w, h·w) rows summing to 1, or None when not recorded.
    self_attention: np.ndarray | None = None
    self_attention_grid: tuple[int, int] | None = None
    _cache: dict[tuple[str, tuple[int, ...]], np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def classes(self) -> list[str]:
        return list(self.grids)

    def __getitem__(self, name: str) -> np.ndarray:
        key = (name, tuple(self.resolutions))
        if key not in self._cache:
            self._cache[key] = fuse(self.grids[name], self.size, key[1])
        return self._cache[key]

    def fused(self) -> dict[str, np.ndarray]:
        return {name: self[name] for name in self.grids}

    def soft_maps(self) -> dict[str, np.ndarray]:
        """Arrays for ``SoftMaps/<id>.npz``: ``name`` (fused), ``name@res`` (raw grids) and
        ``__self__@h`` (the self-attention matrix at grid height h, when recorded)."""
        out: dict[str, np.ndarray] = {}
        for name, grids in self.grids.items():
            out[name] = self[name]
            out.update({f"{name}@{res}": grid for res, grid in grids.items()})
        if self.self_attention is not None:
            out[f"{SELF_ATTENTION_KEY}@{self.self_attention_grid[0]}"] = self.self_attention
        return out


class RecordingProcessor:
    """Stock scaled-dot-product attention that also hands its probabilities to the recorder."""

    def __init__(self, recorder: AttentionRecorder, name: str):
        self.recorder = recorder
        self.name = name

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        # Mirrors diffusers' AttnProcessor2_0 so the layer's output is unchanged.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if attn.is_cross_attention:
            self.recorder._record(attn, query, key, attention_mask)
        else:
            self.recorder._record_self(attn, query, key)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def cross_attention_layers(unet: torch.nn.Module, cross: bool = True) -> dict[str, Attention]:
    """Cross- (or self-) attention modules keyed by their processor name in ``unet.attn_processors``."""
    return {f"{name}.processor": module for name, module in unet.named_modules()
            if isinstance(module, Attention) and module.is_cross_attention == cross}


class AttentionRecorder:
    """Accumulates per-class cross-attention for one pipeline call; see the module docstring.

    Args:
        pipe: a diffusers pipeline with ``unet`` and ``tokenizer`` (SD 1.x/2.x/XL, the shapes model).
        prompts: the prompts the pipeline will be called with, in order.
        classes: class phrases, one list for all prompts or one list per prompt; each must occur
            in its prompt.
        images_per_prompt: the ``num_images_per_prompt`` the pipeline will be called with.
        layers: record only cross-attention layers whose module path starts with one of these
            (e.g. ``["up_blocks.3"]``); default all.
        steps: record only UNet calls ``start <= i < stop`` (0-based); default all.
        self_attention: also record the mean self-attention matrix at grid latent/F for this F
            (e.g. 2: 32x32 at 512 px; the matrix has (h·w)² entries, so the finest grid is
            never a default); None records none. Used by self-attention propagation.
    """

    def __init__(
        self,
        pipe: Any,
        prompts: str | Sequence[str],
        classes: Sequence[str] | Sequence[Sequence[str]],
        images_per_prompt: int = 1,
        layers: Sequence[str] | None = None,
        steps: tuple[int | None, int | None] | None = None,
        self_attention: int | None = None,
    ):
        self.pipe = pipe
        self.unet = pipe.unet
        self.prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not self.prompts:
            raise ValueError("no prompts given")
        if classes and all(isinstance(c, str) for c in classes):
            per_prompt = [list(classes)] * len(self.prompts)
        else:
            per_prompt = [list(c) for c in classes]
        if len(per_prompt) != len(self.prompts) or not all(per_prompt):
            raise ValueError("give one non-empty class list for all prompts or one per prompt")
        self.images_per_prompt = images_per_prompt
        self.tokens = [class_token_indices(pipe.tokenizer, p, c) for p, c in zip(self.prompts, per_prompt)]
        # Per image: the token columns to keep (union over its classes), padded to a common width.
        columns = [sorted({i for idx in t.values() for i in idx}) for t in self.tokens]
        width = max(len(c) for c in columns)
        self._columns = columns
        self._column_index = torch.tensor(
            [c + [c[0]] * (width - len(c)) for c in columns for _ in range(images_per_prompt)]
        )
        self.layers = self._select_layers(layers)
        self.steps = steps or (None, None)
        self.self_attention_factor = self_attention
        self.self_layers = list(cross_attention_layers(self.unet, cross=False)) if self_attention else []
        self._self_sum: torch.Tensor | None = None
        self._self_count = 0
        self._self_grid: tuple[int, int] | None = None
        self._sums: dict[tuple[int, int], torch.Tensor] = {}
        self._counts: dict[tuple[int, int], int] = {}
        self._latent_hw: tuple[int, int] | None = None
        self._step = -1
        self._last_timestep: float | None = None
        self._saved_processors: dict[str, Any] | None = None
        self._hook: Any = None

    @property
    def num_images(self) -> int:
        return len(self.prompts) * self.images_per_prompt

    def _select_layers(self, prefixes: Sequence[str] | None) -> list[str]:
        layers = cross_attention_layers(self.unet)
        if not layers:
            raise RecorderError("this UNet has no cross-attention layers; nothing to record")
        chosen = [n for n in layers if prefixes is None or any(n.startswith(p) for p in prefixes)]
        if not chosen:
            raise ConfigError(f"no cross-attention layer matches {list(prefixes or [])}; "
                             f"layers are {sorted(layers)}")
        return chosen

    # ------------------------------------------------------------------ attach / detach
    def _check_processors(self) -> None:
        processors = self.unet.attn_processors
        for name in self.layers + self.self_layers:
            proc = processors[name]
            if not isinstance(proc, STOCK_PROCESSORS):
                raise RecorderError(
                    f"layer {name} uses {type(proc).__name__}, which hides the attention probabilities "
                    "(xformers, attention slicing and fused QKV projections all do); call "
                    "pipe.unet.set_default_attn_processor() (or pipe.unfuse_qkv_projections()) "
                    "before recording"
                )

    def attach(self) -> AttentionRecorder:
        if self._saved_processors is not None:
            raise RecorderError("recorder is already attached")
        self._check_processors()
        self._saved_processors = dict(self.unet.attn_processors)
        procs = dict(self._saved_processors)
        for name in self.layers + self.self_layers:
            procs[name] = RecordingProcessor(self, name)
        self.unet.set_attn_processor(procs)
        self._hook = self.unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True)
        return self

    def detach(self) -> None:
        if self._saved_processors is None:
            return
        self.unet.set_attn_processor(self._saved_processors)
        self._saved_processors = None
        self._hook.remove()
        self._hook = None

    def __enter__(self) -> AttentionRecorder:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    # ------------------------------------------------------------------ recording
    def _on_unet_call(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        t = float(torch.as_tensor(timestep).flatten()[0]) if timestep is not None else None
        if t is not None and self._last_timestep is not None and t > self._last_timestep:
            raise RecorderError(
                "the pipeline was called again inside one recording (the timesteps restarted); "
                "use one trace per pipeline call so each image's maps come from its own generation"
            )
        self._last_timestep = t
        self._latent_hw = tuple(sample.shape[-2:])
        self._step += 1

    def _in_window(self) -> bool:
        start, stop = self.steps
        return (start is None or self._step >= start) and (stop is None or self._step < stop)

    def _conditional_half(self, batch: int) -> slice:
        if self._latent_hw is None:
            raise RecorderError("the UNet was called without passing through its forward()")
        n = self.num_images
        guided = getattr(self.pipe, "do_classifier_free_guidance", None)
        if batch == 2 * n and guided is not False:
            return slice(n, 2 * n)  # diffusers batches [unconditional; conditional]
        if batch == n and not guided:
            return slice(0, n)
        raise RecorderError(
            f"the UNet ran a batch of {batch} but the recorder expects {n} images "
            f"({len(self.prompts)} prompts x {self.images_per_prompt} per prompt"
            f"{', doubled by guidance' if guided else ''}); pass the same prompts and "
            "images_per_prompt to the recorder as to the pipeline"
        )

    @staticmethod
    def _probabilities(attn: Attention, query: torch.Tensor, key: torch.Tensor,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
        """softmax(QKᵀ·scale) in float32, (n, heads, queries, keys)."""
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)).mul_(attn.scale)
        if mask is not None:
            scores += mask.float()
        # In place, so the only full-size temporary is the score tensor itself.
        scores -= scores.amax(dim=-1, keepdim=True)
        scores.exp_()
        return scores.div_(scores.sum(dim=-1, keepdim=True))

    def _record(self, attn: Attention, query: torch.Tensor, key: torch.Tensor,
                mask: torch.Tensor | None) -> None:
        if not self._in_window():
            return
        cond = self._conditional_half(query.shape[0])
        probs = self._probabilities(attn, query[cond], key[cond], None if mask is None else mask[cond])
        index = self._column_index.to(probs.device)[:, None, None, :].expand(
            -1, probs.shape[1], probs.shape[2], -1)
        picked = torch.gather(probs, 3, index).mean(dim=1)  # (n, queries, columns)
        grid = _as_2d_grid(picked.shape[1], self._latent_hw)
        buffer = self._sums.get(grid)
        if buffer is None:
            buffer = self._sums[grid] = torch.zeros_like(picked)
            self._counts[grid] = 0
        buffer.add_(picked)
        self._counts[grid] += 1

    def _record_self(self, attn: Attention, query: torch.Tensor, key: torch.Tensor) -> None:
        if not self._in_window():
            return
        h, w = (math.ceil(side / self.self_attention_factor) for side in self._latent_hw)
        if query.shape[2] != h * w:
            return  # another resolution: left to the fused kernel alone
        cond = self._conditional_half(query.shape[0])
        mean = self._probabilities(attn, query[cond], key[cond]).mean(dim=1)  # (n, hw, hw)
        if self._self_sum is None:
            self._self_sum = torch.zeros_like(mean)
            self._self_grid = (h, w)
        self._self_sum.add_(mean)
        self._self_count += 1

    # ------------------------------------------------------------------ reading
    def state_bytes(self) -> int:
        """Bytes held by the accumulation buffers (constant once every resolution was seen)."""
        buffers = [*self._sums.values(), *([self._self_sum] if self._self_sum is not None else [])]
        return sum(t.numel() * t.element_size() for t in buffers)

    def default_resolutions(self) -> tuple[int, ...]:
        """Grid heights at latent/1, /2, /4 that were recorded (the paper's fusion)."""
        if self._latent_hw is None:
            raise RecorderError("nothing was recorded")
        wanted = {math.ceil(self._latent_hw[0] / f) for f in DEFAULT_FACTORS}
        chosen = tuple(sorted(h for h, _ in self._sums if h in wanted))
        return chosen or tuple(sorted(h for h, _ in self._sums))

    def maps(self, image_size: tuple[int, int] | None = None) -> list[ImageMaps]:
        """Per image (prompt-major, like the pipeline's output): its classes' maps."""
        if not self._sums:
            raise RecorderError(
                "no cross-attention was recorded: call the pipeline inside the trace, and do not "
                "replace attention processors (xformers, attention slicing) while it is attached"
            )
        latent_h, latent_w = self._latent_hw
        scale = int(getattr(self.pipe, "vae_scale_factor", 1))
        size = image_size or (latent_h * scale, latent_w * scale)
        defaults = self.default_resolutions()
        means = {grid: (s / self._counts[grid]).cpu() for grid, s in self._sums.items()}
        if self.self_attention_factor and self._self_sum is None:
            raise RecorderError(f"no self-attention layer runs at latent/{self.self_attention_factor}; "
                                "choose another self-attention factor")
        self_mean = None if self._self_sum is None else (self._self_sum / self._self_count).cpu().numpy()
        result = []
        for i in range(self.num_images):
            p = i // self.images_per_prompt
            columns = self._columns[p]
            grids: dict[str, dict[int, np.ndarray]] = {}
            for name, token_ids in self.tokens[p].items():
                positions = [columns.index(t) for t in token_ids]
                grids[name] = {
                    h: m[i, :, positions].mean(dim=1).reshape(h, w).numpy()
                    for (h, w), m in sorted(means.items())
                }
            result.append(ImageMaps(self.prompts[p], self.tokens[p], grids, size, defaults,
                                    None if self_mean is None else self_mean[i], self._self_grid))
        return result


def trace(
    pipe: Any,
    prompts: str | Sequence[str],
    classes: Sequence[str] | Sequence[Sequence[str]],
    **options: Any,
) -> AttentionRecorder:
    """Record ``classes`` in ``pipe``'s next call on ``prompts``; use as a context manager."""
    return AttentionRecorder(pipe, prompts, classes, **options)
