"""The legacy-API twin (NumPyClient + ``LegacyOTFusion`` in ``ServerApp(server_fn=...)``)
on Flower's simulation engine, and the NumPyClient's parameter order."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy.aggregate import aggregate

from otfusion.client.legacy import LegacyClient, create_legacy_client_app, get_weights, set_weights
from otfusion.server.legacy_app import create_legacy_server_app, make_legacy_strategy
from otfusion.task.config import RunConfig
from otfusion.task.data import load_digits_dataset
from otfusion.task.training import evaluate
from otfusion.zoo import build_model

NUM_CLIENTS = 4


def _accuracy(weights, model: str = "mlp") -> float:
    net = build_model(model)
    set_weights(net, weights)
    _, test = load_digits_dataset()
    return evaluate(net, test)[1]


def test_numpy_client_parameter_order_round_trips():
    config = RunConfig(client_init="global", local_epochs=0)
    client = LegacyClient(config, {"partition-id": 1, "num-partitions": NUM_CLIENTS})
    template = build_model("mlp", seed=0).state_dict()
    sent = client.get_parameters({})
    assert [a.shape for a in sent] == [tuple(t.shape) for t in template.values()]
    assert all(np.array_equal(a, t.numpy()) for a, t in zip(sent, template.values(),
                                                            strict=True))
    # through Flower's serialisation, in and out of fit (no training: epochs 0)
    given = parameters_to_ndarrays(ndarrays_to_parameters(get_weights(build_model("mlp",
                                                                                  seed=7))))
    returned, num_examples, metrics = client.fit(given, {"server-round": 2})
    assert all(np.array_equal(a, b) for a, b in zip(returned, given, strict=True))
    assert num_examples > 0
    assert set(metrics) == {"train-loss", "train-seconds", "label-counts", "input-mean",
                            "input-var", "input-components"}
    # the statistics of this client's own training data, as the ClientApp sends them
    # lists travel as JSON strings: the legacy API's metrics are scalars
    counts, mean, var = (json.loads(metrics[k]) for k in ("label-counts", "input-mean",
                                                          "input-var"))
    assert sum(counts) == num_examples and len(counts) == 10
    assert len(mean) == len(var) == 64
    components = min(config.send_input_components, num_examples // 10)
    assert len(json.loads(metrics["input-components"])) == components * 64 > 0
    loss, num_test, eval_metrics = client.evaluate(given, {})
    assert eval_metrics["eval-accuracy"] == pytest.approx(
        evaluate(build_model("mlp", seed=7), _test_partition(1))[1])
    assert num_test == len(_test_partition(1)) and loss == eval_metrics["eval-loss"]
    # local-seed in round 1 ignores the given parameters: its own seed per partition
    seeded = LegacyClient(RunConfig(local_epochs=0), {"partition-id": 3, "num-partitions": 4})
    own, _, _ = seeded.fit(given, {"server-round": 1})
    assert all(np.array_equal(a, b) for a, b in
               zip(own, get_weights(build_model("mlp", seed=3)), strict=True))
    # wrong order or count is refused, naming the tensor
    with pytest.raises(ValueError, match="'layers.0.weight' has shape"):
        set_weights(build_model("mlp"), given[::-1])
    with pytest.raises(ValueError, match="got 1 arrays"):
        set_weights(build_model("mlp"), given[:1])


def _test_partition(partition_id: int):
    from otfusion.client.app import client_data

    return client_data(RunConfig(), {"partition-id": partition_id,
                                     "num-partitions": NUM_CLIENTS}, "test")


def test_buffers_and_integer_dtypes_keep_their_order():
    source, target = build_model("resnet20", seed=1), build_model("resnet20", seed=2)
    source.train()(torch.randn(4, *source.input_shape))  # move the BatchNorm running stats
    set_weights(target, parameters_to_ndarrays(ndarrays_to_parameters(get_weights(source))))
    for (name, a), (other, b) in zip(source.state_dict().items(), target.state_dict().items(),
                                     strict=True):
        assert name == other and a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.slow
def test_legacy_simulation_fuses_better_than_the_average(monkeypatch):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")  # the Ray workers
    monkeypatch.setattr("flwr.supercore.telemetry.create_event", lambda *a, **k: "disabled")
    from flwr.simulation import run_simulation

    config = RunConfig(local_epochs=5, min_train_nodes=NUM_CLIENTS)
    seen: dict[str, object] = {}

    def strategy_fn(settings: RunConfig):
        strategy = make_legacy_strategy(settings)
        aggregate_fit, aggregate_evaluate = strategy.aggregate_fit, strategy.aggregate_evaluate
        central = strategy.evaluate

        def capture_fit(server_round, results, failures):
            fused, metrics = aggregate_fit(server_round, results, failures)
            seen["replies"] = [(parameters_to_ndarrays(res.parameters), res.num_examples)
                               for _, res in results]
            seen.update(failures=failures, fused=parameters_to_ndarrays(fused),
                        fit_metrics=metrics)
            return fused, metrics

        def capture_evaluate(server_round, results, failures):
            seen["client_evaluation"] = aggregate_evaluate(server_round, results, failures)
            return seen["client_evaluation"]

        def capture_central(server_round, parameters):
            seen.setdefault("central", {})[server_round] = central(server_round, parameters)
            return seen["central"][server_round]

        strategy.aggregate_fit = capture_fit
        strategy.aggregate_evaluate = capture_evaluate
        strategy.evaluate = capture_central
        return strategy

    run_simulation(
        server_app=create_legacy_server_app(config, strategy_fn=strategy_fn),
        client_app=create_legacy_client_app(config),
        num_supernodes=NUM_CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )

    assert seen["failures"] == [] and len(seen["replies"]) == NUM_CLIENTS
    assert seen["fit_metrics"]["accepted-replies"] == NUM_CLIENTS
    clients = [_accuracy(arrays) for arrays, _ in seen["replies"]]
    fused = _accuracy(seen["fused"])
    vanilla = _accuracy(aggregate(seen["replies"]))  # Flower's own FedAvg average
    print(f"clients {np.round(clients, 3)}  fused {fused:.3f}  vanilla average {vanilla:.3f}")
    assert min(clients) > 0.7  # each client trained from its own seed
    assert fused > vanilla + 0.2 and fused > 0.7
    # the central evaluate_fn and the clients saw the same fused parameters, in order:
    # the IID test partitions cover the test split, so their weighted accuracy is the
    # central one
    loss, central_metrics = seen["central"][1]
    assert central_metrics["accuracy"] == pytest.approx(fused)
    client_loss, client_metrics = seen["client_evaluation"]
    assert client_metrics["eval-accuracy"] == pytest.approx(fused)
    assert client_loss == pytest.approx(loss, rel=1e-5)
