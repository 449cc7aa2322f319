"""Model names → ready diffusers pipelines: a hub id, a local diffusers folder, or ``shapes``.

One loader for every source, so the built-in model goes through the same path as a user's
Stable Diffusion checkpoint, and every failure names its cause and its fix.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import DiffumaskError
from .distributed import current_worker
from .supported import SUPPORTED, check_model_index, denoiser_of

BUILTIN_MODELS = ("shapes",)
SHAPES_PIPELINES = ("ShapesPipeline", "ShapesDiTPipeline")  # folders written by diffumask.shapes.train


def _read_model_index(folder: str | Path) -> dict[str, Any] | None:
    """A local folder's model_index.json, or None where there is none that reads as a JSON object
    (``load_pipeline`` says what is wrong with one; the guesses made before loading just do without)."""
    try:
        index = json.loads((Path(folder).expanduser() / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) else None


def is_shapes_folder(model: str | Path) -> bool:
    """A folder holding a model trained by ``diffumask.shapes.train`` (the UNet or its DiT twin)."""
    return (_read_model_index(model) or {}).get("_class_name") in SHAPES_PIPELINES


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SCHEDULERS = {
    "pndm": "PNDMScheduler",  # the paper's (SD 1.4's default)
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}


class ModelError(DiffumaskError, ValueError):
    """A model cannot be loaded or used for recording; the message says how to fix it."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def default_device() -> str:
    """The device a command uses when none is given: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | torch.device | None) -> str | torch.device:
    """The device a stage runs on: the one given, else the GPU when there is one, ``cuda`` being this worker's
    own under a launcher (torchrun, Slurm); checked to exist here."""
    device = current_worker().device(device or default_device())
    check_device(device)
    return device


def check_device(device: str | torch.device) -> torch.device:
    """A device this machine has, or one sentence saying why not (torch would assert deep inside)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ModelError(f"unknown device {device!r} ({str(error).splitlines()[0]}); use cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"--device {device}: this machine has no usable CUDA device "
                             "(torch.cuda.is_available() is False); use --device cpu, or install a CUDA build of torch")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ModelError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0")
    elif resolved.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ModelError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif resolved.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ModelError(f"unsupported device {device!r}; use cpu, cuda, cuda:N or mps")
    return resolved


#: Pipelines that denoise with a diffusion transformer, trained in bfloat16 (float16 overflows in FLUX).
TRANSFORMER_PIPELINES = ("StableDiffusion3", "Flux")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _hub_model_index(model_id: str, revision: str | None) -> dict[str, Any] | None:
    """A hub id's model_index.json: from the cache, else (online) that one small file downloaded; None where it
    cannot be had (offline and not cached, no such repository)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    try:
        path = try_to_load_from_cache(model_id, "model_index.json", revision=revision)
        if not isinstance(path, str) and not _offline():
            path = hf_hub_download(model_id, "model_index.json", revision=revision)
        index = json.loads(Path(path).read_text()) if isinstance(path, str) else None
        return index if isinstance(index, dict) else None
    except Exception:  # an id that is no repository, no network: the name decides
        return None


def dtype_name(pipe: Any) -> str:
    """A loaded pipeline's precision (its denoiser's) by name, as a dataset records it: ``float16``."""
    denoiser = denoiser_of(pipe)
    return str(pipe.dtype if denoiser is None else denoiser.dtype).removeprefix("torch.")


def auto_dtype(model: str, device: str | torch.device, revision: str | None = None) -> str:
    """The precision a model runs in when none is given: float32 off the GPU; on it, bfloat16 for
    diffusion transformers (SD3, FLUX), else float16. The pipeline class comes from the model_index.json of
    a local folder or of a hub id (cached, or that one file fetched); failing that, from the id's name."""
    if torch.device(device).type != "cuda":
        return "float32"
    index = _read_model_index(model)
    if index is None and model not in BUILTIN_MODELS and not Path(model).expanduser().exists():
        index = _hub_model_index(model, revision)
    name = (index or {}).get("_class_name")
    lowered = (name if isinstance(name, str) else model).lower().replace("-", "").replace("_", "")  # custom: a list
    return "bfloat16" if any(kind.lower() in lowered for kind in TRANSFORMER_PIPELINES) else "float16"


