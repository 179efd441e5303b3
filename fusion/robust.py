"""Defences against hostile but well-formed clients (f of K, f < K/2, possibly colluding).

- :func:`cap_weights`: no client's claimed weight (``num-examples``) may exceed a
  multiple of the median claim; :func:`clip_norms`: nor may its tensors' norms exceed a
  multiple of the median client's, in the averages.
- :func:`flat_predictions`, :func:`misclassifying_clients` and
  :func:`prediction_outliers`: function-space screening. The clients' predictions on
  the same inputs (:func:`client_probabilities`) do not depend on how their hidden
  units are ordered, so clients can be compared before any alignment. Excluded are: a
  client whose predictions hardly depend on its input (a dead network, whose share of
  any average kills the fused one's units); one that misclassifies the class probes
  (:func:`class_probes`: inputs that the clients claiming a class agree belong to it)
  of the classes it claims; and one that disagrees with the others far more than they
  disagree among themselves.
- :func:`robust_mean`: the weighted mean, trimmed mean or median over clients, used in
  aligned coordinates (after the couplings) where coordinate-wise statistics mean
  something: by the barycenter's support update and by the final averaging.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .modes import class_logits, temporary_mode

Combine = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor | float]], torch.Tensor]
"""``combine(values, weights)``: the clients' tensors combined into one, e.g.
``functools.partial(robust_mean, how="median")``."""

_MAD_TO_SIGMA = 1.4826  # the MAD of a normal distribution is 0.6745 sigma


def weighted_median(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted median over the first axis (the lower one on a tie); ``weights``
    has one entry per row, or the shape of ``values``."""
    ordered, order = values.sort(dim=0)
    cumulative = _reordered(weights, order, values).cumsum(dim=0)
    total = cumulative[-1:]
    index = (cumulative < 0.5 * total).sum(dim=0, keepdim=True)
    return ordered.gather(0, index.clamp_max(len(values) - 1)).squeeze(0)


def weighted_trimmed_mean(values: torch.Tensor, weights: torch.Tensor,
                          trim: float) -> torch.Tensor:
    """The weighted mean over the first axis of the values left after removing the
    ``trim`` share of the weight from each end, coordinate by coordinate (a client
    straddling a cut counts with the part of its weight inside)."""
    ordered, order = values.sort(dim=0)
    w = _reordered(weights, order, values)
    w = w / w.sum(dim=0, keepdim=True)
    upper = w.cumsum(dim=0)
    lower = upper - w
    kept = (upper.clamp(max=1 - trim) - lower.clamp(min=trim)).clamp_min(0)
    return (kept * ordered).sum(dim=0) / kept.sum(dim=0).clamp_min(1e-300)


def weighted_mean(values: Sequence[torch.Tensor], weights: Sequence[torch.Tensor | float]
                  ) -> torch.Tensor:
    """The weighted sum of the clients' ``values`` (weights summing to one), accumulated
    in place."""
    total = None
    for w, v in zip(weights, values, strict=True):
        term = v * w
        total = term if total is None else total.add_(term)
    return total


def robust_mean(values: Sequence[torch.Tensor], weights: Sequence[torch.Tensor | float],
                how: str = "mean", trim: float = 0.25) -> torch.Tensor:
    """The clients' ``values`` (one tensor each, same shape) combined with ``weights``
    (numbers, or tensors broadcastable to the values) by ``how``: ``mean``
    (:func:`weighted_mean`), ``trimmed-mean`` or ``median``."""
    if how == "mean":
        return weighted_mean(values, weights)
    stacked = torch.stack(list(values))
    factors = torch.stack([torch.as_tensor(w, dtype=stacked.dtype, device=stacked.device)
                           .expand_as(stacked[0]) for w in weights])
    if how == "median":
        return weighted_median(stacked, factors)
    if how == "trimmed-mean":
        return weighted_trimmed_mean(stacked, factors, trim)
    raise ValueError(f"unknown aggregate {how!r}: 'mean', 'trimmed-mean' or 'median'")


