"""From soft class maps to label masks."""

from .threshold import threshold_masks

__all__ = ["threshold_masks"]
