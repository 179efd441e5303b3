"""Property-based fuzzing of reply validation and of the fusion entry points (issue 5).

Hypothesis generates malformed train replies: NaN/Inf values, magnitudes beyond
``max_abs_weight``, wrong shapes and ranks, missing, extra and renamed keys, dtypes of
the wrong kind (int, uint, bool, complex, str, bytes, datetime, structured, pickled
object arrays), undecodable ``Array`` payloads, another architecture's state_dict,
zero, negative, non-finite, non-numeric or missing ``num-examples``, zero or two
ArrayRecords / MetricRecords, error replies, and objects that are no ``Message`` at all,
mixed with harmless variations (float16/float64/big-endian arrays, shuffled keys, extra
metrics and ConfigRecords) so a rejection is never owed to the variation. Some inputs
bypass Flower's own type checks (``record.__dict__["_data"]``), as a corrupted or hostile
decoder could produce them.

Properties:

1. ``check_content`` / ``check_array_list`` never raise and return a ``str`` reason for
   every malformed input (and accept the harmless variations of a good reply).
2. ``OTFusion.aggregate_train`` with enough good replies and any mix of bad ones never
   raises, counts accepted / rejected replies, logs one WARNING naming the node per
   rejected reply, and returns arrays and client metrics bit-identical to
   ``aggregate_train`` on the good replies alone.
3. With too few valid replies it returns ``(None, counts)``, and ``OTFusion.start`` keeps
   the initial arrays through every round; ``heterogeneous=True`` rejects them too.
4. ``LegacyOTFusion.aggregate_fit`` satisfies 2 and 3 for legacy ``FitRes`` results.

Examples are derandomized (deterministic in CI) and the models tiny (a few ms each).
"""

from __future__ import annotations

import copy
import io
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from flower_replies import StubProxy
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.common import Code, FitRes, Parameters, Status
from flwr.common.constant import SType
from flwr.server.client_proxy import ClientProxy
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from otfusion.strategies import LegacyOTFusion, OTFusion
from otfusion.strategies.replies import ExpectedArrays, check_array_list, check_content
from otfusion.zoo import build_model

FUZZ = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}

IN_FEATURES, HIDDEN, CLASSES = 5, 6, 3
MAX_ABS = 1e4  # OTFusion's default max_abs_weight
WEIGHT_KEY = "num-examples"

# How many malformed replies each property fed to the code under test (see the last test).
VOLUME: Counter[str] = Counter()


# --- the global model and the good replies ----------------------------------------------


class BNNet(nn.Module):
    """Linear + BatchNorm + Linear: float weights, float buffers and an int64 0-d counter."""

    def __init__(self, hidden: int = HIDDEN):
        super().__init__()
        self.input_shape = (IN_FEATURES,)
        self.fc = nn.Linear(IN_FEATURES, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.fc(x))))


def _fresh(hidden: int = HIDDEN) -> BNNet:
    with torch.random.fork_rng(devices=[]):  # leave the global torch RNG alone
        torch.manual_seed(0)
        return BNNet(hidden)


_TEMPLATE = _fresh()


def global_model() -> nn.Module:
    return copy.deepcopy(_TEMPLATE)


def model_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> nn.Module:
    """``client_model_fn`` for ``heterogeneous=True``: the hidden width of ``fc.weight``."""
    return _fresh(shapes["fc.weight"][0])


EXPECTED = ExpectedArrays.from_state_dict(_TEMPLATE.state_dict())
KEYS = EXPECTED.keys