def _reordered(weights: torch.Tensor, order: torch.Tensor, values: torch.Tensor
               ) -> torch.Tensor:
    weights = weights.to(values.dtype)
    if weights.dim() == 1:
        weights = weights.view((-1,) + (1,) * (values.dim() - 1)).expand_as(values)
    return weights.gather(0, order)


def cap_weights(weights: Sequence[float], ratio: float | None
                ) -> tuple[list[float], list[int]]:
    """``weights`` with every weight above ``ratio`` times the median positive weight
    lowered to that cap, and the indices of the capped ones (none when ``ratio`` is None
    or fewer than three clients have a positive weight: no majority median)."""
    weights = [float(w) for w in weights]
    positive = [w for w in weights if w > 0]
    if ratio is None or len(positive) < 3:
        return weights, []
    cap = ratio * statistics.median(positive)
    capped = [k for k, w in enumerate(weights) if w > cap]
    return [min(w, cap) for w in weights], capped


def cap_class_weights(class_weights: Sequence[Sequence[float]] | torch.Tensor,
                      ratio: float | None) -> tuple[list[list[float]], list[int]]:
    """Per-client, per-class weights (label counts, unverifiable claims like the number
    of examples) with every client's total capped as :func:`cap_weights` caps weights:
    a client claiming more than ``ratio`` times the median total has its row scaled down
    to that total, so it cannot outweigh the others on a class by inflating its counts.
    Returns the rows and the indices of the capped clients."""
    rows = [[float(v) for v in row] for row in (
        class_weights.tolist() if isinstance(class_weights, torch.Tensor) else class_weights)]
    totals = [sum(row) for row in rows]
    bounded, capped = cap_weights(totals, ratio)
    return [[v * b / t for v in row] if k in capped else row
            for k, (row, b, t) in enumerate(zip(rows, bounded, totals, strict=True))], capped


def clip_norms(states: Sequence[dict[str, torch.Tensor]], ratio: float | None
               ) -> tuple[list[dict[str, torch.Tensor]], dict[int, float]]:
    """The clients' states with every floating weight tensor (two dimensions or more)
    whose norm exceeds ``ratio`` times the median client's norm of that tensor scaled
    down to that norm (new tensors; the given ones are untouched), and, per client
    clipped, its largest norm over the median. A tensor's norm does not depend on how
    hidden units are ordered, so no alignment is needed. Scaled-up (e.g. sign-flipped
    and scaled) models thus pull the averages no more than a model of ``ratio`` times
    the median norm. Biases and other vectors are left alone: a head's bias is a
    learned class prior, in which honest non-IID clients differ by far more (clipping
    them cost 7 points in a 1000-client simulation). None, fewer than three clients or a
    zero median: no clipping."""
    clipped: dict[int, float] = {}
    if ratio is None or len(states) < 3:
        return list(states), clipped
    out = [dict(state) for state in states]
    for name, tensor in states[0].items():
        if not tensor.is_floating_point() or tensor.dim() < 2:
            continue
        norms = [float(torch.linalg.vector_norm(state[name], dtype=torch.float64))
                 for state in states]  # no float64 copy of the tensor
        median = statistics.median(norms)
        if median <= 0:
            continue
        for k, norm in enumerate(norms):
            if norm > ratio * median:
                out[k][name] = states[k][name] * (ratio * median / norm)
                clipped[k] = max(clipped.get(k, 0.0), norm / median)
    return out, clipped


@torch.no_grad()
def client_probabilities(models: Sequence[nn.Module], inputs: torch.Tensor) -> torch.Tensor:
    """The clients' class probabilities on ``inputs`` (in eval mode): clients x inputs x
    classes, in float64 on the CPU."""
    probabilities = []
    for model in models:
        with temporary_mode(model):
            logits = class_logits(model, inputs)
        probabilities.append(torch.softmax(logits.double(), dim=1).cpu())
    return torch.stack(probabilities)


PROBE_LR = 0.3
"""Adam's learning rate for the class probes, in standard deviations of the inputs."""
PROBE_PRIOR = 0.01
"""Weight of the class probes' Gaussian prior (the mean squared standardised input)."""


