"""LegacyOTFusion (flwr.server.strategy API) without a Flower runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flower_replies import (
    StubProxy,
    client_states,
    direct_fusion,
    fusion_order,
    global_model,
    warnings_text,
)
from flwr.common import (
    Code,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.strategy import FedAvg
from torch import nn

from otfusion.fusion import FusionConfig, fuse_result
from otfusion.strategies import LegacyOTFusion
from otfusion.zoo import build_model


def ndarrays(model_or_state) -> list[np.ndarray]:
    """The NumPyClient convention: state_dict values, in order."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else \
        model_or_state
    return [v.cpu().numpy() for v in state.values()]


def result(cid: str, arrays, n: int = 10, metrics=None, code=Code.OK):
    parameters = arrays if isinstance(arrays, Parameters) else ndarrays_to_parameters(arrays)
    return (StubProxy(cid=cid), FitRes(status=Status(code=code, message="boom"),
                                       parameters=parameters, num_examples=n,
                                       metrics=metrics or {}))


def assert_same_arrays(parameters: Parameters, expected_state) -> None:
    got = parameters_to_ndarrays(parameters)
    expected = ndarrays(expected_state)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_good_results_fuse_like_the_engine():
    states = client_states()
    results = [result(c, ndarrays(s), n, {"loss": float(n)})
               for c, s, n in zip("abc", states, [10, 20, 30], strict=True)]
    strategy = LegacyOTFusion(global_model)
    parameters, metrics = strategy.aggregate_fit(1, results, failures=[])
    expected = direct_fusion(states, [10, 20, 30])
    assert_same_arrays(parameters, expected.model.state_dict())
    assert metrics["accepted-replies"] == 3 and metrics["rejected-replies"] == 0
    assert metrics["fusion-seconds"] >= 0
    assert metrics["loss"] == pytest.approx((100 + 400 + 900) / 60)
    assert {k for k in metrics if k.startswith("transport-cost/")} == {
        f"transport-cost/{label}" for label in expected.group_costs}
    assert isinstance(strategy, FedAvg)


def _bad(kind: str, state):
    arrays = ndarrays(state)
    arrays = [a.copy() for a in arrays]
    if kind == "nan":
        arrays[0][0, 0] = np.nan
    elif kind == "inf":
        arrays[-1][0] = np.inf
    elif kind == "short":
        arrays = arrays[:-1]
    elif kind == "long":
        arrays = [*arrays, np.zeros(3, np.float32)]
    elif kind == "shape":
        arrays[2] = np.zeros((8, 15), np.float32)
    elif kind == "swapped":  # wrong order: shapes no longer match the names
        arrays[0], arrays[2] = arrays[2], arrays[0]
    elif kind == "dtype":
        arrays[0] = arrays[0].astype(np.int32)
    elif kind == "magnitude":
        arrays[2][0, 0] = 1e6
    elif kind == "corrupt":
        return Parameters(tensors=[b"junk"] * len(arrays), tensor_type="numpy.ndarray")
    return arrays


