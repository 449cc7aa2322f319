"""`diffumask generate`: the dataset layout, determinism, resume, extension and bad input."""

from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset_factory import snapshot

from diffumask.cli import main
from diffumask.dataset import Dataset, voc_palette
from diffumask.errors import ConfigError, DiffumaskError
from diffumask.generate import GenerateConfig, generate_dataset
from diffumask.validate import validate_dataset

CLASSES = ["dog", "potted plant"]


def config(out: Path, **changes) -> GenerateConfig:
    values = dict(classes=CLASSES, out=str(out), images_per_class=3, model="tiny-sd1", steps=2,
                  batch_size=2, prompts="voc", threshold=0.8, uncertain=0.7)
    values.update(changes)
    return GenerateConfig(**values)


def read_voc(root: Path, split: str = "train"):
    """A plain Pascal VOC reader: split list, JPEG image, palette PNG of class indices."""
    for name in (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split():
        image = Image.open(root / "JPEGImages" / f"{name}.jpg")
        label = Image.open(root / "SegmentationClass" / f"{name}.png")
        yield name, image, label


def test_layout_manifest_and_voc_reader(tmp_path, sd1_pipe):
    out = tmp_path / "ds"
    generate_dataset(config(out), pipe=sd1_pipe, progress=False)
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [f"{c}_{k:06d}" for c in ("dog", "potted_plant") for k in range(3)]
    for record in records:
        for key in ("id", "classes", "prompt", "seed", "tokens", "model", "scheduler", "steps", "guidance",
                    "size", "threshold", "diffumask"):
            assert key in record, key
        name = record["classes"][0]
        assert name in record["prompt"]
        ids = sd1_pipe.tokenizer(record["prompt"]).input_ids
        phrase = sd1_pipe.tokenizer(name, add_special_tokens=False).input_ids
        assert [ids[i] for i in record["tokens"][name]] == phrase  # the class's own tokens
    label_map = json.loads((out / "classes.json").read_text())
    assert [c["name"] for c in label_map["classes"]] == ["background", *CLASSES]
    assert label_map["ignore_index"] == 255
    items = list(read_voc(out))
    assert len(items) == 6
    ds = Dataset(out)
    for name, image, label in items:
        assert label.mode == "P" and label.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
        indices = np.array(label)
        assert image.size == label.size == (32, 32)
        class_index = 1 if name.startswith("dog") else 2
        assert set(np.unique(indices)) <= {0, class_index, 255}
        soft = ds.read_soft_maps(name)
        cls = CLASSES[class_index - 1]
        assert {cls, f"{cls}@16", f"{cls}@8", f"{cls}@4", "__self__@8"} == set(soft)
        assert soft["__self__@8"].shape == (64, 64)
        only = ds.read_soft_maps(name, [cls, "unknown"])
        assert set(only) == {cls} and np.array_equal(only[cls], soft[cls])
        fused = soft[cls]
        assert fused.shape == (32, 32) and 0 <= fused.min() and fused.max() <= 1
        # the mask is the thresholded soft map (float16 on disk, so allow the rounding)
        decided = (np.abs(fused - 0.8) > 1e-2) & (np.abs(fused - 0.7) > 1e-2)
        expected = np.where(fused > 0.8, class_index, np.where(fused > 0.7, 255, 0))
        np.testing.assert_array_equal(indices[decided], expected[decided])
    assert voc_palette()[255] == (224, 224, 192)


def test_threshold_defaults_to_the_models_own(tmp_path, sd1_pipe, monkeypatch):
    """No --threshold: the paper's 0.4 for Stable Diffusion, or the γ a pipeline declares."""
    from diffumask.shapes.model import DEFAULT_THRESHOLD, ShapesPipeline

    assert ShapesPipeline.default_threshold == DEFAULT_THRESHOLD
    generate_dataset(config(tmp_path / "sd", threshold=None, uncertain=None, images_per_class=1), pipe=sd1_pipe,
                     progress=False)
    assert Dataset(tmp_path / "sd").records()[0]["threshold"] == 0.4
    monkeypatch.setattr(type(sd1_pipe), "default_threshold", 0.9, raising=False)
    out = tmp_path / "declared"
    generate_dataset(config(out, threshold=None, uncertain=None, images_per_class=1), pipe=sd1_pipe, progress=False)
    record = Dataset(out).records()[0]
    assert record["threshold"] == 0.9 and json.loads((out / "dataset.json").read_text())["settings"]["threshold"] == 0.9
    fused = Dataset(out).read_soft_maps(record["id"])["dog"]
    decided = np.abs(fused - 0.9) > 1e-2
    np.testing.assert_array_equal((Dataset(out).read_mask(record["id"]) == 1)[decided], (fused > 0.9)[decided])
    with pytest.raises(DiffumaskError, match="below the model's threshold"):
        generate_dataset(config(tmp_path / "bad", threshold=None, uncertain=0.95), pipe=sd1_pipe, progress=False)


def test_same_command_same_bytes(tmp_path, sd1_pipe):
    generate_dataset(config(tmp_path / "a"), pipe=sd1_pipe, progress=False)
    generate_dataset(config(tmp_path / "b"), pipe=sd1_pipe, progress=False)
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
    # three writer threads finish items out of order; the finished dataset is the same, byte for byte
    generate_dataset(config(tmp_path / "c", writers=3), pipe=sd1_pipe, progress=False)
    assert snapshot(tmp_path / "c") == snapshot(tmp_path / "a")


def test_maps_are_fused_and_thresholded_in_the_writer_not_between_batches(tmp_path, sd1_pipe, monkeypatch):
    """The GPU waits for whatever the main thread does between two pipeline calls: fusing each class's maps at
    image size and thresholding them took 12.6-18.4 ms an image at 512 px there (bench_generate_host.py)."""
    import threading

    import diffumask.attention
    import diffumask.generate

    threads = []

    def noting(function):
        def call(*args, **kwargs):
            threads.append((function.__name__, threading.current_thread().name))
            return function(*args, **kwargs)
        return call

    monkeypatch.setattr(diffumask.attention, "fuse", noting(diffumask.attention.fuse))
    monkeypatch.setattr(diffumask.generate, "threshold_masks", noting(diffumask.generate.threshold_masks))
    generate_dataset(config(tmp_path / "data"), pipe=sd1_pipe, progress=False)
    assert {name for name, _ in threads} == {"fuse", "threshold_masks"}
    assert all(thread.startswith("diffumask-writer") for _, thread in threads), threads
    monkeypatch.undo()
    dataset = Dataset(tmp_path / "data")
    for record in dataset.records():  # each mask is its fused maps thresholded, as when this ran between batches
        soft = dataset.read_soft_maps(record["id"])
        by_label = {dataset.class_index(c): soft[c] for c in record["classes"]}
        expected = diffumask.generate.threshold_masks(by_label, record["threshold"], record["uncertain"])
        np.testing.assert_array_equal(dataset.read_mask(record["id"]), expected)


def test_writer_threads_append_lines_in_the_order_items_were_submitted(tmp_path):
    """Three threads finishing in reverse order (and one failing) still append the manifest lines in submission
    order: left uncompacted (a killed run, a dataset holding items beyond the job), the manifest depended on
    timing. A failed job's error comes at the next submit, not only once it reaches the head of the queue."""
    import time

    from diffumask.dataset import BackgroundWriter

    dataset = Dataset.create(tmp_path / "d", ["dog"], {"x": 1}, image_format="png")
    image = np.zeros((8, 8, 3), np.uint8)

    def write(index: int, delay: float) -> None:
        time.sleep(delay)
        if index == 1:
            raise RuntimeError("disk full")
        dataset.write_item(f"dog_{index:06d}", image, {"classes": ["dog"]}, in_order=writer.in_turn)

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="disk full"):
        with BackgroundWriter(threads=3) as writer:
            for index, delay in enumerate([1.0, 0.05, 0.3, 0.2, 0.0]):
                writer.submit(write, index, delay)
            time.sleep(0.2)
            writer.submit(write, 5, 0.0)  # job 1 failed while job 0 still runs: said now
    assert time.monotonic() - started < 0.9 + 1.0  # the jobs already running finish; nothing waits for more
    lines = [json.loads(line)["id"] for line in (tmp_path / "d" / "manifest.jsonl").read_text().splitlines()]
    assert lines == ["dog_000000", "dog_000002", "dog_000003", "dog_000004"]


