"""OTFusion (Message API) without a Flower runtime: fabricated reply Messages."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from attention_models import FEATURES, TOKENS
from attention_models import build as build_attention_model
from flower_replies import (
    WIDTHS,
    FakeGrid,
    client_states,
    direct_fusion,
    error_reply,
    fusion_order,
    global_model,
    metadata,
    reply,
    warnings_text,
)
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg
from torch import nn

from otfusion.fusion import FusionConfig, fuse_result
from otfusion.strategies import OTFusion
from otfusion.strategies.replies import reply_digest
from otfusion.zoo import build_model


def assert_same_state(arrays: ArrayRecord, expected: dict[str, torch.Tensor]) -> None:
    got = arrays.to_torch_state_dict()
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        torch.testing.assert_close(got[name], tensor, msg=name)


def test_the_global_model_is_traced_once_for_every_round(monkeypatch):
    import otfusion.fusion.engine as engine

    traced = []
    original = engine.build_alignment_graph
    monkeypatch.setattr(engine, "build_alignment_graph",
                        lambda *args: traced.append(1) or original(*args))
    strategy = OTFusion(global_model)
    states = client_states()
    for server_round in (1, 2, 3):
        arrays, _ = strategy.aggregate_train(server_round, [
            reply(i, s, 10 * i) for i, s in enumerate(states, start=1)])
        assert arrays is not None
    assert len(traced) == 1
    order = fusion_order(states, [10, 20, 30])
    expected = direct_fusion([states[k] for k in order], [10 * (k + 1) for k in order])
    assert_same_state(arrays, expected.model.state_dict())


def test_good_replies_fuse_like_the_engine():
    states = client_states()
    weights = [10, 20, 30]
    node_ids = [7, 3, 5]
    replies = [reply(i, s, n, loss=float(i)) for i, s, n in zip(node_ids, states, weights,
                                                                strict=True)]
    fused_rounds = []
    strategy = OTFusion(global_model, on_fused=lambda rnd, updates: fused_rounds.append(
        (rnd, updates)))
    arrays, metrics = strategy.aggregate_train(1, replies)

    order = fusion_order(states, weights)
    expected = direct_fusion([states[k] for k in order], [weights[k] for k in order])
    assert_same_state(arrays, expected.model.state_dict())
    assert list(arrays.keys()) == list(global_model().state_dict())

    assert metrics["accepted-replies"] == 3 and metrics["rejected-replies"] == 0
    assert isinstance(metrics["fusion-seconds"], float) and metrics["fusion-seconds"] >= 0
    assert "num-examples" not in metrics
    assert metrics["loss"] == pytest.approx((7 * 10 + 3 * 20 + 5 * 30) / 60)
    costs = {k: v for k, v in metrics.items() if k.startswith("transport-cost/")}
    assert costs == pytest.approx({f"transport-cost/{label}": cost
                                   for label, cost in expected.group_costs.items()})
    assert costs and all(v > 0 for v in costs.values())
    [(server_round, updates)] = fused_rounds
    assert server_round == 1
    assert [u.weight for u in updates] == [float(weights[k]) for k in order]
    for update, k in zip(updates, order, strict=True):
        assert torch.equal(update.model.state_dict()["head.weight"], states[k]["head.weight"])


def test_replies_load_into_copies_of_one_model_built_once():
    """model_fn runs as often for six replies as for three (a round does not build and
    randomly initialise a model per reply); every reply gets a model of its own."""
    calls = []
    strategy = OTFusion(lambda: calls.append(1) or global_model(),
                        on_fused=lambda rnd, updates: calls.append(updates))
    counts = []
    for count in (3, 6):
        del calls[:]
        strategy.aggregate_train(1, [reply(i, s, 10) for i, s in
                                     enumerate(client_states(count), start=1)])
        counts.append(sum(1 for c in calls if c == 1))
        models = [u.model for u in calls[-1]]
        tensors = [t for m in (*models, strategy.settings.blank) for t in m.state_dict().values()]
        assert len({t.data_ptr() for t in tensors}) == len(tensors)  # nothing shared
    assert counts[0] == counts[1]


class _CountingModel(nn.Module):
    """Counts its calls in a buffer outside the state_dict, which tracing the model
    leaves holding an fx Proxy."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.register_buffer("calls", torch.zeros(()), persistent=False)

    def forward(self, x):
        self.calls += 1
        return self.fc(x) + self.calls


