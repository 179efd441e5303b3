"""Validation of client replies before fusion.

Small pure functions shared by :class:`~otfusion.strategies.OTFusion` (Message API) and
:class:`~otfusion.strategies.LegacyOTFusion` (legacy ``Parameters`` lists). Each check
returns either the validated value or a ``str`` saying why the reply is rejected; none
of them raises for malformed input, so one bad client can never stop a round.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from otfusion.fusion import InputMoments
from otfusion.fusion.validation import all_finite, is_same_constant

# numpy dtype kinds accepted for a tensor of the global model, by the tensor's role.
_FLOAT_KINDS = "f"
_INT_KINDS = "iu"


@dataclass(frozen=True)
class ExpectedArrays:
    """Names, shapes and dtypes of the global model's tensors, in state_dict order, and
    its ``constants``: the floating tensors holding infinities (a causal attention
    mask's -inf), which every reply must carry unchanged."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    constants: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> ExpectedArrays:
        """Record what every reply must carry, from the global model's state_dict."""
        return cls(
            shapes={name: tuple(tensor.shape) for name, tensor in state.items()},
            dtypes={name: tensor.dtype for name, tensor in state.items()},
            constants={name: tensor.detach().cpu().clone() for name, tensor in state.items()
                       if tensor.is_floating_point() and not all_finite(tensor)},
        )

    def check_constant(self, name: str, tensor: torch.Tensor) -> str | None:
        """Why ``tensor`` may not stand for the global constant ``name``, if it may not."""
        constant = self.constants.get(name)
        if constant is None or is_same_constant(constant, tensor.cpu()):
            return None
        return (f"'{name}' differs from the global model's, whose infinities make it a "
                "constant (such as a causal attention mask) that must stay as it is")

    @property
    def keys(self) -> list[str]:
        """Tensor names in the global model's order."""
        return list(self.shapes)


def check_weight(value: Any, key: str = "num-examples") -> float | str:
    """The client weight as a positive finite float, or why it is unusable."""
    if value is None:
        return f"no '{key}' value"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"'{key}' is {value!r}, not a number"
    try:
        weight = float(value)
    except OverflowError:  # an int beyond the float range
        return f"'{key}' has {len(str(abs(value)))} digits, beyond the float range"
    if not math.isfinite(weight) or weight <= 0:
        return f"'{key}' is {value!r}, not a positive finite number"
    return weight


LABEL_COUNTS_KEY = "label-counts"
"""Train-reply metric: the client's number of training examples per class, which
weights the fused output layer per class (:func:`otfusion.fusion.fuse`)."""


def _number_list(value: Any, key: str, non_negative: bool) -> list[float] | str:
    """``value`` as a list of finite floats (non-negative ones if asked), or why not."""
    if not isinstance(value, (list, tuple)):
        return f"'{key}' is {type(value).__name__}, not a list"
    numbers = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            return f"'{key}' holds {v!r}, not a number"
        try:
            number = float(v)
        except OverflowError:
            return f"'{key}' holds a number beyond the float range"
        if not math.isfinite(number) or (non_negative and number < 0):
            kind = "finite non-negative" if non_negative else "finite"
            return f"'{key}' holds {v!r}, not a {kind} number"
        numbers.append(number)
    return numbers


def check_label_counts(value: Any, num_classes: int | None) -> list[float] | None | str:
    """A reply's ``label-counts`` as floats; None when absent; a reason when it is not a
    list of ``num_classes`` finite non-negative numbers with a positive sum."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and num_classes is not None and len(value) != num_classes:
        return f"'{LABEL_COUNTS_KEY}' has {len(value)} entries for {num_classes} classes"
    counts = _number_list(value, LABEL_COUNTS_KEY, non_negative=True)
    if isinstance(counts, str):
        return counts
    if not counts or not sum(counts) > 0 or not math.isfinite(sum(counts)):
        return f"'{LABEL_COUNTS_KEY}' must have a positive finite sum"
    return counts


INPUT_MEAN_KEY = "input-mean"
INPUT_VAR_KEY = "input-var"
"""Train-reply metrics: the per-feature mean and variance of the client's training
inputs (flattened), from which the server draws the synthetic inputs of post-fusion
distillation (:mod:`otfusion.fusion.distillation`)."""

CLASS_MEAN_KEY = "input-class-mean"
CLASS_VAR_KEY = "input-class-var"
CLASS_COUNT_KEY = "input-class-count"
"""Train-reply metrics: the same per class (classes x features, flattened), and the
number of examples each class's moments describe (0: not described, rows of zeros)."""
CLASS_MOMENT_KEYS = (CLASS_MEAN_KEY, CLASS_VAR_KEY, CLASS_COUNT_KEY)
COMPONENTS_KEY = "input-components"
"""Train-reply metric: the leading principal components of the client's training inputs,
each scaled by the standard deviation along it (components x features, flattened; see
:func:`otfusion.fusion.moments.input_moments`)."""
STATISTIC_KEYS = (LABEL_COUNTS_KEY, INPUT_MEAN_KEY, INPUT_VAR_KEY, *CLASS_MOMENT_KEYS,
                  COMPONENTS_KEY)
"""The client statistics a train reply may carry besides its metrics proper."""


MAX_INPUT_MOMENT = 1e6
"""Largest accepted ``|input-mean|`` and input standard deviation."""


def check_input_moments(mean: Any, var: Any, input_shape: Sequence[int] | None
                        ) -> InputMoments | None | str:
    """A reply's ``input-mean`` and ``input-var`` as :class:`InputMoments` of
    ``input_shape``; None when both are absent or the input shape is unknown; a reason
    when only one is sent or they are not lists of one finite number per input feature
    (variances non-negative), or a mean or standard deviation exceeds
    :data:`MAX_INPUT_MOMENT` in magnitude."""
    if mean is None and var is None:
        return None
    if mean is None or var is None:
        return f"'{INPUT_MEAN_KEY}' and '{INPUT_VAR_KEY}' must be sent together"
    if input_shape is None:
        return None
    shape = tuple(input_shape)
    what = f"the model's {math.prod(shape)} input features"
    values = [_moments(key, value, shape, what, non_negative)
              for key, value, non_negative in ((INPUT_MEAN_KEY, mean, False),
                                               (INPUT_VAR_KEY, var, True))]
    found = next((v for v in values if isinstance(v, str)), None)
    return found if found is not None else InputMoments(*values)


def check_class_moments(moments: InputMoments | None, mean: Any, var: Any, count: Any,
                        num_classes: int | None) -> InputMoments | None | str:
    """``moments`` (the reply's checked overall moments) with its per-class moments
    (:data:`CLASS_MOMENT_KEYS`) added: ``moments`` itself when none are sent, or when
    there are no overall moments to add them to or the number of classes is unknown
    (then they are not used); a reason when only some are sent, or they are not
    ``num_classes`` x features finite numbers within the bounds with non-negative
    variances and counts."""
    if mean is None and var is None and count is None:
        return moments
    if mean is None or var is None or count is None:
        return f"{', '.join(repr(k) for k in CLASS_MOMENT_KEYS)} must be sent together"
    if moments is None or num_classes is None:
        return moments
    shape = (num_classes, *moments.mean.shape)
    counts = _moments(CLASS_COUNT_KEY, count, (num_classes,),
                      f"the model's {num_classes} classes", True)
    what = f"{num_classes} classes x {moments.mean.numel()} input features"
    values = [_moments(key, value, shape, what, non_negative)
              for key, value, non_negative in ((CLASS_MEAN_KEY, mean, False),
                                               (CLASS_VAR_KEY, var, True))]
    found = next((v for v in [counts, *values] if isinstance(v, str)), None)
    if found is not None:
        return found
    return moments._replace(class_mean=values[0], class_var=values[1], class_count=counts)


MAX_INPUT_COMPONENTS = 64
"""Most principal components a reply may carry."""


def check_input_components(moments: InputMoments | None, value: Any
                           ) -> InputMoments | None | str:
    """``moments`` (the reply's checked moments) with its ``input-components`` added:
    ``moments`` itself when none are sent or there are no moments to add them to; a
    reason when they are not 1 to :data:`MAX_INPUT_COMPONENTS` rows of one finite number
    per input feature within the bounds, or when they describe more variance in a
    feature than its ``input-var`` (an honest client's never do: they are part of its
    inputs' covariance), which would let a client widen the synthetic inputs."""
    if value is None or moments is None:
        return moments
    features = moments.mean.numel()
    size = len(value) if isinstance(value, (list, tuple)) else 0
    count, rest = divmod(size, features)
    if rest or not 1 <= count <= MAX_INPUT_COMPONENTS:
        return (f"'{COMPONENTS_KEY}' must hold 1 to {MAX_INPUT_COMPONENTS} rows of the "
                f"model's {features} input features, got {size} numbers")
    components = _moments(COMPONENTS_KEY, value, (count, *moments.mean.shape),
                          f"{count} components x {features} input features", False)
    if isinstance(components, str):
        return components
    described = components.double().flatten(1).square().sum(dim=0)
    var = moments.var.double().flatten()
    excess = described - var * (1 + 1e-4) - 1e-9 * (1 + float(var.max()))
    if bool((excess > 0).any()):
        j = int(excess.argmax())
        return (f"'{COMPONENTS_KEY}' describe more variance than '{INPUT_VAR_KEY}' in input "
                f"feature {j} ({float(described[j]):.3g} > {float(var[j]):.3g})")
    return moments._replace(components=components)


def _moments(key: str, value: Any, shape: tuple[int, ...], what: str, non_negative: bool
             ) -> torch.Tensor | str:
    """``value`` (a flat list) as a float32 tensor of ``shape`` (``what`` it holds, for
    the reason), or why not: a wrong length, a non-finite (or negative, with
    ``non_negative``) number, or a magnitude beyond :data:`MAX_INPUT_MOMENT` (its
    square for variances and counts)."""
    if isinstance(value, (list, tuple)) and len(value) != math.prod(shape):
        return f"'{key}' has {len(value)} entries for {what}"
    numbers = _number_list(value, key, non_negative)
    if isinstance(numbers, str):
        return numbers
    bound = MAX_INPUT_MOMENT ** (2 if non_negative else 1)
    if max(map(abs, numbers), default=0.0) > bound:
        return f"'{key}' holds |value| {max(map(abs, numbers)):.3g} > {bound:.3g}"
    return torch.tensor(numbers, dtype=torch.float32).reshape(shape)


def _kinds(dtype: torch.dtype) -> str:
    """numpy dtype kinds accepted for a tensor whose global dtype is ``dtype``."""
    if dtype.is_floating_point:
        return _FLOAT_KINDS
    if dtype.is_complex:
        return "c"
    if dtype == torch.bool:
        return "b"
    return _INT_KINDS


def _decode(value: Any) -> np.ndarray | str:
    """A numpy array from an ndarray or a Flower ``Array``; a reason if it cannot be read."""
    try:
        array = value if isinstance(value, np.ndarray) else value.numpy()
    except Exception as exc:  # noqa: BLE001 - any decoding failure rejects the reply
        return f"cannot be decoded ({type(exc).__name__}: {exc})"
    if not isinstance(array, np.ndarray):
        return f"decodes to a {type(array).__name__}, not an array"
    return array


def _to_tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A fresh torch tensor of ``dtype``, never sharing memory with ``array``."""
    if array.dtype.kind == "f" and array.dtype.itemsize > 8:
        array = array.astype(np.float64)  # long double: torch has no such dtype
    array = np.array(array, dtype=array.dtype.newbyteorder("="), copy=True)
    return torch.from_numpy(array).to(dtype)


def check_array(name: str, value: Any, expected: ExpectedArrays, *, max_abs_weight: float,
                exact_shape: bool = True) -> torch.Tensor | str:
    """One tensor of a reply, checked against the global tensor ``name``.

    The dtype must be of the same kind (any float for a floating tensor, any integer
    for an integer buffer such as ``num_batches_tracked``); the result is cast to the
    global dtype. The shape must equal the global one (``exact_shape``) or have the
    same rank. Floating values must be finite with ``|value| <= max_abs_weight``,
    except in a global constant (:class:`ExpectedArrays`), which must come back
    unchanged; integer buffers are counters and are not bounded.
    """
    array = _decode(value)
    if isinstance(array, str):
        return f"'{name}' {array}"
    dtype, shape = expected.dtypes[name], expected.shapes[name]
    if array.dtype.kind not in _kinds(dtype):
        return f"'{name}' has dtype {array.dtype}, expected one like {dtype}"
    if exact_shape and array.shape != shape:
        return f"'{name}' has shape {array.shape}, expected {shape}"
    if array.ndim != len(shape):
        return f"'{name}' has rank {array.ndim} (shape {array.shape}), expected rank {len(shape)}"
    if name in expected.constants:
        tensor = _to_tensor(array, dtype)
        return expected.check_constant(name, tensor) or tensor
    if array.dtype.kind == "f" and array.size:
        if not np.isfinite(array).all():
            return f"'{name}' contains NaN or Inf values"
        largest = float(np.abs(array).max())
        if largest > max_abs_weight:
            return f"'{name}' has |value| {largest:.3g} > max_abs_weight {max_abs_weight:.3g}"
    return _to_tensor(array, dtype)


def check_arrays(arrays: Mapping[str, Any], expected: ExpectedArrays, *,
                 max_abs_weight: float,
                 exact_shapes: bool = True) -> dict[str, torch.Tensor] | str:
    """A reply's arrays (name -> ndarray or Flower ``Array``) as a state_dict in the
    global key order, or the first reason to reject them. Keys must match exactly."""
    names = set(arrays)
    missing = [k for k in expected.keys if k not in names]
    extra = sorted(names.difference(expected.shapes), key=str)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing keys {_preview(missing)}")
        if extra:
            parts.append(f"unexpected keys {_preview(extra)}")
        return " and ".join(parts)
    state: dict[str, torch.Tensor] = {}
    for name in expected.keys:
        tensor = check_array(name, arrays[name], expected, max_abs_weight=max_abs_weight,
                             exact_shape=exact_shapes)
        if isinstance(tensor, str):
            return tensor
        state[name] = tensor
    return state


def check_array_list(arrays: Sequence[Any], expected: ExpectedArrays, *,
                     max_abs_weight: float,
                     exact_shapes: bool = True) -> dict[str, torch.Tensor] | str:
    """An ordered list of arrays (legacy ``Parameters``, NumPyClient convention
    ``[v.cpu().numpy() for v in model.state_dict().values()]``) named by the global
    state_dict order, then checked like :func:`check_arrays`."""
    if len(arrays) != len(expected.keys):
        return f"{len(arrays)} arrays, expected {len(expected.keys)} (one per state_dict entry)"
    return check_arrays(dict(zip(expected.keys, arrays, strict=True)), expected,
                        max_abs_weight=max_abs_weight, exact_shapes=exact_shapes)


def check_content(content: Any, expected: ExpectedArrays, *, weight_key: str,
                  max_abs_weight: float,
                  exact_shapes: bool = True) -> tuple[dict[str, torch.Tensor], float] | str:
    """A train reply's ``RecordDict``: exactly one ArrayRecord and one MetricRecord
    holding a positive finite ``weight_key``. Returns (state_dict, weight) or a reason."""
    try:
        array_records = list(content.array_records.values())
        metric_records = list(content.metric_records.values())
    except Exception as exc:  # noqa: BLE001 - an unreadable reply is rejected, not raised
        return f"unreadable content ({type(exc).__name__}: {exc})"
    if len(array_records) != 1:
        return f"{len(array_records)} ArrayRecords, expected exactly 1"
    if len(metric_records) != 1:
        return f"{len(metric_records)} MetricRecords, expected exactly 1"
    weight = check_weight(metric_records[0].get(weight_key), weight_key)
    if isinstance(weight, str):
        return weight
    state = check_arrays(array_records[0], expected, max_abs_weight=max_abs_weight,
                         exact_shapes=exact_shapes)
    if isinstance(state, str):
        return state
    return state, weight


def reply_digest(state: Mapping[str, torch.Tensor], weight: float,
                 label_counts: Sequence[float] | None = None,
                 input_moments: InputMoments | None = None) -> bytes:
    """A digest of a validated reply's tensors (names, dtypes, shapes, values), weight,
    label counts and input moments (if any). Fusing replies sorted by it makes the result
    depend only on what the clients sent: neither on the order the replies arrive in nor
    on the node ids."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(float(weight)).encode())
    if label_counts is not None:
        digest.update(repr([float(c) for c in label_counts]).encode())
    if input_moments is not None:
        for tensor in input_moments:
            if tensor is not None:
                digest.update(b"moments|" + tensor.contiguous().numpy().tobytes())
    for name, tensor in state.items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.digest()


def weighted_average_metrics(
    pairs: Sequence[tuple[float, Mapping[str, Any]]], skip: Sequence[str] = ()
) -> dict[str, float | list[float]]:
    """Weighted average of the numeric metrics of accepted replies.

    Each metric is averaged over the replies that report it, with their weights
    renormalised, so a key missing from one reply does not bias it. Non-numeric values
    (str, bytes, bool) and non-finite numbers are ignored; a list metric is averaged
    element-wise when every reply reporting it gives the same length. Values are plain
    Python floats (Flower's MetricRecord rejects numpy scalars).
    """
    sums: dict[str, Any] = {}
    totals: dict[str, float] = {}
    dropped: set[str] = set(skip)
    for weight, metrics in pairs:
        for key, value in metrics.items():
            if key in dropped:
                continue
            number = _as_numbers(value)
            if number is None:
                continue
            if isinstance(number, list):
                previous = sums.get(key, [0.0] * len(number))
                if not isinstance(previous, list) or len(previous) != len(number):
                    dropped.add(key)
                    continue
                sums[key] = [p + weight * v for p, v in zip(previous, number, strict=True)]
            else:
                previous = sums.get(key, 0.0)
                if isinstance(previous, list):
                    dropped.add(key)
                    continue
                sums[key] = previous + weight * number
            totals[key] = totals.get(key, 0.0) + weight
    out: dict[str, float | list[float]] = {}
    for key, total in totals.items():
        if key in dropped or total <= 0:
            continue
        value = sums[key]
        out[key] = [float(v / total) for v in value] if isinstance(value, list) else float(
            value / total)
    return out


def _as_numbers(value: Any) -> float | list[float] | None:
    """A finite float, a list of finite floats, or None for anything else."""
    if isinstance(value, (list, tuple)):
        numbers = [_as_numbers(v) for v in value]
        if not numbers or any(n is None or isinstance(n, list) for n in numbers):
            return None
        return numbers  # type: ignore[return-value]
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _preview(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in list(names)[:limit])
    more = len(names) - limit
    return f"[{shown}{f', ... ({more} more)' if more > 0 else ''}]"
