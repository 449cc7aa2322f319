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
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..dataset import IGNORE_INDEX, atomic_write
from ..errors import ConfigError
from .assign import assign_labels
from .crf import SEED_CRF, CRFParams, crf_refine
from .otsu import otsu_threshold
from .propagate import affinity_walk, half_disc_offsets, pair_slices, resize_maps

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
    epochs: float = 8.0  # training passes over the dataset (the paper's 8) ...
    max_steps: int = 3000  # ... capped at this many steps (see train_steps_for)
    train_steps: int | None = None  # a fixed number of steps instead (0: no training)
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
        if self.walk_steps < 0 or (self.train_steps or 0) < 0:
            raise ConfigError("--walk-steps and --affinity-steps must be 0 or more")
        if not (self.epochs >= 0 and self.max_steps >= 0):
            raise ConfigError(f"--affinity-epochs ({self.epochs}) and --affinity-max-steps ({self.max_steps}) "
                              "must be 0 or more")
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

    def train_steps_for(self, images: int) -> int:
        """Training steps for a dataset of ``images``: ``epochs`` passes of ``batch_size`` crops, at most
        ``max_steps`` (a fixed ``train_steps`` wins).

        The cap bounds the cost of large datasets: 8 epochs of 20 classes × 1000 images would be 10,000
        steps. 3000 steps are 8 epochs of 6000 images, about 5 minutes on an H100 (0.10 s/step at 512 px,
        measured) and hours on a CPU (5.7 s/step on 2 cores), where datasets are small and stay under it.
        """
        if self.train_steps is not None:
            return self.train_steps
        return min(self.max_steps, math.ceil(self.epochs * images / self.batch_size))

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
    """A network initialised from ``config.seed`` alone, not from whatever the process drew before: every
    run, and every worker of a sharded job, starts from the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return AffinityNet(config.grid_stride(size), config.width, config.feature_dim, config.blocks)


def load_affinity_weights(net: AffinityNet, path: str | Path) -> None:
    """Initialise from saved weights of the same architecture (a clear error when they do not fit)."""
    try:
        state = load_file(str(path)) if str(path).endswith(".safetensors") else torch.load(path, map_location="cpu")
        net.load_state_dict(state)
    except (RuntimeError, OSError) as error:
        raise ConfigError(f"cannot use AffinityNet weights {path}: {error}".splitlines()[0]) from None


def save_affinity_weights(net: AffinityNet, path: str | Path, exclusive: bool = False) -> bool:
    """Saved atomically: workers of a sharded job that each trained the same network may write at once;
    ``exclusive`` keeps the first one's file (False: another was first)."""
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    return atomic_write(Path(path), lambda tmp: save_file(state, str(tmp)), exclusive)


