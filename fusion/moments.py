"""What the clients tell the server about their inputs, and the synthetic inputs the
server draws from it, so that the distillation (:mod:`.distillation`) needs no data.

Clients send the per-feature mean and variance of their training inputs, their
leading principal components, and optionally the moments per class
(:func:`input_moments`); the server pools them (:func:`pool_moments`) and draws Gaussian
inputs from them, correlated along the components, or class by class when it has
per-class moments (:func:`synthetic_inputs`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .robust import weighted_median

MIN_CLASS_EXAMPLES = 10
"""Fewest examples of a class whose moments a client describes: the mean of fewer would
come too close to revealing single examples."""

MIN_EXAMPLES_PER_COMPONENT = 10
"""A client describes at most one principal component of its inputs per this many
examples, for the same reason."""

POOLED_COMPONENTS = 64
"""Most principal components the pooled moments keep (the leading ones of the clients'
mixture)."""

_DIRECT_LIMIT = 4096
"""Largest side of a Gram matrix decomposed exactly; past it, a seeded randomised SVD."""


class InputMoments(NamedTuple):
    """Per-feature mean and (population) variance of a set of model inputs; both have
    the shape of one input. Optionally the same per class: ``class_mean`` and
    ``class_var`` of shape ``(classes, *input_shape)``, and ``class_count``, the weight
    of each class (its number of examples; 0 for a class not described, whose rows are
    zeros). Optionally ``components``, of shape ``(r, *input_shape)``: the inputs'
    leading principal directions, each scaled by the standard deviation along it, so
    that the inputs' covariance is about ``components.flatten(1).T @
    components.flatten(1)`` plus a diagonal (the rest of ``var``)."""

    mean: torch.Tensor
    var: torch.Tensor
    class_mean: torch.Tensor | None = None
    class_var: torch.Tensor | None = None
    class_count: torch.Tensor | None = None
    components: torch.Tensor | None = None


def input_moments(inputs: torch.Tensor, labels: torch.Tensor | None = None,
                  num_classes: int | None = None,
                  min_class_examples: int = MIN_CLASS_EXAMPLES,
                  components: int = 0) -> InputMoments:
    """The moments of a batch of inputs ``(N, *input_shape)``, over the batch; with
    ``labels`` (N class indices below ``num_classes``), also per class, for the classes
    with at least ``min_class_examples`` examples; and up to ``components`` principal
    components (:func:`principal_components`)."""
    if inputs.ndim < 2 or inputs.shape[0] == 0:
        raise ValueError(f"need a non-empty batch (N, *input_shape), got {tuple(inputs.shape)}")
    x = inputs.detach().double()
    overall = InputMoments(x.mean(dim=0).float(), x.var(dim=0, unbiased=False).float(),
                           components=principal_components(x, components))
    if labels is None:
        return overall
    if num_classes is None or labels.shape != (len(x),):
        raise ValueError("per-class moments need one label per input and num_classes")
    count = torch.bincount(labels.long(), minlength=num_classes)[:num_classes]
    mean = torch.zeros((num_classes, *x.shape[1:]), dtype=torch.float64)
    var = torch.zeros_like(mean)
    described = count >= max(min_class_examples, 1)
    for c in torch.nonzero(described).flatten().tolist():
        rows = x[labels == c]
        mean[c], var[c] = rows.mean(dim=0), rows.var(dim=0, unbiased=False)
    return overall._replace(class_mean=mean.float(), class_var=var.float(),
                            class_count=torch.where(described, count, 0).float())


def principal_components(inputs: torch.Tensor, count: int) -> torch.Tensor | None:
    """The ``count`` leading principal components of a batch ``(N, *input_shape)``, each
    scaled by the standard deviation along it, as ``(r, *input_shape)`` float32; fewer
    (one per :data:`MIN_EXAMPLES_PER_COMPONENT` examples, none beyond the data's rank),
    and None when that leaves none."""
    count = min(count, len(inputs) // MIN_EXAMPLES_PER_COMPONENT)
    if count <= 0:
        return None
    flat = inputs.reshape(len(inputs), -1).double()
    found = leading_components((flat - flat.mean(dim=0)) / math.sqrt(len(flat)), count)
    return None if found is None else found.float().reshape(-1, *inputs.shape[1:])


def leading_components(rows: torch.Tensor, count: int) -> torch.Tensor | None:
    """The ``count`` leading eigenvectors of ``rows.T @ rows`` (M x D rows), each scaled
    by the square root of its eigenvalue, as ``(r, D)`` rows, r <= count (eigenvalues
    that vanish are dropped); None when none is left. Exact through the smaller Gram
    matrix up to :data:`_DIRECT_LIMIT`, else a randomised SVD with a fixed seed."""
    if min(rows.shape) <= _DIRECT_LIMIT:
        by_rows = rows.shape[0] <= rows.shape[1]
        values, vectors = torch.linalg.eigh(rows @ rows.T if by_rows else rows.T @ rows)
        values, vectors = values.flip(0)[:count], vectors.flip(1)[:, :count]
        scaled = ((rows.T @ vectors).T if by_rows
                  else values.clamp_min(0).sqrt()[:, None] * vectors.T)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            _, singular, right = torch.svd_lowrank(rows, q=min(count + 8, *rows.shape))
        values = singular[:count].square()
        scaled = singular[:count, None] * right[:, :count].T
    keep = values > max(float(values[0]), 0.0) * 1e-12
    return scaled[keep] if bool(keep.any()) else None


def pool_moments(moments: Sequence[InputMoments], weights: Sequence[float],
                 outlier_factor: float | None = 3.0) -> InputMoments:
    """The moments of the union of the clients' inputs, each client weighted by
    ``weights`` (e.g. its number of examples): the mixture's mean and variance.

    With ``outlier_factor``, a client whose inputs spread around the clients' median
    mean more than ``outlier_factor`` times the median client's spread (root mean
    square over the features of ``var + (mean - median)**2``) is first shrunk towards
    the median to that spread, so that one client with extreme but well-formed moments
    cannot widen everyone's synthetic inputs (see ``benchmarks/byzantine.py``). Clients
    of one data distribution spread alike and are left as they are (label-skewed splits
    lose nothing); a client whose every feature is shifted by three standard deviations
    is shrunk too. None pools exactly.
    """
    if not moments or len(moments) != len(weights):
        raise ValueError("need one weight per set of moments, and at least one")
    shapes = {tuple(m.mean.shape) for m in moments} | {tuple(m.var.shape) for m in moments}
    if len(shapes) != 1:
        raise ValueError(f"input moments of different shapes: {sorted(shapes)}")
    w = torch.as_tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    means, variances, shrink = _shrunk([m.mean for m in moments], [m.var for m in moments],
                                       w, outlier_factor)
    mean, var = _mixed(means, variances, w)
    pooled = InputMoments(mean, var, components=_pooled_components(moments, w, means,
                                                                   shrink, mean))
    described = [k for k, m in enumerate(moments) if m.class_mean is not None]
    if not described:
        return pooled
    return pooled._replace(**_pool_classes([moments[k] for k in described], w[described],
                                           outlier_factor))


def _shrunk(means: Sequence[torch.Tensor], variances: Sequence[torch.Tensor],
            w: torch.Tensor, outlier_factor: float | None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clients' means and variances (stacked, float64) with the outliers shrunk
    towards the median (see :func:`pool_moments`), and each client's factor (1: as
    sent)."""
    means = torch.stack([m.double() for m in means])
    variances = torch.stack([v.double() for v in variances])
    shrink = torch.ones(len(means), dtype=torch.float64)
    if outlier_factor is not None:
        shape = (-1,) + (1,) * (means.ndim - 1)
        center = weighted_median(means, w)
        spread = (variances + (means - center).square()).flatten(1).mean(dim=1).sqrt()
        limit = outlier_factor * weighted_median(spread, w)
        shrink = torch.where(spread > limit, limit / spread, shrink)
        means = center + shrink.view(shape) * (means - center)
        variances = shrink.view(shape).square() * variances
    return means, variances, shrink