class _HookedModel(nn.Module):
    """A forward hook whose closure reads the model's own parameter."""

    def __init__(self):
        super().__init__()
        self.fc, self.gate = nn.Linear(6, 3), nn.Parameter(torch.zeros(3))
        self.fc.register_forward_hook(lambda module, args, out: out + self.gate)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("factory", [_CountingModel, _HookedModel])
def test_a_loaded_reply_computes_what_its_state_does(factory):
    """Not what a traced model (the counter) or the copied original (the hook's closure)
    does: a reply loaded for fusion is the model the client sent."""
    from otfusion.strategies.updates import decode_update

    settings = OTFusion(factory, inputs=torch.randn(4, 6)).settings
    torch.manual_seed(3)
    sent = factory()
    with torch.no_grad():
        for tensor in sent.state_dict().values():
            tensor.copy_(torch.randn_like(tensor))
    update = decode_update(sent.state_dict(), 1.0, {}, None, "node 1", settings)
    x = torch.randn(5, 6)
    torch.testing.assert_close(update.model(x), sent(x))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_result_is_bit_identical_whatever_the_order_and_node_ids(seed):
    states = client_states(4)
    weights = [10, 10, 10, 20]  # ties: the first of the largest is the reference
    first, _ = OTFusion(global_model).aggregate_train(
        1, [reply(k + 1, s, w) for k, (s, w) in enumerate(zip(states, weights, strict=True))])
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(4, generator=generator).tolist()
    node_ids = torch.randperm(1000, generator=generator)[:4].tolist()
    again, _ = OTFusion(global_model).aggregate_train(
        1, [reply(node_ids[k], states[k], weights[k]) for k in order])
    a, b = first.to_torch_state_dict(), again.to_torch_state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_reply_digest_tells_replies_apart():
    state = client_states(1)[0]
    changed = {**state, "head.bias": state["head.bias"].clone()}
    changed["head.bias"][0] += 1e-6
    assert reply_digest(state, 10) == reply_digest(OrderedDict(state), 10.0)
    assert len({reply_digest(state, 10), reply_digest(state, 11),
                reply_digest(changed, 10)}) == 3


def test_arrays_are_aligned_by_name_not_order():
    states = client_states()
    shuffled = OrderedDict(reversed(list(states[1].items())))
    strategy = OTFusion(global_model)
    plain, _ = strategy.aggregate_train(1, [reply(1, states[0], 5), reply(2, states[1], 7)])
    mixed, _ = strategy.aggregate_train(1, [reply(1, states[0], 5), reply(2, shuffled, 7)])
    assert list(mixed.keys()) == list(global_model().state_dict())
    assert_same_state(mixed, plain.to_torch_state_dict())


def _corrupt(kind: str, state: OrderedDict):
    """A bad ArrayRecord (or content) derived from a good state_dict."""
    state = OrderedDict((k, v.clone()) for k, v in state.items())
    if kind == "nan":
        state["layers.0.weight"][0, 0] = float("nan")
    elif kind == "inf":
        state["head.bias"][1] = float("-inf")
    elif kind == "shape":
        state["layers.2.weight"] = torch.zeros(8, 15)
    elif kind == "rank":
        state["layers.2.bias"] = torch.zeros(8, 1)
    elif kind == "missing":
        del state["head.bias"]
    elif kind == "extra":
        state["extra.weight"] = torch.zeros(3)
    elif kind == "dtype":
        state["layers.0.weight"] = state["layers.0.weight"].to(torch.int32)
    elif kind == "magnitude":
        state["layers.2.weight"][0, 0] = 1e6
    elif kind == "undecodable":
        record = ArrayRecord(state)
        record["head.weight"] = Array(dtype="float32", shape=(10, 8), stype="numpy.ndarray",
                                      data=b"not an npy file")
        return record
    elif kind == "stype":
        record = ArrayRecord(state)
        record["head.weight"] = Array(dtype="float32", shape=(10, 8), stype="torch.Tensor",
                                      data=b"\0" * 320)
        return record
    return ArrayRecord(state)


