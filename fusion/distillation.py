"""Post-fusion distillation: the fused model learns its clients' ensemble on synthetic
inputs drawn from the clients' pooled input moments (:mod:`.moments`), so the server
needs no data (:func:`distill`).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .averaging import normalize_class_weights
from .config import DistillationConfig
from .gating import gates
from .modes import class_logits, temporary_mode
from .moments import InputMoments, mixture_inputs, synthetic_inputs
from .quiet_inputs import QuietInputs, scramble_quiet


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
                           temperature: float = 1.0, class_share: float = 1.0,
                           gates: torch.Tensor | None = None) -> torch.Tensor:
    """The ``weights``-weighted mean of the models' softmax outputs (of their logits
    divided by ``temperature``) on ``inputs``, each model in eval mode, its mode
    restored afterwards.

    With ``class_weights`` (one row per model, one column per class, e.g. label counts),
    class ``c``'s probability is averaged with the models' shares of column ``c``
    instead (a column of zeros falls back to ``weights``), and each input's
    probabilities are then normalised to sum one. With ``class_share`` below 1, the
    result is that share of this ensemble plus the rest of a second one: the plain mean
    (with ``class_weights``), or the models weighed input by input by ``gates``
    ((inputs, models), rows summing to one; :func:`~.gating.gates`)."""
    if gates is not None and tuple(gates.shape) != (len(inputs), len(models)):
        raise ValueError(f"gates of shape {tuple(gates.shape)} for {len(inputs)} inputs and "
                         f"{len(models)} models")
    w = torch.as_tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    mix = w[:, None] if class_weights is None else torch.as_tensor(
        normalize_class_weights(class_weights, w.tolist()), dtype=torch.float64)
    second = class_share < 1 and (class_weights is not None or gates is not None)
    total = second_total = torch.zeros(())
    gated = None if gates is None else gates.to(inputs.device, inputs.dtype)
    for k, (share, model) in enumerate(zip(mix.to(inputs.dtype), models, strict=True)):
        with temporary_mode(model):
            probabilities = _predict(model, inputs, batch_size, log=False,
                                     temperature=temperature).to(inputs.device, inputs.dtype)
        total = total + share.to(inputs.device) * probabilities
        if second:
            second_total = second_total + (float(w[k]) if gated is None
                                           else gated[:, k, None]) * probabilities
    if class_weights is not None:
        total = total / total.sum(dim=1, keepdim=True)
    return class_share * total + (1 - class_share) * second_total if second else total


def teacher_gates(teacher: str, client_moments: Sequence[InputMoments | None] | None,
                  weights: Sequence[float], pooled_variance: float, inputs: torch.Tensor
                  ) -> torch.Tensor | None:
    """The ``gated`` teacher's weights of the clients on ``inputs``
    (:func:`~.gating.gates`, with a floor in units of ``pooled_variance``); None for
    the other teachers, or without every client's own moments (the teacher is then
    ``mixed``)."""
    if teacher != "gated" or client_moments is None or any(m is None for m in client_moments):
        return None
    return gates(client_moments, weights, pooled_variance, inputs)


def teacher_probabilities(teachers: Sequence[nn.Module], weights: Sequence[float],
                          inputs: torch.Tensor, teacher: str = "gated",
                          class_weights: Sequence[Sequence[float]] | None = None,
                          client_moments: Sequence[InputMoments | None] | None = None,
                          pooled_variance: float = 1.0, temperature: float = 1.0,
                          weighing: torch.Tensor | None = None) -> torch.Tensor:
    """The class probabilities on ``inputs`` of the distillation's ``teacher``
    (``DistillationConfig.teacher``; :func:`ensemble_probabilities`), ``class_weights``
    being the teachers' label counts, and the gates :func:`teacher_gates` (or
    ``weighing``, computed by it once for the same inputs)."""
    if weighing is None:
        weighing = teacher_gates(teacher, client_moments, weights, pooled_variance, inputs)
    return ensemble_probabilities(
        teachers, weights, inputs, class_weights=None if teacher == "mean" else class_weights,
        temperature=temperature, class_share=0.5 if teacher in ("mixed", "gated") else 1.0,
        gates=weighing)


Progress = Callable[[int, int, float], None]
"""Called as ``progress(step, steps, divergence)`` every ``eval_every`` steps of a
distillation: the student's divergence on the held-out inputs with early stopping,
otherwise its mean training loss since the last call."""


def distill(student: nn.Module, teachers: Sequence[nn.Module], weights: Sequence[float],
            moments: InputMoments, config: DistillationConfig,
            class_weights: Sequence[Sequence[float]] | None = None,
            progress: Progress | None = None, quiet: QuietInputs | None = None,
            client_moments: Sequence[InputMoments | None] | None = None) -> float:
    """Train ``student`` in place to match the teachers' ensemble (KL divergence) on
    synthetic inputs (below): their weighted mean class probabilities, with
    ``class_weights`` (the teachers' label counts) and ``config.teacher`` each class
    averaged with the teachers' shares of it (``class-weighted``) or half of each
    (``mixed``; :func:`ensemble_probabilities`).
    ``gated``: half class-weighted, half the mean with the teachers weighed input by
    input by :func:`~.gating.gates` of ``client_moments`` (each teacher's own moments,
    in order; the training and held-out inputs each balanced on their own); ``mixed``
    when any teacher's are missing.

    The synthetic inputs come from the mixture of the clients' own Gaussians when all
    of ``client_moments`` are given, none per class (the share ``config.mixture``;
    :func:`~.moments.mixture_inputs`), otherwise from ``moments`` (the clients' pooled
    moments).
    ``config.samples`` inputs are drawn once; up to ``config.steps`` Adam steps
    (learning rate ``lr``, ``schedule``, ``temperature``) on random batches of
    ``batch_size`` follow, stopped early on held-out inputs when ``config.patience`` is
    set. With more teachers than ``config.max_teachers``, a random sample of them
    teaches (:func:`teacher_sample`). With ``quiet`` input features, the student sees
    them scrambled, in its batches and its held-out inputs, against the teachers'
    targets on the inputs as drawn, and learns to ignore them
    (:func:`~.quiet_inputs.scramble_quiet`).
    The inputs, the batches and any dropout masks come from ``seed``, so the
    result is deterministic. Normalisation layers keep their running statistics (those
    are the fusion's, not the noise's). Without quiet features, a student whose
    divergence on all the inputs is at most ``tol`` is left unchanged (Adam's normalised
    steps would only move it at random). Returns the student's divergence on all the
    inputs (eval mode) after training, NaN when it is not finite (the caller,
    :func:`~.engine.fuse_result`, then restores the undistilled model)."""
    shape = getattr(student, "input_shape", None)
    if shape is not None and tuple(moments.mean.shape) != tuple(shape):
        raise ValueError(f"input moments have shape {tuple(moments.mean.shape)}, but the "
                         f"model's input_shape is {tuple(shape)}")
    parameter = next(student.parameters())
    generator = torch.Generator().manual_seed(config.seed)
    if client_moments is not None and len(client_moments) != len(teachers):
        raise ValueError(f"{len(client_moments)} client moments for {len(teachers)} teachers")

    def draw(count: int) -> torch.Tensor:
        return _synthetic(moments, client_moments, weights, count, generator, config).to(
            parameter.device, parameter.dtype)

    inputs = draw(config.samples)
    chosen = teacher_sample(len(teachers), config.max_teachers, config.seed)
    known = None if client_moments is None else [client_moments[k] for k in chosen]
    chosen_weights = [weights[k] for k in chosen]
    spread = float(moments.var.double().mean())
    teach = functools.partial(
        teacher_probabilities, [teachers[k] for k in chosen], chosen_weights,
        teacher=config.teacher, client_moments=known, pooled_variance=spread,
        class_weights=None if class_weights is None else [class_weights[k] for k in chosen])
    weighing = teacher_gates(config.teacher, known, chosen_weights, spread, inputs)
    targets = teach(inputs, weighing=weighing)
    initial_loss = _full_divergence(student, inputs, targets)
    if initial_loss <= config.tol and quiet is None:
        return initial_loss  # already the ensemble: Adam would only add noise
    soft_targets = (targets if config.temperature == 1
                    else teach(inputs, temperature=config.temperature, weighing=weighing))
    scramble = None
    if quiet is not None:
        scrambling = torch.Generator().manual_seed(config.seed)

        def scramble(x: torch.Tensor) -> torch.Tensor:
            return scramble_quiet(x, quiet, scrambling)

    stopping = None
    if config.patience is not None:
        held_out = draw(max(1, config.samples // 4))
        stopping = _EarlyStopping(student, held_out if scramble is None else scramble(held_out),
                                  teach(held_out), config.patience)
    _train(student, inputs, soft_targets, config, generator, stopping, progress, scramble)
    if stopping is not None:
        stopping.restore_best()
    return _full_divergence(student, inputs, targets)


def _synthetic(moments: InputMoments, client_moments: Sequence[InputMoments | None] | None,
               weights: Sequence[float], count: int, generator: torch.Generator,
               config: DistillationConfig) -> torch.Tensor:
    """``count`` synthetic inputs: the share ``config.mixture`` from the mixture of the
    clients' Gaussians when every client sent its moments, none of them per class, the
    rest from the pooled ``moments`` (class by class when they were sent per class)."""
    every = (client_moments is not None
             and all(m is not None and m.class_mean is None for m in client_moments))
    mixed = round(config.mixture * count) if every else 0
    parts = []
    if mixed < count:
        parts.append(synthetic_inputs(moments, count - mixed, generator, config.correlated))
    if mixed:
        parts.append(mixture_inputs(client_moments, weights, mixed, generator,
                                    config.correlated))
    return torch.cat(parts)


def _train(student: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
           config: DistillationConfig, generator: torch.Generator,
           stopping: _EarlyStopping | None, progress: Progress | None,
           scramble: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """The Adam steps of :func:`distill` on batches of ``inputs`` drawn from
    ``generator``, each passed through ``scramble`` first, if given; every
    ``config.eval_every`` steps, ``stopping`` measures the student (and may end the
    training) and ``progress`` is told."""
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
            batch = inputs[index] if scramble is None else scramble(inputs[index])
            loss = _soft_loss(class_logits(student, batch), targets[index], config.temperature)
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