def _state(seed: int, hidden: int = HIDDEN) -> dict[str, np.ndarray]:
    """A client's state_dict as numpy arrays, in state_dict order; deterministic."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, tensor in _fresh(hidden).state_dict().items():
        if tensor.is_floating_point():
            values = rng.normal(0.0, 0.5, size=tuple(tensor.shape))
            if name.endswith("running_var"):
                values = np.abs(values) + 0.1
            out[name] = values.astype(np.float32)
        else:
            out[name] = np.array(seed + 3, dtype=np.int64)
    return out


GOOD = [_state(seed) for seed in (1, 2, 3)]
GOOD_WEIGHTS = [10, 20, 30]


def _numpy_state(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


# Another architecture (other keys), and the same one at another width (same keys).
FOREIGN = [
    _numpy_state(build_model("mlp", widths=(HIDDEN, 4), in_features=IN_FEATURES,
                             num_classes=CLASSES)),
    _numpy_state(build_model("mlp", widths=(), in_features=IN_FEATURES, num_classes=CLASSES)),
    _state(7, hidden=HIDDEN + 1),
]
# Encoded once: a good array's Array, by the array's id (the arrays live as long as this).
_ENCODED = {id(a): Array(a) for state in [*GOOD, *FOREIGN] for a in state.values()}
for _array in (a for state in [*GOOD, *FOREIGN] for a in state.values()):
    _array.flags.writeable = False  # the generators copy before they modify
# heterogeneous=True accepts other widths, so only foreign keys are malformed there.
FOREIGN_KEYS_DIFFER = [k for k, f in enumerate(FOREIGN) if set(f) != set(KEYS)]


def _metadata(node_id: int) -> Metadata:
    return Metadata(run_id=1, message_id=f"m{node_id}", src_node_id=node_id, dst_node_id=1,
                    reply_to_message_id="ins", group_id="1", created_at=time.time(),
                    ttl=3600.0, message_type=MessageType.TRAIN)


def _good_reply(k: int, arrays: Mapping[str, np.ndarray] | None = None) -> Message:
    content = RecordDict({
        "arrays": _array_record(GOOD[k] if arrays is None else arrays),
        "metrics": MetricRecord({WEIGHT_KEY: GOOD_WEIGHTS[k], "loss": float(k + 1)}),
    })
    return Message(content=content, metadata=_metadata(k + 1))


# --- building records, including what Flower's constructors refuse ----------------------


def _array_record(arrays: Mapping[Any, Any]) -> ArrayRecord:
    record = ArrayRecord()
    for key, value in arrays.items():
        if isinstance(value, np.ndarray):
            value = _ENCODED.get(id(value)) or Array(value)
        if isinstance(key, str) and isinstance(value, Array):
            record[key] = value
        else:  # bypasses Flower's type check, like a corrupted decoder would
            record.__dict__["_data"][key] = value
    return record


def _metric_record(metrics: Mapping[str, Any]) -> MetricRecord:
    record = MetricRecord()
    for key, value in metrics.items():
        try:
            record[key] = value
        except TypeError:  # bool, str, None, ...: bypass Flower's type check
            record.__dict__["_data"][key] = value
    return record


def _npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


class _Decoy:
    """Stands where an ``Array`` should: its ``numpy()`` raises or returns a non-array."""

    def __init__(self, result: Any):
        self.result = result

    def numpy(self) -> Any:
        if isinstance(self.result, Exception):
            raise self.result
        return self.result

    def __repr__(self) -> str:
        return f"_Decoy({self.result!r})"


class _Unreadable:
    """Content whose record views raise."""

    @property
    def array_records(self):
        raise RuntimeError("corrupted content")

    metric_records = array_records


class _Hostile:
    """Not a Message: a reply object whose accessors raise."""

    def __init__(self, node_id: int, where: str):
        self.metadata = SimpleNamespace(src_node_id=node_id)
        self.where = where

    def has_error(self) -> bool:
        if self.where == "has_error":
            raise RuntimeError("has_error exploded")
        return self.where == "error"

    @property
    def error(self):
        raise RuntimeError("error exploded")

    @property
    def content(self):
        raise RuntimeError("content exploded")

    def __repr__(self) -> str:
        return f"_Hostile({self.metadata.src_node_id}, {self.where!r})"


# --- generators ------------------------------------------------------------------------

# dtypes of the wrong kind for a floating tensor, and for an integer buffer.
BAD_FOR_FLOAT = tuple(np.dtype(d) for d in (
    "int8", "int32", "int64", "uint8", "uint64", "bool", "complex64", "complex128", "U8",
    "S8", "datetime64[s]", "timedelta64[ms]", [("a", "<f4")]))
BAD_FOR_INT = tuple(np.dtype(d) for d in (
    "float16", "float32", "float64", "bool", "complex64", "U8", "datetime64[s]"))
# Harmless: same kind, converted to the global dtype by the validation.
BENIGN_FLOAT = tuple(np.dtype(d) for d in ("float16", "float64", ">f4", "<f4"))
BENIGN_INT = tuple(np.dtype(d) for d in ("int8", "int16", "int32", ">i8", "uint8", "uint64"))

GOOD_WEIGHT = st.one_of(st.integers(1, 10**6), st.floats(1e-3, 1e6))
BAD_WEIGHTS = st.one_of(
    st.sampled_from([0, 0.0, -0.0, math.nan, math.inf, -math.inf, 10**400, -(10**400)]),
    st.integers(min_value=-(2**63), max_value=0),
    st.floats(max_value=0.0),
    st.lists(st.integers(1, 100), max_size=3),
    st.lists(st.floats(0.5, 100.0), max_size=2),
    st.sampled_from([True, False, None, "10", b"10", 10j, (10,), {"n": 10}, np.float64(-1.0)]),
)
GARBAGE_CONTENT = st.sampled_from(
    [None, 0, "content", b"", {}, {"arrays": {}}, [], _Unreadable()])
BYPASS_VALUES = st.sampled_from([
    None, "0.5", b"\x93NUMPY", 3.0, [0.1, 0.2], {"data": b""},
    _Decoy(RuntimeError("boom")), _Decoy([1.0, 2.0]), _Decoy(np.array(["x", 1], dtype=object)),
    torch.full((HIDDEN,), float("nan")),
])
RECORD_NAMES = ["arrays", "metrics", "config", "", "x/y é"]
NOT_NUMPY_STYPES = st.sampled_from(["torch.Tensor", "", "numpy", "NUMPY.NDARRAY", "pickle"])

ARRAY_FLAWS = ("foreign", "nonfinite", "magnitude", "dtype", "shape", "undecodable",
               "bypass", "missing", "extra", "renamed")
RECORD_FLAWS = ("no_arrays", "two_arrays", "no_metrics", "two_metrics", "bad_weight",
                "no_weight")
LIST_FLAWS = ("foreign", "nonfinite", "magnitude", "dtype", "shape", "undecodable", "bypass",
              "short", "long", "swapped")
# Pairs that would undo each other (two ArrayRecords minus one is one ArrayRecord, ...).
EXCLUSIVE = (("no_arrays", "two_arrays"), ("no_metrics", "two_metrics"), ("short", "long"))


def _draw_flaws(draw, choices: tuple[str, ...]) -> set[str]:
    flaws = set(draw(st.lists(st.sampled_from(choices), min_size=1, max_size=3, unique=True)))
    for keep, drop in EXCLUSIVE:
        if keep in flaws:
            flaws.discard(drop)
    for flaw in sorted(flaws):
        event(f"flaw: {flaw}")
    return flaws


def _recast(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.kind in "MmV":
        return np.zeros(array.shape, dtype)
    with np.errstate(all="ignore"):
        return array.astype(dtype)


def _benign(draw, arrays: dict[str, Any]) -> None:
    """Harmless dtype changes: any float for a float tensor, any integer for a counter."""
    for name in draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=3)):
        kinds = BENIGN_FLOAT if arrays[name].dtype.kind == "f" else BENIGN_INT
        arrays[name] = arrays[name].astype(draw(st.sampled_from(kinds)))


def _arrays_of(arrays: dict[Any, Any], kind: str | None = None) -> list[Any]:
    return [k for k, v in arrays.items() if isinstance(v, np.ndarray) and v.size
            and (kind is None or v.dtype.kind == kind)]


def _undecodable(draw, array: np.ndarray, bytes_only: bool) -> Array:
    variants = ["garbage", "truncated", "pickled", "lying"]
    variant = draw(st.sampled_from(variants if bytes_only else [*variants, "stype"]))
    event(f"undecodable: {variant}")
    dtype, shape, stype, data = str(array.dtype), tuple(array.shape), SType.NUMPY, _npy(array)
    if variant == "garbage":
        data = draw(st.binary(max_size=48).filter(lambda b: not b.startswith(b"\x93NUMPY")))
    elif variant == "truncated":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif variant == "pickled":
        data = _npy(array.astype(object), allow_pickle=True)
    elif variant == "lying":  # metadata says right, the payload holds a wrong-shaped array
        data = _npy(np.zeros((*array.shape, 2), array.dtype))
    else:
        stype = draw(NOT_NUMPY_STYPES)
    return Array(dtype=dtype, shape=shape, stype=stype, data=data)


def _apply_array_flaws(draw, arrays: dict[Any, Any], flaws: set[str], *, hetero: bool,
                       bytes_only: bool = False) -> None:
    """Make ``arrays`` (name -> ndarray) malformed in place; no step undoes another."""
    if "foreign" in flaws:
        choices = FOREIGN_KEYS_DIFFER if hetero else range(len(FOREIGN))
        foreign = FOREIGN[draw(st.sampled_from(list(choices)))]
        arrays.clear()
        arrays.update(foreign)
    for flaw in ("nonfinite", "magnitude"):
        if flaw in flaws:
            name = draw(st.sampled_from(_arrays_of(arrays, "f")))
            array = arrays[name].copy()
            index = draw(st.integers(0, array.size - 1))
            if flaw == "nonfinite":
                value = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
            else:  # beyond max_abs_weight, or Inf once cast to the array's dtype
                value = draw(st.floats(2 * MAX_ABS, 1e300)) * draw(st.sampled_from([1, -1]))
            with np.errstate(over="ignore"):
                array.flat[index] = value
            arrays[name] = array
    if "dtype" in flaws:
        name = draw(st.sampled_from(_arrays_of(arrays)))
        floating = EXPECTED.dtypes[name].is_floating_point if name in EXPECTED.dtypes else \
            arrays[name].dtype.kind == "f"
        arrays[name] = _recast(arrays[name],
                               draw(st.sampled_from(BAD_FOR_FLOAT if floating else BAD_FOR_INT)))
    if "shape" in flaws:
        name = draw(st.sampled_from(_arrays_of(arrays)))
        wrong = EXPECTED.shapes.get(name, arrays[name].shape)
        shape = draw(st.lists(st.integers(0, 7), max_size=3).map(tuple).filter(
            lambda s: s != wrong))
        arrays[name] = np.resize(arrays[name], shape)
    if "undecodable" in flaws:
        name = draw(st.sampled_from(_arrays_of(arrays)))
        arrays[name] = _undecodable(draw, arrays[name], bytes_only)
    if "bypass" in flaws:
        arrays[draw(st.sampled_from(list(arrays)))] = draw(BYPASS_VALUES)
    if "missing" in flaws:
        present = [k for k in KEYS if k in arrays]
        if present:
            for name in draw(st.lists(st.sampled_from(present), min_size=1, unique=True)):
                del arrays[name]
    if "extra" in flaws:
        names = draw(st.lists(st.one_of(st.text(max_size=10), st.integers(0, 3)),
                              min_size=1, max_size=3, unique=True))
        for name in names:
            if name in EXPECTED.shapes:
                name = f"{name}.extra"
            arrays[name] = draw(st.sampled_from(GOOD))[draw(st.sampled_from(KEYS))]
    if "renamed" in flaws:
        present = [k for k in KEYS if k in arrays]
        if present:
            prefix = draw(st.sampled_from(["module.", "model.", "_orig_mod.", "0.", " "]))
            for name in draw(st.lists(st.sampled_from(present), min_size=1, unique=True)):
                arrays[prefix + name] = arrays.pop(name)


@st.composite
def malformed_content(draw, hetero: bool = False, garbage: bool = True) -> Any:
    """A train reply's content that ``check_content`` / the strategy must reject."""
    if garbage and draw(st.sampled_from([False] * 11 + [True])):
        event("flaw: garbage content")
        return draw(GARBAGE_CONTENT)
    flaws = _draw_flaws(draw, ARRAY_FLAWS + RECORD_FLAWS)
    arrays = dict(draw(st.sampled_from(GOOD)))
    _benign(draw, arrays)
    arrays = {k: arrays[k] for k in draw(st.permutations(KEYS))}  # aligned by name
    _apply_array_flaws(draw, arrays, flaws, hetero=hetero)
    return _record_dict(draw, arrays, flaws)


