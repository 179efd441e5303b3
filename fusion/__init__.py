"""Fusion engine: layer-wise Wasserstein barycenters of torch models."""

from .config import FusionConfig
from .distillation import InputMoments, input_moments, pool_moments
from .engine import FusionResult, align, fuse, fuse_models, output_width
from .graph import (
    AlignmentGraph,
    UnsupportedModelError,
    alignment_spec,
    build_alignment_graph,
    register_rule,
)

__all__ = [
    "AlignmentGraph",
    "FusionConfig",
    "FusionResult",
    "InputMoments",
    "UnsupportedModelError",
    "align",
    "alignment_spec",
    "build_alignment_graph",
    "fuse",
    "fuse_models",
    "input_moments",
    "output_width",
    "pool_moments",
    "register_rule",
]
