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
                   rigid: Iterable[str] = (),
                   heads_of: Mapping[str, str] | None = None) -> AlignmentGraph:
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
    ``heads_of``: groups that hold one value per block of another group in ``blocks`` (a
    bias, slope, temperature or gate per attention head): label -> label of that group.
    """
    blocks, block_sources = dict(blocks or {}), dict(block_sources or {})
    follows, outputs, rigid, heads_of = set(follows), set(outputs), set(rigid), dict(
        heads_of or {})
    order: list[str] = []
    for labels in axes.values():
        own = next((label for label in labels if label is not None), None)
        if own is not None and own not in order:
            order.append(own)
    for labels in axes.values():
        order.extend(label for label in labels if label is not None and label not in order)
    unknown = (outputs | set(blocks) | set(block_sources) | set(block_sources.values())
               | set(heads_of) | set(heads_of.values())) - set(order)
    if unknown:
        raise ValueError(f"alignment spec: groups {sorted(unknown)} label no axis")
    unblocked = sorted(label for label in rigid | set(heads_of.values())
                       if blocks.get(label, 1) == 1)
    if unblocked:
        raise ValueError(f"alignment spec: groups {unblocked} keep their units' places "
                         "within blocks (rigid=) or have values per block (heads_of=), "
                         "but have no blocks= (> 1)")
    chained = sorted(set(heads_of) & set(heads_of.values()))
    if chained:
        raise ValueError(f"alignment spec: groups {chained} hold values per block "
                         "(heads_of=) and are also the blocks of others, which is not supported")
    linked = [*block_sources.items(), *heads_of.items()]
    half_fixed = sorted({pair for pair in linked if (pair[0] in outputs) != (pair[1] in outputs)})
    if half_fixed:
        raise ValueError(f"alignment spec: groups {list(half_fixed[0])} move their blocks "
                         "together (block_sources= or heads_of=), but only one of them is in "
                         "outputs=, which keeps it as it is")
    order = [label for label in order if label not in heads_of] + [
        label for label in order if label in heads_of]  # derived from their heads
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
                         ids.get(block_sources.get(label)), rigid=label in rigid,
                         heads_of=ids.get(heads_of.get(label)))
                   for label in order)
    return AlignmentGraph(groups, tensors, {}, frozenset(ids[label] for label in outputs))
