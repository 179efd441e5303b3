"""``fuse``: layer-wise Wasserstein-barycenter fusion of torch models.

Groups are solved in topological order. For each group every client's member tensors
are mapped to the fused coordinates of the already-solved input groups, a free-support
barycenter couples every client to the fused neurons, and at the end every tensor of
every client is mapped through all its couplings and averaged with the client weights.
"""

from __future__ import annotations

import copy
import functools
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .averaging import (
    AveragingWeights,
    average_states,
    neuron_importance_weights,
    normalize_class_weights,
)
from .barycenter import Points, free_support_barycenter
from .config import FusionConfig
from .distillation import Progress, distill
from .graph import (
    AlignmentGraph,
    Group,
    UnsupportedModelError,
    build_alignment_graph,
    is_recurrent,
)
from .graph.tracer import ExampleRunError
from .modes import temporary_mode
from .moments import InputMoments, pool_moments
from .projection import Coupling, as_rows, dense_state, project, stored_state
from .quiet_inputs import QuietInputs, fold_quiet_inputs, quiet_inputs
from .robust import (
    Combine,
    cap_class_weights,
    cap_weights,
    clip_norms,
    robust_mean,
    weighted_mean,
)
from .screening import screened_out
from .transport import block_marginal, repeated_plan
from .validation import (
    all_finite,
    check_inputs,
    check_models,
    check_same_architecture,
    check_same_shapes,
    normalize_weights,
)

ClientMoments = InputMoments | Sequence[InputMoments | None] | None
"""The clients' input moments: pooled, one entry (or None) per client, or none."""


@dataclass(frozen=True)
class FusionResult:
    """The fused model; per solved group, the mean transport cost and iterations; the
    final KL divergence of the post-fusion distillation (None when not distilled); the
    clients whose weight or label counts were capped (``robust.max_weight_ratio``) and
    those excluded by the screening, with the reason (indices into the models given);
    the seconds spent distilling; the clients whose tensors were clipped
    (``robust.max_norm_ratio``), with their largest norm over the median's; the number
    of quiet input features the fusion found and used (``robust.quiet_inputs``: scrambled
    in the distillation, folded into a first Linear); and the seconds spent
    screening (``robust.screen``)."""

    model: nn.Module
    group_costs: dict[str, float]
    group_iterations: dict[str, int]
    distill_loss: float | None = None
    capped: list[int] = field(default_factory=list)
    excluded: dict[int, str] = field(default_factory=dict)
    distill_seconds: float = 0.0
    clipped: dict[int, float] = field(default_factory=dict)
    quiet_inputs: int = 0
    screen_seconds: float = 0.0


def fuse(models: Sequence[nn.Module], weights: Sequence[float] | None = None,
         config: FusionConfig | None = None, target: nn.Module | None = None,
         inputs: torch.Tensor | None = None,
         class_weights: Sequence[Sequence[float]] | torch.Tensor | None = None,
         input_moments: ClientMoments = None,
         graph: AlignmentGraph | None = None) -> nn.Module:
    """Fuse ``models`` (one architecture family, widths may differ) into one model.

    Parameters
    ----------
    models : sequence of nn.Module
        The client models.
    weights : sequence of float, optional
        Client weights (e.g. numbers of examples); uniform by default.
    config : FusionConfig, optional
        Method, solver and cost; see :class:`FusionConfig`.
    target : nn.Module, optional
        Template of the fused model: its widths are the fused widths and its
        architecture is returned. Default: the model with the largest weight.
    inputs : Tensor, optional
        A batch of inputs; required by ``cost="activations"``, and used to trace
        models that do not declare an ``input_shape``.
    class_weights : (K, num_classes) array, optional
        Per-client, per-class weights of the output layer (e.g. the clients' label
        counts): row ``c`` of every tensor of the model's output group (the head's
        weights and bias of class ``c``) is the average of the clients' rows weighted
        by column ``c``, so a class is fused from the clients that saw it. A class
        with zero total weight falls back to ``weights``. Hidden layers are unaffected.
        The screening (``config.robust.screen``) compares two clients over the classes
        both have a positive weight for.
    input_moments : InputMoments, or one InputMoments (or None) per model, optional
        Per-feature mean and variance of the clients' training inputs, of the shape of
        one model input: already pooled, or per client, pooled here
        (:func:`~otfusion.fusion.moments.pool_moments`) with the capped weights of
        the clients that are not screened out. With them, when ``config.distils`` (an
        optimal-transport method with ``distillation.steps > 0``), the fused model is
        then distilled from the clients' ensemble on synthetic inputs drawn from them;
        the default teacher (``gated``) weighs each client input by input by its own
        moments, so it needs them per client (pooled ones give the ``mixed`` teacher).
        A distillation that fails or diverges leaves the fusion undistilled, with a
        warning.
    graph : AlignmentGraph, optional
        An explicit alignment spec (see :func:`~otfusion.fusion.graph.alignment_spec`)
        instead of the one traced from the model.

    Models in float16 or bfloat16 are fused in float32; the result keeps their dtype.
    """
    return fuse_result(models, weights, config, target, inputs, class_weights,
                       input_moments, graph).model


