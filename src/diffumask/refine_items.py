"""What ``refine`` does to one item, as steps that :func:`diffumask.workers.ordered` runs.

A method is up to three steps: *prepare* (a CPU worker: read the image and soft maps, and the CPU
work that comes first), *device* (the parent, on the accelerator: AffinityNet features, the random
walk, the self-attention propagation) and *finish* (a CPU worker: masks at image size, dense CRF,
cleanup, then the mask's PNG staged beside the item's current one: :func:`staged`). On request
(``device_crf``) the dense CRF moves into the device step, in torch (:mod:`diffumask.masks.permutohedral`),
for every method but adaptive: for a GPU whose host has few CPU cores. The worker steps are
module-level functions of picklable arguments; the device steps close over the network. On a CPU,
propagate, affinity and adaptive run whole in the workers (the AffinityNet read from its saved weights), since
this process, which commits every item, would otherwise do their heaviest part one item at a time; only a CRF
moved here on request (``device_crf``) keeps affinity's walk in this process. Which process runs a step does
not change its result, so any number of workers writes the same masks.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .dataset import Dataset
from .errors import DiffumaskError
from .masks.adaptive import best_gamma, candidate_mask, raw_sweep, shortlisted_sweep, sweep
from .masks.affinity import (AffinityConfig, AffinityNet, build_affinity_net, grid_labels, load_affinity_weights,
                             seed_labels, walked_grid, walked_mask)
from .masks.assign import assign_labels
from .masks.cleanup import cleanup_mask
from .masks.crf import DenseCRF, crf_refine
from .masks.otsu import otsu_threshold
from .masks.propagate import propagated_mask, self_attention_inputs, self_attention_walk
from .masks.threshold import threshold_masks

if TYPE_CHECKING:
    from .refine import RefineConfig

#: What a method makes of an item: its final mask, and what to record about it in the manifest.
Outcome = tuple[np.ndarray, dict[str, Any]]
#: What each item's steps end with (:func:`staged`): the SHA-256 of its staged mask, and the record's extra.
Staged = tuple[str, dict[str, Any]]


class Item:
    """One manifest record with lazily read image and soft maps, keyed by label index."""

    def __init__(self, dataset: Dataset, record: Mapping[str, Any]):
        self.dataset = dataset
        self.record = dict(record)
        self.id: str = record["id"]
        self.classes: list[str] = list(record["classes"])
        self.resolutions: list[int] | None = record.get("resolutions")  # the grids generate fused
        self.labels = {name: dataset.class_index(name) for name in self.classes}

    def image(self) -> np.ndarray:
        return self.dataset.read_image(self.id)

    def soft(self, fused: bool = True) -> dict[str, np.ndarray]:
        return self.dataset.read_soft_maps(self.id, fused=fused)

    def size(self) -> tuple[int, int]:
        """The image's (h, w), from the manifest when it says (generate writes it), else from the image."""
        size = self.record.get("size")
        return (int(size[0]), int(size[1])) if size else self.image().shape[:2]

    def maps(self) -> dict[int, np.ndarray]:
        """Each class's fused map, keyed by label index."""
        soft = self.dataset.read_soft_maps(self.id, self.classes)
        self._check([c for c in self.classes if c not in soft])
        return {self.labels[c]: soft[c] for c in self.classes}

    def check_grids(self, soft: Mapping[str, np.ndarray]) -> None:
        """Every class has a map in ``soft`` (read with ``fused=False``): its grids (``name@h``), or a stored
        fused map in files written before the grids-only format."""
        self._check([c for c in self.classes if c not in soft and not any(k.startswith(f"{c}@") for k in soft)])

    def _check(self, missing: list[str]) -> None:
        if missing:
            raise DiffumaskError(f"item {self.id} has no soft map for {missing} in {self.dataset.soft_maps_path(self.id)}")


@dataclass
class Loaded:
    """An item as read by a worker: its image (when a step needs it), class maps and propagation inputs."""

    item: Item
    image: np.ndarray | None
    maps: dict[int, np.ndarray]  # class maps by label; empty arrays where the steps need only the labels
    size: tuple[int, int]  # the image's (h, w)
    cross: np.ndarray | None = None  # propagate: the class maps fused at the self-attention grid
    matrix: np.ndarray | None = None  # propagate: the self-attention matrix
    mask: np.ndarray | None = None  # threshold and otsu before a CRF on the accelerator: the mask it refines
    extra: dict[str, Any] = field(default_factory=dict)  # what the method records in the manifest

    @property
    def labels(self) -> list[int]:
        return list(self.maps)


