"""The function-space screening of a fusion (``FusionConfig.robust.screen``): which
clients are excluded before fusing and distilling, and why.

The clients' predictions are compared on synthetic inputs drawn from the pooled input
moments (or on the inputs given), in three stages, each on the clients the previous
stages kept (an excluded client would otherwise skew the next stage's statistics):

1. flat clients, whose predictions hardly depend on their input
   (:func:`~.robust.flat_predictions`);
2. clients that misclassify the class probes of the classes they claim
   (:func:`~.robust.class_probes`, :func:`~.robust.misclassifying_clients`);
3. clients whose predictions disagree with the others' far more than those disagree
   among themselves (:func:`~.robust.prediction_outliers`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from .config import FusionConfig, RobustConfig
from .moments import InputMoments, synthetic_inputs
from .robust import (
    class_probes,
    client_probabilities,
    flat_predictions,
    misclassifying_clients,
    prediction_outliers,
)

PROBE_REFERENCES = 32
"""At most this many clients (a fixed random draw) shape the class probes."""


def screened_out(models: Sequence[nn.Module], moments: InputMoments | None,
                 inputs: torch.Tensor | None, config: FusionConfig,
                 class_weights: Sequence[Sequence[float]] | torch.Tensor | None = None
                 ) -> dict[int, str]:
    """The clients excluded by the screening, with the reason. ``class_weights`` are
    the clients' label counts (or proportional to them): the classes each claims.
    Without moments or inputs there is nothing to screen on: none, with a warning when
    the screening was asked for explicitly (it is on by default)."""
    generator = torch.Generator().manual_seed(config.distillation.seed)
    if moments is not None:
        # feature by feature, as the thresholds were measured (not along the components)
        probe = synthetic_inputs(moments._replace(components=None),
                                 min(config.distillation.samples, 512), generator)
    elif inputs is not None and inputs.is_floating_point():
        probe = inputs
    else:
        if "screen" in config.robust.model_fields_set:
            warnings.warn("robust.screen needs the clients' input moments or a batch of "
                          "inputs; no client was screened", stacklevel=3)
        return {}
    try:
        return _stages(models, probe, config.robust, class_weights, generator)
    except Exception as exc:  # noqa: BLE001 - e.g. moments of the wrong shape: fuse all
        warnings.warn(f"screening failed ({type(exc).__name__}: {exc}); no client was "
                      "screened", stacklevel=3)
        return {}


def _stages(models: Sequence[nn.Module], probe: torch.Tensor, robust: RobustConfig,
            class_weights: Sequence[Sequence[float]] | torch.Tensor | None,
            generator: torch.Generator) -> dict[int, str]:
    """The three checks of the module's docstring, in order, on ``probe``."""
    probabilities = client_probabilities(models, probe)
    clients, _, classes = probabilities.shape
    counts = (torch.ones(clients, classes, dtype=torch.float64)  # every class claimed
              if class_weights is None else
              torch.as_tensor(class_weights, dtype=torch.float64))
    reasons: dict[int, str] = {}
    if robust.min_spread is not None:
        for k, share in flat_predictions(probabilities, robust.min_spread).items():
            reasons[k] = (f"its predictions hardly depend on its input (they change "
                          f"{share:.1%} as much as the median client's)")
    kept = [k for k in range(clients) if k not in reasons]
    if robust.probe_steps and len(kept) >= 5:
        try:
            errors = _probe_errors([models[k] for k in kept], probe, counts[kept], robust,
                                   generator)
        except Exception as exc:  # noqa: BLE001 - e.g. a model without input gradients
            warnings.warn(f"class probes failed ({type(exc).__name__}: {exc}); that check "
                          "was skipped", stacklevel=4)
            errors = {}
        for i, error in errors.items():
            reasons[kept[i]] = (f"it misclassifies {error:.0%} of the class probes of the "
                                "classes it claims (inputs that the other clients claiming "
                                "them agree on)")
        kept = [k for k in kept if k not in reasons]
    seen = None if class_weights is None else counts[kept] > 0
    for i, score in prediction_outliers(probabilities[kept], robust.screen_threshold,
                                        seen=seen).items():
        reasons[kept[i]] = (f"its predictions disagree with the other clients' (median "
                            f"total-variation distance {score:.3f}, an outlier)")
    return dict(sorted(reasons.items()))


def _probe_errors(models: Sequence[nn.Module], probe: torch.Tensor, counts: torch.Tensor,
                  robust: RobustConfig, generator: torch.Generator) -> dict[int, float]:
    """:func:`~.robust.misclassifying_clients` on class probes of every class claimed by
    the clients shaping them (at most :data:`PROBE_REFERENCES`), started from the first
    rows of ``probe`` (cycled)."""
    claims = counts > 0
    references = (torch.arange(len(models)) if len(models) <= PROBE_REFERENCES else
                  torch.randperm(len(models), generator=generator)[:PROBE_REFERENCES])
    probed = torch.nonzero(claims[references].any(dim=0)).flatten()
    classes = probed.repeat_interleave(robust.probes_per_class)
    start = probe[torch.arange(len(classes)) % len(probe)]
    probes = class_probes([models[k] for k in references.tolist()], start, classes,
                          claims[references], robust.probe_steps)
    return misclassifying_clients(client_probabilities(models, probes), classes, counts,
                                  robust.probe_error)