def _record_dict(draw, arrays: Mapping[Any, Any], flaws: set[str]) -> RecordDict:
    names = draw(st.permutations(RECORD_NAMES))
    records: dict[str, Any] = {}
    if "no_arrays" not in flaws:
        records[names[0]] = _array_record(arrays)
    if "two_arrays" in flaws:
        records[names[1]] = _array_record(draw(st.sampled_from([arrays, GOOD[0]])))
    metrics: dict[str, Any] = {WEIGHT_KEY: draw(GOOD_WEIGHT)}
    if draw(st.booleans()):
        metrics["loss"] = draw(st.sampled_from([0.5, -1.0, 1e300, math.nan, math.inf]))
    if "bad_weight" in flaws:
        metrics[WEIGHT_KEY] = draw(BAD_WEIGHTS)
    if "no_weight" in flaws:
        del metrics[WEIGHT_KEY]
        if draw(st.booleans()):
            near = draw(st.sampled_from(["num_examples", "num-examples ", "Num-Examples", "n"]))
            metrics[near] = 10
    if "no_metrics" not in flaws:
        records[names[2]] = _metric_record(metrics)
    if "two_metrics" in flaws:
        records[names[3]] = MetricRecord({WEIGHT_KEY: 5})
    if draw(st.booleans()):  # ignored by the validation, whatever it holds
        records[names[4]] = ConfigRecord({WEIGHT_KEY: 10, "note": "harmless"})
    return RecordDict({k: records[k] for k in draw(st.permutations(list(records)))})


