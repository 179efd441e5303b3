"""Configuration of the fusion engine: one part per stage, each read by its own stage.

:class:`FusionConfig` holds the method and the ground cost, and one part per stage of a
fusion: :class:`TransportConfig` (the OT solver), :class:`BarycenterConfig` (the
free-support iterations), :class:`AveragingConfig` (how coupled neurons are averaged)
and :class:`DistillationConfig` (the optional post-fusion distillation), and
:class:`RobustConfig` (the defences against hostile clients). Every stage's
function takes only its part. What the defaults measure on the benchmarks is in the
README ("Fusion quality"), where the figures are kept up to date, not here.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TransportConfig(_Part):
    """One optimal-transport solve between two discrete measures.

    Parameters
    ----------
    solver : "exact" | "sinkhorn"
        Exact optimal transport (a linear assignment when the measures are uniform of
        equal size, POT's network simplex otherwise) or entropic OT (POT's log-domain
        Sinkhorn).
    reg : float
        Entropic regularisation for ``sinkhorn``, relative to the largest cost entry.
    max_iter, tol : int, float
        Iteration cap of a single Sinkhorn solve, and its stopping threshold: the
        violation of the client marginal relative to that marginal's norm.
    """

    solver: Literal["exact", "sinkhorn"] = "exact"
    reg: float = Field(default=0.01, gt=0)
    max_iter: int = Field(default=1000, ge=1)
    tol: float = Field(default=1e-4, ge=0)


class BarycenterConfig(_Part):
    """The free-support Wasserstein barycenter of one layer group.

    Parameters
    ----------
    max_iter, tol : int, float
        Iterations per layer group, stopped once the relative change of the support
        falls below ``tol``.
    support_clients : int or None
        With more clients than this, the support is moved by this many clients of
        largest weight, and every client is then coupled once to the final support (one
        transport problem per client instead of ``max_iter``). None: all clients move it.
    workers : int
        Threads solving the clients' transport problems of one iteration concurrently
        (0: one per CPU). The result does not depend on it.
    gw_weight : float
        Weight of the hidden-to-hidden term in ``gromov-wasserstein`` mode.
    gw_damping : float
        Step of the damped fixed point used for the quadratic term (1 = no damping).
    """

    max_iter: int = Field(default=5, ge=1)
    tol: float = Field(default=1e-6, ge=0)
    support_clients: int | None = Field(default=64, ge=1)
    workers: int = Field(default=0, ge=0)
    gw_weight: float = Field(default=1.0, ge=0)
    gw_damping: float = Field(default=0.5, gt=0, le=1)


class AveragingConfig(_Part):
    """How the client neurons coupled to one fused neuron are averaged.

    Parameters
    ----------
    neuron_weights : "uniform" | "outgoing" | "outgoing-sq"
        With the client weights (``uniform``, the paper's), or with the client weights
        times each neuron's importance, the norm (``outgoing``) or squared norm
        (``outgoing-sq``) of its outgoing weights, renormalised per fused neuron, so that
        a neuron a client barely uses pulls the average less. Data-free; the couplings
        are unchanged.
    rescale : "none" | "norm"
        ``norm``: after averaging, scale every fused hidden neuron's incoming weights and
        bias so that their norm is the (same-weighted) mean norm of the client neurons
        coupled to it, undoing the shrinkage of averaging imperfectly matched neurons
        (a data-free stand-in for REPAIR's variance correction; exact for ReLU units).
    """

    neuron_weights: Literal["uniform", "outgoing", "outgoing-sq"] = "outgoing-sq"
    rescale: Literal["none", "norm"] = "norm"


class DistillationConfig(_Part):
    """Post-fusion distillation from the clients' ensemble on synthetic inputs
    (:mod:`~otfusion.fusion.distillation`).

    Parameters
    ----------
    steps : int
        Adam steps; 0 turns the distillation off.
    samples, batch_size, lr, seed : int, int, float, int
        Number of synthetic inputs (drawn once), batch size, Adam learning rate, and the
        seed of the inputs, the batches and any dropout masks.
    tol : float
        No training when the fused model's KL divergence from the ensemble on the
        synthetic inputs is already at most this (e.g. fused permuted copies of one
        model, which must stay exactly that model).
    max_teachers : int or None
        With more clients than this, the ensemble is that of this many of them, drawn
        uniformly at random (a fixed draw from ``seed``; their weights renormalised):
        every teacher predicts every synthetic input, the distillation's largest cost
        with many clients. None (the default): all the clients. Measured on the digits
        with 1000 clients of about two examples each, 256 teachers cost 26 points of
        global accuracy, which is why it is off by default.
    teacher : "gated" | "mixed" | "class-weighted" | "mean"
        The ensemble the student learns. ``class-weighted`` (it needs the clients' label
        counts, ``class_weights``, and is ``mean`` without them): the probability of
        class ``c`` averaged over the clients with their shares of class ``c``'s
        examples (as the fused head is), then normalised, so that a client that never
        saw a class does not vote for it. ``mean``: the weighted mean of the clients'
        class probabilities. ``mixed``: half of each; it is within 0.3 points of the
        class-weighted one on the digits and 4-7 points above it on deep nets, where the
        mean teacher wins. ``gated`` (the default): half class-weighted, half the mean
        with every client weighted input by input by its Gaussian density there, from
        the input moments it sent (:mod:`~otfusion.fusion.gating`), so that an input is
        taught by the clients that saw inputs like it; it needs every teacher's own
        moments (``input_moments`` as one entry per client, as the strategy passes
        them) and is ``mixed`` without them. On the test images it is the better
        ensemble under label skew (digits MLP, K = 8, Dir(0.1): 97.0% against 69.3% for
        the plain ensemble, mean of 3 seeds), and its students gain up to 8 points
        there over the mixed teacher's (README, "Fusion quality").
    schedule : "constant" | "cosine"
        The learning rate over the steps: constant, or cosine-annealed from ``lr`` to 0
        over ``steps``.
    temperature : float
        Softmax temperature of the teachers' and the student's probabilities in the
        training loss (scaled by its square, as in Hinton et al.); the divergences
        reported and used for early stopping are at temperature 1.
    correlated : float
        The share of the synthetic inputs drawn correlated along the clients' principal
        components (``InputMoments.components``, sent by the ClientApp with
        ``send-input-components``) when there are any; the rest are drawn feature by
        feature. Measured (``benchmarks/distillation_ablation.py``), all correlated gains
        up to 17 points on Fashion-MNIST but loses 5 on the digits MLP at Dir(0.1);
        half of each keeps most of the gain and about half the loss.
    mixture : float
        The share of the synthetic inputs drawn from the mixture of the clients' own
        Gaussians (each input from one client's moments, the client drawn with its
        weight; :func:`~.moments.mixture_inputs`) when every client sent its own
        moments, as the strategy passes them, and none per class; the rest, and all of
        them otherwise, from the pooled moments (class by class when sent per class).
        Under label skew the clients' Gaussians sit where their data are, and the one
        pooled Gaussian between them. Measured (``benchmarks/distillation_ablation.py``,
        3 seeds; README, "Fusion quality"), all from the mixture (the default) gains
        0.8-3.3 points in six of the eight non-IID cells of the digits (K = 8) and
        Fashion-MNIST (K = 5) and is within 0.2 points elsewhere.
    patience, eval_every : int or None, int
        Early stopping: every ``eval_every`` steps the student's divergence from the
        teachers is measured on held-out synthetic inputs (a quarter as many as
        ``samples``, drawn after them); training stops after ``patience`` measurements
        without improvement, and the student of the best measurement is kept. None:
        all ``steps`` are taken.
    """

    steps: int = Field(default=300, ge=0)
    samples: int = Field(default=2000, ge=1)
    batch_size: int = Field(default=128, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    seed: int = 0
    tol: float = Field(default=1e-6, ge=0)
    max_teachers: int | None = Field(default=None, ge=1)
    teacher: Literal["gated", "mixed", "class-weighted", "mean"] = "gated"
    schedule: Literal["constant", "cosine"] = "constant"
    temperature: float = Field(default=1.0, gt=0)
    patience: int | None = Field(default=None, ge=1)
    eval_every: int = Field(default=50, ge=1)
    correlated: float = Field(default=0.5, ge=0, le=1)
    mixture: float = Field(default=1.0, ge=0, le=1)


class RobustConfig(_Part):
    """Defences against hostile but well-formed clients (:mod:`~otfusion.fusion.robust`).

    Parameters
    ----------
    max_weight_ratio : float or None
        Cap every client's weight (its claimed number of examples) at this multiple of
        the median weight, and the total of its label counts (``class_weights``) at
        this multiple of the median total, scaling its counts down; None: no cap.
    max_norm_ratio : float or None
        Clip every client's weight tensors (not biases), in the fusion's averages (and
        its barycenter), at this multiple of the median client's norm of the same
        tensor (:func:`~.robust.clip_norms`): a scaled model (say, sign-flipped and
        multiplied by three) pulls no harder than one of this norm, and its neuron
        importances (``averaging.neuron_weights``, squared norms) no higher. The
        screening and the distillation's teachers see the models as sent. None: no
        clipping. Both caps need three clients or more.
    screen : bool
        Exclude the clients whose predictions on the synthetic (or given) inputs are
        outliers among the clients', before fusing and before distilling (with five
        clients or more; without input moments or inputs there is nothing to screen on).
    screen_threshold : float
        How many robust standard deviations of the clients' disagreement scores above
        their median make a client an outlier.
    min_spread : float or None
        The screening also excludes a client whose predictions change from input to
        input less than this share of the median client's (a constant or dead network;
        with three clients or more). None: not checked.
    probe_steps : int
        The screening also excludes a client that misclassifies the class probes of the
        classes it claims: synthetic inputs moved by this many Adam steps until the
        clients claiming their class agree on it (:mod:`~otfusion.fusion.screening`;
        with five clients or more). 0: not checked.
    probes_per_class : int
        Class probes per claimed class.
    probe_error : float
        A client is excluded when its error on the class probes of the classes it
        claims exceeds the median client's by more than this.
    aggregate : "mean" | "trimmed-mean" | "median"
        How the clients' tensors, once mapped into the fused coordinates, are combined
        (in the barycenter's support updates and the final averaging): the weighted
        mean, or a weighted trimmed mean or median per coordinate. The robust ones weigh
        clients by their (capped) weights alone: ``averaging.neuron_weights``, which a
        client controls through its own weights, is then not used.
    trim : float
        Share of the weight removed from each end by ``trimmed-mean``.
    quiet_inputs : float or None
        The input features that more than half of the clients vary at most this
        multiple of the median feature's variance are quiet
        (:mod:`~otfusion.fusion.quiet_inputs`): the distillation teaches the fused
        model to ignore them (any architecture), and a first ``nn.Linear``'s weights on
        them are folded into its bias. A backdoor's trigger on pixels the clients' data
        leaves blank then reaches little or nothing, and an honest minority whose data
        uses them loses them. Needs the clients' own input moments (three or more;
        pooled ones give none). None (the default): off.
    """

    max_weight_ratio: float | None = Field(default=2.0, gt=1)
    max_norm_ratio: float | None = Field(default=2.0, gt=1)
    screen: bool = True
    screen_threshold: float = Field(default=5.0, gt=0)
    min_spread: float | None = Field(default=0.1, gt=0, lt=1)
    probe_steps: int = Field(default=20, ge=0)
    probes_per_class: int = Field(default=8, ge=1)
    probe_error: float = Field(default=0.3, gt=0, le=1)
    aggregate: Literal["mean", "trimmed-mean", "median"] = "mean"
    trim: float = Field(default=0.25, ge=0, lt=0.5)
    quiet_inputs: float | None = Field(default=None, gt=0, lt=1)


# Flat option name -> (part, field): the names of the run config and the CLI flags.
_FLAT_OPTIONS: dict[str, tuple[str, str]] = {
    "solver": ("transport", "solver"),
    "reg": ("transport", "reg"),
    "sinkhorn_max_iter": ("transport", "max_iter"),
    "sinkhorn_tol": ("transport", "tol"),
    "max_iter": ("barycenter", "max_iter"),
    "tol": ("barycenter", "tol"),
    "support_clients": ("barycenter", "support_clients"),
    "workers": ("barycenter", "workers"),
    "gw_weight": ("barycenter", "gw_weight"),
    "gw_damping": ("barycenter", "gw_damping"),
    "neuron_weights": ("averaging", "neuron_weights"),
    "rescale": ("averaging", "rescale"),
    **{f"distill_{name}": ("distillation", name)
       for name in ("steps", "samples", "batch_size", "lr", "seed", "tol", "max_teachers",
                    "teacher", "schedule", "temperature", "patience", "eval_every",
                    "correlated", "mixture")},
    "max_weight_ratio": ("robust", "max_weight_ratio"),
    "max_norm_ratio": ("robust", "max_norm_ratio"),
    **{f"robust_{name}": ("robust", name)
       for name in ("screen", "screen_threshold", "min_spread", "probe_steps",
                    "probes_per_class", "probe_error", "aggregate", "trim",
                    "quiet_inputs")},
}


def option_name(location: Sequence[str | int]) -> str:
    """The flat option name (as in :meth:`FusionConfig.from_options`) of a field's
    location in a validation error, e.g. ``("transport", "reg")`` -> ``reg``."""
    wanted = tuple(str(part) for part in location)
    for name, path in _FLAT_OPTIONS.items():
        if path == wanted:
            return name
    return "_".join(wanted)


def _nested(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with its flat option names moved into their parts."""
    nested: dict[str, Any] = {}
    parts: dict[str, dict[str, Any]] = {}
    for key, value in options.items():
        if key in _FLAT_OPTIONS:
            part, field = _FLAT_OPTIONS[key]
            parts.setdefault(part, {})[field] = value
        else:
            nested[key] = value
    for part, fields in parts.items():
        given = nested.get(part, {})
        if isinstance(given, BaseModel):
            given = given.model_dump()
        nested[part] = {**given, **fields}
    return nested


