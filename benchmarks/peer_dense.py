"""A DENSE-style peer of the distillation: synthetic inputs from a generator trained
against the teachers, instead of Gaussian draws from the clients' input moments.

Written here from the paper (Zhang et al., "DENSE: Data-Free One-Shot Federated
Learning", NeurIPS 2022), as a comparison row for ``distillation_ablation.py``. Each of
``steps`` rounds makes one generator step and one student step (the student gets as
many steps as the default distillation):

- the generator maps noise ``z`` and a drawn class ``y`` to an input; its loss is the
  teachers' cross-entropy on ``y`` (the ensemble is confident the input is of class
  ``y``), plus, for teachers with BatchNorm, the distance of the batch's statistics at
  every BatchNorm input from its running statistics (DeepInversion's prior), minus the
  student's divergence from the teachers on the inputs where both predict the same class
  (adversarial: inputs the student has not learnt yet);
- the student learns the teachers' mean class probabilities (KL divergence) on a fresh
  generated batch and a batch from a pool of earlier ones.

The generator's output is standardised per feature and scaled to the clients' pooled
input moments, so that it starts in the same range as the Gaussian draws: the peer gets
the same information as the default method.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from otfusion.fusion import InputMoments
from otfusion.fusion.modes import temporary_mode


class Generator(nn.Module):
    """Noise and a class to one input of ``shape``: two hidden layers with BatchNorm,
    the output standardised per feature, then scaled to ``moments``."""

    def __init__(self, moments: InputMoments, num_classes: int, noise: int = 64,
                 hidden: int = 256) -> None:
        super().__init__()
        self.shape = tuple(moments.mean.shape)
        self.noise, self.num_classes = noise, num_classes
        self.net = nn.Sequential(
            nn.Linear(noise + num_classes, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, math.prod(self.shape)),
            nn.BatchNorm1d(math.prod(self.shape), affine=False))
        self.register_buffer("mean", moments.mean.flatten().clone())
        self.register_buffer("std", moments.var.flatten().sqrt())

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.net(torch.cat([z, F.one_hot(y, self.num_classes).to(z.dtype)], dim=1))
        return (self.mean + self.std * h).view(len(z), *self.shape)


class _BatchNormPrior:
    """DeepInversion's prior: the distance of each BatchNorm layer's batch statistics
    from its running ones, summed over the layers of the teachers, for the last batch."""

    def __init__(self, teachers: Sequence[nn.Module]) -> None:
        self.losses: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for t in teachers
                        for m in t.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def _hook(self, module, args, _output) -> None:
        if not torch.is_grad_enabled():  # the teachers' targets for the student: no prior
            return
        x = args[0].transpose(0, 1).flatten(1)  # channels x (batch and positions)
        self.losses.append((x.mean(dim=1) - module.running_mean).norm()
                           + (x.var(dim=1, unbiased=False) - module.running_var).norm())

    def take(self) -> torch.Tensor:
        total = sum(self.losses, torch.zeros(()))
        self.losses = []
        return total

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _teacher_probabilities(teachers: Sequence[nn.Module], weights: torch.Tensor,
                           x: torch.Tensor) -> torch.Tensor:
    return sum(w * F.softmax(t(x), dim=1) for w, t in zip(weights, teachers, strict=True))


@contextmanager
def _frozen(teachers: Sequence[nn.Module]) -> Iterator[None]:
    """The teachers in eval mode and without gradients of their own; both put back."""
    parameters = [p for t in teachers for p in t.parameters()]
    needed = [p.requires_grad for p in parameters]
    with ExitStack() as stack:
        for teacher in teachers:
            stack.enter_context(temporary_mode(teacher))
        for parameter in parameters:
            parameter.requires_grad_(False)
        try:
            yield
        finally:
            for parameter, need in zip(parameters, needed, strict=True):
                parameter.requires_grad_(need)


def dense_distill(student: nn.Module, teachers: Sequence[nn.Module], weights: Sequence[float],
                  moments: InputMoments, steps: int = 300, batch_size: int = 128,
                  lr: float = 1e-3, generator_lr: float = 1e-3, bn_weight: float = 1.0,
                  adversarial_weight: float = 1.0, pool_size: int = 4096, seed: int = 0
                  ) -> float:
    """Train ``student`` in place as described in the module docstring; returns its last
    training loss. The teachers are not changed."""
    torch.manual_seed(seed)
    w = torch.as_tensor(weights, dtype=torch.float32)
    w = w / w.sum()
    with torch.no_grad(), temporary_mode(student):
        num_classes = student(moments.mean.unsqueeze(0)).shape[1]
    generator = Generator(moments, num_classes)
    g_optimizer = torch.optim.Adam(generator.parameters(), lr=generator_lr)
    s_optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    prior = _BatchNormPrior(teachers)
    pool: list[torch.Tensor] = []
    loss = torch.zeros(())
    try:
        with _frozen(teachers):
            for _ in range(steps):
                x = generator(torch.randn(batch_size, generator.noise),
                              y := torch.randint(0, num_classes, (batch_size,)))
                prior.take()
                probabilities = _teacher_probabilities(teachers, w, x)
                bn = prior.take()
                with temporary_mode(student):
                    student_log = F.log_softmax(student(x), dim=1)
                agree = (student_log.argmax(dim=1) == probabilities.argmax(dim=1)).float()
                log_p = probabilities.clamp_min(1e-12).log()
                divergence = (probabilities * (log_p - student_log)).sum(dim=1)
                g_loss = (F.nll_loss(log_p, y) + bn_weight * bn
                          - adversarial_weight * (agree * divergence).mean())
                g_optimizer.zero_grad(set_to_none=True)
                g_loss.backward()
                g_optimizer.step()
                pool.append(x.detach())
                del pool[:-max(1, pool_size // batch_size)]
                older = torch.cat(pool)[torch.randint(0, len(pool) * batch_size, (batch_size,))]
                inputs = torch.cat([pool[-1], older])
                with torch.no_grad():
                    targets = _teacher_probabilities(teachers, w, inputs)
                with temporary_mode(student, training=True):
                    loss = F.kl_div(F.log_softmax(student(inputs), dim=1), targets,
                                    reduction="batchmean")
                s_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                s_optimizer.step()
    finally:
        prior.close()
    return float(loss.detach())