@dataclass(frozen=True)
class Steps:
    """An item's steps for :func:`diffumask.workers.ordered`."""

    prepare: Callable[[Item], Any]
    device: Callable[[Item, Any], Any] | None = None
    finish: Callable[[Any, Any], Any] | None = None


def _final(config: RefineConfig, image: np.ndarray | None, mask: np.ndarray, labels: list[int]) -> np.ndarray:
    """The optional result CRF, then the cleanup every method ends with."""
    if config.use_crf:
        mask = crf_refine(image, mask, [0, *labels], config.crf_params)
    return cleanup_mask(mask, config.min_area, config.max_hole)


def load(config: RefineConfig, item: Item) -> Loaded:
    """Image (when the method needs it) and class maps; for propagate, the fused grids and the matrix."""
    needs_image = config.use_crf or config.uses_affinity
    if config.method != "propagate":
        maps = item.maps()
        return Loaded(item, item.image() if needs_image else None, maps, next(iter(maps.values())).shape)
    soft = item.soft(fused=False)  # only propagate reads the self-attention; it needs the grids, not the full maps
    item.check_grids(soft)
    cross, matrix = self_attention_inputs(soft, item.classes, item.resolutions)
    labels = {item.labels[name]: np.zeros((0, 0), np.float32) for name in item.classes}  # labels only
    return Loaded(item, item.image() if needs_image else None, labels, item.size(), cross, matrix)


def _thresholded(config: RefineConfig, loaded: Loaded) -> tuple[np.ndarray, dict[str, Any]]:
    """threshold's or otsu's mask of an item, and what to record about it."""
    if config.method == "threshold":
        return threshold_masks(loaded.maps, config.threshold, config.uncertain), {}
    thresholds = {label: otsu_threshold(m) for label, m in loaded.maps.items()}
    return assign_labels(loaded.maps, thresholds), {"thresholds": {str(k): round(v, 4) for k, v in thresholds.items()}}


def thresholded(config: RefineConfig, item: Item) -> Outcome:
    """threshold and otsu: the whole item in one worker step."""
    loaded = load(config, item)
    mask, extra = _thresholded(config, loaded)
    return _final(config, loaded.image, mask, loaded.labels), extra


def thresholded_for_crf(config: RefineConfig, item: Item) -> Loaded:
    """threshold and otsu before a CRF on the accelerator: the item with its mask, read and made in a worker."""
    loaded = load(config, item)
    loaded.mask, loaded.extra = _thresholded(config, loaded)
    loaded.maps = {label: m[:0, :0] for label, m in loaded.maps.items()}  # labels kept; the maps' pixels not sent
    return loaded


def propagated(config: RefineConfig, loaded: Loaded, walked: np.ndarray) -> Outcome:
    mask = propagated_mask(walked, loaded.labels, loaded.size, config.propagate_threshold, config.propagate_uncertain)
    return _final(config, loaded.image, mask, loaded.labels), {}


def propagated_on_cpu(config: RefineConfig, item: Item) -> Outcome:
    """propagate on a CPU: the whole item in one worker step, so that its self-attention matrix (4 MiB at
    512 px) never travels to the parent and back; the parent only commits (it is the bottleneck)."""
    loaded = load(config, item)
    return propagated(config, loaded, self_attention_walk(loaded.cross, loaded.matrix, config.power, "cpu"))


def affinity_masked(config: RefineConfig, stride: int, loaded: Loaded, walked: np.ndarray) -> Outcome:
    mask = walked_mask(walked, loaded.labels, stride, loaded.size, config.affinity)
    return _final(config, loaded.image, mask, loaded.labels), {}


def _reference(config: RefineConfig, stride: int, loaded: Loaded, walked: np.ndarray, dense: DenseCRF | None) -> np.ndarray:
    """The AffinityNet mask B̂ that adaptive candidates are matched to; with ``reference_crf`` refined by
    the image's CRF (``dense``) like the candidates, so both sides of the match have the CRF's edges."""
    reference = walked_mask(walked, loaded.labels, stride, loaded.size, config.affinity)
    return dense(reference) if dense is not None and config.reference_crf else reference