def test_resume_after_kill_and_extend(tmp_path, sd1_pipe, monkeypatch):
    reference = tmp_path / "reference"
    generate_dataset(config(reference), pipe=sd1_pipe, progress=False)

    out = tmp_path / "killed"
    real_write = Dataset.write_item
    written = []

    def dying_write(self, item_id, *args, **kwargs):
        if len(written) == 4:
            raise KeyboardInterrupt  # killed in the middle of a batch
        written.append(item_id)
        return real_write(self, item_id, *args, **kwargs)

    monkeypatch.setattr(Dataset, "write_item", dying_write)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(config(out), pipe=sd1_pipe, progress=False)
    monkeypatch.setattr(Dataset, "write_item", real_write)
    assert len(Dataset(out).records()) == 4
    # a torn manifest line and a stray temporary file, as a kill during a write leaves them
    with open(out / "manifest.jsonl", "a") as f:
        f.write('{"id": "potted_plant_000001", "spl')
    (out / "JPEGImages" / ".potted_plant_000001.jpg.abc.tmp").write_bytes(b"partial")
    (out / ".manifest.jsonl.def.tmp").write_bytes(b"partial")  # a compaction's, had the kill come at the end

    generate_dataset(config(out), pipe=sd1_pipe, progress=False)
    ids = [r["id"] for r in Dataset(out).records()]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 6
    # the resumed dataset is the uninterrupted one byte for byte: its manifest in the items' order, the temporary
    # file gone (validate reported it after a successful resume)
    assert snapshot(out) == snapshot(reference)
    assert validate_dataset(out)[0] == []

    before = snapshot(out)
    generate_dataset(config(out, images_per_class=5), pipe=sd1_pipe, progress=False)
    after = snapshot(out)
    assert all(after[k] == v for k, v in before.items() if k.startswith(("JPEGImages", "SoftMaps", "Segmentation")))
    assert len(Dataset(out).records()) == 10
    assert (out / "ImageSets/Segmentation/train.txt").read_text().split()[-1] == "potted_plant_000004"
    with pytest.warns(UserWarning, match=r"holds 6 item\(s\) beyond the 4 this command makes .* nothing is deleted"):
        generate_dataset(config(out, images_per_class=2), pipe=sd1_pipe, progress=False)  # fewer: said, not silent
    assert len(Dataset(out).records()) == 10


def _lines_without_revs(manifest: bytes) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "rev"} for line in manifest.splitlines()]


def test_a_re_run_makes_again_the_items_whose_files_are_gone(tmp_path, sd1_pipe, monkeypatch):
    """A finished item that lost its image, mask or soft maps (a disk fault, a file deleted by hand) stopped train
    and export with a bare 'No such file or directory', and a re-run took it for done. A re-run makes it again,
    byte for byte; one killed at it leaves the items marked lost (left out by readers, the job not complete,
    named by validate), and the next finishes them."""
    reference = tmp_path / "reference"
    generate_dataset(config(reference), pipe=sd1_pipe, progress=False)
    out = tmp_path / "damaged"
    shutil.copytree(reference, out)
    ids = [r["id"] for r in Dataset(out).records()]
    gone = {ids[0]: ("image", f"JPEGImages/{ids[0]}.jpg"), ids[3]: ("mask", f"SegmentationClass/{ids[3]}.png"),
            ids[5]: ("image", f"JPEGImages/{ids[5]}.jpg")}
    for _, path in gone.values():
        (out / path).unlink()
    (out / "SoftMaps" / f"{ids[5]}.npz").unlink()  # soft maps alone make no item again: with its image, whole
    real_write = Dataset.write_item

    def dying_write(self, item_id, *args, **kwargs):
        raise KeyboardInterrupt  # killed before it made the first one again

    monkeypatch.setattr(Dataset, "write_item", dying_write)
    said = rf"^3 finished item\(s\) of .* lost their files \(e.g. {ids[0]}: image missing .*\): making them again"
    with pytest.warns(UserWarning, match=said), pytest.raises(KeyboardInterrupt):
        generate_dataset(config(out), pipe=sd1_pipe, progress=False)
    monkeypatch.setattr(Dataset, "write_item", real_write)
    dataset = Dataset(out)
    assert [r["id"] for r in dataset.records()] == [i for i in ids if i not in gone]
    assert not dataset.is_complete(set(ids))
    assert dataset.unfinished().startswith(f"3 of its items lost their files (e.g. {ids[0]}: image missing")
    stopped = "a run making the item again stopped before it had; re-run it to finish"
    assert sorted(map(str, validate_dataset(out)[0])) == sorted(
        f"{item_id}: {what} missing ({path}): {stopped}" for item_id, (what, path) in gone.items())

    generate_dataset(config(out), pipe=sd1_pipe, progress=False)
    assert validate_dataset(out)[0] == []
    after, before = snapshot(out), snapshot(reference)
    assert _lines_without_revs(after.pop("manifest.jsonl")) == _lines_without_revs(before.pop("manifest.jsonl"))
    assert after == before
    assert [r.get("rev", 0) for r in Dataset(out).records()] == [2 if i in gone else 0 for i in ids]


def test_a_smaller_re_run_names_the_lost_items_beyond_it(tmp_path, sd1_pipe, monkeypatch):
    """A run killed while it made lost items again left them marked; a re-run asking for fewer images per class
    does not make them, and the dataset said only 're-run it to finish': it says which run makes them."""
    out = tmp_path / "d"
    generate_dataset(config(out), pipe=sd1_pipe, progress=False)
    (out / "JPEGImages" / "dog_000002.jpg").unlink()
    def dying_write(*args, **kwargs):
        raise KeyboardInterrupt  # after the mark, before the item

    monkeypatch.setattr(Dataset, "write_item", dying_write)
    with pytest.warns(UserWarning, match="lost their files"), pytest.raises(KeyboardInterrupt):
        generate_dataset(config(out), pipe=sd1_pipe, progress=False)
    monkeypatch.undo()
    with pytest.warns(UserWarning) as said:
        generate_dataset(config(out, images_per_class=2), pipe=sd1_pipe, progress=False)
    assert f"{out} holds 1 item(s) beyond the 4 this command makes that lost their files (e.g. dog_000002): run it " \
           "with the --images-per-class and --compose that made them to make them again" in [str(w.message) for w in said]
    generate_dataset(config(out), pipe=sd1_pipe, progress=False)
    assert Dataset(out).lost_ids() == set() and validate_dataset(out)[0] == []