BAD = {
    "nan": "NaN or Inf",
    "inf": "NaN or Inf",
    "short": "5 arrays, expected 6",
    "long": "7 arrays, expected 6",
    "shape": "'layers.2.weight' has shape (8, 15), expected (8, 16)",
    "swapped": "'layers.0.weight' has shape (8, 16), expected (16, 64)",
    "dtype": "has dtype int32",
    "magnitude": "max_abs_weight",
    "corrupt": "unreadable result",
    "zero-examples": "'num_examples' is 0",
    "negative-examples": "'num_examples' is -3",
    "status": "status Code.FIT_NOT_IMPLEMENTED",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_result_is_rejected_and_logged(kind, flwr_logs):
    states = client_states()
    good = [result("a", ndarrays(states[0]), 10), result("b", ndarrays(states[1]), 30)]
    if kind == "zero-examples":
        bad = result("x", ndarrays(states[2]), 0)
    elif kind == "negative-examples":
        bad = result("x", ndarrays(states[2]), -3)
    elif kind == "status":
        bad = result("x", ndarrays(states[2]), 10, code=Code.FIT_NOT_IMPLEMENTED)
    else:
        bad = result("x", _bad(kind, states[2]), 10)
    strategy = LegacyOTFusion(global_model)
    parameters, metrics = strategy.aggregate_fit(1, [good[0], bad, good[1]], failures=[])
    assert_same_arrays(parameters, direct_fusion(states[:2], [10, 30]).model.state_dict())
    assert metrics["accepted-replies"] == 2 and metrics["rejected-replies"] == 1
    text = warnings_text(flwr_logs)
    assert "client x" in text and BAD[kind] in text
    assert "client a" not in text and "client b" not in text


def test_too_few_valid_results_return_none(flwr_logs):
    states = client_states(2)
    strategy = LegacyOTFusion(global_model, min_fit_clients=2)
    parameters, metrics = strategy.aggregate_fit(
        1, [result("a", ndarrays(states[0])), result("b", _bad("nan", states[1]))],
        failures=[RuntimeError("lost")])
    assert parameters is None
    assert metrics == {"accepted-replies": 1, "rejected-replies": 2}
    assert "fewer than the 2 needed" in warnings_text(flwr_logs)


def test_failures_follow_accept_failures():
    states = client_states(2)
    results = [result("a", ndarrays(states[0])), result("b", ndarrays(states[1]))]
    failure = [RuntimeError("client timed out")]
    assert LegacyOTFusion(global_model, accept_failures=False).aggregate_fit(
        1, results, failure) == (None, {})
    parameters, metrics = LegacyOTFusion(global_model).aggregate_fit(1, results, failure)
    assert parameters is not None
    assert metrics["accepted-replies"] == 2 and metrics["rejected-replies"] == 1
    assert LegacyOTFusion(global_model).aggregate_fit(1, [], failure) == (None, {})


def test_engine_failure_returns_none(monkeypatch, flwr_logs):
    def broken(*args, **kwargs):
        raise RuntimeError("solver exploded")

    monkeypatch.setattr("otfusion.strategies.rounds.fuse_result", broken)
    states = client_states(2)
    parameters, metrics = LegacyOTFusion(global_model).aggregate_fit(
        1, [result("a", ndarrays(states[0])), result("b", ndarrays(states[1]))], [])
    assert parameters is None and metrics["accepted-replies"] == 2
    assert "fusion failed (RuntimeError: solver exploded)" in warnings_text(flwr_logs)


def test_ot_rounds_first_averages_after_round_one():
    states = client_states()
    weights = [1, 2, 3]  # within the default weight cap (twice the median)
    results = [result(c, ndarrays(s), w) for c, s, w in zip("abc", states, weights,
                                                            strict=True)]
    strategy = LegacyOTFusion(global_model, ot_rounds="first")
    first, m1 = strategy.aggregate_fit(1, results, [])
    assert_same_arrays(first, direct_fusion(states, weights).model.state_dict())
    assert any(k.startswith("transport-cost/") for k in m1)
    second, m2 = strategy.aggregate_fit(2, results, [])
    mean = {k: sum(w * s[k] for w, s in zip(weights, states, strict=True)) / sum(weights)
            for k in states[0]}
    assert_same_arrays(second, mean)
    assert not any(k.startswith("transport-cost/") for k in m2)


def test_fit_metrics_aggregation_fn_is_used():
    states = client_states(2)
    seen = []

    def aggregate(pairs):
        seen.extend(pairs)
        return {"clients": len(pairs)}

    strategy = LegacyOTFusion(global_model, fit_metrics_aggregation_fn=aggregate)
    _, metrics = strategy.aggregate_fit(
        1, [result("a", ndarrays(states[0]), 4, {"acc": 0.5}),
            result("b", _bad("nan", states[1]), 6, {"acc": 0.9}),
            result("c", ndarrays(states[1]), 6, {"acc": 1.0})], [])
    assert metrics["clients"] == 2 and metrics["accepted-replies"] == 2
    assert [n for n, _ in seen] == [4, 6]  # the rejected result is not aggregated


def test_heterogeneous_results():
    def mlp_from_shapes(shapes):
        return build_model("mlp", widths=(shapes["layers.0.weight"][0],
                                          shapes["layers.2.weight"][0]), seed=0)

    models = [build_model("mlp", widths=w, seed=30 + k)
              for k, w in enumerate([(20, 10), (12, 6)])]
    strategy = LegacyOTFusion(global_model, heterogeneous=True, client_model_fn=mlp_from_shapes)
    parameters, metrics = strategy.aggregate_fit(
        1, [result("a", ndarrays(models[0]), 5), result("b", ndarrays(models[1]), 5)], [])
    assert metrics["accepted-replies"] == 2
    order = fusion_order([m.state_dict() for m in models], [5, 5])
    expected = fuse_result([models[k] for k in order], weights=[5, 5], target=global_model())
    assert_same_arrays(parameters, expected.model.state_dict())


def test_settings_and_repr():
    with pytest.raises(ValueError, match="ot_rounds"):
        LegacyOTFusion(global_model, ot_rounds="sometimes")
    strategy = LegacyOTFusion(global_model, FusionConfig(method="average"), min_fit_clients=3,
                              accept_failures=False)
    assert strategy.min_fit_clients == 3 and strategy.settings.fusion.method == "average"
    assert repr(strategy) == ("LegacyOTFusion(method='average', ot_rounds='all', "
                              "accept_failures=False)")


def test_integer_buffers_survive_the_list_format():
    class TinyBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_shape = (4,)
            self.fc = nn.Linear(4, 6)
            self.bn = nn.BatchNorm1d(6)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            return self.head(torch.relu(self.bn(self.fc(x))))

    torch.manual_seed(0)
    models = [TinyBN() for _ in range(2)]
    strategy = LegacyOTFusion(TinyBN)
    parameters, _ = strategy.aggregate_fit(
        1, [result("a", ndarrays(models[0])), result("b", ndarrays(models[1]))], [])
    out = dict(zip(TinyBN().state_dict(), parameters_to_ndarrays(parameters), strict=True))
    assert out["bn.num_batches_tracked"].dtype == np.int64
    assert out["fc.weight"].dtype == np.float32


def test_legacy_path_fuses_the_head_per_class_and_distils_like_the_message_api():
    """The same client updates (models, num-examples, label counts, input moments)
    through both strategies give the same global model; the label counts and moments
    are used (the result differs from a fusion without them)."""
    import json

    from flower_replies import reply
    from flwr.app import ArrayRecord

    from otfusion.strategies import OTFusion

    config = FusionConfig.from_options(distill_steps=20, distill_samples=64)
    states = client_states(3)
    generator = torch.Generator().manual_seed(0)
    statistics = []
    for k in range(3):
        counts = [0] * 10
        for c in range(3 * k, 3 * k + 4):
            counts[c] = 5 + c
        mean = torch.rand(64, generator=generator).tolist()
        var = (0.5 + torch.rand(64, generator=generator)).tolist()
        statistics.append({"label-counts": counts, "input-mean": mean, "input-var": var})
    weights = [sum(s["label-counts"]) for s in statistics]

    message = OTFusion(global_model, config, min_train_nodes=3)
    arrays, message_metrics = message.aggregate_train(1, [
        reply(k + 1, ArrayRecord(states[k]), weights[k], **statistics[k]) for k in range(3)])
    legacy = LegacyOTFusion(global_model, config, min_fit_clients=3)
    parameters, legacy_metrics = legacy.aggregate_fit(1, [
        result(str(k), ndarrays(states[k]), weights[k],
               {key: json.dumps(value) for key, value in statistics[k].items()})
        for k in range(3)], [])
    assert "distill-kl" in message_metrics and "distill-kl" in legacy_metrics
    fused = arrays.to_torch_state_dict()
    assert_same_arrays(parameters, fused)
    plain, _ = legacy.aggregate_fit(1, [result(str(k), ndarrays(states[k]), weights[k])
                                        for k in range(3)], [])
    head = list(fused).index("head.weight")
    assert not np.array_equal(parameters_to_ndarrays(plain)[head],
                              parameters_to_ndarrays(parameters)[head])


def test_legacy_statistics_that_are_not_json_reject_the_result():
    legacy = LegacyOTFusion(global_model, min_fit_clients=1)
    states = client_states(2)
    parameters, metrics = legacy.aggregate_fit(1, [
        result("good", ndarrays(states[0])),
        result("bad", ndarrays(states[1]), metrics={"label-counts": "[1, 2"})], [])
    assert metrics["accepted-replies"] == 1 and metrics["rejected-replies"] == 1


def test_fit_rounds_preload_the_optimiser_while_the_clients_train(monkeypatch):
    from flwr.server.client_manager import SimpleClientManager

    import otfusion.strategies.legacy as module

    preloaded = []
    monkeypatch.setattr(module, "preload_optimiser", preloaded.append)
    manager = SimpleClientManager()
    for cid in "abc":
        manager.register(StubProxy(cid=cid))
    strategy = LegacyOTFusion(global_model, ot_rounds="first", min_available_clients=3)
    parameters = ndarrays_to_parameters([t.numpy() for t in global_model().state_dict().values()])
    for server_round in (1, 2):
        assert len(strategy.configure_fit(server_round, parameters, manager)) == 3
    assert [config.method for config in preloaded] == ["wasserstein", "average"]
