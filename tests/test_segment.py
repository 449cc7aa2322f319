"""The segmenter stage: training falls, resumes exactly, presets build, predictions and bad input."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffumask.cli import main
from diffumask.dataset import read_index_png, read_label_map
from diffumask.errors import ConfigError
from diffumask.formats import SourceError
from diffumask.segment import RunError, RunFolder, TrainConfig, evaluate_run, get_preset, predict_folder, train
from diffumask.segment.model import build_segmenter, init_from, semantic_to_mask_labels
from diffumask.shapes import CLASSES, export_world

FAST = {"batch_size": 4, "crop": 32, "workers": 0}


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_world(tmp_path_factory.mktemp("data") / "shapes", 24, 0, 6)


def test_tiny_run_learns_and_writes_a_run_folder(shapes_data, tmp_path):
    previous = os.umask(0o002)  # a group-shared cluster's: files 664, folders 775, set after diffumask was imported
    try:
        check_a_tiny_run(shapes_data, tmp_path)
    finally:
        os.umask(previous)


def check_a_tiny_run(shapes_data: Path, tmp_path: Path) -> None:
    run = train(TrainConfig(data=[str(shapes_data)], out=str(tmp_path / "run"), steps=40, lr=3e-3, **FAST),
                progress=False)
    log = run.log_entries()
    assert [e["step"] for e in log] == [10, 20, 30, 40]
    assert log[-1]["loss"] < 0.7 * log[0]["loss"]
    assert read_label_map(run.root) == ["background", *CLASSES]
    assert json.loads((run.root / "settings.json").read_text())["preset"]["schedule"]["steps"] == 40
    assert (run.root / "model" / "model.safetensors").is_file() and run.checkpoint_path.is_file()
    assert not list(run.root.glob(".*")), "no temporary files are left"

    out = predict_folder(run, str(shapes_data), tmp_path / "pred", split="test", progress=False)  # train's RunFolder
    predictions = sorted(out.glob("*.png"))
    assert len(predictions) == 6 and read_label_map(out) == read_label_map(run.root)
    assert read_index_png(predictions[0]).shape == (32, 32)
    assert max(read_index_png(p).max() for p in predictions) <= len(CLASSES)
    evaluation = evaluate_run(run, str(shapes_data), split="test", progress=False, json_path=tmp_path / "eval.json")
    assert evaluation.classes == ["background", *CLASSES] and evaluation.images == 6
    saved = json.loads((tmp_path / "eval.json").read_text())
    for path in [p for root in (run.root, out) for p in (root, *root.rglob("*"))] + [tmp_path / "eval.json"]:
        assert path.stat().st_mode & 0o777 == (0o775 if path.is_dir() else 0o664), path  # not mkstemp's 600
    assert saved["miou"] == pytest.approx(evaluation.miou) and set(saved["iou"]) == {"background", *CLASSES}


def _kill_at(step_to_kill: int):
    def on_step(step: int) -> None:
        if step == step_to_kill:
            raise KeyboardInterrupt
    return on_step


def test_resume_after_a_kill_gives_the_same_weights(shapes_data, tmp_path):
    def config(out: Path) -> TrainConfig:
        return TrainConfig(data=[str(shapes_data)], out=str(out), steps=25, save_every=15, **FAST)

    whole_run = train(config(tmp_path / "whole"), progress=False)
    # killed before the first checkpoint (restarts from 0), then past it (resumes from 15)
    for kill_at in (12, 22):
        with pytest.raises(KeyboardInterrupt):
            train(config(tmp_path / "broken"), progress=False, on_step=_kill_at(kill_at))
        assert not (tmp_path / "broken" / "model").exists()
    resumed = train(config(tmp_path / "broken"), progress=False)
    whole = load_file(whole_run.model_dir / "model.safetensors")
    again = load_file(resumed.model_dir / "model.safetensors")
    assert whole.keys() == again.keys()
    for key in whole:
        torch.testing.assert_close(again[key], whole[key], rtol=0, atol=0)
    entries = resumed.log_entries()
    assert [e["step"] for e in entries] == [10, 20, 25]  # each logged step once, no duplicates from the kills
    assert entries[-1]["loss"] == whole_run.log_entries()[-1]["loss"]  # the same steps 21-25 in both


def test_the_papers_presets_clip_the_gradient_and_runs_can_choose(shapes_data, tmp_path, monkeypatch):
    """Mask2Former's recipe clips the whole model's gradient to norm 0.01 before each step; --max-grad-norm sets it
    for any preset (0: none); runs without clipping record the same settings as before the option."""
    import accelerate

    assert get_preset("r50").schedule.max_grad_norm == get_preset("swin-b").schedule.max_grad_norm == 0.01
    assert get_preset("tiny").schedule.max_grad_norm == 1.0  # lr 2e-3 unclipped stalled benchmark runs
    assert "max_grad_norm" not in get_preset("tiny-mask2former").as_dict()["schedule"]
    norms = []
    clip = accelerate.Accelerator.clip_grad_norm_

    def spy(self, parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        total = clip(self, parameters, max_norm, *args, **kwargs)
        norms.append((max_norm, float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None])))))
        return total

    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", spy)
    train(TrainConfig(data=[str(shapes_data)], out=str(tmp_path / "clipped"), steps=3, extra={"max_grad_norm": 0.05}, **FAST),
          progress=False)
    assert len(norms) == 3 and all(limit == 0.05 and norm <= 0.05 * 1.001 for limit, norm in norms)
    train(TrainConfig(data=[str(shapes_data)], out=str(tmp_path / "tiny"), steps=2, **FAST), progress=False)
    assert [limit for limit, _ in norms[3:]] == [1.0, 1.0] and all(norm <= 1.001 for _, norm in norms[3:])  # tiny's own
    train(TrainConfig(data=[str(shapes_data)], out=str(tmp_path / "free"), steps=2, extra={"max_grad_norm": 0.0}, **FAST),
          progress=False)
    assert len(norms) == 5  # 0: no clipping
    with pytest.raises(ConfigError, match="--max-grad-norm must be positive"):
        TrainConfig(data=[str(shapes_data)], out=str(tmp_path / "x"), extra={"max_grad_norm": -1.0}).resolved_preset()
    seen = []
    module = importlib.import_module("diffumask.segment.train")  # the package's ``train`` is the function
    monkeypatch.setattr(module, "train", lambda config, progress: seen.append(config) or None)
    monkeypatch.setattr("diffumask.cli.os.environ", {"RANK": "1"})  # a non-reporting rank: no summary printed
    for flag, expected in ((["--max-grad-norm", "0"], 0.0), ([], 0.01)):
        main(["train", str(shapes_data), "--out", str(tmp_path / "cli"), "--preset", "r50", *flag])
        assert seen[-1].resolved_preset().schedule.max_grad_norm == expected


def test_a_resume_with_another_number_of_processes_says_it_will_not_be_bit_identical(shapes_data, tmp_path):
    """The checkpoint records how many processes trained it; the same run resumed by another number goes on (the
    settings do not say where it runs) with a warning, since gradients are reduced across other processes."""
    config = TrainConfig(data=[str(shapes_data)], out=str(tmp_path / "run"), steps=4, save_every=1, **FAST)
    with pytest.raises(KeyboardInterrupt):
        train(config, progress=False, on_step=_kill_at(2))  # checkpoint at step 1 (and 2), then killed
    run = RunFolder(tmp_path / "run")
    state = run.load_checkpoint()
    assert state["processes"] == 1
    run.save_checkpoint({**state, "processes": 2})  # as if two processes had trained it so far
    with pytest.warns(UserWarning, match=r"trained by 2 process\(es\) up to step 2 and goes on with 1: it resumes, "
                                         r"but its weights will not be bit-identical"):
        with pytest.raises(KeyboardInterrupt):
            train(config, progress=False, on_step=_kill_at(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # resumed by as many processes as trained it: silent
        train(config, progress=False)


def test_a_run_resumes_with_its_data_spelled_relative_or_absolute(tmp_path, monkeypatch):
    """The same DATA folders, relative from the directory the first run was started in or absolute, resume
    the run; other folders are refused."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    classes = ["background", "a"]
    RunFolder.create("run", classes, {"data": [str(tmp_path / "data"), f"voc:{tmp_path / 'voc'}"], "seed": 0})
    RunFolder.check("run", classes, {"data": ["data", "voc:voc"], "seed": 0})
    RunFolder.check("run", classes, {"data": ["./data/", f"voc:{tmp_path}/voc"], "seed": 0})
    for other in (["other", "voc:voc"], ["data", "voc:data"], ["data", "ade20k:voc"]):
        with pytest.raises(RunError, match=r"other settings \(data differs: \["):
            RunFolder.check("run", classes, {"data": other, "seed": 0})
    RunFolder.check("run", classes, {"data": ["data", "voc:voc"], "seed": 0, "init_from": None})  # newer, unset
    with pytest.raises(RunError, match=r"other settings \(init_from differs: absent in the run, \"x\" now\)"):
        RunFolder.check("run", classes, {"data": ["data", "voc:voc"], "seed": 0, "init_from": "x"})


