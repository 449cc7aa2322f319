"""Which diffusers pipelines diffumask records, and which ``generate`` can call, said in one line.

The recorders read a UNet's cross-attention (Stable Diffusion 1.x/2.x/XL and pipelines built on that UNet)
and the joint attention of SD3's and FLUX.1's transformers. Other denoisers (PixArt, Sana, Qwen-Image, FLUX.2,
Chroma, video UNets, ...) would fail deep in the recorder or, worse, give maps of the wrong rows, so they are
refused by name: from ``model_index.json`` before any weights load, and again on a pipeline passed in.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError

#: Denoiser classes (or their subclasses) whose attention the recorders read.
RECORDED_DENOISERS = {
    "UNet2DConditionModel": "Stable Diffusion 1.x/2.x/XL",
    "SD3Transformer2DModel": "Stable Diffusion 3/3.5",
    "FluxTransformer2DModel": "FLUX.1",
}
SUPPORTED = ("diffumask records Stable Diffusion 1.x, 2.x and XL (and pipelines on their UNet), Stable Diffusion "
             "3/3.5 and FLUX.1 pipelines")
#: What a pipeline needs besides its prompt: ``generate`` calls with prompts alone.
IMAGE_INPUTS = ("image", "mask_image", "control_image")


def check_denoiser(pipeline: str, denoiser: str | None, ancestors: tuple[str, ...] = ()) -> None:
    """Refuse a pipeline whose denoiser (class name, and the names of its base classes) no recorder reads."""
    if denoiser is None:
        raise ConfigError(f"{pipeline} has no UNet or transformer to record; {SUPPORTED}")
    if denoiser not in RECORDED_DENOISERS and not set(ancestors) & set(RECORDED_DENOISERS):
        raise ConfigError(f"{pipeline} denoises with {denoiser}, whose attention diffumask does not record; "
                          f"{SUPPORTED}")


def check_call(pipeline: str, parameters: Mapping[str, Any], prompts_only: bool, diffusers_class: bool = True) -> None:
    """Refuse a pipeline call that reads no prompt, one the recorders cannot follow (perturbed-attention
    guidance adds a third batch) and, for ``generate`` (``prompts_only``), one of diffusers' own image-to-image,
    inpainting, ControlNet or editing pipelines (a community pipeline's optional ``image`` is left alone)."""
    names = [name for name in parameters if name != "self"]
    if "prompt" not in names:
        raise ConfigError(f"{pipeline} takes no prompt (its call reads {', '.join(names[:3])}, ...); {SUPPORTED}")
    if "pag_scale" in names:
        raise ConfigError(f"{pipeline} adds perturbed-attention guidance, a third batch of images the recorder "
                          "does not tell apart; record the pipeline without it (e.g. "
                          "StableDiffusionPipeline.from_pipe(pipe), or the checkpoint's own pipeline class)")
    if prompts_only and diffusers_class and (taken := [name for name in IMAGE_INPUTS if name in names]):
        raise ConfigError(f"{pipeline} reads {' and '.join(taken)} besides the prompt (an image-to-image, inpainting, "
                          "ControlNet or editing pipeline), and generate makes images from prompts alone: load the "
                          "text-to-image pipeline of the same checkpoint, or record your own calls from Python with "
                          "diffumask.trace(pipe, prompts, classes)")


def check_model_index(index: Any, prompts_only: bool = False) -> None:
    """The checks above from a diffusers folder's ``model_index.json``, before any weights load. What diffusers
    does not name (a custom-code pipeline, a component it does not know) is left to the check on the loaded
    pipeline, and a malformed index to the loading itself."""
    import diffusers

    name = index.get("_class_name") if isinstance(index, Mapping) else None
    if not isinstance(name, str):
        return
    parts = [index.get(part) for part in ("unet", "transformer")]
    named = [tuple(part) for part in parts if isinstance(part, (list, tuple)) and len(part) == 2
             and all(isinstance(v, str) for v in part)]
    if not named:
        if all(part is None or isinstance(part, (list, tuple)) and all(v is None for v in part) for part in parts):
            check_denoiser(name, None)
        return
    library, denoiser = named[0]
    if library == "diffusers":
        known = getattr(diffusers, denoiser, None)
        check_denoiser(name, denoiser, _ancestors(known) if isinstance(known, type) else ())
    pipeline = getattr(diffusers, name, None)
    if isinstance(pipeline, type) and callable(getattr(pipeline, "__call__", None)):
        check_call(name, call_parameters(pipeline), prompts_only)


def denoiser_of(pipe: Any) -> Any:
    """A pipeline's UNet, else its transformer (None without either), unwrapped from ``torch.compile``."""
    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else getattr(pipe, "transformer", None)
    return getattr(denoiser, "_orig_mod", denoiser)


def check_loaded(pipe: Any, prompts_only: bool = False) -> None:
    """The checks above on a loaded pipeline."""
    name = type(pipe).__name__
    denoiser = denoiser_of(pipe)
    check_denoiser(name, None if denoiser is None else type(denoiser).__name__, _ancestors(type(denoiser)))
    check_call(name, call_parameters(type(pipe)), prompts_only,
               diffusers_class=type(pipe).__module__.startswith("diffusers."))


def call_parameters(cls: type) -> Mapping[str, inspect.Parameter]:
    """The parameters a pipeline class's call reads: a subclass's call that passes ``**kwargs`` on (to time or
    log its parent's) reads its parent's too, its own first."""
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    read: dict[str, inspect.Parameter] = {}
    for owner in cls.__mro__:
        call = owner.__dict__.get("__call__")
        if call is None:
            continue
        parameters = inspect.signature(call).parameters
        for name, parameter in parameters.items():
            if name != "self" and parameter.kind not in variadic:
                read.setdefault(name, parameter)
        if not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values()) or owner.__module__.startswith(
                "diffusers."):  # diffusers' own calls take **kwargs only for deprecated arguments
            break
    return read or inspect.signature(cls.__call__).parameters


def _ancestors(cls: type) -> tuple[str, ...]:
    return tuple(base.__name__ for base in cls.__mro__)