def test_a_softmaps_folder_emptied_to_save_space_makes_no_item_again(tmp_path, sd1_pipe, recwarn):
    """Missing soft maps made an item be made again only while the folder held others': one extension of a dataset
    whose SoftMaps folder was deleted whole filled it again, and the next re-run remade every older item."""
    out = tmp_path / "d"
    generate_dataset(config(out, images_per_class=2), pipe=sd1_pipe, progress=False)
    images = {p.name: p.read_bytes() for p in (out / "JPEGImages").iterdir()}
    shutil.rmtree(out / "SoftMaps")
    for _ in range(2):  # extended, then run again
        generate_dataset(config(out), pipe=sd1_pipe, progress=False)
    assert not [w for w in recwarn if "lost their files" in str(w.message)]
    assert all("rev" not in r for r in Dataset(out).records())
    assert all((out / "JPEGImages" / name).read_bytes() == data for name, data in images.items())
    assert len(list((out / "SoftMaps").iterdir())) == 2  # the extension's items' only


def test_an_item_made_again_in_a_refined_dataset_is_refined_by_the_next_refine(tmp_path, sd1_pipe):
    """Refined in place, an item's line has a higher rev than generate's: the remade item's line must still
    supersede it (else the manifest would say 'refined' of a raw mask), and the same refine run again refines it
    alone, to the mask it had."""
    from diffumask.dataset import MissingItemFile
    from diffumask.refine import RefineConfig, refine_dataset

    reference = tmp_path / "reference"
    generate_dataset(config(reference), pipe=sd1_pipe, progress=False)
    refine_dataset(reference, RefineConfig(method="threshold"), progress=False)
    assert Dataset(reference).unfinished() is None
    out = tmp_path / "damaged"
    shutil.copytree(reference, out)
    lost = Dataset(out).records()[2]["id"]
    (out / "SegmentationClass" / f"{lost}.png").unlink()
    with pytest.raises(MissingItemFile, match=rf"^item {lost} of {re.escape(str(out))} lost its mask \(SegmentationClass/"
                       rf"{lost}.png\); `diffumask validate .*` lists every damaged item, .* then refine again"):
        Dataset(out).read_mask(lost)
    with pytest.warns(UserWarning, match=r"was refined: run the same `diffumask refine` again to refine the 1 item"):
        generate_dataset(config(out), pipe=sd1_pipe, progress=False)
    remade = next(r for r in Dataset(out).records() if r["id"] == lost)
    assert "refine" not in remade and remade["rev"] == 3  # over the refined line's 1 and the mark's 2
    assert Dataset(out).unfinished() == (f"1 of its items (e.g. {lost}) were made since it was refined, and hold "
                                         "unrefined masks: run the same refine again to refine them")
    assert refine_dataset(out, RefineConfig(method="threshold"), progress=False).refined == 1
    assert Dataset(out).unfinished() is None
    after, before = snapshot(out), snapshot(reference)
    assert _lines_without_revs(after.pop("manifest.jsonl")) == _lines_without_revs(before.pop("manifest.jsonl"))
    assert after == before


def test_batch_equals_single(tmp_path, sd1_pipe):
    batched = generate_dataset(config(tmp_path / "b", batch_size=3), pipe=sd1_pipe, progress=False)
    single = generate_dataset(config(tmp_path / "s", batch_size=1), pipe=sd1_pipe, progress=False)
    for record in single.records():
        a, b = batched.read_soft_maps(record["id"]), single.read_soft_maps(record["id"])
        for key in a:
            np.testing.assert_allclose(a[key], b[key], atol=2e-3)
        assert np.abs(batched.read_image(record["id"]).astype(int) - single.read_image(record["id"])).max() <= 2


def run_cli(*args: str) -> int:
    return main(list(args))


def cli_args(model: str, out: Path, *extra: str) -> list[str]:
    return ["generate", "--model", model, "--classes", "dog,potted plant", "--images-per-class", "2",
            "--out", str(out), "--steps", "2", "--quiet", *extra]


def test_cli_generates_from_a_local_folder(tmp_path, saved_pipelines, capsys):
    out = tmp_path / "cli"
    assert run_cli(*cli_args(saved_pipelines["sd1"], out, "--scheduler", "euler", "--resolutions", "8,16",
                             "--step-window", "0.5,1.0", "--layers", "up_blocks", "--image-format", "png")) == 0
    records = Dataset(out).records()
    assert len(records) == 4 and records[0]["scheduler"] == "EulerDiscreteScheduler"
    assert records[0]["resolutions"] == [8, 16]
    assert (out / "JPEGImages" / f"{records[0]['id']}.png").is_file()
    assert "4 items" in capsys.readouterr().out


def test_a_resume_with_other_settings_is_refused_before_the_model_loads(tmp_path, saved_pipelines, capsys,
                                                                        monkeypatch):
    """The refusal came after the pipeline had loaded (on every worker of a sharded job): minutes, for a real
    checkpoint. The model's own threshold, known only once it has loaded, is still compared after."""
    import diffumask.generate

    model, out = saved_pipelines["sd1"], tmp_path / "d"
    assert run_cli(*cli_args(model, out, "--images-per-class", "1")) == 0
    capsys.readouterr()

    def loading(*args, **kwargs):
        raise AssertionError("the pipeline was loaded")

    monkeypatch.setattr(diffumask.generate, "load_pipeline", loading)
    assert run_cli(*cli_args(model, out, "--seed", "3")) == 2
    assert capsys.readouterr().err.strip() == (
        f"diffumask: error: {out} holds a dataset made with other settings (seed differs: 0 in the dataset, 3 now); "
        "re-run with the same settings to resume, or choose another output folder")
    assert run_cli(*cli_args(model, out, "--image-format", "png")) == 2
    assert "image_format differs" in capsys.readouterr().err
    monkeypatch.undo()
    assert run_cli(*cli_args(model, out, "--threshold", "0.2")) == 2  # the recorded threshold is the model's own
    assert "threshold differs" in capsys.readouterr().err
    assert run_cli(*cli_args(model, out)) == 0  # and the same settings resume


def assert_clean_failure(capsys, out: Path, code: int, fragment: str) -> None:
    err = capsys.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("diffumask: error: ") and fragment in last and "Traceback" not in err, err
    assert not out.exists(), "a first run that fails leaves no folder behind"


def test_a_first_run_stopped_in_its_first_batch_leaves_no_folder_even_on_nfs(tmp_path, sd1_pipe, monkeypatch):
    """^C (or a CUDA out-of-memory error) in the first batch leaves the new folder holding only its settings: it
    is removed. NFS keeps a folder that holds a file some process has open (renamed .nfsXXXX), so generate lets
    go of .running first. Emulated, as no NFS mount is at hand."""
    import os

    import diffumask.generate

    real_rmtree = shutil.rmtree

    def nfs_like(path, ignore_errors=False, **kwargs):
        root = Path(path).resolve()
        links = (f"/proc/self/fd/{fd}" for fd in os.listdir("/proc/self/fd"))
        if any(root in Path(os.readlink(link)).parents for link in links if os.path.exists(link)) and ignore_errors:
            return  # the folder stays, holding the silly-renamed file
        real_rmtree(path, ignore_errors=ignore_errors, **kwargs)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", nfs_like)
    monkeypatch.setattr(diffumask.generate, "generate_images", interrupted)
    out = tmp_path / "d"
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(config(out), pipe=sd1_pipe, progress=False)
    assert not out.exists()
    out.mkdir()  # a folder the user made: kept
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(config(out), pipe=sd1_pipe, progress=False)
    assert Dataset(out).records() == [] and (out / "dataset.json").is_file()