BAD_ARRAYS = {
    "nan": "NaN or Inf",
    "inf": "NaN or Inf",
    "shape": "shape (8, 15), expected (8, 16)",
    "rank": "shape (8, 1), expected (8,)",
    "missing": "missing keys ['head.bias']",
    "extra": "unexpected keys ['extra.weight']",
    "dtype": "has dtype int32",
    "magnitude": "max_abs_weight",
    "undecodable": "cannot be decoded",
    "stype": "cannot be decoded",
}


def _bad_reply(kind: str, state) -> Message:
    node = 99
    if kind in BAD_ARRAYS:
        return reply(node, _corrupt(kind, state), 10)
    if kind == "error":
        return error_reply(node)
    if kind.startswith("weight="):
        value = {"zero": 0, "negative": -5, "nan": float("nan"), "inf": float("inf"),
                 "list": [1, 2]}[kind.split("=")[1]]
        return reply(node, state, value)
    metrics = MetricRecord({"num-examples": 10})
    if kind == "no-weight":
        metrics = MetricRecord({"examples": 10})
        content = RecordDict({"arrays": ArrayRecord(state), "metrics": metrics})
    elif kind == "two-arrayrecords":
        content = RecordDict({"a": ArrayRecord(state), "b": ArrayRecord(state), "m": metrics})
    elif kind == "no-metricrecord":
        content = RecordDict({"arrays": ArrayRecord(state)})
    else:
        raise AssertionError(kind)
    return Message(content=content, metadata=metadata(node))


BAD_OTHER = {
    "error": "error reply (0: client crashed)",
    "weight=zero": "'num-examples' is 0",
    "weight=negative": "'num-examples' is -5",
    "weight=nan": "'num-examples' is nan",
    "weight=inf": "'num-examples' is inf",
    "weight=list": "not a number",
    "no-weight": "no 'num-examples' value",
    "two-arrayrecords": "2 ArrayRecords, expected exactly 1",
    "no-metricrecord": "0 MetricRecords, expected exactly 1",
}


@pytest.mark.parametrize("kind", [*BAD_ARRAYS, *BAD_OTHER])
def test_bad_reply_is_rejected_and_logged(kind, flwr_logs):
    states = client_states()
    good = [reply(1, states[0], 10, loss=1.0), reply(2, states[1], 30, loss=2.0)]
    bad = _bad_reply(kind, states[2])
    strategy = OTFusion(global_model)

    arrays, metrics = strategy.aggregate_train(1, [good[0], bad, good[1]])

    expected = direct_fusion(states[:2], [10, 30])
    assert_same_state(arrays, expected.model.state_dict())
    assert metrics["accepted-replies"] == 2 and metrics["rejected-replies"] == 1
    assert metrics["loss"] == pytest.approx(1.75)
    text = warnings_text(flwr_logs)
    assert "node 99" in text
    assert {**BAD_ARRAYS, **BAD_OTHER}[kind] in text
    assert "node 1" not in text and "node 2" not in text


def test_float64_reply_is_accepted_and_cast():
    states = client_states(2)
    as_double = OrderedDict((k, v.double()) for k, v in states[1].items())
    strategy = OTFusion(global_model)
    arrays, metrics = strategy.aggregate_train(1, [reply(1, states[0], 1), reply(2, as_double, 1)])
    assert metrics["accepted-replies"] == 2
    assert all(a.dtype == "float32" for a in arrays.values())
    assert_same_state(arrays, direct_fusion(states, [1, 1]).model.state_dict())


@pytest.mark.parametrize("bad_count", [1, 2])
def test_too_few_valid_replies_keep_the_global_model(bad_count, flwr_logs):
    states = client_states()
    replies = [reply(1, states[0], 10)]
    replies += [reply(50 + k, _corrupt("nan", states[1]), 10) for k in range(bad_count)]
    strategy = OTFusion(global_model, min_train_nodes=2)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None
    assert dict(metrics) == {"accepted-replies": 1, "rejected-replies": bad_count}
    assert "fewer than the 2 needed" in warnings_text(flwr_logs)


def test_no_replies_and_only_errors():
    strategy = OTFusion(global_model, min_train_nodes=1)
    assert strategy.aggregate_train(1, [])[0] is None
    arrays, metrics = strategy.aggregate_train(1, [error_reply(4), error_reply(5)])
    assert arrays is None and metrics["rejected-replies"] == 2


