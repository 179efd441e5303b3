"""Fusion engine: layer-wise Wasserstein barycenters of torch models."""

from .config import (
    AveragingConfig,
    BarycenterConfig,
    DistillationConfig,
    FusionConfig,
    RobustConfig,
    TransportConfig,
)
from .engine import (
    FusionResult,
    align,
    fuse,
    fuse_models,
    fuse_result,
    output_width,
    traced_graph,
)
from .graph import (
    AlignmentGraph,
    UnsupportedModelError,
    alignment_spec,
    build_alignment_graph,
    register_rule,
)
from .moments import InputMoments, input_moments, pool_moments

__all__ = [
    "AlignmentGraph",
    "AveragingConfig",
    "BarycenterConfig",
    "DistillationConfig",
    "FusionConfig",
    "FusionResult",
    "InputMoments",
    "UnsupportedModelError",
    "align",
    "alignment_spec",
    "build_alignment_graph",
    "fuse",
    "fuse_models",
    "fuse_result",
    "input_moments",
    "output_width",
    "traced_graph",
    "pool_moments",
    "register_rule",
    "RobustConfig",
    "TransportConfig",
]
