"""IoU accumulation against torchmetrics, and the evaluation's class matching against hand counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffumask.errors import ConfigError
from diffumask.metrics import ConfusionMatrix, harmonic_mean
from diffumask.segment.evaluate import Scorer, parse_unseen


def _random_maps(rng: np.random.Generator, classes: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    pairs = []
    for _ in range(count):
        truth = rng.integers(0, classes, size=(13, 17))
        truth[rng.random(truth.shape) < 0.15] = 255
        prediction = np.where(rng.random(truth.shape) < 0.6, truth, rng.integers(0, classes, size=truth.shape))
        prediction[prediction == 255] = 0
        pairs.append((prediction, truth))
    return pairs


def test_dataset_accumulated_iou_matches_torchmetrics():
    from torchmetrics.classification import MulticlassJaccardIndex

    rng = np.random.default_rng(0)
    classes = 6
    pairs = _random_maps(rng, classes - 1, 7)  # class 5 never occurs: absent from both sides
    ours = ConfusionMatrix(classes)
    reference = MulticlassJaccardIndex(num_classes=classes, average="macro", ignore_index=255)
    for prediction, truth in pairs:
        ours.update(prediction, truth)
        reference.update(torch.from_numpy(prediction), torch.from_numpy(truth))
    assert math.isnan(ours.iou()[5])
    assert ours.mean_iou() == pytest.approx(float(reference.compute()), abs=1e-6)
    # per image averaging would give another number: accumulation is over the whole set
    per_image = []
    for prediction, truth in pairs:
        single = ConfusionMatrix(classes)
        single.update(prediction, truth)
        per_image.append(single.mean_iou())
    assert abs(np.mean(per_image) - ours.mean_iou()) > 1e-4


def test_iou_by_direct_count():
    truth = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    prediction = np.array([[0, 1, 1, 1], [2, 0, 1, 2]])
    matrix = ConfusionMatrix(3)
    matrix.update(prediction, truth)
    # class 0: tp 1, truth 2, predicted 2 → 1/3; class 1: tp 2, truth 2, predicted 3 → 2/3; class 2: 1/2
    assert matrix.iou() == pytest.approx([1 / 3, 2 / 3, 1 / 2])


def test_scorer_matches_names_and_counts_unknown_truth_as_errors():
    run_classes = ["background", "airplane", "tv monitor", "unicorn"]
    label_names = {0: "background", 1: "aeroplane", 2: "bicycle", 20: "tvmonitor"}
    scorer = Scorer(run_classes, label_names)
    assert scorer.classes == ["background", "aeroplane", "tvmonitor"]
    assert scorer.not_in_run == ["bicycle"]
    truth = np.array([[0, 1, 1, 2, 2, 20, 255]], np.uint8)
    prediction = np.array([[0, 1, 0, 1, 3, 2, 1]], np.uint8)  # run indices; 3 = unicorn
    scorer.update(prediction, truth)
    result = scorer.result()
    # background: tp 1, truth 1, pred 2 → 1/2; aeroplane: tp 1, truth 2, pred 2 (one on a bicycle pixel) → 1/3;
    # tv monitor: tp 1, truth 1, pred 1 → 1
    assert result.iou == pytest.approx([1 / 2, 1 / 3, 1.0])
    assert result.miou == pytest.approx((1 / 2 + 1 / 3 + 1) / 3)


def test_zero_shot_report_excludes_background():
    run_classes = ["background", "a", "b", "c"]
    scorer = Scorer(run_classes, dict(enumerate(run_classes)), unseen=["c"])
    truth = np.array([[0, 1, 1, 2, 3, 3]], np.uint8)
    prediction = np.array([[1, 1, 1, 2, 3, 0]], np.uint8)
    scorer.update(prediction, truth)
    result = scorer.result()
    iou = dict(zip(result.classes, result.iou))
    assert result.seen == pytest.approx((iou["a"] + iou["b"]) / 2)
    assert result.unseen == pytest.approx(iou["c"])
    assert result.harmonic == pytest.approx(2 * result.seen * result.unseen / (result.seen + result.unseen))
    assert harmonic_mean(71.4, 65.0) == pytest.approx(68.05, abs=0.01)  # the paper's own check


def test_cityscapes_protocol_merges_and_ignores():
    from diffumask.formats.tables import CITYSCAPES_TRAIN_IDS

    names = {train_id: name for train_id, name in CITYSCAPES_TRAIN_IDS.values()}
    scorer = Scorer(["background", "person", "car", "bus"], names, protocol="cityscapes-human-vehicle")
    assert scorer.classes == ["human", "vehicle"]
    truth = np.array([[11, 12, 13, 15, 0, 17]], np.uint8)  # person, rider, car, bus, road, motorcycle
    prediction = np.array([[1, 1, 3, 2, 2, 1]], np.uint8)  # person, person, bus, car, car (on road), person
    scorer.update(prediction, truth)
    result = scorer.result()
    # human: tp 2, truth 2, pred 2 (motorcycle pixel ignored) → 1; vehicle: tp 2, truth 2, pred 3 (road) → 2/3
    assert result.iou == pytest.approx([1.0, 2 / 3])


def test_scorer_errors():
    with pytest.raises(ConfigError, match="none in common"):
        Scorer(["background", "dog"], {1: "car", 2: "bus"})
    with pytest.raises(ConfigError, match="reports human, vehicle, and the evaluation set has none"):
        Scorer(["background", "circle"], {0: "background", 1: "circle"}, protocol="cityscapes-human-vehicle")
    with pytest.raises(ConfigError, match="not among the evaluated classes"):
        Scorer(["background", "a"], {0: "background", 1: "a"}, unseen=["zebra"])
    with pytest.raises(ConfigError, match="names every evaluated class"):
        Scorer(["background", "a", "b"], {0: "background", 1: "a", 2: "b"}, unseen=["a", "b"])
    assert parse_unseen("voc") == ["potted plant", "sheep", "sofa", "train", "tv monitor"]
    with pytest.raises(ConfigError):
        parse_unseen(" , ")
