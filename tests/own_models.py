"""A user's own models, outside the zoo, for the import-path tests ("own_models:...")."""

from __future__ import annotations

from torch import nn


class TinyNet(nn.Module):
    """Linear-ReLU-Linear on 64 features (the digits), 10 classes."""

    def __init__(self, hidden: int = 12):
        super().__init__()
        self.input_shape = (64,)
        self.num_classes = 10
        self.body = nn.Sequential(nn.Linear(64, hidden), nn.ReLU())
        self.out = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.out(self.body(x))


def make_net(hidden: int = 12) -> TinyNet:
    return TinyNet(hidden)


def broken(hidden: int = 12) -> TinyNet:
    raise RuntimeError("no GPU here")


def not_a_module() -> str:
    return "a string"


NOT_CALLABLE = 3