def fuse_result(models: Sequence[nn.Module], weights: Sequence[float] | None = None,
                config: FusionConfig | None = None, target: nn.Module | None = None,
                inputs: torch.Tensor | None = None,
                class_weights: Sequence[Sequence[float]] | torch.Tensor | None = None,
                input_moments: ClientMoments = None,
                graph: AlignmentGraph | None = None,
                progress: Progress | None = None) -> FusionResult:
    """Like :func:`fuse`, returning the :class:`FusionResult`: the model, the transport
    cost and iterations of every group, and the distillation's final divergence.
    ``progress`` is called during the distillation (see
    :data:`~otfusion.fusion.distillation.Progress`), e.g. to move a progress bar."""
    config = config or FusionConfig()
    models = check_models(models)
    check_inputs(inputs)
    weights, capped = cap_weights(normalize_weights(weights, len(models)),
                                  config.robust.max_weight_ratio)
    if class_weights is not None:
        class_weights, counts_capped = cap_class_weights(class_weights,
                                                         config.robust.max_weight_ratio)
        capped = sorted(set(capped) | set(counts_capped))
    per_client = _per_client_moments(input_moments, len(models))
    excluded, screen_seconds = {}, 0.0
    if config.robust.screen:
        start = time.perf_counter()
        excluded = screened_out(models, _pooled(per_client, weights, input_moments), inputs,
                                config, class_weights)
        screen_seconds = time.perf_counter() - start
    kept = [k for k in range(len(models)) if k not in excluded]
    if excluded:
        models, weights = [models[k] for k in kept], [weights[k] for k in kept]
        if class_weights is not None:
            class_weights = [list(class_weights[k]) for k in kept]
        if per_client is not None:
            per_client = [per_client[k] for k in kept]
    moments = _pooled(per_client, weights, input_moments)
    weights = normalize_weights(weights, len(models))
    per_class = normalize_class_weights(class_weights, weights)
    anchor = max(range(len(models)), key=lambda k: (weights[k], -k))
    original = target if target is not None else models[anchor]
    models, template = _working_precision(models, original)
    names = [f"model {k}" for k in range(len(models))]
    check_same_architecture([template, *models], ["target", *names])
    aligned = config.method != "average"  # the neuron options need couplings
    if graph is None and (aligned or per_class is not None):
        graph = _trace(template, config, inputs)
    states, clipped = clip_norms([dense_state(graph, _compute_state(m, template))
                                  for m in models], config.robust.max_norm_ratio)
    template_state = (states[anchor] if target is None  # the anchor as clipped
                      else dense_state(graph, template.state_dict()))
    if aligned:
        couplings, costs, iterations = _solve(models, states, weights, anchor, template_state,
                                              names, config, inputs, graph)
    else:
        check_same_shapes([template_state, *states], ["target", *names])
        couplings = [{} for _ in models]
        costs, iterations = {}, {}
    averaging = config.averaging
    per_neuron = (neuron_importance_weights(graph, states, couplings, weights,
                                            averaging.neuron_weights)
                  if aligned and averaging.neuron_weights != "uniform"
                  and config.robust.aggregate == "mean" else None)
    fused = average_states(graph, template_state, states, couplings,
                           AveragingWeights(weights, per_class, per_neuron),
                           rescale=aligned and averaging.rescale == "norm",
                           combine=_combiner(config))
    fused = stored_state(graph, fused)
    model = model_with_state(template, fused)
    quiet = (quiet_inputs([m for m in per_client or () if m is not None],
                          config.robust.quiet_inputs) if config.robust.quiet_inputs else None)
    start = time.perf_counter()
    distill_loss = (_distilled(model, models, weights, moments, config, class_weights,
                               progress, quiet, per_client)
                    if moments is not None and config.distils else None)
    distill_seconds = time.perf_counter() - start
    used = quiet is not None and (fold_quiet_inputs(model, quiet) or distill_loss is not None)
    quiet_count = quiet.count if used else 0
    return FusionResult(_in_dtype_of(model, original), costs, iterations, distill_loss,
                        capped, excluded, distill_seconds,
                        {kept[k]: ratio for k, ratio in sorted(clipped.items())}, quiet_count,
                        screen_seconds)


