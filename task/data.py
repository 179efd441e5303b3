"""Embedded default data (scikit-learn's digits), federated partitioning, and Hugging
Face Hub datasets through flwr-datasets.

Only the hub functions (:func:`load_federated_partition` and the helpers above it)
download: the digits ship with scikit-learn, and :func:`partition` applies
flwr-datasets partitioners to a local ``datasets.Dataset``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch

PartitionerName = Literal["iid", "dirichlet", "pathological"]
PARTITIONERS: tuple[str, ...] = ("iid", "dirichlet", "pathological")


@dataclass(frozen=True, eq=False)
class TensorData:
    """Features ``x`` (float32, ``(N, F)``; flat for the digits, ``F = 64``) and integer
    class labels ``y`` (int64, ``(N,)``)."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.ndim < 1 or self.y.ndim != 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"x must be (N, ...) and y (N,); got x {tuple(self.x.shape)}, "
                f"y {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def num_features(self) -> int:
        """Number of features per sample (product of the non-batch dimensions)."""
        return math.prod(self.x.shape[1:])

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> TensorData:
        """The samples at ``indices``, in that order."""
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return TensorData(self.x[index], self.y[index])

    def as_input(self, input_shape: Sequence[int]) -> torch.Tensor:
        """Features reshaped to ``(N, *input_shape)``; see :func:`as_input`."""
        return as_input(self, input_shape)


def as_input(data: TensorData | torch.Tensor, input_shape: Sequence[int]) -> torch.Tensor:
    """Reshape features to a model's ``input_shape`` (without the batch dimension).

    Flat digits (64 features) become ``(N, 64)`` for an MLP, ``(N, 1, 8, 8)`` images for
    a CNN, or ``(N, 8, 8)`` sequences (the image rows as time steps) for a recurrent
    model. Raises ``ValueError`` if the feature count does not match.
    """
    x = data.x if isinstance(data, TensorData) else data
    shape = tuple(int(s) for s in input_shape)
    if math.prod(x.shape[1:]) != math.prod(shape):
        raise ValueError(
            f"cannot reshape features of shape {tuple(x.shape[1:])} to input shape {shape}"
        )
    return x.reshape(x.shape[0], *shape)


def label_counts(data: TensorData, num_classes: int | None = None) -> np.ndarray:
    """Number of samples per class (length ``num_classes``, default ``max(y) + 1``)."""
    minlength = 0 if num_classes is None else num_classes
    return np.bincount(data.y.numpy(), minlength=minlength)


