"""Flower strategies that fuse client models by optimal transport.

- :class:`OTFusion`: Message API (``flwr.serverapp.strategy.FedAvg`` subclass).
- :class:`LegacyOTFusion`: legacy API (``flwr.server.strategy.FedAvg`` subclass) for
  NumPyClient deployments.

Both run one pipeline: a reply's arrays and weight are checked (:mod:`.replies`) and
decoded into a :class:`~.updates.ClientUpdate` (:mod:`.updates`), and the accepted
updates are fused by :func:`~.rounds.fuse_round` with the strategy's
:class:`~.settings.FusionSettings`; :mod:`.resume` checkpoints and resumes runs. The
fusion engine itself is the Flower-free library :mod:`otfusion.fusion`.
"""

from .legacy import LegacyOTFusion
from .otfusion import OTFusion

__all__ = ["LegacyOTFusion", "OTFusion"]
