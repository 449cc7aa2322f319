"""The recorder for diffusion transformers: Stable Diffusion 3 / 3.5 (MMDiT) and FLUX.

A DiT has no cross-attention: image and text tokens attend to each other in one softmax, "joint
attention". A word's map is the attention of the image queries to that word's text keys, a softmax
over *all* keys, image and text, as the model computes it. The recorder gets exactly those
probabilities without holding the queries × keys matrix (at 1024 px FLUX, 4096 × 4608 per head). Where
the fused kernel the layer runs anyway (flash, memory-efficient or cuDNN attention) also returns each
query's log-sum-exp of its scores, the layer's own call gives the softmax's normaliser, and
a word's probabilities are exp(q·k·scale − lse) at its few text columns: a small matmul, no second pass
over the keys. Elsewhere a second fused call over the same queries and keys, whose values are one-hot
at the recorded text columns, returns softmax(QKᵀ·scale)[:, columns]. Heads are averaged, then the
recorded blocks and steps, in one buffer added to in place.

Hooked only through diffusers' processor API: the stock processors (``JointAttnProcessor2_0``,
``FluxAttnProcessor``) are replaced by recording twins that compute the layer's output with the same
calls, and set back on exit. The text columns: SD3's joint context is CLIP's 77 tokens (both CLIP
encoders, side by side in the features) then T5's; FLUX's is T5's alone (CLIP gives only the pooled
vector). Each part's words are found with its own tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

from .attention import AttentionRecorder, RecorderError, column_probabilities, probability_dtype, split_heads
from .errors import ConfigError
from .tokens import class_token_indices

#: Which text tokens give a word's map on SD3 (FLUX has only T5's): both parts, or one.
TEXT_PARTS = ("both", "clip", "t5")

#: Bytes of scores and probabilities the self-attention may take at once (bands of query rows, groups of
#: heads): at 1024 px the whole matrix is 768 MiB for 24 heads in bfloat16.
SELF_ATTENTION_BYTES = 256 << 20

#: The recorder options that only diffusion transformers take.
DIT_OPTIONS = ("block_window", "text_tokens")

#: The blocks recorded by default, as fractions of the depth: the first third. On the shapes world's DiT
#: (bench/bench_dit_windows.py) it gave the best masks of the windows measured: mIoU 0.416, against 0.157 for
#: the middle third, 0.137 for the last and 0.225 for all blocks. Each recorded block costs about one more
#: attention, so a third of the depth also bounds the recorder's cost.
DEFAULT_BLOCK_WINDOW = (0.0, 1 / 3)


def _kernel_with_logsumexp(query: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor) -> tuple[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]] | None:
    """The fused kernel ``F.scaled_dot_product_attention`` picks for these inputs (no mask, the default
    scale), as a call that also returns each query's log-sum-exp, and its name; None where that kernel
    keeps none (the math fallback) or this torch lacks the entry points."""
    try:
        from torch.nn.attention import SDPBackend

        choice = SDPBackend(torch._fused_sdp_choice(query, key, value, None, 0.0, False))
        aten = torch.ops.aten
        rows = query.shape[:-1]
        if choice == SDPBackend.FLASH_ATTENTION and query.device.type == "cpu":
            return "flash (CPU)", lambda: aten._scaled_dot_product_flash_attention_for_cpu(query, key, value,
                                                                                          0.0, False)
        if choice == SDPBackend.FLASH_ATTENTION and query.device.type == "cuda":
            return "flash", lambda: aten._scaled_dot_product_flash_attention(query, key, value, 0.0, False, False)[:2]
        if choice == SDPBackend.EFFICIENT_ATTENTION and query.device.type == "cuda":
            def efficient() -> tuple[torch.Tensor, torch.Tensor]:
                out, lse = aten._scaled_dot_product_efficient_attention(query, key, value, None, True, 0.0, False)[:2]
                return out, lse[..., :rows[-1]]  # its rows are padded to a multiple of 32
            return "efficient", efficient
        if choice == SDPBackend.CUDNN_ATTENTION and query.device.type == "cuda":
            def cudnn() -> tuple[torch.Tensor, torch.Tensor]:
                out, lse = aten._scaled_dot_product_cudnn_attention(query, key, value, None, True, 0.0, False,
                                                                    False)[:2]
                return out, lse.reshape(rows)  # (batch, heads, queries, 1)
            return "cudnn", cudnn
    except (AttributeError, RuntimeError, TypeError, ValueError):  # entry points moved: the stock call
        pass
    return None


#: Per (device type, dtype, kernel, head width): whether that kernel's call with its log-sum-exp was checked
#: against the stock call (the same output, bit for bit) and against the scores (the same normaliser).
_KERNEL_CHECKED: dict[tuple[str, torch.dtype, str, int], bool] = {}


def attention_with_logsumexp(query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``F.scaled_dot_product_attention(query, key, value)`` as the stock processors call it (no mask, the
    default scale), and each query's log-sum-exp of its scaled scores, (batch, heads, queries) float32.

    The kernel is the one the fused call would pick (``torch._fused_sdp_choice``: flash, memory-efficient
    or cuDNN), called directly so that it hands back the log-sum-exp it computes anyway. The first call
    per kernel, dtype and head width is checked against the stock call (bit for bit) and against a few
    queries' scores; a kernel that fails, keeps no log-sum-exp (math) or is missing gives the stock call
    and None, and the recorder falls back to its one-hot pass.
    """
    kernel = _kernel_with_logsumexp(query, key, value)
    if kernel is None:
        return F.scaled_dot_product_attention(query, key, value), None
    name, call = kernel
    checked = (query.device.type, query.dtype, name, query.shape[-1])
    if _KERNEL_CHECKED.get(checked) is False:
        return F.scaled_dot_product_attention(query, key, value), None
    try:
        out, lse = call()
    except RuntimeError:
        _KERNEL_CHECKED[checked] = False
        return F.scaled_dot_product_attention(query, key, value), None
    if checked not in _KERNEL_CHECKED:
        few = query[:1, :, :8].float() @ key[:1].float().transpose(-1, -2) * query.shape[-1] ** -0.5
        _KERNEL_CHECKED[checked] = bool(
            torch.equal(out, F.scaled_dot_product_attention(query, key, value))
            and torch.allclose(lse[:1, :, :8].float(), few.logsumexp(-1), rtol=1e-3, atol=2e-2))
        if not _KERNEL_CHECKED[checked]:
            return F.scaled_dot_product_attention(query, key, value), None
    return out, lse