@st.composite
def benign_content(draw) -> tuple[RecordDict, dict[str, np.ndarray], float]:
    """A good reply with harmless variations, and the arrays and weight it carries."""
    arrays = dict(draw(st.sampled_from(GOOD)))
    _benign(draw, arrays)
    arrays = {k: arrays[k] for k in draw(st.permutations(KEYS))}
    weight = draw(GOOD_WEIGHT)
    content = _record_dict(draw, arrays, set())
    next(iter(content.metric_records.values()))[WEIGHT_KEY] = weight
    return content, arrays, float(weight)


@st.composite
def malformed_reply(draw, node_id: int, hetero: bool = False) -> tuple[Any, str]:
    """A bad reply and the node label its rejection warning must name."""
    kind = draw(st.sampled_from(["content"] * 8 + ["error", "lost content", "not a message",
                                                   "hostile"]))
    event(f"reply: {kind}")
    label = str(node_id)
    if kind == "content":
        content = draw(malformed_content(hetero=hetero, garbage=False))
        return Message(content=content, metadata=_metadata(node_id)), label
    if kind == "error":
        error = Error(code=draw(st.integers(-(2**31), 2**31 - 1)),
                      reason=draw(st.none() | st.text(max_size=20)))
        return Message(error=error, metadata=_metadata(node_id)), label
    if kind == "lost content":  # a Message whose content was lost or corrupted in transit
        msg = Message(content=RecordDict(), metadata=_metadata(node_id))
        msg.__dict__["_content"] = draw(GARBAGE_CONTENT)
        return msg, label
    if kind == "hostile":
        return _Hostile(node_id, draw(st.sampled_from(["has_error", "error", "content"]))), label
    return draw(st.sampled_from([None, 0, "reply", b"", object()])), "?"


