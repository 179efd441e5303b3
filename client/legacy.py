"""The client side on Flower's legacy API: a ``NumPyClient`` for the zoo models.

For deployments still built on ``flwr.server.strategy`` and ``NumPyClient``; the server
side is :mod:`otfusion.server.legacy_app`. Name ``otfusion.client.legacy:client_app`` in
``[tool.flwr.app.components]`` (it reads the run config), or build one with a fixed
:class:`~otfusion.task.config.RunConfig` with :func:`create_legacy_client_app`.

The legacy API moves parameters as an ordered list of arrays without names: this
module and the strategy both use the NumPyClient convention, the order of
``model.state_dict()`` (buffers included), see :func:`get_weights`. The client's data,
training and the ``client-init`` rule are those of :mod:`otfusion.client.app`.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.client import Client, ClientApp, NumPyClient
from flwr.common import Context, NDArrays, Scalar
from torch import nn

from otfusion.client.app import client_data, client_statistics
from otfusion.task.config import RunConfig
from otfusion.task.training import evaluate, train


def get_weights(model: nn.Module) -> NDArrays:
    """The model's state_dict values as numpy arrays, in state_dict order."""
    return [v.detach().cpu().numpy() for v in model.state_dict().values()]


def set_weights(model: nn.Module, weights: Sequence[np.ndarray]) -> None:
    """Load arrays given in state_dict order (see :func:`get_weights`) into ``model``.

    Raises ``ValueError`` naming the first mismatch when the number of arrays or a shape
    does not fit; values are cast to the model's dtypes."""
    state = model.state_dict()
    if len(weights) != len(state):
        raise ValueError(f"got {len(weights)} arrays for a model with {len(state)} "
                         "state_dict entries")
    new_state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (name, current), array in zip(state.items(), weights, strict=True):
        tensor = torch.as_tensor(np.asarray(array))
        if tuple(tensor.shape) != tuple(current.shape):
            raise ValueError(f"array for '{name}' has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(current.shape)}")
        new_state[name] = tensor.to(current.dtype)
    model.load_state_dict(new_state, strict=True)


class LegacyClient(NumPyClient):
    """A ``NumPyClient`` that trains and evaluates the zoo model ``config.model`` on this
    node's data (:func:`otfusion.client.app.client_data`: its partition of the run's
    dataset, or ``data-path`` from the node config).

    ``fit`` trains from the given parameters or, in round 1 with
    ``client-init=local-seed``, from this client's own seed (the round is the fit
    config's ``server-round``, 1 when absent). The fit config may override
    ``local-epochs`` and ``lr``. It returns the trained arrays, the number of training
    examples (the fusion weight) and the metrics ``train-loss``, ``label-counts`` and
    (with ``send-input-moments``) ``input-mean``, ``input-var`` and
    ``input-components``, as the ClientApp's
    replies carry them (:func:`otfusion.client.app.client_statistics`), each list as a
    JSON string: the legacy API's metrics are scalars only. ``evaluate`` returns the
    loss, the number of test examples and ``{"eval-loss", "eval-accuracy"}``.
    """

    def __init__(self, config: RunConfig, node_config: Mapping[str, Scalar],
                 node_id: int = 0) -> None:
        self.config = config
        self.node_config = node_config
        self.node = int(node_config.get("partition-id", node_id % 2**31))
        self.model = config.build_model()

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        return get_weights(self.model)

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]
            ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        settings = self.config
        seed = settings.client_seed(self.node)
        if settings.client_init == "local-seed" and int(config.get("server-round", 1)) == 1:
            self.model = settings.build_model(seed=seed)
        else:
            set_weights(self.model, parameters)
        data = client_data(settings, self.node_config, "train")
        start = time.perf_counter()
        loss = train(self.model, data,
                     epochs=int(config.get("local-epochs", settings.local_epochs)),
                     lr=float(config.get("lr", settings.lr)),
                     batch_size=settings.batch_size, optimizer=settings.optimizer, seed=seed)
        statistics = client_statistics(settings, self.model, data)
        return get_weights(self.model), len(data), {
            "train-loss": float(loss), "train-seconds": time.perf_counter() - start,
            **{key: json.dumps(value) for key, value in statistics.items()}}

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]
                 ) -> tuple[float, int, dict[str, Scalar]]:
        set_weights(self.model, parameters)
        data = client_data(self.config, self.node_config, "test")
        loss, accuracy = evaluate(self.model, data)
        return float(loss), len(data), {"eval-loss": float(loss),
                                        "eval-accuracy": float(accuracy)}


def _settings(config: RunConfig | None, context: Context) -> RunConfig:
    return config or RunConfig.from_run_config(context.run_config)


def create_legacy_client_app(config: RunConfig | None = None) -> ClientApp:
    """A legacy ``ClientApp(client_fn=...)`` of :class:`LegacyClient` that runs with
    ``config``, or by default with the run config of the Flower run."""

    def client_fn(context: Context) -> Client:
        return LegacyClient(_settings(config, context), context.node_config,
                            context.node_id).to_client()

    return ClientApp(client_fn=client_fn)


client_app = create_legacy_client_app()
