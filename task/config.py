"""The Flower App's run-config keys, typed and validated.

The defaults here equal those in ``pyproject.toml`` (``[tool.flwr.app.config]``); a test
checks that they agree. ``flwr run . --run-config "model='cnn' lr=0.02"`` overrides them,
and so do the flags of ``flower-server``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


def json_object(text: str, what: str) -> dict:
    """``text`` parsed as a JSON object; a ValueError naming ``what`` otherwise."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} is not valid JSON: {err}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{what} must be a JSON object, got {text!r}")
    return parsed


INPUT_COMPONENTS = 16
"""Principal components of its inputs a client sends by default (``send-input-components``).
Drawing from the leading 16 components of the whole Fashion-MNIST training set gave a
distilled fusion within 2 points of 64, 256 or all 784 (a scratch measurement on six
MLP clients, four splits and seeds)."""


def client_seed(run_seed: int, node: int) -> int:
    """The seed of client ``node``'s own initialisation and training batches in a run
    seeded with ``run_seed`` (the same in simulations, deployments and benchmarks)."""
    return run_seed * 1000 + node


class RunConfig(BaseModel):
    """Settings of one federated run, under their run-config names (``local-epochs``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              alias_generator=lambda name: name.replace("_", "-"))

    strategy: Literal["otfusion", "fedavg"] = "otfusion"
    num_server_rounds: int = Field(default=1, ge=1)
    model: str = "mlp"
    model_kwargs: str = Field(default="{}", description=(
        "keyword arguments of the zoo model as a JSON object, e.g. '{\"in_features\": 784}' "
        "for mnist with the mlp"))
    dataset: str = "digits"
    partitioner: Literal["iid", "dirichlet", "pathological"] = "iid"
    alpha: float = Field(default=0.5, gt=0)
    local_epochs: int = Field(default=30, ge=0)
    lr: float = Field(default=0.1, gt=0)
    batch_size: int = Field(default=32, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    client_init: Literal["global", "local-seed"] = "local-seed"
    seed: int = 0
    min_train_nodes: int = Field(default=2, ge=1)
    fraction_train: float = Field(default=1.0, gt=0, le=1)
    ot_rounds: Literal["all", "first"] = "all"
    fusion_method: Literal["wasserstein", "gromov-wasserstein", "average"] = "wasserstein"
    fusion_solver: Literal["exact", "sinkhorn"] = "exact"
    fusion_reg: float = Field(default=0.01, gt=0)
    fusion_max_iter: int = Field(default=5, ge=1)
    fusion_neuron_weights: Literal["uniform", "outgoing", "outgoing-sq"] = "outgoing-sq"
    fusion_rescale: Literal["none", "norm"] = "norm"
    fusion_distill_steps: int = Field(default=300, ge=0, description=(
        "Adam steps distilling the fused model from the clients' ensemble on synthetic "
        "inputs drawn from their input moments; 0 turns it off"))
    fusion_distill_max_teachers: int = Field(default=0, ge=0, description=(
        "with more clients, the distillation's teacher is the ensemble of this many of "
        "them drawn at random (faster, less accurate); 0: all of them"))
    fusion_distill_teacher: Literal["gated", "mixed", "class-weighted", "mean"] = Field(
        default="gated", description=(
            "the distillation's teacher: half class-weighted, half the mean with each "
            "client weighted input by input by its density there, from its input moments "
            "(gated); half class-weighted, half mean (mixed); each class averaged over the "
            "clients with their shares of its examples (their label counts); or the plain "
            "weighted mean"))
    fusion_distill_mixture: float = Field(default=1.0, ge=0, le=1, description=(
        "the share of the distillation's synthetic inputs drawn from the mixture of the "
        "clients' own input Gaussians, the rest from their pooled moments' one Gaussian"))
    fusion_distill_temperature: float = Field(default=1.0, gt=0, description=(
        "softmax temperature of the teachers and the student in the distillation's loss"))
    fusion_distill_schedule: Literal["constant", "cosine"] = Field(
        default="constant", description=(
            "the distillation's learning rate: constant, or cosine-annealed to 0"))
    fusion_distill_patience: int = Field(default=0, ge=0, description=(
        "stop the distillation after this many measurements (every 50 steps) without "
        "improvement on held-out synthetic inputs, keeping the best; 0: every step"))
    fusion_max_weight_ratio: float = Field(default=2.0, ge=0, description=(
        "cap every client's weight (its claimed num-examples) at this multiple of the "
        "median claim; 0 turns the cap off"))
    fusion_max_norm_ratio: float = Field(default=2.0, ge=0, description=(
        "clip every client's weight tensors (not biases), in the fusion's averages, at "
        "this multiple of the median client's norm; 0 turns the clipping off"))
    fusion_robust_screen: bool = Field(default=True, description=(
        "exclude the clients whose predictions on synthetic inputs are flat, "
        "misclassify the class probes of their classes, or are outliers among the "
        "clients'"))
    fusion_robust_screen_threshold: float = Field(default=5.0, gt=0, description=(
        "robust standard deviations above the median disagreement that make a client "
        "an outlier"))
    fusion_robust_min_spread: float = Field(default=0.1, ge=0, lt=1, description=(
        "exclude a client whose predictions change from input to input less than this "
        "share of the median client's; 0: not checked"))
    fusion_robust_probe_steps: int = Field(default=20, ge=0, description=(
        "Adam steps shaping the class probes; 0: no class probes"))
    fusion_robust_probe_error: float = Field(default=0.3, gt=0, le=1, description=(
        "exclude a client whose error on the class probes of its claimed classes "
        "exceeds the median client's by more than this"))
    fusion_robust_aggregate: Literal["mean", "trimmed-mean", "median"] = Field(
        default="mean", description=(
            "how the aligned client tensors are combined: mean, or robustly per coordinate"))
    fusion_robust_trim: float = Field(default=0.25, ge=0, lt=0.5, description=(
        "share of the weight removed from each end by the trimmed mean"))
    fusion_robust_quiet_inputs: float = Field(default=0.0, ge=0, lt=1, description=(
        "input features whose variance is at most this multiple of the median "
        "feature's are quiet: the distillation teaches the fused model to ignore them "
        "and a first Linear's weights on them fold into its bias (a trigger on pixels "
        "the data leaves blank reaches little); 0: off"))
    send_input_moments: bool = Field(default=True, description=(
        "clients send the per-feature mean and variance of their training inputs, "
        "which the server's distillation needs"))
    send_input_components: int = Field(default=INPUT_COMPONENTS, ge=0, description=(
        "with send-input-moments, clients also send up to this many principal "
        "components of their training inputs (one per 10 examples at most), along which "
        "the server draws its synthetic inputs correlated as the data are; 0: none"))
    send_class_moments: bool = Field(default=False, description=(
        "with send-input-moments, clients also send them per class (each class's mean "
        "image and variance, for the classes with at least 10 examples): the server "
        "then draws its synthetic inputs class by class"))
    round_timeout: float = Field(default=3600.0, gt=0, description=(
        "seconds the server waits for the replies of a round; the round then goes on "
        "with the replies it has"))
    output_dir: str = "outputs"
    resume: bool = Field(default=False, description=(
        "continue the run from the last completed round saved in <output-dir>/checkpoint"))

    @field_validator("model_kwargs")
    @classmethod
    def _json_object(cls, value: str) -> str:
        json_object(value, "model-kwargs")
        return value

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> RunConfig:
        """Parse ``context.run_config``; keys left out take their defaults."""
        return cls.model_validate(dict(run_config))

    def as_run_config(self) -> dict[str, object]:
        return self.model_dump(by_alias=True)

    def client_seed(self, node: int) -> int:
        """The seed of client ``node``'s own initialisation and training batches."""
        return client_seed(self.seed, node)

    def build_model(self, seed: int | None = None):
        """The run's zoo model with ``model-kwargs``, initialised from ``seed`` (default:
        the run's seed)."""
        from otfusion.zoo import build_model  # torch: not for --help

        return build_model(self.model, seed=self.seed if seed is None else seed,
                           **json.loads(self.model_kwargs))

    def fusion(self):
        """The :class:`~otfusion.fusion.FusionConfig` of these settings; with
        ``strategy=fedavg``, the weighted average (FedAvg)."""
        from otfusion.fusion import FusionConfig  # torch: not for --help

        if self.strategy == "fedavg":
            return FusionConfig(method="average")
        return FusionConfig.from_options(
            method=self.fusion_method, solver=self.fusion_solver, reg=self.fusion_reg,
            max_iter=self.fusion_max_iter, neuron_weights=self.fusion_neuron_weights,
            rescale=self.fusion_rescale, distill_steps=self.fusion_distill_steps,
            distill_max_teachers=self.fusion_distill_max_teachers or None,
            distill_teacher=self.fusion_distill_teacher,
            distill_mixture=self.fusion_distill_mixture,
            distill_temperature=self.fusion_distill_temperature,
            distill_schedule=self.fusion_distill_schedule,
            distill_patience=self.fusion_distill_patience or None,
            max_weight_ratio=self.fusion_max_weight_ratio or None,
            max_norm_ratio=self.fusion_max_norm_ratio or None,
            robust_screen=self.fusion_robust_screen,
            robust_screen_threshold=self.fusion_robust_screen_threshold,
            robust_min_spread=self.fusion_robust_min_spread or None,
            robust_probe_steps=self.fusion_robust_probe_steps,
            robust_probe_error=self.fusion_robust_probe_error,
            robust_aggregate=self.fusion_robust_aggregate,
            robust_trim=self.fusion_robust_trim,
            robust_quiet_inputs=self.fusion_robust_quiet_inputs or None)