def test_each_process_takes_its_own_slots_of_every_batch():
    from diffumask.segment.data import StepBatches

    ranks = [list(StepBatches(3, 5, 6, rank, 3)) for rank in range(3)]
    for step in range(2):
        slots = [key for rank in ranks for key in rank[step]]
        assert sorted(slots) == [(3 + step, slot) for slot in range(6)]
    with pytest.raises(ConfigError, match="does not split evenly"):
        StepBatches(0, 1, 5, 0, 2)


def test_composite_training_decodes_items_once_keeps_them_read_only_and_within_budget(shapes_data, monkeypatch):
    from diffumask.formats import open_source
    from diffumask.segment import data

    sources = [open_source(str(shapes_data))]
    part = data.open_splits(sources, "train", data.union_classes(sources))[0]
    decoded = []
    read = part.source.read
    monkeypatch.setattr(part.source, "read", lambda item_id: decoded.append(item_id) or read(item_id))
    part.read(0), part.read(0)
    assert decoded == [part.ids[0]] * 2 and not part.cache  # no cache unless training makes composites
    data.TrainingSamples([part], None, 32, (1.0, 1.0), ("mosaic",), 0, 0.5)  # composites turn it on
    first, again = part.read(0), part.read(0)
    assert decoded == [part.ids[0]] * 3 and first[0] is again[0] and first[1] is again[1]
    with pytest.raises(ValueError, match="read-only"):
        first[0][0, 0] = 0  # a sample must never change what later samples read
    part.cache_limit = part.cached_bytes  # full: later items are decoded every time
    part.read(1), part.read(1)
    assert decoded.count(part.ids[1]) == 2 and list(part.cache) == [part.ids[0]]


