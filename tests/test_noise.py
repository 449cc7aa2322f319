"""Noise learning: folds, held-out predictions, scores against torchmetrics, per-class pruning and its
summary, a re-cut without training, resume, bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from dataset_factory import make_dataset
from torchmetrics.classification import MulticlassJaccardIndex

from diffumask import noise
from diffumask.cli import main
from diffumask.dataset import Dataset
from diffumask.errors import ConfigError, DiffumaskError
from diffumask.noise import FilterConfig, assign_folds, filter_dataset, item_score
from diffumask.refine import RefineConfig, refine_dataset
from diffumask.segment.run import RunFolder
from diffumask.segment.train import TrainConfig
from diffumask.validate import validate_dataset

FAST = dict(steps=3, batch_size=4, crop=32, workers=0, device="cpu")


def records(n: int, classes=("a", "b", "c")) -> list[dict]:
    return [{"id": f"{classes[k % len(classes)]}_{k:04d}", "classes": [classes[k % len(classes)]]} for k in range(n)]


def test_folds_are_disjoint_cover_every_item_and_hold_every_class():
    items = records(31)
    folds = assign_folds(items, 3, seed=0)
    assert set(folds) == {r["id"] for r in items} and set(folds.values()) == {0, 1, 2}
    for name in "abc":
        counts = np.bincount([folds[r["id"]] for r in items if r["classes"][0] == name], minlength=3)
        assert counts.max() - counts.min() <= 1  # stratified
    assert assign_folds(items, 3, seed=0) == folds and assign_folds(items, 3, seed=1) != folds


def test_item_score_is_torchmetrics_iou_over_the_items_classes():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.integers(0, 4, (24, 24)).astype(np.uint8)
        mask[rng.random((24, 24)) < 0.1] = 255
        prediction = np.where(rng.random((24, 24)) < 0.7, mask, rng.integers(0, 4, (24, 24))).astype(np.uint8)
        prediction[prediction == 255] = 0
        labels = sorted(rng.choice([1, 2, 3], size=int(rng.integers(1, 4)), replace=False).tolist())
        metric = MulticlassJaccardIndex(num_classes=4, average=None, ignore_index=255)
        per_class = metric(torch.from_numpy(prediction).long(), torch.from_numpy(mask).long()).numpy()
        present = [c for c in labels if ((prediction == c) | (mask == c))[mask != 255].any()]
        assert item_score(prediction, mask, labels) == pytest.approx(np.mean(per_class[present]), abs=1e-6)


def config(root, **changes) -> FilterConfig:
    values = dict(dataset=str(root), training=TrainConfig(data=[], out="", **FAST), folds=3, prune=0.5)
    return FilterConfig(**{**values, **changes})


def test_filter_cross_validates_prunes_per_class_and_recuts_without_training(tmp_path, monkeypatch, capsys):
    dataset = make_dataset(tmp_path / "data", n=15, size=32, soft_maps=False, splits=("train",))
    result = filter_dataset(config(dataset.root), progress=False)
    assert result.trained_folds == 3
    items = Dataset(dataset.root).records()
    assignment = json.loads((dataset.root / "noise" / "settings.json").read_text())["assignment"]
    for record in items:  # every prediction came from the fold model that did not train on the item
        fold = record["noise"]["fold"]
        assert assignment[record["id"]] == fold
        [trained_on] = RunFolder(dataset.root / "noise" / f"fold-{fold}" / "run").trained_ids()
        assert record["id"] not in trained_on
        assert sorted(trained_on) == sorted(i for i, f in assignment.items() if f != fold)  # all the other folds
        assert 0 <= record["noise"]["score"] <= 1
    by_class: dict[str, list[dict]] = {}
    for record in items:
        by_class.setdefault(record["classes"][0], []).append(record)
    kept = set(result.kept)
    assert kept == set(dataset.root.joinpath("ImageSets/Segmentation/filtered.txt").read_text().split())
    for members in by_class.values():  # the worst half of each class is gone, the rest stays
        ranked = sorted(members, key=lambda r: (r["noise"]["score"], r["id"]))
        cut = len(ranked) // 2
        assert {r["id"] for r in ranked[:cut]}.isdisjoint(kept) and {r["id"] for r in ranked[cut:]} <= kept
    assert validate_dataset(dataset.root)[0] == []
    assert {p.stem for p in dataset.root.glob("ImageSets/Segmentation/*.txt")} == {"train", "filtered"}  # no fold lists
    summary = {}  # each class's cut, as the CLI prints it, from the manifest's scores and the kept ids
    for name, members in by_class.items():
        high = [r["noise"]["score"] for r in members if r["id"] in kept]
        low = [r["noise"]["score"] for r in members if r["id"] not in kept]
        summary[name] = (len(high), len(low), 0, min(high), statistics.median(high),
                         statistics.median(low) if low else None)  # a class of one item keeps it
        assert dataclasses.astuple(result.classes[name]) == pytest.approx(summary[name])
    assert set(result.classes) == set(by_class)
    capsys.readouterr()
    assert main(["filter", str(dataset.root), "--prune", "0.5", "--recut", "--name", "again", "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"kept {len(kept)} of {len(items)} items ({len(items) - len(kept)} pruned by score, 0 by area)")
    table = out[1:-1]
    assert len({len(line) for line in table}) == 1  # the columns line up under the header
    printed = {line.split()[0]: line.split()[1:] for line in table[1:]}
    assert printed == {name: [str(v) for v in values[:3]] + [f"{v:.3f}" if v is not None else "-" for v in values[3:]]
                       for name, values in summary.items()}
    assert main(["filter", str(dataset.root), "--recut", "--max-area", "1e-6", "--name", "none", "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"kept 0 of {len(items)} items (0 pruned by score, {len(items)} by area)")
    printed = {line.split()[0]: line.split()[1:] for line in out[2:-1]}
    assert printed == {name: ["0", "0", str(len(members)), "-", "-", "-"] for name, members in by_class.items()}

    def no_training(*args, **kwargs):
        raise AssertionError("a re-cut trained")

    monkeypatch.setattr(noise, "train", no_training)
    recut = filter_dataset(config(dataset.root, prune=0.0, name="all"), progress=False, recut=True)
    assert sorted(recut.kept) == sorted(r["id"] for r in items) and recut.trained_folds == 0
    assert filter_dataset(config(dataset.root), progress=False).kept == result.kept  # finished folds: no training


def test_a_killed_filter_keeps_its_finished_folds(tmp_path, monkeypatch):
    dataset = make_dataset(tmp_path / "data", n=9, size=32, soft_maps=False, splits=("train",))
    first = filter_dataset(config(dataset.root), progress=False)
    scores = json.loads((dataset.root / "noise" / "fold-1" / "scores.json").read_text())
    (dataset.root / "noise" / "fold-1" / "scores.json").unlink()  # as if killed before fold 1 was scored
    shutil.rmtree(dataset.root / "noise" / "fold-1" / "run" / "model", ignore_errors=True)
    leftovers = [dataset.root / "noise" / "fold-1" / ".scores.json.a1.tmp", dataset.root / "noise" / ".settings.json.b2.tmp",
                 dataset.root / "ImageSets" / "Segmentation" / f".{noise.SPLIT_PREFIX}1.txt.c3.tmp",
                 dataset.root / "noise" / "fold-1" / "run" / ".checkpoint.pt.d4.tmp"]  # what the kill's writes left
    # (filter's own files, and the fold's training run's checkpoint, which train removes as it reopens the run)
    for path in leftovers:
        path.write_text("partial")
        os.utime(path, (time.time() - 60,) * 2)
    left_at_broadcast: list[list[Path]] = []
    broadcast = noise._finished_folds

    def watched(*args, **kwargs):  # once it returns, a sharded run's other workers write temporaries of their own,
        left_at_broadcast.append([p for p in leftovers[:3] if p.exists()])  # which a clock skewed between nodes
        return broadcast(*args, **kwargs)  # (NFS's mtime is the server's) could make look older than this job

    monkeypatch.setattr(noise, "_finished_folds", watched)
    again = filter_dataset(config(dataset.root), progress=False)
    assert left_at_broadcast == [[]], "the first worker tidies before the others may write"
    assert again.trained_folds == 1 and again.kept == first.kept
    assert json.loads((dataset.root / "noise" / "fold-1" / "scores.json").read_text()) == scores
    assert not [path for path in leftovers if path.exists()] and validate_dataset(dataset.root) == ([], 9)


@pytest.mark.slow
def test_filter_under_torchrun_trains_together_scores_shares_and_reports_once(tmp_path):
    """Two CPU workers train each fold together, each scores half of its held-out items, and the first writes and
    reports: every item's recorded score is the one its fold's model gives it, one table, no fold lists left."""
    import os
    import subprocess
    import sys

    from diffumask.formats import open_source
    from diffumask.segment.data import label_lut
    from diffumask.segment.predict import iter_predictions

    dataset = make_dataset(tmp_path / "data", n=12, size=32, soft_maps=False, splits=("train",))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "diffumask",
               "filter", str(dataset.root), "--folds", "2", "--prune", "0.5", "--steps", "2", "--batch-size", "4",
               "--crop", "32", "--workers", "0", "--device", "cpu", "--quiet"]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [line.split()[0] for line in done.stdout.splitlines()].count("kept") == 1, done.stdout  # one report
    items = Dataset(dataset.root).records()
    source = open_source(str(dataset.root))
    for fold in range(2):  # each fold's scores, recomputed here from its model: the gathered shares in their places
        run = RunFolder(dataset.root / "noise" / f"fold-{fold}" / "run")
        held_out = [r for r in items if r["noise"]["fold"] == fold]
        [trained_on] = run.trained_ids()
        assert held_out and not {r["id"] for r in held_out} & set(trained_on)
        lut = label_lut(source, run.classes)
        by_id = {r["id"]: r for r in held_out}
        for item_id, prediction, truth in iter_predictions(run, source, split="", device="cpu", progress=False,
                                                           ids=list(by_id)):
            labels = [run.classes.index(c) for c in by_id[item_id]["classes"]]
            assert by_id[item_id]["noise"]["score"] == pytest.approx(item_score(prediction, lut[truth], labels),
                                                                     abs=1e-6)
    sizes = Counter(noise.primary_class(r) for r in items)
    assert len(Dataset(dataset.root).split_ids("filtered")) == sum(n - n // 2 for n in sizes.values())
    assert {p.stem for p in dataset.root.glob("ImageSets/Segmentation/*.txt")} == {"train", "filtered"}
    assert validate_dataset(dataset.root)[0] == []
    scores = (dataset.root / "noise" / "fold-1" / "scores.json").read_bytes()
    (dataset.root / "noise" / "fold-1" / "scores.json").unlink()  # killed after fold 1's model, before its scores
    again = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                           timeout=300)  # fold 0 as the first worker read it, fold 1 scored again by both
    assert again.returncode == 0, again.stderr[-2000:]
    assert (dataset.root / "noise" / "fold-1" / "scores.json").read_bytes() == scores
    assert Dataset(dataset.root).records() == items


def test_a_worker_scores_its_share_on_its_own_gpu_and_leaves_the_writing_to_the_first(tmp_path, monkeypatch):
    """Worker 1 of 2 on a 2-GPU node (the group and its collectives stood in for): it predicts every second
    held-out item on cuda:1, takes the other worker's share from the gather, writes nothing; a share that failed
    elsewhere fails here in one sentence that names the worker."""
    import accelerate

    dataset = make_dataset(tmp_path / "data", n=8, size=32, soft_maps=False, splits=("train",))
    before = {p: p.read_bytes() for p in dataset.root.rglob("*") if p.is_file()}
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(accelerate, "PartialState", lambda cpu: None)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", lambda shared, src: shared.__setitem__(0, {}))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(noise, "pick_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(noise, "train", lambda config, progress, warn_unfinished: RunFolder.__new__(RunFolder))
    monkeypatch.setattr(RunFolder, "classes", ["background", *Dataset(dataset.root).classes], raising=False)
    asked = []

    def predictions(run, source, split, device, ids, progress):
        asked.append((device, ids))
        for item_id in ids:
            yield item_id, source.read(item_id)[1], source.read(item_id)[1]  # a perfect prediction: score 1

    monkeypatch.setattr(noise, "iter_predictions", predictions)
    assignment = assign_folds(Dataset(dataset.root).records(), 2, 0)
    held_out = {fold: [r["id"] for r in Dataset(dataset.root).records() if assignment[r["id"]] == fold]
                for fold in range(2)}
    monkeypatch.setattr(noise, "_gather", lambda worker, mine: [({i: 0.0 for i in held_out[len(asked) - 1][0::2]},
                                                                  None), mine])
    trained, updates = noise._train_folds(Dataset(dataset.root), config(dataset.root, folds=2), progress=False)
    assert asked == [("cuda:1", held_out[0][1::2]), ("cuda:1", held_out[1][1::2])]
    assert trained == 2 and {i: (u["noise"]["fold"], u["noise"]["score"]) for i, u in updates.items()} == {
        i: (fold, 1.0 if i in held_out[fold][1::2] else 0.0) for fold in range(2) for i in held_out[fold]}
    asked.clear()
    assert filter_dataset(config(dataset.root, folds=2), progress=False).kept  # the cut, as the first worker's
    assert {p: p.read_bytes() for p in dataset.root.rglob("*") if p.is_file() and "noise-train" not in p.name} == before
    monkeypatch.setattr(noise, "_gather", lambda worker, mine: [(None, "CUDA out of memory"), mine])
    with pytest.raises(DiffumaskError, match=r"^worker 0 of 2 failed to score fold 0's held-out items: CUDA out of "
                                             r"memory$"):
        filter_dataset(config(dataset.root, folds=2), progress=False)


@pytest.mark.parametrize("variables", [dict(SLURM_PROCID="0", SLURM_STEP_NUM_TASKS="2"),
                                       dict(RANK="0", WORLD_SIZE="2")])
def test_train_and_filter_refuse_workers_that_cannot_form_a_group(tmp_path, monkeypatch, capsys, variables):
    """srun alone (or RANK/WORLD_SIZE without torchrun's LOCAL_RANK) starts workers accelerate does not join: each
    would train alone into the same run folder; refused in one line before anything is written."""
    dataset = make_dataset(tmp_path / "data", n=4, size=32, soft_maps=False, splits=("train",))
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    for command in (["train", str(dataset.root), "--out", str(tmp_path / "run")], ["filter", str(dataset.root)]):
        assert main(command) == 2
        assert capsys.readouterr().err == (
            f"diffumask: error: {command[0]} trains across its 2 workers through torch.distributed, which needs RANK, "
            "WORLD_SIZE and LOCAL_RANK: launch it with torchrun or accelerate launch (under Slurm: srun torchrun …, "
            "one task per node)\n")
    assert not (tmp_path / "run").exists() and not (dataset.root / "noise").exists()


def test_scores_belong_to_the_masks_they_were_scored_on(tmp_path):
    """A mask changed after filter (by hand or by refine) makes its score stale: a re-cut and the finished
    folds are refused, and refine drops the scores of the items it rewrites."""
    dataset = make_dataset(tmp_path / "data", n=9, size=32, splits=("train",))
    filter_dataset(config(dataset.root), progress=False)
    filter_dataset(config(dataset.root, prune=0.3, name="other"), progress=False, recut=True)
    kept = filter_dataset(config(dataset.root), progress=False, recut=True).kept
    (dataset.root / "ImageSets" / "Segmentation" / "mine.txt").write_text(f"{kept[0]}\n")  # a list of the user's
    record = next(r for r in Dataset(dataset.root).records() if r["id"] == kept[0])
    mask = dataset.read_mask(record["id"])
    dataset.rewrite_mask(record, np.where(mask == 0, 1, 0).astype(np.uint8))
    with pytest.raises(DiffumaskError, match=f"new mask since they were scored \\(e.g. {record['id']}\\)"):
        filter_dataset(config(dataset.root), progress=False, recut=True)
    with pytest.raises(DiffumaskError, match="masks of .* changed since the folds"):
        filter_dataset(config(dataset.root), progress=False)
    stale = r"filtered.txt of .* was cut by `diffumask filter` on masks that {} of its items no longer have \(e.g. "
    with pytest.raises(DiffumaskError, match=stale.format(1) + record["id"]):  # what train, augment, export read
        Dataset(dataset.root).split_ids("filtered")
    assert Dataset(dataset.root).split_ids("mine") == [kept[0]]  # not filter's: read as it is
    refine_dataset(dataset.root, RefineConfig(method="threshold"), progress=False)
    assert not any("noise" in r for r in Dataset(dataset.root).records())
    with pytest.raises(DiffumaskError, match="masks may be new since filter ran .*: delete .*noise and run filter"):
        filter_dataset(config(dataset.root), progress=False, recut=True)
    assert main(["train", str(dataset.root), "--split", "filtered", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    with pytest.raises(DiffumaskError, match=stale.format(len(kept))):
        Dataset(dataset.root).split_ids("filtered")
    problems = {p.where: p.what for p in validate_dataset(dataset.root)[0]}  # validate says so too
    assert problems["ImageSets/Segmentation/filtered.txt"].startswith(f"was cut by `diffumask filter` on masks that "
                                                                      f"{len(kept)} of its items no longer have")
    shutil.rmtree(dataset.root / "noise")  # the fix the message gives: the list stays refused until filter runs
    with pytest.raises(DiffumaskError, match=stale.format(len(kept))):
        Dataset(dataset.root).split_ids("filtered")
    assert filter_dataset(config(dataset.root), progress=False).trained_folds == 3
    assert Dataset(dataset.root).split_ids("filtered")  # cut again on today's masks
    with pytest.raises(DiffumaskError, match=r"other.txt of .* on scores of other masks than today's .* "
                                             r"diffumask filter .* --recut --name other --prune α"):
        Dataset(dataset.root).split_ids("other")  # cut on the old masks' scores, not cut again
    (dataset.root / "ImageSets" / "Segmentation" / "other.txt").write_text(f"{kept[1]}\n")  # rewritten by hand
    assert Dataset(dataset.root).split_ids("other") == [kept[1]]  # the user's list now: read as it is
    lists = dataset.root / "ImageSets" / "Segmentation"
    (lists / "filtered.cut.json").write_text("{not json")  # damaged: a sentence, in the readers and in validate
    with pytest.raises(DiffumaskError, match=r"filtered.txt of .* has a damaged filtered.cut.json \(JSONDecodeError"):
        Dataset(dataset.root).split_ids("filtered")
    assert any(p.what.startswith("has a damaged filtered.cut.json") for p in validate_dataset(dataset.root)[0])
    filter_dataset(config(dataset.root), progress=False, recut=True)  # the re-cut the message names mends it
    listed = Dataset(dataset.root).split_ids("filtered")
    manifest = dataset.root / "manifest.jsonl"
    manifest.write_text("".join(line for line in manifest.read_text().splitlines(keepends=True)
                                if json.loads(line)["id"] != listed[0]))  # an item taken out of the dataset
    with pytest.raises(DiffumaskError, match=f"lists 1 item\\(s\\) the manifest no longer holds \\(e.g. {listed[0]}\\)"):
        Dataset(dataset.root).split_ids("filtered")


def test_bad_input_is_one_sentence(tmp_path, capsys):
    for bad in (dict(prune=1.0), dict(prune=-0.1), dict(folds=1), dict(min_area=0.5, max_area=0.2)):
        with pytest.raises(ConfigError):
            config(tmp_path, **bad)
    dataset = make_dataset(tmp_path / "data", n=4, size=32, soft_maps=False, splits=("train",))
    with pytest.raises(DiffumaskError, match="without --recut first"):
        filter_dataset(config(dataset.root), progress=False, recut=True)
    with pytest.raises(DiffumaskError, match="fewer than --folds"):
        filter_dataset(config(dataset.root, folds=5), progress=False)
    with pytest.raises(DiffumaskError, match="no items in split 'nosplit'; it has: train"):
        filter_dataset(config(dataset.root, split="nosplit"), progress=False)
    with pytest.raises(DiffumaskError, match="--name 'train' is one of the dataset's own splits"):
        filter_dataset(config(dataset.root, name="train"), progress=False)
    for path in (dataset.root / "SegmentationClass").glob("*.png"):
        path.unlink()
    with pytest.raises(DiffumaskError, match="needs a dataset with masks"):
        filter_dataset(config(dataset.root), progress=False)
    assert main(["filter", str(dataset.root), "--prune", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--prune" in err[0]


def test_only_the_split_is_cut_and_shards_do_not_hide_the_scores(tmp_path):
    """Validation items are neither cross-validated nor listed; a shard left by a sharded run does not keep
    the manifest's scores from being the latest lines."""
    from diffumask.distributed import Worker

    dataset = make_dataset(tmp_path / "data", n=12, size=32, soft_maps=False)  # train and val alternate
    shard = Dataset(dataset.root, Worker(1, 2))
    record = next(r for r in dataset.records() if r["split"] == "train")
    shard.rewrite_mask(record, dataset.read_mask(record["id"]))  # leaves manifest.1.jsonl with rev 1
    result = filter_dataset(config(dataset.root, prune=0.0), progress=False)
    train_ids = set(dataset.split_ids("train"))
    assert set(result.kept) == train_ids
    scored = {r["id"] for r in Dataset(dataset.root).records() if "noise" in r}
    assert scored == train_ids and not Dataset(dataset.root).shard_paths()
