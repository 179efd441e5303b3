"""Checkpointed runs for Message-API strategies: every completed round is saved, and a
run started from a saved checkpoint resumes after its last completed round."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any, Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result


class RoundCheckpoint(Protocol):
    """Where :meth:`ResumableStrategy.start` records every completed round and resumes
    from (implemented by :class:`otfusion.server.checkpoint.RunCheckpoint`)."""

    def load(self) -> tuple[int, ArrayRecord, Result] | None:
        """(completed round, global arrays, metrics history), or None to start anew."""

    def save(self, server_round: int, arrays: ArrayRecord, history: Result) -> None:
        """Record ``server_round`` as completed."""


class ResumableStrategy:
    """Mixin before a ``flwr.serverapp.strategy.Strategy`` (e.g. ``FedAvg``) whose
    ``start`` takes a :class:`RoundCheckpoint`.

    After every round (training, client and central evaluation) the global arrays and
    the metrics history are saved there, and a run started with a saved checkpoint
    resumes after its last completed round. The rounds keep their numbers: clients see
    ``server-round`` counting on from the checkpoint, and a subclass's
    ``aggregate_train`` numbers its round with :meth:`global_round` and records its
    metrics with :meth:`record_train`.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._completed_rounds = 0  # rounds done before ``start`` (a resumed run)
        self._history = Result()

    def global_round(self, server_round: int) -> int:
        """The run's number of the round ``start`` calls ``server_round``."""
        return server_round + self._completed_rounds

    def record_train(self, server_round: int, metrics: MetricRecord) -> None:
        """Record the train metrics of (global) round ``server_round`` in the history."""
        self._history.train_metrics_clientapp[server_round] = metrics

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The parent's, with rounds counted on from a resumed checkpoint."""
        return super().configure_train(  # type: ignore[misc]
            self.global_round(server_round), arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """The parent's, with rounds counted on from a resumed checkpoint."""
        return super().configure_evaluate(  # type: ignore[misc]
            self.global_round(server_round), arrays, config, grid)

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        """The parent's, recorded in the history under the checkpoint-continued round."""
        server_round = self.global_round(server_round)
        metrics = super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]
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
            result = super().start(  # type: ignore[misc]
                grid, arrays, num_rounds=max(num_rounds - done, 0), timeout=timeout,
                train_config=train_config, evaluate_config=evaluate_config,
                evaluate_fn=evaluate_and_save if evaluate_fn or checkpoint else None)
        finally:
            self._completed_rounds = 0
        if len(result.arrays) == 0:
            log(WARNING, "No round produced a fused model: the final arrays are the starting "
                "arrays")
        self._history.arrays = result.arrays if len(result.arrays) else arrays
        return self._history