def probabilities_from_logsumexp(query: torch.Tensor, key_columns: torch.Tensor,
                                 logsumexp: torch.Tensor) -> torch.Tensor:
    """softmax(QKᵀ/√d) at some key columns from the scores at those columns alone and each query's
    log-sum-exp over every key, averaged over heads: (n, queries, columns) float32.

    ``query`` (n, heads, queries, d), ``key_columns`` (n, heads, columns, d), ``logsumexp`` (n, heads,
    queries). In float32, whatever the model's precision: exp(s − lse) is exact where the kernel's
    normaliser is.
    """
    scores = torch.matmul(query.float(), key_columns.float().transpose(-1, -2)).mul_(query.shape[-1] ** -0.5)
    return scores.sub_(logsumexp.float()[..., None]).exp_().mean(dim=1)


def _flux_parts() -> tuple[type, Callable[..., Any], Callable[..., Any]] | None:
    """FLUX's processor class, rotary embedding and attention dispatch (None where diffusers lacks them)."""
    try:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
    except ImportError:
        return None
    return FluxAttnProcessor, apply_rotary_emb, dispatch_attention_fn


def is_transformer_pipeline(pipe: Any) -> bool:
    """Whether the pipeline denoises with a transformer (SD3, FLUX) rather than a UNet."""
    return getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is not None


def _is_flux(transformer: torch.nn.Module) -> bool:
    return hasattr(transformer, "single_transformer_blocks")


def is_flux_pipeline(pipe: Any) -> bool:
    """Whether the pipeline is FLUX-shaped: a guidance-distilled transformer with single-stream blocks."""
    return _is_flux(getattr(pipe, "transformer", None))


def joint_layers(transformer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The joint-attention modules in forward order, keyed by processor name: SD3's blocks (not SD3.5's
    image-only second attention), FLUX's double- then single-stream blocks."""
    layers = {}
    for name, module in transformer.named_modules():
        if not hasattr(module, "processor") or not name.endswith("attn"):
            continue
        joint = getattr(module, "add_k_proj", None) is not None or name.startswith("single_transformer_blocks.")
        if joint:
            layers[f"{name}.processor"] = module
    return layers


