"""Sequence classifiers built on ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU``."""

from __future__ import annotations

import torch
from torch import nn

from ._common import positive_int


class _RecurrentClassifier(nn.Module):
    """Shared structure: ``rnn`` (batch_first recurrent module of type ``cell``), ``head``
    (output ``Linear`` applied to the last time step of the top layer)."""

    def __init__(self, cell: type[nn.RNNBase], input_size: int, seq_len: int,
                 hidden_size: int, num_layers: int, num_classes: int, **cell_kwargs) -> None:
        super().__init__()
        self.input_size = positive_int(input_size, "input_size")
        self.seq_len = positive_int(seq_len, "seq_len")
        self.hidden_size = positive_int(hidden_size, "hidden_size")
        self.num_layers = positive_int(num_layers, "num_layers")
        self.num_classes = positive_int(num_classes, "num_classes")
        self.input_shape: tuple[int, ...] = (self.seq_len, self.input_size)
        self.rnn = cell(self.input_size, self.hidden_size, num_layers=self.num_layers,
                        batch_first=True, **cell_kwargs)
        self.head = nn.Linear(self.hidden_size, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rnn(x)[0]
        return self.head(out[:, -1])


_INPUT_DOC = """

    Input shape: ``(batch, seq_len, input_size)`` (batch first; for digits, the 8 image
    rows are the 8 time steps). Output: ``(batch, num_classes)`` logits.
    """


class RNNClassifier(_RecurrentClassifier):
    __doc__ = ("Elman RNN (``nn.RNN``, tanh by default) over the sequence, then ``Linear`` "
               "on the last hidden state." + _INPUT_DOC)

    def __init__(self, input_size: int = 8, seq_len: int = 8, hidden_size: int = 64,
                 num_layers: int = 1, num_classes: int = 10,
                 nonlinearity: str = "tanh") -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(nn.RNN, input_size, seq_len, hidden_size, num_layers, num_classes,
                         nonlinearity=nonlinearity)


class LSTMClassifier(_RecurrentClassifier):
    __doc__ = "``nn.LSTM`` over the sequence, then ``Linear`` on the last hidden state." + \
        _INPUT_DOC

    def __init__(self, input_size: int = 8, seq_len: int = 8, hidden_size: int = 64,
                 num_layers: int = 1, num_classes: int = 10) -> None:
        super().__init__(nn.LSTM, input_size, seq_len, hidden_size, num_layers, num_classes)


class GRUClassifier(_RecurrentClassifier):
    __doc__ = "``nn.GRU`` over the sequence, then ``Linear`` on the last hidden state." + \
        _INPUT_DOC

    def __init__(self, input_size: int = 8, seq_len: int = 8, hidden_size: int = 64,
                 num_layers: int = 1, num_classes: int = 10) -> None:
        super().__init__(nn.GRU, input_size, seq_len, hidden_size, num_layers, num_classes)
