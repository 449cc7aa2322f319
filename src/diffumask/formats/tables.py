"""Label tables of the public benchmarks, as data.

Sources: Pascal VOC 2012 devkit (``VOCdevkit/devkit_doc``: 20 classes plus background, 255 is the
object boundary "void"); Cityscapes ``cityscapesscripts/helpers/labels.py`` (the 19 evaluated classes:
label id → train id, every other id → 255); ADE20K SceneParsing ``objectInfo150`` (the 150 classes of
ADEChallengeData2016 in index order 1…150, 0 = "other", not evaluated) with the short names mmseg uses.
"""

from __future__ import annotations

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

#: Cityscapes label id → (train id, name) for the 19 evaluated classes.
CITYSCAPES_TRAIN_IDS: dict[int, tuple[int, str]] = {
    7: (0, "road"), 8: (1, "sidewalk"), 11: (2, "building"), 12: (3, "wall"), 13: (4, "fence"),
    17: (5, "pole"), 19: (6, "traffic light"), 20: (7, "traffic sign"), 21: (8, "vegetation"),
    22: (9, "terrain"), 23: (10, "sky"), 24: (11, "person"), 25: (12, "rider"), 26: (13, "car"),
    27: (14, "truck"), 28: (15, "bus"), 31: (16, "train"), 32: (17, "motorcycle"), 33: (18, "bicycle"),
}

ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)
assert len(ADE20K_CLASSES) == 150 and len(VOC_CLASSES) == 21 and len(CITYSCAPES_TRAIN_IDS) == 19