def image_tensor(image: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """(..., H, W, 3) uint8 → (..., 3, H, W) float, ImageNet-normalised (so ImageNet-style weights fit), on
    ``device`` (the bytes travel, not the floats)."""
    x = torch.as_tensor(np.ascontiguousarray(image) if isinstance(image, np.ndarray) else image, device=device)
    x = x.movedim(-1, -3).float() / 255
    mean, std = (torch.tensor(v, device=x.device)[:, None, None] for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (x - mean) / std


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
    counts = [labels.new_zeros(()) for _ in range(3)]  # tensors: no GPU sync per offset
    for (dy, dx), a in zip(offsets, pair_affinities(features, offsets)):
        src, dst = pair_slices(height, width, dy, dx)
        ls, ld = labels[:, src[0], src[1]], labels[:, dst[0], dst[1]]
        valid = (ls != IGNORE_INDEX) & (ld != IGNORE_INDEX)
        same = valid & (ls == ld)
        for k, (pairs, term) in enumerate(((same & (ls == 0), -torch.log(a + 1e-5)),
                                           (same & (ls != 0), -torch.log(a + 1e-5)),
                                           (valid & (ls != ld), -torch.log(1 + 1e-5 - a)))):
            totals[k] = totals[k] + term[pairs].sum()
            counts[k] = counts[k] + pairs.sum()
    weights = (0.25, 0.25, 0.5)
    return sum(w * t / c.clamp(min=1) for w, t, c in zip(weights, totals, counts))


@dataclass
class _Crop:
    """One training sample as drawn: an image's grid-aligned window, flipped or not, with its jitter."""

    index: int
    top: int
    left: int
    height: int  # in grid cells
    width: int
    flip: bool
    gain: torch.Tensor
    shift: torch.Tensor


def _draw(seeds: Sequence[np.ndarray], config: AffinityConfig, stride: int, generator: torch.Generator,
          steps: int) -> Iterator[list[_Crop]]:
    """Each step's crops, drawn from ``generator`` in a fixed order (so training is reproducible)."""
    for _ in range(steps):
        picks = torch.randint(len(seeds), (min(config.batch_size, len(seeds)),), generator=generator).tolist()
        grid_h = min(min(seeds[i].shape[0] for i in picks), config.crop // stride)
        grid_w = min(min(seeds[i].shape[1] for i in picks), config.crop // stride)
        crops = []
        for i in picks:
            top = int(torch.randint(seeds[i].shape[0] - grid_h + 1, (1,), generator=generator))
            left = int(torch.randint(seeds[i].shape[1] - grid_w + 1, (1,), generator=generator))
            flip = bool(torch.rand((), generator=generator) < 0.5)
            gain, shift = 1 + 0.6 * (torch.rand(2, generator=generator) - 0.5)
            crops.append(_Crop(i, top, left, grid_h, grid_w, flip, gain, shift))
        yield crops


def _pixels(read_image: Callable[[int], np.ndarray], crop: _Crop, stride: int) -> np.ndarray:
    """The crop's uint8 pixels (decoded in a loader thread: image codecs release the GIL)."""
    top, left = crop.top * stride, crop.left * stride
    return read_image(crop.index)[top:top + crop.height * stride, left:left + crop.width * stride]


def _batch(crops: list[_Crop], pixels: list[np.ndarray], seeds: Sequence[np.ndarray],
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (normalised, flipped, jittered) and grid labels of one step, on ``device``."""
    xs, ys = [], []
    for crop, x in zip(crops, image_tensor(np.stack(pixels), device)):
        y = torch.from_numpy(seeds[crop.index][crop.top:crop.top + crop.height,
                                               crop.left:crop.left + crop.width].astype(np.int64)).to(device)
        if crop.flip:
            x, y = x.flip(-1), y.flip(-1)
        xs.append(x * crop.gain.to(device) + (crop.shift.to(device) - 1))
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


@contextmanager
def _deterministic_kernels() -> Iterator[None]:
    """cuDNN's deterministic convolution kernels: the fastest ones add gradients in whatever order their
    threads finish, so two GPU runs trained different networks (the workers of a sharded job each train
    it and must agree). The CPU's kernels are deterministic already."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def one_cycle(optimizer: torch.optim.Optimizer, lr: float, steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """Warm-up over the first 10 % of ``steps``, then cosine decay; short runs warm up for about two steps.

    torch's schedule divides by zero when the warm-up is exactly one step (``pct_start × steps == 1``, as at
    10 steps), which an 8-epoch run on 19 or 20 images hits."""
    steps = max(1, steps)
    warmup = 0.1 if steps >= 20 else min(0.3, 2 / steps)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=warmup)


def train_affinity_net(
    net: AffinityNet,
    read_image: Callable[[int], np.ndarray],
    seeds: Sequence[np.ndarray],
    config: AffinityConfig = AffinityConfig(),
    progress: Callable[[int, float], None] | None = None,
    device: torch.device | str = "cpu",
    loaders: int = 4,
) -> AffinityNet:
    """Train on images ``read_image(i)`` with grid seeds ``seeds[i]`` (from :func:`grid_labels`), for
    ``config.train_steps_for(len(seeds))`` steps on ``device``.

    AdamW with cosine decay, random grid-aligned crops of ``config.crop`` px, horizontal flips
    and brightness/contrast jitter; deterministic for a given ``config.seed`` on a given kind of
    device. ``loaders`` threads decode the next steps' images meanwhile, so
    a GPU does not wait for the JPEG decoder.
    """
    if not seeds:
        raise ConfigError("no images to train the AffinityNet on")
    steps = config.train_steps_for(len(seeds))
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    stride = net.stride
    net.to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    schedule = one_cycle(optimizer, config.lr, steps)
    net.train()
    with ThreadPoolExecutor(loaders) as pool, _deterministic_kernels():
        ahead: deque[tuple[list[_Crop], list[Future[np.ndarray]]]] = deque()
        draws = _draw(seeds, config, stride, generator, steps)
        for step in range(steps):
            while len(ahead) < 2:  # this step's images and the next step's are being decoded
                crops = next(draws, None)
                if crops is None:
                    break
                ahead.append((crops, [pool.submit(_pixels, read_image, crop, stride) for crop in crops]))
            crops, pending = ahead.popleft()
            x, y = _batch(crops, [f.result() for f in pending], seeds, torch.device(device))
            loss = affinity_loss(net(x), y, config.radius)
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
    """(D, h, w) features of one image, padded to a multiple of the stride, on the network's device."""
    x = image_tensor(image, next(net.parameters()).device)
    stride = net.stride
    pad_h, pad_w = (-x.shape[1]) % stride, (-x.shape[2]) % stride
    x = F.pad(x[None], (0, pad_w, 0, pad_h), mode="replicate")
    return net.eval()(x)[0]


def walked_grid(net: AffinityNet, image: np.ndarray, maps: Mapping[int, np.ndarray],
                config: AffinityConfig = AffinityConfig()) -> np.ndarray:
    """The soft maps (K, h, w) on the feature grid after the random walk on the network's affinities:
    the part of :func:`walked_maps` that runs on the network's device."""
    features = image_features(net, image)
    _, grid_h, grid_w = features.shape
    stack = np.stack([maps[label] for label in maps]).astype(np.float32)
    if config.stretch:
        low = stack.min(axis=(1, 2), keepdims=True)
        stack = (stack - low) / np.maximum(stack.max(axis=(1, 2), keepdims=True) - low, 1e-6)
    stride = net.stride
    height, width = stack.shape[1:]
    padded = np.pad(stack, ((0, 0), (0, grid_h * stride - height), (0, grid_w * stride - width)), mode="edge")
    on_grid = resize_maps(padded, (grid_h, grid_w), "area").reshape(len(stack), -1)
    walked = affinity_walk(features, on_grid, config.radius, config.beta, config.walk_steps)
    return walked.reshape(len(stack), grid_h, grid_w)


def full_size(walked: np.ndarray, stride: int, size: tuple[int, int]) -> np.ndarray:
    """Grid maps (K, h, w) of :func:`walked_grid` back at the image ``size`` (bilinear)."""
    _, grid_h, grid_w = walked.shape
    return resize_maps(walked, (grid_h * stride, grid_w * stride))[:, :size[0], :size[1]]


def walked_maps(net: AffinityNet, image: np.ndarray, maps: Mapping[int, np.ndarray],
                config: AffinityConfig = AffinityConfig()) -> dict[int, np.ndarray]:
    """Soft maps spread by the random walk on the network's affinities, back at image size."""
    full = full_size(walked_grid(net, image, maps, config), net.stride, next(iter(maps.values())).shape)
    return dict(zip(maps, full))


def walked_mask(walked: np.ndarray, labels: Sequence[int], stride: int, size: tuple[int, int],
                config: AffinityConfig = AffinityConfig()) -> np.ndarray:
    """The AffinityNet map B̂ of :func:`walked_grid`'s maps (labels in that order)."""
    return assign_labels(dict(zip(labels, full_size(walked, stride, size))), config.background)


def affinity_mask(net: AffinityNet, image: np.ndarray, maps: Mapping[int, np.ndarray],
                  config: AffinityConfig = AffinityConfig()) -> np.ndarray:
    """The AffinityNet map B̂: walked maps against a constant background score (paper: 0.45)."""
    return walked_mask(walked_grid(net, image, maps, config), list(maps), net.stride,
                       next(iter(maps.values())).shape, config)
