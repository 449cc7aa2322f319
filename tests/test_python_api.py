"""The Python API where it differs from the command line: lists are lists (a string is refused by name, not
iterated letter by letter), a γ sweep is its values, filter's fold-model options have defaults."""

from __future__ import annotations

import re

import pytest
from dataset_factory import make_dataset

from diffumask.augment import AugmentConfig
from diffumask.errors import ConfigError
from diffumask.formats.export import export_dataset
from diffumask.generate import GenerateConfig
from diffumask.masks.adaptive import gamma_range
from diffumask.noise import FilterConfig, filter_dataset
from diffumask.refine import RefineConfig
from diffumask.segment.train import TrainConfig


@pytest.mark.parametrize("make, said", [
    (lambda: GenerateConfig(classes="circle,star", out="d"),
     "GenerateConfig.classes takes a list, e.g. [\"dog\", \"cat\"], not 'circle,star'"),
    (lambda: GenerateConfig(classes=["dog"], out="d", resolutions="8,16"),
     "GenerateConfig.resolutions takes a list, e.g. [16, 32], not '8,16'"),
    (lambda: GenerateConfig(classes=["dog"], out="d", step_window="0.5,1"),
     "GenerateConfig.step_window takes a list, e.g. (0.6, 1.0), not '0.5,1'"),
    (lambda: TrainConfig(data="data/shapes", out="run"),
     "TrainConfig.data takes a list, e.g. [\"data/voc\"], not 'data/shapes'"),
    (lambda: TrainConfig(data=["d"], out="run", augment="+mosaic,paste"),
     "TrainConfig.augment takes a list, e.g. [\"+mosaic\", \"paste\"], not '+mosaic,paste'"),
    (lambda: AugmentConfig(grids=2), "AugmentConfig.grids takes a list, e.g. (2, 3), not 2"),
    (lambda: TrainConfig(data=(d for d in ["a"]), out="run"),
     "TrainConfig.data takes a list, e.g. [\"data/voc\"], not <generator object <lambda>.<locals>.<genexpr> at 0x…>"),
    (lambda: RefineConfig(method="adaptive", gammas="0.3,0.7"),
     "RefineConfig.gammas takes a list, e.g. gamma_range(0.3, 0.7, 0.05), not '0.3,0.7'"),
    (lambda: RefineConfig(method="adaptive", gammas=(0.55, 0.74, 0.01)),  # the CLI's START,STOP,STEP, as values
     "the γ sweep lists the values to try, rising and each once, got [0.55, 0.74, 0.01]; for the command line's "
     "START,STOP,STEP use diffumask.masks.adaptive.gamma_range"),
])
def test_a_string_or_number_where_a_list_goes_is_refused_by_name(make, said):
    with pytest.raises(ConfigError) as raised:
        make()
    assert re.sub(r"0x[0-9a-f]+", "0x…", str(raised.value)) == said


def test_lists_and_ranges_are_taken_as_given():
    assert GenerateConfig(classes=["circle", "star"], out="d", step_window=(0.6, 1.0)).classes == ["circle", "star"]
    assert RefineConfig(method="adaptive", gammas=gamma_range(0.55, 0.74, 0.01)).gammas[-1] == 0.74
    assert AugmentConfig(grids=(2, 3)).grids == (2, 3)


def test_export_only_takes_list_names_and_filter_needs_no_training_config(tmp_path):
    dataset = make_dataset(tmp_path / "data", n=6, size=32, soft_maps=False, splits=("train",))
    with pytest.raises(ConfigError, match=r"^export_dataset.only takes a list, e.g. \[\"filtered\"\], not 'train'$"):
        export_dataset(dataset.root, "coco", tmp_path / "coco", only="train")
    assert not (tmp_path / "coco").exists()
    config = FilterConfig(dataset=str(dataset.root), folds=2, prune=0.5)  # the fold models: train's defaults
    assert config.training.preset == "tiny" and config.training.steps is None
    config.training.steps, config.training.crop, config.training.workers = 2, 32, 0
    result = filter_dataset(config, progress=False)
    assert result.trained_folds == 2 and len(result.kept) + len(result.pruned) == 6


