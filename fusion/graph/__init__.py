"""Alignment graph: which tensor axes share one coupling, derived from a torch model.

- :mod:`.spec`: the graph as frozen data (groups, tensor axes);
- :mod:`.tracer`: derives it by tracing a model with ``torch.fx``;
- :mod:`.layouts`: where aligned units sit on a traced tensor's dimensions;
- :mod:`.rules`: one rule per layer family, a registry users extend;
- :mod:`.explicit`: a graph written by hand, for what the tracer cannot describe.
"""

from .explicit import alignment_spec
from .rules import register_rule
from .spec import (
    ActivationSite,
    AlignmentGraph,
    AxisSpec,
    Group,
    TensorSpec,
    UnsupportedModelError,
    is_recurrent,
)
from .tracer import build_alignment_graph

__all__ = [
    "ActivationSite",
    "AlignmentGraph",
    "AxisSpec",
    "Group",
    "TensorSpec",
    "UnsupportedModelError",
    "alignment_spec",
    "build_alignment_graph",
    "is_recurrent",
    "register_rule",
]
