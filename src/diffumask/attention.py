"""The attention recorder: per-class soft maps from a diffusers UNet's cross-attention.

Hooked only through diffusers' processor API: the processors of the recorded cross-attention layers
(``Attention.set_processor``) are replaced by :class:`RecordingProcessor` and the originals set back
on exit. The layer output still comes from the fused kernel
(``F.scaled_dot_product_attention``); the probabilities softmax(QKᵀ/√d) at the requested
classes' token columns come from a second fused call whose values are one-hot at those columns,
for the conditional half of the guidance batch only, averaged over heads and added in place into
one preallocated buffer per resolution, so memory does not grow with the number of steps.

The token ids the text encoder(s) really receive are read through a forward pre-hook on each
encoder, so the maps always belong to the words the pipeline encoded.

Usage::

    with trace(pipe) as tr:                              # DAAM's form: every word kept
        images = pipe("a photo of a dog on a sofa").images
    tr.maps()[0]["dog"]       # (H, W) float32 in [0, 1]; any whole word of the prompt

    with trace(pipe, prompts, classes=["dog"]) as tr:    # only the classes' columns kept
        images = pipe(prompts).images
    maps = tr.maps()          # maps[i]["dog"]
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from .errors import ConfigError, DiffumaskError
from .tokens import class_token_indices, decode_prompt, prompt_ids, prompt_text, token_texts, trim_padding
from .supported import SUPPORTED, check_loaded

#: Processors whose arithmetic the recording processor reproduces; anything else (xformers,
#: sliced or fused-QKV attention, adapters) would be silently replaced, so it is refused instead.
STOCK_PROCESSORS = (AttnProcessor2_0, AttnProcessor)

#: The paper's fusion: attention grids at latent/4, latent/2 and latent/1.
DEFAULT_FACTORS = (1, 2, 4)

#: How a class of several tokens is fused: the paper's "maps" (normalise each token's map, then
#: average) or "columns" (average the raw token columns, then normalise).
TOKEN_AVERAGES = ("maps", "columns")

#: Bytes the self-attention's scores and probabilities may take at once in one layer call (heads are grouped to fit).
PROBABILITY_BYTES = 1 << 30

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
    grids: Mapping[int, np.ndarray],
    size: tuple[int, int],
    resolutions: Sequence[int] | None = None,
    token_average: str = "maps",
) -> np.ndarray:
    """The paper's fusion of one class's per-resolution attention grids into one map.

    A grid (keyed by its height) is (h, w), or (k, h, w) for a class of k token columns. Each
    token's grid is upsampled bicubically to ``size`` (H, W), divided by its maximum and clipped
    to [0, 1] (bicubic overshoots); the result is the mean over tokens and ``resolutions``
    (default: all given grids). That is the official code's order (``token_average="maps"``):
    averaging the raw columns first (``"columns"``) lets the stronger sub-word of "aerop|lane"
    dominate the class map.
    """
    if token_average not in TOKEN_AVERAGES:
        raise ConfigError(f"token_average must be one of {TOKEN_AVERAGES}, not {token_average!r}")
    chosen = sorted(grids) if resolutions is None else list(resolutions)
    missing = [r for r in chosen if r not in grids]
    if missing or not chosen:
        raise ConfigError(f"resolutions {missing or chosen} not recorded; available: {sorted(grids)}")
    upsampled = []
    for r in chosen:
        grid = torch.as_tensor(np.asarray(grids[r], dtype=np.float32))
        grid = grid.reshape(-1, *grid.shape[-2:])  # (tokens, h, w)
        if token_average == "columns":
            grid = grid.mean(0, keepdim=True)
        up = F.interpolate(grid[:, None], size=size, mode="bicubic", align_corners=False)[:, 0]
        peak = up.amax(dim=(1, 2), keepdim=True)
        up = torch.where(peak > 0, up / peak, torch.zeros_like(up))
        upsampled.append(up.clamp_(0.0, 1.0).mean(0))
    return torch.stack(upsampled).mean(0).numpy()


class _WordGrids(Mapping[str, dict[int, np.ndarray]]):
    """``ImageMaps.grids``: word -> grid height -> (h, w) raw attention, mean of its token columns."""

    def __init__(self, maps: ImageMaps):
        self._maps = maps

    def __getitem__(self, word: str) -> dict[int, np.ndarray]:
        return {h: grid.mean(0) for h, grid in self._maps.token_grids(word).items()}

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._maps.tokens))

    def __len__(self) -> int:
        return len(self._maps.tokens)


@dataclass
class ImageMaps:
    """One image's class maps: raw per-token, per-resolution attention and fused maps at image size.

    ``maps["dog"]`` is the fused map at ``resolutions`` (by default the paper's latent/4, /2, /1)
    with ``token_average`` ("maps": the paper's order, "columns": raw columns averaged first);
    assign either to re-fuse without generating again. Any whole word of the prompt whose token
    columns were recorded can be asked for (all of them when ``trace`` was given no classes).
    """

    prompt: str
    tokens: dict[str, list[int]]  # word -> its token positions (columns of the encoder output)
    columns: list[int]  # the token positions recorded, in the order of ``attention``'s first axis
    attention: dict[int, np.ndarray]  # grid height -> (len(columns), h, w) mean attention per token
    size: tuple[int, int]  # image (H, W)
    resolutions: tuple[int, ...]
    token_average: str = "maps"
    #: Mean self-attention at one grid, (h·w, h·w) rows summing to 1, or None when not recorded.
    self_attention: np.ndarray | None = None
    self_attention_grid: tuple[int, int] | None = None
    #: Finds a word's token columns in the prompt, for words asked for after the call (None: only ``tokens``).
    locate: Callable[[str, Sequence[str]], dict[str, list[int]]] | None = field(default=None, repr=False,
                                                                                  compare=False)
    _cache: dict[tuple[str, tuple[int, ...], str], np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def classes(self) -> list[str]:
        """The traced classes, then the words asked for since."""
        return list(self.tokens)

    @property
    def grids(self) -> Mapping[str, dict[int, np.ndarray]]:
        return _WordGrids(self)

    def positions(self, word: str) -> list[int]:
        """The token positions of ``word`` (whole words only), found on first use."""
        if word not in self.tokens:
            self.tokens[word] = self._find(word)
        return self.tokens[word]

    def _find(self, word: str) -> list[int]:
        if not isinstance(word, str):
            raise TypeError(f"maps are looked up by word, e.g. maps['dog'], not by {type(word).__name__} {word!r}; "
                            f"these hold {self.classes}")
        if self.locate is None:
            raise RecorderError(f"{word!r} was not traced; traced classes: {self.classes}")
        spans = self.locate(self.prompt, [word])[word]
        if not set(spans) <= set(self.columns):
            raise RecorderError(
                f"{word!r} was not recorded: a trace with classes keeps only their token columns "
                f"({self.classes}); add {word!r} to the classes, or trace(pipe) without classes to "
                "keep every word"
            )
        return spans

    def __contains__(self, word: object) -> bool:
        """Whether ``maps[word]`` has a map: a traced class, or (a trace without classes) any whole word of the
        prompt. Asking does not add the word to :attr:`classes`."""
        if not isinstance(word, str):
            return False
        if word in self.tokens:
            return True
        try:
            self._find(word)
        except DiffumaskError:
            return False
        return True

    def keys(self) -> list[str]:
        """The classes, as a dict's keys: ``dict(maps)`` is each class's fused map."""
        return self.classes

    def __iter__(self) -> Iterator[str]:
        return iter(self.classes)

    def token_grids(self, word: str) -> dict[int, np.ndarray]:
        """Grid height -> (k, h, w): the raw mean attention of each of the word's k token columns."""
        rows = [self.columns.index(t) for t in self.positions(word)]
        return {h: attention[rows] for h, attention in sorted(self.attention.items())}

    def __getitem__(self, word: str) -> np.ndarray:
        key = (word, tuple(self.resolutions), self.token_average)
        if key not in self._cache:
            self._cache[key] = fuse(self.token_grids(word), self.size, key[1], self.token_average)
        return self._cache[key]

    def fused(self) -> dict[str, np.ndarray]:
        return {name: self[name] for name in self.tokens}

    def soft_maps(self) -> dict[str, np.ndarray]:
        """Arrays for ``SoftMaps/<id>.npz``: ``name`` (fused), ``name@res`` (raw grids: (h, w) for a
        one-token class, (k, h, w) per token column for k > 1, so the paper's order can be
        re-fused) and ``__self__@h`` (the self-attention matrix at grid height h, when recorded)."""
        out: dict[str, np.ndarray] = {}
        for name in self.tokens:
            out[name] = self[name]
            out.update({f"{name}@{res}": grid[0] if len(grid) == 1 else grid
                        for res, grid in self.token_grids(name).items()})
        if self.self_attention is not None:
            out[f"{SELF_ATTENTION_KEY}@{self.self_attention_grid[0]}"] = self.self_attention
        return out


def split_heads(attn: Attention, batch_size: int, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch, tokens, heads·d) projections as (batch, heads, tokens, d), with the layer's query and key
    norms: the steps every stock diffusers processor takes between projecting and attending."""
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


def probability_dtype(query: torch.Tensor) -> torch.dtype:
    """The precision explicit probabilities are computed in: the model's when it is half (on a GPU, where
    they are memory-bound, half the bytes), else float32."""
    return query.dtype if query.dtype in (torch.float16, torch.bfloat16) else torch.float32


def column_probabilities(query: torch.Tensor, key: torch.Tensor, value_columns: torch.Tensor,
                         mask: torch.Tensor | None = None, columns: int | None = None) -> torch.Tensor:
    """softmax(QKᵀ/√d + mask) over every key, at some key columns, averaged over heads: (n, queries, columns).

    The scale is the fused kernel's default, as in the layer itself (diffusers' stock processors do not
    pass ``attn.scale`` either).

    ``value_columns`` (n, keys, c) is one-hot: row k has a 1 in column j where key k is the j-th
    recorded column. Attention with those values is Σₖ pₖ·onehotₖ, the probabilities at those columns,
    from the fused kernel: the (queries × keys) probabilities are never written out, which on a GPU,
    where this is memory-bound, is most of the cost. The values go in groups as wide as a head, the
    width every fused kernel takes; values already zero-padded to a multiple of it (``columns``: how
    many are real) need no padding per call, one kernel launch less on a GPU that waits for launches.
    Exact up to the kernel's precision (the model's: half on a GPU).
    """
    n, heads, _, width = query.shape
    columns = value_columns.shape[-1] if columns is None else columns
    parts = []
    for start in range(0, columns, width):
        values = value_columns[..., start:start + width]
        if values.shape[-1] < width:
            values = F.pad(values, (0, width - values.shape[-1]))
        values = values[:, None].expand(n, heads, *values.shape[1:])
        out = F.scaled_dot_product_attention(query, key, values.to(query.dtype), attn_mask=mask)
        parts.append(out.mean(dim=1, dtype=torch.float32)[..., :min(width, columns - start)])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


@dataclass
class _LayerPlan:
    """What one hooked layer's calls record into (:meth:`AttentionRecorder._plan`), fixed for its shapes."""

    shapes: tuple[torch.Size, torch.Size]  # (query, key)
    grid: tuple[int, int]
    groups: list[tuple[torch.Tensor, torch.Tensor, int]]  # (one-hot values, buffer slice, real columns)


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
        query, key, value = split_heads(attn, batch_size, query, key, value)

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