def test_min_train_nodes_one_fuses_a_single_reply():
    state = client_states(1)[0]
    arrays, metrics = OTFusion(global_model, min_train_nodes=1).aggregate_train(
        1, [reply(1, state, 3), error_reply(2)])
    assert metrics["accepted-replies"] == 1
    assert_same_state(arrays, direct_fusion([state], [3]).model.state_dict())


def test_engine_failure_keeps_the_global_model(monkeypatch, flwr_logs):
    def broken(*args, **kwargs):
        raise RuntimeError("solver exploded")

    states = client_states(2)
    replies = [reply(1, states[0]), reply(2, states[1])]
    fused_rounds = []
    strategy = OTFusion(global_model, on_fused=lambda rnd, _: fused_rounds.append(rnd))
    strategy.aggregate_train(1, replies)
    monkeypatch.setattr("otfusion.strategies.rounds.fuse_result", broken)
    arrays, metrics = strategy.aggregate_train(2, replies)
    assert arrays is None
    assert dict(metrics) == {"accepted-replies": 2, "rejected-replies": 0}
    assert "fusion failed (RuntimeError: solver exploded)" in warnings_text(flwr_logs)
    assert fused_rounds == [1]  # no callback for the failed round


def test_non_finite_fusion_output_keeps_the_global_model(monkeypatch, flwr_logs):
    real = fuse_result

    def poisoned(*args, **kwargs):
        result = real(*args, **kwargs)
        with torch.no_grad():
            result.model.head.bias[0] = float("nan")
        return result

    monkeypatch.setattr("otfusion.strategies.rounds.fuse_result", poisoned)
    states = client_states(2)
    arrays, _ = OTFusion(global_model).aggregate_train(1, [reply(1, states[0]),
                                                           reply(2, states[1])])
    assert arrays is None
    assert "'head.bias' contains NaN or Inf" in warnings_text(flwr_logs)


def test_replies_are_not_mutated():
    states = client_states(2)
    replies = [reply(1, states[0], 2), reply(2, states[1], 3)]
    before = [{k: a.data for k, a in r.content["arrays"].items()} for r in replies]
    arrays, _ = OTFusion(global_model).aggregate_train(1, replies)
    after = [{k: a.data for k, a in r.content["arrays"].items()} for r in replies]
    assert before == after
    assert all(arrays[k].data != replies[0].content["arrays"][k].data for k in arrays)


def test_ot_rounds_first_averages_after_round_one():
    states = client_states()
    weights = [1, 2, 3]  # within the default weight cap (twice the median)
    replies = [reply(i + 1, s, w) for i, (s, w) in enumerate(zip(states, weights,
                                                                 strict=True))]
    strategy = OTFusion(global_model, ot_rounds="first")
    assert strategy.settings.round_config(1).method == "wasserstein"
    assert strategy.settings.round_config(2).method == "average"

    first, m1 = strategy.aggregate_train(1, replies)
    assert_same_state(first, direct_fusion(states, weights).model.state_dict())
    assert any(k.startswith("transport-cost/") for k in m1)

    second, m2 = strategy.aggregate_train(2, replies)
    total = sum(weights)
    mean = {k: sum(w * s[k] for w, s in zip(weights, states, strict=True)) / total
            for k in states[0]}
    assert_same_state(second, mean)
    assert not any(k.startswith("transport-cost/") for k in m2)
    assert m2["accepted-replies"] == 3
    assert not np.allclose(first["layers.0.weight"].numpy(), second["layers.0.weight"].numpy())


def test_ot_rounds_all_keeps_ot_in_later_rounds():
    states = client_states(2)
    replies = [reply(1, states[0], 1), reply(2, states[1], 1)]
    strategy = OTFusion(global_model)
    a, _ = strategy.aggregate_train(1, replies)
    b, m = strategy.aggregate_train(5, replies)
    assert_same_state(b, a.to_torch_state_dict())
    assert any(k.startswith("transport-cost/") for k in m)


class TinyBN(nn.Module):
    """Linear + BatchNorm: has an int64 buffer (num_batches_tracked)."""

    def __init__(self, hidden: int = 6):
        super().__init__()
        self.input_shape = (4,)
        self.fc = nn.Linear(4, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.fc(x))))


def bn_state(seed: int, steps: int) -> OrderedDict:
    torch.manual_seed(seed)
    model = TinyBN()
    model.bn.running_mean.normal_()
    model.bn.num_batches_tracked.fill_(steps)
    return model.state_dict()