def test_bad_input_fails_cleanly(tmp_path, saved_pipelines, capsys):
    model = saved_pipelines["sd1"]
    out = tmp_path / "bad"
    bank = tmp_path / "bank.yaml"
    bank.write_text("templates: ['a photo of a pet']\n")
    assert_clean_failure(capsys, out, run_cli(*cli_args(model, out, "--prompts", str(bank))), "has no {name} slot")
    bank.write_text("templates: ['a photo of a {name}']\nclasses:\n  dog: {name: puppy, templates: ['a {sub} dog']}\n")
    assert_clean_failure(capsys, out, run_cli(*cli_args(model, out, "--prompts", str(bank))), "has no {name} slot")
    bank.write_text("templates: ['a photo of a {name}']\nclasses:\n  dog: {name: puppy}\n")
    code = run_cli("generate", "--model", model, "--classes", "dog", "--out", str(out), "--quiet",
                   "--prompts", str(bank), "--resolutions", "64", "--steps", "1")
    assert_clean_failure(capsys, out, code, "resolutions [64] not recorded")
    code = run_cli(*cli_args(model, out, "--layers", "bogus"))
    assert_clean_failure(capsys, out, code, "no cross-attention layer matches ['bogus']")
    code = run_cli("generate", "--model", model, "--classes", " , ", "--out", str(out))
    assert_clean_failure(capsys, out, code, "no classes given")
    code = run_cli(*cli_args("someone/not-cached-model", out))
    assert_clean_failure(capsys, out, code, "pass a local diffusers folder")
    code = run_cli(*cli_args(str(tmp_path), out))
    assert_clean_failure(capsys, out, code, "not a diffusers pipeline folder")
    code = run_cli(*cli_args(model, out, "--uncertain", "0.5", "--threshold", "0.4"))
    assert_clean_failure(capsys, out, code, "must be below --threshold")
    code = run_cli(*cli_args(model, out, "--prompts", "voc"))
    assert code == 0
    capsys.readouterr()
    code = run_cli(*cli_args(model, out, "--prompts", "voc", "--guidance", "3"))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "other settings (guidance differs: null in the dataset, 3.0 now)" in err
    # Made recording the self-attention at every step, as datasets were before the option: the key is absent,
    # so such a dataset resumes with --self-attention-every 1, and the new default is refused by name.
    older = tmp_path / "older"
    assert run_cli(*cli_args(model, older, "--self-attention-every", "1")) == 0
    assert "self_attention_every" not in json.loads((older / "dataset.json").read_text())["settings"]
    capsys.readouterr()
    assert run_cli(*cli_args(model, older)) == 2
    assert "self_attention_every differ" in capsys.readouterr().err
    assert run_cli(*cli_args(model, older, "--self-attention-every", "1")) == 0
    # Without self-attention the step has no meaning: such datasets made before the option resume as they are.
    assert "self_attention_every" not in GenerateConfig(classes=["dog"], out="x", self_attention=None).settings()
    assert GenerateConfig(classes=["dog"], out="x").settings()["self_attention_every"] == 2
    code = run_cli(*cli_args(model, tmp_path / "y", "--self-attention-every", "0"))
    assert_clean_failure(capsys, tmp_path / "y", code, "--self-attention-every must be at least 1")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*cli_args(model, tmp_path / "x", "--scheduler", "plms"))
    assert exit_info.value.code == 2 and "invalid choice: 'plms'" in capsys.readouterr().err


def test_an_empty_class_name_between_commas_is_refused(tmp_path, capsys):
    """--classes "circle,,star" (a name left out?) made a two-class dataset, silently; a trailing comma is fine."""
    from diffumask.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--classes", "circle,,star", "--out", str(tmp_path / "d")])
    assert exit_info.value.code == 2 and not (tmp_path / "d").exists()
    assert capsys.readouterr().err.splitlines()[-1] == (
        "diffumask generate: error: argument --classes: 'circle,,star' has an empty name between two commas; "
        "list each name once, e.g. dog,cat")
    args = build_parser().parse_args(["generate", "--classes", " circle, star ,", "--out", "d"])
    assert args.classes == ["circle", "star"]


def test_classes_whose_item_ids_would_be_the_same_are_refused(tmp_path, saved_pipelines, capsys):
    """"red car" and "red-car" are two words to the tokenizer, but ids keep only ASCII letters and digits: the second
    class's items took the first's ids, so a run made one class's items and called itself complete."""
    from diffumask.generate import work_items

    out = tmp_path / "d"
    code = run_cli("generate", "--model", saved_pipelines["sd1"], "--classes", "red car,red-car", "--out", str(out),
                   "--quiet", "--steps", "1")
    assert_clean_failure(capsys, out, code, "classes 'red car' and 'red-car' would share the item ids red_car_NNNNNN")
    assert not out.exists()
    with pytest.raises(ConfigError, match="'café' and 'caf' would share"):
        work_items(["café", "caf"], 1, 0)
    names = ["potted plant", "tv/monitor", "café", "dining table"]
    items = work_items(names, 2, 0, compose=1)
    assert len({item.id for item in items}) == len(items) == 12
    assert [item.id for item in items[:2]] == ["potted_plant_000000", "potted_plant_000001"]  # as ids always were


@pytest.mark.parametrize("extra, fragment", [
    (["--threshold", "1.5"], "--threshold must lie strictly between 0 and 1"),
    (["--threshold", "0"], "--threshold must lie strictly between 0 and 1"),
    (["--threshold", "nan"], "--threshold must lie strictly between 0 and 1"),
    (["--threshold", "0.5", "--uncertain", "-0.2"], "--uncertain must lie strictly between 0 and 1"),
    (["--uncertain", "1.2"], "--uncertain must lie strictly between 0 and 1"),
    (["--images-per-class", "-1"], "must be 0 or more"),
    (["--images-per-class", "0"], "not both 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--steps", "-2"], "--steps must be at least 1"),
    (["--size", "0"], "--size must be at least 8"),
    (["--size", "36"], "multiple of 8"),
    (["--guidance", "-1"], "--guidance must be 0 or more"),
    (["--compose", "-1"], "must be 0 or more"),
    (["--self-attention", "0"], "--self-attention must be at least 1"),
    (["--resolutions", "0,16"], "--resolutions must be positive"),
    (["--device", "gpu0"], "unknown device 'gpu0'"),
    (["--step-window", "0.8,0.2"], "step window (0.8, 0.2) must satisfy 0 <= start < stop <= 1"),
    (["--guidance", "1", "--negative-prompt", "blurry"], "the negative prompt would do nothing"),
    (["--flagged", "bogus"], "--flagged must be one of record, skip, got 'bogus'"),
])
def test_bad_option_values_are_one_line_errors(tmp_path, saved_pipelines, capsys, extra, fragment):
    out = tmp_path / "bad"
    assert_clean_failure(capsys, out, run_cli(*cli_args(saved_pipelines["sd1"], out, *extra)), fragment)
    assert not out.exists() or not any(out.iterdir())


def test_out_that_is_a_file_and_a_missing_cuda_are_one_line_errors(tmp_path, saved_pipelines, capsys, monkeypatch):
    import torch

    model = saved_pipelines["sd1"]
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    assert_clean_failure(capsys, tmp_path / "x", run_cli(*cli_args(model, existing)), "it is a file; choose a folder")
    assert_clean_failure(capsys, tmp_path / "x", run_cli(*cli_args(model, existing / "ds")),
                         "which is a file; choose a folder")
    assert existing.read_text() == "mine"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "cuda"
    assert_clean_failure(capsys, out, run_cli(*cli_args(model, out, "--device", "cuda")), "no usable CUDA device")
    assert_clean_failure(capsys, out, run_cli(*cli_args(model, out, "--device", "cuda:1")), "no usable CUDA device")
    assert not out.exists()
    with pytest.raises(DiffumaskError, match="no usable CUDA device"):
        generate_dataset(config(out, model=model, device="cuda"), progress=False)


