"""Post-fusion distillation: the fused model learns its clients' ensemble on synthetic
inputs drawn from the clients' input moments, so the server needs no data.

Clients send the per-feature mean and variance of their training inputs, their
leading principal components, and optionally the moments per class
(:func:`input_moments`); the server pools them (:func:`pool_moments`), draws Gaussian
inputs from them, correlated along the components, or class by class when it has
per-class moments (:func:`synthetic_inputs`), and trains the fused model to predict the
clients' ensemble on them (:func:`distill`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .averaging import normalize_class_weights
from .config import DistillationConfig
from .modes import class_logits, temporary_mode
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


def teacher_sample(count: int, size: int | None, seed: int) -> list[int]:
    """The teachers of the distillation: all ``count`` clients, or ``size`` of them drawn
    uniformly at random from ``seed`` (in client order)."""
    if size is None or count <= size:
        return list(range(count))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(count, generator=generator)[:size].tolist())


@torch.no_grad()
def ensemble_probabilities(models: Sequence[nn.Module], weights: Sequence[float],
                           inputs: torch.Tensor, batch_size: int = 512,
                           class_weights: Sequence[Sequence[float]] | None = None,
                           temperature: float = 1.0, class_share: float = 1.0
                           ) -> torch.Tensor:
    """The ``weights``-weighted mean of the models' softmax outputs (of their logits
    divided by ``temperature``) on ``inputs``, each model in eval mode, its mode
    restored afterwards.

    With ``class_weights`` (one row per model, one column per class, e.g. label counts),
    class ``c``'s probability is averaged with the models' shares of column ``c``
    instead (a column of zeros falls back to ``weights``), and each input's
    probabilities are then normalised to sum one; with ``class_share`` below 1, the
    result is that share of this class-weighted ensemble plus the rest of the plain
    mean."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    mix = w[:, None] if class_weights is None else torch.as_tensor(
        normalize_class_weights(class_weights, w.tolist()), dtype=torch.float64)
    plain = class_weights is not None and class_share < 1
    total = plain_total = torch.zeros(())
    for k, (share, model) in enumerate(zip(mix.to(inputs.dtype), models, strict=True)):
        with temporary_mode(model):
            probabilities = _predict(model, inputs, batch_size, log=False,
                                     temperature=temperature).to(inputs.device, inputs.dtype)
        total = total + share.to(inputs.device) * probabilities
        if plain:
            plain_total = plain_total + float(w[k]) * probabilities
    if class_weights is None:
        return total
    total = total / total.sum(dim=1, keepdim=True)
    return class_share * total + (1 - class_share) * plain_total if plain else total


Progress = Callable[[int, int, float], None]
"""Called as ``progress(step, steps, divergence)`` every ``eval_every`` steps of a
distillation: the student's divergence on the held-out inputs with early stopping,
otherwise its mean training loss since the last call."""