def test_a_sources_own_classes_stay_distinct_even_when_aliases_join_them(tmp_path):
    from diffumask.formats import open_source
    from diffumask.segment.data import label_lut, union_classes

    (tmp_path / "ADEChallengeData2016" / "images").mkdir(parents=True)
    (tmp_path / "ADEChallengeData2016" / "annotations").mkdir()
    ade = open_source(f"ade20k:{tmp_path}")
    classes = union_classes([ade])
    assert len(classes) == 151 and {"boat", "ship", "plant"} <= set(classes)
    lut = label_lut(ade, classes)
    assert sorted(lut[1:151].tolist()) == list(range(1, 151))


def test_other_settings_on_an_existing_run_are_refused(shapes_data, tmp_path):
    train(TrainConfig(data=[str(shapes_data)], out=str(tmp_path / "run"), steps=2, **FAST), progress=False)
    with pytest.raises(RunError, match=r"other settings \(preset\.schedule\.steps differs: 2 in the run, 3 now\)"):
        train(TrainConfig(data=[str(shapes_data)], out=str(tmp_path / "run"), steps=3, **FAST), progress=False)


def test_a_run_records_its_items_and_refuses_to_resume_on_a_re_cut_list(shapes_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shapes_data, data)
    lists = data / "ImageSets" / "Segmentation"
    ids = (lists / "train.txt").read_text().split()
    (lists / "kept.txt").write_text("\n".join(ids[:16]) + "\n")

    def config() -> TrainConfig:
        return TrainConfig(data=[str(data)], out=str(tmp_path / "run"), split="kept", steps=6, save_every=2, **FAST)

    with pytest.raises(KeyboardInterrupt):
        train(config(), progress=False, on_step=_kill_at(3))
    assert RunFolder(tmp_path / "run").trained_ids() == [ids[:16]]
    (lists / "kept.txt").write_text("\n".join(ids[2:18]) + "\n")  # re-cut (filter --recut) while it was stopped
    with pytest.raises(RunError, match=r"started on other items of .* split 'kept' \(16 items then, 16 now, 4 in one"):
        train(config(), progress=False)
    (lists / "kept.txt").write_text("\n".join(reversed(ids[:16])) + "\n")
    with pytest.raises(RunError, match=r"the same items in another order, which changes every batch"):
        train(config(), progress=False)
    (lists / "kept.txt").write_text("\n".join(ids[:16]) + "\n")
    (tmp_path / "run" / "items.json").unlink()  # as a run started before items.json: what it saw is unknown
    assert train(config(), progress=False).model_dir.is_dir()
    assert RunFolder(tmp_path / "run").trained_ids() is None
    # Killed before its first checkpoint, a run holds nothing its items made: it starts afresh on a re-cut list.
    fresh = dataclasses.replace(config(), out=str(tmp_path / "fresh"), save_every=10)
    with pytest.raises(KeyboardInterrupt):
        train(fresh, progress=False, on_step=_kill_at(3))
    (lists / "kept.txt").write_text("\n".join(ids[2:18]) + "\n")
    assert train(fresh, progress=False).model_dir.is_dir()
    assert RunFolder(tmp_path / "fresh").trained_ids() == [ids[2:18]]