def _options(command: str) -> tuple[list[argparse.Action], str]:
    """The actions of a subcommand's parser and its --help text."""
    from diffumask.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[command]
    return [a for a in parser._actions if a.option_strings and "--help" not in a.option_strings], parser.format_help()


README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_generate_option_is_in_its_help_and_in_the_readme_table():
    actions, text = _options("generate")
    table = README.read_text().split("## `diffumask generate`")[1].split("\n\n|")[1].split("\n\n")[0]
    rows = {row.split("|")[1] for row in table.splitlines() if row.startswith("| `")}
    documented = {o.strip("`") for row in rows for o in re.findall(r"`(--[a-z-]+)", row)}
    for action in actions:
        option = max(action.option_strings, key=len)
        assert option in text, option
        assert action.help and action.help != argparse.SUPPRESS, option
        assert option in documented, f"{option} is missing from the README's generate option table"
    assert documented <= {max(a.option_strings, key=len) for a in actions}  # and no stale row


def test_refine_help_states_the_apis_defaults():
    """Each `(default: X)` of refine's help is the RefineConfig default it stands for, and the parsed
    defaults build exactly RefineConfig() (the CLI and the API share one set of CRF defaults)."""
    from diffumask.cli import build_parser, _run_refine
    from diffumask.refine import RefineConfig

    defaults = RefineConfig()
    fields = {"--crf-srgb": defaults.crf_params.bilateral_srgb, "--crf-sxy": defaults.crf_params.bilateral_sxy,
              "--crf-gt-prob": defaults.crf_params.gt_prob, "--crf-iterations": defaults.crf_params.iterations,
              "--min-area": defaults.min_area,
              "--max-hole": defaults.max_hole, "--crf-shortlist": defaults.crf_shortlist,
              "--affinity-epochs": defaults.affinity.epochs, "--affinity-max-steps": defaults.affinity.max_steps,
              "--affinity-background": defaults.affinity.background,
              "--walk-steps": defaults.affinity.walk_steps, "--beta": defaults.affinity.beta,
              "--power": defaults.power, "--propagate-threshold": defaults.propagate_threshold,
              "--propagate-uncertain": defaults.propagate_uncertain, "--seed-grid": defaults.affinity.seed_grid}
    actions, _ = _options("refine")
    for action in actions:
        option = max(action.option_strings, key=len)
        if option not in fields:
            continue
        stated = re.search(r"\(default: (?:the paper's |PSA's )?([^;),]+)", " ".join(action.help.split()))
        assert stated, option
        value = stated.group(1).strip()
        expected = fields[option]
        assert (value == expected if isinstance(expected, str) else float(value) == expected), (option, value)
    assert defaults.crf_params.bilateral_srgb == defaults.seed_crf_params.bilateral_srgb  # "every CRF's" scale

    seen = {}
    import diffumask.refine as refine_module

    def capture(root, config, progress=True, **runtime):  # runtime: device and workers, which change no mask
        seen["config"] = config
        raise KeyboardInterrupt

    args = build_parser().parse_args(["refine", "somewhere", "--method", "affinity"])
    original = refine_module.refine_dataset
    refine_module.refine_dataset = capture
    try:
        with pytest.raises(KeyboardInterrupt):
            _run_refine(args)
    finally:
        refine_module.refine_dataset = original
    assert seen["config"] == RefineConfig(method="affinity")


def test_update_records_merges_fields(tmp_path):
    ds = Dataset.create(tmp_path / "d", ["a"], {})
    for i in range(3):
        ds.write_item(f"i{i}", np.zeros((4, 4, 3), np.uint8), {"prompt": "p"})
    ds.update_records({"i1": {"refine": {"method": "otsu"}}})
    assert [r.get("refine") for r in ds.records()] == [None, {"method": "otsu"}, None]
    with pytest.raises(KeyError):
        ds.update_records({"nope": {}})


