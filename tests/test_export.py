"""``diffumask export``: every format read back by its own ecosystem's reader, on items with several
classes each, 255 bands along every edge, and (for half of them) their own object layer."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from dataset_factory import ADE_NAMES, MIXED_NAMES, make_dataset
from PIL import Image

from diffumask.cli import main
from diffumask.dataset import IGNORE_INDEX, Dataset, read_index_png
from diffumask.formats import SourceError, open_source
from diffumask.formats.export import ExportError, export_dataset, instance_masks
from diffumask.formats.tables import ADE20K_CLASSES, CITYSCAPES_TRAIN_IDS


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return make_dataset(tmp_path_factory.mktemp("mixed") / "data", n=12, names=MIXED_NAMES)


def test_fixture_has_what_the_exports_must_survive(mixed):
    masks = [mixed.read_mask(r["id"]) for r in mixed.records()]
    assert sum(len(set(np.unique(m)) - {0, IGNORE_INDEX}) >= 2 for m in masks) >= 6  # several classes per image
    assert all((m == IGNORE_INDEX).any() for m in masks)  # 255 bands


def test_coco_instances_union_is_the_semantic_mask(mixed, tmp_path):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    out = tmp_path / "coco"
    assert main(["export", str(mixed.root), "--format", "coco", "--out", str(out)]) == 0
    checked = 0
    for split in ("train", "val"):
        coco = COCO(str(out / "annotations" / f"instances_{split}.json"))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(MIXED_NAMES)
        assert [c["id"] for c in coco.loadCats(coco.getCatIds())] == list(range(1, 7))
        for image in coco.loadImgs(coco.getImgIds()):
            truth = mixed.read_mask(image["diffumask_id"])
            assert (image["height"], image["width"]) == truth.shape
            assert (out / split / image["file_name"]).is_file()
            annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
            for label in range(1, 7):
                union = np.zeros(truth.shape, bool)
                for ann in (a for a in annotations if a["category_id"] == label):
                    assert isinstance(ann["segmentation"]["counts"], str) and ann["iscrowd"] == 0
                    pixels = mask_utils.decode(coco.annToRLE(ann)).astype(bool)
                    assert not (union & pixels).any()  # instances of a class do not overlap
                    union |= pixels
                    assert ann["area"] == pixels.sum()
                    ys, xs = np.nonzero(pixels)
                    assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                valid = truth != IGNORE_INDEX
                np.testing.assert_array_equal(union[valid], truth[valid] == label)
                assert not union[~valid].any()
            checked += 1
    assert checked == 12
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's owner-only 0700


def test_coco_instances_follow_the_items_objects(tmp_path):
    mask = np.zeros((6, 10), np.uint8)
    mask[1:4, 1:8] = 2  # two objects of class 2 touching each other: one connected component
    mask[1:4, 4] = IGNORE_INDEX
    objects = np.zeros_like(mask)
    objects[1:4, 1:4], objects[1:4, 5:8] = 1, 2
    objects[1:4, 4] = IGNORE_INDEX
    mask[5, 0] = 2  # a class pixel no object covers: still an instance, from its component
    assert len(instance_masks(mask)) == 3  # components: the block split in two by the 255 column, and the pixel
    mask[1:4, 4] = 2
    assert len(instance_masks(mask)) == 2  # joined by the column: one block, one pixel
    found = instance_masks(mask, objects)
    assert [label for label, _ in found] == [2, 2, 2, 2]
    assert [int(p.sum()) for _, p in found] == [9, 9, 3, 1]  # object 1, object 2, then the uncovered column, pixel


def test_shapes_world_exports_one_coco_instance_per_drawn_object(tmp_path):
    """The world knows its objects: an occluded object split in two is still one instance, and every
    instance has its object's class."""
    from pycocotools.coco import COCO

    from diffumask.shapes import export_world

    root = export_world(tmp_path / "shapes", 0, 0, 40)
    assert main(["export", str(root), "--format", "coco", "--out", str(tmp_path / "coco")]) == 0
    coco = COCO(str(tmp_path / "coco" / "annotations" / "instances_test.json"))
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    records = {r["id"]: r for r in Dataset(root).records()}
    split_components = 0
    for image in coco.loadImgs(coco.getImgIds()):
        record = records[image["diffumask_id"]]
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert sorted(names[a["category_id"]] for a in annotations) == sorted(o["class"] for o in record["objects"])
        mask = Dataset(root).read_mask(record["id"])
        split_components += len(instance_masks(mask)) - len(annotations)
    assert split_components != 0  # some scene's objects touch or are cut: components alone would miscount


