"""Digits loading, reshaping, partitioning with flwr-datasets, local training."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from otfusion.task.data import (
    TensorData,
    as_input,
    label_counts,
    load_digits_dataset,
    partition,
)
from otfusion.task.training import ensemble_accuracy, evaluate, train
from otfusion.zoo import build_model


@pytest.fixture(scope="module")
def digits() -> tuple[TensorData, TensorData]:
    return load_digits_dataset()


def test_split_sizes_types_and_determinism(digits: tuple[TensorData, TensorData]) -> None:
    train_data, test_data = digits
    assert (len(train_data), len(test_data)) == (1347, 450)
    assert train_data.x.shape == (1347, 64) and train_data.x.dtype == torch.float32
    assert train_data.y.dtype == torch.int64
    assert 0.0 <= float(train_data.x.min()) and float(train_data.x.max()) <= 1.0
    # stratified: every class has about a quarter of its samples in the test split
    fractions = label_counts(test_data, 10) / (
        label_counts(test_data, 10) + label_counts(train_data, 10)
    )
    assert np.all(np.abs(fractions - 0.25) < 0.02)
    again, _ = load_digits_dataset()
    assert torch.equal(again.x, train_data.x) and torch.equal(again.y, train_data.y)
    other, _ = load_digits_dataset(seed=1)
    assert not torch.equal(other.y, train_data.y)


def test_as_input_shapes(digits: tuple[TensorData, TensorData]) -> None:
    data = digits[1]
    assert as_input(data, (64,)).shape == (450, 64)
    images = data.as_input((1, 8, 8))
    assert images.shape == (450, 1, 8, 8)
    assert torch.equal(images[3, 0, 2], data.x[3, 16:24])  # row-major pixels
    assert as_input(data, (8, 8)).shape == (450, 8, 8)
    with pytest.raises(ValueError, match="reshape"):
        as_input(data, (3, 8, 8))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
def test_partition_sizes_sum_to_total(digits: tuple[TensorData, TensorData], scheme: str) -> None:
    data = digits[0]
    parts = partition(data, 10, scheme, alpha=0.5, seed=0)
    assert len(parts) == 10
    assert sum(len(p) for p in parts) == len(data)
    assert all(len(p) > 0 for p in parts)
    # every sample exactly once
    stacked = torch.cat([p.x for p in parts])
    assert torch.equal(torch.sort(stacked.sum(dim=1)).values, torch.sort(data.x.sum(dim=1)).values)
    assert np.array_equal(sum(label_counts(p, 10) for p in parts), label_counts(data, 10))
    again = partition(data, 10, scheme, alpha=0.5, seed=0)
    assert all(torch.equal(a.y, b.y) for a, b in zip(parts, again, strict=True))


def test_iid_sizes_are_balanced(digits: tuple[TensorData, TensorData]) -> None:
    sizes = [len(p) for p in partition(digits[0], 8, "iid")]
    assert max(sizes) - min(sizes) <= 1


def test_pathological_gives_fixed_class_count(digits: tuple[TensorData, TensorData]) -> None:
    parts = partition(digits[0], 10, "pathological", classes_per_partition=3, seed=2)
    assert [int((label_counts(p, 10) > 0).sum()) for p in parts] == [3] * 10


def test_dirichlet_is_label_skewed(digits: tuple[TensorData, TensorData]) -> None:
    data = digits[0]

    def skew(parts: list[TensorData]) -> float:
        """Mean total-variation distance of the partitions' label histograms to the
        global one."""
        overall = label_counts(data, 10) / len(data)
        return float(
            np.mean([0.5 * np.abs(label_counts(p, 10) / len(p) - overall).sum() for p in parts])
        )

    iid = skew(partition(data, 8, "iid"))
    dirichlet = skew(partition(data, 8, "dirichlet", alpha=0.1))
    assert iid < 0.15
    assert dirichlet > 0.5


@pytest.mark.parametrize("num_partitions", [8, 20])
def test_dirichlet_small_alpha_many_partitions(
    digits: tuple[TensorData, TensorData], num_partitions: int
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flwr-datasets warns when it resamples
        parts = partition(digits[0], num_partitions, "dirichlet", alpha=0.1, seed=3)
    assert len(parts) == num_partitions
    assert sum(len(p) for p in parts) == len(digits[0])
    assert min(len(p) for p in parts) >= 1


def test_unknown_partitioner(digits: tuple[TensorData, TensorData]) -> None:
    with pytest.raises(ValueError, match="unknown partitioner"):
        partition(digits[0], 4, "shards")  # type: ignore[arg-type]


def test_training_mlp_beats_85_percent(digits: tuple[TensorData, TensorData]) -> None:
    train_data, test_data = digits
    model = build_model("mlp", seed=0)
    last = train(model, train_data, epochs=3, seed=0)
    loss, accuracy = evaluate(model, test_data)
    assert accuracy > 0.85
    assert np.isfinite(last) and loss < 1.0
    assert ensemble_accuracy([model], test_data) == pytest.approx(accuracy)
    # an untrained cnn (other input shape) in the ensemble with weight 0 changes nothing
    cnn = build_model("cnn")
    assert ensemble_accuracy([model, cnn], test_data, weights=[1.0, 0.0]) == pytest.approx(accuracy)


def test_training_is_deterministic(digits: tuple[TensorData, TensorData]) -> None:
    small = digits[0].subset(range(301))  # 301 = 9 * 32 + 13: uneven last batch
    losses, states = [], []
    for seed in (0, 0, 1):
        model = build_model("cnn", seed=0, channels=(4, 8), hidden=16)
        losses.append(train(model, small, epochs=2, seed=seed))
        states.append(model.state_dict())
    assert losses[0] == losses[1] != losses[2]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not torch.equal(states[0]["head.weight"], states[2]["head.weight"])


def test_batchnorm_model_trains_with_a_trailing_single_sample(
    digits: tuple[TensorData, TensorData],
) -> None:
    model = build_model("resnet18", width_multiplier=0.0625)
    loss = train(model, digits[0].subset(range(33)), epochs=1, batch_size=32)
    assert np.isfinite(loss)