def adaptive_masked(config: RefineConfig, stride: int, loaded: Loaded, walked: np.ndarray) -> Outcome:
    """Adaptive per image: the γ whose candidate best matches B̂."""
    image, maps = loaded.image, loaded.maps
    crf = config.crf_params if config.use_crf else None
    dense = DenseCRF(image, [0, *maps], crf) if crf is not None else None  # kernels built once per image
    reference = _reference(config, stride, loaded, walked, dense)
    tried, counts, candidates = shortlisted_sweep(image, maps, reference, config.gammas, dense, config.crf_shortlist)
    gamma = best_gamma(counts, tried)
    if gamma is None or candidates is None:  # no γ matched (the fallback γ), or the raw candidates of no CRF
        mask = candidate_mask(image, maps, config.threshold if gamma is None else gamma, dense)
    else:
        mask = candidates[tried.index(gamma)]
    return cleanup_mask(mask, config.min_area, config.max_hole), {"gamma": gamma}


def curve(config: RefineConfig, stride: int, loaded: Loaded, walked: np.ndarray) -> dict[int, list[tuple[int, int]]]:
    """Adaptive per class, first pass: one image's sweep counts (raw candidates unless the shortlist is 0)."""
    image, maps = loaded.image, loaded.maps
    needs_crf = config.use_crf and (config.reference_crf or config.crf_shortlist == 0)
    dense = DenseCRF(image, [0, *maps], config.crf_params) if needs_crf else None  # kernels built once
    reference = _reference(config, stride, loaded, walked, dense)
    if config.use_crf and config.crf_shortlist == 0:
        return sweep(image, maps, reference, config.gammas, dense)[0]
    return raw_sweep(maps, reference, config.gammas)[0]


def class_gamma_masked(config: RefineConfig, gammas: Mapping[int, float], item: Item) -> Outcome:
    """Adaptive per class, second pass: each class's pooled γ, CRF-refined, in one worker step."""
    loaded = load(config, item)
    chosen = {label: gammas[label] for label in loaded.labels}
    mask = candidate_mask(loaded.image, loaded.maps, chosen, config.crf_params if config.use_crf else None)
    return cleanup_mask(mask, config.min_area, config.max_hole), {"class_gammas": {str(k): v for k, v in chosen.items()}}


def grid_seeds(config: RefineConfig, stride: int, item: Item) -> np.ndarray:
    """An item's AffinityNet training seeds on the feature grid."""
    seed_crf = config.seed_crf_params if config.affinity.seed_crf else None
    labels = seed_labels(item.image(), item.maps(), config.affinity, seed_crf)
    return grid_labels(labels, stride, config.affinity.seed_grid)


def _walk(config: RefineConfig, net: AffinityNet, item: Item, loaded: Loaded) -> np.ndarray:
    return walked_grid(net, loaded.image, loaded.maps, config.affinity)


@functools.lru_cache(maxsize=2)
def _saved_net(affinity: AffinityConfig, stride: int, weights: str | None, stamp: tuple[int, int] | None) -> AffinityNet:
    """The parent's AffinityNet in a worker process, built (from its seed) and loaded (from ``weights``, whose
    mtime and size ``stamp`` keeps a rewritten file from being served stale) once per process."""
    net = build_affinity_net(replace(affinity, stride=stride), (stride, stride))
    if weights is not None:
        load_affinity_weights(net, weights)
    return net.eval()


def walked_in_worker(config: RefineConfig, stride: int, weights: str | None,
                     finish: Callable[[RefineConfig, int, Loaded, np.ndarray], Any], item: Item) -> Any:
    """affinity and adaptive on a CPU: the whole item in one worker step, the network read from its saved
    weights once per worker. In this process the forward pass and the walk (0.35 s per 512 px image on one
    core) would run one item at a time, whatever the number of workers."""
    loaded = load(config, item)
    stat = None if weights is None else os.stat(weights)
    net = _saved_net(config.affinity, stride, weights, stat and (stat.st_mtime_ns, stat.st_size))
    return finish(config, stride, loaded, walked_grid(net, loaded.image, loaded.maps, config.affinity))


def _propagate(config: RefineConfig, device: torch.device, item: Item, loaded: Loaded) -> np.ndarray:
    walked = self_attention_walk(loaded.cross, loaded.matrix, config.power, device)
    loaded.cross = loaded.matrix = None  # the finish step does not need them: not pickled back to a worker
    return walked


def _crf_on_device(config: RefineConfig, device: torch.device, mask_of: Callable[[Item, Loaded], np.ndarray],
                   item: Item, loaded: Loaded) -> np.ndarray:
    """The device step of a method whose CRF runs on the accelerator: the method's mask (``mask_of``, in this
    process), then the CRF there; the image and maps are dropped before ``loaded`` goes back to a worker."""
    mask = DenseCRF(loaded.image, [0, *loaded.labels], config.crf_params, device)(mask_of(item, loaded))
    loaded.image, loaded.maps, loaded.cross, loaded.matrix, loaded.mask = None, {}, None, None, None
    return mask


