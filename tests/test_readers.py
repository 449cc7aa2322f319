"""Readers of the real benchmarks' layouts, each on a tiny folder built in that exact layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffumask.dataset import write_palette_png
from diffumask.formats import SourceError, match_names, open_source


def _image(path: Path, h: int = 6, w: int = 8, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


def _grey_png(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.astype(np.uint8), mode="L").save(path)


def test_voc_layout_with_aug_fallback(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    labels = np.zeros((6, 8), np.uint8)
    labels[1:3, 2:5] = 15  # person
    labels[0, :] = 255
    for name in ("2007_000032", "2008_000001"):
        _image(root / "JPEGImages" / f"{name}.jpg")
    write_palette_png(root / "SegmentationClass" / "2007_000032.png", labels)
    _grey_png(root / "SegmentationClassAug" / "2008_000001.png", labels)  # SBD masks are greyscale
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("2007_000032\n2008_000001\n")
    source = open_source(tmp_path / "VOCdevkit")
    assert source.format == "voc" and source.label_names[15] == "person" and len(source.label_names) == 21
    assert source.ids("train_aug") == ["2007_000032", "2008_000001"]
    for item in source.ids("train_aug"):
        image, read = source.read(item)
        assert image.shape == (6, 8, 3)
        np.testing.assert_array_equal(read, labels)
    with pytest.raises(SourceError, match="no split 'val'.*train_aug"):
        source.ids("val")


def test_cityscapes_label_ids_become_train_ids(tmp_path):
    root = tmp_path / "cityscapes"
    stem = "aachen_000000_000019"
    _image(root / "leftImg8bit" / "val" / "aachen" / f"{stem}_leftImg8bit.png")
    label_ids = np.array([[7, 26, 24, 0, 33, 1, 31, 3]] * 6, np.uint8)  # road, car, person, unlabeled, bicycle, ...
    _grey_png(root / "gtFine" / "val" / "aachen" / f"{stem}_gtFine_labelIds.png", label_ids)
    source = open_source(root)
    assert source.format == "cityscapes"
    assert source.ids("val") == [f"val/aachen/{stem}"]
    _, labels = source.read(f"val/aachen/{stem}")
    np.testing.assert_array_equal(labels[0], [0, 13, 11, 255, 18, 255, 16, 255])
    assert source.label_names[13] == "car" and len(source.label_names) == 19


def test_ade20k_zero_is_ignored(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    _image(root / "images" / "validation" / "ADE_val_00000001.jpg")
    _image(root / "images" / "training" / "ADE_train_00000001.jpg")
    annotation = np.array([[0, 1, 13, 150, 21, 0, 0, 3]] * 6, np.uint8)
    _grey_png(root / "annotations" / "validation" / "ADE_val_00000001.png", annotation)
    _grey_png(root / "annotations" / "training" / "ADE_train_00000001.png", annotation)
    source = open_source(f"ade20k:{tmp_path}")
    assert source.ids("val") == ["ADE_val_00000001"] and source.ids("train") == ["ADE_train_00000001"]
    _, labels = source.read("ADE_val_00000001")
    np.testing.assert_array_equal(labels[0], [255, 1, 13, 150, 21, 255, 255, 3])
    assert (source.label_names[1], source.label_names[13], source.label_names[21], source.label_names[150]) == \
        ("wall", "person", "car", "flag")


def test_our_dataset_and_detection_errors(tmp_path):
    from diffumask.shapes import export_world

    export_world(tmp_path / "shapes", 3, 0, 2)
    source = open_source(tmp_path / "shapes")
    assert source.format == "diffumask" and source.label_names[1] == "circle"
    assert len(source.ids("test")) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="none of the layouts"):
        open_source(tmp_path / "empty")
    with pytest.raises(SourceError, match="not a folder"):
        open_source(f"voc:{tmp_path / 'missing'}")


def test_name_matching_prefers_exact_names_over_aliases():
    assert match_names(["pottedplant", "tvmonitor", "aeroplane"], ["potted plant", "tv monitor", "airplane"]) == \
        {"pottedplant": "potted plant", "tvmonitor": "tv monitor", "aeroplane": "airplane"}
    # ADE has both 'plant' and no 'potted plant': the alias fills in; with an exact name present it does not
    assert match_names(["potted plant"], ["plant", "tree"]) == {"potted plant": "plant"}
    assert match_names(["plant", "potted plant"], ["plant", "potted plant"]) == {"plant": "plant",
                                                                                  "potted plant": "potted plant"}
    assert match_names(["dog"], ["cat"]) == {}
    # Every VOC class that ADE20K's 150 hold under some name finds it (motorbike is ADE's 'minibike')
    from diffumask.formats.tables import ADE20K_CLASSES

    voc_in_ade = {"aeroplane": "airplane", "bicycle": "bicycle", "boat": "boat", "bottle": "bottle", "bus": "bus",
                  "car": "car", "chair": "chair", "diningtable": "table", "motorbike": "minibike", "person": "person",
                  "pottedplant": "plant", "sofa": "sofa", "tvmonitor": "monitor"}
    assert match_names(voc_in_ade, ADE20K_CLASSES) == voc_in_ade