def _per_client_moments(input_moments: ClientMoments, count: int
                        ) -> list[InputMoments | None] | None:
    """``input_moments`` as one entry per model, or None when they come pooled (or not
    at all)."""
    if input_moments is None or isinstance(input_moments, InputMoments):
        return None
    per_client = list(input_moments)
    if len(per_client) != count:
        raise ValueError(f"input_moments has {len(per_client)} entries for {count} models")
    return per_client


def _pooled(per_client: list[InputMoments | None] | None, weights: Sequence[float],
            given: ClientMoments) -> InputMoments | None:
    """The pooled moments: ``given`` when it came pooled, else the clients' that sent
    theirs, pooled with their weights (None when none did)."""
    if per_client is None:
        return given if isinstance(given, InputMoments) else None
    sent = [(m, w) for m, w in zip(per_client, weights, strict=True) if m is not None]
    return pool_moments([m for m, _ in sent], [w for _, w in sent]) if sent else None


def _combiner(config: FusionConfig) -> Combine:
    """How the clients' mapped tensors are combined (:func:`~.robust.robust_mean`; the
    plain :func:`~.robust.weighted_mean` itself for ``mean``, which the barycenter's
    shortcuts recognise)."""
    if config.robust.aggregate == "mean":
        return weighted_mean
    return functools.partial(robust_mean, how=config.robust.aggregate,
                             trim=config.robust.trim)


def traced_graph(model: nn.Module, inputs: torch.Tensor | None = None
                 ) -> AlignmentGraph | None:
    """``model``'s alignment graph, traced on ``inputs`` (or on zeros of its
    ``input_shape``), to pass to every fusion of that architecture; None when it cannot
    be traced (:func:`fuse` then says why)."""
    try:
        check_inputs(inputs)
        return build_alignment_graph(model, _example_input(model, inputs))
    except ValueError:
        return None


def output_width(model: nn.Module, inputs: torch.Tensor | None = None,
                 graph: AlignmentGraph | None = None) -> int | None:
    """The number of classes of ``model`` (the width of its output group, by ``graph``
    or by tracing), or None when it has no single output width or cannot be traced."""
    graph = graph or traced_graph(model, inputs)
    if graph is None:
        return None
    try:
        widths = graph.widths(dense_state(graph, model.state_dict()), "model")
    except ValueError:
        return None
    found = {widths[g] for g in graph.outputs if g in widths}
    return found.pop() if len(found) == 1 else None