def test_coco_panoptic_png_carries_the_semantic_mask(mixed, tmp_path):
    out = tmp_path / "coco"
    export_dataset(mixed.root, "coco", out)
    panoptic = json.loads((out / "annotations" / "panoptic_train.json").read_text())
    categories = {c["id"]: c for c in panoptic["categories"]}
    assert categories[0]["isthing"] == 0 and categories[3]["name"] == "road" and categories[3]["isthing"] == 1
    images = {i["id"]: i for i in panoptic["images"]}
    for annotation in panoptic["annotations"]:
        rgb = np.array(Image.open(out / "annotations" / "panoptic_train" / annotation["file_name"])).astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]  # panopticapi's rgb2id
        semantic = np.full(ids.shape, IGNORE_INDEX, np.uint8)
        for segment in annotation["segments_info"]:
            assert (ids == segment["id"]).sum() == segment["area"]
            semantic[ids == segment["id"]] = segment["category_id"]
        np.testing.assert_array_equal(semantic, mixed.read_mask(images[annotation["image_id"]]["diffumask_id"]))


def test_cityscapes_export_reads_back_through_the_label_table(mixed, tmp_path):
    out = tmp_path / "cityscapes"
    result = export_dataset(mixed.root, "cityscapes", out)
    assert "dog, tree" in result.notes[0]
    source = open_source(out)  # our Cityscapes reader: labelIds → train ids by the table
    assert source.format == "cityscapes"
    names = json.loads((out / "ids.json").read_text())
    train_id = {name: t for t, name in CITYSCAPES_TRAIN_IDS.values()}
    expected_lut = np.full(256, IGNORE_INDEX, np.uint8)
    for index, name in enumerate(MIXED_NAMES, start=1):
        expected_lut[index] = train_id.get(name, IGNORE_INDEX)
    assert sorted(expected_lut[1:7]) == [0, 10, 11, 13, 255, 255]  # road, sky, person, car; dog, tree ignored
    ids = source.ids("train") + source.ids("val")
    assert len(ids) == 12
    for cs_id in ids:
        image, labels = source.read(cs_id)
        truth = mixed.read_mask(names[cs_id])
        np.testing.assert_array_equal(labels, expected_lut[truth])
        np.testing.assert_array_equal(image, mixed.read_image(names[cs_id]))
        stored = read_index_png(out / "gtFine" / f"{cs_id}_gtFine_labelTrainIds.png")
        np.testing.assert_array_equal(stored, expected_lut[truth])
    val = [r["id"] for r in mixed.records() if r.get("split") == "val"]  # an item's name whatever --only picks
    export_dataset(mixed.root, "cityscapes", tmp_path / "val-only", only=["val"])
    assert json.loads((tmp_path / "val-only" / "ids.json").read_text()) == {k: v for k, v in names.items() if v in val}


def test_cityscapes_export_agrees_with_cityscapesscripts(mixed, tmp_path):
    labels = pytest.importorskip("cityscapesscripts.helpers.labels", reason="cityscapesscripts is not installed")
    out = tmp_path / "cityscapes"
    export_dataset(mixed.root, "cityscapes", out)
    for path in (out / "gtFine").glob("*/*/*_gtFine_labelIds.png"):
        label_ids = read_index_png(path)
        train_ids = read_index_png(path.with_name(path.name.replace("labelIds", "labelTrainIds")))
        for value in np.unique(label_ids):
            assert (train_ids[label_ids == value] == labels.id2label[int(value)].trainId).all()


