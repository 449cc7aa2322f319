"""`diffumask generate`: the dataset layout, determinism, resume, extension and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffumask.cli import main
from diffumask.dataset import Dataset, voc_palette
from diffumask.errors import DiffumaskError
from diffumask.generate import GenerateConfig, generate_dataset

CLASSES = ["dog", "potted plant"]


def config(out: Path, **changes) -> GenerateConfig:
    values = dict(classes=CLASSES, out=str(out), images_per_class=3, model="tiny-sd1", steps=2,
                  batch_size=2, prompts="voc", threshold=0.8, uncertain=0.7)
    values.update(changes)
    return GenerateConfig(**values)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


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

    generate_dataset(config(out), pipe=sd1_pipe, progress=False)
    ids = [r["id"] for r in Dataset(out).records()]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 6
    resumed = {k: v for k, v in snapshot(out).items() if not k.endswith(".tmp") and k != "manifest.jsonl"}
    expected = {k: v for k, v in snapshot(reference).items() if k != "manifest.jsonl"}
    assert resumed == expected

    before = snapshot(out)
    generate_dataset(config(out, images_per_class=5), pipe=sd1_pipe, progress=False)
    after = snapshot(out)
    assert all(after[k] == v for k, v in before.items() if k.startswith(("JPEGImages", "SoftMaps", "Segmentation")))
    assert len(Dataset(out).records()) == 10
    assert (out / "ImageSets/Segmentation/train.txt").read_text().split()[-1] == "potted_plant_000004"


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


def assert_clean_failure(capsys, out: Path, code: int, fragment: str) -> None:
    err = capsys.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("diffumask: error: ") and fragment in last and "Traceback" not in err, err
    assert not list(out.glob("JPEGImages/*")) and not (out / "manifest.jsonl").exists()


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
    assert code == 2 and "other settings (guidance differ)" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*cli_args(model, tmp_path / "x", "--scheduler", "plms"))
    assert exit_info.value.code == 2 and "invalid choice: 'plms'" in capsys.readouterr().err


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    for option in ("--model", "--classes", "--images-per-class", "--out", "--seed", "--steps", "--guidance",
                   "--scheduler", "--size", "--batch-size", "--device", "--dtype", "--negative-prompt",
                   "--prompts", "--resolutions", "--threshold", "--uncertain"):
        assert option in text


def test_update_records_merges_fields(tmp_path):
    ds = Dataset.create(tmp_path / "d", ["a"], {})
    for i in range(3):
        ds.write_item(f"i{i}", np.zeros((4, 4, 3), np.uint8), {"prompt": "p"})
    ds.update_records({"i1": {"refine": {"method": "otsu"}}})
    assert [r.get("refine") for r in ds.records()] == [None, {"method": "otsu"}, None]
    with pytest.raises(KeyError):
        ds.update_records({"nope": {}})
