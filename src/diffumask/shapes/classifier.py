"""Judging generated shapes images: where the object is (by chroma) and which shape it has.

The ground truth of a *generated* image is not known, but the world makes it readable: objects
are saturated and backgrounds grey, so an object's pixels are those whose chroma stands out from
the background's (a plain saturation threshold fails when the model tints the background). The
background's chroma is a low percentile of the image's, not its median: an object covering half the
image (the generator's big circles) would be the median and vanish. Which shape those pixels form
is judged by a tiny CNN trained on the world's exact masks only, with erosion/dilation and speckle
noise so that it tolerates a generator's ragged edges. Its weights ship beside this file and are reproduced by

    python -m diffumask.shapes.classifier --out src/diffumask/shapes/classifier.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy import ndimage

from .world import CLASSES, PALETTE, render_scene

CLASSIFIER_PATH = Path(__file__).parent / "classifier.safetensors"
CROP = 24
#: A pixel belongs to an object when its chroma exceeds the background's by this much (0-255).
CHROMA_MARGIN = 70
#: The percentile of an image's chroma taken as its background's: right while objects cover under 90 %.
BACKGROUND_PERCENTILE = 10
#: Objects smaller than this many pixels (of a 32x32 image) count as absent.
MIN_OBJECT_PIXELS = 12


def chroma(image: np.ndarray) -> np.ndarray:
    """max(R, G, B) - min(R, G, B) per pixel: zero on the world's grey backgrounds."""
    image = image.astype(np.int16)
    return image.max(axis=2) - image.min(axis=2)


def foreground(image: np.ndarray) -> np.ndarray:
    """Pixels whose chroma stands out from the background's (the generated objects)."""
    c = chroma(image)
    return c > np.percentile(c, BACKGROUND_PERCENTILE) + CHROMA_MARGIN


def object_masks(image: np.ndarray, colours: list[str]) -> dict[str, np.ndarray]:
    """Split the foreground between the requested colours by nearest palette colour (RGB)."""
    fg = foreground(image)
    if len(colours) == 1:
        return {colours[0]: fg}
    palette = np.array([PALETTE[c] for c in colours], np.float32)
    dist = np.linalg.norm(image.astype(np.float32)[:, :, None, :] - palette[None, None], axis=-1)
    nearest = dist.argmin(axis=2)
    return {c: fg & (nearest == k) for k, c in enumerate(colours)}


def clean(mask: np.ndarray) -> np.ndarray:
    """Drop specks: keep connected components holding at least 10 % of the mask's largest one."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
    return np.isin(labels, 1 + np.flatnonzero(sizes >= 0.1 * sizes.max()))


def is_present(mask: np.ndarray) -> bool:
    """The object exists: its largest connected component has at least MIN_OBJECT_PIXELS."""
    labels, n = ndimage.label(mask)
    return n > 0 and ndimage.sum(mask, labels, index=np.arange(1, n + 1)).max() >= MIN_OBJECT_PIXELS


def normalise(mask: np.ndarray) -> torch.Tensor:
    """Crop a binary mask to its bounding box, pad to a square and resize to CROP x CROP."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return torch.zeros(1, CROP, CROP)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
    side = max(box.shape) + 2
    square = np.zeros((side, side), np.float32)
    top, left = (side - box.shape[0]) // 2, (side - box.shape[1]) // 2
    square[top:top + box.shape[0], left:left + box.shape[1]] = box
    tensor = torch.from_numpy(square)[None, None]
    return F.interpolate(tensor, size=(CROP, CROP), mode="bilinear", align_corners=False)[0]


class ShapeClassifier(torch.nn.Module):
    """Three conv layers and a linear head on a normalised 24x24 object mask."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveMaxPool2d(1),
        )
        self.head = torch.nn.Linear(64, len(CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))

    @torch.no_grad()
    def predict(self, masks: list[np.ndarray]) -> list[str]:
        """Class name for each binary object mask."""
        if not masks:
            return []
        logits = self(torch.stack([normalise(m) for m in masks]))
        return [CLASSES[i] for i in logits.argmax(1).tolist()]


def _augment(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Ragged-edge variants of an exact mask, as a generator draws them."""
    r = rng.random()
    if r < 0.25:
        mask = ndimage.binary_erosion(mask) if mask.sum() > 60 else mask
    elif r < 0.5:
        mask = ndimage.binary_dilation(mask)
    edge = mask ^ ndimage.binary_erosion(mask)
    flips = edge & (rng.random(mask.shape) < 0.15)
    return mask ^ flips


def training_masks(n: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    """Exact single-object masks from the world (seeds disjoint from exports and model training)."""
    rng = np.random.default_rng(seed)
    masks, labels = [], []
    for i in range(n):
        scene = render_scene(2**39 + seed * 2**20 + i, num_objects=1)
        masks.append(_augment(scene.mask > 0, rng))
        labels.append(CLASSES.index(scene.objects[0][0]))
    return masks, labels


def train_classifier(n: int = 6000, epochs: int = 8, seed: int = 0) -> ShapeClassifier:
    """Train deterministically (seeded data, init and order) in well under a minute on 2 cores."""
    torch.manual_seed(seed)
    masks, labels = training_masks(n, seed)
    x = torch.stack([normalise(m) for m in masks])
    y = torch.tensor(labels)
    model = ShapeClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(n).split(128):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def load_classifier(path: str | Path = CLASSIFIER_PATH) -> ShapeClassifier:
    """The shipped shape classifier."""
    model = ShapeClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffumask.shapes.classifier",
                                     description="Train the shape classifier on the world's exact masks.")
    parser.add_argument("--out", default=str(CLASSIFIER_PATH))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = train_classifier(seed=args.seed)
    masks, labels = training_masks(2000, seed=args.seed + 1000)
    accuracy = np.mean([CLASSES.index(p) == y for p, y in zip(model.predict(masks), labels)])
    print(f"held-out accuracy on augmented world masks: {accuracy:.4f}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out)


if __name__ == "__main__":
    main()