@pytest.mark.parametrize("preset", ["r50", "swin-b"])
def test_paper_presets_build_from_config(preset):
    torch.manual_seed(0)
    segmenter = build_segmenter(get_preset(preset), ["background", "dog", "cat"]).eval()
    params = sum(p.numel() for p in segmenter.parameters()) / 1e6
    assert 40 < params < 120  # R50 Mask2Former has 44 M parameters, Swin-B 107 M
    pixels = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        scores = segmenter.scores(pixels)
    assert scores.shape == (1, 3, 64, 96)
    labels = torch.zeros(1, 64, 96, dtype=torch.long)
    labels[:, 10:30, 20:50] = 1
    labels[:, :4] = 255
    assert torch.isfinite(segmenter.loss(pixels, labels))

    # Mask2Former's optimizer: the backbone at lr x 0.1; norms and embeddings without weight decay
    schedule = get_preset(preset).schedule
    groups = segmenter.parameter_groups(schedule.lr, schedule.backbone_lr_mult, schedule.weight_decay,
                                        schedule.weight_decay_norm, schedule.weight_decay_embed)
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(segmenter.model.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(by_param) == len(named)  # each parameter in one group
    exempt = {torch.nn.BatchNorm2d, torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.Embedding}
    expected_exempt = sum(p.numel() for m in segmenter.model.modules() if type(m) in exempt
                          for p in m.parameters(recurse=False))
    expected_exempt += sum(p.numel() for n, p in named.items() if n.endswith("relative_position_bias_table"))
    assert sum(p.numel() for n, p in named.items() if by_param[id(p)][1] == 0) == expected_exempt
    backbone = "model.pixel_level_module.encoder."
    first_norm = {"r50": "embedder.embedder.normalization.weight", "swin-b": "swin.embeddings.norm.weight"}[preset]
    assert by_param[id(named[backbone + first_norm])] == (1e-5, 0.0)
    backbone_weight = next(p for n, p in named.items() if n.startswith(backbone) and p.ndim == 4)  # a conv
    assert by_param[id(backbone_weight)] == (1e-5, 0.05)
    for name, expected in (("model.transformer_module.queries_features.weight", (1e-4, 0.0)),
                           ("model.transformer_module.level_embed.weight", (1e-4, 0.0)),
                           ("model.pixel_level_module.decoder.level_embed", (1e-4, 0.05)),  # decayed, as there
                           ("model.transformer_module.decoder.layers.0.self_attn_layer_norm.bias", (1e-4, 0.0)),
                           ("model.transformer_module.decoder.layers.0.cross_attn.in_proj_weight", (1e-4, 0.05))):
        assert by_param[id(named[name])] == pytest.approx(expected), name
    if preset == "swin-b":
        table = next(p for n, p in named.items() if n.endswith("relative_position_bias_table"))
        assert by_param[id(table)] == (1e-5, 0.0)


def test_weight_decay_groups_are_the_presets_and_the_tiny_runs_keep_theirs(shapes_data, tmp_path, monkeypatch):
    """The tiny presets decay every parameter alike, in the two groups of before (so their runs' settings and
    optimizer states are unchanged); any preset can take Mask2Former's exemptions, and the run records them."""
    tiny = get_preset("tiny")
    assert "weight_decay_norm" not in tiny.as_dict()["schedule"]
    assert get_preset("r50").as_dict()["schedule"]["weight_decay_norm"] == 0.0
    segmenter = build_segmenter(tiny, ["background", *CLASSES])
    groups = segmenter.parameter_groups(1e-3, 0.5, 0.01)
    backbone = [p for n, p in segmenter.model.named_parameters() if n.startswith("segformer.")]
    rest = [p for n, p in segmenter.model.named_parameters() if not n.startswith("segformer.")]
    assert [(g["lr"], g["weight_decay"], g["params"]) for g in groups] == [(5e-4, 0.01, backbone), (1e-3, 0.01, rest)]

    seen = []
    real_adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda groups: seen.append(groups) or real_adamw(groups))
    train(TrainConfig(data=[str(shapes_data)], out=str(tmp_path / "plain"), preset="tiny-mask2former", steps=1, **FAST),
          progress=False)
    assert [g["weight_decay"] for g in seen[-1]] == [0.05, 0.05]  # backbone and the rest, as before
    run = train(TrainConfig(data=[str(shapes_data)], out=str(tmp_path / "run"), preset="tiny-mask2former", steps=2,
                            extra={"weight_decay_norm": 0.0, "weight_decay_embed": 0.001}, **FAST), progress=False)
    decays = {g["weight_decay"] for g in seen[-1]}
    assert decays == {0.0, 0.001, 0.05}  # norms, embeddings (queries, Swin's tables), the rest
    schedule = json.loads((run.root / "settings.json").read_text())["preset"]["schedule"]
    assert (schedule["weight_decay_norm"], schedule["weight_decay_embed"]) == (0.0, 0.001)
    with pytest.raises(ConfigError, match="weight_decay_norm must be 0 or more"):
        TrainConfig(data=[str(shapes_data)], out=str(tmp_path / "x"), extra={"weight_decay_norm": -1.0}).resolved_preset()


