"""Linear mode connectivity: the loss and accuracy barrier on the segment between two
models, before and after aligning the second one to the first (:func:`align`).

Along ``theta(t) = (1 - t) theta_a + t theta_b`` every floating tensor of the state_dict
is interpolated, BatchNorm running statistics included (``batchnorm="interpolate"``,
the default: deterministic, needs no data, and is what fusion does with them), or the
running statistics of ``theta(t)`` are reset and recomputed on the evaluation data
(``batchnorm="recompute"``; interpolated statistics misstate the variance of the
interpolated network and overstate its barrier; the endpoints are re-estimated too,
so every point is measured alike). Integer buffers come from ``a``.

Sign convention: a barrier is the largest excess of the interpolated model over the
straight line between the endpoint values, positive when the path is worse:

- loss barrier ``max_t loss(t) - ((1 - t) loss(0) + t loss(1))``;
- accuracy barrier ``max_t ((1 - t) acc(0) + t acc(1)) - acc(t)``.

Both are >= 0 (the endpoints contribute 0) and 0 when the models are linearly mode
connected.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from otfusion.fusion import FusionConfig, align
from otfusion.task.data import TensorData
from otfusion.task.training import evaluate, model_inputs

BatchNormMode = Literal["interpolate", "recompute"]


@dataclass(frozen=True)
class InterpolationCurve:
    """Loss and accuracy of ``theta(t)`` at each ``t`` (from 0 to 1)."""

    t: tuple[float, ...]
    loss: tuple[float, ...]
    accuracy: tuple[float, ...]

    @property
    def loss_barrier(self) -> float:
        return max(value - line for value, line in zip(self.loss, self._line(self.loss),
                                                        strict=True))

    @property
    def accuracy_barrier(self) -> float:
        return max(line - value for value, line in zip(
            self.accuracy, self._line(self.accuracy), strict=True))

    def _line(self, values: tuple[float, ...]) -> list[float]:
        """The straight line between the endpoint values (exact at both ends)."""
        ends = torch.tensor([values[0], values[-1]], dtype=torch.float64)
        return torch.lerp(ends[0], ends[1], torch.tensor(self.t, dtype=torch.float64)).tolist()

    def as_dict(self) -> dict:
        return {**asdict(self), "loss_barrier": self.loss_barrier,
                "accuracy_barrier": self.accuracy_barrier}


@dataclass(frozen=True)
class BarrierReport:
    """The path from ``a`` to ``b`` (``before``) and to ``align(b, a)`` (``after``)."""

    before: InterpolationCurve
    after: InterpolationCurve
    aligned: nn.Module

    def as_dict(self) -> dict:
        return {"before": self.before.as_dict(), "after": self.after.as_dict()}


def interpolate(a: nn.Module, b: nn.Module, t: float, data: TensorData | None = None,
                batchnorm: BatchNormMode = "interpolate") -> nn.Module:
    """A copy of ``a`` holding ``(1 - t) a + t b`` (exactly ``a`` at 0 and ``b`` at 1);
    ``batchnorm="recompute"`` re-estimates BatchNorm running statistics on ``data``."""
    if batchnorm not in ("interpolate", "recompute"):
        raise ValueError(f"batchnorm must be 'interpolate' or 'recompute', got {batchnorm!r}")
    end = b.state_dict()
    state = {name: torch.lerp(tensor, end[name].to(tensor.dtype), t)
             if tensor.is_floating_point() else tensor
             for name, tensor in a.state_dict().items()}
    model = copy.deepcopy(a)
    model.load_state_dict(state)
    if batchnorm == "recompute":
        if data is None:
            raise ValueError("batchnorm='recompute' needs the data to recompute statistics on")
        recompute_batchnorm(model, data)
    return model.eval()


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, data: TensorData, batch_size: int = 512) -> None:
    """Reset every BatchNorm's running statistics and set them to the exact mean and
    (unbiased) variance over ``data``; other modules stay in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    model.eval()
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches
        norm.train()
    try:
        device = next(model.parameters()).device
        x = model_inputs(model, data)
        for chunk in torch.tensor_split(x, math.ceil(len(data) / batch_size)):
            model(chunk.to(device))
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.eval()


def interpolation_curve(a: nn.Module, b: nn.Module, data: TensorData, steps: int = 11,
                        batchnorm: BatchNormMode = "interpolate") -> InterpolationCurve:
    """Loss and accuracy on ``data`` at ``steps`` evenly spaced points from ``a`` to ``b``."""
    if steps < 2:
        raise ValueError(f"steps must be at least 2 (the endpoints), got {steps}")
    ts = tuple(i / (steps - 1) for i in range(steps))
    results = [evaluate(interpolate(a, b, t, data, batchnorm), data) for t in ts]
    return InterpolationCurve(ts, tuple(r[0] for r in results), tuple(r[1] for r in results))


def interpolation_barrier(a: nn.Module, b: nn.Module, data: TensorData, steps: int = 11,
                          batchnorm: BatchNormMode = "interpolate",
                          config: FusionConfig | None = None,
                          inputs: torch.Tensor | None = None) -> BarrierReport:
    """The interpolation curves from ``a`` to ``b`` and from ``a`` to ``align(b, a)``
    (``config``, ``inputs``: see :func:`align`), with their barriers."""
    aligned = align(b, a, config, inputs).eval()
    return BarrierReport(
        before=interpolation_curve(a, b, data, steps, batchnorm),
        after=interpolation_curve(a, aligned, data, steps, batchnorm),
        aligned=aligned,
    )