def align(model: nn.Module, reference: nn.Module, config: FusionConfig | None = None,
          inputs: torch.Tensor | None = None,
          graph: AlignmentGraph | None = None) -> nn.Module:
    """``model`` expressed in ``reference``'s neuron coordinates.

    Every group of ``model`` is coupled to ``reference``'s neurons (a barycenter with
    weights ``[1, 0]``, whose support stays the reference's), and ``model``'s tensors
    are mapped through its couplings alone. With exact OT and equal widths the
    couplings are permutations, so the result computes the same function as ``model``
    with its hidden units reordered to match ``reference`` (the alignment of
    linear-mode-connectivity studies); with other widths or Sinkhorn it is ``model``
    transported onto ``reference``'s widths, an approximation. Returns a new module
    with ``reference``'s architecture; ``config`` and ``inputs`` are as in :func:`fuse`
    (``method="average"`` is rejected: it aligns nothing).
    """
    config = config or FusionConfig()
    if config.method == "average":
        raise ValueError("align needs an optimal-transport method, not method='average'")
    models, template = _working_precision(check_models([reference, model]), reference)
    check_inputs(inputs)
    names = ["reference", "model"]
    check_same_architecture(models, names)
    graph = graph or _trace(template, config, inputs)
    states = [dense_state(graph, _compute_state(m, template)) for m in models]
    couplings, _, _ = _solve(models, states, [1.0, 0.0], 0, states[0], names, config,
                             inputs, graph)
    aligned = model_with_state(template, stored_state(graph, average_states(
        graph, states[1], states[1:], couplings[1:], AveragingWeights([1.0]))))
    return _in_dtype_of(aligned, reference)


def _distilled(model: nn.Module, teachers: Sequence[nn.Module], weights: Sequence[float],
               moments: InputMoments, config: FusionConfig,
               class_weights: Sequence[Sequence[float]] | torch.Tensor | None = None,
               progress: Progress | None = None, quiet: QuietInputs | None = None,
               client_moments: Sequence[InputMoments | None] | None = None) -> float | None:
    """Distil ``model`` in place (:func:`~.distillation.distill`); its final divergence,
    or None, with a warning and ``model`` unchanged, when the distillation fails or
    diverges: it is an improvement and never costs the fusion its result."""
    before = copy.deepcopy(model.state_dict())
    try:
        loss = distill(model, teachers, weights, moments, config.distillation, class_weights,
                       progress, quiet, client_moments)
        problem = None if math.isfinite(loss) else "diverged (the KL divergence is not finite)"
    except Exception as exc:  # noqa: BLE001 - keep the undistilled fusion
        problem = f"failed ({type(exc).__name__}: {exc})"
    if problem is None:
        return loss
    model.load_state_dict(before)
    warnings.warn(f"distillation {problem}; the fused model is left undistilled",
                  stacklevel=3)
    return None


def _trace(template: nn.Module, config: FusionConfig, inputs) -> AlignmentGraph:
    if config.cost == "activations" and inputs is None:
        raise ValueError("cost='activations' needs a batch of inputs (inputs=x)")
    try:
        return build_alignment_graph(template, _example_input(template, inputs))
    except ExampleRunError as exc:
        if inputs is not None:
            raise
        raise ExampleRunError(f"{exc} (it ran on zeros of its input_shape; a model that takes "
                              "token ids or other integer inputs needs a batch of them: "
                              "inputs=x)") from exc


def _solve(models, states, weights, anchor, template_state, names, config: FusionConfig,
           inputs, graph: AlignmentGraph):
    """Every client's couplings, costs and iterations (:meth:`_GroupSolver.solve_all`);
    the states are dense (:func:`~.projection.dense_state`)."""
    _check_unaligned_axes(graph, [template_state, *states], ["target", *names])
    _check_constants_unaligned(graph, template_state)
    return _GroupSolver(graph, models, states, weights, anchor, template_state, config,
                        inputs).solve_all()


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _working_precision(models: list[nn.Module], template: nn.Module
                       ) -> tuple[list[nn.Module], nn.Module]:
    """float32 copies of the models and the template when any is in float16/bfloat16
    (optimal transport and averaging lose too much there); else they themselves."""
    if not any(t.dtype in _LOW_PRECISION for m in (*models, template)
               for t in m.state_dict().values()):
        return models, template
    widened = {id(m): copy.deepcopy(m).float() for m in (*models, template)}
    return [widened[id(m)] for m in models], widened[id(template)]