def pipeline_name(pipe: Any) -> str:
    """The name a pipeline goes by in a manifest: a built-in's own (``shapes``), else its folder or hub id."""
    return str(getattr(pipe, "model_name", None) or getattr(pipe, "name_or_path", "") or type(pipe).__name__)


def _dtype_keyword() -> str:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (0.42 accepts both and warns on the old name)."""
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"


#: Components a dataset never uses, so never downloaded: the safety checker would only be dropped
#: (and the feature extractor only feeds it).
UNUSED_COMPONENTS = {"safety_checker": None, "feature_extractor": None}
HALF_VARIANT = "fp16"  # the hub's name for half-precision weight files (used for bf16 too)


def _variant(folder: Path, torch_dtype: torch.dtype) -> str | None:
    """The fp16 weight files, where the folder has them and the model runs in half precision: half the
    bytes to download, read and convert."""
    half = torch_dtype in (torch.float16, torch.bfloat16)
    return HALF_VARIANT if half and any(folder.glob(f"*/*.{HALF_VARIANT}.*")) else None


def _hub_folder(model_id: str, revision: str | None, torch_dtype: torch.dtype) -> Path:
    """The local snapshot of a hub id: from the cache first, then (if allowed) downloaded, in fp16
    files when the model runs in half precision and the repository has them."""
    from diffusers import DiffusionPipeline

    half = torch_dtype in (torch.float16, torch.bfloat16)
    for variant in ((HALF_VARIANT, None) if half else (None,)):
        try:
            return Path(DiffusionPipeline.download(model_id, revision=revision, local_files_only=True,
                                                   variant=variant, **UNUSED_COMPONENTS))
        except Exception:
            pass
    if not _offline():
        try:
            return Path(DiffusionPipeline.download(model_id, revision=revision, variant=HALF_VARIANT if half else None,
                                                   **UNUSED_COMPONENTS))
        except Exception as error:
            reason = str(error).splitlines()[0][:200]
            raise ModelError(
                f"cannot load {model_id!r}: it is not in the local Hugging Face cache and the Hub could "
                f"not be reached ({reason}). Download it where there is internet access "
                f"(`hf download {model_id}`) and copy the cache, or pass a local diffusers folder "
                "(--model /path/to/folder)"
            ) from None
    raise ModelError(
        f"cannot load {model_id!r}: it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
        "pass a local diffusers folder (--model /path/to/folder)"
    )


@contextmanager
def library_bars(shown: bool) -> Iterator[None]:
    """diffusers' and transformers' own per-file loading and saving bars (and huggingface_hub's downloads) hidden
    in a block when not ``shown``, then restored as they were, the hub's bars group by group (transformers' switch
    resets all of them); shown, they are left as the caller set them."""
    if shown:
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")  # the module: the package exports the class
    before = [(log, log.is_progress_bar_enabled()) for log in (diffusers_logging, transformers_logging)]
    hub_states = dict(getattr(hub_tqdm, "progress_bar_states", {}))
    for log, _ in before:
        log.disable_progress_bar()
    try:
        yield
    finally:
        for log, enabled in before:
            if enabled:
                log.enable_progress_bar()
        if isinstance(states := getattr(hub_tqdm, "progress_bar_states", None), dict):
            states.clear()
            states.update(hub_states)


def load_pipeline(
    model: str = "shapes",
    device: str | None = None,
    dtype: str | torch.dtype = "auto",
    scheduler: str | None = None,
    revision: str | None = None,
    prompts_only: bool = False,
) -> Any:
    """Load ``model`` (``shapes``, a local diffusers folder or a hub id) for generation with recording.

    By default on the GPU when there is one, in the precision :func:`auto_dtype` picks for it there. A pipeline
    no recorder reads (or, ``prompts_only``, one that needs an input image) is refused from its model_index.json,
    before a hub id's weights download.
    """
    device = resolve_device(device)
    torch_dtype = resolve_dtype(auto_dtype(model, device, revision) if dtype == "auto" else dtype)
    if scheduler is not None:
        _scheduler_class(scheduler)  # before the (slow) load
    if model in BUILTIN_MODELS:
        from .shapes import load_pipeline as load_shapes

        pipe = load_shapes(device=device, dtype=torch_dtype)
    else:
        from diffusers import DiffusionPipeline

        path = Path(model).expanduser()
        local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1
        if local and not path.is_dir():
            raise ModelError(f"model folder {model} does not exist")
        if not local and (hub_index := _hub_model_index(model, revision)) is not None:
            check_model_index(hub_index, prompts_only)
        folder = path if local else _hub_folder(model, revision, torch_dtype)
        index = folder / "model_index.json"
        if not index.is_file():
            raise ModelError(
                f"{folder} is not a diffusers pipeline folder (no model_index.json). For a single "
                ".safetensors/.ckpt file, convert it once: "
                "StableDiffusionPipeline.from_single_file(FILE).save_pretrained(FOLDER)"
            )
        try:
            components = json.loads(index.read_text())
        except ValueError as error:
            raise ModelError(f"{index} is not JSON ({error})") from None
        if not isinstance(components, dict):
            raise ModelError(f"{index} is not a diffusers model index (a JSON object naming the pipeline's parts)")
        if isinstance(custom := components.get("_class_name"), list):
            raise ModelError(f"{folder} holds a custom-code pipeline ({'.'.join(map(str, custom))}), which diffumask does "
                             "not load itself: load it with DiffusionPipeline.from_pretrained(FOLDER, custom_pipeline=..., "
                             "trust_remote_code=True) and pass it in: generate_dataset(config, pipe=pipe)")
        if components.get("_class_name") in SHAPES_PIPELINES:  # a shapes model trained with diffumask.shapes.train
            from .shapes import load_pipeline as load_shapes

            pipe = load_shapes(device=device, dtype=torch_dtype, path=folder)
            if scheduler is not None:
                set_scheduler(pipe, scheduler)
            return pipe
        check_model_index(components, prompts_only)
        extra: dict[str, Any] = {k: v for k, v in UNUSED_COMPONENTS.items() if k in components}
        if "safety_checker" in components:
            extra["requires_safety_checker"] = False
        extra[_dtype_keyword()] = torch_dtype
        extra["variant"] = _variant(folder, torch_dtype)
        try:
            pipe = DiffusionPipeline.from_pretrained(folder, **extra)
        except (OSError, ValueError) as error:
            raise ModelError(f"cannot load the pipeline in {folder}: {str(error).splitlines()[0]}") from None
        except (TypeError, KeyError, AttributeError) as error:  # a model index diffusers cannot follow
            raise ModelError(f"cannot load the pipeline in {folder}: its model_index.json names something diffusers "
                             f"cannot follow ({type(error).__name__}: {str(error).splitlines()[0]})") from None
        pipe.to(device)
    if denoiser_of(pipe) is None or getattr(pipe, "tokenizer", None) is None:
        raise ModelError(
            f"{model} loads as {type(pipe).__name__}, which has no UNet or transformer with a tokenizer; {SUPPORTED}"
        )
    if scheduler is not None:
        set_scheduler(pipe, scheduler)
    return pipe


def set_scheduler(pipe: Any, name: str) -> None:
    """Swap the sampler, keeping the model's noise schedule and prediction type (UNet pipelines: the samplers offered
    are DDPM-family; a flow-matching model's (SD3, FLUX) would run with the wrong sampling math)."""
    cls = _scheduler_class(name)
    if type(pipe.scheduler).__name__.startswith("FlowMatch"):
        raise ModelError(f"--scheduler {name}: this model samples by flow matching ({type(pipe.scheduler).__name__}), "
                         "and the samplers offered are for noise-prediction UNets; leave --scheduler out")
    # PNDM as every Stable Diffusion release configures it: PLMS steps only. Its Runge-Kutta warm-up (the class
    # default, so what a config without the key gets) fails at fewer than about 4 steps and is not the paper's sampler.
    options = {"skip_prk_steps": True} if name == "pndm" else {}
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **options)


def _scheduler_class(name: str) -> Any:
    import diffusers

    if name not in SCHEDULERS:
        raise ModelError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name])


def model_description(model: str, pipe: Any) -> dict[str, Any]:
    """What the manifest records about the model: the name given, the folder, the hub commit."""
    folder = str(getattr(pipe, "name_or_path", "") or model)
    parts = Path(folder).parts
    revision = parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None
    return {"model": model, "pipeline": type(pipe).__name__, "model_folder": folder, "revision": revision}
