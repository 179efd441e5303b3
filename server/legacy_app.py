"""The server side on Flower's legacy API: ``ServerApp(server_fn=...)`` running
:class:`otfusion.strategies.LegacyOTFusion`.

Name ``otfusion.server.legacy_app:server_app`` and ``otfusion.client.legacy:client_app``
in ``[tool.flwr.app.components]`` (they read the run config), or build them with a fixed
:class:`~otfusion.task.config.RunConfig`::

    config = RunConfig(local_epochs=5, min_train_nodes=4)
    run_simulation(server_app=create_legacy_server_app(config),
                   client_app=create_legacy_client_app(config), num_supernodes=4)
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.common import Context, NDArrays, Scalar, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import Strategy

from otfusion.client.legacy import get_weights, set_weights
from otfusion.server.evaluation import central_evaluator
from otfusion.strategies import LegacyOTFusion
from otfusion.strategies.replies import weighted_average_metrics
from otfusion.task.config import RunConfig


def _settings(config: RunConfig | None, context: Context) -> RunConfig:
    return config or RunConfig.from_run_config(context.run_config)


def legacy_central_evaluation(config: RunConfig):
    """Legacy ``evaluate_fn(server_round, ndarrays, config) -> (loss, metrics)`` on the
    embedded test split, or None for other datasets."""
    evaluate_state = central_evaluator(config)
    if evaluate_state is None:
        return None

    def evaluate_fn(server_round: int, parameters: NDArrays, fit_config: dict[str, Scalar]
                    ) -> tuple[float, dict[str, Scalar]]:
        model = config.build_model()
        set_weights(model, parameters)
        loss, accuracy = evaluate_state(model.state_dict())
        return loss, {"accuracy": accuracy}

    return evaluate_fn


def _weighted_metrics(pairs: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    return weighted_average_metrics([(float(n), m) for n, m in pairs])  # type: ignore[return-value]


def _round_config(server_round: int) -> dict[str, Scalar]:
    return {"server-round": server_round}


def make_legacy_strategy(config: RunConfig, **overrides: object) -> LegacyOTFusion:
    """The :class:`LegacyOTFusion` strategy of the run config (``strategy=fedavg`` is the
    same strategy with ``method="average"``).

    Every sampled client also evaluates the global model on its test data, and on the
    embedded digits the server evaluates it centrally. The fit and evaluate configs carry
    ``server-round``. ``overrides`` replace any keyword argument of
    :class:`LegacyOTFusion` / ``flwr.server.strategy.FedAvg``.
    """
    initial = config.build_model()
    kwargs: dict[str, object] = {
        "fusion": config.fusion(),
        "ot_rounds": config.ot_rounds,
        "fraction_fit": config.fraction_train,
        "fraction_evaluate": config.fraction_train,
        "min_fit_clients": config.min_train_nodes,
        "min_evaluate_clients": config.min_train_nodes,
        "min_available_clients": config.min_train_nodes,
        "initial_parameters": ndarrays_to_parameters(get_weights(initial)),
        "on_fit_config_fn": _round_config,
        "on_evaluate_config_fn": _round_config,
        "evaluate_fn": legacy_central_evaluation(config),
        "evaluate_metrics_aggregation_fn": _weighted_metrics,
    }
    kwargs.update(overrides)
    return LegacyOTFusion(config.build_model, **kwargs)  # type: ignore[arg-type]


def create_legacy_server_app(
    config: RunConfig | None = None,
    *,
    strategy_fn: Callable[[RunConfig], Strategy] = make_legacy_strategy,
) -> ServerApp:
    """A legacy ``ServerApp(server_fn=...)`` that runs ``strategy_fn(config)`` (by default
    :func:`make_legacy_strategy`) for ``num-server-rounds`` rounds, with ``config`` or by
    default with the run config of the Flower run."""

    def server_fn(context: Context) -> ServerAppComponents:
        settings = _settings(config, context)
        return ServerAppComponents(strategy=strategy_fn(settings),
                                   config=ServerConfig(num_rounds=settings.num_server_rounds))

    return ServerApp(server_fn=server_fn)


server_app = create_legacy_server_app()
