"""From soft class maps to label masks: thresholds, Otsu, AffinityNet, random walks, CRF, cleanup."""

from .adaptive import DEFAULT_GAMMAS, best_gamma, gamma_range, pool_counts, sweep
from .affinity import AffinityConfig, AffinityNet, affinity_mask, seed_labels, train_affinity_net
from .assign import assign_labels
from .cleanup import cleanup_mask
from .crf import CRFParams, DenseCRF, crf_marginals, crf_refine, pydensecrf_installed
from .otsu import otsu_threshold
from .propagate import propagate_mask, random_walk, self_attention_maps, transition_matrix
from .threshold import threshold_masks

__all__ = [
    "DEFAULT_GAMMAS", "AffinityConfig", "AffinityNet", "CRFParams", "DenseCRF", "affinity_mask",
    "assign_labels", "best_gamma", "cleanup_mask", "crf_marginals", "crf_refine", "gamma_range",
    "otsu_threshold", "pool_counts", "propagate_mask", "pydensecrf_installed", "random_walk", "seed_labels",
    "self_attention_maps",
    "sweep", "threshold_masks", "train_affinity_net", "transition_matrix",
]