def _in_dtype_of(model: nn.Module, original: nn.Module) -> nn.Module:
    """``model`` with ``original``'s dtypes (a no-op unless they differ)."""
    if all(a.dtype == b.dtype for a, b in zip(model.state_dict().values(),
                                               original.state_dict().values(), strict=True)):
        return model
    return model_with_state(original, model.state_dict())


def model_with_state(template: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``template`` holding ``state`` (a full state_dict of fresh tensors, which
    the copy takes over, cast to the template's dtypes and devices): the template's
    own tensors are not copied first, as ``deepcopy`` then ``load_state_dict`` would.
    Falls back to those two when ``state``'s names are not the template's parameters and
    buffers (a module with its own state_dict hooks)."""
    memo: dict[int, torch.Tensor] = {}
    used = set()
    for name, tensor in [*template.named_parameters(remove_duplicate=False),
                         *template.named_buffers(remove_duplicate=False)]:
        value = state.get(name)
        if value is None:
            continue
        used.add(name)
        if id(tensor) in memo:  # tied: the first name's tensor
            continue
        if value.shape != tensor.shape:
            raise ValueError(f"'{name}' has shape {tuple(value.shape)}, but the model's is "
                             f"{tuple(tensor.shape)}")
        value = value.detach().to(tensor.device, tensor.dtype).contiguous()
        memo[id(tensor)] = (nn.Parameter(value, requires_grad=tensor.requires_grad)
                            if isinstance(tensor, nn.Parameter) else value)
    if used != state.keys() or len(state) != len(template.state_dict()):
        model = copy.deepcopy(template)
        model.load_state_dict(state)
        return model
    return copy.deepcopy(template, memo)


def _compute_state(model: nn.Module, template: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict in the template's floating dtype and device."""
    template_state = template.state_dict()
    return {
        name: tensor.to(template_state[name].device, template_state[name].dtype)
        if tensor.is_floating_point() else tensor
        for name, tensor in model.state_dict().items()
    }


def _example_input(template: nn.Module, inputs: torch.Tensor | None) -> torch.Tensor:
    if inputs is not None:
        return _like_parameters(inputs[:2], template)
    shape = getattr(template, "input_shape", None)
    if shape is None:
        raise ValueError(
            f"{type(template).__name__} has no 'input_shape' attribute: pass a batch of "
            "inputs with fuse(..., inputs=x) so the model can be traced"
        )
    return _like_parameters(torch.zeros(2, *shape), template)


def _like_parameters(inputs: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """``inputs`` on the model's device, floating inputs in the dtype of its floating
    parameters (an integer parameter, a frozen table of offsets, says nothing of it)."""
    floating = next((p for p in model.parameters() if p.is_floating_point()), None)
    if inputs.is_floating_point() and floating is not None:
        return inputs.to(floating.device, floating.dtype)
    return inputs.to(next(model.parameters()).device)


def _check_unaligned_axes(graph: AlignmentGraph, states: list[dict[str, torch.Tensor]],
                          names: list[str]) -> None:
    """Axes that are never permuted (inputs, kernels, classes) must match exactly."""
    for spec in graph.tensors.values():
        for axis, a in enumerate(spec.axes):
            if a is not None:
                continue
            sizes = {name: state[spec.name].shape[axis] for name, state in zip(
                names, states, strict=True)}
            if len(set(sizes.values())) > 1:
                raise ValueError(
                    f"'{spec.name}' axis {axis} is not aligned (input features, kernel or "
                    f"classes) but its size differs between models: {sizes}"
                )


def _check_constants_unaligned(graph: AlignmentGraph, state: dict[str, torch.Tensor]
                               ) -> None:
    """A tensor holding infinities (the same in every model, :func:`check_models`) is a
    constant such as a causal mask: no coupling may move it."""
    groups = graph.groups_by_id
    for name, tensor in state.items():
        if tensor.is_floating_point() and not all_finite(tensor) and any(
                a is not None and not groups[a.group].fixed for a in graph.tensors[name].axes):
            raise ValueError(f"'{name}' contains Inf values on hidden units, which the fusion "
                             "permutes and averages: only constants may hold infinities")


class _GroupSolver:
    """Solves the groups of one fusion in order, keeping every client's couplings."""

    def __init__(self, graph: AlignmentGraph, models, states, weights, anchor, template_state,
                 config: FusionConfig, inputs):
        self.graph = graph
        self.states = states
        self.weights = weights
        self.anchor = anchor
        self.config = config
        self.widths = [graph.widths(s, f"model {k}") for k, s in enumerate(states)]
        self.target_widths = graph.widths(template_state, "target")
        self.groups = graph.groups_by_id
        for group in graph.groups:
            sizes = {w[group.id] for w in [self.target_widths, *self.widths] if group.id in w}
            if group.fixed and len(sizes) > 1:
                raise ValueError(
                    f"group '{group.label}' is an input or output of the model and cannot be "
                    f"aligned, but its width differs between models: {sorted(sizes)}"
                )
            heads = self.groups.get(group.heads_of)
            if heads is not None and sizes != {heads.blocks}:
                raise ValueError(f"group '{group.label}' holds one value per head of "
                                 f"'{heads.label}' ({heads.blocks} heads), but has width "
                                 f"{sorted(sizes)}")
            if group.rigid and len(sizes) > 1:
                raise ValueError(
                    f"group '{group.label}' keeps its units at their places within each of "
                    "its blocks (queries and keys under rotary position embeddings), so its "
                    f"width must be the same in every model: {sorted(sizes)}")
        self.couplings: list[dict[int, Coupling]] = [{} for _ in states]
        self.activations = (
            _record_activations(models, graph, inputs, config.max_activation_samples)
            if config.cost == "activations" else None
        )

    def solve_all(self):
        costs, iterations = {}, {}
        for group in self.graph.groups:
            if group.fixed:
                continue
            if group.parts is not None:
                for k, maps in enumerate(self.couplings):
                    maps[group.id] = self.direct_sum(group, k)
                continue
            if group.heads_of is not None or group.repeats is not None:
                self.derive_from_heads(group)
                continue
            points = [self.static_points(group, k) for k in range(len(self.states))]
            if not all(points):
                raise UnsupportedModelError(
                    f"group '{group.label}': no tensor defines its units from already "
                    "aligned inputs, so it cannot be aligned")
            if any(_has_tied_units(p) for p in points):
                points = self.with_tie_breakers(group, points)

            def points_fn(k, self_plan, group=group, points=points):
                if self_plan is None or self.config.method != "gromov-wasserstein":
                    return points[k]
                return {**points[k], **self.recurrent_points(group, k, self_plan)}

            support = self.initial_support(group, points[self.anchor])
            own = self.target_widths[group.id] == self.widths[self.anchor][group.id]
            static = self.config.method != "gromov-wasserstein" or not any(
                is_recurrent(spec) for spec in self.graph.cost_tensors(group.id))
            result = free_support_barycenter(
                points_fn, self.weights, [w[group.id] for w in self.widths], support,
                self.config.barycenter, self.config.transport, group.blocks,
                self.block_couplings(group), group.rigid, combine=_combiner(self.config),
                anchor=self.anchor if own else None, static=static)
            for maps, coupling in zip(self.couplings, result.couplings, strict=True):
                maps[group.id] = coupling
            costs[group.label] = result.cost
            iterations[group.label] = result.iterations
        return self.couplings, costs, iterations

    def block_couplings(self, group: Group) -> list[torch.Tensor] | None:
        """Per client, how ``group``'s blocks must be matched: as its source group's
        blocks (a grouped convolution's output follows its input), if it has one."""
        source = group.block_source
        if source is None:
            return None
        if self.groups[source].fixed:
            like = next(t for t in self.states[0].values() if t.is_floating_point())
            eye = torch.eye(group.blocks, dtype=like.dtype, device=like.device) / group.blocks
            return [eye] * len(self.states)
        return [block_marginal(maps[source].plan, group.blocks) for maps in self.couplings]

    def derive_from_heads(self, group: Group) -> None:
        """The couplings of a group derived from another's heads: values per head move
        as the heads they belong to, repeated heads as the heads they repeat (none move
        if those are fixed; under multi-query attention one head is repeated, whatever
        blocks, a GroupNorm's, its group holds)."""
        heads = self.groups[group.heads_of if group.repeats is None else group.repeats[0]]
        if heads.fixed:
            return
        for maps in self.couplings:
            plan = maps[heads.id].plan
            maps[group.id] = Coupling.from_plan(
                block_marginal(plan, heads.blocks) if group.repeats is None
                else repeated_plan(plan, group.blocks // group.repeats[1], group.repeats[1]))

    def direct_sum(self, group: Group, k: int) -> Coupling:
        """Client ``k``'s coupling of a concatenation, from its parts' couplings."""
        like = next(t for t in self.states[k].values() if t.is_floating_point())
        parts = []
        for part, size in group.parts:
            if part is None or self.groups[part].fixed:
                width = self.widths[k].get(part, size)  # no tensor: as traced
                parts.append(Coupling.identity(width, like))
            else:
                parts.append(self.couplings[k][part])
        return Coupling.direct_sum(parts)

    def static_points(self, group: Group, k: int) -> dict[str, Points]:
        """Member points that do not depend on the group's own coupling."""
        if self.activations is not None and group.id in self.activations[k]:
            return {site: Points.euclidean(rows)
                    for site, rows in self.activations[k][group.id].items()}
        return {
            spec.name: self.weight_points(spec, k, self.couplings[k])
            for spec in self.graph.cost_tensors(group.id)
            if not is_recurrent(spec) and self.inputs_solved(spec, k)
        }

    def tie_breakers(self, group: Group, k: int) -> dict[str, Points]:
        """The members that do not define the group's units, as points: its own (a
        norm's parameters and statistics, a depthwise kernel, a layer whose inputs are
        not aligned yet: a residual branch's output, a recurrent matrix) and those of
        the concatenations it is part of (a DenseNet's norm) at its place there. They
        tell apart units that the defining members cannot (:func:`_has_tied_units`); a
        member with unaligned inputs by its rows' sorted values, which do not depend on
        the order of those inputs."""
        width = self.widths[k][group.id]
        points = {}
        for i, (target, offset) in enumerate(self.enclosing(group.id, k)):
            rows = slice(offset, offset + width)
            for spec in self.graph.tensors.values():
                if spec.neuron_axis is None or spec.axes[spec.neuron_axis].group != target:
                    continue
                aligned = not is_recurrent(spec) and self.inputs_solved(spec, k)
                if spec.cost and aligned:
                    continue  # a defining member
                p = self.weight_points(spec, k, self.couplings[k])
                points[f"{spec.name}#{i}"] = (
                    Points(p.rows[rows], p.sq_norms[rows], p.support_weights, p.scale)
                    if aligned else Points.euclidean(p.rows[rows].sort(dim=1).values))
        return points

    def with_tie_breakers(self, group: Group, points: list[dict[str, Points]]
                          ) -> list[dict[str, Points]]:
        """Every client's ``points`` with the group's :meth:`tie_breakers`, those whose
        rows are as long for every client (sorted rows over unaligned inputs are not,
        when the clients' widths differ)."""
        extra = [self.tie_breakers(group, k) for k in range(len(points))]
        shared = [name for name in extra[0]
                  if len({e[name].rows.shape[1] for e in extra}) == 1]
        return [{**p, **{name: e[name] for name in shared}} for p, e in zip(points, extra,
                                                                            strict=True)]

    def enclosing(self, group: int, k: int, offset: int = 0) -> Iterator[tuple[int, int]]:
        """``group`` and every concatenation holding it, directly or not, each with the
        offset of ``group``'s units in it on client ``k``."""
        yield group, offset
        for outer in self.graph.groups:
            start = 0
            for part, size in outer.parts or ():
                if part == group:
                    yield from self.enclosing(outer.id, k, offset + start)
                start += self.widths[k].get(part, size)

    def inputs_solved(self, spec, k: int) -> bool:
        """Whether every other group on ``spec``'s axes has its coupling already (a
        residual stream is first solved from the members whose inputs are known)."""
        neuron = spec.axes[spec.neuron_axis].group
        return all(a is None or a.group == neuron or a.group in self.couplings[k]
                   or self.groups[a.group].fixed for a in spec.axes)

    def recurrent_points(self, group: Group, k: int, self_plan) -> dict[str, Points]:
        """Hidden-to-hidden members, linearised at the current coupling ``self_plan``."""
        maps = {**self.couplings[k], group.id: Coupling(self_plan)}
        scale = self.config.barycenter.gw_weight
        return {
            spec.name: self.weight_points(spec, k, maps, scale)
            for spec in self.graph.cost_tensors(group.id) if is_recurrent(spec)
        }

    def weight_points(self, spec, k: int, maps: dict[int, Coupling],
                      scale: float = 1.0) -> Points:
        """A client's neurons as their incoming weights in fused coordinates."""
        tensor = self.states[k][spec.name]
        axis = spec.neuron_axis
        neuron = spec.axes[axis]
        rows = as_rows(project(tensor, spec.axes, maps, skip=axis), axis, neuron)
        own = as_rows(tensor, axis, neuron).square().sum(dim=1)
        if all(maps[a.group].permutation is not None for i, a in enumerate(spec.axes)
               if i != axis and a is not None and a.group in maps):
            coverage = torch.ones_like(rows[0])
        else:
            ones = project(torch.ones_like(tensor), spec.axes, maps, skip=axis)
            coverage = as_rows(ones, axis, neuron)[0]
        return Points(rows, own, coverage, scale)

    def initial_support(self, group: Group, points: dict[str, Points]) -> dict[str, torch.Tensor]:
        """The anchor client's neurons (the largest weight), resampled to the fused width
        if it differs."""
        n = self.target_widths[group.id]
        m = self.widths[self.anchor][group.id]
        if n == m:
            return {name: p.rows for name, p in points.items()}
        index = torch.linspace(0, m - 1, n).round().long()
        return {name: p.rows[index.to(p.rows.device)] for name, p in points.items()}


def _has_tied_units(points: dict[str, Points]) -> bool:
    """Whether two of a client's units have the same rows in every member (units pruned
    to zeros, or duplicated): the cost cannot tell them apart, and a tie broken at
    random would average one unit's norm parameters with another's. Rows are compared
    only among units of equal squared norm (in trained models, rarely any)."""
    norms = sum(p.sq_norms for p in points.values())
    _, inverse, counts = torch.unique(norms, return_inverse=True, return_counts=True)
    index = torch.nonzero(counts[inverse] > 1).flatten()
    if len(index) == 0:
        return False
    rows = torch.cat([p.rows[index] for p in points.values()], dim=1)
    return len(torch.unique(rows, dim=0)) < len(index)


def _record_activations(models, graph: AlignmentGraph, inputs: torch.Tensor,
                        max_samples: int) -> list[dict[int, dict[str, torch.Tensor]]]:
    """Per client, per group, per site: the neurons' activations on ``inputs`` as rows."""
    recorded = []
    for model in models:
        modules = dict(model.named_modules())
        rows: dict[int, dict[str, torch.Tensor]] = {}
        handles = []
        for group, sites in graph.activation_sites.items():
            for site in sites:
                def hook(_module, _args, output, site=site, group=group, rows=rows):
                    value = output if site.output_index is None else output[site.output_index]
                    activations = as_rows(value.detach(), site.dim, site.spec)
                    keep = torch.linspace(0, activations.shape[1] - 1,
                                          min(max_samples, activations.shape[1]))
                    rows.setdefault(group, {})[site.module] = activations[
                        :, keep.round().long().to(activations.device)]
                handles.append(modules[site.module].register_forward_hook(hook))
        try:
            with torch.no_grad(), temporary_mode(model):
                model(_like_parameters(inputs, model))
        finally:
            for handle in handles:
                handle.remove()
        recorded.append(rows)
    return recorded


def fuse_models(*args, **kwargs) -> FusionResult:
    """Deprecated name of :func:`fuse_result`."""
    warnings.warn("otfusion.fusion.fuse_models is deprecated: use fuse_result",
                  DeprecationWarning, stacklevel=2)
    return fuse_result(*args, **kwargs)