def load_digits_dataset(
    test_fraction: float = 0.25, seed: int = 0
) -> tuple[TensorData, TensorData]:
    """Train and test splits of scikit-learn's digits (1797 samples, 10 classes).

    Features are the 64 pixels of the 8x8 images scaled from [0, 16] to [0, 1]
    (float32, flat); labels are int64. The split is stratified and deterministic in
    ``seed``; the test split gets ``ceil(test_fraction * 1797)`` samples.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    return (
        TensorData(torch.from_numpy(x_train), torch.from_numpy(y_train)),
        TensorData(torch.from_numpy(x_test), torch.from_numpy(y_test)),
    )


def partition(
    data: TensorData,
    num_partitions: int,
    partitioner: PartitionerName = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    classes_per_partition: int = 2,
    *,
    min_partition_size: int = 1,
    self_balancing: bool = True,
    class_assignment_mode: Literal["random", "deterministic", "first-deterministic"] = (
        "first-deterministic"
    ),
) -> list[TensorData]:
    """Split ``data`` into ``num_partitions`` client datasets with a flwr-datasets
    partitioner (applied to a local ``datasets.Dataset`` of sample indices and labels).

    - ``"iid"``: ``IidPartitioner`` on the samples shuffled with ``seed`` (equal sizes,
      up to one sample).
    - ``"dirichlet"``: ``DirichletPartitioner`` over the labels with concentration
      ``alpha`` (smaller is more skewed), ``min_partition_size`` and ``self_balancing``.
    - ``"pathological"``: ``PathologicalPartitioner`` giving every partition exactly
      ``classes_per_partition`` classes, assigned by ``class_assignment_mode``
      (the default, ``"first-deterministic"``, is the scheme of the original paper).

    Every sample lands in exactly one partition, except that the pathological scheme
    drops the classes that no partition is assigned (flwr-datasets warns about it).
    Deterministic in ``seed``.
    """
    from datasets import Dataset

    scheme = make_partitioner(
        partitioner, num_partitions, alpha, seed, classes_per_partition,
        min_partition_size=min_partition_size, self_balancing=self_balancing,
        class_assignment_mode=class_assignment_mode,
    )
    if num_partitions > len(data):
        raise ValueError(
            f"num_partitions must be between 1 and the number of samples ({len(data)}), "
            f"got {num_partitions}"
        )
    labels = data.y.numpy()
    # iid shards are contiguous: shuffle the samples first
    order = (np.random.default_rng(seed).permutation(len(data)) if partitioner == "iid"
             else np.arange(len(data)))
    dataset = Dataset.from_dict({"index": order, "label": labels[order]})
    scheme.dataset = dataset
    return [data.subset(scheme.load_partition(i)["index"]) for i in range(num_partitions)]


def load_npz(path: str, split: str = "train") -> TensorData:
    """A client's own data from an ``.npz`` file with arrays ``x`` and ``y`` (features and
    integer labels) and optionally ``x_test`` and ``y_test``; ``split="test"`` reads the
    latter, or ``x`` and ``y`` when the file has no test arrays."""
    with np.load(path) as arrays:
        prefix = "_test" if split == "test" and "x_test" in arrays else ""
        missing = {f"x{prefix}", f"y{prefix}"} - set(arrays.files)
        if missing:
            raise ValueError(f"{path} lacks the arrays {sorted(missing)}")
        x = torch.as_tensor(arrays[f"x{prefix}"], dtype=torch.float32)
        y = torch.as_tensor(arrays[f"y{prefix}"], dtype=torch.int64)
    return TensorData(x.reshape(len(x), -1), y)


# --- Hub datasets through flwr-datasets (downloads; for users with internet access) ---

HUB_DATASETS: dict[str, str] = {"mnist": "ylecun/mnist", "cifar10": "uoft-cs/cifar10"}
"""Short dataset names and their Hugging Face Hub ids."""

IMAGE_COLUMNS: tuple[str, ...] = ("image", "img")
"""Column names holding the images, tried in this order (mnist: ``image``, cifar10:
``img``)."""


def hub_dataset_id(dataset_name: str) -> str:
    """The Hugging Face Hub id of ``dataset_name``: a short name from
    :data:`HUB_DATASETS` (``"mnist"`` -> ``"ylecun/mnist"``), or a hub id
    (``"owner/name"``), which is returned unchanged."""
    if dataset_name in HUB_DATASETS:
        return HUB_DATASETS[dataset_name]
    if "/" in dataset_name:
        return dataset_name
    raise ValueError(
        f"unknown dataset {dataset_name!r}; use one of {', '.join(sorted(HUB_DATASETS))} "
        "or a Hugging Face Hub id such as 'ylecun/mnist'"
    )


def make_partitioner(
    partitioner: PartitionerName,
    num_partitions: int,
    alpha: float = 0.5,
    seed: int = 0,
    classes_per_partition: int = 2,
    *,
    label_column: str = "label",
    min_partition_size: int = 1,
    self_balancing: bool = True,
    class_assignment_mode: Literal["random", "deterministic", "first-deterministic"] = (
        "first-deterministic"
    ),
):
    """A fresh flwr-datasets ``Partitioner``: ``IidPartitioner`` for ``"iid"``,
    ``DirichletPartitioner`` over ``label_column`` with concentration ``alpha`` for
    ``"dirichlet"``, and ``PathologicalPartitioner`` with ``classes_per_partition``
    classes each, assigned by ``class_assignment_mode``, for ``"pathological"``."""
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int):
        raise TypeError(f"num_partitions must be an int, got {num_partitions!r}")
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be at least 1, got {num_partitions}")
    if partitioner == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if partitioner == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=label_column,
            alpha=float(alpha),
            min_partition_size=min_partition_size,
            self_balancing=self_balancing,
            shuffle=True,
            seed=seed,
        )
    if partitioner == "pathological":
        return PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by=label_column,
            num_classes_per_partition=classes_per_partition,
            class_assignment_mode=class_assignment_mode,
            shuffle=True,
            seed=seed,
        )
    raise ValueError(
        f"unknown partitioner {partitioner!r}; choose one of {', '.join(PARTITIONERS)}"
    )


def hub_federated_dataset(
    dataset_name: str,
    num_partitions: int,
    partitioner: PartitionerName = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    split: str = "train",
    **load_dataset_kwargs: object,
):
    """A ``flwr_datasets.FederatedDataset`` of the hub dataset ``dataset_name`` (short
    name or hub id, see :func:`hub_dataset_id`) whose ``split`` is partitioned by
    :func:`make_partitioner`; the samples are shuffled with ``seed`` first.

    Nothing is downloaded until a partition is loaded; then ``datasets.load_dataset``
    fetches the dataset into the Hugging Face cache (``HF_HOME``), which later runs
    reuse. ``load_dataset_kwargs`` go to ``datasets.load_dataset``.
    """
    from flwr_datasets import FederatedDataset

    return FederatedDataset(
        dataset=hub_dataset_id(dataset_name),
        partitioners={split: make_partitioner(partitioner, num_partitions, alpha, seed)},
        shuffle=True,
        seed=seed,
        **load_dataset_kwargs,
    )


@lru_cache(maxsize=4)
def _cached_hub_federated_dataset(
    dataset_name: str, num_partitions: int, partitioner: PartitionerName, alpha: float,
    seed: int, split: str
):
    return hub_federated_dataset(dataset_name, num_partitions, partitioner, alpha, seed, split)


def hf_to_tensor_data(dataset, image_column: str | None = None,
                      label_column: str = "label") -> TensorData:
    """Convert a ``datasets.Dataset`` of images and labels to :class:`TensorData`.

    The image column is ``image_column`` or the first of :data:`IMAGE_COLUMNS` present
    (PIL images or arrays). Integer pixels (``uint8`` images) are scaled by 1/255 to
    [0, 1]; floating pixels are kept as they are. Images are flattened channel-first:
    a colour image ``(H, W, C)`` becomes the features of ``(C, H, W)``, so
    ``TensorData.as_input((C, H, W))`` restores it for a CNN. Labels become int64.
    """
    columns = list(dataset.column_names)
    if image_column is None:
        image_column = next((name for name in IMAGE_COLUMNS if name in columns), None)
    if image_column is None or image_column not in columns:
        raise ValueError(
            f"no image column in the dataset (looked for "
            f"{image_column or ' or '.join(IMAGE_COLUMNS)}; columns: {columns})"
        )
    if label_column not in columns:
        raise ValueError(f"no label column {label_column!r} in the dataset (columns: {columns})")
    if len(dataset) == 0:
        raise ValueError("the partition is empty")
    batch = dataset.select_columns([image_column, label_column]).with_format("numpy")[:]
    images = np.asarray(batch[image_column])
    if images.dtype == object or images.ndim < 2:
        raise ValueError(
            f"the images in column {image_column!r} do not stack into one array "
            "(different sizes or modes?)"
        )
    if images.ndim == 4:  # (N, H, W, C) -> (N, C, H, W)
        images = images.transpose(0, 3, 1, 2)
    if np.issubdtype(images.dtype, np.integer) or images.dtype == np.bool_:
        x = images.astype(np.float32) / np.float32(255.0)
    else:
        x = images.astype(np.float32)
    y = np.asarray(batch[label_column]).astype(np.int64)
    return TensorData(torch.from_numpy(np.ascontiguousarray(x.reshape(len(x), -1))),
                      torch.from_numpy(y))


def load_federated_partition(
    dataset_name: str,
    partition_id: int,
    num_partitions: int,
    partitioner: PartitionerName = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    split: str = "train",
    federated_dataset=None,
) -> TensorData:
    """Partition ``partition_id`` of ``split`` of a Hugging Face Hub dataset, loaded with
    flwr-datasets and converted by :func:`hf_to_tensor_data`.

    ``dataset_name`` is ``"mnist"`` (``ylecun/mnist``), ``"cifar10"``
    (``uoft-cs/cifar10``) or another hub id with an ``image``/``img`` and a ``label``
    column. The split is shuffled with ``seed`` and partitioned into ``num_partitions``
    by ``partitioner`` (``iid``, ``dirichlet`` with ``alpha``, ``pathological``; see
    :func:`make_partitioner`), so every client of a run that passes the same arguments
    gets a disjoint part. With ``split="test"`` the test split is partitioned the same
    way (each client evaluates on its share).

    This downloads the dataset on first use (then it comes from the Hugging Face cache);
    the ``FederatedDataset`` is kept per argument set in this process. Pass
    ``federated_dataset`` (a ``flwr_datasets.FederatedDataset`` with a partitioner for
    ``split``) to use that one instead; then ``dataset_name``, ``num_partitions``,
    ``partitioner``, ``alpha`` and ``seed`` are not used.
    """
    if isinstance(partition_id, bool) or not isinstance(partition_id, int):
        raise TypeError(f"partition_id must be an int, got {partition_id!r}")
    if federated_dataset is None:
        if not 0 <= partition_id < num_partitions:
            raise ValueError(
                f"partition_id must be in [0, {num_partitions}), got {partition_id}"
            )
        federated_dataset = _cached_hub_federated_dataset(
            dataset_name, num_partitions, partitioner, float(alpha), int(seed), split
        )
    return hf_to_tensor_data(federated_dataset.load_partition(partition_id, split))
