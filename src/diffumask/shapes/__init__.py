"""The built-in shapes world: exact-ground-truth scenes and a tiny text-to-image model trained on them."""

from .model import ShapesPipeline, build_pipeline, load_pipeline
from .world import CLASSES, COLOURS, PALETTE, TEXTURES, Scene, export_world, render_scene

__all__ = ["CLASSES", "COLOURS", "PALETTE", "TEXTURES", "Scene", "ShapesPipeline", "build_pipeline",
           "export_world", "load_pipeline", "render_scene"]