def test_integer_buffers_keep_their_dtype(flwr_logs):
    states = [bn_state(1, 10), bn_state(2, 10**6)]  # a large counter is not a weight
    as_float = OrderedDict(bn_state(3, 5))
    as_float["bn.num_batches_tracked"] = as_float["bn.num_batches_tracked"].double()
    strategy = OTFusion(TinyBN)
    arrays, metrics = strategy.aggregate_train(
        1, [reply(1, states[0], 4), reply(2, states[1], 4), reply(3, as_float, 4)])
    assert metrics["accepted-replies"] == 2
    assert arrays["bn.num_batches_tracked"].dtype == "int64"
    models = []
    for k in fusion_order(states, [4, 4]):
        m = TinyBN()
        m.load_state_dict(states[k])
        models.append(m)
    expected = fuse_result(models, weights=[4, 4], target=TinyBN())
    assert_same_state(arrays, expected.model.state_dict())
    assert "node 3" in warnings_text(flwr_logs)
    assert "'bn.num_batches_tracked' has dtype float64" in warnings_text(flwr_logs)


def mlp_from_shapes(shapes: dict[str, tuple[int, ...]]) -> nn.Module:
    widths = (shapes["layers.0.weight"][0], shapes["layers.2.weight"][0])
    return build_model("mlp", widths=widths, seed=0)


def test_heterogeneous_widths_fuse_into_the_global_widths(flwr_logs):
    specs = [(20, 10), (12, 6), WIDTHS]
    models = [build_model("mlp", widths=w, seed=20 + k) for k, w in enumerate(specs)]
    strategy = OTFusion(global_model, heterogeneous=True, client_model_fn=mlp_from_shapes)
    bad_rank = OrderedDict(models[0].state_dict())
    bad_rank["layers.0.bias"] = bad_rank["layers.0.bias"][:, None]
    replies = [reply(k + 1, m.state_dict(), 10 * (k + 1)) for k, m in enumerate(models)]
    arrays, metrics = strategy.aggregate_train(1, [*replies, reply(9, bad_rank, 10)])
    assert metrics["accepted-replies"] == 3 and metrics["rejected-replies"] == 1
    expected = fuse_result(models, weights=[10, 20, 30], target=global_model())
    assert_same_state(arrays, expected.model.state_dict())
    assert "node 9" in warnings_text(flwr_logs) and "rank 2" in warnings_text(flwr_logs)


def test_heterogeneous_reply_that_fits_no_model_is_rejected(flwr_logs):
    def picky(shapes):
        if shapes["layers.0.weight"][0] > 16:
            raise ValueError("too wide")
        return mlp_from_shapes(shapes)

    strategy = OTFusion(global_model, heterogeneous=True, client_model_fn=picky,
                        min_train_nodes=1)
    wide = build_model("mlp", widths=(20, 8), seed=1).state_dict()
    arrays, metrics = strategy.aggregate_train(1, [reply(1, client_states(1)[0]),
                                                   reply(2, wide)])
    assert arrays is not None and metrics["rejected-replies"] == 1
    assert "node 2: does not load into the model (ValueError: too wide)" in warnings_text(
        flwr_logs)


def test_other_widths_rejected_without_heterogeneous(flwr_logs):
    wide = build_model("mlp", widths=(20, 8), seed=1).state_dict()
    arrays, _ = OTFusion(global_model).aggregate_train(1, [reply(1, client_states(1)[0]),
                                                           reply(2, wide)])
    assert arrays is None
    assert "'layers.0.weight' has shape (20, 64), expected (16, 64)" in warnings_text(flwr_logs)


def test_custom_weight_key_and_metrics_fn():
    states = client_states(2)

    def count(records, key):
        return MetricRecord({"replies-seen": len(records), "key-len": len(key)})

    strategy = OTFusion(global_model, weighted_by_key="n", train_metrics_aggr_fn=count)
    replies = []
    for i, s in enumerate(states):
        content = RecordDict({"arrays": ArrayRecord(s), "metrics": MetricRecord({"n": i + 1})})
        replies.append(Message(content=content, metadata=metadata(i + 1)))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert_same_state(arrays, direct_fusion(states, [1, 2]).model.state_dict())
    assert metrics["replies-seen"] == 2 and metrics["key-len"] == 1