@st.composite
def malformed_list(draw, bytes_only: bool = False) -> list[Any]:
    """A legacy list of arrays (state_dict order) that ``check_array_list`` must reject."""
    flaws = _draw_flaws(draw, LIST_FLAWS)
    arrays = dict(draw(st.sampled_from(GOOD)))
    _benign(draw, arrays)
    _apply_array_flaws(draw, arrays, flaws, hetero=False, bytes_only=bytes_only)
    items = list(arrays.values())
    if "short" in flaws:
        for index in sorted(draw(st.lists(st.integers(0, len(items) - 1), min_size=1,
                                          unique=True)), reverse=True):
            del items[index]
    if "long" in flaws:
        for _ in range(draw(st.integers(1, 3))):
            items.insert(draw(st.integers(0, len(items))),
                         draw(st.sampled_from(GOOD))[draw(st.sampled_from(KEYS))])
    if "swapped" in flaws and len(items) == len(KEYS):
        # A nameless list cannot tell apart two arrays of one shape: swap different shapes.
        i, j = draw(st.lists(st.integers(0, len(KEYS) - 1), min_size=2, max_size=2,
                             unique=True).filter(
            lambda p: EXPECTED.shapes[KEYS[p[0]]] != EXPECTED.shapes[KEYS[p[1]]]))
        items[i], items[j] = items[j], items[i]
    return items


def _parameters(items: list[Any]) -> Parameters:
    """Legacy ``Parameters``: npy bytes per array; anything else becomes undecodable."""
    tensors = []
    for item in items:
        if isinstance(item, np.ndarray):
            tensors.append(_npy(item))
        elif isinstance(item, Array):
            tensors.append(item.data)
        else:
            tensors.append(repr(item).encode())
    return Parameters(tensors=tensors, tensor_type="numpy.ndarray")


def _good_result(k: int) -> tuple[ClientProxy, FitRes]:
    return StubProxy(f"g{k}"), FitRes(status=Status(code=Code.OK, message=""),
                                   parameters=_parameters(list(GOOD[k].values())),
                                   num_examples=GOOD_WEIGHTS[k], metrics={"loss": float(k + 1)})


@st.composite
def malformed_result(draw, cid: str) -> tuple[ClientProxy, Any]:
    kind = draw(st.sampled_from(["arrays"] * 6 + ["weight", "status", "parameters",
                                                  "not a FitRes"]))
    event(f"result: {kind}")
    if kind == "not a FitRes":
        return StubProxy(cid), draw(st.sampled_from([None, object(), "fit", 0]))
    status = Status(code=Code.OK, message="")
    weight: Any = draw(st.integers(1, 10**6))
    parameters: Any = _parameters(list(draw(st.sampled_from(GOOD)).values()))
    if kind == "arrays":
        parameters = _parameters(draw(malformed_list(bytes_only=True)))
    elif kind == "weight":
        weight = draw(BAD_WEIGHTS)
    elif kind == "status":
        status = Status(code=draw(st.sampled_from([c for c in Code if c != Code.OK])),
                        message=draw(st.text(max_size=10)))
    else:
        parameters = draw(st.sampled_from([None, "parameters",
                                           Parameters(tensors=[], tensor_type="")]))
    return StubProxy(cid), FitRes(status=status, parameters=parameters, num_examples=weight,
                               metrics={"loss": 1e6})


# --- checks shared by the properties and the sanity tests -------------------------------


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def flwr_warnings() -> Iterator[list[str]]:
    """WARNING+ messages of Flower's logger (fixtures such as caplog do not mix with
    @given, which runs the body many times per fixture)."""
    handler = _Collect()
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


_REJECTED = {
    "train": re.compile(r"aggregate_train \(round \d+\): rejected reply from node (.*?): "),
    "fit": re.compile(r"aggregate_fit \(round \d+\): rejected result from client (.*?): "),
}


def rejected_labels(messages: list[str], api: str = "train") -> Counter[str]:
    found = (_REJECTED[api].match(m) for m in messages)
    return Counter(m.group(1) for m in found if m)


def stable_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics that depend on the accepted replies only (not on time or rejections)."""
    return {k: v for k, v in metrics.items() if not k.endswith("-seconds")
            and k not in ("accepted-replies", "rejected-replies")}


def assert_identical(got: ArrayRecord, expected: ArrayRecord) -> None:
    assert list(got) == list(expected)
    a, b = got.to_torch_state_dict(), expected.to_torch_state_dict()
    for name in b:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), f"{name} differs"


_REFERENCE: dict[tuple[str, int], tuple[Any, dict[str, Any]]] = {}


def reference(api: str, n_good: int) -> tuple[Any, dict[str, Any]]:
    """The result of the strategy on the first ``n_good`` good replies alone (cached:
    fusion is deterministic)."""
    if (api, n_good) not in _REFERENCE:
        if api == "train":
            arrays, metrics = OTFusion(global_model, min_train_nodes=1).aggregate_train(
                1, [_good_reply(k) for k in range(n_good)])
        else:
            arrays, metrics = LegacyOTFusion(global_model, min_fit_clients=1).aggregate_fit(
                1, [_good_result(k) for k in range(n_good)], [])
        assert arrays is not None
        _REFERENCE[api, n_good] = arrays, stable_metrics(metrics)
    return _REFERENCE[api, n_good]


def check_mixed_round(strategy: OTFusion, good: list[Message],
                      bad: list[tuple[Any, str]], order: list[int]) -> None:
    """Property 2: the bad replies change nothing but the counts and the warnings."""
    replies = [*good, *(reply for reply, _ in bad)]
    with flwr_warnings() as messages:
        arrays, metrics = strategy.aggregate_train(1, [replies[i] for i in order])
    expected_arrays, expected_metrics = reference("train", len(good))
    assert arrays is not None
    assert metrics["accepted-replies"] == len(good)
    assert metrics["rejected-replies"] == len(bad)
    assert rejected_labels(messages) == Counter(label for _, label in bad)
    assert_identical(arrays, expected_arrays)
    assert stable_metrics(metrics) == expected_metrics


def check_rejected_round(strategy: OTFusion, good: list[Message],
                         bad: list[tuple[Any, str]], order: list[int]) -> None:
    """Property 3: too few valid replies leave no new arrays."""
    replies = [*good, *(reply for reply, _ in bad)]
    with flwr_warnings() as messages:
        arrays, metrics = strategy.aggregate_train(1, [replies[i] for i in order])
    assert arrays is None
    assert dict(metrics) == {"accepted-replies": len(good), "rejected-replies": len(bad)}
    assert rejected_labels(messages) == Counter(label for _, label in bad)


@st.composite
def bad_replies(draw, max_size: int = 6, hetero: bool = False) -> list[tuple[Any, str]]:
    count = draw(st.integers(1, max_size))
    return [draw(malformed_reply(100 + j, hetero=hetero)) for j in range(count)]


# --- property 1: the validation functions -----------------------------------------------


@given(content=malformed_content())
@settings(max_examples=600, **FUZZ)
def test_check_content_rejects_every_malformed_reply(content):
    reason = check_content(content, EXPECTED, weight_key=WEIGHT_KEY, max_abs_weight=MAX_ABS)
    assert isinstance(reason, str) and reason, f"not rejected: {reason!r}"
    VOLUME["check_content"] += 1


@given(items=malformed_list())
@settings(max_examples=300, **FUZZ)
def test_check_array_list_rejects_every_malformed_list(items):
    reason = check_array_list(items, EXPECTED, max_abs_weight=MAX_ABS)
    assert isinstance(reason, str) and reason, f"not rejected: {reason!r}"
    VOLUME["check_array_list"] += 1


@given(case=benign_content())
@settings(max_examples=50, **FUZZ)
def test_harmless_variations_of_a_good_reply_are_accepted(case):
    """The generators' base is valid: the rejections above are owed to the flaws."""
    content, arrays, weight = case
    checked = check_content(content, EXPECTED, weight_key=WEIGHT_KEY, max_abs_weight=MAX_ABS)
    assert not isinstance(checked, str), checked
    state, got_weight = checked
    assert list(state) == KEYS and got_weight == weight
    for name in KEYS:
        expected = torch.from_numpy(arrays[name].astype(arrays[name].dtype.newbyteorder("=")))
        assert torch.equal(state[name], expected.to(EXPECTED.dtypes[name])), name


# --- properties 2 and 3: OTFusion.aggregate_train and start -----------------------------


@given(n_good=st.integers(1, 3), min_nodes=st.integers(1, 3), bad=bad_replies(),
       data=st.data())
@settings(max_examples=100, **FUZZ)
def test_bad_replies_never_change_the_fused_model(n_good, min_nodes, bad, data):
    order = data.draw(st.permutations(range(n_good + len(bad))), label="order")
    strategy = OTFusion(global_model, min_train_nodes=min(min_nodes, n_good))
    check_mixed_round(strategy, [_good_reply(k) for k in range(n_good)], bad, order)
    VOLUME["aggregate_train"] += len(bad)


@given(n_good=st.integers(0, 2), missing=st.integers(1, 2), bad=bad_replies(8),
       data=st.data())