def class_probes(models: Sequence[nn.Module], start: torch.Tensor, classes: torch.Tensor,
                 claims: torch.Tensor, steps: int) -> torch.Tensor:
    """Inputs that the clients claiming each class agree belong to it.

    ``start`` are the initial inputs (e.g. synthetic ones from the pooled moments) and
    ``classes`` the class each is to become; ``claims`` (clients x classes, bool) the
    classes each client says it trained on. Every input moves by ``steps`` Adam steps
    to raise the median, over the clients claiming its class, of that class's
    log-probability, with a Gaussian prior (weight :data:`PROBE_PRIOR`, in the inputs'
    own per-feature mean and standard deviation) keeping it near the data. A median: a
    minority of clients cannot steer the probes of a class. Every class in ``classes``
    needs a claimant. Gradients are on even when the caller turned them off.
    """
    mean, std = start.mean(dim=0), start.std(dim=0).clamp_min(1e-6)
    z = ((start - mean) / std).detach().requires_grad_(True)
    claimed = claims[:, classes]  # clients x inputs
    if not bool(claimed.any(dim=0).all()):
        raise ValueError("a probe's class is claimed by no client")
    optimizer = torch.optim.Adam([z], lr=PROBE_LR)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        for model in models:
            stack.enter_context(temporary_mode(model))
        for _ in range(steps):
            x = mean + std * z
            own = torch.stack([torch.log_softmax(class_logits(model, x).float(), dim=1)
                               .gather(1, classes[:, None])[:, 0] for model in models])
            median = torch.where(claimed, own, torch.nan).nanmedian(dim=0).values
            loss = -median.mean() + PROBE_PRIOR * z.square().mean()
            (z.grad,) = torch.autograd.grad(loss, [z])
            optimizer.step()
    return (mean + std * z).detach()


def misclassifying_clients(probabilities: torch.Tensor, classes: torch.Tensor,
                           counts: torch.Tensor, max_error: float) -> dict[int, float]:
    """The clients that misclassify the class probes of the classes they claim, with
    their error.

    ``probabilities`` are the clients' class probabilities on the probes (clients x
    probes x classes), ``classes`` each probe's class, ``counts`` (clients x classes) the
    clients' label counts. A client's error is its share of misclassified probes of each
    class, averaged with its label distribution over the classes that have probes; a
    client claiming fewer than two of them is averaged over all of them, so that
    claiming few classes buys no less scrutiny. A client is flagged when its error
    exceeds the median client's by more than ``max_error``. Needs five clients or more,
    as :func:`prediction_outliers`: with fewer, a class has too few claimants.
    """
    k = len(probabilities)
    if k < 5:
        return {}
    probed = classes.unique()
    wrong = probabilities.argmax(dim=-1) != classes  # clients x probes
    error = torch.stack([wrong[:, classes == c].double().mean(dim=1) for c in probed], dim=1)
    share = counts[:, probed].double().clamp_min(0)
    few = (share > 0).sum(dim=1) < 2
    share[few] = 1.0
    score = (share * error).sum(dim=1) / share.sum(dim=1)
    limit = score.median() + max_error
    return {i: float(score[i]) for i in range(k) if score[i] > limit}


