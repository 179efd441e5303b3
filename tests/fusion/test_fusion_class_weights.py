"""Per-class weighting of the fused output layer (``class_weights``), the data-free
neuron options (``neuron_weights``, ``rescale``) and the strategy's ``label-counts``.

Pinned behaviour on small models, never accuracies: a class seen by one client gets that
client's projected head row exactly; class weights equal to the client weights give the
unweighted result bit for bit; permuted copies still fuse back to the model.
"""

from __future__ import annotations

import pytest
import torch
from permutations import SMALL_MODELS, model_and_permuted_copies

from otfusion.fusion import FusionConfig, align, fuse, output_width
from otfusion.strategies.replies import check_label_counts, reply_digest
from otfusion.zoo import build_model

SMALL = {"widths": (16, 12)}


def _clients(count: int = 3) -> list[torch.nn.Module]:
    return [build_model("mlp", seed=k, **SMALL) for k in range(count)]


def test_class_seen_by_one_client_gets_its_projected_head_row():
    models = _clients()
    counts = [[5, 0, 3] + [1] * 7, [0, 0, 4] + [1] * 7, [0, 7, 0] + [1] * 7]
    fused = fuse(models, [1, 2, 3], class_weights=counts)
    aligned = [align(m, fused) for m in models]  # client k in fused hidden coordinates
    # class 0: only client 0; class 1: only client 2
    for cls, k in ((0, 0), (1, 2)):
        torch.testing.assert_close(fused.head.weight[cls], aligned[k].head.weight[cls],
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(fused.head.bias[cls], models[k].head.bias[cls],
                                   rtol=0, atol=0)
    # class 2: clients 0 and 1 in the ratio 3:4
    expected = (3 * aligned[0].head.bias[2] + 4 * aligned[1].head.bias[2]) / 7
    torch.testing.assert_close(fused.head.bias[2], expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("config", [FusionConfig(), FusionConfig(method="average"),
                                    FusionConfig.from_options(neuron_weights="uniform",
                                                              rescale="none")])
def test_class_weights_equal_to_client_weights_change_nothing(config):
    models = _clients()
    weights = [3.0, 5.0, 2.0]
    plain = fuse(models, weights, config).state_dict()
    weighted = fuse(models, weights, config,
                    class_weights=[[w] * 10 for w in weights]).state_dict()
    for name, tensor in plain.items():
        assert torch.equal(tensor, weighted[name]), name


def test_unseen_class_falls_back_to_client_weights():
    models = _clients(2)
    counts = [[0] + [3] * 9, [0] + [1] * 9]
    fused = fuse(models, [1, 3], class_weights=counts)
    plain = fuse(models, [1, 3])
    torch.testing.assert_close(fused.head.bias[0], plain.head.bias[0], rtol=0, atol=0)
    torch.testing.assert_close(fused.head.weight[0], plain.head.weight[0], rtol=0, atol=0)


@pytest.mark.parametrize("name, kwargs", SMALL_MODELS)
def test_permuted_copies_with_class_weights_fuse_back(name, kwargs):
    generator = torch.Generator().manual_seed(1)
    copies = model_and_permuted_copies(name, kwargs, 2, generator)
    model = copies[0]
    counts = [[k + 1 + c for c in range(10)] for k in range(3)]
    fused = fuse(copies, [1, 2, 3], FusionConfig(), class_weights=counts).eval()
    x = torch.randn(8, *model.input_shape, generator=generator)
    with torch.no_grad():
        expected, got = model(x), fused(x)
    assert float((got - expected).norm() / expected.norm()) < 1e-5


def test_rescale_and_neuron_weights_are_identity_on_one_model():
    model = build_model("mlp", seed=0, **SMALL)
    for config in (FusionConfig.from_options(rescale="norm"),
                   FusionConfig.from_options(neuron_weights="outgoing-sq")):
        fused = fuse([model, model], config=config)
        for key, tensor in model.state_dict().items():
            torch.testing.assert_close(fused.state_dict()[key], tensor, rtol=1e-6, atol=1e-7)


def test_class_weights_are_validated():
    models = _clients(2)
    with pytest.raises(ValueError, match="rows"):
        fuse(models, class_weights=[[1] * 10])
    with pytest.raises(ValueError, match="non-negative"):
        fuse(models, class_weights=[[1] * 10, [-1] + [1] * 9])
    with pytest.raises(ValueError, match="output width"):
        fuse(models, class_weights=[[1] * 9, [1] * 9])
    assert output_width(models[0]) == 10


@pytest.mark.parametrize("value, reason", [
    ("abc", "not a list"), ([1, "a"] + [1] * 8, "not a number"), ([1, -1] + [1] * 8,
                                                                     "non-negative"),
    ([1, float("nan")] + [1] * 8, "non-negative"), ([1] * 9, "9 entries"),
    ([0] * 10, "positive"), ([True] * 10, "not a number"),
])
def test_malformed_label_counts_are_rejected(value, reason):
    checked = check_label_counts(value, 10)
    assert isinstance(checked, str) and reason in checked


def test_label_counts_enter_the_digest():
    state = build_model("mlp", seed=0, **SMALL).state_dict()
    assert check_label_counts(None, 10) is None
    assert check_label_counts([1] * 10, 10) == [1.0] * 10
    assert reply_digest(state, 3) != reply_digest(state, 3, [1.0] * 10)


def test_strategy_weights_the_head_by_reply_label_counts(caplog):
    from flower_replies import client_states, direct_fusion, global_model, reply

    from otfusion.fusion import fuse_result
    from otfusion.strategies import OTFusion

    states = client_states()
    weights = [10, 20, 30]
    counts = [[1] * 10, [2, 0, 0, 0, 0, 0, 0, 0, 0, 18], None]
    replies = [reply(5 + k, s, n, **({} if c is None else {"label-counts": c}))
               for k, (s, n, c) in enumerate(zip(states, weights, counts, strict=True))]
    replies.append(reply(9, states[0], 10, **{"label-counts": [1] * 9}))  # malformed
    strategy = OTFusion(global_model)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["accepted-replies"] == 3 and metrics["rejected-replies"] == 1
    assert "label-counts" not in metrics
    assert "9 entries for 10 classes" in caplog.text
    as_float = [None if c is None else [float(v) for v in c] for c in counts]
    order = sorted(range(3), key=lambda k: reply_digest(states[k], weights[k], as_float[k]))
    largest = max(weights)
    per_class = [[weights[k] / largest / 10] * 10 if counts[k] is None else
                 [weights[k] / largest * v / sum(counts[k]) for v in counts[k]]
                 for k in order]
    from flower_replies import load
    expected = fuse_result([load(states[k]) for k in order],
                           [weights[k] / largest for k in order], target=global_model(),
                           class_weights=per_class).model.state_dict()
    got = arrays.to_torch_state_dict()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    unweighted = direct_fusion([states[k] for k in order], [weights[k] for k in order])
    assert not torch.equal(got["head.bias"], unweighted.model.state_dict()["head.bias"])


@pytest.mark.parametrize("neuron_weights", ["uniform", "outgoing", "outgoing-sq"])
@pytest.mark.parametrize("rescale", ["none", "norm"])
def test_neuron_weights_and_rescale_equal_a_direct_computation(neuron_weights, rescale):
    """One hidden layer, two clients whose matching is known: B is a permuted, slightly
    perturbed copy of A, so exact OT pairs A's unit a with B's unit perm[a]. Expected,
    written out: unit a's incoming row [W | b] is sum_k w_k(a) row_k, where w_k(a) is
    lambda_k times 1, |out|, or |out|^2 of the matched unit's outgoing column,
    normalised over k; with rescale="norm" it is then scaled to sum_k w_k(a) |row_k|.
    The head is the lambda-weighted average of the clients' columns, matched."""
    a = build_model("mlp", in_features=5, num_classes=3, widths=(6,), seed=0)
    generator = torch.Generator().manual_seed(1)
    perm = torch.randperm(6, generator=generator)
    b = build_model("mlp", in_features=5, num_classes=3, widths=(6,), seed=0)
    with torch.no_grad():
        for module, source in ((b.layers[0], a.layers[0]), (b.head, a.head)):
            module.load_state_dict(source.state_dict())
        b.layers[0].weight[perm] = a.layers[0].weight.clone()
        b.layers[0].bias[perm] = a.layers[0].bias.clone()
        b.head.weight[:, perm] = a.head.weight.clone()
        for p in b.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    lam = torch.tensor([0.75, 0.25], dtype=torch.float64)  # A is the reference
    config = FusionConfig.from_options(neuron_weights=neuron_weights, rescale=rescale)
    fused = fuse([a, b], weights=[3.0, 1.0], target=build_model(
        "mlp", in_features=5, num_classes=3, widths=(6,)), config=config).state_dict()

    def rows(model, order):
        layer = model.layers[0]
        return torch.cat([layer.weight, layer.bias[:, None]], 1).double()[order]

    incoming = [rows(a, torch.arange(6)), rows(b, perm)]
    outgoing = [a.head.weight.double(), b.head.weight.double()[:, perm]]
    power = {"uniform": 0, "outgoing": 1, "outgoing-sq": 2}[neuron_weights]
    mix = torch.stack([lam[k] * outgoing[k].norm(dim=0) ** power for k in range(2)])
    mix = mix / mix.sum(0)
    row = mix[0][:, None] * incoming[0] + mix[1][:, None] * incoming[1]
    if rescale == "norm":
        target = mix[0] * incoming[0].norm(dim=1) + mix[1] * incoming[1].norm(dim=1)
        row = row * (target / row.norm(dim=1))[:, None]
    head = lam[0] * outgoing[0] + lam[1] * outgoing[1]
    head_bias = lam[0] * a.head.bias.double() + lam[1] * b.head.bias.double()
    for key, expected in {"layers.0.weight": row[:, :-1], "layers.0.bias": row[:, -1],
                          "head.weight": head, "head.bias": head_bias}.items():
        torch.testing.assert_close(fused[key].double(), expected, rtol=0, atol=1e-6, msg=key)