def test_mask2former_targets_and_scores_match_transformers():
    from transformers import Mask2FormerImageProcessorPil

    labels = np.zeros((2, 16, 16), np.int64)
    labels[0, 2:8, 3:9] = 2
    labels[0, 10:, :] = 255
    labels[1, :, 8:] = 1
    processor = Mask2FormerImageProcessorPil(do_resize=False, do_rescale=False, do_normalize=False, ignore_index=255,
                                             num_labels=3)
    images = [np.zeros((3, 16, 16), np.float32)] * 2
    reference = processor(images=images, segmentation_maps=list(labels.astype(np.uint8)), return_tensors="pt",
                          input_data_format="channels_first")
    masks, classes = semantic_to_mask_labels(torch.from_numpy(labels))
    for ours, theirs, our_classes, their_classes in zip(masks, reference["mask_labels"], classes,
                                                         reference["class_labels"]):
        order = torch.argsort(their_classes)
        torch.testing.assert_close(our_classes, their_classes[order])
        torch.testing.assert_close(ours, theirs[order].float())

    torch.manual_seed(0)
    segmenter = build_segmenter(get_preset("tiny-mask2former"), ["background", "a", "b"]).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = segmenter.scores(pixels).argmax(dim=1)
        outputs = segmenter.model(pixel_values=pixels)
    theirs = processor.post_process_semantic_segmentation(outputs, target_sizes=[(32, 32)] * 2)
    for mine, reference_map in zip(ours, theirs):
        assert (mine == reference_map).float().mean() > 0.99  # bilinear order of operations differs at edges


def test_init_from_a_backbone_folder(shapes_data, tmp_path):
    from transformers import SwinBackbone, SwinConfig

    preset = get_preset("tiny-mask2former")
    backbone_kwargs = {k: v for k, v in preset.backbone.items() if k != "model_type"}
    torch.manual_seed(1)
    pretrained = SwinBackbone(SwinConfig(**backbone_kwargs))
    pretrained.save_pretrained(tmp_path / "swin")
    segmenter = build_segmenter(preset, ["background", "a"])
    counts = init_from(segmenter, str(tmp_path / "swin"))
    assert counts["loaded"] > 10
    encoder = segmenter.model.model.pixel_level_module.encoder.state_dict()
    for key, value in pretrained.state_dict().items():
        torch.testing.assert_close(encoder[key], value)
    with pytest.raises(ConfigError, match="not a transformers model"):
        init_from(segmenter, str(tmp_path))
    run = tmp_path / "run"  # a bad source is refused before the run folder exists, so the fixed command is not
    config = TrainConfig(data=[str(shapes_data)], out=str(run), preset="tiny-mask2former", steps=1, **FAST)
    with pytest.raises(ConfigError, match="not a transformers model"):
        train(dataclasses.replace(config, init_from=str(tmp_path / "nothing")), progress=False)
    assert not run.exists()
    trained = train(dataclasses.replace(config, init_from=str(tmp_path / "swin")), progress=False)
    assert trained.settings["init_from"] == str(tmp_path / "swin") and trained.model_dir.is_dir()


def test_api_errors(shapes_data, tmp_path):
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("resnet9000")
    with pytest.raises(SourceError, match="no split 'nope'.*test, train"):
        train(TrainConfig(data=[str(shapes_data)], out=str(tmp_path / "r"), split="nope", **FAST), progress=False)
    for weights in ([1, 1], [float("nan")], [float("inf")]):
        with pytest.raises(ConfigError, match="one finite, non-negative weight per DATA"):
            train(TrainConfig(data=[str(shapes_data)], out=str(tmp_path / "r"), weights=weights, **FAST), progress=False)
    assert not (tmp_path / "r").exists()


