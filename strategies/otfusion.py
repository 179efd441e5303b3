"""OT fusion strategy for Flower's Message API (``flwr.serverapp.strategy``)."""

from __future__ import annotations

import copy
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any, Literal, NamedTuple, Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from torch import nn

from otfusion.fusion import (
    AlignmentGraph,
    FusionConfig,
    InputMoments,
    fuse_models,
    output_width,
    pool_moments,
)
from otfusion.fusion.distillation import distill

from .replies import (
    INPUT_MEAN_KEY,
    INPUT_VAR_KEY,
    LABEL_COUNTS_KEY,
    ExpectedArrays,
    check_content,
    check_input_moments,
    check_label_counts,
    reply_digest,
    weighted_average_metrics,
)

ClientModelFn = Callable[[dict[str, tuple[int, ...]]], nn.Module]


class _Accepted(NamedTuple):
    """A validated reply: its content digest (the fusion order), model, weight,
    content (a RecordDict, or a legacy FitRes), label counts and input moments (None
    when it sent none)."""

    digest: bytes
    model: nn.Module
    weight: float
    content: Any
    label_counts: list[float] | None
    input_moments: InputMoments | None


class RoundCheckpoint(Protocol):
    """Where :meth:`OTFusion.start` records every completed round and resumes from
    (implemented by :class:`otfusion.server.checkpoint.RunCheckpoint`)."""

    def load(self) -> tuple[int, ArrayRecord, Result] | None:
        """(completed round, global arrays, metrics history), or None to start anew."""

    def save(self, server_round: int, arrays: ArrayRecord, history: Result) -> None:
        """Record ``server_round`` as completed."""

_LABEL_UNSAFE = re.compile(r"[^0-9A-Za-z_.\-]+")


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
    skip = (weighted_by_key, LABEL_COUNTS_KEY, INPUT_MEAN_KEY, INPUT_VAR_KEY)
    return MetricRecord(weighted_average_metrics(pairs, skip=skip))


def transport_cost_metrics(group_costs: Mapping[str, float]) -> dict[str, float]:
    """``transport-cost/<label>`` metrics, labels reduced to ``[0-9A-Za-z_.-]``."""
    out: dict[str, float] = {}
    for label, cost in group_costs.items():
        key = f"transport-cost/{_LABEL_UNSAFE.sub('_', str(label)).strip('_') or 'group'}"
        unique, n = key, 2
        while unique in out:
            unique, n = f"{key}_{n}", n + 1
        out[unique] = float(cost)
    return out


