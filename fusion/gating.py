"""Which client knows an input: each client's Gaussian density at the synthetic inputs,
from the input moments it sent (:class:`~.moments.InputMoments`: mean, variance,
principal components), turned into per-input weights of the distillation's teachers
(``DistillationConfig.teacher = "gated"``).

Under label skew a client is confidently wrong on the classes it never saw, and its
input moments say which inputs it saw the like of. Each input's weights are a softmax
over the clients of their log-weights plus their log-densities there, as a mixture of
experts gates by each expert's density. They are then balanced: every client's mean
weight over the inputs is held to its share of the weights, so that moments claimed
broad, likely everywhere, win a client no more inputs than its weight would; in
exchange, every client keeps that share, on the inputs where it is likeliest
relative to the others, however unlikely they are for it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from .moments import InputMoments

GATE_TEMPERATURE = 0.1
"""Mean log-density per input feature that divides a client's vote by e (measured on
the digits and Fashion-MNIST: README, "Fusion quality")."""
VARIANCE_FLOOR = 0.3
"""Variance added to every feature of every client's Gaussian, times the variance of the
clients' pooled inputs: a feature that a client never saw vary (a blank border pixel)
would otherwise rule out every input where it is not exactly the client's mean, and a
client of a few examples would claim only the inputs next to them."""

BALANCING_ITERATIONS, BALANCING_TOL = 1000, 1e-6
"""Most Sinkhorn iterations of balanced gates, and the largest gap left between a
client's mean gate and its weight."""


def log_densities(moments: Sequence[InputMoments], inputs: torch.Tensor, floor: float
                  ) -> torch.Tensor:
    """(clients, inputs) mean log-density per feature of every input under every
    client's Gaussian (up to a constant): covariance ``components.T @ components`` plus
    the variance they leave out, plus ``floor`` on the diagonal (float64)."""
    flat = inputs.flatten(1).double()

    def like(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(flat.device, flat.dtype)

    out = []
    for m in moments:
        centred = flat - like(m.mean.flatten())
        var = like(m.var.flatten())
        components = None if m.components is None else like(m.components.flatten(1))
        rest = var if components is None else (var - components.square().sum(dim=0))
        diagonal = rest.clamp_min(0) + floor
        quadratic = (centred.square() / diagonal).sum(dim=1)
        log_det = diagonal.log().sum()
        if components is not None:  # Woodbury, through the (r, r) capacitance matrix
            scaled = components / diagonal
            factor = torch.linalg.cholesky(like(torch.eye(len(components)))
                                           + scaled @ components.T)
            projected = centred @ scaled.T
            quadratic = quadratic - (projected * torch.cholesky_solve(
                projected.T, factor).T).sum(dim=1)
            log_det = log_det + 2 * factor.diagonal().log().sum()
        out.append(-0.5 * (quadratic + log_det) / flat.shape[1])
    return torch.stack(out)


def gates(moments: Sequence[InputMoments], weights: Sequence[float], pooled_variance: float,
          inputs: torch.Tensor, temperature: float = GATE_TEMPERATURE,
          floor: float = VARIANCE_FLOOR, balanced: bool = True) -> torch.Tensor:
    """(inputs, clients) teacher weights, each row summing to one: the softmax over the
    clients of ``log weight + l / temperature``, ``l`` being the client's
    :func:`log_densities` at the input, with a floor of ``floor`` times
    ``pooled_variance``, the variance of the clients' pooled inputs averaged over the
    features (as :func:`~.moments.pool_moments` pools them, outliers shrunk, so that no
    one client's moments can widen every client's Gaussian). ``balanced`` (Sinkhorn):
    each client's log-weight shifted until its mean weight over the inputs is its share
    of ``weights`` (a warning if that takes more than :data:`BALANCING_ITERATIONS`)."""
    w = torch.as_tensor(weights, dtype=torch.float64, device=inputs.device)
    w = w / w.sum()
    logs = log_densities(moments, inputs, floor * max(pooled_variance, 1e-12))
    scores = w.log()[:, None] + logs / temperature
    gated = torch.softmax(scores, dim=0)
    for _ in range(BALANCING_ITERATIONS if balanced else 0):
        if float((gated.mean(dim=1) - w).abs().max()) <= BALANCING_TOL:
            break
        shift = w.log() - gated.mean(dim=1).clamp_min(1e-300).log()
        scores = scores + torch.where(w > 0, shift, 0.0)[:, None]  # a weight of 0 stays 0
        gated = torch.softmax(scores, dim=0)
    else:
        if balanced:
            warnings.warn(f"the teachers' gates are not balanced after {BALANCING_ITERATIONS}"
                          " iterations", stacklevel=2)
    return gated.T.contiguous()