def _mask_rows(mask: torch.Tensor | None, batch: slice, queries: slice) -> torch.Tensor | None:
    """An attention mask as diffusers' attention dispatch takes it, (batch, keys) or 4-D, cut to some batch
    entries and query rows, 4-D."""
    if mask is None:
        return None
    if mask.ndim == 2:  # (batch, keys): the native backend widens it the same way
        mask = mask[:, None, None, :]
    mask = mask[batch]
    return mask[..., queries, :] if mask.shape[-2] > 1 else mask


class TextLayout:
    """Where each part of the joint context sits among the transformer's text columns, and how to find
    a word's columns in it."""

    def __init__(self, pipe: Any, text: str):
        if text not in TEXT_PARTS:
            raise ConfigError(f"text_tokens must be one of {TEXT_PARTS}, not {text!r}")
        self.segments: list[tuple[Any, int]] = []  # (tokenizer, first column)
        #: The pipeline's T5 tokenizer, whether or not its columns are recorded (None: no T5 encoder runs).
        self.t5 = pipe.tokenizer_2 if _is_flux(pipe.transformer) else (
            getattr(pipe, "tokenizer_3", None) if getattr(pipe, "text_encoder_3", None) is not None else None)
        if _is_flux(pipe.transformer):
            if text == "clip":
                raise ConfigError("FLUX's transformer reads only T5's tokens; use --text-tokens t5 (text_tokens='t5'), "
                                  "or both")
            self.segments.append((pipe.tokenizer_2, 0))
            return
        t5 = getattr(pipe, "tokenizer_3", None) if getattr(pipe, "text_encoder_3", None) is not None else None
        if text == "t5" and t5 is None:
            raise ConfigError("this SD3 pipeline runs without its T5 encoder, so its T5 columns are zeros; "
                              "use --text-tokens clip (text_tokens='clip')")
        if text in ("both", "clip"):
            self.segments.append((pipe.tokenizer, 0))
        if text in ("both", "t5") and t5 is not None:
            self.segments.append((t5, int(getattr(pipe, "tokenizer_max_length", 77))))

    @property
    def tokenizer(self) -> Any:
        return self.segments[0][0]

    def locate(self, prompt: str, words: Sequence[str]) -> dict[str, list[int]]:
        """Each word's text columns: its tokens in every recorded part of the context."""
        found: dict[str, list[int]] = {w: [] for w in words}
        for tokenizer, offset in self.segments:
            for word, positions in class_token_indices(tokenizer, prompt, words).items():
                found[word] += [offset + p for p in positions]
        return found


