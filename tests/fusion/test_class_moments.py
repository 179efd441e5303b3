"""Per-class input moments: what a client computes and sends, how the server checks and
pools them, and the synthetic inputs drawn from them class by class."""

from __future__ import annotations

import pytest
import torch

from otfusion.fusion import InputMoments, fuse_result, input_moments, pool_moments
from otfusion.fusion.moments import MIN_CLASS_EXAMPLES, synthetic_inputs
from otfusion.strategies.replies import check_class_moments, check_input_moments, reply_digest
from otfusion.zoo import build_model


def _data(sizes: list[int], seed: int, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (N, 2, 3) whose class c is centred at c + shift, ``sizes[c]`` of class c."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    x = torch.randn(len(labels), 2, 3, generator=generator) * (1 + seed)
    return x + labels.view(-1, 1, 1).float() + shift, labels


def test_class_moments_are_each_described_class_batch_moments():
    x, y = _data([30, MIN_CLASS_EXAMPLES - 1, MIN_CLASS_EXAMPLES, 0], seed=0)
    moments = input_moments(x, y, num_classes=4)
    plain = input_moments(x)
    torch.testing.assert_close(moments.mean, plain.mean)
    assert moments.class_mean.shape == moments.class_var.shape == (4, 2, 3)
    assert moments.class_count.tolist() == [30.0, 0.0, MIN_CLASS_EXAMPLES, 0.0]
    for c in (0, 2):
        rows = x[y == c]
        torch.testing.assert_close(moments.class_mean[c], rows.mean(0))
        torch.testing.assert_close(moments.class_var[c], rows.var(0, unbiased=False))
    for c in (1, 3):  # too few examples to describe without revealing them: zeros
        assert not moments.class_mean[c].any() and not moments.class_var[c].any()
    with pytest.raises(ValueError, match="one label per input"):
        input_moments(x, y[:-1], num_classes=4)


def test_pooled_class_moments_equal_the_moments_of_each_class_union():
    """Clients weighted by their sizes: each class pools like the union of its examples
    (exactly, without outlier shrinking), over the clients that describe it."""
    parts = [_data([20, 40, 0], 0), _data([30, 10, 50], 1, shift=0.5), _data([15, 0, 25], 2)]
    moments = [input_moments(x, y, num_classes=3) for x, y in parts]
    pooled = pool_moments(moments, [len(y) for _, y in parts], outlier_factor=None)
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    union = input_moments(x, y, num_classes=3)
    torch.testing.assert_close(pooled.class_mean, union.class_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled.class_var, union.class_var, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled.class_count / pooled.class_count.sum(),
                               union.class_count / union.class_count.sum())
    torch.testing.assert_close(pooled.mean, union.mean, rtol=1e-5, atol=1e-5)


def test_clients_without_class_moments_are_pooled_overall_only():
    with_classes = input_moments(*_data([20, 20], 0), num_classes=2)
    without = input_moments(_data([20, 20], 1)[0])
    pooled = pool_moments([with_classes, without], [1.0, 1.0], outlier_factor=None)
    torch.testing.assert_close(pooled.class_mean, with_classes.class_mean)
    assert pool_moments([without, without], [1.0, 1.0]).class_mean is None


def test_a_claimed_class_count_weighs_no_more_than_the_clients_weight():
    """A client claiming a huge count for one class pools as its share of its own
    examples times its weight: as much as an honest client of the same weight."""
    honest = input_moments(*_data([20, 20], 0), num_classes=2)
    loud = honest._replace(class_mean=honest.class_mean + 5.0,
                           class_count=torch.tensor([1e9, 1e9]))
    pooled = pool_moments([honest, loud], [1.0, 1.0], outlier_factor=None)
    torch.testing.assert_close(pooled.class_mean, honest.class_mean + 2.5)


def test_synthetic_inputs_are_drawn_class_by_class():
    moments = InputMoments(torch.zeros(4), torch.ones(4),
                           class_mean=torch.tensor([[10.0] * 4, [0.0] * 4, [-10.0] * 4]),
                           class_var=torch.tensor([[1.0] * 4, [0.0] * 4, [0.25] * 4]),
                           class_count=torch.tensor([3.0, 0.0, 1.0]))
    x = synthetic_inputs(moments, 4000, torch.Generator().manual_seed(0))
    high, low = x[x[:, 0] > 0], x[x[:, 0] < 0]
    assert len(high) + len(low) == 4000  # class 1 (count 0) is never drawn
    assert abs(len(high) / 4000 - 0.75) < 0.03
    assert abs(float(high.mean()) - 10.0) < 0.1 and abs(float(low.std()) - 0.5) < 0.05
    again = synthetic_inputs(moments, 4000, torch.Generator().manual_seed(0))
    assert torch.equal(x, again)


def test_a_reply_s_class_moments_are_checked_and_digested():
    moments = check_input_moments([0.0] * 6, [1.0] * 6, (2, 3))
    mean, var, count = [1.0] * 12, [0.5] * 12, [20, 0]
    checked = check_class_moments(moments, mean, var, count, 2)
    assert checked.class_mean.shape == (2, 2, 3) and checked.class_count.tolist() == [20, 0]
    assert check_class_moments(moments, None, None, None, 2) is moments
    assert check_class_moments(moments, mean, var, count, None) is moments  # classes unknown
    assert check_class_moments(None, mean, var, count, 2) is None  # no overall moments
    state = {"w": torch.zeros(2)}
    assert reply_digest(state, 1.0, None, checked) != reply_digest(state, 1.0, None, moments)
    for args, reason in [
        ((moments, mean, None, count, 2), "must be sent together"),
        ((moments, mean[:-1], var, count, 2), "11 entries for 2 classes x 6 input features"),
        ((moments, mean, var, [20], 2), "1 entries for the model's 2 classes"),
        ((moments, mean, [-1.0] * 12, count, 2), "not a finite non-negative number"),
        ((moments, [2e6] * 12, var, count, 2), "> 1e+06"),
    ]:
        got = check_class_moments(*args)
        assert isinstance(got, str) and reason in got, (reason, got)


def test_fusion_with_class_moments_distils_and_screens():
    """The engine takes per-class moments wherever it takes moments: fused permuted
    copies stay that model (screening and distillation on class-drawn inputs)."""
    model = build_model("mlp", seed=0, in_features=6, widths=(8,), num_classes=2)
    x, y = _data([30, 30], 0)
    moments = input_moments(x.flatten(1), y, num_classes=2)
    result = fuse_result([model] * 5, input_moments=[moments] * 5, class_weights=[[30, 30]] * 5)
    assert result.excluded == {}
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(result.model.state_dict()[name], tensor)