def distill(student: nn.Module, teachers: Sequence[nn.Module], weights: Sequence[float],
            moments: InputMoments, config: DistillationConfig,
            class_weights: Sequence[Sequence[float]] | None = None,
            progress: Progress | None = None) -> float:
    """Train ``student`` in place to match the teachers' ensemble (KL divergence) on
    synthetic inputs drawn from ``moments``: their weighted mean class probabilities,
    with ``class_weights`` (the teachers' label counts) and ``config.teacher`` each
    class averaged with the teachers' shares of it (``class-weighted``) or half of each
    (``mixed``; :func:`ensemble_probabilities`).

    ``config.samples`` inputs are drawn once; up to ``config.steps`` Adam steps
    (learning rate ``lr``, ``schedule``, ``temperature``) on random batches of
    ``batch_size`` follow, stopped early on held-out inputs when ``config.patience`` is
    set. With more teachers than ``config.max_teachers``, a random sample of them
    teaches (:func:`teacher_sample`).
    The inputs, the batches and any dropout masks come from ``seed``, so the
    result is deterministic. Normalisation layers keep their running statistics (those
    are the fusion's, not the noise's). A student whose divergence on all the inputs is
    at most ``tol`` is left unchanged (Adam's normalised steps would only move
    it at random). Returns the student's divergence on all the inputs (eval mode) after
    training, NaN when it is not finite (the caller, :func:`~.engine.fuse_result`, then
    restores the undistilled model)."""
    shape = getattr(student, "input_shape", None)
    if shape is not None and tuple(moments.mean.shape) != tuple(shape):
        raise ValueError(f"input moments have shape {tuple(moments.mean.shape)}, but the "
                         f"model's input_shape is {tuple(shape)}")
    parameter = next(student.parameters())
    generator = torch.Generator().manual_seed(config.seed)
    inputs = synthetic_inputs(moments, config.samples, generator, config.correlated).to(
        parameter.device, parameter.dtype)
    chosen = teacher_sample(len(teachers), config.max_teachers, config.seed)
    per_class = (None if class_weights is None or config.teacher == "mean"
                 else [class_weights[k] for k in chosen])
    share = 0.5 if config.teacher == "mixed" else 1.0

    def teach(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        return ensemble_probabilities([teachers[k] for k in chosen],
                                      [weights[k] for k in chosen], x,
                                      class_weights=per_class, temperature=temperature,
                                      class_share=share)

    targets = teach(inputs)
    initial_loss = _full_divergence(student, inputs, targets)
    if initial_loss <= config.tol:
        return initial_loss  # already the ensemble: Adam would only add noise
    soft_targets = targets if config.temperature == 1 else teach(inputs, config.temperature)
    stopping = None
    if config.patience is not None:
        held_out = synthetic_inputs(moments, max(1, config.samples // 4), generator,
                                    config.correlated).to(
            parameter.device, parameter.dtype)
        stopping = _EarlyStopping(student, held_out, teach(held_out), config.patience)
    _train(student, inputs, soft_targets, config, generator, stopping, progress)
    if stopping is not None:
        stopping.restore_best()
    return _full_divergence(student, inputs, targets)


def _train(student: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
           config: DistillationConfig, generator: torch.Generator,
           stopping: _EarlyStopping | None, progress: Progress | None) -> None:
    """The Adam steps of :func:`distill` on batches of ``inputs`` drawn from
    ``generator``; every ``config.eval_every`` steps, ``stopping`` measures the student
    (and may end the training) and ``progress`` is told."""
    parameter = next(student.parameters())
    optimizer = torch.optim.Adam(student.parameters(), lr=config.lr)
    schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
                if config.schedule == "cosine" else None)
    devices = [parameter.device] if parameter.device.type == "cuda" else []
    running = 0.0
    with torch.random.fork_rng(devices=devices), temporary_mode(student, training=True):
        torch.manual_seed(config.seed)  # dropout masks
        for step in range(1, config.steps + 1):
            index = torch.randint(0, len(inputs), (config.batch_size,),
                                  generator=generator).to(inputs.device)
            loss = _soft_loss(class_logits(student, inputs[index]), targets[index],
                              config.temperature)
            if not bool(torch.isfinite(loss)):
                return
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            running += float(loss.detach()) if progress is not None else 0.0
            if step % config.eval_every and step != config.steps:
                continue
            done = stopping is not None and stopping.measure()
            if progress is not None:
                since = (step - 1) % config.eval_every + 1
                progress(step, config.steps, stopping.last if stopping else running / since)
                running = 0.0
            if done:
                return


def _soft_loss(logits: torch.Tensor, targets: torch.Tensor, temperature: float
               ) -> torch.Tensor:
    """Hinton's distillation loss: the KL divergence of the student's softened
    probabilities from the teachers', times the temperature squared."""
    if temperature == 1:
        return F.kl_div(F.log_softmax(logits, dim=1), targets, reduction="batchmean")
    return temperature ** 2 * F.kl_div(F.log_softmax(logits / temperature, dim=1), targets,
                                       reduction="batchmean")


class _EarlyStopping:
    """The student's divergence on held-out inputs, measured now and then; the state of
    its best measurement, and whether ``patience`` measurements went by without a
    better one."""

    def __init__(self, student: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                 patience: int) -> None:
        self.student, self.inputs, self.targets = student, inputs, targets
        self.patience, self.waited = patience, 0
        self.best = self.last = _full_divergence(student, inputs, targets)
        self.best_state = copy.deepcopy(student.state_dict())

    def measure(self) -> bool:
        """Measure the student; True when training should stop."""
        self.last = _full_divergence(self.student, self.inputs, self.targets)
        if self.last < self.best:
            self.best, self.waited = self.last, 0
            self.best_state = copy.deepcopy(self.student.state_dict())
            return False
        self.waited += 1
        return self.waited >= self.patience

    def restore_best(self) -> None:
        self.student.load_state_dict(self.best_state)


def _full_divergence(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """The model's KL divergence from ``targets`` on all ``inputs``, in eval mode (NaN
    when not finite)."""
    with torch.no_grad(), temporary_mode(model):
        loss = float(F.kl_div(_predict(model, inputs, 512, log=True), targets,
                              reduction="batchmean"))
    return loss if math.isfinite(loss) else float("nan")


def _predict(model: nn.Module, inputs: torch.Tensor, batch_size: int, log: bool,
             temperature: float = 1.0) -> torch.Tensor:
    """The model's class (log-)probabilities on ``inputs`` at ``temperature``, batch by
    batch."""
    normalise = F.log_softmax if log else F.softmax
    outputs = []
    for start in range(0, len(inputs), batch_size):
        logits = class_logits(model, inputs[start:start + batch_size])
        outputs.append(normalise(logits if temperature == 1 else logits / temperature, dim=1))
    return torch.cat(outputs)
