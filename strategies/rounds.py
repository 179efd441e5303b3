"""One round's fusion, the same for every strategy API: screened replies in, the new
global state and the round's metrics out (``reply -> update -> fuse_round -> arrays``)."""

from __future__ import annotations

import importlib
import re
import sys
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO, WARNING

import torch
from flwr.common.logger import log

from otfusion.fusion import FusionConfig, fuse_result

from .settings import FusionSettings
from .updates import ClientUpdate

FusedCallback = Callable[[int, Sequence[ClientUpdate]], None]
"""``on_fused(server_round, updates)``: called after every successful fusion with the
accepted updates in fusion order (e.g. to compare the fused model with their ensemble)."""

_LABEL_UNSAFE = re.compile(r"[^0-9A-Za-z_.\-]+")
_OPTIMISER_MODULE = "torch._dynamo"
"""What torch imports the first time a process builds an optimiser (about a second)."""


def preload_optimiser(config: FusionConfig) -> threading.Thread | None:
    """Import :data:`_OPTIMISER_MODULE` on a background thread, while the clients
    train, when ``config``'s fusion trains with an optimiser (the distillation, the
    screening's class probes) and no thread of this process has imported it: the
    round's fusion then does not wait for it. The thread, or None."""
    trains = config.distils or (config.robust.screen and config.robust.probe_steps > 0)
    if not trains or _OPTIMISER_MODULE in sys.modules:
        return None
    thread = threading.Thread(target=importlib.import_module, args=(_OPTIMISER_MODULE,),
                              name="otfusion-preload", daemon=True)
    thread.start()
    return thread


def screen(stage: str, server_round: int, checked: Iterable[tuple[str, ClientUpdate | str]],
           rejected: int = 0) -> tuple[list[ClientUpdate], int]:
    """The accepted updates in fusion (digest) order, and the number rejected (counting
    ``rejected`` earlier failures), from ``(source, update or reason)`` pairs; every
    rejection is logged as ``<stage> (round N): rejected <source>: <reason>``."""
    accepted: list[ClientUpdate] = []
    for source, update in checked:
        if isinstance(update, ClientUpdate):
            accepted.append(update)
        else:
            rejected += 1
            log(WARNING, "%s (round %d): rejected %s: %s", stage, server_round, source, update)
    accepted.sort(key=lambda u: u.digest)
    log(INFO, "%s (round %d): %d replies accepted, %d rejected", stage, server_round,
        len(accepted), rejected)
    return accepted, rejected


def fuse_round(updates: Sequence[ClientUpdate], settings: FusionSettings, server_round: int,
               *, rejected: int = 0, min_updates: int = 1
               ) -> tuple[OrderedDict[str, torch.Tensor] | None, dict[str, float]]:
    """The new global state (global key order and dtypes) and the round's metrics.

    The state is None, with a logged reason, when there are fewer than ``min_updates``
    updates or the fusion fails: the caller keeps the previous global model. The metrics
    always hold ``accepted-replies`` and ``rejected-replies``; after a fusion also
    ``fusion-seconds`` (distillation included), one ``transport-cost/<group>`` per aligned
    group, ``capped-replies``, ``clipped-replies``, ``excluded-replies`` and
    ``quiet-inputs`` (see ``FusionConfig.robust``), ``screen-seconds`` when the clients
    were screened and, when the fused model was distilled, ``distill-kl`` and
    ``distill-seconds``.
    """
    counts = {"accepted-replies": len(updates), "rejected-replies": rejected}
    needed = max(1, min_updates)
    if len(updates) < needed:
        log(WARNING, "fuse_round (round %d): %d valid replies, fewer than the %d needed; the "
            "global model is not updated", server_round, len(updates), needed)
        return None, counts
    try:
        state, metrics = _fuse(updates, settings, server_round)
    except Exception as exc:  # noqa: BLE001 - keep the previous global model
        log(WARNING, "fuse_round (round %d): fusion failed (%s: %s); the global model is not "
            "updated", server_round, type(exc).__name__, exc)
        return None, counts
    return state, {**metrics, **counts}


