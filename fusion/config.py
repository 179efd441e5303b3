"""Configuration of the fusion engine."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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
        (FedAvg), which needs equal widths.
    solver : "exact" | "sinkhorn"
        Exact optimal transport (a linear assignment when the measures are uniform of
        equal size, POT's network simplex otherwise) or entropic OT (POT's log-domain
        Sinkhorn).
    reg : float
        Entropic regularisation for ``sinkhorn``, relative to the largest cost entry.
    cost : "weights" | "activations"
        Ground cost between neurons: squared distance of their incoming weights in the
        fused model's coordinates, or of their activations on a batch of inputs passed
        to :func:`fuse`.
    max_iter, tol : int, float
        Free-support barycenter iterations per layer group, stopped once the relative
        change of the support falls below ``tol``. Few clients converge in 2-3
        iterations; with 100 clients, 5 iterations reached 38.0% and 20 reached 38.9%
        at four times the cost, hence the default.
    support_clients : int or None
        With more clients than this, the barycenter support is moved by this many
        clients of largest weight, and every client is then coupled once to the final
        support (one transport problem per client instead of ``max_iter``). None: all
        clients move it. 1000 MLPs 400-200-100 on 2 cores: 41 s with 64, 100 s with
        None; 100 clients: 7.9 s and 17.5 s.
    gw_weight : float
        Weight of the hidden-to-hidden term in ``gromov-wasserstein`` mode.
    gw_damping : float
        Step of the damped fixed point used for the quadratic term (1 = no damping).
    sinkhorn_max_iter, sinkhorn_tol : int, float
        Iteration cap of a single Sinkhorn solve, and its stopping threshold: the
        violation of the client marginal relative to that marginal's norm.
    max_activation_samples : int
        Columns kept per neuron when ``cost="activations"`` (samples x positions).
    workers : int
        Threads solving the clients' transport problems of one iteration concurrently
        (0: one per CPU). The result does not depend on it.
    neuron_weights : "uniform" | "outgoing" | "outgoing-sq"
        How the clients' neurons coupled to one fused neuron are averaged (the couplings
        are unchanged): with the client weights (``uniform``, the paper's), or with the
        client weights times each neuron's importance, the norm (``outgoing``) or
        squared norm (``outgoing-sq``) of its outgoing weights, renormalised per fused
        neuron, so that a neuron a client barely uses (a feature of classes it never
        saw) pulls the average less. Data-free.
    rescale : "none" | "norm"
        ``norm``: after averaging, scale every fused hidden neuron's incoming weights and
        bias so that their norm is the (same-weighted) mean norm of the client neurons
        coupled to it, undoing the shrinkage of averaging imperfectly matched neurons
        (a data-free stand-in for REPAIR's variance correction; exact for ReLU units,
        whose output scales with it).

    distill_steps : int
        Post-fusion distillation, done when :func:`fuse` gets the clients' input
        moments: this many Adam steps train the fused model to predict the clients'
        weighted mean class probabilities on synthetic inputs drawn from those moments
        (see :mod:`~otfusion.fusion.distillation`). 0 turns it off. On the
        non-IID digits splits (Dirichlet 0.5 and 0.1, K = 4, 8; 3 seeds) the MLP was
        best at 300 steps (mean 86.0%, against 83.6% at 600 and 82.1% at 1000: longer
        distillation moves it towards the weaker ensemble), the CNN at 1000 (85.3%
        against 81.8% at 300), whose fused start is further from the ensemble.
    distill_samples, distill_batch_size, distill_lr, distill_seed : int, int, float, int
        Number of synthetic inputs (drawn once), batch size, Adam learning rate, and the
        seed of the inputs and batches.
    distill_tol : float
        No distillation when the fused model's KL divergence from the ensemble on the
        synthetic inputs is already at most this (e.g. fused permuted copies of one
        model, which must stay exactly that model).

    Defaults: ``outgoing-sq`` and ``norm`` (with the label-weighted head of
    :class:`~otfusion.strategies.OTFusion`) beat the paper's ``uniform``/``none`` in 8
    of 9 MLP settings (K = 2, 4, 8; IID, Dirichlet 0.5 and 0.1; mean of 3 seeds), by up
    to 16 points on non-IID splits, and were never worse for the CNN and the LSTM at
    K=4. With the distillation, the default closes at least 92% of the gap between
    FedAvg and the ensemble in all 27 MLP, CNN and LSTM settings, and beats the best
    client on every non-IID split (see benchmarks/fusion_quality.py and the README).
    ``uniform``/``none`` without distillation is the paper's method.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["wasserstein", "gromov-wasserstein", "average"] = "wasserstein"
    solver: Literal["exact", "sinkhorn"] = "exact"
    reg: float = Field(default=0.01, gt=0)
    cost: Literal["weights", "activations"] = "weights"
    max_iter: int = Field(default=5, ge=1)
    tol: float = Field(default=1e-6, ge=0)
    support_clients: int | None = Field(default=64, ge=1)
    gw_weight: float = Field(default=1.0, ge=0)
    gw_damping: float = Field(default=0.5, gt=0, le=1)
    sinkhorn_max_iter: int = Field(default=1000, ge=1)
    sinkhorn_tol: float = Field(default=1e-4, ge=0)
    max_activation_samples: int = Field(default=4096, ge=1)
    workers: int = Field(default=0, ge=0)
    neuron_weights: Literal["uniform", "outgoing", "outgoing-sq"] = "outgoing-sq"
    rescale: Literal["none", "norm"] = "norm"
    distill_steps: int = Field(default=300, ge=0)
    distill_samples: int = Field(default=2000, ge=1)
    distill_batch_size: int = Field(default=128, ge=1)
    distill_lr: float = Field(default=1e-3, gt=0)
    distill_seed: int = 0
    distill_tol: float = Field(default=1e-6, ge=0)
