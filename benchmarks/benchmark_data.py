"""The benchmarks' real image data: scikit-learn's 8x8 digits (always there) and
28x28 Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (skipped where it
is not installed), as flat float features in [0, 1] with their image side."""

from __future__ import annotations

import gzip
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from otfusion.task.data import TensorData, load_digits_dataset
from otfusion.task.training import Recipe, recipe_for

FASHION = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("digits", "fashion-mnist")


def load(dataset: str, train_size: int | None = None
         ) -> tuple[TensorData, TensorData, int] | None:
    """(train, test, image side) of ``dataset``, the training set cut to its first
    ``train_size`` examples; None when the dataset is not installed."""
    if dataset == "digits":
        train_data, test_data = load_digits_dataset()
        side = 8
    elif dataset == "fashion-mnist":
        if not FASHION.is_dir():
            return None
        train_data, test_data = _fashion("train"), _fashion("t10k")
        side = 28
    else:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {DATASETS}")
    if train_size is not None and len(train_data) > train_size:
        train_data = train_data.subset(range(train_size))
    return train_data, test_data, side


def model_kwargs(model: str, side: int) -> dict:
    """The zoo model's input size for square one-channel images of ``side`` pixels."""
    if model == "mlp":
        return {"in_features": side * side}
    if model in ("rnn", "lstm", "gru", "transformer", "llama"):
        return {"input_size": side, "seq_len": side}
    return {"image_size": side}


def recipe(model: str, dataset: str) -> Recipe:
    """The clients' training recipe: the zoo's (tuned on the digits), and on the larger
    Fashion-MNIST 10 epochs with an SGD learning rate of at most 0.02 (the MLP's 0.1
    diverged or collapsed in 3 of 6 runs of 5 clients)."""
    base = recipe_for(model)
    if dataset == "digits" or base.optimizer != "sgd":
        return base
    return replace(base, epochs=10, lr=min(base.lr, 0.02))


def _fashion(kind: str) -> TensorData:
    with gzip.open(FASHION / f"{kind}-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784) / 255.0
    with gzip.open(FASHION / f"{kind}-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    return TensorData(torch.tensor(x, dtype=torch.float32), torch.tensor(y).long())
