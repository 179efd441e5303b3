"""OT fusion strategy for Flower's Message API (``flwr.serverapp.strategy``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any, Literal

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from otfusion.fusion import AlignmentGraph, FusionConfig

from .replies import STATISTIC_KEYS, check_content, weighted_average_metrics
from .resume import ResumableStrategy
from .rounds import FusedCallback, fuse_round, preload_optimiser, screen
from .settings import ClientModelFn, FusionSettings
from .updates import ClientUpdate, decode_update


def aggregate_train_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Default ``train_metrics_aggr_fn`` of :class:`OTFusion`.

    Weighted average of the numeric client metrics (the weight key excluded); unlike
    Flower's default, a metric is averaged only over the replies that report it, and
    non-finite values are ignored. Each record holds exactly one MetricRecord.
    """
    pairs = []
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        pairs.append((float(metrics[weighted_by_key]), dict(metrics)))
    skip = (weighted_by_key, *STATISTIC_KEYS)
    return MetricRecord(weighted_average_metrics(pairs, skip=skip))


class OTFusion(ResumableStrategy, FedAvg):
    """One-shot federated learning by optimal-transport model fusion.

    Like FedAvg, but the clients' models are fused layer by layer with Wasserstein
    barycenters (neurons are matched before they are averaged) instead of being averaged
    coordinate by coordinate. Replies are aligned by array name, validated one by one,
    and a malformed reply is logged and left out instead of failing the round.

    Parameters
    ----------
    model_fn : Callable[[], torch.nn.Module]
        Zero-argument callable returning a fresh instance of the global model. It fixes
        the names, shapes and dtypes every reply must carry, and is the template
        (architecture and widths) of the fused model.
    fusion : FusionConfig (default: FusionConfig())
        Fusion settings (method, solver, reg, cost, max_iter, tol, ...); see
        :class:`otfusion.fusion.FusionConfig`.
    ot_rounds : Literal["all", "first"] (default: "all")
        Rounds fused by optimal transport. With ``"first"``, round 1 is fused by OT
        and later rounds, whose clients all start from the fused model, are averaged
        (``method="average"``, which needs the global shapes).
    heterogeneous : bool (default: False)
        Accept client models whose widths differ from the global model (same keys and
        ranks); they are fused into the global widths. Requires ``client_model_fn``.
        Without it, every reply must have exactly the global shapes.
    client_model_fn : Optional[Callable[[dict[str, tuple[int, ...]]], torch.nn.Module]]
        (default: None)
        Only with ``heterogeneous=True``: builds an empty model whose state_dict has the
        given shapes (tensor name -> shape of one reply). A reply whose shapes it cannot
        build, or whose arrays do not load into the model it returns, is rejected.
    max_abs_weight : float (default: 1e4)
        Largest absolute value accepted in a reply's floating arrays. Integer buffers
        (e.g. BatchNorm's ``num_batches_tracked``) are not bounded.
    inputs : Optional[torch.Tensor] (default: None)
        A batch of server-side inputs passed to the fusion engine. Required when
        ``fusion.cost == "activations"``, and for tracing models that declare no
        ``input_shape`` attribute.
    graph : Optional[AlignmentGraph] (default: None)
        An explicit alignment spec (:func:`otfusion.fusion.alignment_spec`) for a model
        the tracer cannot describe; by default the graph is traced from the model.
    on_fused : Optional[Callable[[int, Sequence[ClientUpdate]], None]] (default: None)
        Called after every successful fusion with the round and the accepted client
        updates in fusion order (models, weights, statistics), e.g. to compare the
        fused model with their ensemble.
    **fedavg_kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg`: ``fraction_train``,
        ``fraction_evaluate``, ``min_train_nodes``, ``min_evaluate_nodes``,
        ``min_available_nodes``, ``weighted_by_key`` (default "num-examples", the client
        weight in fusion), ``arrayrecord_key``, ``configrecord_key``,
        ``train_metrics_aggr_fn`` (default: :func:`aggregate_train_metrics`) and
        ``evaluate_metrics_aggr_fn``.

    Notes
    -----
    ``aggregate_train`` returns ``(None, MetricRecord)`` when fewer than
    ``min_train_nodes`` replies are valid or the fusion fails; ``start`` then keeps the
    previous global arrays. Its MetricRecord holds ``fusion-seconds``,
    ``accepted-replies``, ``rejected-replies`` (error replies included), one
    ``transport-cost/<group>`` per aligned layer group, and the weighted average of
    the clients' numeric train metrics. Accepted replies are fused in the order of a
    digest of their content (:func:`~otfusion.strategies.replies.reply_digest`), so the
    fused model is bit-identical whatever order the replies arrive in and whichever
    node ids the clients have.

    A reply may carry ``label-counts`` (its training examples per class) in its
    MetricRecord; in OT rounds the output layer's row of each class is then fused with
    weights ``num-examples * counts / sum(counts)``, so that a class comes from the
    clients that saw it. A reply without them counts as uniform over the classes; a
    malformed list rejects the reply.

    A reply may also carry ``input-mean`` and ``input-var``: the per-feature mean and
    variance of its training inputs (flattened; one entry per feature of the model's
    ``input_shape``). In OT rounds the fused model is then distilled from the accepted
    clients' ensemble on synthetic inputs drawn from the pooled moments
    (``fusion.distillation.steps``, see :mod:`~otfusion.fusion.distillation`),
    and the round's metrics get ``distill-kl``. Replies without them are fused but do
    not shape the synthetic inputs; when none sends them, nothing is distilled.
    Malformed moments reject the reply.

    Each reply becomes a :class:`~otfusion.strategies.updates.ClientUpdate`, and the
    round is :func:`~otfusion.strategies.rounds.fuse_round`, the same pipeline as
    :class:`~otfusion.strategies.LegacyOTFusion`'s.

    ``start`` takes an optional ``checkpoint``
    (:class:`~otfusion.strategies.resume.RoundCheckpoint`): every completed round is saved
    there, and a run started with a saved checkpoint resumes after its last completed
    round (:class:`~otfusion.strategies.resume.ResumableStrategy`).
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
        if fedavg_kwargs.get("train_metrics_aggr_fn") is None:
            fedavg_kwargs["train_metrics_aggr_fn"] = aggregate_train_metrics
        super().__init__(**fedavg_kwargs)
        self.settings = FusionSettings.create(model_fn, fusion, ot_rounds, heterogeneous,
                                              client_model_fn, max_abs_weight, inputs, graph)
        self.on_fused = on_fused

    def summary(self) -> None:
        """Log summary configuration of the strategy, fusion settings included."""
        super().summary()
        log_settings(self.settings)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The parent's; the clients train while torch's optimiser modules load
        (:func:`~otfusion.strategies.rounds.preload_optimiser`)."""
        preload_optimiser(self.settings.round_config(self.global_round(server_round)))
        return super().configure_train(server_round, arrays, config, grid)

    def _decode(self, msg: Message) -> ClientUpdate | str:
        """The reply's client update, or why it is rejected; never raises."""
        try:
            if msg.has_error():
                return f"error reply ({msg.error.code}: {msg.error.reason})"
            content = msg.content
        except Exception as exc:  # noqa: BLE001 - never raise for a malformed reply
            return f"unreadable reply ({type(exc).__name__}: {exc})"
        checked = check_content(content, self.settings.expected, weight_key=self.weighted_by_key,
                                max_abs_weight=self.settings.max_abs_weight,
                                exact_shapes=not self.settings.heterogeneous)
        if isinstance(checked, str):
            return checked
        state, weight = checked
        return decode_update(state, weight, next(iter(content.metric_records.values())),
                             content, f"node {_node_id(msg)}", self.settings)

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Fuse the valid replies' models into the new global ArrayRecord.

        Returns ``(None, MetricRecord)`` with the reply counts when fewer than
        ``min_train_nodes`` replies are valid or the fusion fails; never raises
        because of a reply.
        """
        server_round = self.global_round(server_round)
        updates, rejected = screen("aggregate_train", server_round, (
            (f"reply from node {_node_id(msg)}", self._decode(msg)) for msg in replies))
        state, fusion_metrics = fuse_round(updates, self.settings, server_round,
                                           rejected=rejected,
                                           min_updates=self.min_train_nodes)
        metrics = MetricRecord()
        if state is not None:
            try:
                client_metrics = self.train_metrics_aggr_fn([u.reply for u in updates],
                                                            self.weighted_by_key)
                for key, value in (client_metrics or {}).items():
                    metrics[key] = value
            except Exception as exc:  # noqa: BLE001 - metrics are informative only
                log(WARNING, "aggregate_train (round %d): client metrics not aggregated "
                    "(%s: %s)", server_round, type(exc).__name__, exc)
            if self.on_fused is not None:
                self.on_fused(server_round, updates)
        for key, value in fusion_metrics.items():
            metrics[key] = value
        self.record_train(server_round, metrics)
        return (None if state is None else ArrayRecord(state)), metrics


def log_settings(settings: FusionSettings) -> None:
    """Log the fusion settings below a strategy's summary."""
    lines = settings.describe()
    log(INFO, "\t└──> OT fusion:")
    for k, line in enumerate(lines):
        log(INFO, "\t\t%s %s", "└──" if k == len(lines) - 1 else "├──", line)


def _node_id(msg: Any) -> Any:
    """The node a reply is from; the SuperLink sends the error replies of nodes that did
    not answer (gone, or their upload failed) under its own id."""
    try:
        node = msg.metadata.src_node_id
    except Exception:  # noqa: BLE001
        return "?"
    return f"{node} (the SuperLink, for a node that did not reply)" if (
        node == SUPERLINK_NODE_ID) else node