@settings(max_examples=100, **FUZZ)
def test_too_few_valid_replies_leave_no_new_arrays(n_good, missing, bad, data):
    order = data.draw(st.permutations(range(n_good + len(bad))), label="order")
    strategy = OTFusion(global_model, min_train_nodes=n_good + missing)
    check_rejected_round(strategy, [_good_reply(k) for k in range(n_good)], bad, order)
    VOLUME["aggregate_train"] += len(bad)


@given(bad=bad_replies(4, hetero=True))
@settings(max_examples=80, **FUZZ)
def test_heterogeneous_strategy_rejects_every_malformed_reply(bad):
    """With ``heterogeneous=True`` same-rank shapes pass ``check_content``; a reply whose
    shapes fit no model is then rejected when loading it."""
    strategy = OTFusion(global_model, heterogeneous=True, client_model_fn=model_from_shapes,
                        min_train_nodes=1)
    check_rejected_round(strategy, [], bad, list(range(len(bad))))
    VOLUME["aggregate_train"] += len(bad)


class ReplayGrid:
    """A ``Grid`` stand-in: answers each round's train messages with prepared replies."""

    def __init__(self, rounds: list[list[Any]], nodes: int):
        self.rounds = rounds
        self.nodes = nodes
        self.sent: list[list[ArrayRecord]] = []

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.nodes + 1))

    def send_and_receive(self, messages, *, timeout=None) -> list[Any]:
        messages = list(messages)
        if not messages:  # evaluation is off (fraction_evaluate=0)
            return []
        self.sent.append([m.content["arrays"] for m in messages])
        return self.rounds[len(self.sent) - 1]


