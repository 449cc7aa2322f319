"""Shared fixtures: tiny random-weight pipelines saved to disk and loaded the way a user's are."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
torch.set_num_threads(1)  # tiny models gain nothing from threads, and lose a lot when cores are shared


@pytest.fixture(scope="session")
def saved_pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Folders holding tiny SD 1.x, SD 2.x (v-prediction) and SDXL pipelines, via save_pretrained."""
    from diffumask.testing import tiny_pipeline

    folders = {}
    for kind in ("sd1", "sd2", "sdxl"):
        folder = tmp_path_factory.mktemp(kind)
        tiny_pipeline(kind).save_pretrained(folder)
        folders[kind] = str(folder)
    return folders


@pytest.fixture(scope="session")
def saved_transformers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Folders holding tiny SD3- and FLUX-shaped pipelines (T5 tokenizer built offline), via save_pretrained."""
    from diffumask.testing import tiny_pipeline

    folders = {}
    for kind in ("sd3", "flux"):
        folder = tmp_path_factory.mktemp(kind)
        torch.manual_seed(0)
        tiny_pipeline(kind).save_pretrained(folder)
        folders[kind] = str(folder)
    return folders


@pytest.fixture(scope="session")
def sd1_pipe(saved_pipelines: dict[str, str]):
    from diffumask.models import load_pipeline

    pipe = load_pipeline(saved_pipelines["sd1"], device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe
