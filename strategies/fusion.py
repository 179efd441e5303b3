"""Deprecated alias of :mod:`otfusion.fusion`, where the engine now lives.

``import otfusion.strategies.fusion`` (and its submodules) keeps working for one release,
with a ``DeprecationWarning``; import :mod:`otfusion.fusion` instead.
"""

import importlib
import sys
import warnings

from otfusion.fusion import *  # noqa: F403
from otfusion.fusion import __all__  # noqa: F401

warnings.warn("otfusion.strategies.fusion is deprecated; import otfusion.fusion instead",
              DeprecationWarning, stacklevel=2)

for _module in ("averaging", "barycenter", "config", "distillation", "engine", "graph", "modes",
                "projection", "transport", "validation"):
    sys.modules[f"{__name__}.{_module}"] = importlib.import_module(f"otfusion.fusion.{_module}")