class _FusionMixin:
    """The fusion settings and the work shared by :class:`OTFusion` and its legacy twin:
    turning a validated reply into a model, fusing, and the metrics that go with it."""

    model_fn: Callable[[], nn.Module]
    fusion: FusionConfig
    ot_rounds: Literal["all", "first"]
    heterogeneous: bool
    client_model_fn: ClientModelFn | None
    max_abs_weight: float
    inputs: torch.Tensor | None
    graph: AlignmentGraph | None
    expected: ExpectedArrays
    latest_models: list[nn.Module]
    latest_weights: list[float]
    num_classes: int | None

    def _init_fusion(self, model_fn: Callable[[], nn.Module], fusion: FusionConfig,
                     ot_rounds: str, heterogeneous: bool,
                     client_model_fn: ClientModelFn | None, max_abs_weight: float,
                     inputs: torch.Tensor | None, graph: AlignmentGraph | None) -> None:
        if not callable(model_fn):
            raise TypeError("model_fn must be a zero-argument callable returning an nn.Module")
        if not isinstance(fusion, FusionConfig):
            raise TypeError(f"fusion must be a FusionConfig, got {type(fusion).__name__}")
        if ot_rounds not in ("all", "first"):
            raise ValueError(f"ot_rounds must be 'all' or 'first', got {ot_rounds!r}")
        if heterogeneous and client_model_fn is None:
            raise ValueError("heterogeneous=True needs client_model_fn(shapes) -> nn.Module")
        if client_model_fn is not None and not heterogeneous:
            raise ValueError("client_model_fn is only used with heterogeneous=True")
        max_abs_weight = float(max_abs_weight)
        if not (math.isfinite(max_abs_weight) and max_abs_weight > 0):
            raise ValueError(f"max_abs_weight must be positive and finite, got {max_abs_weight}")
        if fusion.cost == "activations" and inputs is None:
            raise ValueError("fusion.cost='activations' needs a batch of server-side inputs")
        template = model_fn()
        if not isinstance(template, nn.Module):
            raise TypeError(f"model_fn() returned a {type(template).__name__}, not an nn.Module")
        self.model_fn = model_fn
        self.fusion = fusion
        self.ot_rounds = ot_rounds  # type: ignore[assignment]
        self.heterogeneous = heterogeneous
        self.client_model_fn = client_model_fn
        self.max_abs_weight = max_abs_weight
        self.inputs = inputs
        self.graph = graph
        self.expected = ExpectedArrays.from_state_dict(template.state_dict())
        self.latest_models = []
        self.latest_weights = []
        self.num_classes = output_width(template, inputs, graph)
        """The global model's number of classes (output width), None if unknown."""
        shape = getattr(template, "input_shape", None)
        if inputs is not None and not inputs.is_floating_point():
            shape = None  # e.g. token ids: no Gaussian inputs to distil on
        elif shape is None and inputs is not None:
            shape = inputs.shape[1:]
        self.input_shape = None if shape is None else tuple(shape)
        """The shape of one model input (that of the clients' input moments); None when
        unknown or when the inputs are not floating point, and then replies' moments are
        ignored."""

    def class_weights(self, weights: Sequence[float],
                      counts: Sequence[Sequence[float] | None]) -> list[list[float]] | None:
        """Per-client, per-class weights of the output layer: ``weight * counts /
        sum(counts)`` (the client's weight spread over its label distribution), or
        ``weight / C`` per class for a reply without label counts. None when no reply
        has counts or the number of classes is unknown."""
        classes = self.num_classes
        if classes is None or all(c is None for c in counts):
            return None
        return [[w / classes] * classes if c is None else [w * v / sum(c) for v in c]
                for w, c in zip(weights, counts, strict=True)]

    def fusion_config(self, server_round: int) -> FusionConfig:
        """The fusion settings of ``server_round``: averaging after round 1 when
        ``ot_rounds == "first"``."""
        if self.ot_rounds == "first" and server_round > 1:
            return self.fusion.model_copy(update={"method": "average"})
        return self.fusion

    def _client_statistics(self, metrics: Mapping[str, Any]
                           ) -> tuple[list[float] | None, InputMoments | None] | str:
        """A reply's validated ``label-counts`` and input moments (each None when absent),
        or why it is rejected."""
        counts = check_label_counts(metrics.get(LABEL_COUNTS_KEY), self.num_classes)
        if isinstance(counts, str):
            return counts
        moments = check_input_moments(metrics.get(INPUT_MEAN_KEY), metrics.get(INPUT_VAR_KEY),
                                      self.input_shape)
        if isinstance(moments, str):
            return moments
        return counts, moments

    def _accept(self, state: dict[str, torch.Tensor], weight: float,
                metrics: Mapping[str, Any], content: Any) -> _Accepted | str:
        """A reply whose arrays and weight passed ``check_content``/``check_array_list``,
        with its statistics validated and its model loaded, or why it is rejected."""
        statistics = self._client_statistics(metrics)
        if isinstance(statistics, str):
            return statistics
        model = self._load_model(state)
        if isinstance(model, str):
            return model
        return _Accepted(reply_digest(state, weight, *statistics), model, weight, content,
                         *statistics)

    def _fuse_accepted(self, server_round: int, accepted: Sequence[_Accepted]
                       ) -> tuple[OrderedDict[str, torch.Tensor], dict[str, float]]:
        """:meth:`_fuse` of the accepted replies, with their statistics."""
        return self._fuse(server_round, [a.model for a in accepted],
                          [a.weight for a in accepted], [a.label_counts for a in accepted],
                          [a.input_moments for a in accepted])

    def _load_model(self, state: dict[str, torch.Tensor]) -> nn.Module | str:
        """A model holding a validated state_dict, or why the state does not fit one."""
        try:
            if self.heterogeneous:
                assert self.client_model_fn is not None
                shapes = {name: tuple(t.shape) for name, t in state.items()}
                model = self.client_model_fn(shapes)
                if not isinstance(model, nn.Module):
                    return f"client_model_fn returned a {type(model).__name__}, not an nn.Module"
            else:
                model = self.model_fn()
            model.load_state_dict(state, strict=True)
        except Exception as exc:  # noqa: BLE001 - a reply that fits no model is rejected
            return f"does not load into the model ({type(exc).__name__}: {exc})"
        return model

    def _fuse(self, server_round: int, models: Sequence[nn.Module],
              weights: Sequence[float],
              label_counts: Sequence[Sequence[float] | None] | None = None,
              input_moments: Sequence[InputMoments | None] | None = None,
              ) -> tuple[OrderedDict[str, torch.Tensor], dict[str, float]]:
        """Fuse the accepted models; the fused state_dict in global key order with the
        global dtypes, and the fusion metrics. ``label_counts`` (validated, one per model
        or None) weight the output layer per class in optimal-transport rounds, in which
        the ``input_moments`` that are not None are pooled with the models' weights for
        the post-fusion distillation. Raises if the engine fails."""
        largest = max(weights)
        scaled = [w / largest for w in weights]
        config = self.fusion_config(server_round)
        per_class = (self.class_weights(scaled, label_counts)
                     if label_counts is not None and config.method != "average" else None)
        pooled = self._pooled_moments(config, input_moments, weights)
        start = time.perf_counter()
        result = fuse_models(list(models), weights=scaled, config=config,
                             target=self.model_fn(), inputs=self.inputs,
                             class_weights=per_class, graph=self.graph)
        model, distill_loss = result.model, None
        if pooled is not None:
            model, distill_loss = self._distilled(server_round, model, models, scaled, pooled,
                                                  config)
        seconds = time.perf_counter() - start
        state = model.state_dict()
        fused: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name in self.expected.keys:
            tensor = state[name].detach().to("cpu", self.expected.dtypes[name])
            if tuple(tensor.shape) != self.expected.shapes[name]:
                raise ValueError(f"fused '{name}' has shape {tuple(tensor.shape)}, "
                                 f"expected {self.expected.shapes[name]}")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"fused '{name}' contains NaN or Inf values")
            fused[name] = tensor.clone()
        metrics = {"fusion-seconds": float(seconds), **transport_cost_metrics(result.group_costs)}
        if distill_loss is not None:
            metrics["distill-kl"] = distill_loss
        self.latest_models, self.latest_weights = list(models), [float(w) for w in weights]
        return fused, metrics

    @staticmethod
    def _pooled_moments(config: FusionConfig,
                        input_moments: Sequence[InputMoments | None] | None,
                        weights: Sequence[float]) -> InputMoments | None:
        """The replies' input moments pooled with their weights; None when the round
        distils nothing (averaging, no distillation steps, or no reply sent moments)."""
        if input_moments is None or config.method == "average" or config.distill_steps == 0:
            return None
        sent = [(m, w) for m, w in zip(input_moments, weights, strict=True) if m is not None]
        if not sent:
            return None
        return pool_moments([m for m, _ in sent], [w for _, w in sent])

    @staticmethod
    def _distilled(server_round: int, fused: nn.Module, models: Sequence[nn.Module],
                   weights: Sequence[float], moments: InputMoments, config: FusionConfig
                   ) -> tuple[nn.Module, float | None]:
        """``fused`` distilled from ``models`` (:func:`distill`) and its final divergence;
        ``fused`` itself and None, with a logged warning, when the distillation fails or
        diverges: it is an improvement and never costs the round its model."""
        student = copy.deepcopy(fused)
        try:
            loss = distill(student, models, weights, moments, config)
        except Exception as exc:  # noqa: BLE001 - keep the undistilled fusion
            log(WARNING, "round %d: distillation failed (%s: %s); the global model is the "
                "undistilled fusion", server_round, type(exc).__name__, exc)
            return fused, None
        if not math.isfinite(loss):
            log(WARNING, "round %d: the distillation diverged; the global model is the "
                "undistilled fusion", server_round)
            return fused, None
        return student, loss

    def _log_fusion_settings(self) -> None:
        template = self.model_fn()
        log(INFO, "\t└──> OT fusion:")
        log(INFO, "\t\t├── Global model: %s (%d tensors, %d values)", type(template).__name__,
            len(self.expected.keys), sum(t.numel() for t in template.state_dict().values()))
        log(INFO, "\t\t├── Method: %s | solver: %s | cost: %s", self.fusion.method,
            self.fusion.solver, self.fusion.cost)
        log(INFO, "\t\t├── reg: %g | max_iter: %d | tol: %g", self.fusion.reg,
            self.fusion.max_iter, self.fusion.tol)
        if self.input_shape is None:
            log(INFO, "\t\t├── Distillation: off (the model's input shape is unknown or its "
                "inputs are not floating point)")
        else:
            log(INFO, "\t\t├── Distillation: %d steps on %d synthetic inputs (with the "
                "clients' input moments)", self.fusion.distill_steps,
                self.fusion.distill_samples)
        log(INFO, "\t\t├── OT rounds: %s%s", self.ot_rounds,
            " (average afterwards)" if self.ot_rounds == "first" else "")
        log(INFO, "\t\t├── Heterogeneous widths: %s", self.heterogeneous)
        log(INFO, "\t\t└── max |weight|: %g", self.max_abs_weight)


class OTFusion(_FusionMixin, FedAvg):
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
    (``fusion.distill_steps``, see :mod:`~otfusion.fusion.distillation`),
    and the round's metrics get ``distill-kl``. Replies without them are fused but do
    not shape the synthetic inputs; when none sends them, nothing is distilled.
    Malformed moments reject the reply.

    ``start`` takes an optional ``checkpoint`` (:class:`RoundCheckpoint`): after every
    round (training, client and central evaluation) it saves the global arrays and the
    metrics history there, and a run started with a saved checkpoint resumes after its
    last completed round. The rounds keep their numbers: clients see ``server-round``
    counting on from the checkpoint.

    After each successful fusion, ``latest_models`` and ``latest_weights`` hold the
    accepted client models (in fusion order) and their weights, e.g. to compare the
    fused model with their ensemble; they are kept until the next successful round.
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
        **fedavg_kwargs: Any,
    ) -> None:
        if fedavg_kwargs.get("train_metrics_aggr_fn") is None:
            fedavg_kwargs["train_metrics_aggr_fn"] = aggregate_train_metrics
        FedAvg.__init__(self, **fedavg_kwargs)
        self._init_fusion(model_fn, fusion, ot_rounds, heterogeneous, client_model_fn,
                          max_abs_weight, inputs, graph)
        self._completed_rounds = 0  # rounds done before ``start`` (a resumed run)
        self._history = Result()

    def summary(self) -> None:
        """Log summary configuration of the strategy, fusion settings included."""
        super().summary()
        self._log_fusion_settings()

    def _check_reply(self, msg: Message) -> _Accepted | str:
        """The reply as an accepted entry, or why it is rejected; never raises."""
        try:
            if msg.has_error():
                return f"error reply ({msg.error.code}: {msg.error.reason})"
            content = msg.content
        except Exception as exc:  # noqa: BLE001 - never raise for a malformed reply
            return f"unreadable reply ({type(exc).__name__}: {exc})"
        checked = check_content(content, self.expected, weight_key=self.weighted_by_key,
                                max_abs_weight=self.max_abs_weight,
                                exact_shapes=not self.heterogeneous)
        if isinstance(checked, str):
            return checked
        state, weight = checked
        return self._accept(state, weight, next(iter(content.metric_records.values())),
                            content)

    def _screen(self, server_round: int, replies: Iterable[Message]
                ) -> tuple[list[_Accepted], int]:
        """Accepted replies sorted by their content digest, and the number rejected.
        Every rejection is logged with its node id and reason."""
        accepted: list[_Accepted] = []
        rejected = 0
        for msg in replies:
            checked = self._check_reply(msg)
            if isinstance(checked, str):
                rejected += 1
                log(WARNING, "aggregate_train (round %d): rejected reply from node %s: %s",
                    server_round, _node_id(msg), checked)
            else:
                accepted.append(checked)
        accepted.sort(key=lambda entry: entry.digest)
        return accepted, rejected

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
        server_round += self._completed_rounds
        accepted, rejected = self._screen(server_round, replies)
        counts = {"accepted-replies": len(accepted), "rejected-replies": rejected}
        log(INFO, "aggregate_train (round %d): %d replies accepted, %d rejected",
            server_round, len(accepted), rejected)
        needed = max(1, self.min_train_nodes)
        if len(accepted) < needed:
            log(WARNING, "aggregate_train (round %d): %d valid replies, fewer than the %d "
                "needed (min_train_nodes); the global model is not updated",
                server_round, len(accepted), needed)
            return self._recorded(server_round, None, MetricRecord(counts))
        try:
            fused, fusion_metrics = self._fuse_accepted(server_round, accepted)
        except Exception as exc:  # noqa: BLE001 - keep the previous global model
            log(WARNING, "aggregate_train (round %d): fusion failed (%s: %s); the global "
                "model is not updated", server_round, type(exc).__name__, exc)
            return self._recorded(server_round, None, MetricRecord(counts))
        metrics = MetricRecord()
        try:
            client_metrics = self.train_metrics_aggr_fn([a.content for a in accepted],
                                                        self.weighted_by_key)
            for key, value in (client_metrics or {}).items():
                metrics[key] = value
        except Exception as exc:  # noqa: BLE001 - metrics are informative only
            log(WARNING, "aggregate_train (round %d): client metrics not aggregated (%s: %s)",
                server_round, type(exc).__name__, exc)
        for key, value in {**fusion_metrics, **counts}.items():
            metrics[key] = value
        return self._recorded(server_round, ArrayRecord(fused), metrics)

    def _recorded(self, server_round: int, arrays: ArrayRecord | None,
                  metrics: MetricRecord) -> tuple[ArrayRecord | None, MetricRecord]:
        self._history.train_metrics_clientapp[server_round] = metrics
        return arrays, metrics

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's, with rounds counted on from a resumed checkpoint."""
        return super().configure_train(server_round + self._completed_rounds, arrays, config,
                                       grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """FedAvg's, with rounds counted on from a resumed checkpoint."""
        return super().configure_evaluate(server_round + self._completed_rounds, arrays,
                                          config, grid)

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        """FedAvg's, recorded in the history under the checkpoint-continued round."""
        server_round += self._completed_rounds
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self._history.evaluate_metrics_clientapp[server_round] = metrics
        return metrics

    # pylint: disable=too-many-arguments, too-many-positional-arguments
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        checkpoint: RoundCheckpoint | None = None,
    ) -> Result:
        """Run the strategy (see :meth:`flwr.serverapp.strategy.Strategy.start`),
        saving every completed round to ``checkpoint`` and resuming from it.

        Flower leaves ``Result.arrays`` as an empty ArrayRecord when no round produced
        new arrays; here it is then the unchanged starting arrays.
        """
        saved = checkpoint.load() if checkpoint is not None else None
        done, arrays, self._history = saved if saved is not None else (0, initial_arrays,
                                                                       Result())
        if done:
            log(INFO, "Resuming after round %d of %d from the checkpoint", done, num_rounds)
        self._completed_rounds = done

        def evaluate_and_save(local_round: int, current: ArrayRecord) -> MetricRecord | None:
            server_round = local_round + done
            metrics = evaluate_fn(server_round, current) if evaluate_fn else None
            if metrics is not None:
                self._history.evaluate_metrics_serverapp[server_round] = metrics
            if checkpoint is not None and local_round > 0:
                checkpoint.save(server_round, current, self._history)
            return metrics

        try:
            result = super().start(grid, arrays, num_rounds=max(num_rounds - done, 0),
                                   timeout=timeout, train_config=train_config,
                                   evaluate_config=evaluate_config,
                                   evaluate_fn=evaluate_and_save
                                   if evaluate_fn or checkpoint else None)
        finally:
            self._completed_rounds = 0
        if len(result.arrays) == 0:
            log(WARNING, "No round produced a fused model: the final arrays are the starting "
                "arrays")
        self._history.arrays = result.arrays if len(result.arrays) else arrays
        return self._history


def _node_id(msg: Any) -> Any:
    """The node a reply is from; the SuperLink sends the error replies of nodes that did
    not answer (gone, or their upload failed) under its own id."""
    try:
        node = msg.metadata.src_node_id
    except Exception:  # noqa: BLE001
        return "?"
    return f"{node} (the SuperLink, for a node that did not reply)" if (
        node == SUPERLINK_NODE_ID) else node
