"""Readers of labelled image folders (ours, Pascal VOC, Cityscapes, ADE20K) and class-name matching."""

from .names import match_names
from .readers import FORMATS, LabelledSource, SourceError, open_source

__all__ = ["FORMATS", "LabelledSource", "SourceError", "match_names", "open_source"]
