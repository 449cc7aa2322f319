"""diffumask: class names in, semantic-segmentation training data out."""

from .attention import AttentionRecorder, ImageMaps, RecorderError, fuse, trace
from .tokens import PromptError

__version__ = "0.1.0"
__all__ = ["AttentionRecorder", "ImageMaps", "PromptError", "RecorderError", "fuse", "trace", "__version__"]
