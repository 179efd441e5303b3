"""Sequence classifiers built on ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU``."""

from __future__ import annotations

import torch
from torch import nn

from ._common import positive_int


class _RecurrentClassifier(nn.Module):
    """Shared structure: ``rnn`` (batch_first recurrent module), ``head`` (output
    ``Linear`` applied to the last time step of the top layer)."""

    rnn: nn.RNNBase

    def __init__(
        self, input_size: int, seq_len: int, hidden_size: int, num_layers: int, num_classes: int
    ) -> None:
        super().__init__()
        self.input_size = positive_int(input_size, "input_size")
        self.seq_len = positive_int(seq_len, "seq_len")
        self.hidden_size = positive_int(hidden_size, "hidden_size")
        self.num_layers = positive_int(num_layers, "num_layers")
        self.num_classes = positive_int(num_classes, "num_classes")
        self.input_shape: tuple[int, ...] = (self.seq_len, self.input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rnn(x)[0]
        return self.head(out[:, -1])


class RNNClassifier(_RecurrentClassifier):
    """Elman RNN (``nn.RNN``, tanh by default) over the sequence, then ``Linear`` on the
    last hidden state.

    Input shape: ``(batch, seq_len, input_size)`` (batch first; for digits, the 8 image
    rows are the 8 time steps). Output: ``(batch, num_classes)`` logits.
    """

    def __init__(
        self,
        input_size: int = 8,
        seq_len: int = 8,
        hidden_size: int = 64,
        num_layers: int = 1,
        num_classes: int = 10,
        nonlinearity: str = "tanh",
    ) -> None:
        super().__init__(input_size, seq_len, hidden_size, num_layers, num_classes)
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.rnn = nn.RNN(
            self.input_size,
            self.hidden_size,
            num_layers=self.num_layers,
            nonlinearity=nonlinearity,
            batch_first=True,
        )
        self.head = nn.Linear(self.hidden_size, self.num_classes)


class LSTMClassifier(_RecurrentClassifier):
    """``nn.LSTM`` over the sequence, then ``Linear`` on the last hidden state.

    Input shape: ``(batch, seq_len, input_size)`` (batch first; for digits, the 8 image
    rows are the 8 time steps). Output: ``(batch, num_classes)`` logits.
    """

    def __init__(
        self,
        input_size: int = 8,
        seq_len: int = 8,
        hidden_size: int = 64,
        num_layers: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__(input_size, seq_len, hidden_size, num_layers, num_classes)
        self.rnn = nn.LSTM(
            self.input_size, self.hidden_size, num_layers=self.num_layers, batch_first=True
        )
        self.head = nn.Linear(self.hidden_size, self.num_classes)


class GRUClassifier(_RecurrentClassifier):
    """``nn.GRU`` over the sequence, then ``Linear`` on the last hidden state.

    Input shape: ``(batch, seq_len, input_size)`` (batch first; for digits, the 8 image
    rows are the 8 time steps). Output: ``(batch, num_classes)`` logits.
    """

    def __init__(
        self,
        input_size: int = 8,
        seq_len: int = 8,
        hidden_size: int = 64,
        num_layers: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__(input_size, seq_len, hidden_size, num_layers, num_classes)
        self.rnn = nn.GRU(
            self.input_size, self.hidden_size, num_layers=self.num_layers, batch_first=True
        )
        self.head = nn.Linear(self.hidden_size, self.num_classes)