def test_cityscapes_refuses_a_dataset_without_cityscapes_classes(tmp_path):
    data = make_dataset(tmp_path / "data", n=2, names=("circle", "square", "triangle", "star", "ring", "cross"),
                        soft_maps=False)
    with pytest.raises(ExportError, match="none of the classes"):
        export_dataset(data.root, "cityscapes", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("names", [MIXED_NAMES, ADE_NAMES])
def test_ade20k_export_reads_back_with_the_ade_reader(tmp_path, names):
    data = make_dataset(tmp_path / "data", n=6, names=names, soft_maps=False)
    out = tmp_path / "ade"
    result = export_dataset(data.root, "ade20k", out)
    source = open_source(out)  # our ADE20K reader: 0 "other" → 255, k → k
    assert source.format == "ade20k" and len(source.ids("train")) == 3 and len(source.ids("val")) == 3
    info = (out / "ADEChallengeData2016" / "objectInfo.csv").read_text().splitlines()
    if names == ADE_NAMES:
        assert not result.notes
        target = {i: ADE20K_CLASSES.index(n) + 1 for i, n in enumerate(names, start=1)}
        assert len(info) == 152
    else:
        assert result.notes[0].startswith("not ADE20K classes: dog;") and "own indices" in result.notes[0]
        target = {i: i for i in range(1, 7)}
        assert info[1:] == ["0,other", *(f"{i},{n}" for i, n in enumerate(names, start=1))]
    # train reads the classes by name: ADE's 150, or the dataset's own listed in objectInfo.csv
    assert list(source.label_names.values()) == (list(ADE20K_CLASSES) if names == ADE_NAMES else list(names))
    for split in ("train", "val"):
        for item in source.ids(split):
            image, labels = source.read(item)
            # a PNG source re-encoded as mmseg's .jpg keeps its colour at full resolution (4:4:4): no edge bleeds
            assert np.abs(image.astype(int) - data.read_image(item)).max() < 40
            truth = data.read_mask(item)
            expected = np.full(truth.shape, IGNORE_INDEX, np.uint8)  # background and 255 both read as 255
            for ours, theirs in target.items():
                expected[truth == ours] = theirs
            np.testing.assert_array_equal(labels, expected)
            raw = read_index_png(out / "ADEChallengeData2016" / "annotations" /
                                 {"train": "training", "val": "validation"}[split] / f"{item}.png")
            assert raw[truth == 0].max(initial=0) == 0 and raw[truth == IGNORE_INDEX].max(initial=0) == 0
    (out / "ADEChallengeData2016" / "objectInfo.csv").write_text("Idx,Ratio,Name\n1,0.1,wall\n")  # not ours
    with pytest.raises(SourceError, match="objectInfo.csv is not an Idx,Name table numbered 0, 1, 2"):
        open_source(out)


def test_ade20k_class_table_keeps_any_name_and_reads_a_spreadsheets_byte_order_mark(tmp_path):
    names = ("big, round circle", 'a "quoted" star', "ring", "cross", "square", "triangle")  # six, as make_dataset draws
    data = make_dataset(tmp_path / "data", n=2, names=names, soft_maps=False)
    export_dataset(data.root, "ade20k", tmp_path / "ade")
    assert list(open_source(tmp_path / "ade").label_names.values()) == list(names)
    table = tmp_path / "ade" / "ADEChallengeData2016" / "objectInfo.csv"
    table.write_text(table.read_text(encoding="utf-8"), encoding="utf-8-sig")  # saved again by a spreadsheet
    assert list(open_source(tmp_path / "ade").label_names.values()) == list(names)


def test_hf_export_loads_with_datasets(mixed, tmp_path):
    datasets = pytest.importorskip("datasets", reason="the hf extra (pip install 'diffumask[hf]') is not installed")
    out = tmp_path / "hf"
    assert main(["export", str(mixed.root), "--format", "hf", "--out", str(out)]) == 0
    loaded = datasets.load_from_disk(str(out))
    # Hugging Face's names, as transformers' semantic-segmentation examples read them
    assert sorted(loaded) == ["train", "validation"] and len(loaded["train"]) == len(loaded["validation"]) == 6
    assert isinstance(loaded["train"].features["label"], datasets.Image)
    id2label = json.loads((out / "id2label.json").read_text())
    assert id2label == {str(k): name for k, name in enumerate(["background", *mixed.classes])}
    assert [r["id"] for r in loaded["validation"]] == mixed.split_ids("val")
    records = {r["id"]: r for r in mixed.records()}
    for row in loaded["train"]:
        record = records[row["id"]]
        assert row["label"].mode == "P"  # the palette PNG as it was written
        assert row["label"].getpalette()[3:6] == [128, 0, 0]
        np.testing.assert_array_equal(np.array(row["label"]), mixed.read_mask(row["id"]))
        np.testing.assert_array_equal(np.array(row["image"].convert("RGB")), mixed.read_image(row["id"]))
        assert row["classes"] == record["classes"] and row["prompt"] == record["prompt"]
        assert row["seed"] == record["seed"] and row["size"] == record["size"] and row["split"] == "train"
        assert json.loads(row["tokens"]) == record["tokens"]


def test_hf_export_refuses_two_splits_it_would_name_alike(mixed, tmp_path, capsys):
    pytest.importorskip("datasets", reason="the hf extra (pip install 'diffumask[hf]') is not installed")
    data = tmp_path / "data"
    shutil.copytree(mixed.root, data)
    first = Dataset(data).split_ids("train")[0]
    Dataset(data).update_records({first: {"split": "validation"}})  # a split of that name beside VOC's val
    assert main(["export", str(data), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "both a 'val' and a 'validation' split" in capsys.readouterr().err


def test_export_refuses_a_taken_folder_and_a_non_dataset(mixed, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert main(["export", str(mixed.root), "--format", "coco", "--out", str(tmp_path / "taken")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(mixed.root), "--format", "coco", "--out", str(tmp_path / "taken" / "file")]) == 2
    assert "taken/file is a file; --out is the folder the export is written to" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--format", "ade20k", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffumask: error:") and "not a diffumask dataset" in err and err.count("\n") == 1


def abandoned(parent, name: str, age: float = 60.0):
    """A temporary folder as a killed run leaves it: a file in it, unlocked, unchanged for ``age`` seconds. ``{host}``
    in ``name`` is this machine's name."""
    path = parent / name.format(host=socket.gethostname())
    path.mkdir(parents=True)
    (path / "part.json").write_text("{")
    then = path.stat().st_mtime - age
    os.utime(path, (then, then))
    return path


def test_a_run_removes_the_temporary_folders_killed_runs_left_and_no_other(tmp_path):
    """A killed export or report leaves its hidden .<name>.<host>.<random>.tmp folder beside its output; the next
    run removes those no run holds and that have not changed for a while, never one a run at work holds (its lock),
    one made a moment ago, another output's, another machine's, or a folder of the user's named alike."""
    import fcntl

    from diffumask.dataset import temporary_folder

    killed = abandoned(tmp_path, ".out.{host}.k1ll3d_0.tmp")
    kept = [abandoned(tmp_path, ".out.{host}.y0ung000.tmp", age=0), abandoned(tmp_path, ".out.b.{host}.k1ll3d_0.tmp"),
            abandoned(tmp_path, ".out.elsewhere.k1ll3d_0.tmp"), abandoned(tmp_path, ".out.{host}.backup.tmp")]
    with temporary_folder(tmp_path, "out") as running:  # a run at work, its folder old by now
        then = running.stat().st_mtime - 60
        os.utime(running, (then, then))
        with temporary_folder(tmp_path, "out") as tmp:
            assert tmp.name.startswith(f".out.{socket.gethostname()}.") and tmp.name.endswith(".tmp") and tmp.is_dir()
            assert not killed.exists() and running.is_dir() and all(path.is_dir() for path in kept)
            probe = os.open(running, os.O_RDONLY)
            with pytest.raises(BlockingIOError):
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.close(probe)
            tmp.rename(tmp_path / "out")  # renamed into place, as export does
    with pytest.raises(KeyError), temporary_folder(tmp_path, "out") as failed:
        raise KeyError
    assert not failed.exists()  # a failed run's is removed at once


@pytest.mark.parametrize("fmt", ["coco", "hf"])
def test_an_export_removes_what_a_killed_export_left_beside_its_output(mixed, tmp_path, fmt):
    """Killed while it writes (SIGKILL: nothing of its own clean-up runs), an export leaves its hidden folder (the
    hf export's Arrow cache inside it); the next export removes it once it has stood for a while."""
    if fmt == "hf":
        pytest.importorskip("datasets", reason="the hf extra (pip install 'diffumask[hf]') is not installed")
    out = tmp_path / "exports" / fmt
    killed = subprocess.run([sys.executable, "-c", f"""
import os, signal, sys
import diffumask.formats.export as export
killer = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
if {fmt!r} == "hf":
    import datasets
    datasets.Dataset.from_generator = killer
else:
    export.write_palette_png = export.Image.Image.save = killer
export.export_dataset(sys.argv[1], {fmt!r}, sys.argv[2])
""", str(mixed.root), str(out)], capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()
    [left] = (tmp_path / "exports").iterdir()
    assert left.name.startswith(f".{fmt}.") and left.is_dir()
    then = time.time() - 60
    os.utime(left, (then, then))
    export_dataset(mixed.root, fmt, out)
    assert [p.name for p in (tmp_path / "exports").iterdir()] == [fmt]
    assert not (out / ".arrow-cache").exists()


def test_a_report_removes_what_a_killed_report_left_beside_it(mixed, tmp_path):
    from diffumask.report import build_report

    for name in (".r_files.{host}.k1ll3d_0.tmp", ".r_files.{host}.k1ll3d_1.tmp"):  # its folder, the one it replaced
        abandoned(tmp_path, name)
    build_report(mixed.root, tmp_path / "r.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "r_files"]


def test_only_the_listed_items_are_exported_each_under_its_split(mixed, tmp_path, capsys):
    """What filter kept of train, plus val: `--only filtered val`."""
    from pycocotools.coco import COCO

    data = tmp_path / "data"
    shutil.copytree(mixed.root, data)
    kept = mixed.split_ids("train")[::2]
    (data / "ImageSets" / "Segmentation" / "filtered.txt").write_text("".join(f"{i}\n" for i in kept))
    out = tmp_path / "coco"
    assert main(["export", str(data), "--format", "coco", "--out", str(out), "--only", "filtered", "val"]) == 0
    exported = {split: sorted(image["diffumask_id"] for image in COCO(str(out / "annotations" /
                                                                       f"instances_{split}.json")).dataset["images"])
                for split in ("train", "val")}
    assert exported == {"train": sorted(kept), "val": sorted(mixed.split_ids("val"))}
    assert json.loads((out / "export.json").read_text())["items"] == len(kept) + len(mixed.split_ids("val"))
    capsys.readouterr()
    assert main(["export", str(data), "--format", "coco", "--out", str(tmp_path / "x"), "--only", "kept"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no item list 'kept'" in err and "it has: filtered, train, val" in err and "\n" not in err


def test_an_unfinished_dataset_is_exported_and_reported_with_a_warning(mixed, tmp_path, capsys):
    """A stopped sharded run, or a stopped refine, was exported (or reported) as it stood, silently: only the items
    finished so far, or refined masks beside earlier ones."""
    root = tmp_path / "data"
    shutil.copytree(mixed.root, root)
    assert main(["export", str(root), "--format", "coco", "--out", str(tmp_path / "whole")]) == 0
    assert "warning" not in capsys.readouterr().err
    (root / "manifest.jsonl").rename(root / "manifest.0.jsonl")  # a sharded run, stopped before its merge
    assert main(["export", str(root), "--format", "coco", "--out", str(tmp_path / "sharded")]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"diffumask: warning: {root} is not finished: a sharded run on it stopped before its end (its manifest "
        "shards are not merged), so it holds only the items finished so far: re-run that command, with any number "
        "of workers, to finish"]
    (root / "manifest.0.jsonl").rename(root / "manifest.jsonl")
    first = (root / "manifest.jsonl").read_text().splitlines()[0]
    with open(root / "manifest.jsonl", "a") as manifest:  # a refine's line for one item, and no compaction yet
        manifest.write(json.dumps({**json.loads(first), "rev": 1}) + "\n")
    assert main(["report", str(root), "--out", str(tmp_path / "report.html")]) == 0
    assert "a refine on it stopped before its end" in capsys.readouterr().err
