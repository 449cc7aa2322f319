"""The loader: local folders, hub ids offline, schedulers, and the errors users will hit."""

from __future__ import annotations

import copy
import types

import pytest
import torch

from diffumask.models import ModelError, load_pipeline, set_scheduler


def test_local_folder_loads_with_scheduler(saved_pipelines):
    pipe = load_pipeline(saved_pipelines["sd2"], device="cpu", scheduler="euler")
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.scheduler.config.prediction_type == "v_prediction"  # kept from the checkpoint
    for name in ("pndm", "ddim", "dpm++"):
        set_scheduler(pipe, name)
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_pndm_samples_at_any_step_count(saved_pipelines, steps):
    """PNDM runs as Stable Diffusion configures it (PLMS only); the class default's Runge-Kutta warm-up, which a
    config without skip_prk_steps gets (the tiny one here), fails at a few steps."""
    pipe = load_pipeline(saved_pipelines["sd1"], device="cpu", scheduler="pndm")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.skip_prk_steps
    image = pipe("a dog", num_inference_steps=steps, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3)


def test_sdxl_folder_loads(saved_pipelines):
    assert type(load_pipeline(saved_pipelines["sdxl"], device="cpu")).__name__ == "StableDiffusionXLPipeline"


def test_folder_without_model_index(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="not a diffusers pipeline folder"):
        load_pipeline(str(tmp_path))


def test_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_pipeline(str(tmp_path / "nope"))


def test_unreachable_hub_id_says_to_pass_a_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="pass a local diffusers folder"):
        load_pipeline("someone/not-cached-model")


def test_unknown_scheduler_and_dtype(saved_pipelines):
    with pytest.raises(ModelError, match="unknown scheduler 'plms'"):
        load_pipeline(saved_pipelines["sd1"], device="cpu", scheduler="plms")
    with pytest.raises(ModelError, match="unknown dtype"):
        load_pipeline(saved_pipelines["sd1"], device="cpu", dtype="float8")


def test_hub_id_loads_from_the_local_cache(saved_pipelines, tmp_path):
    """A hub id resolves through the Hugging Face cache offline, and the manifest gets its commit."""
    import os
    import shutil
    import subprocess
    import sys

    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    shutil.copytree(saved_pipelines["sd1"], repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    code = ("from diffumask.models import load_pipeline, model_description; "
            "pipe = load_pipeline('someone/tiny-sd'); print(model_description('someone/tiny-sd', pipe)['revision'])")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "0123abcd"


def test_half_precision_reads_fp16_files_and_never_needs_the_safety_checker(saved_pipelines, tmp_path):
    """A hub snapshot with fp16 weight files beside the full ones, whose model_index names a safety checker
    and feature extractor it does not hold (as a download that skipped them leaves it): float16 loads the
    fp16 files, float32 the full ones, and neither asks for the missing components."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    import torch

    snapshot = tmp_path / "hub" / "models--someone--tiny-sd" / "snapshots" / "0123abcd"
    shutil.copytree(saved_pipelines["sd1"], snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    pipe = load_pipeline(saved_pipelines["sd1"], device="cpu")
    with torch.no_grad():
        pipe.unet.conv_in.bias.fill_(0.25)  # marks the fp16 files apart from the full ones
    pipe.unet.to(torch.float16).save_pretrained(snapshot / "unet", variant="fp16")
    index = json.loads((snapshot / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"])
    (snapshot / "model_index.json").write_text(json.dumps(index))
    code = ("import sys; from diffumask.models import load_pipeline; pipe = load_pipeline('someone/tiny-sd', dtype=sys.argv[1]); "
            "print(pipe.safety_checker, pipe.unet.dtype, float(pipe.unet.conv_in.bias[0]))")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    for dtype, marker in (("float16", 0.25), ("float32", None)):
        result = subprocess.run([sys.executable, "-c", code, dtype], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        checker, loaded, bias = result.stdout.split()[-3:]
        assert checker == "None" and loaded == f"torch.{dtype}"
        assert (float(bias) == marker) if marker else float(bias) != 0.25


def test_load_pipeline_takes_the_gpu_and_its_precision_when_there_is_one(monkeypatch):
    """As the command line does: the Python default is the GPU in float16 (SD3/FLUX bfloat16), not the CPU."""
    import diffumask.shapes

    loaded = {}
    monkeypatch.setattr("diffumask.models.default_device", lambda: "cuda")
    monkeypatch.setattr("diffumask.models.check_device", lambda device: None)
    monkeypatch.setattr(diffumask.shapes, "load_pipeline",
                        lambda device, dtype: loaded.update(device=device, dtype=dtype)
                        or types.SimpleNamespace(unet=object(), tokenizer=object()))
    load_pipeline("shapes")
    assert loaded == {"device": "cuda", "dtype": torch.float16}
    load_pipeline("shapes", device="cpu")
    assert loaded == {"device": "cpu", "dtype": torch.float32}
    load_pipeline("shapes", dtype="bfloat16")
    assert loaded == {"device": "cuda", "dtype": torch.bfloat16}


def test_dtype_name_reads_the_denoisers_precision(sd1_pipe):
    from diffumask.models import dtype_name

    assert dtype_name(sd1_pipe) == "float32"
    half = copy.deepcopy(sd1_pipe.unet).to(torch.bfloat16)
    assert dtype_name(types.SimpleNamespace(unet=half, transformer=None)) == "bfloat16"


def test_load_pipeline_under_a_launcher_takes_this_workers_gpu(monkeypatch):
    """Worker 1 of 2 on a node with two GPUs: cuda:1, not every worker's pipeline on cuda:0."""
    import diffumask.shapes

    loaded = {}
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr("diffumask.models.default_device", lambda: "cuda")
    monkeypatch.setattr("diffumask.models.check_device", lambda device: None)
    monkeypatch.setattr(diffumask.shapes, "load_pipeline",
                        lambda device, dtype: loaded.update(device=device)
                        or types.SimpleNamespace(unet=object(), tokenizer=object()))
    load_pipeline("shapes")
    assert loaded == {"device": "cuda:1"}
