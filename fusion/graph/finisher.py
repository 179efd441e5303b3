"""Finishing an alignment graph: the tracer's union-find state (groups merged, blocks,
concatenations, heads and what follows them) turned into the frozen
:class:`~.spec.AlignmentGraph`, with every check that needs the whole model."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from torch import nn

from .spec import ActivationSite, AlignmentGraph, AxisSpec, Group, TensorSpec, UnsupportedModelError

if TYPE_CHECKING:
    from .tracer import Tracer


def merge_blocks(old, new):
    """Two block constraints ``(blocks, source, where)`` on the same channels."""
    if old is None:
        return new
    if old[0] != new[0] or None not in (old[1], new[1]) and old[1] != new[1]:
        raise UnsupportedModelError(f"{new[2]} splits channels into {new[0]} groups, but "
                                    f"{old[2]} splits the same channels differently")
    return old if old[1] is not None else new


def _blocks_to_parts(tracer: Tracer, blocks: dict, parts: dict) -> None:
    """A concatenation split into blocks (a GroupNorm or a grouped convolution after
    ``torch.cat``) is coupled part by part, so every part is split into the same blocks;
    blocks that straddle two parts cannot be kept whole, and are refused. A part that is
    itself a concatenation passes the blocks on to its own parts."""
    pending = [root for root in parts if root in blocks]
    while pending:
        root = pending.pop()
        members = parts[root]
        count, source, where = blocks[root]
        size = sum(width for _, width in members) // count
        if size == 1:
            continue
        if source is not None or any(width % size for _, width in members):
            raise UnsupportedModelError(
                f"{where} splits a concatenation into {count} groups of channels that do "
                "not follow the concatenated tensors' boundaries, which is not supported")
        for group, width in members:
            if group is None or width == size:
                continue
            part = tracer.find(group)
            blocks[part] = merge_blocks(blocks.get(part), (width // size, None, where))
            if part in parts:
                pending.append(part)


def _with_parts(fixed: set[int], parts: dict[int, list[int]]) -> set[int]:
    """``fixed`` and the parts of every concatenation in it (a concatenation kept as it
    is keeps its parts as they are), through nested concatenations."""
    fixed = set(fixed)
    grown = True
    while grown:
        before = len(fixed)
        fixed |= {p for root in parts if root in fixed for p in parts[root]}
        grown = len(fixed) > before
    return fixed


class Finisher:
    """Turns the tracer's union-find state into the frozen graph."""

    def __init__(self, tracer: Tracer):
        self.t = tracer
        find = tracer.find
        derived = {find(g): find(source) for g, (source, _, _) in tracer.repeats.items()}
        for g, heads, _ in tracer.values_per_head:
            derived.setdefault(find(g), find(heads))
        active = {find(g) for g in range(len(tracer.parent)) if g not in tracer.passive}
        active |= {find(g) for g, _, _ in tracer.values_per_head}
        self.members: dict[int, set[int]] = {}  # the groups merged into each root
        for g in range(len(tracer.parent)):
            self.members.setdefault(find(g), set()).add(g)
        roots = set(self.members) - set(tracer.split_groups)
        stateful = {find(g) for g in range(len(tracer.parent)) if g not in tracer.opaque_groups}

        parts = {find(g): [find(p) for p, _ in value if p is not None]
                 for g, value in tracer.parts.items()}
        made = {root: min((g for g in members if g not in tracer.passive), default=root)
                for root, members in self.members.items()}

        def order(root: int, seen: tuple = ()) -> tuple:
            """Groups in the order layers made them (a parameter's axis read before
            does not count: a pad's new channels, a bias added), but repeated heads
            and values per head right after the heads they are derived from, and a
            concatenation right after its last part."""
            if root in seen:
                return (made[root],)
            if root in derived:
                return (*order(derived[root], (*seen, root)), 1, root)
            if parts.get(root):
                return (*max(order(p, (*seen, root)) for p in parts[root]), 1, root)
            return (made[root],)

        # an opaque tensor's own axes have no width
        self.roots = sorted(roots & stateful, key=order)
        explicit = _with_parts({find(g) for g in tracer.fixed}, parts)
        self.fixed = _with_parts(explicit | (roots - active), parts)
        self.canonical = {root: i for i, root in enumerate(self.roots)}
        for group, problem in tracer.unaligned_required:
            if find(group) not in self.fixed:
                raise UnsupportedModelError(problem)
        for group in tracer.split_groups:
            if self.members[find(group)] != tracer.split_members[group] \
                    or tracer.tied_to_others(group):
                raise UnsupportedModelError(
                    f"'{tracer.labels[group]}' is split into pieces (chunk, slices, a GLU, or "
                    "added to a concatenation) and also used "
                    "whole, which is not supported")
        self._refuse_units_of_parameters_alone(roots - active - explicit, parts)

    def _refuse_units_of_parameters_alone(self, unmet: set[int], parts: dict) -> None:
        """Units that only parameters define, and that activations carry or layers read
        (learned latents or queries fed straight into a layer, ``self.q(self.latents)``;
        a weight computed in ``forward``, ``F.linear(x, self.w * self.scale)``), are a
        permutable hidden dimension that no layer of the graph makes: left unaligned,
        they would be averaged as they lie; refused. ``unmet``: the groups of parameters'
        and buffers' own axes that met neither layers nor data. Buffers' own axes (a
        table of frequencies) and what ops without a rule compute stay as they are."""
        t, find, members = self.t, self.t.find, self.members
        used = {find(g) for g in t.carried} | {p for ps in parts.values() for p in ps}
        for uses in (*t.uses.values(), *([(name, axes, packed.cost) for axes in packed.pieces]
                                         for name, packed in t.packed.items())):
            used |= {find(a.group) for _, axes, _ in uses for a in axes
                     if a is not None and a.kind == "input"}
        for root in sorted(unmet & used):
            if members[root] & t.parameter_axes and not members[root] & t.opaque_groups:
                raise UnsupportedModelError(
                    f"'{t.labels[root]}': units that only parameters define, which no layer "
                    "makes (learned latents or queries fed straight into a layer, or a "
                    "weight computed in forward as in F.linear(x, self.w * self.scale)), "
                    "cannot be aligned")

    def _heads_of(self, blocks: dict, parts: dict) -> dict[int, int]:
        """Per group of values per head, the heads it follows. Values met by the heads of
        two groups (one table for every layer) make the later group's blocks follow the
        earlier's (:meth:`_repeats` then matches repeated heads through what they
        repeat)."""
        t, find = self.t, self.t.find
        heads_of: dict[int, int] = {}
        for group, heads, where in t.values_per_head:
            root, source = find(group), find(heads)
            if root in blocks or root in parts:
                raise UnsupportedModelError(
                    f"{where}: '{t.labels[root]}' holds one value per head, and also meets "
                    "other heads or a concatenation, which is not supported")
            earlier = heads_of.setdefault(root, source)
            if earlier != source:
                first, later = sorted((earlier, source))
                heads_of[root] = first
                blocks[later] = merge_blocks(blocks.get(later), (blocks[first][0], first, where))
        return heads_of

    def _repeats(self, blocks: dict, parts: dict) -> dict[int, tuple[int, int]]:
        """Per group of repeated heads, the group it repeats and how many times. Repeated
        heads matched to other repeated heads (the values' to the queries' and keys') are
        matched through the heads they repeat."""
        t, find = self.t, self.t.find
        repeats: dict[int, tuple[int, int]] = {}
        for group, (source, count, where) in t.repeats.items():
            root, origin = find(group), (find(source), count)
            if root in parts or repeats.setdefault(root, origin) != origin:
                raise UnsupportedModelError(f"{where}: '{t.labels[root]}' repeats heads, and "
                                            "also other heads or a concatenation, which is "
                                            "not supported")
        for root, (origin, _) in repeats.items():
            if origin in repeats:
                raise UnsupportedModelError(f"'{t.labels[root]}' repeats heads that are "
                                            "themselves repeated, which is not supported")
        for root, (origin, count) in repeats.items():
            _, leader, where = blocks[root]
            if leader is None:
                continue
            if leader not in repeats or repeats[leader][1] != count:
                raise UnsupportedModelError(f"{where}: repeated heads are matched to heads "
                                            "that are not repeated alike, which is not supported")
            if blocks[root][0] // count > 1:  # one head shared by all (multi-query): no match
                blocks[origin] = merge_blocks(blocks[origin], (
                    blocks[origin][0], repeats[leader][0], where))
            blocks[root] = (blocks[root][0], None, where)
        for root, (_, leader, where) in blocks.items():
            if leader in repeats or leader is not None and root in repeats:
                raise UnsupportedModelError(f"{where}: heads are matched to repeated heads, "
                                            "which is not supported")
        return repeats

    def _fix_linked(self, blocks: dict, heads_of: dict[int, int], parts: dict,
                    repeats: dict[int, tuple[int, int]]) -> None:
        """Groups whose heads move as one another's (a block source and the groups that
        follow it, heads and their values, heads and their repeats) are fixed together:
        one kept as it is (met by data, returned by the model) keeps the heads of the
        others where they are."""
        links: dict[int, set[int]] = {}
        pairs = [*((root, value[1]) for root, value in blocks.items() if value[1] is not None),
                 *heads_of.items(), *((root, origin) for root, (origin, _) in repeats.items())]
        for a, b in pairs:
            links.setdefault(a, set()).add(b)
            links.setdefault(b, set()).add(a)
        members = {root: [self.t.find(p) for p, _ in value if p is not None]
                   for root, value in parts.items()}
        fixed = set()
        while fixed != self.fixed:
            fixed = set(self.fixed)
            self.fixed = _with_parts(fixed | {b for a in fixed for b in links.get(a, ())},
                                     members)

    def canon(self, spec: AxisSpec | None) -> AxisSpec | None:
        if spec is None:
            return None
        root = self.t.find(spec.group)
        if root not in self.canonical:
            raise UnsupportedModelError(f"the units of '{self.t.labels[root]}' are used whole "
                                        "and also split into pieces")
        return replace(spec, group=self.canonical[root])

    def graph(self) -> AlignmentGraph:
        t = self.t
        labels: dict[int, list[str]] = {}
        for g in range(len(t.parent)):
            if g not in t.passive or t.find(g) == g:
                labels.setdefault(t.find(g), []).append(t.labels[g])
        blocks: dict[int, tuple[int, int | None, str]] = {}
        for g, (count, source, where) in t.blocks.items():
            value = (count, None if source is None else t.find(source), where)
            blocks[t.find(g)] = merge_blocks(blocks.get(t.find(g)), value)
        parts = {t.find(g): value for g, value in t.parts.items()}
        if len(parts) < len(t.parts):
            raise UnsupportedModelError("two concatenations are added or otherwise combined "
                                        "unit by unit, which is not supported")
        _blocks_to_parts(t, blocks, parts)
        heads_of = self._heads_of(blocks, parts)
        repeats = self._repeats(blocks, parts)
        self._fix_linked(blocks, heads_of, parts, repeats)
        rigid = {t.find(g) for g in t.rigid}
        rigid |= {origin for root, (origin, _) in repeats.items() if root in rigid}
        for root in rigid - self.fixed:
            if root in parts or blocks.get(root, (1,))[0] == 1:
                raise UnsupportedModelError(
                    f"'{t.labels[root]}' keeps its units in place within heads, but is a "
                    "concatenation or has no heads, which is not supported")
        for root in parts:
            members = [g for g in range(len(t.parent)) if t.find(g) == root
                       and g not in t.passive and g not in t.parts]
            if members:
                raise UnsupportedModelError(
                    f"'{t.labels[root]}' (a concatenation) is added to '{t.labels[members[0]]}'"
                    ", which the alignment graph does not support")
        groups = []
        for root in self.roots:
            count, source, where = blocks.get(root, (1, None, ""))
            if source is not None and self.canonical[source] >= self.canonical[root]:
                raise UnsupportedModelError(f"{where}: heads are matched to heads that "
                                            "are computed later, which is not supported")
            groups.append(Group(
                self.canonical[root], "+".join(labels.get(root, [t.labels[root]])),
                root in self.fixed, count, None if source is None else self.canonical[source],
                tuple((self.canonical.get(t.find(g)) if g is not None else None, size)
                      for g, size in parts[root]) if root in parts else None,
                rigid=root in rigid, heads_of=self.canonical.get(heads_of.get(root)),
                repeats=(self.canonical[repeats[root][0]], repeats[root][1])
                if root in repeats else None))
        tensors = self.tensors()
        sites: dict[int, list[ActivationSite]] = {}
        for g, site in t.sites:
            sites.setdefault(self.canonical[t.find(g)], []).append(
                replace(site, spec=self.canon(site.spec)))
        outputs = frozenset(self.canonical[t.find(g)] for g in t.outputs
                            if t.find(g) in self.canonical)
        return AlignmentGraph(tuple(groups), tensors,
                              {g: tuple(s) for g, s in sites.items()}, outputs,
                              {name: (packed.axis, packed.shares)
                               for name, packed in t.packed.items()})

    def tensors(self) -> dict[str, TensorSpec]:
        """Every state_dict entry: tied names share their tensor's merged axes; entries
        no rule saw (unused buffers) are not aligned. A parameter the traced forward
        does not use is refused: it may read hidden units on another path (an auxiliary
        head in training mode, a projection head behind a forward argument), which
        nothing would align."""
        merged = {key: self.merge(uses) if uses else None for key, uses in self.t.uses.items()}
        unused = [name for name, tensor in self.t.state.items()
                  if isinstance(tensor, nn.Parameter) and id(tensor) not in merged
                  and name not in self.t.packed]
        if unused:
            raise UnsupportedModelError(
                f"the traced forward does not use {', '.join(unused[:3])}"
                + (f" and {len(unused) - 3} more" if len(unused) > 3 else "")
                + f" (traced in {'training' if self.t.model.training else 'eval'} mode, "
                "with the forward's default arguments): parameters on another path cannot "
                "be aligned; fuse in the mode that uses them (model.train() for an "
                "auxiliary head), or remove them")
        tensors: dict[str, TensorSpec] = {}
        seen: set[int] = set()
        for name, tensor in self.t.state.items():
            key = id(tensor)
            if name in self.t.packed:
                if merged.get(key) is not None:
                    raise UnsupportedModelError(f"'{name}' is split into pieces at one use and "
                                                "used whole at another (a layer called again), "
                                                "which is not supported")
                packed = self.t.packed[name]
                for i, axes in enumerate(packed.pieces):
                    tensors[f"{name}#{i}"] = TensorSpec(f"{name}#{i}", self.canon_axes(axes),
                                                        packed.cost)
            elif key in merged and merged[key] is None:
                raise UnsupportedModelError(f"'{name}' is another name of a packed tensor, "
                                            "which is not supported")
            elif key in merged:
                axes, cost = merged[key]
                tensors[name] = TensorSpec(name, axes, cost and key not in seen,
                                           self.t.grouped.get(key, 1))
                seen.add(key)
            else:
                tensors[name] = TensorSpec(name, (None,) * tensor.dim(), False)
        return tensors

    def merge(self, uses) -> tuple[tuple[AxisSpec | None, ...], bool]:
        """One description of a tensor used in several places: per axis, an aligned
        use rather than a fixed one, a neuron axis rather than an input axis."""
        axes = []
        for candidates in zip(*(self.canon_axes(u[1]) for u in uses), strict=True):
            found = [a for a in candidates if a is not None]
            found.sort(key=lambda a: (self.is_fixed(a), a.kind != "neuron"))
            axes.append(found[0] if found else None)
        neurons = [i for i, a in enumerate(axes) if a is not None and a.kind == "neuron"]
        if any(not self.is_fixed(axes[i]) for i in neurons):
            for i in neurons:
                if self.is_fixed(axes[i]):
                    axes[i] = replace(axes[i], kind="input")
        return tuple(axes), any(u[2] for u in uses)

    def canon_axes(self, axes):
        return tuple(self.canon(a) for a in axes)

    def is_fixed(self, spec: AxisSpec) -> bool:
        return self.roots[spec.group] in self.fixed