def test_each_data_can_take_its_own_split(shapes_data, tmp_path):
    """What filter kept of a synthetic set beside a real set's split: --split filtered,test."""
    from diffumask.formats import open_source
    from diffumask.segment.data import open_splits

    kept = tmp_path / "kept"
    shutil.copytree(shapes_data, kept)
    chosen = (kept / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[:4]
    (kept / "ImageSets" / "Segmentation" / "filtered.txt").write_text("".join(f"{i}\n" for i in chosen))
    sources = [open_source(str(kept)), open_source(str(shapes_data))]
    classes = ["background", *CLASSES]
    first, second = open_splits(sources, "filtered,test", classes)
    assert first.ids == chosen and second.ids == sources[1].ids("test")
    assert [len(part.ids) for part in open_splits(sources, "train", classes)] == [24, 24]  # one name: every DATA
    for bad in ("filtered,test,train", "filtered,"):
        with pytest.raises(ConfigError, match="one split for every DATA, or one per DATA"):
            open_splits(sources, bad, classes)
    run = train(TrainConfig(data=[str(kept), str(shapes_data)], out=str(tmp_path / "run"), split="filtered,test",
                            steps=1, **FAST), progress=False)
    assert run.settings["split"] == "filtered,test" and run.model_dir.is_dir()


def test_training_on_a_dataset_not_yet_whole_warns(shapes_data, tmp_path):
    """train read a dataset being written (or a stopped run's) without a word, as export and report did not: it
    trained on the items finished so far. Filter's folds train on the dataset filter itself is writing: silent."""
    from diffumask.dataset import Dataset

    data = tmp_path / "data"
    shutil.copytree(shapes_data, data)
    config = TrainConfig(data=[str(data)], out=str(tmp_path / "run"), steps=1, **FAST)
    with Dataset(data).writing():
        with pytest.warns(UserWarning, match=rf"^{data} is not finished: a diffumask command .* is writing it now"):
            train(config, progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            train(dataclasses.replace(config, out=str(tmp_path / "fold")), progress=False, warn_unfinished=False)


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffumask: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_cli_bad_input_is_one_line(shapes_data, tmp_path, capsys):
    from diffumask.dataset import Dataset

    empty = Dataset.create(tmp_path / "empty", ["circle"], {"source": "test"})
    assert "holds no items yet" in _cli_error(["train", str(tmp_path / "empty"), "--out",
                                                                 str(tmp_path / "r1"), "--quiet"], capsys)
    empty.write_item("item_0000", np.zeros((8, 8, 3), np.uint8), {"classes": []}, mask=np.zeros((8, 8), np.uint8))
    assert ("holds 1 finished item(s) but no split lists yet (ImageSets/Segmentation): the command that made it stopped "
            "before its end; re-run it to finish") in _cli_error(  # a killed generate: not "no items"
        ["train", str(tmp_path / "empty"), "--out", str(tmp_path / "r1"), "--quiet"], capsys)
    assert "no split 'val'" in _cli_error(["train", str(shapes_data), "--split", "val", "--out", str(tmp_path / "r2"),
                                           "--quiet"], capsys)
    if not torch.cuda.is_available():
        assert "no usable CUDA device" in _cli_error(["train", str(shapes_data), "--out", str(tmp_path / "r3"),
                                               "--device", "cuda", "--quiet"], capsys)
    assert "--steps must be at least 1" in _cli_error(["train", str(shapes_data), "--out", str(tmp_path / "r4"),
                                                       "--steps", "0", "--quiet"], capsys)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(shapes_data), "--out", str(tmp_path / "r5"), "--preset", "huge"])
    assert exit_info.value.code == 2 and "invalid choice: 'huge'" in capsys.readouterr().err
    assert "not a training run" in _cli_error(["evaluate", str(tmp_path), str(shapes_data)], capsys)
    assert "--json" in _cli_error(["evaluate", str(tmp_path), str(shapes_data), "--json", str(tmp_path)], capsys)
    assert "is not a cityscapes folder: it has no gtFine, leftImg8bit" in _cli_error(
        ["train", f"cityscapes:{shapes_data}", "--out", str(tmp_path / "r6")], capsys)

    assert main(["train", str(shapes_data), "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2",
                 "--crop", "32", "--workers", "0", "--quiet"]) == 0
    capsys.readouterr()
    voc = tmp_path / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "SegmentationClass").mkdir()
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    assert "none in common" in _cli_error(["evaluate", str(tmp_path / "run"), f"voc:{voc}", "--quiet"], capsys)
    assert main(["predict", str(tmp_path / "run"), str(shapes_data), "--out", str(tmp_path / "pred"), "--quiet"]) == 0
    (tmp_path / "pred" / "val" / "city").mkdir(parents=True)  # ids with folders (Cityscapes'): a re-run resumes
    assert main(["predict", str(tmp_path / "run"), str(shapes_data), "--out", str(tmp_path / "pred"), "--quiet"]) == 0
    assert main(["train", str(shapes_data), "--out", str(tmp_path / "run2"), "--steps", "1", "--batch-size", "2",
                 "--crop", "32", "--workers", "0", "--seed", "1", "--quiet"]) == 0
    capsys.readouterr()  # another run of the same classes into the same --out: nothing would be predicted
    assert f"holds predictions of another run ({tmp_path / 'run'})" in _cli_error(
        ["predict", str(tmp_path / "run2"), str(shapes_data), "--out", str(tmp_path / "pred"), "--quiet"], capsys)
    untrained = tmp_path / "untrained"  # a run with no weights yet: refused, and nothing recorded in --out
    shutil.copytree(tmp_path / "run2", untrained, ignore=shutil.ignore_patterns("model", "checkpoint.pt"))
    assert "has no trained model or checkpoint yet" in _cli_error(
        ["predict", str(untrained), str(shapes_data), "--out", str(tmp_path / "pred3"), "--quiet"], capsys)
    assert not (tmp_path / "pred3" / "predicted_by.json").exists()
    shutil.copytree(tmp_path / "run2" / "model", untrained / "model")  # trained since: predicts there
    assert main(["predict", str(untrained), str(shapes_data), "--out", str(tmp_path / "pred3"), "--quiet"]) == 0
    shutil.copy(tmp_path / "run2" / "model" / "model.safetensors", tmp_path / "run" / "model" / "model.safetensors")
    assert "holds predictions of this run as it was before (it trained on since)" in _cli_error(
        ["predict", str(tmp_path / "run"), str(shapes_data), "--out", str(tmp_path / "pred"), "--quiet"], capsys)
    (tmp_path / "pred" / "classes.json").write_text((tmp_path / "run" / "classes.json").read_text()
                                                   .replace("circle", "dog"))
    assert "predictions of other classes" in _cli_error(["predict", str(tmp_path / "run"), str(shapes_data), "--out",
                                                         str(tmp_path / "pred"), "--quiet"], capsys)
    assert "holds dataset.json, so it is a dataset or a run" in _cli_error(
        ["predict", str(tmp_path / "run"), str(shapes_data), "--out", str(shapes_data), "--quiet"], capsys)

    damaged = tmp_path / "damaged"  # a truncated image, read in a DataLoader worker: named, in one line
    shutil.copytree(shapes_data, damaged)
    first = (damaged / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[0]
    image = next((damaged / "JPEGImages").glob(f"{first}.*"))
    image.write_bytes(image.read_bytes()[:100])
    for command in (["train", str(damaged), "--out", str(tmp_path / "r7"), "--steps", "2", "--batch-size", "24",
                     "--crop", "32", "--workers", "1", "--quiet"], ["report", str(damaged), "--out",
                                                                    str(tmp_path / "report.html"), "--quiet"]):
        assert f"{image} cannot be read" in _cli_error(command, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "tiny-mask2former"])