class FusionConfig(BaseModel):
    """How client models are fused.

    Parameters
    ----------
    method : "wasserstein" | "gromov-wasserstein" | "average"
        ``wasserstein`` aligns every layer group with a free-support Wasserstein
        barycenter and transports recurrent hidden-to-hidden matrices with the coupling
        found from the input weights (the FedMA way). ``gromov-wasserstein`` adds the
        quadratic hidden-to-hidden term to the cost of recurrent groups, solved by
        iterated linearisation. ``average`` is the coordinate-wise weighted average
        (FedAvg), which needs equal widths and is never distilled.
    cost : "weights" | "activations"
        Ground cost between neurons: squared distance of their incoming weights in the
        fused model's coordinates, or of their activations on a batch of inputs passed
        to :func:`~otfusion.fusion.fuse` (by their weights still where those activations
        also carry other hidden units: MLP-Mixer's token mixing over channels).
    max_activation_samples : int
        Columns kept per neuron when ``cost="activations"`` (samples x positions).
    transport, barycenter, averaging, distillation, robust
        The parts read by each stage; see their classes. Whether a fusion given the
        clients' input moments is distilled is decided by :attr:`distils` alone.

    :meth:`from_options` builds one from the flat option names of the run config and the
    ``otfusion`` command (``reg``, ``max_iter``, ``distill_steps``, ...). Passing those
    names to the constructor still works but is deprecated.

    The defaults (``outgoing-sq`` neuron weights, ``norm`` rescaling, 300 distillation
    steps) are the best measured on the benchmarks; ``uniform``/``none`` without
    distillation is the paper's method.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["wasserstein", "gromov-wasserstein", "average"] = "wasserstein"
    cost: Literal["weights", "activations"] = "weights"
    max_activation_samples: int = Field(default=4096, ge=1)
    transport: TransportConfig = TransportConfig()
    barycenter: BarycenterConfig = BarycenterConfig()
    averaging: AveragingConfig = AveragingConfig()
    distillation: DistillationConfig = DistillationConfig()
    robust: RobustConfig = RobustConfig()

    @classmethod
    def from_options(cls, **options: Any) -> FusionConfig:
        """A config from flat option names (``solver``, ``reg``, ``sinkhorn_max_iter``,
        ``max_iter``, ``tol``, ``neuron_weights``, ``distill_steps``, ...) and the
        top-level fields; the names of the run config and the ``otfusion`` flags."""
        return cls.model_validate(_nested(options))

    def replace(self, **options: Any) -> FusionConfig:
        """A validated copy with some fields changed; flat option names as in
        :meth:`from_options`."""
        return self.from_options(**{**self.model_dump(exclude_unset=True), **options})

    @property
    def distils(self) -> bool:
        """Whether a fusion given the clients' input moments is distilled afterwards: by
        an optimal-transport method with ``distillation.steps > 0``. ``average`` is
        FedAvg and is never distilled."""
        return self.method != "average" and self.distillation.steps > 0

    @model_validator(mode="before")
    @classmethod
    def _flat_keywords(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and _FLAT_OPTIONS.keys() & data.keys():
            flat = sorted(_FLAT_OPTIONS.keys() & data.keys())
            warnings.warn(f"FusionConfig({', '.join(flat)}=...) is deprecated: use "
                          "FusionConfig.from_options(...) or the nested parts "
                          "(transport=, barycenter=, averaging=, distillation=)",
                          DeprecationWarning, stacklevel=4)
            return _nested(data)
        return data
