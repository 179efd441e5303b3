"""Central evaluation: the global model on the embedded test split, for both ServerApps
and the run report."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from otfusion.task.config import RunConfig
from otfusion.task.data import TensorData, load_digits_dataset
from otfusion.task.training import evaluate

StateEvaluator = Callable[[Mapping[str, torch.Tensor]], tuple[float, float]]


def central_test_data(config: RunConfig) -> TensorData | None:
    """The test split the server holds: the embedded digits' (split with the run's seed),
    or None for other datasets, whose test data only the clients have."""
    if config.dataset != "digits":
        return None
    return load_digits_dataset(seed=config.seed)[1]


def central_evaluator(config: RunConfig) -> StateEvaluator | None:
    """``evaluate(state_dict) -> (loss, accuracy)`` of the run's model on
    :func:`central_test_data`, or None when the server holds no test data."""
    test = central_test_data(config)
    if test is None:
        return None

    def evaluate_state(state: Mapping[str, torch.Tensor]) -> tuple[float, float]:
        model = config.build_model()
        model.load_state_dict(state)
        loss, accuracy = evaluate(model, test)
        return float(loss), float(accuracy)

    return evaluate_state
