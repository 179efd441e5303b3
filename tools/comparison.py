"""One-shot federated learning in one process: train clients, fuse, compare.

Used by the ``otfusion demo`` command and the fusion benchmarks; the Flower apps reuse
:func:`compare` to report the same table on real replies.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from otfusion.fusion import (
    FusionConfig,
    InputMoments,
    fuse_result,
    input_moments,
    pool_moments,
)
from otfusion.fusion.distillation import distill, teacher_probabilities
from otfusion.task.config import INPUT_COMPONENTS, client_seed
from otfusion.task.data import TensorData
from otfusion.task.training import Recipe, ensemble_accuracy, evaluate, model_inputs, train
from otfusion.zoo import build_model


@dataclass(frozen=True)
class Comparison:
    """Test accuracy of the clients, of each fusion method and of the ensemble."""

    clients: list[float]
    methods: dict[str, float]
    seconds: dict[str, float]
    ensemble: float
    gated_teacher: float | None = None

    def rows(self) -> list[tuple[str, float]]:
        """(name, accuracy) rows in the order of the report table."""
        return [
            ("clients (mean)", sum(self.clients) / len(self.clients)),
            ("clients (best)", max(self.clients)),
            *self.methods.items(),
            *([] if self.gated_teacher is None else [("gated teacher", self.gated_teacher)]),
            ("ensemble", self.ensemble),
        ]


def train_clients(model: str, partitions: Sequence[TensorData], recipe: Recipe,
                  seed: int = 0, **model_kwargs) -> list[nn.Module]:
    """One model per partition, each initialised from its own seed and trained locally."""
    clients = []
    for k, data in enumerate(partitions):
        client = build_model(model, seed=client_seed(seed, k), **model_kwargs)
        train(client, data, epochs=recipe.epochs, lr=recipe.lr, batch_size=recipe.batch_size,
              optimizer=recipe.optimizer, seed=client_seed(seed, k))
        clients.append(client.eval())
    return clients


def client_input_moments(model: nn.Module, partitions: Sequence[TensorData],
                         by_class: bool = False, components: int = INPUT_COMPONENTS
                         ) -> list[InputMoments]:
    """The clients' input moments as the ClientApp sends them (``by_class``: per class
    too, as with ``send-class-moments``; ``components``: as ``send-input-components``):
    each partition's moments of ``model``'s inputs."""
    classes = getattr(model, "num_classes", None) if by_class else None
    return [input_moments(model_inputs(model, p), p.y if classes else None, classes,
                          components=components) for p in partitions]


Distiller = Callable[[nn.Module, Sequence[nn.Module], Sequence[float], InputMoments], object]
"""``distiller(fused, clients, weights, input_moments)``: trains ``fused`` in place."""


@dataclass(frozen=True)
class Method:
    """A fusion method of the comparison: engine settings, whether the output layer is
    weighted per class by the clients' label counts, and whether the fused model is
    distilled on synthetic inputs from the clients' input moments. FedAvg (``average``),
    which the engine never distils, is then distilled here with the same settings: an
    ablation that shows what the optimal transport adds. ``distiller``, when given,
    distils the fused model instead of the engine (e.g. a peer method from a paper)."""

    config: FusionConfig
    label_weighted: bool = False
    distilled: bool = False
    distiller: Distiller | None = None


def compare(clients: Sequence[nn.Module], weights: Sequence[float], test: TensorData,
            methods: Mapping[str, FusionConfig | Method],
            label_counts: Sequence[Sequence[float]] | None = None,
            input_moments: InputMoments | Sequence[InputMoments] | None = None
            ) -> Comparison:
    """Evaluate every client, every fusion of them and their ensemble on ``test``.

    ``label_counts`` (per client, per class) are the class weights of the methods with
    ``label_weighted``, and ``input_moments`` (the clients' own, as the strategy gets
    them, or pooled) the distillation inputs of the methods with ``distilled``; such
    methods need them. With both, and the clients' own moments, the gated teacher of the
    distillation (all the clients, their weights uncapped) is evaluated too."""
    per_client = None if isinstance(input_moments, InputMoments) else input_moments
    pooled = (input_moments if per_client is None
              else pool_moments(per_client, [float(w) for w in weights]))
    accuracies, seconds = {}, {}
    for name, method in methods.items():
        method = method if isinstance(method, Method) else Method(method)
        if method.label_weighted and label_counts is None:
            raise ValueError(f"method {name!r} weights classes by label counts: pass them")
        custom = method.distiller is not None
        if (method.distilled or custom) and input_moments is None:
            raise ValueError(f"method {name!r} is distilled: pass the input moments")
        start = time.perf_counter()
        engine_distils = method.distilled and not custom
        fused = fuse_result(clients, weights, method.config,
                            class_weights=label_counts if method.label_weighted else None,
                            input_moments=input_moments if engine_distils else None).model
        if custom:
            method.distiller(fused, clients, weights, pooled)
        elif method.distilled and method.config.method == "average":
            distill(fused, clients, weights, pooled, method.config.distillation,
                    client_moments=per_client)
        seconds[name] = time.perf_counter() - start
        accuracies[name] = evaluate(fused, test)[1]
    return Comparison(
        clients=[evaluate(c, test)[1] for c in clients],
        methods=accuracies,
        seconds=seconds,
        ensemble=ensemble_accuracy(clients, test, weights),
        gated_teacher=None if per_client is None or label_counts is None else
        _teacher_accuracy(clients, weights, test, label_counts, per_client, pooled),
    )


def _teacher_accuracy(clients: Sequence[nn.Module], weights: Sequence[float],
                      test: TensorData, label_counts: Sequence[Sequence[float]],
                      per_client: Sequence[InputMoments], pooled: InputMoments) -> float:
    """Test accuracy of the distillation's gated teacher of all the ``clients``."""
    probabilities = teacher_probabilities(
        clients, [float(w) for w in weights], model_inputs(clients[0], test), "gated",
        label_counts, per_client, float(pooled.var.double().mean()))
    return float((probabilities.argmax(dim=1) == test.y).float().mean())


DEFAULT_METHODS = {
    "vanilla average": FusionConfig(method="average"),
    "OT fusion": Method(FusionConfig(), label_weighted=True, distilled=True),
}
"""What the demo compares: FedAvg, and OT fusion as :class:`OTFusion` does it with the
ClientApp's replies (default settings, output layer weighted per class by the clients'
label counts, distilled on synthetic inputs from their input moments)."""