def test_two_processes_under_torchrun(shapes_data, tmp_path, preset):
    """Data-parallel training through accelerate: torchrun on CPU (gloo), each rank half of every batch."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "diffumask", "train",
               str(shapes_data), "--out", str(tmp_path / "run"), "--steps", "3", "--batch-size", "4", "--crop", "32",
               "--workers", "0", "--preset", preset, "--quiet"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("trained ") == 1  # one process reports
    assert "Grad strides" not in done.stderr  # tiny's depthwise convs: four lines per rank before
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert [e["step"] for e in RunFolder(tmp_path / "run").log_entries()] == [3]


def test_only_ddps_stride_warning_about_a_size_one_dimension_is_silenced():
    """The warning torch 2.13's DDP gives for tiny's depthwise convs, word for word, and the same warning where a
    stride that matters differs (a real layout change: left to be seen)."""
    import warnings

    from diffumask.segment.train import SIZE_ONE_STRIDE_WARNING

    head = ("Grad strides do not match bucket view strides. This may indicate grad was not created according to "
            "the gradient layout contract, or that the param's strides changed since DDP was constructed.  This is "
            "not an error, but may impair performance.\n")
    tail = " (Triggered internally at /__w/pytorch/pytorch/torch/csrc/distributed/c10d/reducer.cpp:335.)"
    depthwise = (head + "grad.sizes() = [640, 1, 3, 3], strides() = [9, 1, 3, 1]\n"
                 "bucket_view.sizes() = [640, 1, 3, 3], strides() = [9, 9, 3, 1]" + tail)
    transposed = (head + "grad.sizes() = [640, 1, 3, 3], strides() = [1, 1, 1920, 640]\n"
                  "bucket_view.sizes() = [640, 1, 3, 3], strides() = [9, 9, 3, 1]" + tail)
    dense = (head + "grad.sizes() = [64, 32, 3, 3], strides() = [288, 1, 96, 32]\n"
             "bucket_view.sizes() = [64, 32, 3, 3], strides() = [288, 9, 3, 1]" + tail)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=SIZE_ONE_STRIDE_WARNING, category=UserWarning)
        for message in (depthwise, transposed, dense):
            warnings.warn(message, UserWarning)
    assert [str(w.message) for w in seen] == [transposed, dense]


@pytest.mark.parametrize("opened_before", [False, True])
def test_a_command_closes_the_process_group_it_opened(tmp_path, monkeypatch, opened_before):
    """A rank's process group (opened by accelerate in train and filter) is closed when the command ends, so
    no gloo thread outlives the interpreter; a group the caller opened before is left to the caller."""
    import diffumask.cli as cli
    import torch.distributed as dist

    def open_group(store_file: Path) -> None:
        dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=0, world_size=1)

    def train_in_a_group(args) -> None:
        if not dist.is_initialized():
            open_group(tmp_path / "store")
        dist.barrier()

    monkeypatch.setattr(cli, "_run_train", train_in_a_group)
    if opened_before:
        open_group(tmp_path / "caller-store")
    try:
        assert main(["train", str(tmp_path), "--out", str(tmp_path / "run")]) == 0
        assert dist.is_initialized() == opened_before
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _one_class_dataset(root: Path, name: str, n: int = 6):
    """Scenes of the shapes world with only their first object kept, labelled ``name``."""
    from diffumask.dataset import Dataset
    from diffumask.shapes.world import render_scene

    dataset = Dataset.create(root, [name], {"source": "test"}, image_format="png")
    for k in range(n):
        scene = render_scene(500 + k, 32, num_objects=1)
        dataset.write_item(f"{name}_{k}", scene.image, {"classes": [name], "prompt": scene.caption},
                           mask=(scene.mask > 0).astype(np.uint8), split="train")
    dataset.finalize()
    return dataset


def test_negatives_teach_what_a_one_class_run_is_not(tmp_path):
    """A negatives dataset's pixels of the run's class keep it, its other classes become background, 255 stays;
    its classes are not the run's."""
    from diffumask.formats import open_source
    from diffumask.segment.data import open_splits
    from dataset_factory import make_dataset

    dogs = _one_class_dataset(tmp_path / "dogs", "dog")
    others = make_dataset(tmp_path / "others", n=8, splits=("train",))  # car, person, road, sky, dog, tree
    source = open_source(str(others.root))
    [part] = open_splits([source], "train", ["background", "dog"], negatives=True)
    for index, item in enumerate(part.ids):
        _, raw = source.read(item)
        _, labels = part.read(index)
        dog_value = next(v for v, n in source.label_names.items() if n == "dog")
        assert np.array_equal(labels == 1, raw == dog_value)
        assert np.array_equal(labels == 255, raw == 255)
        assert set(np.unique(labels)) <= {0, 1, 255}
    run = train(TrainConfig(data=[str(dogs.root)], negatives=[str(others.root)], out=str(tmp_path / "run"), steps=2,
                            **FAST), progress=False)
    assert read_label_map(run.root) == ["background", "dog"]
    assert json.loads((run.root / "settings.json").read_text())["negatives"] == [str(others.root)]
    with pytest.raises(ConfigError, match="--negatives"):
        train(TrainConfig(data=[str(dogs.root)], negatives=[str(others.root)], weights=[1.0],
                          out=str(tmp_path / "run2"), steps=2, **FAST), progress=False)