def _fuse(updates: Sequence[ClientUpdate], settings: FusionSettings, server_round: int
          ) -> tuple[OrderedDict[str, torch.Tensor], dict[str, float]]:
    config = settings.round_config(server_round)
    largest = max(u.weight for u in updates)
    weights = [u.weight / largest for u in updates]
    per_class = (class_weights(weights, [u.label_counts for u in updates],
                               settings.num_classes)
                 if config.method != "average" else None)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fuse_result([u.model for u in updates], weights, config,
                             target=settings.model_fn(), inputs=settings.inputs,
                             class_weights=per_class,
                             input_moments=[u.input_moments for u in updates],
                             graph=settings.graph,
                             progress=lambda step, steps, divergence: log(
                                 INFO, "fuse_round (round %d): distillation step %d/%d, "
                                 "divergence %.4f", server_round, step, steps, divergence))
    seconds = time.perf_counter() - start
    for warning in caught:  # e.g. a failed distillation: logged every round
        log(WARNING, "fuse_round (round %d): %s", server_round, warning.message)
    for k in result.capped:
        log(WARNING, "fuse_round (round %d): the weight or label counts of %s (%g examples "
            "claimed) are capped at %g times the median claim", server_round,
            updates[k].source, updates[k].weight, config.robust.max_weight_ratio)
    for k, ratio in result.clipped.items():
        log(WARNING, "fuse_round (round %d): the weights of %s are clipped (norm up to %.3g "
            "times the median client's, capped at %g)", server_round, updates[k].source,
            ratio, config.robust.max_norm_ratio)
    if result.quiet_inputs:
        log(INFO, "fuse_round (round %d): the fused model ignores %d quiet input features",
            server_round, result.quiet_inputs)
    for k, reason in result.excluded.items():
        log(WARNING, "fuse_round (round %d): %s excluded: %s", server_round,
            updates[k].source, reason)
    metrics = {"fusion-seconds": float(seconds), **transport_cost_metrics(result.group_costs),
               "capped-replies": float(len(result.capped)),
               "clipped-replies": float(len(result.clipped)),
               "excluded-replies": float(len(result.excluded)),
               "quiet-inputs": float(result.quiet_inputs)}
    if config.robust.screen:
        metrics["screen-seconds"] = result.screen_seconds
    if result.distill_loss is not None:
        metrics["distill-kl"] = result.distill_loss
        metrics["distill-seconds"] = result.distill_seconds
        log(INFO, "fuse_round (round %d): distilled in %.1f s, final divergence %.4f",
            server_round, result.distill_seconds, result.distill_loss)
    return global_state(result.model.state_dict(), settings), metrics


def class_weights(weights: Sequence[float], counts: Sequence[Sequence[float] | None],
                  num_classes: int | None) -> list[list[float]] | None:
    """Per-client, per-class weights of the output layer: ``weight * counts /
    sum(counts)`` (the client's weight spread over its label distribution), or
    ``weight / C`` per class for a client without label counts. None when no client
    has counts or the number of classes is unknown."""
    if num_classes is None or all(c is None for c in counts):
        return None
    return [[w / num_classes] * num_classes if c is None else [w * v / sum(c) for v in c]
            for w, c in zip(weights, counts, strict=True)]


def global_state(state: Mapping[str, torch.Tensor], settings: FusionSettings
                 ) -> OrderedDict[str, torch.Tensor]:
    """``state`` in the global model's key order, dtypes and device (CPU); a ValueError
    when a tensor has another shape or is not finite (or, for a global constant holding
    infinities, differs from it)."""
    expected = settings.expected
    fused: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name in expected.keys:
        tensor = state[name].detach().to("cpu", expected.dtypes[name])
        if tuple(tensor.shape) != expected.shapes[name]:
            raise ValueError(f"fused '{name}' has shape {tuple(tensor.shape)}, "
                             f"expected {expected.shapes[name]}")
        if name in expected.constants:
            problem = expected.check_constant(name, tensor)
            if problem:
                raise ValueError(f"fused {problem}")
        elif tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"fused '{name}' contains NaN or Inf values")
        fused[name] = tensor.clone()
    return fused


def transport_cost_metrics(group_costs: Mapping[str, float]) -> dict[str, float]:
    """``transport-cost/<label>`` metrics, labels reduced to ``[0-9A-Za-z_.-]``."""
    out: dict[str, float] = {}
    for label, cost in group_costs.items():
        key = f"transport-cost/{_LABEL_UNSAFE.sub('_', str(label)).strip('_') or 'group'}"
        unique, n = key, 2
        while unique in out:
            unique, n = f"{key}_{n}", n + 1
        out[unique] = float(cost)
    return out
