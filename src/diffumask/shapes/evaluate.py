"""Measure a shapes model: is the requested object there, has it the right shape, does its mask fit.

This is issue 4's yardstick, shared by ``bench/bench_shapes.py`` and the tests. Prompts name one
or two objects with colours and a background, drawn deterministically from a seed; each image is
generated with its own seeded generator, its class maps come from the attention recorder with the
default aggregation, and the mask is the map thresholded at a fixed gamma. Truth for the mask is
the object's pixels read back by chroma (and split by colour when there are two objects), the
shape is judged by :mod:`.classifier`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from diffumask import trace

from .classifier import ShapeClassifier, clean, is_present, object_masks
from .model import ShapesPipeline, to_uint8
from .world import CLASSES, COLOURS, TEXTURES, caption_for

GAMMA_SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class Sample:
    """One generated image with its prompt, requested objects, maps and judgements."""

    prompt: str
    objects: list[tuple[str, str]]  # (class, colour)
    image: np.ndarray  # (H, W, 3) uint8
    maps: dict[str, np.ndarray]  # class -> fused soft map in [0, 1]
    truth: dict[str, np.ndarray] = field(default_factory=dict)  # class -> object pixels
    present: dict[str, bool] = field(default_factory=dict)
    shape: dict[str, str | None] = field(default_factory=dict)  # judged shape of the object


def prompts_for(num_objects: int, count: int, seed: int) -> list[tuple[str, list[tuple[str, str]]]]:
    """``count`` prompts per class (single objects) or per first class (pairs), deterministic."""
    rng = np.random.default_rng([seed, num_objects])
    out = []
    for c in CLASSES:
        for _ in range(count):
            classes = [c] + ([str(rng.choice([o for o in CLASSES if o != c]))] if num_objects == 2 else [])
            colours = [str(x) for x in rng.choice(COLOURS, size=num_objects, replace=False)]
            objects = list(zip(classes, colours))
            out.append((caption_for(objects, str(rng.choice(TEXTURES))), objects))
    return out


def generate(pipe: ShapesPipeline, prompts: list[tuple[str, list[tuple[str, str]]]], seed: int,
             batch_size: int = 120, recorder: dict[str, object] | None = None,
             **call: object) -> tuple[list[Sample], float]:
    """Generate with the recorder attached (``recorder``: its options, e.g. a DiT's ``block_window``);
    returns samples and seconds per image (with recording)."""
    samples: list[Sample] = []
    start = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        chunk = prompts[first:first + batch_size]
        texts = [p for p, _ in chunk]
        generators = [torch.Generator().manual_seed(seed + first + i) for i in range(len(chunk))]
        with trace(pipe, texts, classes=[[c for c, _ in objs] for _, objs in chunk], **(recorder or {})) as tr:
            images = pipe(texts, generator=generators, output_type="np", **call).images
        for (text, objs), image, maps in zip(chunk, to_uint8(images), tr.maps()):
            samples.append(Sample(text, objs, image, {c: maps[c] for c, _ in objs}))
    return samples, (time.perf_counter() - start) / len(prompts)


def judge(samples: list[Sample], classifier: ShapeClassifier) -> None:
    """Fill in each sample's truth masks, presence and judged shapes."""
    for s in samples:
        regions = object_masks(s.image, [colour for _, colour in s.objects])
        for c, colour in s.objects:
            truth = clean(regions[colour])
            s.truth[c] = truth
            s.present[c] = is_present(truth)
            s.shape[c] = classifier.predict([truth])[0] if s.present[c] else None


def miou(samples: list[Sample], gamma: float) -> float:
    """Mean over classes of IoU(map >= gamma, object pixels), pixels pooled over a class's images."""
    inter = dict.fromkeys(CLASSES, 0)
    union = dict.fromkeys(CLASSES, 0)
    for s in samples:
        for c in s.maps:
            pred = s.maps[c] >= gamma
            inter[c] += int((pred & s.truth[c]).sum())
            union[c] += int((pred | s.truth[c]).sum())
    return float(np.mean([inter[c] / union[c] for c in CLASSES if union[c]]))


def summarise(samples: list[Sample], gamma: float) -> dict[str, object]:
    """Presence %, right-shape %, mIoU at gamma (and a gamma sweep), overall and per class."""
    pairs = [(s, c) for s in samples for c in s.maps]
    per_class = {}
    for cls in CLASSES:
        mine = [(s, c) for s, c in pairs if c == cls]
        per_class[cls] = {"present": np.mean([s.present[c] for s, c in mine]),
                          "right_shape": np.mean([s.shape[c] == c for s, c in mine])}
    return {
        "images": len(samples),
        "objects": len(pairs),
        "present": float(np.mean([s.present[c] for s, c in pairs])),
        "right_shape": float(np.mean([s.shape[c] == c for s, c in pairs])),
        "gamma": gamma,
        "miou": miou(samples, gamma),
        "miou_sweep": {g: miou(samples, g) for g in GAMMA_SWEEP},
        "per_class": {k: {m: float(v) for m, v in d.items()} for k, d in per_class.items()},
    }