def cleaned(config: RefineConfig, loaded: Loaded, mask: np.ndarray) -> Outcome:
    """The finish step after a CRF on the accelerator: the cleanup every method ends with."""
    return cleanup_mask(mask, config.min_area, config.max_hole), loaded.extra


def staged(step: Callable[..., Outcome], *args: Any) -> Staged:
    """Run an item's last step and stage its mask (:meth:`Dataset.stage_mask`) in the same process, a
    worker: encoding the PNG and syncing it then run in parallel, and the parent, which alone commits,
    only appends the line and renames the file. ``args[0]`` is the item or what was loaded of it."""
    mask, extra = step(*args)
    item = args[0] if isinstance(args[0], Item) else args[0].item
    return item.dataset.stage_mask(item.id, mask), extra


def item_steps(config: RefineConfig, net: AffinityNet | None, gammas: Mapping[int, float] | None,
               device: torch.device, net_weights: str | None = None, device_crf: bool = False) -> Steps:
    """The steps that turn one item into its staged mask and record under ``config`` (a RefineConfig);
    ``net_weights``, the file of the AffinityNet's weights (None: untrained, from its seed), lets the workers
    run it when ``device`` is a CPU;
    ``device_crf`` runs the CRF on ``device``, in the device step (adaptive keeps it in the workers)."""
    steps = _mask_steps(config, net, gammas, device, net_weights, device_crf)
    if steps.finish is None:
        return replace(steps, prepare=functools.partial(staged, steps.prepare))
    return replace(steps, finish=functools.partial(staged, steps.finish))


def _mask_steps(config: RefineConfig, net: AffinityNet | None, gammas: Mapping[int, float] | None,
                device: torch.device, net_weights: str | None, device_crf: bool) -> Steps:
    """The steps that turn one item into its mask (:data:`Outcome`)."""
    prepare = functools.partial(load, config)
    if config.use_crf and device_crf and config.method != "adaptive":
        return _device_crf_steps(config, net, device)
    if config.method in ("threshold", "otsu"):
        return Steps(functools.partial(thresholded, config))
    if config.method == "propagate" and device.type == "cpu":
        return Steps(functools.partial(propagated_on_cpu, config))
    if config.method == "propagate":
        return Steps(prepare, functools.partial(_propagate, config, device), functools.partial(propagated, config))
    if gammas is not None:
        return Steps(functools.partial(class_gamma_masked, config, gammas))
    finish = affinity_masked if config.method == "affinity" else adaptive_masked
    return _walk_steps(config, net, device, net_weights, finish)


def _walk_steps(config: RefineConfig, net: AffinityNet, device: torch.device, net_weights: str | None,
                finish: Callable[[RefineConfig, int, Loaded, np.ndarray], Any]) -> Steps:
    """The AffinityNet's walk and then ``finish``: in the workers on a CPU, else in this process on the
    accelerator between two worker steps."""
    if device.type == "cpu":
        return Steps(functools.partial(walked_in_worker, config, net.stride, net_weights, finish))
    return Steps(functools.partial(load, config), functools.partial(_walk, config, net),
                 functools.partial(finish, config, net.stride))


def _device_crf_steps(config: RefineConfig, net: AffinityNet | None, device: torch.device) -> Steps:
    """threshold, otsu, propagate and affinity with their CRF on the accelerator, in the device step."""
    finish = functools.partial(cleaned, config)
    if config.method in ("threshold", "otsu"):
        return Steps(functools.partial(thresholded_for_crf, config),
                     functools.partial(_crf_on_device, config, device, lambda item, loaded: loaded.mask), finish)
    if config.method == "propagate":
        def mask_of(item: Item, loaded: Loaded) -> np.ndarray:
            walked = _propagate(config, device, item, loaded)
            return propagated_mask(walked, loaded.labels, loaded.size, config.propagate_threshold,
                                   config.propagate_uncertain)
    else:
        def mask_of(item: Item, loaded: Loaded) -> np.ndarray:
            return walked_mask(_walk(config, net, item, loaded), loaded.labels, net.stride, loaded.size, config.affinity)
    return Steps(functools.partial(load, config), functools.partial(_crf_on_device, config, device, mask_of), finish)


def curve_steps(config: RefineConfig, net: AffinityNet, device: torch.device, net_weights: str | None = None) -> Steps:
    """Adaptive per class, first pass: each item's curve counts."""
    return _walk_steps(config, net, device, net_weights, curve)