def test_the_readmes_every_stage_block_names_real_functions_with_arguments_they_take(tmp_path, monkeypatch):
    """The README's block, run with each stage function replaced by a stand-in that binds the call to the real
    function's signature (so a renamed function, argument or config field fails here) and does no work; the
    config dataclasses are the real ones, so their checks run on the values written there."""
    import inspect
    from pathlib import Path
    from unittest import mock

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    monkeypatch.chdir(tmp_path)  # its relative folders, were anything to write them, land here
    block = readme.split("Every stage from Python:")[1].split("```python\n")[1].split("```")[0]
    imports = "".join(line + "\n" if line.startswith("from ") else "\n" for line in block.splitlines())
    calls = "".join("\n" if line.startswith("from ") else line + "\n" for line in block.splitlines())
    namespace: dict = {}
    exec(compile(imports, "README.md", "exec"), namespace)
    called = []

    def stand_in(real, returns):
        def call(*args, **kwargs):
            inspect.signature(real).bind(*args, **kwargs)
            called.append(real.__name__)
            return returns
        return call

    stages = ("generate_dataset", "refine_dataset", "filter_dataset", "augment_dataset", "train", "export_world",
              "evaluate_run", "export_dataset", "validate_dataset")  # in the block's order
    for name in stages:
        namespace[name] = stand_in(namespace[name], ([], 0) if name == "validate_dataset" else mock.MagicMock())
    exec(compile(calls, "README.md", "exec"), namespace)  # the imports left out: they would bring the real ones back
    assert called == list(stages)


def test_progress_false_silences_the_libraries_bars_too_and_restores_them(tmp_path, capfd):
    """generate's pipeline loading (diffusers' and transformers' per-component bars), train's model saving and
    evaluate's loading print nothing with progress=False, and the libraries' own settings are as before after."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from diffumask.generate import generate_dataset
    from diffumask.segment.evaluate import evaluate_run
    from diffumask.segment.train import train

    data = generate_dataset(GenerateConfig(classes=["circle"], out=str(tmp_path / "data"), model="shapes",
                                           images_per_class=2), progress=False)
    run = train(TrainConfig(data=[str(data.root)], out=str(tmp_path / "run"), steps=2, batch_size=2, crop=32, workers=0,
                            device="cpu"), progress=False)
    evaluate_run(run, str(data.root), split="train", progress=False)
    assert capfd.readouterr().err == ""
    assert diffusers_logging.is_progress_bar_enabled() and transformers_logging.is_progress_bar_enabled()


@pytest.mark.parametrize("threshold", [0.4, 0.6, 0.355, 0.455, 0.605, 0.3333])
def test_the_sweep_around_any_dataset_gamma_is_twenty_rising_values(threshold):
    """γ − 0.05 … γ + 0.14 in steps of 0.01, checked in decimal arithmetic; at two places exactly the recorded sweeps
    of earlier runs (0.4: the paper's 0.35 … 0.54), at three (0.355) no longer rounded into repeats and gaps."""
    from decimal import Decimal

    from diffumask.masks.adaptive import sweep_around

    expected = [float(Decimal(str(threshold)) - Decimal("0.05") + Decimal("0.01") * k) for k in range(20)]
    assert list(sweep_around(threshold)) == pytest.approx(expected, abs=1e-9)
    assert RefineConfig(method="adaptive", gammas=sweep_around(threshold)).gammas == sweep_around(threshold)
    if threshold == 0.4:
        assert sweep_around(threshold) == (0.35, 0.36, 0.37, 0.38, 0.39, 0.4, 0.41, 0.42, 0.43, 0.44, 0.45, 0.46, 0.47,
                                           0.48, 0.49, 0.5, 0.51, 0.52, 0.53, 0.54)


def test_hiding_the_libraries_bars_restores_the_hubs_own_settings():
    """transformers' switch turns huggingface_hub's bars on for every group; the block leaves them as it found them."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    from diffumask.models import library_bars

    try:
        disable_progress_bars("huggingface_hub.lfs_upload")
        with library_bars(False):
            assert are_progress_bars_disabled()
        assert are_progress_bars_disabled("huggingface_hub.lfs_upload") and not are_progress_bars_disabled()
        disable_progress_bars()
        with library_bars(False):
            pass
        assert are_progress_bars_disabled()
    finally:
        enable_progress_bars()