def prediction_outliers(probabilities: torch.Tensor, threshold: float,
                        min_distance: float = 0.05, min_ratio: float = 1.25,
                        references: int = 128, seen: torch.Tensor | None = None
                        ) -> dict[int, float]:
    """The clients whose predictions are outliers, with their disagreement score.

    ``probabilities`` are the clients' class probabilities on the same inputs (clients x
    inputs x classes, :func:`client_probabilities`). A client's score is the median,
    over the other clients, of the mean total-variation distance between its class
    probabilities and theirs. With ``seen`` (clients x classes, the classes each client
    says it trained on, e.g. its label counts > 0), the two clients' probabilities are
    first renormalised over the classes both saw, so that honest non-IID clients are not
    told apart by the classes one of them never saw; a pair that shares fewer than two
    classes is compared on all of them, so that claiming few classes never buys less
    scrutiny. With more than ``references`` clients, over the others among
    ``references`` clients drawn uniformly at random (a fixed draw: hostile clients
    cannot choose to be in it, whatever weight they claim), which keeps the cost linear
    in the number of clients. A client is an outlier when its score exceeds the median
    score by more than ``threshold`` robust standard deviations (1.4826 MAD) of the
    scores, by at least ``min_distance`` (so that clients which all agree are never
    split), and is more than ``min_ratio`` times the median score. That last floor is
    for a handful of clients, whose MAD can collapse (tied scores make it nearly zero):
    with 6-7 honest clients, honest scores of 1.09-1.21 times the median were
    outliers by the MAD alone, while the sign-flipped and backdoored models the rule
    caught scored 1.3-2.05 times it (``benchmarks/byzantine.py``'s 2-of-8 clients).
    Needs five clients or more: the median is the honest majority's when fewer
    than half are hostile, and with fewer clients the spread of the scores says too
    little.
    """
    k, count = probabilities.shape[:2]
    if k < 5:
        return {}
    chosen = (torch.arange(k) if k <= references + 1 else
              torch.randperm(k, generator=torch.Generator().manual_seed(0))[:references])
    if seen is None or bool(seen.all()):  # every class shared: plain distances
        flat = probabilities.flatten(1)
        distance = 0.5 * torch.cdist(flat[None], flat[chosen][None], p=1)[0] / count
    else:
        distance = _shared_class_distances(probabilities, seen.bool(), chosen)
    others = chosen[None, :] != torch.arange(k)[:, None]  # a client is not its own reference
    scores = torch.stack([row[keep].median() for row, keep in zip(distance, others,
                                                                   strict=True)])
    center = scores.median()
    spread = _MAD_TO_SIGMA * (scores - center).abs().median()
    margin = torch.stack([threshold * spread, torch.tensor(min_distance, dtype=scores.dtype),
                          (min_ratio - 1) * center]).max()
    limit = center + margin
    return {i: float(scores[i]) for i in range(k) if scores[i] > limit}


def flat_predictions(probabilities: torch.Tensor, min_spread: float) -> dict[int, float]:
    """The clients whose predictions hardly depend on their input, with their spread
    relative to the median client's.

    A client's spread is the mean total-variation distance between its class
    probabilities on two different inputs (the first half of ``probabilities``' inputs
    paired with the second). A client is flat when its spread is below ``min_spread``
    times the median spread: a constant or dead network, such as the "a little is
    enough" model (the honest mean minus one standard deviation, per coordinate), whose
    share of an average turns the fused model's units off. Needs three clients or more
    (a median of the honest majority) and at least two inputs; when the median client is
    itself constant, no client is flat.
    """
    k, count = probabilities.shape[:2]
    if k < 3 or count < 2:
        return {}
    half = count // 2
    pairs = probabilities[:, :half] - probabilities[:, half:2 * half]
    spread = 0.5 * pairs.abs().sum(-1).mean(-1)
    median = spread.median()
    if median <= 0:
        return {}
    return {i: float(spread[i] / median) for i in range(k) if spread[i] < min_spread * median}


def _shared_class_distances(probabilities: torch.Tensor, seen: torch.Tensor,
                            chosen: torch.Tensor) -> torch.Tensor:
    """(clients x references) mean total-variation distances between the clients' class
    probabilities renormalised over the classes both have seen, or over all classes for
    pairs that share fewer than two; in float32 (K x references x inputs x classes
    operations, the renormalising sums as matrix products)."""
    probabilities = probabilities.float()
    columns = []
    for j in chosen.tolist():
        shared = seen & seen[j]  # K x C
        mask = torch.where(shared.sum(1, keepdim=True) >= 2, shared, True)
        mask = mask.to(probabilities.dtype)
        mine = torch.bmm(probabilities, mask[:, :, None]).clamp_min_(1e-30)  # K x N x 1
        theirs = (mask @ probabilities[j].T).clamp_min_(1e-30)[:, :, None]  # K x N x 1
        gap = probabilities / mine
        gap.sub_(probabilities[j][None] / theirs).mul_(mask[:, None, :]).abs_()
        columns.append(0.5 * gap.sum(-1).mean(-1))
    return torch.stack(columns, dim=1).double()