class _Failing(torch.utils.data.Dataset):
    def __init__(self, error: BaseException):
        self.error = error

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        raise self.error


def test_an_error_from_a_dataloader_worker_prints_as_its_own_message():
    """torch re-raises a worker's error in the parent with the worker's traceback as its text."""
    from diffumask.errors import DiffumaskError, UnreadableFile, one_line

    for error in (UnreadableFile("a.png cannot be read (truncated); replace it"),
                  DiffumaskError("line one\nline two: detail"), FileNotFoundError("no such file: x.png")):
        with pytest.raises(type(error)) as raised:
            next(iter(torch.utils.data.DataLoader(_Failing(error), num_workers=1)))
        assert "Traceback" in str(raised.value) and one_line(raised.value) == str(error)
    assert one_line(ValueError("plain")) == "plain"


def test_sigterm_to_the_command_and_its_loader_workers_stops_train_as_ctrl_c_does(shapes_data, tmp_path):
    """``timeout``, ``scancel`` and launchers signal every process of the job, the loader's workers too; killed by
    SIGTERM, a worker made torch raise "DataLoader worker ... is killed by signal" over train's clean stop."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    command = [sys.executable, "-m", "diffumask", "train", str(shapes_data), "--steps", "100000", "--batch-size", "4",
               "--crop", "32", "--workers", "2", "--out", str(out), "--quiet"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        log = out / "train_log.jsonl"  # written empty at the start, its first entry after 10 steps
        while not (log.exists() and log.stat().st_size) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # the loader's workers are at work
        os.killpg(process.pid, signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert err == "diffumask: terminated; the last checkpoint is kept, re-run the same command to resume\n"
    assert process.returncode == 143


def _a_while(worker_id: int) -> None:
    time.sleep(1.0)  # the moment between a worker's fork and its SIGTERM handler, made long


@pytest.mark.parametrize("when", ["before its handler", "twice"])
def test_a_loader_worker_signalled_by_another_process_ends_quietly(when):
    """A worker killed by SIGTERM, or one whose own exit a second SIGTERM interrupted, made torch raise in the parent
    over the command's clean stop. Signalled by another process (``timeout``, ``scancel``), before the handler is in
    place (torch's own lets a worker die by a SIGTERM that is not its parent's) or twice at once (as a ``timeout``
    inside a job relays the job's), it ends with 0."""
    import subprocess

    from diffumask.workers import start_loader

    setup = _a_while if when == "before its handler" else None
    for _ in range(1 if when == "before its handler" else 20):  # two at once hit the worker's exit now and then
        batches = start_loader(torch.utils.data.DataLoader(range(64), num_workers=1, worker_init_fn=setup))
        worker = batches._workers[0]
        if when == "twice":
            next(batches)  # at work, its handler in place
        subprocess.run(["sh", "-c", f"kill -TERM {worker.pid}; kill -TERM {worker.pid} 2>/dev/null"], check=True)
        worker.join(30)
        assert worker.exitcode == 0
        del batches