def cross_attention_layers(unet: torch.nn.Module, cross: bool | None = True) -> dict[str, Attention]:
    """Cross- (or self-, or with None all) attention modules keyed by their processor name in
    ``unet.attn_processors``, in the model's order."""
    return {f"{name}.processor": module for name, module in unet.named_modules()
            if isinstance(module, Attention) and cross in (None, module.is_cross_attention)}


def text_encoders(pipe: Any) -> list[tuple[str, torch.nn.Module, Any]]:
    """(name, module, its tokenizer) of each text encoder the pipeline runs, in encoding order."""
    pairs = [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3")]
    return [(enc, getattr(pipe, enc), getattr(pipe, tok)) for enc, tok in pairs
            if getattr(pipe, enc, None) is not None and getattr(pipe, tok, None) is not None]


def _shown(tokenizer: Any, rows: Sequence[Sequence[int]]) -> list[str]:
    """Encoded rows as text, for error messages."""
    return [prompt_text(tokenizer, r) for r in rows]


class AttentionRecorder:
    """Accumulates per-class cross-attention for one pipeline call; see the module docstring.

    Args:
        pipe: a diffusers pipeline with ``unet`` and a tokenizer (SD 1.x/2.x/XL, the shapes model).
        prompts: the prompts the pipeline will be called with, in order; checked against the token
            ids its text encoder(s) receive. None: read from those ids.
        classes: class phrases, one list for all prompts or one list per prompt; each must occur
            in its prompt as whole words. None: keep every token column, so any word of the
            prompt can be asked for after the call (about 1.7 MB per image at 512 px).
        images_per_prompt: the ``num_images_per_prompt`` the pipeline will be called with;
            None: read from the UNet's batch.
        layers: record only cross-attention layers whose module path starts with one of these
            (e.g. ``["up_blocks.3"]``); default all.
        steps: record only UNet calls ``start <= i < stop`` (0-based); default all.
        self_attention: also record the mean self-attention matrix at grid latent/F for this F
            (e.g. 2: 32x32 at 512 px; the matrix has (h·w)² entries, so the finest grid is
            never a default); None records none. Used by self-attention propagation.
        self_attention_max: the largest self-attention grid side recorded: latent/F is halved until
            it fits (SDXL at 1024 px: 32x32, not 64x64), so the matrix stays ≤ 32⁴ entries by default.
        self_attention_every: record the self-attention at every k-th recorded step only (the first
            of the window, then every k-th): it is an affinity between places, which changes slowly
            over the steps, and on a GPU each recorded matrix costs memory passes.
        token_average: how a class of several tokens is fused: "maps" (the paper's: each token's
            map normalised, then averaged) or "columns" (raw columns averaged, then normalised).
    """

    def __init__(
        self,
        pipe: Any,
        prompts: str | Sequence[str] | None = None,
        classes: Sequence[str] | Sequence[Sequence[str]] | None = None,
        images_per_prompt: int | None = None,
        layers: Sequence[str] | None = None,
        steps: tuple[int | None, int | None] | None = None,
        self_attention: int | None = None,
        token_average: str = "maps",
        self_attention_max: int = 32,
        self_attention_every: int = 1,
    ):
        self.pipe = pipe
        self.model = self._backbone(pipe)
        self.encoders = text_encoders(pipe)
        self.tokenizer = self.encoders[0][2] if self.encoders else getattr(pipe, "tokenizer", None)
        if self.tokenizer is None:
            raise RecorderError(f"{type(pipe).__name__} has no tokenizer; the recorder needs one to find words")
        self.locator = self._word_locator()  # also handed to each ImageMaps, so it must not hold the recorder
        if token_average not in TOKEN_AVERAGES:
            raise ConfigError(f"token_average must be one of {TOKEN_AVERAGES}, not {token_average!r}")
        self.token_average = token_average
        self.classes = classes
        if classes is not None and (not classes or not all(isinstance(c, str) or c for c in classes)):
            raise ConfigError("give one non-empty class list for all prompts or one per prompt "
                              "(or no classes, to keep every word)")
        self.given_prompts = None if prompts is None else [prompts] if isinstance(prompts, str) else list(prompts)
        if self.given_prompts is not None and not self.given_prompts:
            raise ConfigError("no prompts given")
        self.prompts: list[str] | None = None
        self.tokens: list[dict[str, list[int]]] = []
        if self.given_prompts is not None:
            self._set_prompts(self.given_prompts)  # a missing class word fails here, before denoising
        self.images_per_prompt = images_per_prompt
        self._modules = self._attention_modules()  # one walk of the model: every batch builds a recorder
        self.layers = self._select_layers(layers)
        self.steps = _check_steps(steps)
        self.self_attention_factor = self_attention
        if self_attention_max < 1:
            raise ConfigError(f"self_attention_max must be at least 1, got {self_attention_max}")
        self.self_attention_max = self_attention_max
        if self_attention_every < 1:
            raise ConfigError(f"self_attention_every must be at least 1, got {self_attention_every}")
        self.self_attention_every = self_attention_every
        self.self_layers = self._self_attention_layers() if self_attention else []
        self._encoded: dict[int, list[list[int]]] = {}
        self._columns: list[list[int]] | None = None  # per prompt; None: every column
        self._column_index: torch.Tensor | None = None
        self._value_columns: dict[tuple[int, int, int, torch.dtype, str], tuple[torch.Tensor, int]] = {}
        self._batch: int | None = None
        self._cond = slice(0)
        self._self_sum: torch.Tensor | None = None
        self._self_count = 0
        self._self_grid: tuple[int, int] | None = None
        self._sums: dict[tuple[int, int], torch.Tensor] = {}
        self._counts: dict[tuple[int, int], int] = {}
        self._plans: dict[Attention, _LayerPlan] = {}  # per hooked cross-attention layer
        self._expanded_values: dict[tuple[torch.Size, torch.dtype, torch.device], list[torch.Tensor]] = {}
        self._latent_hw: tuple[int, int] | None = None
        self._self_hw: tuple[int, int] | None = None
        self._step = -1
        self._last_timestep: torch.Tensor | None = None
        self._restarted: torch.Tensor | None = None  # on the UNet's device: did the timesteps ever rise?
        self._saved_processors: dict[str, Any] | None = None
        self._hooked: dict[str, Any] = {}  # processor name -> the attention module it belongs to, while attached
        self._hooks: list[Any] = []

    @property
    def num_images(self) -> int:
        if self.prompts is None or self.images_per_prompt is None:
            raise RecorderError("the number of images is known once the pipeline has run")
        return len(self.prompts) * self.images_per_prompt

    def _set_prompts(self, prompts: list[str]) -> None:
        """Fix the prompts and find each class's token positions in them (PromptError if absent)."""
        if self.classes is None:
            per_prompt: list[list[str]] = [[] for _ in prompts]
        elif all(isinstance(c, str) for c in self.classes):
            per_prompt = [list(self.classes)] * len(prompts)
        else:
            per_prompt = [list(c) for c in self.classes]
            if len(per_prompt) != len(prompts):
                raise ConfigError(f"{len(per_prompt)} class lists for {len(prompts)} prompts; give one "
                                  "class list for all prompts or one per prompt")
        self.tokens = [self._locate(p, c) for p, c in zip(prompts, per_prompt)]
        self.prompts = prompts

    # ------------------------------------------------------------------ what a backbone decides
    @staticmethod
    def _backbone(pipe: Any) -> torch.nn.Module:
        """The denoiser whose attention is recorded."""
        return pipe.unet

    def _word_locator(self) -> Callable[[str, Sequence[str]], dict[str, list[int]]]:
        """Finds each word's token columns (the keys of every cross-attention layer) in a prompt."""
        return functools.partial(class_token_indices, self.tokenizer)

    def _locate(self, prompt: str, words: Sequence[str]) -> dict[str, list[int]]:
        return self.locator(prompt, words)

    def _self_attention_layers(self) -> list[str]:
        return [name for name, module in self._modules.items() if not module.is_cross_attention]

    def _processor(self, name: str) -> Any:
        return RecordingProcessor(self, name)

    def _image_size(self) -> tuple[int, int]:
        scale = int(getattr(self.pipe, "vae_scale_factor", 1))
        return self._latent_hw[0] * scale, self._latent_hw[1] * scale

    def _guided(self) -> bool | None:
        """Whether the denoiser's batch is [unconditional; conditional] (None: the pipeline does not say)."""
        return getattr(self.pipe, "do_classifier_free_guidance", None)

    def _select_layers(self, prefixes: Sequence[str] | None) -> list[str]:
        layers = [name for name, module in self._modules.items() if module.is_cross_attention]
        if not layers:
            raise RecorderError("this UNet has no cross-attention layers; nothing to record")
        chosen = [n for n in layers if prefixes is None or any(n.startswith(p) for p in prefixes)]
        if not chosen:
            raise ConfigError(f"no cross-attention layer matches {list(prefixes or [])}; "
                             f"layers are {sorted(layers)}")
        return chosen

    # ------------------------------------------------------------------ attach / detach
    def _attention_modules(self) -> dict[str, Any]:
        """Every attention module of the backbone, keyed by its processor name (as in ``attn_processors``), in
        the model's order."""
        return cross_attention_layers(self.model, cross=None)

    def _check_processors(self) -> None:
        for name in self.layers + self.self_layers:
            proc = self._hooked[name].processor
            if "AddedKV" in type(proc).__name__:
                raise RecorderError(
                    f"layer {name} uses {type(proc).__name__}: this UNet reads the text as extra keys beside the "
                    f"image's own (DeepFloyd IF, UnCLIP), not by cross-attention; {SUPPORTED}")
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
        if self.given_prompts is None and not self.encoders:
            raise RecorderError(f"{type(self.pipe).__name__} has no text encoder whose input the recorder "
                                "can read; pass the prompts: trace(pipe, prompts, classes)")
        self._hooked = {name: self._modules[name] for name in self.layers + self.self_layers}
        self._check_processors()
        # Only the hooked layers' processors change (Attention.set_processor, which set_attn_processor calls for
        # every layer): a walk of the whole model per batch was a few ms of host time while the GPU waited.
        self._saved_processors = {name: module.processor for name, module in self._hooked.items()}
        for name, module in self._hooked.items():
            module.set_processor(self._processor(name))
        self._hooks = [self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True)]
        self._hooks += [module.register_forward_pre_hook(functools.partial(self._on_encoder_call, i),
                                                         with_kwargs=True)
                        for i, (_, module, _) in enumerate(self.encoders)]
        return self

    def detach(self) -> None:
        if self._saved_processors is None:
            return
        for name, module in self._hooked.items():
            module.set_processor(self._saved_processors[name])
        self._saved_processors = None
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __enter__(self) -> AttentionRecorder:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    # ------------------------------------------------------------------ what is encoded
    def _on_encoder_call(self, index: int, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Read the token ids a text encoder receives: its first call in a pipeline call is the prompts
        (later ones, before the UNet runs, encode the negative prompts)."""
        if self._step >= 0:
            raise RecorderError(_CALLED_AGAIN)
        ids = args[0] if args else kwargs.get("input_ids")
        if index in self._encoded or ids is None:
            return
        name, _, tokenizer = self.encoders[index]
        rows = [trim_padding(tokenizer, row) for row in ids.tolist()]  # once per call, not per step
        self._encoded[index] = rows
        source = self._prompt_encoder()
        if index not in self._checked_encoders():
            return
        if index != source:
            if self.prompts is not None:  # else checked once the source encoder has told the prompts
                self._check_agreement(index)
            return
        if self.given_prompts is None:
            self._set_prompts([decode_prompt(tokenizer, row) for row in rows])
            for other in sorted(set(self._encoded) & set(self._checked_encoders()) - {source}):
                self._check_agreement(other)
            return
        self._check_given_prompts(index)

    def _check_given_prompts(self, index: int) -> None:
        """Encoder ``index``'s rows must be the prompts trace was given, in its own tokens. An encoder other than
        the first reads its own argument (SDXL's text_encoder_2: prompt_2), so a mismatch there names it."""
        name, _, tokenizer = self.encoders[index]
        rows = self._encoded[index]
        expected = [prompt_ids(tokenizer, p) for p in self.given_prompts]
        if expected != rows:
            given, encoded = self.given_prompts, _shown(tokenizer, rows)
            if len(given) == len(encoded):
                i = next(i for i, (e, r) in enumerate(zip(expected, rows)) if e != r)
                given, encoded = given[i], encoded[i]
            argument = "prompt" + name.removeprefix("text_encoder")
            own = (f" in {name}, which reads {argument}: pass {argument} equal to the prompt or leave it out; or"
                   if index else "; pass trace the prompts the pipeline is called with, or")
            raise RecorderError(f"trace was given the prompt(s) {given!r} but the pipeline encodes {encoded!r}{own} "
                                "use trace(pipe) and ask for words after the call")

    def _prompt_encoder(self) -> int:
        """The text encoder whose ids give the prompts' words when trace was given none."""
        return 0

    def _checked_encoders(self) -> list[int]:
        """The text encoders whose ids must be the prompts (the ones the maps' columns come from)."""
        return list(range(len(self.encoders)))

    def _check_agreement(self, index: int) -> None:
        """Encoder ``index`` must have read the prompts the source encoder read: the same token texts in the
        same vocabulary (SDXL's second CLIP pads differently), else the prompts in its own tokens (T5)."""
        source = self._prompt_encoder()
        name, _, tokenizer = self.encoders[index]
        source_name, _, source_tokenizer = self.encoders[source]
        rows = self._encoded[index]
        if source not in self._encoded and self.given_prompts is not None:
            # Read before the source encoder (SD3's CLIPs before its T5): what it must match is what trace was given
            # (the check below would compare the same ids again).
            self._check_given_prompts(index)
            return
        if type(tokenizer) is type(source_tokenizer) and source in self._encoded:
            source_rows = self._encoded[source]
            same = [token_texts(source_tokenizer, r) for r in source_rows] == [token_texts(tokenizer, r) for r in rows]
        else:
            source_rows = [prompt_ids(source_tokenizer, p) for p in self.prompts]
            same = [prompt_ids(tokenizer, p) for p in self.prompts] == rows
        if not same:
            raise RecorderError(
                f"the pipeline's text encoders read different prompts: {_shown(source_tokenizer, source_rows)} "
                f"({source_name}) and {_shown(tokenizer, rows)} ({name}), so the maps would mix two prompts; "
                "call the pipeline without prompt_2 / prompt_3 (or with them equal to prompt)"
            )

    # ------------------------------------------------------------------ recording
    def _on_model_call(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = args[0] if args else kwargs["sample"]
        if self._latent_hw != tuple(sample.shape[-2:]):
            self._latent_hw = tuple(sample.shape[-2:])
            self._self_hw = self._self_attention_grid(self._latent_hw) if self.self_attention_factor else None
        self._count_call(sample, args[1] if len(args) > 1 else kwargs.get("timestep"))

    def _count_call(self, sample: torch.Tensor, timestep: Any) -> None:
        """A denoiser call: the batch checked (set up at the first), the step counted."""
        if timestep is not None:
            self._check_timestep(torch.as_tensor(timestep).detach().reshape(-1)[:1])
        if self._batch is None:
            self._start(sample)
        elif sample.shape[0] != self._batch:
            raise RecorderError(f"the denoiser's batch changed from {self._batch} to {sample.shape[0]} "
                                "within one pipeline call; use one trace per pipeline call")
        self._step += 1

    def _check_timestep(self, timestep: torch.Tensor) -> None:
        """Note whether the timesteps went up (a second pipeline call) without reading the value on the
        host: on a GPU that would wait for every queued kernel, once per step. :meth:`maps` reads the flag."""
        if self._last_timestep is not None:
            rose = (timestep > self._last_timestep).reshape(())
            if self._restarted is None:
                self._restarted = rose
            else:
                self._restarted |= rose
        self._last_timestep = timestep

    def _self_attention_grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """The self-attention grid to record: latent/F, halved until no side exceeds ``self_attention_max``
        (a (h·w)² matrix per image: SDXL's latent/2 at 1024 px would be 4096², 64 MiB)."""
        factor = self.self_attention_factor
        while max(math.ceil(side / factor) for side in latent_hw) > self.self_attention_max and factor < max(latent_hw):
            factor *= 2
        return math.ceil(latent_hw[0] / factor), math.ceil(latent_hw[1] / factor)

    def _start(self, sample: torch.Tensor) -> None:
        """At the first UNet call: which rows are the conditional images, which columns to keep."""
        if self.prompts is None:
            raise RecorderError(
                "the UNet ran but no text encoder did (prompt_embeds?), so the recorder cannot tell which "
                "words the token columns hold; pass the prompts: trace(pipe, prompts, classes)"
            )
        batch, n_prompts = sample.shape[0], len(self.prompts)
        guided = self._guided()
        if self.images_per_prompt is None:
            images = batch // 2 if guided else batch
            self.images_per_prompt = max(1, images // n_prompts) if guided is not None else 1
        n = self.num_images
        if batch == 2 * n and guided is not False:
            self._cond = slice(n, 2 * n)  # diffusers batches [unconditional; conditional]
        elif batch == n and not guided:
            self._cond = slice(0, n)
        else:
            raise RecorderError(
                f"the UNet ran a batch of {batch} but the recorder expects {n} images "
                f"({n_prompts} prompts x {self.images_per_prompt} per prompt"
                f"{', doubled by guidance' if guided else ''}); pass the same prompts and "
                "images_per_prompt to the recorder as to the pipeline"
            )
        self._batch = batch
        if any(self.tokens):
            # Per image: the token columns to keep (union over its classes), padded to a common width.
            self._columns = [sorted({i for idx in t.values() for i in idx}) for t in self.tokens]
            width = max(len(c) for c in self._columns)
            index = torch.tensor(
                [c + [c[0]] * (width - len(c)) for c in self._columns for _ in range(self.images_per_prompt)])
            on_gpu = sample.device.type == "cuda"  # from page-locked memory, the copy does not wait for the GPU
            self._column_index = (index.pin_memory() if on_gpu else index).to(sample.device, non_blocking=on_gpu)

    def _in_window(self) -> bool:
        return self._in_window_at(self._step)

    def _in_window_at(self, step: int) -> bool:
        start, stop = self.steps
        return (start is None or step >= start) and (stop is None or step < stop)

    def _self_attention_step(self) -> bool:
        """Whether this step records the self-attention: in the window, and every k-th step of it."""
        return self._in_window() and (self._step - (self.steps[0] or 0)) % self.self_attention_every == 0

    @staticmethod
    def _mean_probabilities(scale: float, query: torch.Tensor, key: torch.Tensor,
                            limit: int = PROBABILITY_BYTES) -> torch.Tensor:
        """softmax(QKᵀ·scale) over every key, averaged over heads: (n, queries, keys), float32.

        For the self-attention matrix, whose every entry is kept. On a GPU this is memory-bound, so every
        full-size pass counts: the scores and probabilities stay in the model's precision (half on a
        GPU: half the bytes of float32; the softmax and the head mean accumulate in float32 inside the
        kernels), the scale goes into the small query, and the head mean reads the probabilities once.
        Heads go in groups whose scores and probabilities fit ``limit`` bytes, so a large grid never
        needs the whole tensor twice.
        """
        n, heads, queries, _ = query.shape
        dtype = probability_dtype(query)
        per_head = 2 * torch.finfo(dtype).bits // 8 * n * queries * key.shape[-2]  # scores and probabilities
        group = max(1, min(heads, limit // max(per_head, 1)))
        total = None
        for start in range(0, heads, group):
            scores = torch.matmul(query[:, start:start + group].to(dtype) * scale,
                                  key[:, start:start + group].to(dtype).transpose(-1, -2))
            part = torch.softmax(scores, dim=-1).sum(dim=1, dtype=torch.float32)
            total = part if total is None else total.add_(part)
        return total.div_(heads)

    def _check_started(self) -> None:
        if self._batch is None:
            raise RecorderError("the denoiser was called without passing through its forward()")

    def _record(self, attn: Attention, query: torch.Tensor, key: torch.Tensor,
                mask: torch.Tensor | None) -> None:
        """:func:`column_probabilities` of one layer call, added into its grid's buffer; what does not change
        from step to step (the values, the grid, the buffer's slices) is looked up once per layer, so a
        call costs three kernels and little Python (on a GPU the host issues every hooked layer's kernels
        between the scheduler's per-step waits, so its time per call is the recorder's cost)."""
        if not self._in_window():
            return
        self._check_started()
        plan = self._plans.get(attn)
        if plan is None or plan.shapes != (query.shape, key.shape):
            plan = self._plans[attn] = self._plan(query, key)
        cond = self._cond
        query, key, mask = query[cond], key[cond], None if mask is None else mask[cond]
        for values, target, columns in plan.groups:
            out = F.scaled_dot_product_attention(query, key, values, attn_mask=mask)
            target.add_(out.mean(dim=1, dtype=torch.float32)[..., :columns])
        self._counts[plan.grid] += 1

    def _plan(self, query: torch.Tensor, key: torch.Tensor) -> _LayerPlan:
        """A layer's one-hot values, one (n, heads, keys, head width) tensor per group of recorded columns
        (expanded over heads once, not per call), and the slices of its grid's buffer they add into."""
        values, columns = self._columns_as_values(key.shape[2], 0, key.shape[2], key)
        n, heads, queries, width = query[self._cond].shape
        grid = _as_2d_grid(queries, self._latent_hw)
        buffer = self._buffer(grid, (n, queries, columns), query.device)
        shared = (key.shape, query.dtype, query.device)  # layers of one shape share their values
        if shared not in self._expanded_values:
            self._expanded_values[shared] = [
                values[:, None, :, start:start + width].expand(n, heads, -1, -1).to(query.dtype).contiguous()
                for start in range(0, columns, width)]
        groups = [(group, buffer[..., start:start + min(width, columns - start)], min(width, columns - start))
                  for group, start in zip(self._expanded_values[shared], range(0, columns, width))]
        return _LayerPlan((query.shape, key.shape), grid, groups)

    def _text_columns(self, text_length: int, device: torch.device) -> torch.Tensor:
        """(n, columns): each image's recorded text columns (all ``text_length`` when no classes were given)."""
        if self._column_index is not None:
            return self._column_index
        return torch.arange(text_length, device=device).expand(self.num_images, -1)

    def _columns_as_values(self, keys: int, text_start: int, text_length: int, like: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The one-hot values (n, keys, columns) of the recorded text columns (every one of the
        ``text_length`` text keys from ``text_start`` when no classes were given), zero-padded to a
        multiple of ``like``'s head width, and how many columns are real; built once per shape."""
        head_width = like.shape[-1]
        cache_key = (keys, text_start, head_width, like.dtype, str(like.device))
        cached = self._value_columns.get(cache_key)
        if cached is None:
            index = self._text_columns(text_length, like.device)
            n, width = index.shape
            values = torch.zeros(n, keys, -(-width // head_width) * head_width, dtype=like.dtype, device=like.device)
            values.scatter_(1, (index + text_start)[:, None, :], 1)  # values[i, index[i, j], j] = 1, without a sync
            cached = self._value_columns[cache_key] = (values, width)
        return cached

    def _buffer(self, grid: tuple[int, int], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The grid's (n, h·w, columns) float32 sum of probabilities, made at its first layer call."""
        if grid not in self._sums:
            self._sums[grid] = torch.zeros(shape, dtype=torch.float32, device=device)
            self._counts[grid] = 0
        return self._sums[grid]

    def _accumulate(self, grid: tuple[int, int], picked: torch.Tensor) -> None:
        """Add one layer call's (n, h·w, columns) probabilities into the grid's buffer, in place."""
        self._buffer(grid, picked.shape, picked.device).add_(picked)
        self._counts[grid] += 1

    def _accumulate_self(self, grid: tuple[int, int], mean: torch.Tensor) -> None:
        """Add one layer call's (n, h·w, h·w) self-attention into its buffer, in place."""
        if self._self_sum is None:
            self._self_sum = torch.zeros_like(mean)
            self._self_grid = grid
        self._self_sum.add_(mean)
        self._self_count += 1

    def _record_self(self, attn: Attention, query: torch.Tensor, key: torch.Tensor) -> None:
        if not self._self_attention_step():
            return
        h, w = self._self_hw
        if query.shape[2] != h * w:
            return  # another resolution: left to the fused kernel alone
        self._check_started()
        cond = self._cond
        scale = query.shape[-1] ** -0.5  # the layer's fused call's (stock processors do not pass attn.scale)
        self._accumulate_self((h, w), self._mean_probabilities(scale, query[cond], key[cond]))  # (n, hw, hw)

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
        """Per image (prompt-major, like the pipeline's output): its classes' maps (every word's,
        asked by name, when no classes were traced)."""
        if not self._sums:
            start, stop = self.steps
            if self._step >= 0 and not any(self._in_window_at(i) for i in range(self._step + 1)):
                raise RecorderError(f"nothing was recorded: the steps window ({start}, {stop}) holds none of the "
                                    f"{self._step + 1} denoiser calls this pipeline call made (0-{self._step}); "
                                    "choose steps within them")
            raise RecorderError(
                "no cross-attention was recorded: call the pipeline inside the trace, and do not "
                "replace attention processors (xformers, attention slicing) while it is attached"
            )
        grids = list(self._sums)
        tensors = [self._sums[grid] / self._counts[grid] for grid in grids]
        tensors += [] if self._self_sum is None else [self._self_sum / self._self_count]
        tensors += [] if self._restarted is None else [self._restarted]
        host = to_host(tensors)  # one wait for the GPU, not one per buffer
        if self._restarted is not None and bool(host.pop()):
            raise RecorderError(_CALLED_AGAIN)
        if self.self_attention_factor and self._self_sum is None:
            raise RecorderError(f"no self-attention layer runs at grid {self._self_hw[0]}x{self._self_hw[1]} "
                                f"(latent/{self.self_attention_factor}, at most {self.self_attention_max} a side); "
                                "choose another self-attention factor")
        self_mean = None if self._self_sum is None else host.pop().numpy()
        means = dict(zip(grids, host))
        size = image_size or self._image_size()
        defaults = self.default_resolutions()
        keys = next(iter(means.values())).shape[-1]
        result = []
        for i in range(self.num_images):
            p = i // self.images_per_prompt
            columns = list(range(keys)) if self._columns is None else self._columns[p]
            attention = {h: m[i, :, :len(columns)].T.reshape(len(columns), h, w).numpy()
                         for (h, w), m in sorted(means.items())}
            result.append(ImageMaps(self.prompts[p], dict(self.tokens[p]), columns, attention, size, defaults,
                                    self.token_average, None if self_mean is None else self_mean[i],
                                    self._self_grid, self.locator))
        return result


def to_host(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """CPU copies, through page-locked memory for CUDA tensors, with one wait for the GPU for them all: the
    self-attention sum (32 MiB for SD 1.5 at batch 8) took 29 ms to reach pageable memory on an H200, 2.5 %
    of the batch's generation; pinned buffers come from torch's caching host allocator, so they are
    allocated once, not per batch."""
    out, devices = [], set()
    for tensor in tensors:
        if tensor.device.type != "cuda":
            out.append(tensor.cpu())
            continue
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        out.append(host.copy_(tensor, non_blocking=True))
        devices.add(tensor.device)
    for device in devices:
        torch.cuda.current_stream(device).synchronize()
    return out


_CALLED_AGAIN = ("the pipeline was called again inside one recording (the timesteps restarted); "
                 "use one trace per pipeline call so each image's maps come from its own generation")


def _check_steps(steps: Any) -> tuple[int | None, int | None]:
    """``steps=(start, stop)``: denoiser calls ``start <= i < stop``, either end None for open."""
    if steps is None:
        return None, None
    if (not isinstance(steps, (tuple, list)) or len(steps) != 2
            or not all(s is None or (isinstance(s, numbers.Integral) and s >= 0) for s in steps)
            or None not in steps and steps[0] >= steps[1]):
        raise ConfigError(f"steps={steps!r}: give (start, stop), denoiser calls start <= i < stop counted from 0, "
                          "with start < stop, e.g. steps=(30, 50); None for an open end")
    return tuple(None if s is None else int(s) for s in steps)  # type: ignore[return-value]


def check_pipeline(pipe: Any, what: str = "trace", prompts_only: bool = False) -> None:
    """A loaded diffusers text-to-image pipeline the recorders read, not its name or one of its parts: a one-line
    error otherwise (the recorder would fail on a missing attribute, or record the wrong rows). ``prompts_only``:
    it must also make images from prompts alone, as ``generate`` calls it."""
    if isinstance(pipe, (str, os.PathLike)):
        raise ConfigError(f"{what} takes a loaded pipeline, not the name {str(pipe)!r}: "
                          f"pipe = diffumask.models.load_pipeline({str(pipe)!r})")
    has_denoiser = getattr(pipe, "unet", None) is not None or getattr(pipe, "transformer", None) is not None
    if not has_denoiser or not hasattr(pipe, "components") or not callable(pipe):
        raise ConfigError(f"{what} takes a diffusers text-to-image pipeline (a UNet or transformer that reads a "
                          f"prompt), got {type(pipe).__name__}; load one with diffumask.models.load_pipeline(...)")
    check_loaded(pipe, prompts_only)


def trace(
    pipe: Any,
    prompts: str | Sequence[str] | None = None,
    classes: Sequence[str] | Sequence[Sequence[str]] | None = None,
    **options: Any,
) -> AttentionRecorder:
    """Record ``pipe``'s next call; use as a context manager.

    ``trace(pipe)`` keeps every word (ask ``maps()[i][word]`` after the call); with ``prompts``
    and ``classes`` only the classes' token columns are kept, and both are checked against what
    the pipeline's text encoder(s) receive. Options: see :class:`AttentionRecorder`; for a diffusion
    transformer (SD3, FLUX) also :class:`~diffumask.joint_attention.JointAttentionRecorder`'s.
    """
    from .joint_attention import DIT_OPTIONS, JointAttentionRecorder, is_transformer_pipeline

    check_pipeline(pipe)
    if isinstance(classes, str):  # one class for every prompt, not its letters
        classes = [classes]
    if is_transformer_pipeline(pipe):
        return JointAttentionRecorder(pipe, prompts, classes, **options)
    given = sorted(set(options) & set(DIT_OPTIONS))
    if given:
        raise ConfigError(f"{', '.join(given)} apply to diffusion transformers (SD3, FLUX); "
                          f"{type(pipe).__name__} has a UNet")
    return AttentionRecorder(pipe, prompts, classes, **options)


def word_locator(pipe: Any, **options: Any) -> Callable[[str, Sequence[str]], dict[str, list[int]]]:
    """What ``trace(pipe, **options)`` uses to find words' token columns in a prompt (PromptError when a
    word is missing), to check prompts before any denoising."""
    from .joint_attention import TextLayout, is_transformer_pipeline

    if is_transformer_pipeline(pipe):
        return TextLayout(pipe, options.get("text_tokens", "both")).locate
    tokenizer = text_encoders(pipe)[0][2] if text_encoders(pipe) else pipe.tokenizer
    return functools.partial(class_token_indices, tokenizer)
