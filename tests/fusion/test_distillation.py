"""Post-fusion distillation from the clients' input moments.

Pinned behaviour on small models, never accuracies: pooled moments equal the moments of
the union of the clients' inputs; the synthetic inputs follow the moments; distillation
moves the fused model towards the ensemble, deterministically, without touching
BatchNorm statistics; permuted copies of one model still fuse back to it; the strategy
validates, pools and uses the moments of the replies.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from permutations import SMALL_MODELS, model_and_permuted_copies
from torch import nn

from otfusion.fusion import (
    FusionConfig,
    InputMoments,
    fuse_result,
    input_moments,
    pool_moments,
)
from otfusion.fusion.distillation import distill, ensemble_probabilities, teacher_sample
from otfusion.fusion.moments import synthetic_inputs
from otfusion.strategies.replies import (
    check_class_moments,
    check_input_components,
    check_input_moments,
    reply_digest,
)
from otfusion.task.data import label_counts
from otfusion.zoo import build_model

SMALL = {"widths": (16, 12)}
FAST = FusionConfig.from_options(distill_steps=40, distill_samples=256,
                                 distill_batch_size=64, distill_lr=1e-2)
DISTIL = FAST.distillation


def _inputs(count: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 64, generator=generator) * (1 + seed) + shift


def _kl(student: nn.Module, teachers, weights, x) -> float:
    target = ensemble_probabilities(teachers, weights, x)
    with torch.no_grad():
        return float(F.kl_div(F.log_softmax(student(x), dim=1), target,
                              reduction="batchmean"))


def test_input_moments_are_the_batch_mean_and_population_variance():
    x = _inputs(50, 0).reshape(50, 1, 8, 8)
    moments = input_moments(x)
    assert moments.mean.shape == (1, 8, 8)
    torch.testing.assert_close(moments.mean, x.mean(dim=0))
    torch.testing.assert_close(moments.var, x.var(dim=0, unbiased=False))
    with pytest.raises(ValueError, match="non-empty batch"):
        input_moments(torch.zeros(0, 4))


@pytest.mark.parametrize("outlier_factor", [None, 10.0])
def test_pooled_moments_equal_the_moments_of_the_union(outlier_factor):
    """Exact pooling; the default factor (3) would shrink the client shifted by three
    standard deviations in every feature, as it shrinks a poisoned client."""
    parts = [_inputs(30, 0), _inputs(70, 1, shift=2.0), _inputs(5, 2, shift=-1.0)]
    moments = [input_moments(p) for p in parts]
    pooled = pool_moments(moments, [len(p) for p in parts], outlier_factor)
    union = input_moments(torch.cat(parts))
    torch.testing.assert_close(pooled.mean, union.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled.var, union.var, rtol=1e-5, atol=1e-5)
    unweighted = pool_moments(moments, [1, 1, 1], outlier_factor)
    assert not torch.allclose(unweighted.mean, union.mean, atol=1e-2)


def test_a_client_with_extreme_moments_is_shrunk_to_the_others_spread():
    honest = [input_moments(_inputs(40, 0)) for _ in range(4)]
    mean = honest[0].mean.clone()
    mean[3] = 1e6
    hostile = InputMoments(mean, honest[0].var)
    weights = [100, 100, 100, 100, 4]
    exact = pool_moments([*honest, hostile], weights, outlier_factor=None)
    guarded = pool_moments([*honest, hostile], weights)
    assert float(exact.var.max()) > 1e8
    spread = float((honest[0].var.mean()).sqrt())  # the honest clients' spread
    # the hostile client (weight 1%) is brought to at most 3 times that spread, root
    # mean square over the 64 features: at most 8 x 3 x spread on its one feature
    assert float(guarded.var.max()) < 0.01 * (8 * 3 * spread) ** 2 + float(honest[0].var.max())
    torch.testing.assert_close(guarded.mean[:3], honest[0].mean[:3], rtol=0, atol=0.05)


def test_weighted_median():
    from otfusion.fusion.robust import weighted_median as _weighted_median

    values = torch.tensor([[3.0, -1.0], [1.0, 5.0], [2.0, 0.0]])
    torch.testing.assert_close(_weighted_median(values, torch.tensor([1.0, 1.0, 1.0])),
                               torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(_weighted_median(values, torch.tensor([1.0, 5.0, 1.0])),
                               torch.tensor([1.0, 5.0]))


def test_pool_moments_rejects_mismatched_input():
    a = InputMoments(torch.zeros(4), torch.ones(4))
    with pytest.raises(ValueError, match="one weight per set"):
        pool_moments([a, a], [1.0])
    with pytest.raises(ValueError, match="different shapes"):
        pool_moments([a, InputMoments(torch.zeros(5), torch.ones(5))], [1, 1])


def test_synthetic_inputs_follow_the_moments_and_the_seed():
    moments = InputMoments(torch.tensor([0.0, 3.0, -2.0]), torch.tensor([1.0, 0.25, 4.0]))
    x = synthetic_inputs(moments, 20000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(x.mean(dim=0), moments.mean, rtol=0, atol=0.05)
    torch.testing.assert_close(x.var(dim=0), moments.var, rtol=0.05, atol=0)
    again = synthetic_inputs(moments, 20000, torch.Generator().manual_seed(0))
    assert torch.equal(x, again)


def test_ensemble_probabilities_are_the_weighted_mean_softmax():
    models = [build_model("mlp", seed=k, **SMALL) for k in range(2)]
    models[0].train()
    models[1].eval()
    x = _inputs(9, 0)
    got = ensemble_probabilities(models, [1.0, 3.0], x)
    with torch.no_grad():
        expected = 0.25 * F.softmax(models[0].eval()(x), 1) + 0.75 * F.softmax(models[1](x), 1)
    torch.testing.assert_close(got, expected)
    models[0].train()
    ensemble_probabilities(models, [1.0, 3.0], x)
    assert models[0].training and not models[1].training  # modes restored


def test_the_class_weighted_teacher_ignores_a_client_on_the_classes_it_never_saw():
    """Per class c, the clients' probabilities of c averaged with their shares of c's
    examples, then normalised per input: written out by hand here for 3 classes."""
    models = [build_model("mlp", seed=k, in_features=64, widths=(8,), num_classes=3)
              for k in range(2)]
    x = _inputs(7, 1)
    counts = [[10, 0, 30], [30, 20, 0]]  # client 0 never saw class 1, client 1 class 2
    got = ensemble_probabilities(models, [40.0, 50.0], x, class_weights=counts)
    with torch.no_grad():
        p0, p1 = (F.softmax(m.eval()(x), 1) for m in models)
    expected = torch.stack([0.25 * p0[:, 0] + 0.75 * p1[:, 0], p1[:, 1], p0[:, 2]], dim=1)
    torch.testing.assert_close(got, expected / expected.sum(1, keepdim=True))
    # a class nobody saw (2) falls back to the client weights; 0 and 1 are client 1's
    mute = ensemble_probabilities(models, [40.0, 50.0], x,
                                  class_weights=[[0, 0, 0], [30, 20, 0]])
    expected = torch.stack([p1[:, 0], p1[:, 1], (4 * p0[:, 2] + 5 * p1[:, 2]) / 9], dim=1)
    torch.testing.assert_close(mute, expected / expected.sum(1, keepdim=True))


def test_the_mixed_teacher_is_half_the_class_weighted_and_half_the_mean_ensemble():
    models = [build_model("mlp", seed=k, in_features=64, widths=(8,), num_classes=3)
              for k in range(2)]
    x = _inputs(7, 1)
    counts = [[10, 0, 30], [30, 20, 0]]
    by_class = ensemble_probabilities(models, [40.0, 50.0], x, class_weights=counts)
    plain = ensemble_probabilities(models, [40.0, 50.0], x)
    mixed = ensemble_probabilities(models, [40.0, 50.0], x, class_weights=counts,
                                   class_share=0.5)
    torch.testing.assert_close(mixed, 0.5 * by_class + 0.5 * plain)
    torch.testing.assert_close(mixed.sum(dim=1), torch.ones(7))
    student, twin = (build_model("mlp", seed=9, **SMALL) for _ in range(2))
    moments = InputMoments(torch.full((64,), 0.5), torch.full((64,), 0.1))
    teachers = [build_model("mlp", seed=k, **SMALL) for k in range(2)]
    ten = [[5] * 5 + [0] * 5, [0] * 5 + [5] * 5]
    distill(student, teachers, [1.0, 1.0], moments, DISTIL.model_copy(
        update={"teacher": "mixed"}), ten)
    distill(twin, teachers, [1.0, 1.0], moments, DISTIL.model_copy(
        update={"teacher": "class-weighted"}), ten)
    assert any(not torch.equal(t, twin.state_dict()[k]) for k, t in student.state_dict().items())


def test_class_weights_proportional_to_the_client_weights_give_the_plain_mean():
    models = [build_model("mlp", seed=k, **SMALL) for k in range(3)]
    x = _inputs(5, 2)
    weights = [1.0, 2.0, 5.0]
    plain = ensemble_probabilities(models, weights, x)
    same_shares = ensemble_probabilities(models, weights, x,
                                         class_weights=[[w * 7] * 10 for w in weights])
    torch.testing.assert_close(same_shares, plain)


@pytest.mark.parametrize("teacher", ["mixed", "class-weighted"])
def test_a_teacher_by_class_is_the_mean_without_counts(teacher):
    assert FusionConfig().distillation.teacher == "gated"  # the default
    teachers = [build_model("mlp", seed=k, **SMALL) for k in range(2)]
    moments = InputMoments(torch.full((64,), 0.5), torch.full((64,), 0.1))
    counts = [[5] * 5 + [0] * 5, [0] * 5 + [5] * 5]
    class_config = DISTIL.model_copy(update={"teacher": teacher})
    mean_config = DISTIL.model_copy(update={"teacher": "mean"})
    finals = {}
    for name, config, class_weights in (("mean", mean_config, counts),
                                        ("class, no counts", class_config, None),
                                        ("class", class_config, counts)):
        student = build_model("mlp", seed=9, **SMALL)
        distill(student, teachers, [1.0, 1.0], moments, config, class_weights)
        finals[name] = student.state_dict()
    for key, tensor in finals["mean"].items():
        assert torch.equal(tensor, finals["class, no counts"][key]), key
    assert any(not torch.equal(t, finals["class"][k]) for k, t in finals["mean"].items())


def test_distillation_moves_the_student_to_the_ensemble_deterministically():
    teachers = [build_model("mlp", seed=k, **SMALL) for k in range(3)]
    weights = [1.0, 2.0, 3.0]
    moments = InputMoments(torch.full((64,), 0.5), torch.full((64,), 0.1))
    student = build_model("mlp", seed=7, **SMALL)
    x = synthetic_inputs(moments, 500, torch.Generator().manual_seed(123))
    before = _kl(student, teachers, weights, x)
    twin = copy.deepcopy(student)
    loss = distill(student, teachers, weights, moments, DISTIL)
    after = _kl(student, teachers, weights, x)
    assert after < 0.2 * before
    assert 0 <= loss < before
    distill(twin, teachers, weights, moments, DISTIL)
    for name, tensor in student.state_dict().items():
        assert torch.equal(tensor, twin.state_dict()[name]), name


def test_teacher_sample_is_all_clients_or_a_fixed_random_subset():
    assert teacher_sample(5, 8, seed=0) == list(range(5))
    assert teacher_sample(5, None, seed=0) == list(range(5))
    chosen = teacher_sample(300, 16, seed=0)
    assert len(set(chosen)) == 16 and chosen == sorted(chosen) and chosen[-1] < 300
    assert teacher_sample(300, 16, seed=0) == chosen != teacher_sample(300, 16, seed=1)


def test_with_more_teachers_than_max_teachers_the_sampled_ones_teach():
    teachers = [build_model("mlp", seed=k, **SMALL) for k in range(6)]
    weights = [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]
    moments = InputMoments(torch.full((64,), 0.5), torch.full((64,), 0.1))
    config = DISTIL.model_copy(update={"max_teachers": 3})
    chosen = teacher_sample(6, 3, config.seed)
    sampled, explicit = (build_model("mlp", seed=7, **SMALL) for _ in range(2))
    distill(sampled, teachers, weights, moments, config)
    distill(explicit, [teachers[k] for k in chosen], [weights[k] for k in chosen], moments,
            DISTIL.model_copy(update={"max_teachers": None}))
    for name, tensor in sampled.state_dict().items():
        assert torch.equal(tensor, explicit.state_dict()[name]), name


def test_distillation_keeps_batchnorm_statistics_and_the_module_modes():
    teachers = [build_model("resnet20", seed=k, width_multiplier=0.25) for k in range(2)]
    student = build_model("resnet20", seed=5, width_multiplier=0.25).eval()
    stats = {n: t.clone() for n, t in student.state_dict().items() if "running" in n}
    weights_before = {n: p.clone() for n, p in student.named_parameters()}
    shape = student.input_shape
    moments = InputMoments(torch.zeros(shape), torch.ones(shape))
    distill(student, teachers, [1, 1], moments, DISTIL.model_copy(update={"steps": 3}))
    assert stats and all(torch.equal(student.state_dict()[n], t) for n, t in stats.items())
    assert any(not torch.equal(p, weights_before[n]) for n, p in student.named_parameters())
    assert not any(m.training for m in student.modules())


def test_distillation_errors_name_the_problem():
    model = build_model("mlp", seed=0, **SMALL)
    with pytest.raises(ValueError, match=r"shape \(63,\), but the model's input_shape is \(64,\)"):
        distill(model, [model], [1], InputMoments(torch.zeros(63), torch.ones(63)), DISTIL)

    class Sequences(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x):
            return self.linear(x).unsqueeze(1)

    odd = Sequences()
    with pytest.raises(ValueError, match=r"class logits \(batch, classes\); got \(256, 1, 3\)"):
        distill(odd, [odd], [1], InputMoments(torch.zeros(4), torch.ones(4)), DISTIL)


def _clients(count: int = 3) -> list[nn.Module]:
    return [build_model("mlp", seed=k, **SMALL) for k in range(count)]


MOMENTS = InputMoments(torch.full((64,), 0.3), torch.full((64,), 0.09))


def test_moments_change_nothing_without_distillation():
    models = _clients()
    config = FusionConfig.from_options(distill_steps=0)
    plain = fuse_result(models, [1, 2, 3], config)
    with_moments = fuse_result(models, [1, 2, 3], config, input_moments=MOMENTS)
    assert with_moments.distill_loss is None
    for name, tensor in plain.model.state_dict().items():
        assert torch.equal(tensor, with_moments.model.state_dict()[name]), name


def test_fusion_with_moments_is_the_ot_fusion_then_distilled():
    models = _clients()
    weights = [1.0, 2.0, 3.0]
    result = fuse_result(models, weights, FAST, input_moments=MOMENTS)
    expected = fuse_result(models, weights, FAST.replace(distill_steps=0)).model
    loss = distill(expected, models, [w / 6 for w in weights], MOMENTS, DISTIL)
    assert result.distill_loss == pytest.approx(loss, rel=1e-6)
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(result.model.state_dict()[name], tensor, rtol=1e-5,
                                   atol=1e-6, msg=name)


@pytest.mark.parametrize("per_client", [False, True], ids=["pooled", "gated"])
@pytest.mark.parametrize("name, kwargs", SMALL_MODELS)
def test_permuted_copies_fuse_and_distill_back_to_the_model(name, kwargs, per_client):
    """Also with each copy's own (different) moments: the gated teacher of copies of one
    function is that function, whatever the gates."""
    generator = torch.Generator().manual_seed(1)
    copies = model_and_permuted_copies(name, kwargs, 2, generator)
    model = copies[0]
    shape = model.input_shape
    moments = InputMoments(torch.full(shape, 0.5), torch.full(shape, 0.1))
    if per_client:
        moments = [InputMoments(moments.mean + k, moments.var * (k + 1)) for k in range(3)]
    result = fuse_result(copies, [1, 2, 3], FAST, input_moments=moments)
    assert result.distill_loss is not None and result.distill_loss < FAST.distillation.tol
    undistilled = fuse_result(copies, [1, 2, 3], FAST.replace(distill_steps=0))
    for name, tensor in undistilled.model.state_dict().items():
        assert torch.equal(result.model.state_dict()[name], tensor), name
    x = torch.randn(8, *shape, generator=generator)
    with torch.no_grad():
        expected, got = model(x), result.model.eval()(x)
    assert float((got - expected).norm() / expected.norm()) < 1e-5


@pytest.mark.parametrize("mean, var, reason", [
    ([0.0] * 64, None, "must be sent together"),
    ([0.0] * 63, [1.0] * 63, "63 entries for the model's 64 input features"),
    ([0.0] * 64, [1.0] * 63 + [-1.0], "not a finite non-negative number"),
    ([float("nan")] * 64, [1.0] * 64, "not a finite number"),
    ("zeros", [1.0] * 64, "not a list"),
    ([2e6] + [0.0] * 63, [1.0] * 64, "'input-mean' holds |value| 2e+06 > 1e+06"),
    ([0.0] * 64, [1e13] * 64, "'input-var' holds |value| 1e+13 > 1e+12"),
])
def test_malformed_input_moments_are_rejected(mean, var, reason):
    checked = check_input_moments(mean, var, (64,))
    assert isinstance(checked, str) and reason in checked


def test_input_moments_are_parsed_into_the_input_shape_and_enter_the_digest():
    assert check_input_moments(None, None, (64,)) is None
    assert check_input_moments([0.0] * 64, [1.0] * 64, None) is None  # shape unknown
    moments = check_input_moments([-1.0] * 64, list(range(64)), (1, 8, 8))
    assert moments.mean.shape == (1, 8, 8) and float(moments.var[0, 7, 7]) == 63.0
    state = build_model("mlp", seed=0, **SMALL).state_dict()
    other = InputMoments(moments.mean, moments.var + 1)
    assert len({reply_digest(state, 3), reply_digest(state, 3, None, moments),
                reply_digest(state, 3, None, other)}) == 3


def test_strategy_distils_with_the_pooled_moments_of_the_replies(caplog):
    from flower_replies import client_states, fusion_order, global_model, load, reply

    from otfusion.strategies import OTFusion

    states = client_states()
    weights = [10, 20, 30]
    parts = [_inputs(10 * (k + 1), k) for k in range(3)]
    moments = [input_moments(p) for p in parts]
    sent = [{"input-mean": m.mean.tolist(), "input-var": m.var.tolist()} for m in moments]
    sent[2] = {}  # a client that keeps its moments
    replies = [reply(5 + k, s, n, **extra)
               for k, (s, n, extra) in enumerate(zip(states, weights, sent, strict=True))]
    replies.append(reply(9, states[0], 10, **{"input-mean": [0.0] * 64}))  # malformed
    strategy = OTFusion(global_model, FAST)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["accepted-replies"] == 3 and metrics["rejected-replies"] == 1
    assert "'input-mean' and 'input-var' must be sent together" in caplog.text
    assert "input-mean" not in metrics and metrics["distill-kl"] >= 0
    as_sent = [moments[0], moments[1], None]
    order = fusion_order(states, weights, as_sent)
    pooled = pool_moments(moments[:2], weights[:2])
    largest = max(weights)
    expected = fuse_result([load(states[k]) for k in order],
                           [weights[k] / largest for k in order], FAST,
                           target=global_model(), input_moments=pooled).model.state_dict()
    got = arrays.to_torch_state_dict()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("with_moments, config", [(False, FAST),
                                                  (True, FAST.replace(method="average"))])
def test_strategy_distils_only_in_ot_rounds_with_moments(with_moments, config):
    from flower_replies import client_states, global_model, reply

    from otfusion.strategies import OTFusion

    sent = ({"input-mean": MOMENTS.mean.tolist(), "input-var": MOMENTS.var.tolist()}
            if with_moments else {})
    replies = [reply(5 + k, s, 10, **sent) for k, s in enumerate(client_states())]
    _, metrics = OTFusion(global_model, config).aggregate_train(1, replies)
    assert metrics["accepted-replies"] == 3 and "distill-kl" not in metrics


def test_average_is_never_distilled():
    """``average`` is FedAvg: the one rule (``FusionConfig.distils``) keeps it
    undistilled in the engine, the CLI and the strategies alike."""
    models = _clients()
    config = FAST.replace(method="average")
    assert not config.distils and FAST.distils
    result = fuse_result(models, [1, 2, 3], config, input_moments=MOMENTS)
    plain = fuse_result(models, [1, 2, 3], config).model
    assert result.distill_loss is None
    for name, tensor in plain.state_dict().items():
        assert torch.equal(result.model.state_dict()[name], tensor), name


def test_failed_distillation_keeps_the_fusion_with_a_warning():
    """A model whose output is not class logits cannot be distilled: the fusion is
    returned undistilled, as the server and the CLI both need."""
    models = _clients()
    wrong = InputMoments(torch.zeros(5), torch.ones(5))  # not the models' input shape
    with pytest.warns(UserWarning, match="distillation failed"):
        result = fuse_result(models, [1, 2, 3], FAST, input_moments=wrong)
    plain = fuse_result(models, [1, 2, 3], FAST).model
    assert result.distill_loss is None
    for name, tensor in plain.state_dict().items():
        assert torch.equal(result.model.state_dict()[name], tensor), name


@pytest.mark.parametrize("send", [True, False])
def test_client_app_sends_the_moments_of_its_training_inputs(send, monkeypatch):
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from otfusion.client.app import client_data, train_handler
    from otfusion.task.config import RunConfig

    for name in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    config = RunConfig(model="cnn", model_kwargs='{"channels": [4, 8], "hidden": 12}',
                       local_epochs=1, send_input_moments=send, send_class_moments=True)
    node = {"partition-id": 1, "num-partitions": 4}
    instruction = Message(content=RecordDict({
        "arrays": ArrayRecord(config.build_model().state_dict()),
        "config": ConfigRecord({"server-round": 1})}), dst_node_id=7, message_type="train")
    context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(),
                      run_config=config.as_run_config())
    metrics = train_handler(config, instruction, context).content["metrics"]
    if not send:
        assert not any(key.startswith("input-") for key in metrics)
        return
    data = client_data(config, node, "train")
    parsed = check_input_components(check_class_moments(
        check_input_moments(metrics["input-mean"], metrics["input-var"], (1, 8, 8)),
        metrics["input-class-mean"], metrics["input-class-var"], metrics["input-class-count"],
        10), metrics["input-components"])
    expected = input_moments(data.x.reshape(-1, 1, 8, 8), data.y, 10,
                             components=config.send_input_components)
    assert parsed.components.shape == (16, 1, 8, 8)
    for got, want in zip(parsed, expected, strict=True):
        torch.testing.assert_close(got, want)
    assert parsed.class_count.tolist() == [float(c) for c in label_counts(data, 10)]
    plain = train_handler(RunConfig(**{**dict(config), "send_class_moments": False}),
                          instruction, context).content["metrics"]
    assert "input-mean" in plain and "input-class-mean" not in plain
    alone = train_handler(RunConfig(**{**dict(config), "send_input_components": 0}),
                          instruction, context).content["metrics"]
    assert "input-mean" in alone and "input-components" not in alone


def test_float64_target_is_distilled_from_float32_clients():
    models = _clients(2)
    target = build_model("mlp", seed=9, **SMALL).double()
    result = fuse_result(models, [1, 1], FAST, target=target, input_moments=MOMENTS)
    assert result.distill_loss is not None
    assert all(t.dtype == torch.float64 for t in result.model.state_dict().values())


def test_diverging_distillation_returns_nan():
    student = build_model("mlp", seed=0, **SMALL)
    broken = build_model("mlp", seed=1, **SMALL)
    with torch.no_grad():
        broken.head.bias[0] = float("inf")
    loss = distill(student, [broken], [1.0], MOMENTS, DISTIL)
    assert loss != loss  # NaN


def test_diverging_distillation_leaves_the_fusion_undistilled(monkeypatch):
    import otfusion.fusion.engine as engine

    real = engine.distill

    def diverging(student, *args):
        real(student, *args)
        with torch.no_grad():
            for parameter in student.parameters():
                parameter.fill_(float("nan"))
        return float("nan")

    models = _clients()
    plain = fuse_result(models, [1, 2, 3], FAST.replace(distill_steps=0)).model
    monkeypatch.setattr(engine, "distill", diverging)
    with pytest.warns(UserWarning, match="distillation diverged"):
        result = fuse_result(models, [1, 2, 3], FAST, input_moments=MOMENTS)
    assert result.distill_loss is None
    for name, tensor in plain.state_dict().items():
        assert torch.equal(result.model.state_dict()[name], tensor), name


def _moment_replies(states, weights, moments):
    from flower_replies import reply

    return [reply(5 + k, state, n, **{"input-mean": m.mean.tolist(), "input-var": m.var.tolist()})
            for k, (state, n, m) in enumerate(zip(states, weights, moments, strict=True))]


def test_strategy_result_with_moments_is_bit_identical_whatever_the_order():
    import random

    from flower_replies import client_states, global_model

    from otfusion.strategies import OTFusion

    states = client_states()
    moments = [input_moments(_inputs(10 * (k + 1), k)) for k in range(3)]
    replies = _moment_replies(states, [10, 20, 30], moments)
    results = []
    for seed in range(3):
        random.Random(seed).shuffle(replies)
        arrays, metrics = OTFusion(global_model, FAST).aggregate_train(1, list(replies))
        assert "distill-kl" in metrics
        results.append(arrays.to_torch_state_dict())
    for name, tensor in results[0].items():
        assert all(torch.equal(other[name], tensor) for other in results[1:]), name


@pytest.mark.parametrize("failure", ["raises", "diverges"])
def test_failed_distillation_keeps_the_undistilled_fusion(failure, monkeypatch, caplog):
    from flower_replies import client_states, direct_fusion, fusion_order, global_model

    import otfusion.fusion.engine as engine
    from otfusion.strategies import OTFusion

    def broken(student, *args):
        with torch.no_grad():
            for parameter in student.parameters():
                parameter.fill_(float("nan"))  # whatever it did to the student is dropped
        if failure == "raises":
            raise RuntimeError("boom")
        return float("nan")

    monkeypatch.setattr(engine, "distill", broken)
    states = client_states()
    moments = [input_moments(_inputs(10, k)) for k in range(3)]
    replies = _moment_replies(states, [10, 10, 10], moments)
    arrays, metrics = OTFusion(global_model, FAST).aggregate_train(1, replies)
    assert arrays is not None and "distill-kl" not in metrics
    assert "undistilled" in caplog.text  # the engine's warning, logged by the round
    order = fusion_order(states, [10] * 3, moments)
    expected = direct_fusion([states[k] for k in order], [1.0] * 3, FAST).model.state_dict()
    got = arrays.to_torch_state_dict()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


class _Dropped(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_shape = (6,)
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))

    def forward(self, x):
        return self.body(x)


def test_dropout_masks_come_from_the_distillation_seed():
    torch.manual_seed(0)
    teachers = [_Dropped() for _ in range(2)]
    moments = InputMoments(torch.zeros(6), torch.ones(6))
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(3)
        student = _Dropped()
        torch.manual_seed(global_seed)
        distill(student, teachers, [1, 1], moments, DISTIL)
        results.append(student.state_dict())
        assert torch.initial_seed() == global_seed  # the global generator is left alone
    for name, tensor in results[0].items():
        assert torch.equal(results[1][name], tensor), name


def test_strategy_ignores_moments_for_integer_inputs(caplog):
    from flower_replies import client_states, global_model, reply

    from otfusion.strategies import OTFusion

    strategy = OTFusion(global_model, FAST, inputs=torch.zeros(2, 64, dtype=torch.long))
    assert strategy.settings.input_shape is None
    replies = [reply(5 + k, s, 10, **{"input-mean": [0.0] * 64, "input-var": [1.0] * 64})
               for k, s in enumerate(client_states())]
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["accepted-replies"] == 3 and "distill-kl" not in metrics


def test_per_client_moments_are_pooled_with_the_capped_weights():
    models = _clients()
    moments = [input_moments(_inputs(20, k, shift=0.1 * k)) for k in range(2)] + [None]
    weights = [1.0, 1.0, 100.0]  # the third is capped at twice the median weight (2)
    per_client = fuse_result(models, weights, FAST, input_moments=moments)
    pooled = fuse_result(models, weights, FAST,
                         input_moments=pool_moments(moments[:2], [1.0, 1.0]))
    assert per_client.capped == [2]
    for name, tensor in pooled.model.state_dict().items():
        assert torch.equal(per_client.model.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match="2 entries for 3 models"):
        fuse_result(models, weights, FAST, input_moments=moments[:2])