def _mixture(means: Sequence[torch.Tensor], variances: Sequence[torch.Tensor],
             w: torch.Tensor, outlier_factor: float | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of the ``w``-weighted mixture, outliers shrunk first (see
    :func:`pool_moments`)."""
    return _mixed(*_shrunk(means, variances, w, outlier_factor)[:2], w)


def _mixed(means: torch.Tensor, variances: torch.Tensor, w: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance (float32) of the ``w``-weighted mixture of the stacked
    ``means`` and ``variances``."""
    shape = (-1,) + (1,) * (means.ndim - 1)
    mean = (w.view(shape) * means).sum(dim=0)
    second = (w.view(shape) * (variances + means.square())).sum(dim=0)
    return mean.float(), (second - mean.square()).clamp_min(0).float()


def _pooled_components(moments: Sequence[InputMoments], w: torch.Tensor,
                       means: torch.Tensor, shrink: torch.Tensor, mean: torch.Tensor
                       ) -> torch.Tensor | None:
    """The leading :data:`POOLED_COMPONENTS` components of the ``w``-weighted mixture's
    covariance, less the diagonals the clients' components leave out: every client's
    components and its (shrunk, :func:`_shrunk`) mean's offset from the pooled ``mean``,
    times the square root of its weight (and its outlier ``shrink``, as its variances
    are). None when no client sent components (a diagonal is then all there is)."""
    if all(m.components is None for m in moments):
        return None
    rows = []
    for k, m in enumerate(moments):
        root = math.sqrt(float(w[k]))
        if m.components is not None:
            rows.append(root * float(shrink[k]) * m.components.double().flatten(1))
        rows.append(root * (means[k] - mean.double()).flatten()[None])
    found = leading_components(torch.cat(rows), POOLED_COMPONENTS)
    return None if found is None else found.float().reshape(-1, *mean.shape)


def _pool_classes(moments: Sequence[InputMoments], w: torch.Tensor,
                  outlier_factor: float | None) -> dict[str, torch.Tensor]:
    """The per-class moments pooled over the clients that describe each class, a
    client weighing ``w`` times its share of the class among its own examples (so that
    claimed class counts weigh no more than the client's capped weight)."""
    shapes = {tuple(m.class_mean.shape) for m in moments}
    if len(shapes) != 1:
        raise ValueError(f"per-class input moments of different shapes: {sorted(shapes)}")
    counts = torch.stack([m.class_count.double() for m in moments])
    share = w[:, None] * counts / counts.sum(dim=1, keepdim=True).clamp_min(1e-300)
    mean = torch.zeros_like(moments[0].class_mean)
    var = torch.zeros_like(mean)
    for c in torch.nonzero(share.sum(dim=0) > 0).flatten().tolist():
        who = torch.nonzero(share[:, c] > 0).flatten().tolist()
        mean[c], var[c] = _mixture([moments[k].class_mean[c] for k in who],
                                   [moments[k].class_var[c] for k in who],
                                   share[who, c] / share[who, c].sum(), outlier_factor)
    return {"class_mean": mean, "class_var": var, "class_count": share.sum(dim=0).float()}


def synthetic_inputs(moments: InputMoments, num_samples: int,
                     generator: torch.Generator, correlated: float = 1.0) -> torch.Tensor:
    """``num_samples`` inputs drawn feature by feature from N(mean, var); with per-class
    moments, class by class instead: each input's class first (with probability
    proportional to ``class_count``), then its features from that class's
    N(class_mean, class_var). Without per-class moments but with ``components``, the
    first ``correlated`` share of the inputs are correlated as the data are: ``mean + z
    @ components`` (z standard normal) plus independent noise of the variance the
    components leave out."""
    if moments.class_mean is None or not bool((moments.class_count > 0).any()):
        along = (0 if moments.components is None
                 else min(num_samples, max(0, round(correlated * num_samples))))
        if along:
            first = _correlated_inputs(moments, along, generator)
            if along == num_samples:
                return first
            noise = torch.randn((num_samples - along, *moments.mean.shape),
                                generator=generator)
            return torch.cat([first, moments.mean + moments.var.sqrt() * noise])
        mean, std = moments.mean, moments.var.sqrt()
    else:
        classes = torch.multinomial(moments.class_count.double(), num_samples,
                                    replacement=True, generator=generator)
        mean, std = moments.class_mean[classes], moments.class_var[classes].sqrt()
    noise = torch.randn((num_samples, *moments.mean.shape), generator=generator)
    return mean + std * noise


def mixture_inputs(moments: Sequence[InputMoments], weights: Sequence[float],
                   num_samples: int, generator: torch.Generator, correlated: float = 1.0,
                   outlier_factor: float | None = 3.0) -> torch.Tensor:
    """``num_samples`` inputs drawn from the mixture of the clients' Gaussians: each
    input's client first (with probability proportional to ``weights``), then the input
    from that client's moments (:func:`synthetic_inputs`; per-class moments are not
    used), in a random order. Outliers are first shrunk towards the median as
    :func:`pool_moments` shrinks them."""
    if not moments or len(moments) != len(weights):
        raise ValueError("need one weight per set of moments, and at least one")
    if num_samples == 0:
        return torch.empty((0, *moments[0].mean.shape))
    w = torch.as_tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    means, variances, shrink = _shrunk([m.mean for m in moments], [m.var for m in moments],
                                       w, outlier_factor)
    counts = torch.bincount(torch.multinomial(w, num_samples, replacement=True,
                                              generator=generator), minlength=len(moments))
    drawn = [synthetic_inputs(InputMoments(
        means[k].float(), variances[k].float(),
        components=None if m.components is None
        else (float(shrink[k]) * m.components.double()).float()),
        int(counts[k]), generator, correlated)
        for k, m in enumerate(moments) if counts[k] > 0]
    inputs = torch.cat(drawn)
    return inputs[torch.randperm(num_samples, generator=generator)]


def _correlated_inputs(moments: InputMoments, num_samples: int,
                       generator: torch.Generator) -> torch.Tensor:
    """Gaussian inputs of covariance ``components`` (flattened) ``.T @ components`` plus
    the diagonal ``var`` less its diagonal (where positive)."""
    components = moments.components.flatten(1)
    rest = (moments.var.flatten() - components.square().sum(dim=0)).clamp_min(0).sqrt()
    z = torch.randn((num_samples, len(components)), generator=generator)
    noise = torch.randn((num_samples, components.shape[1]), generator=generator)
    return moments.mean + (z @ components + rest * noise).reshape(num_samples,
                                                                  *moments.mean.shape)
