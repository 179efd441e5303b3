"""Client updates: a reply's arrays, weight and statistics, validated and loaded into a
model, ready for :func:`~otfusion.strategies.rounds.fuse_round`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from otfusion.fusion import InputMoments

from .replies import (
    CLASS_MOMENT_KEYS,
    COMPONENTS_KEY,
    INPUT_MEAN_KEY,
    INPUT_VAR_KEY,
    LABEL_COUNTS_KEY,
    check_class_moments,
    check_input_components,
    check_input_moments,
    check_label_counts,
    reply_digest,
)
from .settings import FusionSettings


@dataclass(frozen=True)
class ClientUpdate:
    """One accepted reply.

    Attributes
    ----------
    model : nn.Module
        The client's model, its arrays loaded.
    weight : float
        The client weight (its number of examples), positive and finite.
    label_counts : list[float] or None
        Its training examples per class, when it sent them.
    input_moments : InputMoments or None
        The per-feature mean and variance of its training inputs, when it sent them.
    digest : bytes
        A digest of all the above (:func:`~.replies.reply_digest`): updates are fused in
        digest order, so the result does not depend on the order replies arrive in.
    reply : Any
        The reply's content (a RecordDict, or a legacy FitRes), for its other metrics.
    source : str
        Who sent it, for the logs (``node 12``, ``client 3``).
    """

    model: nn.Module
    weight: float
    label_counts: list[float] | None
    input_moments: InputMoments | None
    digest: bytes
    reply: Any
    source: str


class RejectedUpdate(str):
    """Why a reply is not a client update (logged, and counted as rejected)."""


def decode_update(state: dict[str, torch.Tensor], weight: float, metrics: Mapping[str, Any],
                  reply: Any, source: str, settings: FusionSettings
                  ) -> ClientUpdate | RejectedUpdate:
    """The client update of a reply whose arrays and weight passed
    :func:`~.replies.check_content` (or ``check_array_list``): its statistics validated
    and its arrays loaded into a model; or why it is rejected. Never raises."""
    counts = check_label_counts(metrics.get(LABEL_COUNTS_KEY), settings.num_classes)
    if isinstance(counts, str):
        return RejectedUpdate(counts)
    moments = check_input_moments(metrics.get(INPUT_MEAN_KEY), metrics.get(INPUT_VAR_KEY),
                                  settings.input_shape)
    if not isinstance(moments, str):
        moments = check_class_moments(moments, *(metrics.get(k) for k in CLASS_MOMENT_KEYS),
                                      settings.num_classes)
    if not isinstance(moments, str):
        moments = check_input_components(moments, metrics.get(COMPONENTS_KEY))
    if isinstance(moments, str):
        return RejectedUpdate(moments)
    model = _loaded_model(state, settings)
    if isinstance(model, str):
        return RejectedUpdate(model)
    return ClientUpdate(model, weight, counts, moments,
                        reply_digest(state, weight, counts, moments), reply, source)


def _loaded_model(state: dict[str, torch.Tensor], settings: FusionSettings) -> nn.Module | str:
    """A model holding a validated state_dict, or why the state does not fit one."""
    try:
        if settings.heterogeneous:
            assert settings.client_model_fn is not None
            shapes = {name: tuple(t.shape) for name, t in state.items()}
            model = settings.client_model_fn(shapes)
            if not isinstance(model, nn.Module):
                return f"client_model_fn returned a {type(model).__name__}, not an nn.Module"
        else:
            model = settings.new_model()
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - a reply that fits no model is rejected
        return f"does not load into the model ({type(exc).__name__}: {exc})"
    return model
