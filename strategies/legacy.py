"""OT fusion for the legacy strategy API (``flwr.server.strategy``, NumPyClient)."""

from __future__ import annotations

import json
from collections.abc import Callable
from logging import WARNING
from typing import Any, Literal

import torch
from flwr.common import Code, FitIns, FitRes, Parameters, Scalar, ndarrays_to_parameters
from flwr.common import parameters_to_ndarrays as _parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from torch import nn

from otfusion.fusion import AlignmentGraph, FusionConfig

from .replies import (
    STATISTIC_KEYS,
    check_array_list,
    check_weight,
    weighted_average_metrics,
)
from .rounds import FusedCallback, fuse_round, preload_optimiser, screen
from .settings import ClientModelFn, FusionSettings
from .updates import ClientUpdate, decode_update


def decode_statistics(metrics: dict[str, Scalar]) -> dict[str, object] | str:
    """A FitRes's metrics with the client statistics (``label-counts``, the input
    moments; lists sent as JSON strings, the legacy API's metrics being scalars) decoded,
    or why they cannot be."""
    decoded: dict[str, object] = dict(metrics)
    for key in STATISTIC_KEYS:
        value = metrics.get(key)
        if isinstance(value, str):
            try:
                decoded[key] = json.loads(value)
            except ValueError as exc:
                return f"'{key}' is not a JSON list ({exc})"
    return decoded