class JointRecordingProcessor:
    """SD3's ``JointAttnProcessor2_0`` that also hands its queries and keys to the recorder."""

    def __init__(self, recorder: JointAttentionRecorder, name: str):
        self.recorder = recorder
        self.name = name

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        # Mirrors diffusers' JointAttnProcessor2_0 so the layer's output is unchanged.
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query, key, value = split_heads(attn, batch_size, attn.to_q(hidden_states), attn.to_k(hidden_states),
                                        attn.to_v(hidden_states))
        head_dim = key.shape[-1]
        if encoder_hidden_states is not None:
            context = [projection(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
                       for projection in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
            if attn.norm_added_q is not None:
                context[0] = attn.norm_added_q(context[0])
            if attn.norm_added_k is not None:
                context[1] = attn.norm_added_k(context[1])
            query = torch.cat([query, context[0]], dim=2)
            key = torch.cat([key, context[1]], dim=2)
            value = torch.cat([value, context[2]], dim=2)

        if encoder_hidden_states is not None and self.recorder._records():
            hidden_states, logsumexp = attention_with_logsumexp(query, key, value)
            self.recorder._record_joint(self.name, query, key, images=slice(0, residual.shape[1]),
                                        text_start=residual.shape[1], logsumexp=logsumexp)
        else:
            hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (hidden_states[:, : residual.shape[1]],
                                                    hidden_states[:, residual.shape[1]:])
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class FluxRecordingProcessor:
    """FLUX's ``FluxAttnProcessor`` (double- and single-stream blocks) that also hands its queries and keys
    to the recorder. The attention backend the model was set to is kept."""

    def __init__(self, recorder: JointAttentionRecorder, name: str, original: Any):
        self.recorder = recorder
        self.name = name
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def _native(self) -> bool:
        """Whether diffusers would run this call through its native backend (``F.scaled_dot_product_attention``
        on the heads-first view, no context parallelism): only then is the layer's own call ours to make."""
        if self._parallel_config is not None:
            return False
        try:
            from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
        except ImportError:
            return False
        try:
            backend = self._attention_backend or _AttentionBackendRegistry.get_active_backend()[0]
            return AttentionBackendName(backend) == AttentionBackendName.NATIVE
        except (AttributeError, ValueError):  # a registry that moved, a backend it does not name
            return False

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: torch.Tensor | None = None) -> Any:
        # Mirrors diffusers' FluxAttnProcessor (unfused projections: fused ones are refused at attach).
        _, apply_rotary_emb, dispatch_attention_fn = _flux_parts()
        query = attn.to_q(hidden_states).unflatten(-1, (-1, attn.head_dim))
        key = attn.to_k(hidden_states).unflatten(-1, (-1, attn.head_dim))
        value = attn.to_v(hidden_states).unflatten(-1, (-1, attn.head_dim))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            encoder_query = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            encoder_key = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            encoder_value = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            encoder_query, encoder_key = attn.norm_added_q(encoder_query), attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        attended = False  # whether the layer's attention is computed already
        if self.recorder._records():
            query, key, value = (x.transpose(1, 2) for x in (query, key, value))  # (batch, heads, tokens, d)
            logsumexp = None
            if attention_mask is None and self._native():  # native: the fused call on these very tensors
                hidden_states, logsumexp = attention_with_logsumexp(query, key, value)
                hidden_states, attended = hidden_states.transpose(1, 2), True
            self.recorder._record_joint(self.name, query, key, images=slice(self.recorder._text_length, None),
                                        text_start=0, logsumexp=logsumexp, mask=attention_mask)
            query, key, value = (x.transpose(1, 2) for x in (query, key, value))
        if not attended:
            hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                                  backend=self._attention_backend,
                                                  parallel_config=self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


class JointAttentionRecorder(AttentionRecorder):
    """:class:`AttentionRecorder` for a pipeline with a ``transformer`` (SD3 / 3.5, FLUX).

    Besides the recorder's options: ``block_window`` (start, stop) as fractions of the depth, the
    joint blocks recorded (default: the first third; ``layers`` prefixes select blocks by name
    instead), and ``text_tokens`` ("both", "clip" or "t5": which parts of SD3's context give a word's
    map; FLUX has only T5). ``self_attention`` records the image-to-image attention (a softmax over the
    image keys) of the window's middle block, averaged over cells to a grid of at most
    ``self_attention_max`` a side.
    """

    def __init__(self, pipe: Any, prompts: str | Sequence[str] | None = None,
                 classes: Sequence[str] | Sequence[Sequence[str]] | None = None,
                 block_window: tuple[float, float] | None = None, text_tokens: str = "both", **options: Any):
        self.layout = TextLayout(pipe, text_tokens)
        self.block_window = DEFAULT_BLOCK_WINDOW if block_window is None else tuple(block_window)
        start, stop = self.block_window
        if not 0 <= start < stop <= 1:
            raise ConfigError(f"block_window must be two fractions 0 <= start < stop <= 1, got {block_window}")
        self._text_length = 0
        self._cond_context: int | None = None  # data_ptr of the conditional branch's text states (FLUX true CFG)
        self._recording = True
        self.self_attention_bytes = SELF_ATTENTION_BYTES
        super().__init__(pipe, prompts, classes, **options)
        self._self_layer = self.layers[len(self.layers) // 2] if self.self_attention_factor else None

    # ------------------------------------------------------------------ what the base class asks
    @staticmethod
    def _backbone(pipe: Any) -> torch.nn.Module:
        return pipe.transformer

    def _word_locator(self) -> Callable[[str, Sequence[str]], dict[str, list[int]]]:
        return self.layout.locate

    def _t5_encoder(self) -> int | None:
        return next((i for i, (_, _, tok) in enumerate(self.encoders) if tok is self.layout.t5), None)

    def _prompt_encoder(self) -> int:
        # T5 keeps case and punctuation, which CLIP's decoded ids lose ("A dog, on" -> "a dog , on")
        t5 = self._t5_encoder()
        return 0 if t5 is None else t5

    def _checked_encoders(self) -> list[int]:
        # FLUX's CLIP gives only the pooled vector, and cuts long prompts at 77 tokens: not checked
        everything = super()._checked_encoders()
        return [self._t5_encoder()] if _is_flux(self.model) else everything

    def _select_layers(self, prefixes: Sequence[str] | None) -> list[str]:
        layers = list(self._modules)
        if not layers:
            raise RecorderError("this transformer has no joint-attention layers; nothing to record")
        if prefixes is not None:
            chosen = [n for n in layers if any(n.startswith(p) for p in prefixes)]
            if not chosen:
                raise ConfigError(f"no joint-attention layer matches {list(prefixes)}; layers are {layers}")
            return chosen
        start, stop = self.block_window
        first = min(round(start * len(layers)), len(layers) - 1)  # a window near the end still holds a block
        last = round(stop * len(layers))
        return layers[first:max(last, first + 1)]

    def _self_attention_layers(self) -> list[str]:
        return []  # recorded inside the joint layers' own processors

    def _attention_modules(self) -> dict[str, Any]:
        return joint_layers(self.model)

    def _check_processors(self) -> None:
        flux = _flux_parts()
        stock = (flux[0],) if _is_flux(self.model) and flux else (JointAttnProcessor2_0,)
        for name in self.layers:
            proc = self._hooked[name].processor
            # FLUX's stock processor reads fused weights when the module says so; SD3's never does.
            fused = _is_flux(self.model) and getattr(self._hooked[name], "fused_projections", False)
            if type(proc) not in stock or fused:
                raise RecorderError(
                    f"layer {name} uses {type(proc).__name__}{' with fused QKV projections' if fused else ''}, "
                    f"whose arithmetic the recorder does not reproduce (it records "
                    f"{', '.join(s.__name__ for s in stock)}); call pipe.transformer.unfuse_qkv_projections() "
                    "(and drop custom processors) before recording"
                )

    def _processor(self, name: str) -> Any:
        if _is_flux(self.model):
            return FluxRecordingProcessor(self, name, self._hooked[name].processor)
        return JointRecordingProcessor(self, name)

    def _patch(self) -> int:
        """Latent pixels per token side: SD3's patch size; FLUX packs 2x2 latents into a token."""
        return 2 if _is_flux(self.model) else int(self.model.config.patch_size)

    def _image_size(self) -> tuple[int, int]:
        scale = int(getattr(self.pipe, "vae_scale_factor", 1)) * self._patch()
        return self._latent_hw[0] * scale, self._latent_hw[1] * scale

    def _guided(self) -> bool | None:
        # FLUX never doubles its batch: guidance is distilled, and true CFG is a second call.
        return False if _is_flux(self.model) else super()._guided()

    def _self_attention_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """latent/F as for a UNet (SD3 at 1024 px, F 2: 64x64, halved to 32x32), never finer than the tokens."""
        patch = self._patch()
        wanted = super()._self_attention_grid((grid[0] * patch, grid[1] * patch))
        # cells of whole tokens: the largest divisor of each token side not above the side wanted (FLUX at
        # 1360x768 px: 85x48 tokens, 17x12 cells)
        return tuple(max(d for d in range(1, side + 1) if side % d == 0 and d <= want)
                     for side, want in zip(grid, wanted))

    # ------------------------------------------------------------------ recording
    def _on_model_call(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if context is None:
            raise RecorderError("the transformer was called without encoder_hidden_states; nothing to record")
        if _is_flux(self.model):
            # FLUX with true CFG runs the negative prompt as a second call per step: only the first
            # branch (the prompt's; compared by storage, never by value on the device) is recorded.
            if self._cond_context is None:
                self._cond_context = context.data_ptr()
            self._recording = context.data_ptr() == self._cond_context
            if not self._recording:
                return
            if self._latent_hw is None or self._latent_hw[0] * self._latent_hw[1] != hidden.shape[1]:
                ids = kwargs.get("img_ids")
                if ids is None:
                    raise RecorderError("FLUX's transformer was called without img_ids; cannot place its tokens")
                ids = ids.reshape(-1, ids.shape[-1])
                self._latent_hw = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
                self._self_hw = self._self_attention_grid(self._latent_hw) if self.self_attention_factor else None
        else:
            patch = int(self.model.config.patch_size)
            grid = (hidden.shape[-2] // patch, hidden.shape[-1] // patch)
            if self._latent_hw != grid:
                self._latent_hw = grid
                self._self_hw = self._self_attention_grid(grid) if self.self_attention_factor else None
        self._text_length = context.shape[1]
        self._count_call(hidden, kwargs.get("timestep"))

    def _records(self) -> bool:
        """Whether this call of a recorded layer is recorded: the prompt's branch, in the step window."""
        return self._recording and self._in_window()

    def _record_joint(self, name: str, query: torch.Tensor, key: torch.Tensor, images: slice, text_start: int,
                      logsumexp: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> None:
        """One joint layer's call: query and key are (batch, heads, tokens, head_dim), text and image;
        ``logsumexp`` (batch, heads, tokens), each query's over every key, where the layer's kernel gave it;
        ``mask`` the layer's attention mask, as diffusers' attention dispatch takes it (FLUX-derived pipelines
        mask padded text keys): the word maps' softmax is the masked one the layer computes."""
        if not self._records():
            return
        self._check_started()
        cond = self._cond
        query_images, key = query[cond, :, images], key[cond]
        if logsumexp is not None:  # the layer's own kernel ran unmasked
            index = self._text_columns(self._text_length, key.device) + text_start
            key_columns = key[torch.arange(index.shape[0], device=key.device)[:, None], :, index].transpose(1, 2)
            picked = probabilities_from_logsumexp(query_images, key_columns, logsumexp[cond, :, images])
        else:
            values, columns = self._columns_as_values(key.shape[2], text_start, self._text_length, key)
            picked = column_probabilities(query_images, key, values, mask=_mask_rows(mask, cond, images),
                                          columns=columns)
        grid = self._latent_hw
        if picked.shape[1] != grid[0] * grid[1]:
            raise RecorderError(f"layer {name} has {picked.shape[1]} image tokens, not the {grid[0]}x{grid[1]} grid: "
                                "the pipeline adds tokens the recorder does not place (FLUX Kontext's reference "
                                "image does); it records text-to-image and image-to-image FLUX and SD3")
        self._accumulate(grid, picked)
        if name == self._self_layer and self._self_attention_step():
            self._record_image_attention(query_images, key[:, :, images])

    def _record_image_attention(self, query: torch.Tensor, key: torch.Tensor) -> None:
        """Image-to-image attention of one block, softmax over image keys, pooled to the recorded grid:
        a query cell's row is the mean of its tokens' rows, a key cell's column the sum of its tokens'.
        Computed a band of cell rows at a time, so at most ``self_attention_bytes`` of scores exist at once
        (the whole matrix at 1024 px is 4096² per head)."""
        scale = query.shape[-1] ** -0.5
        (h, w), (gh, gw) = self._latent_hw, self._self_hw
        if h % gh or w % gw:
            raise RecorderError(f"the {h}x{w} token grid does not pool to a {gh}x{gw} self-attention grid")
        fh, fw = h // gh, w // gw
        n, tokens = query.shape[0], query.shape[2]
        band = fh * w  # the query tokens of one row of cells
        element = torch.finfo(probability_dtype(query)).bits // 8
        bands = max(1, self.self_attention_bytes // (2 * element * n * band * tokens))
        rows = []
        for start in range(0, gh, bands):
            stop = min(gh, start + bands)
            part = self._mean_probabilities(scale, query[:, :, start * band:stop * band], key,
                                            limit=self.self_attention_bytes)
            part = part.reshape(n, stop - start, fh, gw, fw, gh, fh, gw, fw).mean(dim=(2, 4)).sum(dim=(4, 6))
            rows.append(part.reshape(n, (stop - start) * gw, gh * gw))
        self._accumulate_self((gh, gw), torch.cat(rows, dim=1))
