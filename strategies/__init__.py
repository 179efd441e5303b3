"""Flower strategies that fuse client models by optimal transport.

- :class:`OTFusion`: Message API (``flwr.serverapp.strategy.FedAvg`` subclass).
- :class:`LegacyOTFusion`: legacy API (``flwr.server.strategy.FedAvg`` subclass) for
  NumPyClient deployments.

The fusion engine itself is the Flower-free library :mod:`otfusion.fusion`.
"""

from .legacy import LegacyOTFusion
from .otfusion import OTFusion

__all__ = ["LegacyOTFusion", "OTFusion"]