def test_client_metrics_average_over_reporting_replies():
    states = client_states(3)
    replies = [reply(1, states[0], 1, acc=0.5, steps=10),
               reply(2, states[1], 3, acc=1.0),
               reply(3, states[2], 4, acc=float("nan"), curve=[1.0, 2.0])]
    _, metrics = OTFusion(global_model).aggregate_train(1, replies)
    assert metrics["acc"] == pytest.approx((0.5 * 1 + 1.0 * 3) / 4)
    assert metrics["steps"] == pytest.approx(10.0)
    assert metrics["curve"] == pytest.approx([1.0, 2.0])
    assert all(type(v) in (int, float, list) for v in metrics.values())


def test_transport_cost_labels_are_sanitised():
    from otfusion.strategies.rounds import transport_cost_metrics

    out = transport_cost_metrics({"conv1+layer1.0.conv2": 1, "a b/c": 2.5, "a_b_c": 3})
    assert out == {"transport-cost/conv1_layer1.0.conv2": 1.0, "transport-cost/a_b_c": 2.5,
                   "transport-cost/a_b_c_2": 3.0}
    assert all(type(v) is float for v in out.values())


def test_settings_are_validated():
    with pytest.raises(ValueError, match="ot_rounds"):
        OTFusion(global_model, ot_rounds="last")
    with pytest.raises(ValueError, match="client_model_fn"):
        OTFusion(global_model, heterogeneous=True)
    with pytest.raises(ValueError, match="heterogeneous"):
        OTFusion(global_model, client_model_fn=mlp_from_shapes)
    with pytest.raises(ValueError, match="max_abs_weight"):
        OTFusion(global_model, max_abs_weight=float("inf"))
    with pytest.raises(ValueError, match="inputs"):
        OTFusion(global_model, FusionConfig(cost="activations"))
    with pytest.raises(TypeError, match="nn.Module"):
        OTFusion(lambda: 3)
    strategy = OTFusion(global_model, FusionConfig.from_options(solver="sinkhorn"),
                        fraction_train=0.5, min_train_nodes=3)
    assert isinstance(strategy, FedAvg)
    assert strategy.fraction_train == 0.5 and strategy.min_train_nodes == 3
    assert strategy.settings.fusion.transport.solver == "sinkhorn"


def test_summary_logs_fusion_settings(flwr_logs):
    OTFusion(global_model, FusionConfig.from_options(solver="sinkhorn", reg=0.05), ot_rounds="first"
             ).summary()
    text = "\n".join(r.getMessage() for r in flwr_logs.records)
    assert "Method: wasserstein | solver: sinkhorn" in text
    assert "reg: 0.05" in text and "OT rounds: first" in text and "MLP" in text


def test_start_keeps_previous_arrays_when_a_round_fails(task_identity):
    states = {node: s for node, s in zip([1, 2, 3], client_states(), strict=True)}

    def reply_for(rnd, node):
        if rnd == 1:
            return reply(node, states[node], 10)
        return reply(node, _corrupt("nan", states[node]), 10)

    grid = FakeGrid(reply_for)
    strategy = OTFusion(global_model, min_available_nodes=3, fraction_evaluate=0.0)
    initial = ArrayRecord(global_model().state_dict())
    result = strategy.start(grid, initial, num_rounds=2)

    order = [(1, 2, 3)[k] for k in fusion_order([states[n] for n in (1, 2, 3)], [10] * 3)]
    fused = direct_fusion([states[n] for n in order], [10, 10, 10]).model.state_dict()
    assert_same_state(result.arrays, fused)
    round2_arrays = [arrays for rnd, arrays in grid.sent if rnd == 2]
    assert round2_arrays and all(a is round2_arrays[0] for a in round2_arrays)
    assert_same_state(round2_arrays[0], fused)  # round 2 was sent the round-1 model
    assert dict(result.train_metrics_clientapp[2]) == {"accepted-replies": 0,
                                                       "rejected-replies": 3}


def test_start_returns_initial_arrays_when_no_round_succeeds(task_identity):
    grid = FakeGrid(lambda rnd, node: error_reply(node))
    strategy = OTFusion(global_model, min_available_nodes=3, fraction_evaluate=0.0)
    initial = ArrayRecord(global_model().state_dict())
    snapshot = {k: a.data for k, a in initial.items()}
    result = strategy.start(grid, initial, num_rounds=1, evaluate_config=ConfigRecord())
    assert result.arrays is initial
    assert {k: a.data for k, a in initial.items()} == snapshot


