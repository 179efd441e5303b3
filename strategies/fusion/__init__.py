"""Fusion engine: layer-wise Wasserstein barycenters of torch models."""

from .config import FusionConfig
from .engine import FusionResult, align, fuse, fuse_models, output_width
from .graph import AlignmentGraph, UnsupportedModelError, build_alignment_graph

__all__ = [
    "AlignmentGraph",
    "FusionConfig",
    "FusionResult",
    "UnsupportedModelError",
    "align",
    "build_alignment_graph",
    "fuse",
    "fuse_models",
    "output_width",
]
