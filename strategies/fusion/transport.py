"""Optimal transport solvers with one signature: ``(cost, a, b, config) -> plan``.

``cost`` is an (n, m) tensor, ``a`` and ``b`` the source and target marginals; the plan
is an (n, m) tensor on the cost's device with total mass 1.
"""

from __future__ import annotations

import ot
import torch
from scipy.optimize import linear_sum_assignment

from .config import FusionConfig


def exact_plan(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               config: FusionConfig) -> torch.Tensor:
    """Exact OT: a linear assignment for uniform square problems, else network simplex."""
    n, m = cost.shape
    if n == m and _is_uniform(a) and _is_uniform(b):
        rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
        plan = torch.zeros_like(cost)
        index = torch.as_tensor(rows, device=cost.device), torch.as_tensor(cols, device=cost.device)
        plan[index] = 1.0 / n
        return plan
    return ot.emd(a, b, cost)


def sinkhorn_plan(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  config: FusionConfig) -> torch.Tensor:
    """Entropic OT (log-domain Sinkhorn); ``config.reg`` is relative to the largest cost."""
    scale = cost.max().clamp_min(torch.finfo(cost.dtype).tiny)
    return ot.sinkhorn(
        a, b, cost / scale, config.reg, method="sinkhorn_log",
        numItermax=config.sinkhorn_max_iter, stopThr=1e-9, warn=False,
    )


SOLVERS = {"exact": exact_plan, "sinkhorn": sinkhorn_plan}


def transport_plan(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   config: FusionConfig) -> torch.Tensor:
    """Solve OT between marginals ``a`` and ``b`` with the solver named in ``config``."""
    return SOLVERS[config.solver](cost, a, b, config)


def _is_uniform(weights: torch.Tensor) -> bool:
    return bool(torch.allclose(weights, weights[0].expand_as(weights)))
