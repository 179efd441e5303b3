"""A slow, direct re-implementation of the fusion engine for plain MLPs (test oracle).

Nothing here is shared with ``otfusion.strategies``: the engine computes its ground cost
by expansion and applies couplings through axis specs; this module writes every step
out with dense matrices and materialises the full 4-D tensor of squared differences
that the engine never builds. It follows the engine's conventions, restated:

* Layers (groups) are solved in order; the output layer keeps class identity.
* Client ``k``'s plan ``pi`` for a layer is (fused width n) x (client width m) with
  uniform marginals. A neuron's own axis (rows of its weight, its bias) is mapped with
  ``A = pi / pi.sum(1)`` (averaging); a consumer's input axis with ``G = pi / pi.sum(0)``
  (mass preserving). A bias is one more input column coupled by the identity.
* Ground cost between fused support row ``a`` (fused input coordinates) and client
  neuron ``b`` (client coordinates): ``C[a, b] = sum_{j,j'} Gamma[j, j'] (B[a, j] -
  W[b, j'])^2`` with ``Gamma = blockdiag(G_prev, 1)`` (identity for the first layer).
* Free-support barycenter: ``B`` starts from the reference client's rows in fused input
  coordinates (``W Gamma^T``), resampled with ``round(linspace(0, m - 1, n))`` when the
  widths differ; then repeat: one OT plan per client on ``C``, ``B <- sum_k lambda_k
  A_k W_k Gamma_k^T``, until the relative change of ``B`` is <= ``tol`` or ``max_iter``.
  With ``support_clients`` S < K, only the S clients of largest weight (first ones on
  ties) move ``B``, with their weights renormalised; then one more OT plan per client,
  for all K clients, to the final ``B``.
* The fused tensors of a layer are ``sum_k lambda_k A_k W_k Gamma_k^T`` with the last
  plans (``A = identity`` for the output layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import ot
import torch
from torch import nn


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The Linear layers of an MLP in forward order (the last one is the output layer)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def augmented(layer: nn.Linear) -> np.ndarray:
    """``[W | b]``: one row per neuron, the bias as the last column (float64)."""
    weight = layer.weight.detach().double().numpy()
    bias = layer.bias.detach().double().numpy()[:, None]
    return np.concatenate([weight, bias], axis=1)


def normalized_weights(weights: Sequence[float] | None, count: int) -> np.ndarray:
    lam = np.ones(count) if weights is None else np.asarray(weights, dtype=np.float64)
    return lam / lam.sum()


def reference_index(lam: np.ndarray) -> int:
    """The client with the largest weight, the first one on ties."""
    return int(np.flatnonzero(lam == lam.max())[0])


def resample_index(m: int, n: int) -> np.ndarray:
    """Rows of a width-``m`` client used to start a width-``n`` support."""
    return np.round(np.linspace(0, m - 1, n)).astype(np.int64)


def materialised_cost(support: np.ndarray, rows: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """``C[a, b] = sum_{j, j'} gamma[j, j'] (support[a, j] - rows[b, j'])^2`` through the
    full (n, m, n_in, m_in) tensor of squared differences."""
    diff = support[:, None, :, None] - rows[None, :, None, :]
    return np.einsum("abjk,jk->ab", diff**2, gamma)


def exact_plan(cost: np.ndarray) -> np.ndarray:
    n, m = cost.shape
    return ot.emd(np.full(n, 1.0 / n), np.full(m, 1.0 / m), cost)


def sinkhorn_plan(cost: np.ndarray, reg: float, max_iter: int = 2000) -> np.ndarray:
    """Log-domain Sinkhorn, ``reg`` relative to the largest cost entry."""
    n, m = cost.shape
    return ot.sinkhorn(np.full(n, 1.0 / n), np.full(m, 1.0 / m), cost / cost.max(), reg,
                       method="sinkhorn_log", numItermax=max_iter, stopThr=1e-9, warn=False)


def neuron_map(plan: np.ndarray) -> np.ndarray:
    return plan / plan.sum(axis=1, keepdims=True)


def input_map(plan: np.ndarray) -> np.ndarray:
    return plan / plan.sum(axis=0, keepdims=True)


def block_diag_one(matrix: np.ndarray) -> np.ndarray:
    """``blockdiag(matrix, 1)``: the bias column coupled by the identity."""
    n, m = matrix.shape
    out = np.zeros((n + 1, m + 1))
    out[:n, :m] = matrix
    out[n, m] = 1.0
    return out


def reference_fuse_mlp(models: Sequence[nn.Module], weights: Sequence[float] | None,
                       target_widths: Sequence[int], *, max_iter: int, tol: float,
                       solver: str = "exact", reg: float = 0.01,
                       support_clients: int | None = None) -> dict[str, np.ndarray]:
    """Fused ``{layer.weight, layer.bias}`` of MLPs (Linear layers with biases, the last
    one the output layer) into hidden widths ``target_widths``."""
    lam = normalized_weights(weights, len(models))
    ref = reference_index(lam)
    layers = [linear_layers(m) for m in models]
    names = [name for name, _ in layers[0]]
    assert len(target_widths) == len(names) - 1
    in_features = layers[0][0][1].in_features
    input_maps = [np.eye(in_features) for _ in models]  # G of the previous layer, per client
    fused: dict[str, np.ndarray] = {}
    for index, name in enumerate(names):
        rows = [augmented(client[index][1]) for client in layers]  # client coordinates
        gammas = [block_diag_one(g) for g in input_maps]
        mapped = [r @ g.T for r, g in zip(rows, gammas, strict=True)]  # fused input coords
        if index == len(names) - 1:  # output layer: classes keep their identity
            result = sum(w * x for w, x in zip(lam, mapped, strict=True))
        else:
            n = target_widths[index]
            support = mapped[ref][resample_index(mapped[ref].shape[0], n)]

            def plans_to(support, clients, rows=rows, gammas=gammas):
                return [exact_plan(materialised_cost(support, rows[k], gammas[k]))
                        if solver == "exact" else
                        sinkhorn_plan(materialised_cost(support, rows[k], gammas[k]), reg)
                        for k in clients]

            shapers = sorted(np.argsort(-lam, kind="stable")[:support_clients or len(lam)])
            shaper_lam = lam[shapers] / lam[shapers].sum()
            for _ in range(max_iter):
                shaper_plans = plans_to(support, shapers)
                updated = sum(w * neuron_map(p) @ mapped[k]
                              for w, p, k in zip(shaper_lam, shaper_plans, shapers, strict=True))
                shift = np.linalg.norm(updated - support) / np.linalg.norm(support)
                support = updated
                if shift <= tol:
                    break
            plans = (shaper_plans if len(shapers) == len(lam)
                     else plans_to(support, range(len(lam))))
            result = sum(w * neuron_map(p) @ x for w, p, x in zip(lam, plans, mapped,
                                                                  strict=True))
            input_maps = [input_map(p) for p in plans]
        fused[f"{name}.weight"] = result[:, :-1]
        fused[f"{name}.bias"] = result[:, -1]
    return fused


def pot_first_layer_barycenter(models: Sequence[nn.Module], weights: Sequence[float] | None,
                               width: int, *, max_iter: int) -> np.ndarray:
    """POT's free-support barycenter of the clients' first-layer ``[W | b]`` rows,
    started from the reference client's rows (resampled to ``width``)."""
    lam = normalized_weights(weights, len(models))
    rows = [augmented(linear_layers(m)[0][1]) for m in models]
    start = rows[reference_index(lam)]
    return ot.lp.free_support_barycenter(
        measures_locations=rows,
        measures_weights=[np.full(r.shape[0], 1.0 / r.shape[0]) for r in rows],
        X_init=start[resample_index(start.shape[0], width)],
        b=np.full(width, 1.0 / width),
        weights=lam,
        numItermax=max_iter,
        stopThr=1e-24,
    )


def weighted_average_state(models: Sequence[nn.Module],
                           weights: Sequence[float] | None) -> dict[str, torch.Tensor]:
    """Coordinate-wise weighted average of the floating tensors (FedAvg)."""
    lam = normalized_weights(weights, len(models))
    states = [m.state_dict() for m in models]
    return {
        key: sum(float(w) * s[key].double() for w, s in zip(lam, states, strict=True))
        for key, tensor in states[0].items() if tensor.is_floating_point()
    }
