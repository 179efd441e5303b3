"""``align`` (a model mapped into a reference's neuron coordinates) and the linear mode
connectivity barriers of ``otfusion.tools.lmc``."""

from __future__ import annotations

import pytest
import torch
from permutations import permute_hidden_units, randomize_batchnorm_stats

from otfusion.fusion import FusionConfig, align
from otfusion.task.data import load_digits_dataset
from otfusion.task.training import evaluate, train
from otfusion.tools.lmc import (
    InterpolationCurve,
    interpolate,
    interpolation_barrier,
    interpolation_curve,
)
from otfusion.zoo import build_model

FUNCTION_TOL = 1e-5  # relative L2 difference of logits (exact OT: permutations only)

ALIGN_CASES = [
    pytest.param("mlp", {"widths": (16, 12)}, id="mlp"),
    pytest.param("cnn", {"channels": (4, 8), "hidden": 12}, id="cnn"),
    pytest.param("resnet20", {"width_multiplier": 0.25}, id="resnet20"),
    pytest.param("lstm", {"hidden_size": 8, "num_layers": 2}, id="lstm"),
]


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


def zoo_model(name: str, kwargs: dict, seed: int) -> torch.nn.Module:
    """An eval-mode zoo model with random BatchNorm statistics (if it has BatchNorms)."""
    model = build_model(name, seed=seed, **kwargs)
    return randomize_batchnorm_stats(model, torch.Generator().manual_seed(seed)).eval()


