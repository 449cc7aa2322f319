"""diffumask: class names in, semantic-segmentation training data out."""

__version__ = "0.1.0"
