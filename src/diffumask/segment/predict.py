"""``diffumask predict``: a trained run's label map for every image of a split.

An image is resized so its short side is the run's training crop (the scale it learnt at), the class
scores are resized back to the image's own size, and the argmax is the prediction, in the run's
class indices (``RUN/classes.json``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..dataset import read_label_map, write_label_map, write_palette_png, write_text_atomic
from ..distributed import require_one_process
from ..errors import ConfigError
from ..formats import LabelledSource, open_source
from ..models import check_device
from .data import normalise, resize_short_side
from .model import Segmenter
from .run import RunFolder


def pick_device(device: str | None) -> torch.device:
    return check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@torch.no_grad()
def predict_images(segmenter: Segmenter, images: list[np.ndarray], short_side: int) -> list[np.ndarray]:
    """Label maps (uint8, run indices) for images of one size, in one forward pass."""
    device = next(segmenter.parameters()).device
    height, width = images[0].shape[:2]
    pixels = torch.stack([normalise(resize_short_side(image, None, short_side)[0]) for image in images]).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        scores = segmenter.scores(pixels)
    scores = F.interpolate(scores.float(), size=(height, width), mode="bilinear", align_corners=False)
    return list(scores.argmax(dim=1).to(torch.uint8).cpu().numpy())


def iter_predictions(run: RunFolder, source: LabelledSource, split: str, device: str | None = None,
                     batch_size: int = 16, progress: bool = True,
                     ids: list[str] | None = None) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(id, prediction, truth) for every item of ``split`` (or of ``ids``); truth in the source's values."""
    segmenter = run.load_segmenter().to(pick_device(device)).eval()
    short_side = run.preset.schedule.crop
    ids = source.ids(split) if ids is None else ids
    bar = tqdm(total=len(ids), unit="img", desc="predict", disable=not progress)
    pending: list[tuple[str, np.ndarray, np.ndarray]] = []

    def flush() -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        predictions = predict_images(segmenter, [image for _, image, _ in pending], short_side)
        for (item_id, _, truth), prediction in zip(pending, predictions):
            yield item_id, prediction, truth
        bar.update(len(pending))
        pending.clear()

    for item_id in ids:
        image, truth = source.read(item_id)
        if pending and (len(pending) == batch_size or pending[0][1].shape != image.shape):
            yield from flush()
        pending.append((item_id, image, truth))
    if pending:
        yield from flush()
    bar.close()


PREDICTED_BY = "predicted_by.json"  # in a predictions folder: the run and the weights that made its predictions
NOT_PREDICTIONS = ("dataset.json", "manifest.jsonl", "JPEGImages", "ImageSets", "settings.json", "checkpoint.pt")


def predict_folder(run_dir: str | Path | RunFolder, data: str | Path, out: str | Path, split: str = "test",
                   device: str | None = None, batch_size: int = 16, progress: bool = True) -> Path:
    """Write ``out/<id>.png`` (palette PNGs in the run's indices) and ``out/classes.json``; images already
    predicted are skipped, so a killed run resumes."""
    require_one_process("predict")
    run = RunFolder.of(run_dir)
    source = open_source(data)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; predictions go into a folder")
    if other := next((name for name in NOT_PREDICTIONS if (out / name).exists()), None):
        raise ConfigError(f"--out {out} holds {other}, so it is a dataset or a run, not a predictions folder; "
                          "choose a new folder")
    if (out / "classes.json").is_file() and read_label_map(out) != run.classes:
        raise ConfigError(f"{out} holds predictions of other classes ({', '.join(read_label_map(out))}); "
                          "choose another --out")
    made_by = {"run": str(run.root.resolve()), "weights_sha256": run.weights_sha256()}  # no weights: refused here
    earlier = json.loads((out / PREDICTED_BY).read_text()) if (out / PREDICTED_BY).is_file() else None
    if earlier and earlier["weights_sha256"] != made_by["weights_sha256"] and any(out.rglob("*.png")):
        which = ("this run as it was before (it trained on since)" if earlier["run"] == made_by["run"]
                 else f"another run ({earlier['run']})")
        raise ConfigError(f"{out} holds predictions of {which}, which a re-run would keep beside these; "
                          "choose another --out, or delete it to predict again")
    todo = [i for i in source.ids(split) if not (out / f"{i}.png").is_file()]
    if not (out / "classes.json").is_file():
        write_label_map(out, run.classes)
    if earlier != made_by:  # a new folder, a moved run, or one left before its first image or before this record
        write_text_atomic(out / PREDICTED_BY, json.dumps(made_by, indent=1) + "\n")
    for item_id, prediction, _ in iter_predictions(run, source, split, device, batch_size, progress, ids=todo):
        write_palette_png(out / f"{item_id}.png", prediction)
    return out