def logits(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    inputs = torch.randn(16, *model.input_shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(inputs)


def distance(a: torch.nn.Module, b: torch.nn.Module) -> float:
    other = b.state_dict()
    return sum(float((t - other[k]).square().sum())
               for k, t in a.state_dict().items() if t.is_floating_point()) ** 0.5


# ----------------------------------------------------------------------------- align


@pytest.mark.parametrize(("name", "kwargs"), ALIGN_CASES)
def test_align_undoes_a_permutation_exactly(name, kwargs):
    model = zoo_model(name, kwargs, seed=0)
    permuted = permute_hidden_units(model, torch.Generator().manual_seed(1))
    aligned = align(permuted, model)
    state = model.state_dict()
    assert list(aligned.state_dict()) == list(state)
    for key, tensor in aligned.state_dict().items():
        assert torch.equal(tensor, state[key]), key


@pytest.mark.parametrize(("name", "kwargs"), ALIGN_CASES)
@pytest.mark.parametrize("method", ["wasserstein", "gromov-wasserstein"])
def test_align_preserves_the_function(name, kwargs, method):
    reference, model = zoo_model(name, kwargs, seed=0), zoo_model(name, kwargs, seed=1)
    aligned = align(model, reference, FusionConfig(method=method))
    expected = logits(model)
    assert float((logits(aligned) - expected).norm() / expected.norm()) <= FUNCTION_TOL
    assert distance(aligned, reference) < distance(model, reference)  # moved towards it
    assert distance(model, zoo_model(name, kwargs, seed=1)) == 0  # inputs left untouched


def test_align_rejects_averaging():
    model = build_model("mlp", widths=(8,))
    with pytest.raises(ValueError, match="average"):
        align(model, model, FusionConfig(method="average"))


# ----------------------------------------------------------------------------- barriers


def test_barrier_sign_convention():
    curve = InterpolationCurve((0.0, 0.5, 1.0), loss=(1.0, 3.0, 2.0), accuracy=(0.9, 0.5, 0.7))
    assert curve.loss_barrier == pytest.approx(1.5)  # 3 - (1 + 2) / 2
    assert curve.accuracy_barrier == pytest.approx(0.3)  # (0.9 + 0.7) / 2 - 0.5
    convex = InterpolationCurve((0.0, 0.5, 1.0), loss=(1.0, 0.5, 2.0), accuracy=(0.8, 0.95, 0.9))
    assert convex.loss_barrier == 0.0 and convex.accuracy_barrier == 0.0  # the endpoints


def test_interpolate_endpoints_are_exact():
    a, b = build_model("mlp", seed=0, widths=(8,)), build_model("mlp", seed=1, widths=(8,))
    for t, expected in ((0.0, a), (1.0, b)):
        state = interpolate(a, b, t).state_dict()
        assert all(torch.equal(state[k], v) for k, v in expected.state_dict().items())
    mid = interpolate(a, b, 0.5).state_dict()
    assert torch.allclose(mid["head.bias"], (a.head.bias + b.head.bias) / 2)


@pytest.mark.parametrize("batchnorm", ["interpolate", "recompute"])
@pytest.mark.parametrize(("name", "kwargs"), [ALIGN_CASES[0], ALIGN_CASES[2]])
def test_barrier_of_a_model_with_itself_is_zero(digits, name, kwargs, batchnorm):
    model = zoo_model(name, kwargs, seed=0)
    curve = interpolation_curve(model, model, digits[1], steps=5, batchnorm=batchnorm)
    assert curve.t == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert len(set(curve.loss)) == 1 and len(set(curve.accuracy)) == 1
    assert curve.loss_barrier == 0.0 and curve.accuracy_barrier == 0.0


def test_recompute_sets_the_batchnorm_statistics_of_the_data(digits):
    model = zoo_model("resnet20", {"width_multiplier": 0.25}, seed=0)
    recomputed = interpolate(model, model, 0.0, digits[1], batchnorm="recompute")
    x = digits[1].as_input(model.input_shape)
    with torch.no_grad():
        features = recomputed.conv1(x)
    assert torch.allclose(recomputed.bn1.running_mean, features.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(recomputed.bn1.running_var, features.var(dim=(0, 2, 3)), rtol=1e-4)
    assert recomputed.bn1.momentum == model.bn1.momentum and not recomputed.training
    with pytest.raises(ValueError, match="needs the data"):
        interpolate(model, model, 0.5, batchnorm="recompute")


@pytest.fixture(scope="module")
def trained_pair(digits):
    """Two small MLPs trained on the digits from different seeds."""
    models, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # set up before conftest's per-test single_thread fixture
    try:
        for seed in (0, 1):
            model = build_model("mlp", seed=seed, widths=(32,))
            train(model, digits[0], epochs=3, lr=0.1, optimizer="sgd", seed=seed)
            models.append(model.eval())
    finally:
        torch.set_num_threads(threads)
    return models


def test_barrier_endpoints_match_separate_evaluations(digits, trained_pair):
    a, b = trained_pair
    test = digits[1]
    report = interpolation_barrier(a, b, test, steps=5)
    assert (report.before.loss[0], report.before.accuracy[0]) == evaluate(a, test)
    assert (report.before.loss[-1], report.before.accuracy[-1]) == evaluate(b, test)
    assert (report.after.loss[0], report.after.accuracy[0]) == evaluate(a, test)
    assert (report.after.loss[-1], report.after.accuracy[-1]) == evaluate(report.aligned, test)
    # exact OT between equal widths: the aligned b is b with its hidden units reordered
    assert report.after.loss[-1] == pytest.approx(report.before.loss[-1], rel=1e-5)
    assert report.after.accuracy[-1] == report.before.accuracy[-1]
    assert report.before.loss_barrier > 0.05  # different seeds: a real barrier
    assert report.after.loss_barrier < report.before.loss_barrier
    assert set(report.as_dict()) == {"before", "after"}
    assert report.as_dict()["after"]["loss_barrier"] == report.after.loss_barrier


def test_aligning_a_permuted_copy_removes_the_barrier(digits, trained_pair):
    a = trained_pair[0]
    permuted = permute_hidden_units(a, torch.Generator().manual_seed(2)).eval()
    report = interpolation_barrier(a, permuted, digits[1], steps=5)
    assert report.before.loss_barrier > 0.05 and report.before.accuracy_barrier > 0.01
    assert report.after.loss_barrier == pytest.approx(0.0, abs=1e-6)
    assert report.after.accuracy_barrier == pytest.approx(0.0, abs=1e-6)