def test_plain_fedavg_start_leaves_empty_arrays_on_failure(task_identity):
    """Documents Flower's own behaviour that OTFusion.start corrects."""

    class NoneFedAvg(FedAvg):
        def aggregate_train(self, server_round, replies):
            return None, None

    grid = FakeGrid(lambda rnd, node: error_reply(node))
    result = NoneFedAvg(min_available_nodes=3, fraction_evaluate=0.0).start(
        grid, ArrayRecord(global_model().state_dict()), num_rounds=1)
    assert len(result.arrays) == 0


def test_numpy_array_record_keys_are_rejected(flwr_logs):
    """``ArrayRecord([ndarrays])`` names arrays "0", "1", ...: never matched by order."""
    states = client_states(2)
    by_order = ArrayRecord([v.numpy() for v in states[1].values()])
    arrays, _ = OTFusion(global_model, min_train_nodes=1).aggregate_train(
        1, [reply(1, states[0]), reply(2, by_order)])
    assert arrays is not None
    assert "node 2: missing keys" in warnings_text(flwr_logs)
    assert np.isfinite(arrays["head.weight"].numpy()).all()


def _causal_model(seed: int) -> nn.Module:
    """A small Transformer whose blocks keep a causal float mask (-inf above the
    diagonal) as a buffer in the state_dict."""
    model = build_attention_model("mha-causal-buffer", seed)
    model.input_shape = (TOKENS, FEATURES)
    return model


def test_a_causal_mask_buffer_passes_the_round_and_a_changed_mask_is_rejected(flwr_logs):
    states = [_causal_model(seed).state_dict() for seed in (1, 2, 3)]
    assert states[0]["blocks.0.mask"].isinf().any()
    unmasked = OrderedDict(states[2])
    unmasked["blocks.0.mask"] = torch.zeros_like(unmasked["blocks.0.mask"])  # sees the future
    strategy = OTFusion(lambda: _causal_model(0))

    arrays, metrics = strategy.aggregate_train(
        1, [reply(1, states[0], 10), reply(99, unmasked, 10), reply(2, states[1], 30)])

    assert metrics["accepted-replies"] == 2 and metrics["rejected-replies"] == 1
    assert "node 99" in warnings_text(flwr_logs)
    assert "'blocks.0.mask' differs from the global model's" in warnings_text(flwr_logs)
    order = fusion_order(states[:2], [10, 30])
    clients = []
    for k in order:
        client = _causal_model(0)
        client.load_state_dict(states[k])
        clients.append(client)
    expected = fuse_result(clients, weights=[[10, 30][k] for k in order],
                           target=_causal_model(0)).model.state_dict()
    assert_same_state(arrays, expected)
    assert torch.equal(arrays.to_torch_state_dict()["blocks.1.mask"], states[0]["blocks.1.mask"])


def test_training_rounds_preload_the_optimiser_while_the_clients_train(monkeypatch,
                                                                      task_identity):
    import otfusion.strategies.otfusion as module

    preloaded = []
    monkeypatch.setattr(module, "preload_optimiser", preloaded.append)
    strategy = OTFusion(global_model, ot_rounds="first", min_available_nodes=3)
    arrays = ArrayRecord(global_model().state_dict())
    for server_round in (1, 2):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(),
                                                 FakeGrid(None)))
        assert len(messages) == 3
    assert [config.method for config in preloaded] == ["wasserstein", "average"]


_PRELOAD = """
import sys
from otfusion.fusion import FusionConfig
from otfusion.strategies.rounds import preload_optimiser
assert "torch._dynamo" not in sys.modules
assert preload_optimiser(FusionConfig.from_options(method="average", robust_screen=False)) is None
assert preload_optimiser(FusionConfig.from_options(distill_steps=0, robust_screen=False)) is None
assert "torch._dynamo" not in sys.modules
preload_optimiser(FusionConfig.from_options(distill_steps=0)).join()  # the class probes
assert "torch._dynamo" in sys.modules
assert preload_optimiser(FusionConfig()) is None  # imported once per process
"""


def test_preload_imports_what_the_first_optimiser_would_only_when_the_fusion_trains():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _PRELOAD], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
