"""Hub datasets through flwr-datasets, offline: a fake mnist-like ``DatasetDict`` is
injected where flwr-datasets calls ``datasets.load_dataset``, and any network access
fails the test."""

from __future__ import annotations

import socket

import datasets
import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from PIL import Image as PILImage

from otfusion.task import data as data_module
from otfusion.task.data import (
    HUB_DATASETS,
    hf_to_tensor_data,
    hub_dataset_id,
    hub_federated_dataset,
    load_federated_partition,
    make_partitioner,
)

NUM_TRAIN, NUM_TEST = 200, 60


def _mnist_like(num_samples: int, id_offset: int = 0) -> Dataset:
    """28x28 grayscale PIL images: the first two pixels hold the sample id (base 256),
    every other pixel ``20 * label + 5``; labels cycle through the 10 classes."""
    labels = [i % 10 for i in range(num_samples)]
    images = []
    for i, label in enumerate(labels):
        pixels = np.full((28, 28), 20 * label + 5, dtype=np.uint8)
        pixels[0, 0], pixels[0, 1] = divmod(id_offset + i, 256)
        images.append(PILImage.fromarray(pixels, mode="L"))
    features = Features({"image": Image(), "label": ClassLabel(num_classes=10)})
    return Dataset.from_dict({"image": images, "label": labels}, features=features)


def _cifar_like(num_samples: int) -> Dataset:
    """32x32 RGB PIL images with channels R=0, G=128, B=255, in column ``img``."""
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[..., 1], pixels[..., 2] = 128, 255
    images = [PILImage.fromarray(pixels, mode="RGB") for _ in range(num_samples)]
    features = Features({"img": Image(), "label": ClassLabel(num_classes=10)})
    return Dataset.from_dict({"img": images, "label": [i % 10 for i in range(num_samples)]},
                             features=features)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Fail on any connection attempt and silence flwr-datasets' telemetry (a POST from a
    background thread on every first ``load_partition``)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr("flwr_datasets.federated_dataset.event", lambda *a, **k: None)
    data_module._cached_hub_federated_dataset.cache_clear()
    yield
    data_module._cached_hub_federated_dataset.cache_clear()


@pytest.fixture
def fake_hub(monkeypatch):
    """Serve in-memory datasets from ``datasets.load_dataset`` (looked up there by
    flwr-datasets' ``FederatedDataset`` at call time); records the calls."""
    served = {
        "ylecun/mnist": DatasetDict({"train": _mnist_like(NUM_TRAIN),
                                     "test": _mnist_like(NUM_TEST, id_offset=NUM_TRAIN)}),
        "uoft-cs/cifar10": DatasetDict({"train": _cifar_like(40), "test": _cifar_like(20)}),
    }
    calls: list[tuple[str, object]] = []

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        if path not in served:
            raise AssertionError(f"unexpected dataset {path!r}")
        return served[path]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def _ids(data) -> list[int]:
    """The sample ids that :func:`_mnist_like` wrote into the first two pixels."""
    digits = (data.x[:, :2] * 255).round().to(torch.int64)
    return (digits[:, 0] * 256 + digits[:, 1]).tolist()


def _check_mnist_conversion(data) -> None:
    assert data.x.dtype == torch.float32 and data.y.dtype == torch.int64
    assert data.x.shape == (len(data), 784) and data.y.shape == (len(data),)
    assert float(data.x.min()) >= 0.0 and float(data.x.max()) <= 1.0
    # every pixel but the id encodes the sample's own label: images and labels align
    expected = (20 * data.y.to(torch.float32) + 5) / 255
    assert torch.allclose(data.x[:, 2:], expected[:, None].expand(-1, 782), atol=1e-6)


def test_short_names_map_to_hub_ids():
    assert hub_dataset_id("mnist") == "ylecun/mnist" == HUB_DATASETS["mnist"]
    assert hub_dataset_id("cifar10") == "uoft-cs/cifar10"
    assert hub_dataset_id("zalando-datasets/fashion_mnist") == "zalando-datasets/fashion_mnist"
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        hub_dataset_id("imagenet")