@contextmanager
def task_identity() -> Iterator[None]:
    """Instruction Messages need the runtime's TaskIdentity."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("_run_id", "_task_id", "_node_id"):
            patch.setattr(TaskIdentity, name, 1)
        yield


@given(rounds=st.lists(st.tuples(st.integers(0, 1), bad_replies(4)), min_size=1,
                       max_size=2),
       data=st.data())
@settings(max_examples=40, **FUZZ)
def test_start_keeps_the_initial_arrays_when_replies_are_rejected(rounds, data):
    prepared, counts = [], []
    for n_good, bad in rounds:
        replies = [*(_good_reply(k) for k in range(n_good)), *(r for r, _ in bad)]
        order = data.draw(st.permutations(range(len(replies))), label="order")
        prepared.append([replies[i] for i in order])
        counts.append({"accepted-replies": n_good, "rejected-replies": len(bad)})
    strategy = OTFusion(global_model, min_train_nodes=2, min_available_nodes=2,
                        fraction_evaluate=0.0)
    initial = ArrayRecord(global_model().state_dict())
    snapshot = {k: a.data for k, a in initial.items()}
    grid = ReplayGrid(prepared, nodes=max(2, *(len(r) for r in prepared)))
    with task_identity():
        result = strategy.start(grid, initial, num_rounds=len(rounds))
    assert {k: a.data for k, a in result.arrays.items()} == snapshot
    assert {k: a.data for k, a in initial.items()} == snapshot
    assert len(grid.sent) == len(rounds)
    for sent in grid.sent:  # every round was sent the initial model
        assert all({k: a.data for k, a in arrays.items()} == snapshot for arrays in sent)
    assert [dict(result.train_metrics_clientapp[r + 1]) for r in range(len(rounds))] == counts
    VOLUME["start"] += sum(len(bad) for _, bad in rounds)


# --- property 4: the legacy twin --------------------------------------------------------


@given(n_good=st.integers(0, 3), min_clients=st.integers(1, 3),
       bad=st.integers(1, 5).flatmap(
           lambda n: st.tuples(*(malformed_result(f"b{j}") for j in range(n)))),
       failures=st.integers(0, 2), data=st.data())
@settings(max_examples=80, **FUZZ)
def test_legacy_bad_results_never_change_the_fused_model(n_good, min_clients, bad, failures,
                                                         data):
    results = [*(_good_result(k) for k in range(n_good)), *bad]
    results = [results[i] for i in data.draw(st.permutations(range(len(results))),
                                             label="order")]
    lost = [RuntimeError(f"client {j} timed out") for j in range(failures)]
    strategy = LegacyOTFusion(global_model, min_fit_clients=min_clients)
    with flwr_warnings() as messages:
        parameters, metrics = strategy.aggregate_fit(1, results, lost)
    counts = {"accepted-replies": n_good, "rejected-replies": len(bad) + failures}
    assert {k: metrics[k] for k in counts} == counts
    assert rejected_labels(messages, "fit") == Counter(f"b{j}" for j in range(len(bad)))
    if n_good < min_clients:
        assert parameters is None and metrics == counts
    else:
        expected, expected_metrics = reference("fit", n_good)
        assert parameters is not None
        assert parameters.tensor_type == expected.tensor_type
        assert parameters.tensors == expected.tensors  # bit-identical
        assert stable_metrics(metrics) == expected_metrics
    VOLUME["aggregate_fit"] += len(bad)


# --- the properties can fail -------------------------------------------------------------


def test_identity_check_detects_a_changed_good_reply():
    """A valid but different good reply changes the fused model: the comparison sees it."""
    altered = {k: v.copy() for k, v in GOOD[1].items()}
    altered["fc.weight"][0, 0] += 1e-3
    good = [_good_reply(0), _good_reply(1, altered)]
    bad = [(Message(error=Error(code=1, reason="x"), metadata=_metadata(100)), "100")]
    strategy = OTFusion(global_model)
    check_mixed_round(strategy, [_good_reply(0), _good_reply(1)], bad, [2, 0, 1])
    with pytest.raises(AssertionError, match="differs"):
        check_mixed_round(strategy, good, bad, [2, 0, 1])


def test_property_detects_an_accepted_corrupt_reply():
    """A strategy that lets a corrupt reply through fails the property."""
    corrupt = {k: v.copy() for k, v in GOOD[2].items()}
    corrupt["head.weight"][0, 0] = 1e6
    bad = [(Message(content=RecordDict({"a": _array_record(corrupt),
                                        "m": MetricRecord({WEIGHT_KEY: 5})}),
                    metadata=_metadata(100)), "100")]
    good = [_good_reply(0), _good_reply(1)]
    check_mixed_round(OTFusion(global_model), good, bad, [0, 2, 1])
    lenient = OTFusion(global_model, max_abs_weight=1e7)
    with pytest.raises(AssertionError):
        check_mixed_round(lenient, good, bad, [0, 2, 1])


# --- found by fuzzing: ints beyond the float range (|n| >= 2**1024) --------------------


@pytest.mark.parametrize("weight", [10**400, -(10**400)], ids=["1e400", "-1e400"])
def test_huge_integer_weight_is_rejected(weight):
    content = RecordDict({"arrays": _array_record(GOOD[0]),
                          "metrics": MetricRecord({WEIGHT_KEY: weight})})
    reason = check_content(content, EXPECTED, weight_key=WEIGHT_KEY, max_abs_weight=MAX_ABS)
    assert isinstance(reason, str)
    bad = [(Message(content=content, metadata=_metadata(100)), "100")]
    check_mixed_round(OTFusion(global_model), [_good_reply(0), _good_reply(1)], bad,
                      [0, 1, 2])


# --- volume -----------------------------------------------------------------------------

# At least one malformed reply per example, at least the examples each property asks for.
_MINIMUM = {"check_content": 600, "check_array_list": 300, "aggregate_train": 280,
            "start": 40, "aggregate_fit": 80}


def test_at_least_1000_malformed_replies_were_fed():
    """Counts what the properties above fed (run the whole file; skipped otherwise)."""
    if set(VOLUME) != set(_MINIMUM):
        pytest.skip("only meaningful when every property of this file ran")
    print(f"malformed replies fed: {dict(VOLUME)}")
    for name, minimum in _MINIMUM.items():
        assert VOLUME[name] >= minimum, dict(VOLUME)
    # the validation functions alone, and the strategy entries (validation + fusion) alone
    assert VOLUME["check_content"] + VOLUME["check_array_list"] >= 800, dict(VOLUME)
    assert VOLUME["aggregate_train"] + VOLUME["start"] + VOLUME["aggregate_fit"] >= 1000, \
        dict(VOLUME)


_MOMENT_ITEMS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**400, 10**400),
    st.booleans(), st.text(max_size=3), st.none(), st.binary(max_size=3),
    st.lists(st.floats(), max_size=2))
_MOMENT_VALUES = st.one_of(st.none(), st.lists(_MOMENT_ITEMS, max_size=6),
                           st.lists(st.floats(-2e12, 2e12), min_size=4, max_size=4),
                           st.tuples(_MOMENT_ITEMS), st.floats(), st.text(max_size=4),
                           st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))


@given(mean=_MOMENT_VALUES, var=_MOMENT_VALUES)
@settings(max_examples=400, **FUZZ)
def test_check_input_moments_never_raises_and_accepts_only_valid_moments(mean, var):
    from otfusion.fusion import InputMoments
    from otfusion.strategies.replies import check_input_moments

    checked = check_input_moments(mean, var, (2, 2))
    if mean is None and var is None:
        assert checked is None
    elif isinstance(checked, InputMoments):
        event("accepted")
        assert checked.mean.shape == checked.var.shape == (2, 2)
        assert float(checked.mean.abs().max()) <= 1e6
        assert 0 <= float(checked.var.min()) and float(checked.var.max()) <= 1e12
    else:
        assert isinstance(checked, str) and ("input-mean" in checked or "input-var" in checked)