def test_generate_one_the_readme_entry_point():
    """The README's snippet, run as written: one shapes image, its map and its mask (1 = star)."""
    from diffumask.masks import threshold_masks
    from diffumask.shapes.model import DEFAULT_THRESHOLD

    code = README.read_text().split("from diffumask.generate import generate_one")[0].rsplit("```python", 1)[1]
    code += "from diffumask.generate import generate_one" + \
        README.read_text().split("from diffumask.generate import generate_one")[1].split("```")[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert result.image.dtype == np.uint8 and result.image.shape == (32, 32, 3)
    assert result.prompt == "a red star on a striped background" and result.seed == 0
    star = result.maps["star"]
    assert star.shape == (32, 32) and 0 <= star.min() and 0.5 < star.max() <= 1
    np.testing.assert_array_equal(result.mask, threshold_masks({1: star}, DEFAULT_THRESHOLD))
    assert set(np.unique(result.mask)) == {0, 1}
    generate_one = namespace["generate_one"]
    again = generate_one(namespace["pipe"], "a red star on a striped background", classes=["star"], seed=0)
    other = generate_one(namespace["pipe"], "a red star on a striped background", classes=["star"], seed=1)
    assert np.array_equal(again.image, result.image) and not np.array_equal(other.image, result.image)
    with pytest.raises(DiffumaskError, match="does not occur in the prompt"):
        generate_one(namespace["pipe"], "a red star", classes=["ring"], steps=1)


def test_generate_one_gives_each_pixel_to_the_winning_class(sd1_pipe):
    from diffumask.generate import generate_one
    from diffumask.masks import threshold_masks

    result = generate_one(sd1_pipe, "a photo of a dog on a sofa", ["dog", "sofa"], seed=3, steps=2,
                          threshold=0.5, uncertain=0.3)
    maps = {1: result.maps["dog"], 2: result.maps["sofa"]}
    np.testing.assert_array_equal(result.mask, threshold_masks(maps, 0.5, 0.3))
    assert not np.allclose(maps[1], maps[2])


def test_generate_dataset_takes_model_and_bank_from_the_pipeline_given(tmp_path, sd1_pipe):
    from diffumask.shapes.model import load_pipeline

    shapes = generate_dataset(GenerateConfig(classes=["star", "ring"], out=str(tmp_path / "shapes"),
                                             images_per_class=1, steps=2), pipe=load_pipeline(), progress=False)
    assert shapes.settings["model"] == "shapes" and shapes.settings["prompt_bank"] == "built-in bank 'shapes'"
    caption = re.compile(r"^an? \w+ (star|ring)( on a \w+ background)?$")  # the shapes bank's, not VOC's
    assert all(r["model"] == "shapes" and caption.match(r["prompt"]) for r in shapes.records())
    sd = generate_dataset(GenerateConfig(classes=["dog"], out=str(tmp_path / "sd"), images_per_class=1, steps=2,
                                         threshold=0.5), pipe=sd1_pipe, progress=False)
    record = sd.records()[0]
    assert record["model"] == str(sd1_pipe.name_or_path) != "shapes"
    assert sd.settings["prompt_bank"].startswith("built-in banks (voc") and record["pipeline"] == "StableDiffusionPipeline"
    named = generate_dataset(config(tmp_path / "named", images_per_class=1), pipe=sd1_pipe, progress=False)
    assert named.records()[0]["model"] == "tiny-sd1"  # a name given in the config is what is recorded


def test_compose_items_list_all_their_classes_and_masks_give_each_pixel_to_the_winner(tmp_path, sd1_pipe):
    classes = ["person", "horse", "dog"]
    cfg = config(tmp_path / "c", classes=classes, images_per_class=1, compose=2)
    ds = generate_dataset(cfg, pipe=sd1_pipe, progress=False)
    records = ds.records()
    assert [r["id"] for r in records] == ["person_000000", "horse_000000", "dog_000000"] + [
        f"{c}-compose-{k:06d}" for c in classes for k in range(2)]
    composed = [r for r in records if "-compose-" in r["id"]]
    assert any("riding a horse" in r["prompt"] for r in composed)  # a VOC co-occurrence template
    for record in composed:
        names = record["classes"]
        assert len(names) >= 2 and set(names) <= set(classes) and record["id"].split("-")[0] in names
        ids = sd1_pipe.tokenizer(record["prompt"]).input_ids
        for name in names:
            assert [ids[i] for i in record["tokens"][name]] == sd1_pipe.tokenizer(name, add_special_tokens=False).input_ids
        soft = ds.read_soft_maps(record["id"])
        assert {n for n in soft if "@" not in n} == set(names)
        stack = np.stack([soft[n] for n in names])
        winner = np.array([ds.class_index(n) for n in names])[stack.argmax(0)]
        best = stack.max(0)
        expected = np.where(best > 0.8, winner, np.where(best > 0.7, 255, 0))
        sorted_stack = np.sort(stack, axis=0)
        decided = ((np.abs(best - 0.8) > 1e-2) & (np.abs(best - 0.7) > 1e-2)
                   & (sorted_stack[-1] - sorted_stack[-2] > 1e-2))  # float16 on disk: skip near-ties
        mask = ds.read_mask(record["id"])
        np.testing.assert_array_equal(mask[decided], expected[decided])
        assert set(np.unique(mask)) <= {0, 255, *(ds.class_index(n) for n in names)}
    before = snapshot(tmp_path / "c")
    generate_dataset(config(tmp_path / "c", classes=classes, images_per_class=1, compose=3), pipe=sd1_pipe,
                     progress=False)  # more composed items extend the dataset; the others stay as they were
    after = snapshot(tmp_path / "c")
    assert all(after[k] == v for k, v in before.items() if k.startswith(("JPEGImages", "SoftMaps", "Segmentation")))
    assert len(Dataset(tmp_path / "c").records()) == 3 + 9


def test_compose_extends_a_dataset_made_without_it_and_refuses_changed_pair_templates(tmp_path, sd1_pipe):
    import hashlib

    from diffumask.prompts import PromptBank

    bank = tmp_path / "bank.yaml"
    bank.write_text("templates: ['a photo of a {name}']\npairs: ['a {name} and a {name2}']\n")
    out = tmp_path / "c"
    generate_dataset(config(out, prompts=str(bank), images_per_class=1), pipe=sd1_pipe, progress=False)
    before = snapshot(out)
    generate_dataset(config(out, prompts=str(bank), images_per_class=1, compose=1), pipe=sd1_pipe, progress=False)
    after = snapshot(out)
    assert all(after[k] == v for k, v in before.items() if k.startswith(("JPEGImages", "SoftMaps", "Segmentation")))
    composed = [r for r in Dataset(out).records() if "-compose-" in r["id"]]
    assert len(composed) == 2 and all(" and a " in r["prompt"] for r in composed)
    # Other pair templates: more composed items would mix two prompt sets, so they are refused by name ...
    bank.write_text("templates: ['a photo of a {name}']\npairs: ['a {name} beside a {name2}']\n")
    with pytest.raises(DiffumaskError, match="composed items were drawn from other multi-class templates"):
        generate_dataset(config(out, prompts=str(bank), images_per_class=1, compose=2), pipe=sd1_pipe, progress=False)
    # ... while the single-class items, which do not depend on them, still extend.
    generate_dataset(config(out, prompts=str(bank), images_per_class=2), pipe=sd1_pipe, progress=False)
    assert len(Dataset(out).records()) == 4 + 2
    # A single-class template changed is refused as before.
    bank.write_text("templates: ['a picture of a {name}']\npairs: ['a {name} beside a {name2}']\n")
    with pytest.raises(DiffumaskError, match="prompt_bank_sha256 differ"):
        generate_dataset(config(out, prompts=str(bank), images_per_class=3), pipe=sd1_pipe, progress=False)
    # Datasets that composed before the split recorded one digest of the whole bank; they still resume.
    older = tmp_path / "older"
    bank.write_text("templates: ['a photo of a {name}']\npairs: ['a {name} and a {name2}']\n")
    generate_dataset(config(older, prompts=str(bank), images_per_class=1, compose=1), pipe=sd1_pipe, progress=False)
    loaded = PromptBank.load(str(bank))
    whole = (loaded.templates, loaded.slots, loaded.classes, loaded.compose, loaded.pairs)
    info = json.loads((older / "dataset.json").read_text())
    info["settings"]["prompt_bank_sha256"] = hashlib.sha256(repr(whole).encode()).hexdigest()
    (older / "dataset.json").write_text(json.dumps(info))
    generate_dataset(config(older, prompts=str(bank), images_per_class=1, compose=2), pipe=sd1_pipe, progress=False)
    assert len(Dataset(older).records()) == 2 + 4


@pytest.mark.parametrize("bank, digest", [
    ("voc", "43a6b319ac03c8d4b2a9a3504a723693e2b042a07963ae58f34642a5ade719e7"),
    ("cityscapes", "64e69d6c4f89ed65c5b00d9f4ea0448c6777d6d22916b3d58d77a1184e5fd537"),
    ("shapes", "e851f67d32f708ea3d8508b7136676f483c8f24a2b8b347ef898a05d67f6dd00"),
    ("default", "7a0ee49c701c460021ce96c447da51be01957640c49f1d03a196e46735b1cc8e"),
    ("auto", "5e792cab2b8c9e8cb8f3362272fe679de848a048b775d4b2909aed8b88db70e6"),
])
def test_built_in_banks_keep_the_fingerprint_their_datasets_recorded(bank, digest):
    """Every dataset made with a built-in bank records this digest and resumes only while it holds: an edit to a
    bank (an alias too) must be a decision to stop them resuming, not an accident. Pinned at commit 3e3d449."""
    from diffumask.generate import _bank_fingerprint
    from diffumask.prompts import resolve_bank

    assert _bank_fingerprint(resolve_bank(bank, "tiny-sd1"), None) == digest


def test_resume_accepts_the_same_model_folder_spelled_another_way(tmp_path, saved_pipelines, monkeypatch, capsys):
    model = Path(saved_pipelines["sd1"])
    out = tmp_path / "d"
    monkeypatch.chdir(model.parent)
    assert run_cli(*cli_args(model.name, out, "--images-per-class", "1")) == 0  # relative: recorded absolute
    assert json.loads((out / "dataset.json").read_text())["settings"]["model"] == str(model)
    assert run_cli(*cli_args(str(model), out)) == 0
    assert len(Dataset(out).records()) == 4
    assert {r["model"] for r in Dataset(out).records()} == {str(model)}  # one spelling throughout
    (tmp_path / "link").symlink_to(model)
    assert run_cli(*cli_args(str(tmp_path / "link"), out, "--images-per-class", "3")) == 0
    other = tmp_path / "elsewhere" / model.name
    shutil.copytree(model, other)  # the same files, but another folder: refused as before
    capsys.readouterr()
    assert run_cli(*cli_args(str(other), out, "--images-per-class", "4")) == 2
    assert f'model differs: "{model}" in the dataset, "{other}" now' in capsys.readouterr().err
    # A dataset that recorded a relative path (as before this rule) resumes with that spelling, and a folder of that
    # name elsewhere is not taken for it.
    info = json.loads((out / "dataset.json").read_text())
    info["settings"]["model"] = model.name
    (out / "dataset.json").write_text(json.dumps(info))
    monkeypatch.chdir(other.parent)
    assert run_cli(*cli_args(str(other), out, "--images-per-class", "4")) == 2
    assert "model differ" in capsys.readouterr().err
    monkeypatch.chdir(model.parent)
    assert run_cli(*cli_args(model.name, out, "--images-per-class", "4")) == 0


def test_a_moved_model_folder_is_named_with_the_link_that_resumes(tmp_path, saved_pipelines, capsys):
    """A dataset records its model folder's path; once that folder is moved (its parent folder too), the message
    says so and gives the command that links the old path, and running that command resumes the dataset."""
    first, moved, out = tmp_path / "my models" / "sd15", tmp_path / "weights" / "sd15", tmp_path / "d"
    shutil.copytree(saved_pipelines["sd1"], first)
    assert run_cli(*cli_args(str(first), out, "--images-per-class", "1")) == 0
    (tmp_path / "my models").rename(tmp_path / "weights")  # mv "my models" weights
    capsys.readouterr()
    assert run_cli(*cli_args(str(moved), out, "--images-per-class", "2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"diffumask: error: {out} was made with the model folder {first}, which "
                                               f"no longer exists; a dataset resumes only with the model it was made with")
    command = err[0].split("link the old path to it (", 1)[1].rsplit(") and re-run", 1)[0]
    subprocess.run(["bash", "-c", command], check=True)  # the command as given, in a shell: quoted where it must be
    assert run_cli(*cli_args(str(moved), out, "--images-per-class", "2")) == 0
    assert len(Dataset(out).records()) == 4


def test_compose_on_shapes_gives_two_object_captions(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert run_cli("generate", "--classes", "star,ring,circle", "--images-per-class", "0", "--compose", "2",
                   "--steps", "2", "--out", str(out), "--quiet") == 0
    records = Dataset(out).records()
    assert len(records) == 6
    caption = re.compile(r"^an? (\w+) (star|ring|circle) and an? (\w+) (star|ring|circle) on a \w+ background$")
    for record in records:
        match = caption.match(record["prompt"])
        assert match, record["prompt"]
        assert match[1] != match[3] and match[2] != match[4]  # two colours, two shapes, as the world draws them
        assert record["classes"] == [match[2], match[4]]


def test_compose_templates_name_any_class(tmp_path, sd1_pipe):
    from diffumask.prompts import PromptBank, PromptBankError

    bank = tmp_path / "bank.yaml"
    bank.write_text("templates: ['a photo of a {name}']\nslots: {scene: [in the snow]}\n"
                    "compose: ['a {red panda} beside a {snow_leopard} {scene}', 'a {yeti} and a {red_panda}']\n")
    loaded = PromptBank.load(str(bank))
    assert loaded.template_classes(loaded.compose[0]) == ["red panda", "snow leopard"]  # {scene} is a slot
    ds = generate_dataset(config(tmp_path / "o", classes=["snow leopard", "red panda"], prompts=str(bank),
                                 images_per_class=0, compose=1), pipe=sd1_pipe, progress=False)
    for record in ds.records():  # the yeti template names a class the run lacks, so it is never drawn
        assert record["prompt"] == "a red panda beside a snow leopard in the snow"
        assert record["classes"] == ["red panda", "snow leopard"]
    bank.write_text("templates: ['a {name}']\nslots: {scene: [here]}\ncompose: ['a {dog} {scene}']\n")
    with pytest.raises(PromptBankError, match="names fewer than two classes; write each"):
        PromptBank.load(str(bank))
    # A second object's fill-in ({sub2}) is no class; one class spelled twice is one class; a slot that is no class of
    # the bank or the run and no list is never drawn, and the run says so (a typo looks just like it).
    bank.write_text("templates: ['a {name}']\nslots: {scene: [here]}\nclasses: {dog: {sub: [beagle]}}\n"
                    "compose: ['a {sub} {dog} and a {sub2} {cat}', 'a {person} walking a {dog} {scen}']\n")
    loaded = PromptBank.load(str(bank))
    assert [loaded.template_classes(t) for t in loaded.compose] == [["dog", "cat"], ["person", "dog", "scen"]]
    assert loaded.undrawable_compose(["dog", "cat", "person"]) == {loaded.compose[1]: ["scen"]}
    with pytest.warns(UserWarning, match=r"names 'person', 'scen', neither a class of the bank or of --classes nor"):
        ds = generate_dataset(config(tmp_path / "w", classes=["dog", "cat"], prompts=str(bank),
                                     images_per_class=0, compose=1), pipe=sd1_pipe, progress=False)
    prompts = {r["id"]: r["prompt"] for r in ds.records() if r["classes"] == ["dog", "cat"]}
    assert prompts == {"dog-compose-000000": "a beagle dog and a cat", "cat-compose-000000": "a dog and a cat"}
    bank.write_text("templates: ['a {name}']\ncompose: ['a {red panda} next to a {red_panda}']\n")
    with pytest.raises(PromptBankError, match="names fewer than two classes"):
        PromptBank.load(str(bank))
    # The README's bank, as written: its compose template names person, which has no entry there.
    block = README.read_text().split("**Prompt banks** are data")[1].split("```yaml")[1].split("```")[0]
    bank.write_text(block)
    loaded = PromptBank.load(str(bank))
    assert loaded.template_classes(loaded.compose[0]) == ["person", "dog"]
    prompt, names = loaded.draw_compose("dog", 3, ["dog", "person"])
    assert names == ["person", "dog"] and prompt.startswith("a person walking a dog ")


def test_compose_refuses_what_cannot_work(tmp_path, sd1_pipe):
    from diffumask.prompts import PromptBank, PromptBankError

    with pytest.raises(DiffumaskError, match="at least two --classes"):
        config(tmp_path / "one", classes=["dog"], compose=1)
    bank = tmp_path / "bank.yaml"
    bank.write_text("templates: ['a photo of a {name}']\n")
    with pytest.raises(PromptBankError, match="no multi-class prompt for 'dog'"):
        generate_dataset(config(tmp_path / "x", prompts=str(bank), compose=1), pipe=sd1_pipe, progress=False)
    assert not (tmp_path / "x").exists()
    bank.write_text("templates: ['a {name}']\npairs: ['a {name} and a dog']\n")
    with pytest.raises(PromptBankError, match="needs both {name} and {name2}"):
        PromptBank.load(str(bank))
    bank.write_text("templates: ['a {name}']\ncompose: ['a {cat} on a mat']\nclasses: {cat: {}}\n")
    with pytest.raises(PromptBankError, match="names fewer than two classes"):
        PromptBank.load(str(bank))
    voc = PromptBank.load("voc")
    assert len(voc.compose) >= 36
    prompt, names = voc.draw_compose("dining table", 4, ["dining table", "bottle", "chair", "potted plant"])
    assert names[0] == "dining table" or "dining table" in names
    assert all(voc.display_name(n) in prompt for n in names)
    assert set(voc.draw_compose("diningtable", 4, ["diningtable", "bottle"])[1]) == {"diningtable", "bottle"}


class _FlagEverySecond:
    """A stand-in safety checker that flags every second image of a call, blacking it out as the real one does."""

    def __call__(self, images, clip_input):
        flags = [i % 2 == 1 for i in range(len(images))]
        for i, flagged in enumerate(flags):
            if flagged:
                images[i] = images[i] * 0
        return images, flags


class _Features:
    def __call__(self, images, return_tensors="pt"):
        self.pixel_values = torch.zeros(len(images), 3, 4, 4)
        return self

    def to(self, device):
        return self


@pytest.mark.parametrize("policy", ["record", "skip"])
def test_images_a_safety_checker_flags_get_no_files(tmp_path, saved_pipelines, policy):
    """A pipeline that keeps its safety checker: flagged (black) images are never written with masks;
    "record" marks them finished in the manifest, "skip" leaves them to a re-run."""
    from diffumask.models import load_pipeline
    from diffumask.validate import validate_dataset

    pipe = load_pipeline(saved_pipelines["sd1"], device="cpu")
    object.__setattr__(pipe, "safety_checker", _FlagEverySecond())  # the pipeline's own, not a registered module
    object.__setattr__(pipe, "feature_extractor", _Features())
    out = tmp_path / policy
    dataset = generate_dataset(config(out, flagged=policy), pipe=pipe, progress=False)
    flagged = dataset.flagged_records()
    written = {r["id"] for r in dataset.records()}
    # batches of 2 per class (indices 0-1, then 2): the second image of each full batch is flagged
    assert written == {f"{c}_{k:06d}" for c in ("dog", "potted_plant") for k in (0, 2)}
    assert {r["id"] for r in flagged} == ({"dog_000001", "potted_plant_000001"} if policy == "record" else set())
    assert all(r["split"] == "flagged" and r["flagged"] == "safety_checker" for r in flagged)
    for record in flagged:
        assert not dataset.image_path(record["id"]).exists() and not dataset.mask_path(record["id"]).exists()
        assert not dataset.soft_maps_path(record["id"]).exists()
    assert set(dataset.split_ids("train")) == written and not dataset.split_ids("flagged")
    assert validate_dataset(out)[0] == []
    assert all(dataset.read_image(i).max() > 0 for i in written)
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    generate_dataset(config(out, flagged=policy), pipe=pipe, progress=False)  # a re-run: recorded ones are finished
    hook.remove()
    assert bool(calls) == (policy == "skip")


def test_a_sharded_job_that_skips_flagged_images_still_merges(tmp_path, saved_pipelines, monkeypatch):
    from diffumask.models import load_pipeline

    pipe = load_pipeline(saved_pipelines["sd1"], device="cpu")
    object.__setattr__(pipe, "safety_checker", _FlagEverySecond())
    object.__setattr__(pipe, "feature_extractor", _Features())
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        dataset = generate_dataset(config(tmp_path / "out", flagged="skip"), pipe=pipe, progress=False)
    assert not dataset.shard_paths() and len(dataset.records()) == 4  # the last worker merged the shards
    assert dataset.skipped_ids() == {"dog_000001", "potted_plant_000001"}  # worker 0's, left to a re-run

    # The re-run: worker 0 makes its skipped images again (nothing is flagged now) while worker 1, with nothing
    # left, finishes. Counting the skipped ones as finished, worker 1 took the job for complete and merged the
    # shards (and swept temporary files) under worker 0, which was still writing.
    clean = load_pipeline(saved_pipelines["sd1"], device="cpu")
    seen = {}

    def worker_1_finishes(module, args):
        if not seen:
            live = tmp_path / "out" / "JPEGImages" / ".dog_000001.jpg.live.tmp"  # as worker 0's write would be
            live.write_bytes(b"being written")
            monkeypatch.setenv("RANK", "1")
            generate_dataset(config(tmp_path / "out", flagged="skip"), pipe=clean, progress=False)
            monkeypatch.setenv("RANK", "0")
            every = {f"{c}_{k:06d}" for c in ("dog", "potted_plant") for k in range(3)}
            seen.update(complete=Dataset(tmp_path / "out").is_complete(every), kept=live.exists())
            live.unlink(missing_ok=True)

    monkeypatch.setenv("RANK", "0")
    hook = clean.unet.register_forward_pre_hook(worker_1_finishes)
    dataset = generate_dataset(config(tmp_path / "out", flagged="skip"), pipe=clean, progress=False)
    hook.remove()
    assert seen == {"complete": False, "kept": True}, "worker 1 took the job for complete while worker 0 worked"
    assert not dataset.shard_paths() and len(dataset.records()) == 6 and not dataset.skipped_ids()


def test_a_step_window_at_the_end_keeps_the_last_call():
    """Fractions round to calls; a window near the end (0.99–1 of 50 steps) still holds the last one."""
    from types import SimpleNamespace

    from diffusers import DDIMScheduler

    from diffumask.generate import _step_range

    pipe = SimpleNamespace(scheduler=DDIMScheduler())
    assert _step_range((0.99, 1.0), 50, pipe) == (49, 50)
    assert _step_range((0.9, 1.0), 4, pipe) == (3, 4)
    assert _step_range((0.0, 0.5), 4, pipe) == (0, 2) and _step_range(None, 4, pipe) is None


def test_flow_matching_models_refuse_a_sampler_swap_and_sizes_their_patches_cannot_make(saved_transformers, tmp_path,
                                                                                          capsys):
    from diffumask.testing import tiny_pipeline

    for kind in ("sd3", "flux"):
        out = tmp_path / kind
        assert_clean_failure(capsys, out, run_cli("generate", "--model", saved_transformers[kind], "--classes", "dog",
                                                  "--out", str(out), "--steps", "1", "--scheduler", "ddim", "--quiet"),
                             "samples by flow matching")
        pipe = tiny_pipeline(kind)
        multiple = pipe.vae_scale_factor * 2  # SD3's patch of 2; FLUX's 2×2 packing
        assert_clean_failure(capsys, out, run_cli("generate", "--model", saved_transformers[kind], "--classes", "dog",
                                                  "--out", str(out), "--steps", "1", "--size", str(3 * multiple + 2),
                                                  "--quiet"),
                             f"multiple of {multiple} pixels")


def test_generate_dataset_takes_the_gpu_by_default_and_records_the_precision_it_ran(tmp_path, monkeypatch, sd1_pipe):
    """GenerateConfig's defaults are the command's: the GPU in its precision when there is one (it was the CPU in
    float32 from Python); the dataset records the resolved precision, "auto" never, also for a pipeline passed in."""
    loaded = {}

    class Loaded(Exception):
        pass

    def load(model, device, dtype, scheduler, revision, prompts_only):
        loaded.update(model=model, device=device, dtype=dtype, prompts_only=prompts_only)
        raise Loaded

    monkeypatch.setattr("diffumask.models.default_device", lambda: "cuda")
    monkeypatch.setattr("diffumask.models.check_device", lambda device: None)
    monkeypatch.setattr("diffumask.generate.load_pipeline", load)
    with pytest.raises(Loaded):
        generate_dataset(GenerateConfig(classes=["circle"], out=str(tmp_path / "gpu")), progress=False)
    assert loaded == {"model": "shapes", "device": "cuda", "dtype": "float16", "prompts_only": True}
    with pytest.raises(Loaded):
        generate_dataset(GenerateConfig(classes=["circle"], out=str(tmp_path / "gpu"), device="cpu"), progress=False)
    assert loaded == {"model": "shapes", "device": "cpu", "dtype": "float32", "prompts_only": True}
    half = copy.deepcopy(sd1_pipe).to(dtype=torch.bfloat16)
    dataset = generate_dataset(config(tmp_path / "given", images_per_class=1, dtype="auto"), pipe=half, progress=False)
    assert dataset.settings["dtype"] == "bfloat16"
    # A dataset made from Python before recorded the config's float32 whatever the pipeline's: it still resumes.
    generate_dataset(config(tmp_path / "before", images_per_class=1, dtype="float32"), pipe=half, progress=False)
    again = generate_dataset(config(tmp_path / "before", images_per_class=2, dtype="auto"), pipe=half, progress=False)
    assert again.settings["dtype"] == "float32" and len(again.records()) == 4
    with pytest.raises(DiffumaskError, match="dtype must be auto or one of"):
        config(tmp_path / "bad", dtype="half")