def test_iid_partitions_are_disjoint_equal_and_cover_the_split(fake_hub):
    parts = [load_federated_partition("mnist", i, 4, "iid", seed=0) for i in range(4)]
    assert fake_hub == [("ylecun/mnist", None)]  # loaded once, then reused
    assert [len(p) for p in parts] == [NUM_TRAIN // 4] * 4
    ids = [_ids(p) for p in parts]
    assert sorted(i for part in ids for i in part) == list(range(NUM_TRAIN))
    for part in parts:
        _check_mnist_conversion(part)
    assert ids[0] != sorted(ids[0])  # shuffled before sharding
    # deterministic in the seed, different for another seed
    data_module._cached_hub_federated_dataset.cache_clear()
    assert _ids(load_federated_partition("mnist", 0, 4, "iid", seed=0)) == ids[0]
    assert set(_ids(load_federated_partition("mnist", 0, 4, "iid", seed=1))) != set(ids[0])


def test_dirichlet_partitions_are_skewed_and_cover_the_split(fake_hub):
    parts = [load_federated_partition("mnist", i, 4, "dirichlet", alpha=0.2, seed=3)
             for i in range(4)]
    ids = [i for part in parts for i in _ids(part)]
    assert sorted(ids) == list(range(NUM_TRAIN))
    counts = np.stack([np.bincount(p.y.numpy(), minlength=10) for p in parts])
    assert counts.sum() == NUM_TRAIN
    # far from IID: some partition lacks or nearly lacks some class present elsewhere
    assert (counts.min(axis=0) <= 1).any()
    for part in parts:
        _check_mnist_conversion(part)
    data_module._cached_hub_federated_dataset.cache_clear()
    again = load_federated_partition("mnist", 2, 4, "dirichlet", alpha=0.2, seed=3)
    assert _ids(again) == _ids(parts[2])


def test_pathological_partitions_hold_two_classes_each(fake_hub):
    # 10 partitions: the first-deterministic scheme gives partition i class i, so no
    # class is left out (with fewer partitions flwr-datasets drops unassigned classes)
    parts = [load_federated_partition("mnist", i, 10, "pathological", seed=0)
             for i in range(10)]
    assert all(len(set(p.y.tolist())) == 2 and i in p.y.tolist() for i, p in enumerate(parts))
    assert sorted(i for p in parts for i in _ids(p)) == list(range(NUM_TRAIN))


def test_test_split_is_partitioned_like_the_train_split(fake_hub):
    parts = [load_federated_partition("mnist", i, 3, split="test") for i in range(3)]
    assert [len(p) for p in parts] == [NUM_TEST // 3] * 3
    ids = sorted(i for p in parts for i in _ids(p))
    assert ids == list(range(NUM_TRAIN, NUM_TRAIN + NUM_TEST))


def test_colour_images_in_column_img_are_flattened_channel_first(fake_hub):
    part = load_federated_partition("cifar10", 1, 2, "iid")
    assert fake_hub == [("uoft-cs/cifar10", None)]
    assert part.x.shape == (20, 3 * 32 * 32) and part.x.dtype == torch.float32
    images = part.as_input((3, 32, 32))
    assert torch.all(images[:, 0] == 0)
    assert torch.allclose(images[:, 1], torch.tensor(128 / 255))
    assert torch.all(images[:, 2] == 1)


def test_a_given_federated_dataset_is_used_as_is(fake_hub):
    fds = hub_federated_dataset("ylecun/mnist", 2, "iid", seed=7, split="test")
    assert fake_hub == []  # lazy: nothing is loaded before the first partition
    part = load_federated_partition("ignored", 1, 99, split="test", federated_dataset=fds)
    assert len(part) == NUM_TEST // 2 and fake_hub == [("ylecun/mnist", None)]
    _check_mnist_conversion(part)


def test_arrays_instead_of_pil_images_convert_too():
    pixels = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    data = hf_to_tensor_data(Dataset.from_dict({"image": list(pixels), "label": [3, 7]}))
    assert torch.allclose(data.x, torch.from_numpy(pixels.reshape(2, -1) / 255).float())
    assert data.y.tolist() == [3, 7] and data.y.dtype == torch.int64
    floats = Dataset.from_dict({"img": [np.full((2, 2), 0.5, dtype=np.float32)], "label": [1]})
    assert torch.all(hf_to_tensor_data(floats).x == 0.5)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="no image column"):
        hf_to_tensor_data(Dataset.from_dict({"pixels": [[1, 2]], "label": [0]}))
    with pytest.raises(ValueError, match="no label column 'label'"):
        hf_to_tensor_data(Dataset.from_dict({"image": [[1, 2]], "fine_label": [0]}))
    with pytest.raises(ValueError, match="empty"):
        hf_to_tensor_data(Dataset.from_dict({"image": [], "label": []}))
    with pytest.raises(ValueError, match="partition_id"):
        load_federated_partition("mnist", 4, 4)
    with pytest.raises(ValueError, match="unknown partitioner"):
        make_partitioner("shards", 4)  # type: ignore[arg-type]


@pytest.mark.usefixtures("task_identity")
def test_client_app_trains_on_a_hub_partition_with_model_kwargs(fake_hub):
    """The ClientApp's data for ``dataset=mnist`` is its flwr-datasets partition, and
    ``model-kwargs`` shapes the model for it (784 inputs)."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from otfusion.client.app import client_data, train_handler
    from otfusion.task.config import RunConfig

    config = RunConfig(dataset="mnist", model_kwargs='{"in_features": 784, "widths": [16]}',
                       local_epochs=1)
    node = {"partition-id": 1, "num-partitions": 4}
    data = client_data(config, node, "train")
    assert data.x.shape == (NUM_TRAIN // 4, 784)
    assert _ids(data) == _ids(load_federated_partition("mnist", 1, 4))
    assert len(client_data(config, node, "test")) == NUM_TEST // 4

    instruction = Message(content=RecordDict({
        "arrays": ArrayRecord(config.build_model().state_dict()),
        "config": ConfigRecord({"server-round": 1})}), dst_node_id=7, message_type="train")
    context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(),
                      run_config=config.as_run_config())
    reply = train_handler(config, instruction, context)
    arrays = reply.content["arrays"].to_torch_state_dict()
    assert arrays["layers.0.weight"].shape == (16, 784)
    assert reply.content["metrics"]["num-examples"] == NUM_TRAIN // 4
    assert sum(reply.content["metrics"]["label-counts"]) == NUM_TRAIN // 4