class LegacyOTFusion(FedAvg):
    """OT fusion for deployments on the legacy API (``NumPyClient``, ``Parameters``).

    The twin of :class:`otfusion.strategies.OTFusion` for ``flwr.server.strategy``
    servers. Legacy replies are ordered lists of arrays without names: they are named
    by the order of ``model_fn().state_dict().keys()``, the NumPyClient convention
    ``[v.cpu().numpy() for v in model.state_dict().values()]``. A list of the wrong
    length, or any array failing validation, rejects that client only.

    Parameters
    ----------
    model_fn : Callable[[], torch.nn.Module]
        Zero-argument callable returning a fresh instance of the global model. Its
        state_dict order names the arrays of every reply, its shapes and dtypes are
        what replies must carry, and it is the template of the fused model.
    fusion : FusionConfig (default: FusionConfig())
        Fusion settings; see :class:`otfusion.fusion.FusionConfig`.
    ot_rounds : Literal["all", "first"] (default: "all")
        With ``"first"``, round 1 is fused by optimal transport and later rounds are
        averaged (``method="average"``).
    heterogeneous : bool (default: False)
        Accept client models of other widths (same number, order and ranks of
        arrays); requires ``client_model_fn``.
    client_model_fn : Optional[Callable[[dict[str, tuple[int, ...]]], torch.nn.Module]]
        (default: None)
        Only with ``heterogeneous=True``: builds an empty model with the given shapes
        (tensor name -> shape of one reply).
    max_abs_weight : float (default: 1e4)
        Largest absolute value accepted in a reply's floating arrays.
    inputs : Optional[torch.Tensor] (default: None)
        Server-side input batch for the fusion engine (needed by
        ``fusion.cost == "activations"`` and models without ``input_shape``).
    graph : Optional[AlignmentGraph] (default: None)
        An explicit alignment spec (:func:`otfusion.fusion.alignment_spec`).
    on_fused : Optional[Callable[[int, Sequence[ClientUpdate]], None]] (default: None)
        Called after every successful fusion with the round and the accepted client
        updates in fusion order.
    **fedavg_kwargs
        Passed to :class:`flwr.server.strategy.FedAvg` (``fraction_fit``,
        ``min_fit_clients``, ``min_available_clients``, ``accept_failures``,
        ``initial_parameters``, ``on_fit_config_fn``, ``evaluate_fn``,
        ``fit_metrics_aggregation_fn``, ...). Without ``fit_metrics_aggregation_fn``
        the clients' numeric fit metrics are averaged weighted by ``num_examples``.

    Notes
    -----
    ``aggregate_fit`` returns ``(None, metrics)`` when fewer than ``min_fit_clients``
    results are valid, when the fusion fails, or when there are failures and
    ``accept_failures`` is False; Flower then keeps the previous parameters.

    A NumPyClient sends ``label-counts``, ``input-mean`` and ``input-var`` in its fit
    metrics as JSON strings (:func:`decode_statistics`); every result becomes a
    :class:`~otfusion.strategies.updates.ClientUpdate` and the round is
    :func:`~otfusion.strategies.rounds.fuse_round`, exactly as in
    :class:`~otfusion.strategies.OTFusion`: the output layer is fused per class and the
    fused model is distilled from the clients' input moments.
    """

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        fusion: FusionConfig = FusionConfig(),  # noqa: B008 - frozen, safe to share
        *,
        ot_rounds: Literal["all", "first"] = "all",
        heterogeneous: bool = False,
        client_model_fn: ClientModelFn | None = None,
        max_abs_weight: float = 1e4,
        inputs: torch.Tensor | None = None,
        graph: AlignmentGraph | None = None,
        on_fused: FusedCallback | None = None,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        self.settings = FusionSettings.create(model_fn, fusion, ot_rounds, heterogeneous,
                                              client_model_fn, max_abs_weight, inputs, graph)
        self.on_fused = on_fused

    def __repr__(self) -> str:
        """Compute a string representation of the strategy."""
        return (f"LegacyOTFusion(method={self.settings.fusion.method!r}, "
                f"ot_rounds={self.settings.ot_rounds!r}, "
                f"accept_failures={self.accept_failures})")

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """The parent's; the clients train while torch's optimiser modules load
        (:func:`~otfusion.strategies.rounds.preload_optimiser`)."""
        preload_optimiser(self.settings.round_config(server_round))
        return super().configure_fit(server_round, parameters, client_manager)

    def _decode(self, fit_res: Any, source: str) -> ClientUpdate | str:
        """One FitRes as a client update (model, weight, label counts and input moments
        from its metrics, as the Message API's replies carry them), or why it is
        rejected; never raises."""
        try:
            if fit_res.status.code != Code.OK:
                return f"status {fit_res.status.code}: {fit_res.status.message}"
            arrays = _parameters_to_ndarrays(fit_res.parameters)
            weight = check_weight(fit_res.num_examples, "num_examples")
        except Exception as exc:  # noqa: BLE001 - never raise for a malformed result
            return f"unreadable result ({type(exc).__name__}: {exc})"
        if isinstance(weight, str):
            return weight
        state = check_array_list(arrays, self.settings.expected,
                                 max_abs_weight=self.settings.max_abs_weight,
                                 exact_shapes=not self.settings.heterogeneous)
        if isinstance(state, str):
            return state
        metrics = decode_statistics(fit_res.metrics or {})
        if isinstance(metrics, str):
            return metrics
        return decode_update(state, weight, metrics, fit_res, source, self.settings)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Fuse the valid results' models into the new global parameters."""
        if not results:
            return None, {}
        if not self.accept_failures and failures:
            log(WARNING, "aggregate_fit (round %d): %d failures and accept_failures=False; "
                "the global model is not updated", server_round, len(failures))
            return None, {}
        updates, rejected = screen("aggregate_fit", server_round, (
            (f"result from client {getattr(proxy, 'cid', '?')}",
             self._decode(fit_res, f"client {getattr(proxy, 'cid', '?')}"))
            for proxy, fit_res in results), rejected=len(failures))
        state, fusion_metrics = fuse_round(updates, self.settings, server_round,
                                           rejected=rejected,
                                           min_updates=self.min_fit_clients)
        if state is None:
            return None, fusion_metrics  # type: ignore[return-value]
        metrics: dict[str, Scalar] = {}
        try:
            pairs = [(u.reply.num_examples, u.reply.metrics or {}) for u in updates]
            if self.fit_metrics_aggregation_fn:
                metrics.update(self.fit_metrics_aggregation_fn(pairs))
            else:
                metrics.update(weighted_average_metrics(
                    [(float(n), m) for n, m in pairs]))  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - metrics are informative only
            log(WARNING, "aggregate_fit (round %d): client metrics not aggregated (%s: %s)",
                server_round, type(exc).__name__, exc)
        metrics.update(fusion_metrics)
        if self.on_fused is not None:
            self.on_fused(server_round, updates)
        return ndarrays_to_parameters([t.numpy() for t in state.values()]), metrics
