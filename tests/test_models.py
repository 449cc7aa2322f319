"""The loader: local folders, hub ids offline, schedulers, and the errors users will hit."""

from __future__ import annotations

import pytest

from diffumask.models import ModelError, load_pipeline, set_scheduler


def test_local_folder_loads_with_scheduler(saved_pipelines):
    pipe = load_pipeline(saved_pipelines["sd2"], scheduler="euler")
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.scheduler.config.prediction_type == "v_prediction"  # kept from the checkpoint
    for name in ("pndm", "ddim", "dpm++"):
        set_scheduler(pipe, name)
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_sdxl_folder_loads(saved_pipelines):
    assert type(load_pipeline(saved_pipelines["sdxl"])).__name__ == "StableDiffusionXLPipeline"


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
        load_pipeline(saved_pipelines["sd1"], scheduler="plms")
    with pytest.raises(ModelError, match="unknown dtype"):
        load_pipeline(saved_pipelines["sd1"], dtype="float8")
