"""AffinityNet (Ahn & Kwak, CVPR 2018), as DiffuMask uses it: learn which neighbouring pixels
belong together from confident seeds, then spread the soft maps along those affinities.

The backbone is a small ConvNeXt-style CNN (depthwise dilated convolutions, GroupNorm, GELU)
instead of PSA's ResNet-38: it trains in seconds on a CPU for the 32 px shapes world and runs
at output stride 8 on 512 px images (a 64×64 feature grid, as in PSA). One network is trained
per dataset on all its images (affinities do not depend on the class; the paper trains one per
class). Weights of the same architecture — from another dataset, or trained longer elsewhere —
can initialise it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..dataset import IGNORE_INDEX
from ..errors import ConfigError
from .assign import assign_labels
from .crf import SEED_CRF, CRFParams, crf_refine
from .otsu import otsu_threshold
from .propagate import grid_affinity_matrix, half_disc_offsets, pair_slices, random_walk, resize_maps, transition_matrix

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: How pixel seeds become feature-grid seeds (see :func:`grid_labels`).
SEED_GRID_RULES = ("unanimous", "vote")


@dataclass(frozen=True)
class AffinityConfig:
    """Architecture, training and random-walk settings (PSA's values where they carry over)."""

    stride: int | None = None  # feature-grid stride; None: 8 at 512 px, down to 1 for images ≤ 64 px
    width: int = 32
    feature_dim: int = 64
    blocks: int = 4  # residual blocks at the feature stride, dilations 1, 2, 4, 8, ...
    radius: int = 5  # pixel pairs closer than this (in grid cells) get an affinity
    train_steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    crop: int = 448
    seed: int = 0
    beta: float = 16.0  # a_ij^β before normalisation
    walk_steps: int = 64
    background: float = 0.45  # constant background score the walked maps must beat
    stretch: bool = True  # min–max stretch each map before the walk (their floor varies per image)
    seed_offset_fg: float = 0.0  # added to the confident-foreground threshold (paper's δ_la)
    seed_offset_bg: float = 0.0  # added to the confident-background threshold (paper's δ_ha)
    seed_crf: bool = True  # CRF-refine the seeds (paper; needs the crf extra)
    seed_grid: str = "unanimous"  # seeds on the feature grid: "unanimous" cells only, or PSA-like "vote"

    def __post_init__(self) -> None:
        if self.seed_grid not in SEED_GRID_RULES:
            raise ConfigError(f"unknown seed grid rule {self.seed_grid!r}; choose one of {', '.join(SEED_GRID_RULES)}")
        if not 0 < self.background < 1:
            raise ConfigError(f"--affinity-background must lie strictly between 0 and 1 (the walked maps do), "
                              f"got {self.background}")
        if self.walk_steps < 0 or self.train_steps < 0:
            raise ConfigError("--walk-steps and --affinity-steps must be 0 or more")
        if not self.beta > 0:
            raise ConfigError(f"--beta must be positive, got {self.beta}")
        if self.radius < 2 or self.batch_size < 1 or self.crop < 1 or self.width < 1 or self.blocks < 0:
            raise ConfigError("the AffinityNet needs radius ≥ 2, batch size ≥ 1, a positive crop and width")
        if self.stride is not None and (self.stride < 1 or self.stride & (self.stride - 1)):
            raise ConfigError(f"the AffinityNet stride must be a power of two, got {self.stride}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def training_dict(self) -> dict[str, Any]:
        """The fields a trained network depends on (not the random-walk ones)."""
        walk = {"beta", "walk_steps", "background", "stretch"}
        return {k: v for k, v in asdict(self).items() if k not in walk}

    def grid_stride(self, size: tuple[int, int]) -> int:
        if self.stride is not None:
            return self.stride
        return int(min(8, max(1, 2 ** math.floor(math.log2(max(1, max(size) // 64))))))


class _Block(nn.Module):
    """Depthwise dilated 3×3 conv, GroupNorm, pointwise MLP, residual (ConvNeXt-style)."""

    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, groups=channels)
        self.norm = nn.GroupNorm(1, channels)
        self.mlp = nn.Sequential(nn.Conv2d(channels, 4 * channels, 1), nn.GELU(), nn.Conv2d(4 * channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(self.dw(x)))


class AffinityNet(nn.Module):
    """Image (B, 3, H, W) → features (B, feature_dim, H/stride, W/stride) whose L1 distances give affinities."""

    def __init__(self, stride: int = 1, width: int = 32, feature_dim: int = 64, blocks: int = 4):
        super().__init__()
        if stride < 1 or stride & (stride - 1):
            raise ConfigError(f"the AffinityNet stride must be a power of two, got {stride}")
        self.stride = stride
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.GroupNorm(1, width), nn.GELU()]
        channels = width
        for _ in range(int(math.log2(stride))):
            out = min(channels * 2, 4 * width)
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GroupNorm(1, out), nn.GELU()]
            channels = out
        self.stem = nn.Sequential(*layers)
        self.blocks = nn.ModuleList(_Block(channels, 2 ** (i % 4)) for i in range(blocks))
        # Like PSA's heads: features from several depths, so both edges and context count.
        self.head = nn.Sequential(nn.Conv2d(channels * (blocks + 1), feature_dim, 1), nn.ELU(),
                                  nn.Conv2d(feature_dim, feature_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        levels = [x]
        for block in self.blocks:
            x = block(x)
            levels.append(x)
        return self.head(torch.cat(levels, dim=1))


def build_affinity_net(config: AffinityConfig, size: tuple[int, int]) -> AffinityNet:
    return AffinityNet(config.grid_stride(size), config.width, config.feature_dim, config.blocks)


def load_affinity_weights(net: AffinityNet, path: str | Path) -> None:
    """Initialise from saved weights of the same architecture (a clear error when they do not fit)."""
    try:
        state = load_file(str(path)) if str(path).endswith(".safetensors") else torch.load(path, map_location="cpu")
        net.load_state_dict(state)
    except (RuntimeError, OSError) as error:
        raise ConfigError(f"cannot use AffinityNet weights {path}: {error}".splitlines()[0]) from None


def save_affinity_weights(net: AffinityNet, path: str | Path) -> None:
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(path))


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 → (3, H, W) float, ImageNet-normalised (so ImageNet-style weights fit)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


# --------------------------------------------------------------------------- seeds
def seed_labels(image: np.ndarray, maps: Mapping[int, np.ndarray], config: AffinityConfig = AffinityConfig(),
                crf: CRFParams | None = SEED_CRF) -> np.ndarray:
    """Confident foreground / background / unsure (255) labels from an image's soft maps (paper §6.1).

    Per class, Otsu's threshold t splits the map; only pixels above the mean of the upper part
    (``+ seed_offset_fg``) are confident foreground and only pixels below the mean of the lower
    part (``+ seed_offset_bg``) confident background — the paper's la/ha levels, with Otsu's
    split in place of its hand-tuned histogram window. Each level is CRF-refined (``crf=None``:
    not) and the pixels between the two are left unsure.
    """
    high, low = {}, {}
    for label, m in maps.items():
        t = otsu_threshold(m)
        above, below = m[m > t], m[m <= t]
        high[label] = (float(above.mean()) if above.size else 1.0) + config.seed_offset_fg
        low[label] = (float(below.mean()) if below.size else 0.0) + config.seed_offset_bg
    confident_fg = assign_labels(maps, high)
    not_bg = assign_labels(maps, low)
    if crf is not None:
        label_set = [0, *maps]
        confident_fg = crf_refine(image, confident_fg, label_set, crf)
        not_bg = crf_refine(image, not_bg, label_set, crf)
    seeds = np.full(confident_fg.shape, IGNORE_INDEX, np.uint8)
    seeds[not_bg == 0] = 0
    fg = (confident_fg != 0) & (not_bg != 0)
    seeds[fg] = confident_fg[fg]
    return seeds


def grid_labels(labels: np.ndarray, stride: int, rule: str = "unanimous") -> np.ndarray:
    """Seeds on the feature grid, one per ``stride``×``stride`` cell.

    ``unanimous`` (default): a cell keeps a label only when all its pixels agree, else 255, so no
    training pair straddles an edge. ``vote``: the cell's most frequent label (255 counted as one;
    ties to the lower label) — PSA average-pools its seed scores by 8 and takes the argmax, which
    on label seeds is this vote.
    """
    if rule not in SEED_GRID_RULES:
        raise ConfigError(f"unknown seed grid rule {rule!r}; choose one of {', '.join(SEED_GRID_RULES)}")
    if stride == 1:
        return labels.copy()
    height, width = labels.shape
    h, w = height // stride, width // stride
    cells = labels[:h * stride, :w * stride].reshape(h, stride, w, stride)
    if rule == "vote":
        values = np.unique(cells)
        counts = np.stack([(cells == v).sum(axis=(1, 3)) for v in values])
        return values[counts.argmax(axis=0)].astype(np.uint8)
    first = cells[:, :1, :, :1]
    return np.where((cells == first).all(axis=(1, 3)), first[:, 0, :, 0], IGNORE_INDEX).astype(np.uint8)


# --------------------------------------------------------------------------- training
def pair_affinities(features: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """a = exp(−mean_c |f_i − f_j|) for each offset, as (B, h', w') tensors over the valid pairs."""
    _, _, height, width = features.shape
    out = []
    for dy, dx in offsets:
        src, dst = pair_slices(height, width, dy, dx)
        out.append(torch.exp(-(features[:, :, src[0], src[1]] - features[:, :, dst[0], dst[1]]).abs().mean(1)))
    return out


def affinity_loss(features: torch.Tensor, labels: torch.Tensor, radius: int) -> torch.Tensor:
    """PSA's loss: L_bg/4 + L_fg/4 + L_neg/2 over labelled pixel pairs closer than ``radius``.

    Pairs of background seeds and pairs of one class's seeds should have affinity 1, pairs with
    different labels 0; pairs touching an unsure pixel (255) are not used.
    """
    _, height, width = labels.shape
    offsets = half_disc_offsets(radius)
    totals = [features.new_zeros(()) for _ in range(3)]
    counts = [0, 0, 0]
    for (dy, dx), a in zip(offsets, pair_affinities(features, offsets)):
        src, dst = pair_slices(height, width, dy, dx)
        ls, ld = labels[:, src[0], src[1]], labels[:, dst[0], dst[1]]
        valid = (ls != IGNORE_INDEX) & (ld != IGNORE_INDEX)
        same = valid & (ls == ld)
        for k, (pairs, term) in enumerate(((same & (ls == 0), -torch.log(a + 1e-5)),
                                           (same & (ls != 0), -torch.log(a + 1e-5)),
                                           (valid & (ls != ld), -torch.log(1 + 1e-5 - a)))):
            totals[k] = totals[k] + term[pairs].sum()
            counts[k] += int(pairs.sum())
    weights = (0.25, 0.25, 0.5)
    return sum(w * t / max(c, 1) for w, t, c in zip(weights, totals, counts))


def train_affinity_net(
    net: AffinityNet,
    read_image: Callable[[int], np.ndarray],
    seeds: Sequence[np.ndarray],
    config: AffinityConfig = AffinityConfig(),
    progress: Callable[[int, float], None] | None = None,
) -> AffinityNet:
    """Train on images ``read_image(i)`` with grid seeds ``seeds[i]`` (from :func:`grid_labels`).

    AdamW with cosine decay, random grid-aligned crops of ``config.crop`` px, horizontal flips
    and brightness/contrast jitter; deterministic for a given ``config.seed``.
    """
    if not seeds:
        raise ConfigError("no images to train the AffinityNet on")
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    stride = net.stride
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=max(1, config.train_steps),
                                                   pct_start=0.1)
    net.train()
    for step in range(config.train_steps):
        picks = torch.randint(len(seeds), (min(config.batch_size, len(seeds)),), generator=generator).tolist()
        grid_h = min(min(seeds[i].shape[0] for i in picks), config.crop // stride)
        grid_w = min(min(seeds[i].shape[1] for i in picks), config.crop // stride)
        xs, ys = [], []
        for i in picks:
            seed = torch.from_numpy(seeds[i].astype(np.int64))
            top = int(torch.randint(seed.shape[0] - grid_h + 1, (1,), generator=generator))
            left = int(torch.randint(seed.shape[1] - grid_w + 1, (1,), generator=generator))
            x = image_tensor(read_image(i))[:, top * stride:(top + grid_h) * stride, left * stride:(left + grid_w) * stride]
            y = seed[top:top + grid_h, left:left + grid_w]
            if torch.rand((), generator=generator) < 0.5:
                x, y = x.flip(-1), y.flip(-1)
            gain, shift = 1 + 0.6 * (torch.rand(2, generator=generator) - 0.5)
            xs.append(x * gain + (shift - 1))
            ys.append(y)
        loss = affinity_loss(net(torch.stack(xs)), torch.stack(ys), config.radius)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step, loss.item())
    return net.eval()


# --------------------------------------------------------------------------- inference
@torch.no_grad()
def image_features(net: AffinityNet, image: np.ndarray) -> torch.Tensor:
    """(D, h, w) features of one image, padded to a multiple of the stride."""
    x = image_tensor(image)
    stride = net.stride
    pad_h, pad_w = (-x.shape[1]) % stride, (-x.shape[2]) % stride
    x = F.pad(x[None], (0, pad_w, 0, pad_h), mode="replicate")
    return net.eval()(x)[0]


def walked_maps(net: AffinityNet, image: np.ndarray, maps: Mapping[int, np.ndarray],
                config: AffinityConfig = AffinityConfig()) -> dict[int, np.ndarray]:
    """Soft maps spread by the random walk on the network's affinities, back at image size."""
    features = image_features(net, image)
    _, grid_h, grid_w = features.shape
    transition = transition_matrix(grid_affinity_matrix(features, config.radius), config.beta)
    labels = list(maps)
    stack = np.stack([maps[label] for label in labels]).astype(np.float32)
    if config.stretch:
        low = stack.min(axis=(1, 2), keepdims=True)
        stack = (stack - low) / np.maximum(stack.max(axis=(1, 2), keepdims=True) - low, 1e-6)
    stride = net.stride
    height, width = stack.shape[1:]
    padded = np.pad(stack, ((0, 0), (0, grid_h * stride - height), (0, grid_w * stride - width)), mode="edge")
    on_grid = resize_maps(padded, (grid_h, grid_w), "area").reshape(len(labels), -1)
    walked = random_walk(on_grid, transition, config.walk_steps).reshape(len(labels), grid_h, grid_w)
    full = resize_maps(walked, (grid_h * stride, grid_w * stride))[:, :height, :width]
    return {label: full[k] for k, label in enumerate(labels)}


def affinity_mask(net: AffinityNet, image: np.ndarray, maps: Mapping[int, np.ndarray],
                  config: AffinityConfig = AffinityConfig()) -> np.ndarray:
    """The AffinityNet map B̂: walked maps against a constant background score (paper: 0.45)."""
    return assign_labels(walked_maps(net, image, maps, config), config.background)
