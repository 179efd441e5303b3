"""An alignment graph written by hand, as data: which tensor axes share one coupling.

In the spirit of Git Re-Basin's permutation specs and mergekit's architecture files,
for models the tracer cannot describe::

    graph = alignment_spec(
        {"fc1.weight": ("h1", None), "fc1.bias": ("h1",),
         "fc2.weight": ("h2", "h1"), "fc2.bias": ("h2",),
         "head.weight": ("classes", "h2"), "head.bias": ("classes",)},
        outputs={"classes"},
    )
    fused = fuse(models, graph=graph)

Each state_dict entry maps to one label per axis: a group name, or None for an axis
that is never permuted (input features, kernel positions). A tensor's first labelled
axis holds its own units (their incoming weights, biases); any other labelled axis
holds the inputs it reads from that group. Groups are solved in the order they first
appear as a tensor's own units.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .spec import AlignmentGraph, AxisSpec, Group, TensorSpec


def alignment_spec(axes: Mapping[str, tuple[str | None, ...]], outputs: Iterable[str] = (),
                   follows: Iterable[str] = (), blocks: Mapping[str, int] | None = None,
                   block_sources: Mapping[str, str] | None = None,
                   rigid: Iterable[str] = ()) -> AlignmentGraph:
    """The graph of ``axes`` (state_dict name -> one label or None per axis).

    ``outputs``: groups that are the model's outputs (classes), never permuted.
    ``follows``: tensors that follow their units without defining them (normalisation
    parameters and statistics, and the second name of a tied weight, such as a language
    model's head sharing the embedding); every other labelled tensor enters the
    transport cost.
    ``blocks``: groups whose couplings may only move whole blocks of units (a GroupNorm's
    groups, attention heads): label -> number of blocks.
    ``block_sources``: groups whose blocks must move as another group's blocks move
    (the value/output heads of an attention layer follow its query/key heads): label ->
    label of the group they follow, both in ``blocks`` with the same count.
    ``rigid``: groups in ``blocks`` whose units keep their places within their block
    (queries and keys under rotary position embeddings): only whole blocks move.
    """
    blocks, block_sources = dict(blocks or {}), dict(block_sources or {})
    follows, outputs, rigid = set(follows), set(outputs), set(rigid)
    order: list[str] = []
    for labels in axes.values():
        own = next((label for label in labels if label is not None), None)
        if own is not None and own not in order:
            order.append(own)
    for labels in axes.values():
        order.extend(label for label in labels if label is not None and label not in order)
    unknown = (outputs | set(blocks) | set(block_sources) | set(block_sources.values())
               ) - set(order)
    if unknown:
        raise ValueError(f"alignment spec: groups {sorted(unknown)} label no axis")
    unblocked = sorted(label for label in rigid if blocks.get(label, 1) == 1)
    if unblocked:
        raise ValueError(f"alignment spec: groups {unblocked} keep their units' places "
                         "within blocks (rigid=), but have no blocks= (> 1)")
    for label, source in block_sources.items():
        if blocks.get(label, 1) == 1 or blocks.get(label) != blocks.get(source):
            raise ValueError(
                f"alignment spec: group '{label}' follows the blocks of '{source}', so both "
                f"need the same number of blocks (> 1) in blocks= (got "
                f"{blocks.get(label, 1)} and {blocks.get(source, 1)})")
        if order.index(source) > order.index(label):
            raise ValueError(f"alignment spec: group '{label}' follows the blocks of "
                             f"'{source}', which must be solved first: list a tensor of "
                             f"'{source}' before every tensor of '{label}'")
    ids = {label: i for i, label in enumerate(order)}
    tensors = {}
    for name, labels in axes.items():
        own = next((i for i, label in enumerate(labels) if label is not None), None)
        specs = tuple(None if label is None else AxisSpec(
            ids[label], "neuron" if i == own else "input") for i, label in enumerate(labels))
        tensors[name] = TensorSpec(name, specs, own is not None and name not in follows)
    groups = tuple(Group(ids[label], label, label in outputs, blocks.get(label, 1),
                         ids.get(block_sources.get(label)), rigid=label in rigid)
                   for label in order)
    return AlignmentGraph(groups, tensors, {}, frozenset(ids[label] for label in outputs))
