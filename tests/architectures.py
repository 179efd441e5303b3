"""Small torch architectures beyond the zoo, each with a hand-written permutation helper.

Every model below comes with ``permute_<name>(model, generator)``: a deep copy of the
model whose hidden units are randomly permuted so that it computes exactly the same
function (up to the floating point summation order). The helpers are written from the
models' definitions alone and import nothing from ``otfusion``: they are a second,
independent description of each architecture's symmetries, against which the fusion
engine's alignment graph is checked (``tests/fusion/test_fusion_architectures.py``).

Conventions:

* input features and output classes are never permuted;
* ``index`` tensors are gather indices: after ``_take(t, dim, index)``, position ``i``
  of axis ``dim`` holds what was at position ``index[i]``;
* every ``make_<name>(seed)`` builds the model with ``seed`` (the global RNG is left
  untouched), gives every normalisation layer random affine parameters and running
  statistics (fresh ones are all ones/zeros, which a wrong permutation leaves
  unchanged) and returns it in eval mode;
* every architecture is registered in :data:`SUPPORTED` (id -> make, permute, inputs);
  :data:`REFUSED` lists models the engine must refuse, with the module it must name.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from reindex import blocks as _blocks
from reindex import random_perm as _perm
from reindex import take as _take
from torch import nn

BATCH = 4
_GATES = {nn.RNN: 1, nn.GRU: 3, nn.LSTM: 4}

# ------------------------------------------------------------------------------ helpers





def _direct_sum(*indices: torch.Tensor) -> torch.Tensor:
    """Index of a concatenated axis: each part keeps its own permutation (block-diagonal)."""
    parts, offset = [], 0
    for index in indices:
        parts.append(index + offset)
        offset += index.numel()
    return torch.cat(parts)


def _grouped(groups: int, size: int, generator: torch.Generator,
             order: torch.Tensor | None = None):
    """A permutation of an axis of ``groups`` contiguous groups of ``size`` units that
    moves whole groups (new group ``g`` is old group ``order[g]``; ``order`` random when
    not given) and reorders the units inside each group by that group's own random
    permutation ``within[g]`` (positions inside old group ``order[g]``).

    Returns ``(index, order, within)``.
    """
    if order is None:
        order = _perm(groups, generator)
    within = [_perm(size, generator) for _ in range(groups)]
    index = torch.cat([int(order[g]) * size + within[g] for g in range(groups)])
    return index, order, within


def _rows(layer: nn.Module, index: torch.Tensor) -> None:
    """Output units of a Linear/Conv: weight axis 0 and the bias."""
    _take(layer.weight, 0, index)
    if getattr(layer, "bias", None) is not None:
        _take(layer.bias, 0, index)


def _cols(layer: nn.Module, index: torch.Tensor) -> None:
    """Input units of a Linear/Conv (groups=1): weight axis 1."""
    _take(layer.weight, 1, index)


def _norm(layer: nn.Module, index: torch.Tensor) -> None:
    """Per-channel parameters and statistics of a BatchNorm/GroupNorm/LayerNorm/RMSNorm."""
    for name in ("weight", "bias", "running_mean", "running_var"):
        tensor = getattr(layer, name, None)
        if isinstance(tensor, torch.Tensor):
            _take(tensor, 0, index)


def _grouped_conv_inputs(conv: nn.Conv2d | nn.Conv1d, within: list[torch.Tensor]) -> None:
    """Input axis of a grouped conv whose rows are already in the new order: the rows of
    new group ``g`` read their group's inputs reordered by ``within[g]``."""
    per_group = conv.out_channels // conv.groups
    for g in range(conv.groups):
        rows = conv.weight[g * per_group:(g + 1) * per_group]
        _take(rows, 1, within[g])


def _rnn_direction(rnn: nn.RNNBase, layer: int, reverse: bool, cells: torch.Tensor,
                   inputs: torch.Tensor | None,
                   projected: torch.Tensor | None = None) -> torch.Tensor:
    """One direction of one layer of ``rnn``: its hidden cells by ``cells`` (every gate
    block alike), its input columns by ``inputs`` (None: the model's input features), and,
    with ``proj_size``, its projected outputs by ``projected``. Returns the index of the
    direction's output features (what the next layer or the head reads)."""
    suffix = f"_l{layer}" + ("_reverse" if reverse else "")
    rows = _blocks(cells, outer=_GATES[type(rnn)])
    weight_ih = getattr(rnn, f"weight_ih{suffix}")
    weight_hh = getattr(rnn, f"weight_hh{suffix}")
    _take(weight_ih, 0, rows)
    if inputs is not None:
        _take(weight_ih, 1, inputs)
    _take(weight_hh, 0, rows)
    if rnn.bias:
        _take(getattr(rnn, f"bias_ih{suffix}"), 0, rows)
        _take(getattr(rnn, f"bias_hh{suffix}"), 0, rows)
    if rnn.proj_size:
        assert projected is not None
        weight_hr = getattr(rnn, f"weight_hr{suffix}")
        _take(weight_hr, 1, cells)
        _take(weight_hr, 0, projected)
        _take(weight_hh, 1, projected)  # the recurrent input is the projected state
        return projected
    _take(weight_hh, 1, cells)
    return cells


def _permute_rnn(rnn: nn.RNNBase, generator: torch.Generator,
                 inputs: torch.Tensor | None = None) -> torch.Tensor:
    """Every direction of every layer of ``rnn`` with its own random permutation; the
    input of layer ``l > 0`` is the direct sum [forward, backward] of layer ``l - 1``'s
    outputs. Returns the index of the last layer's output features."""
    previous = inputs
    for layer in range(rnn.num_layers):
        outputs = []
        for reverse in (False, True)[: 2 if rnn.bidirectional else 1]:
            cells = _perm(rnn.hidden_size, generator)
            projected = _perm(rnn.proj_size, generator) if rnn.proj_size else None
            outputs.append(_rnn_direction(rnn, layer, reverse, cells, previous, projected))
        previous = _direct_sum(*outputs)
    return previous


def _copying(rule: Callable[[nn.Module, torch.Generator], None]):
    """Turn an in-place rule into ``permute(model, generator) -> permuted deep copy``."""

    @functools.wraps(rule)
    def permute(model: nn.Module, generator: torch.Generator) -> nn.Module:
        permuted = copy.deepcopy(model)
        with torch.no_grad():
            rule(permuted, generator)
        return permuted.eval()

    return permute


def randomize_norms(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Random affine parameters (and running statistics) for every BatchNorm, GroupNorm,
    LayerNorm and RMSNorm of ``model``, in place. Returns ``model``."""

    def fill(tensor: torch.Tensor | None, mean: float, spread: float, positive=False):
        if not isinstance(tensor, torch.Tensor):
            return
        noise = torch.rand(tensor.shape, generator=generator) if positive else \
            torch.randn(tensor.shape, generator=generator)
        tensor.copy_((mean + spread * noise).to(tensor.dtype))

    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, norms):
                fill(getattr(module, "weight", None), 1.0, 0.3)
                fill(getattr(module, "bias", None), 0.0, 0.3)
                fill(getattr(module, "running_mean", None), 0.0, 0.5)
                fill(getattr(module, "running_var", None), 0.5, 1.5, positive=True)
    return model


def _build(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
    randomize_norms(model, torch.Generator().manual_seed(10_000 + seed))
    return model.eval()


# ------------------------------------------------------------------------------- inputs


def image_inputs(generator: torch.Generator) -> torch.Tensor:
    return torch.randn(BATCH, 3, 8, 8, generator=generator)


def sequence_inputs(generator: torch.Generator) -> torch.Tensor:
    """(batch, time=5, features=6), batch first."""
    return torch.randn(BATCH, 5, 6, generator=generator)


def vector_inputs(generator: torch.Generator) -> torch.Tensor:
    return torch.randn(BATCH, 6, generator=generator)


def row_inputs(generator: torch.Generator) -> torch.Tensor:
    """(batch, rows=4, features=6): a Linear acts on every row."""
    return torch.randn(BATCH, 4, 6, generator=generator)


def token_inputs(generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, TiedLM.VOCAB, (BATCH, 6), generator=generator)


def squeezable_inputs(generator: torch.Generator) -> torch.Tensor:
    return torch.randn(BATCH, 1, 6, generator=generator)


# ------------------------------------------------------------- baseline: a plain MLP


class MLP(nn.Module):
    """Linear(6, 16) - ReLU - Linear(16, 5). Also used in bfloat16/float16."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(6, hidden)
        self.fc2 = nn.Linear(hidden, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@_copying
def permute_mlp(model: MLP, generator: torch.Generator) -> None:
    """One perm: fc1 rows (+bias) and fc2 columns."""
    hidden = _perm(model.fc1.out_features, generator)
    _rows(model.fc1, hidden)
    _cols(model.fc2, hidden)


def make_mlp(seed: int, dtype: torch.dtype = torch.float32) -> MLP:
    return _build(MLP, seed).to(dtype)


# -------------------------------------------------------- A. tied-embedding language model


class TiedLM(nn.Module):
    """Embedding(12, 8) -> LSTM(8, 8) -> Linear(8, 12) whose weight IS the embedding's
    (pytorch/examples word_language_model ``--tied``). Tokens (B, T) -> logits (B, T, V)."""

    VOCAB = 12

    def __init__(self, vocab: int = VOCAB, dim: int = 8):
        super().__init__()
        self.encoder = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.decoder = nn.Linear(dim, vocab)
        self.decoder.weight = self.encoder.weight

    def forward(self, tokens):
        out, _ = self.lstm(self.encoder(tokens))
        return self.decoder(out)


@_copying
def permute_tied_lm(model: TiedLM, generator: torch.Generator) -> None:
    """ONE perm of the embedding dim D, shared by: the embedding's columns (= the tied
    decoder's input columns: the same tensor, permuted once), the LSTM's input columns,
    and the LSTM's hidden units (rows of all 4 gate blocks of weight_ih/weight_hh and
    the biases, columns of weight_hh). The decoder bias (vocabulary) is not permuted."""
    assert model.decoder.weight is model.encoder.weight
    dim = _perm(model.encoder.embedding_dim, generator)
    _take(model.encoder.weight, 1, dim)  # also the decoder's columns
    _rnn_direction(model.lstm, 0, False, dim, dim)


def make_tied_lm(seed: int) -> TiedLM:
    return _build(TiedLM, seed)


# --------------------------------------------------------------------- B. transposes


class TransposeHead(nn.Module):
    """Linear(6, 10) - ReLU - Linear(10, 5), returning the logits transposed: (5, B)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 5)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h).T


class DoubleT(TransposeHead):
    """As :class:`TransposeHead`, but ``fc2(h.T.T)``: two transposes that cancel."""

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h.T.T)


@_copying
def permute_two_layer(model: TransposeHead, generator: torch.Generator) -> None:
    """One perm: fc1 rows (+bias) and fc2 columns."""
    hidden = _perm(model.fc1.out_features, generator)
    _rows(model.fc1, hidden)
    _cols(model.fc2, hidden)


def make_transpose_head(seed: int) -> TransposeHead:
    return _build(TransposeHead, seed)


def make_double_t(seed: int) -> DoubleT:
    return _build(DoubleT, seed)


class KwTranspose(nn.Module):
    """(B, 4, 6) -> Linear(6, 8) -> ``transpose(dim0=1, dim1=2)`` -> Conv1d(8, 8, 3) ->
    ReLU -> mean over length -> Linear(8, 5)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.fc(x).transpose(dim0=1, dim1=2)
        h = torch.relu(self.conv(h))
        return self.head(h.mean(2))


class PermuteKw(KwTranspose):
    """As :class:`KwTranspose` with ``permute(dims=(0, 2, 1))`` into the conv, then
    ``.mT`` back to rows, the head on every row, and a mean over rows."""

    def forward(self, x):
        h = self.fc(x).permute(dims=(0, 2, 1))
        h = torch.relu(self.conv(h)).mT
        return self.head(h).mean(1)


class MatrixT(KwTranspose):
    """As :class:`KwTranspose` with ``.mT`` instead of ``transpose``."""

    def forward(self, x):
        h = torch.relu(self.conv(self.fc(x).mT))
        return self.head(h.mean(2))


@_copying
def permute_fc_conv_head(model: KwTranspose, generator: torch.Generator) -> None:
    """Two perms: fc rows (+bias) = conv input channels; conv output channels (+bias) =
    head columns."""
    features = _perm(model.fc.out_features, generator)
    channels = _perm(model.conv.out_channels, generator)
    _rows(model.fc, features)
    _cols(model.conv, features)
    _rows(model.conv, channels)
    _cols(model.head, channels)


def make_kw_transpose(seed: int) -> KwTranspose:
    return _build(KwTranspose, seed)


def make_permute_kw(seed: int) -> PermuteKw:
    return _build(PermuteKw, seed)


def make_matrix_t(seed: int) -> MatrixT:
    return _build(MatrixT, seed)


# ------------------------------------------------------- C. models the engine must refuse


class PoolHidden(nn.Module):
    """(B, 2, 6) -> Linear(6, 10) -> ``pool`` (1-D pooling of window 3 over the LAST dim,
    i.e. across the 10 hidden units, so their order matters) -> Linear(10, 5)."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.pool = pool
        self.fc2 = nn.Linear(10, 5)

    def forward(self, x):
        return self.fc2(self.pool(torch.relu(self.fc1(x))))


def make_avgpool_hidden(seed: int) -> PoolHidden:
    return _build(lambda: PoolHidden(nn.AvgPool1d(3, 1, 1)), seed)


def make_maxpool_hidden(seed: int) -> PoolHidden:
    return _build(lambda: PoolHidden(nn.MaxPool1d(3, 1, 1)), seed)


def pool_inputs(generator: torch.Generator) -> torch.Tensor:
    return torch.randn(BATCH, 2, 6, generator=generator)


class ConvLSTM(nn.Module):
    """Conv1d(4, 6, 3) on (B, 4, L=7) whose output (B, 6, 7) goes straight into
    ``LSTM(7, 8, batch_first)``: the conv's channels are the LSTM's TIME steps (their order
    matters) and its length is the LSTM's features. Then ``out[:, -1]`` -> Linear(8, 5)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, padding=1)
        self.lstm = nn.LSTM(7, 8, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        out, _ = self.lstm(self.conv(x))
        return self.head(out[:, -1])


def make_conv_lstm(seed: int) -> ConvLSTM:
    return _build(ConvLSTM, seed)


def conv_lstm_inputs(generator: torch.Generator) -> torch.Tensor:
    return torch.randn(BATCH, 4, 7, generator=generator)


# -------------------------------------------------- E. MobileNetV2 inverted residual block


class InvertedResidual(nn.Module):
    """Stem Conv(3, 8, 3)-BN-ReLU6; block: 1x1 expand Conv(8, 16)-BN-ReLU6, depthwise
    Conv(16, 16, 3, groups=16)-BN-ReLU6, 1x1 project Conv(16, 8)-BN, added to the block
    input; hardswish, spatial mean, Linear(8, 5)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(8)
        self.expand = nn.Conv2d(8, 16, 1, bias=False)
        self.expand_bn = nn.BatchNorm2d(16)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.depthwise_bn = nn.BatchNorm2d(16)
        self.project = nn.Conv2d(16, 8, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU6()
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.act(self.stem_bn(self.stem(x)))
        y = self.act(self.expand_bn(self.expand(x)))
        y = self.act(self.depthwise_bn(self.depthwise(y)))
        x = x + self.project_bn(self.project(y))
        x = F.hardswish(x)
        return self.head(x.mean([2, 3]))


@_copying
def permute_inverted_residual(model: InvertedResidual, generator: torch.Generator) -> None:
    """Stream perm (8): stem rows (+bias), stem_bn, expand columns, project rows,
    project_bn, head columns. Expanded perm (16): expand rows, expand_bn, depthwise weight
    (16, 1, 3, 3) axis 0 only (each channel is its own group: in == out), depthwise_bn,
    project columns."""
    stream = _perm(model.stem.out_channels, generator)
    expanded = _perm(model.expand.out_channels, generator)
    _rows(model.stem, stream)
    _norm(model.stem_bn, stream)
    _cols(model.expand, stream)
    _rows(model.expand, expanded)
    _norm(model.expand_bn, expanded)
    _rows(model.depthwise, expanded)
    _norm(model.depthwise_bn, expanded)
    _cols(model.project, expanded)
    _rows(model.project, stream)
    _norm(model.project_bn, stream)
    _cols(model.head, stream)


def make_inverted_residual(seed: int) -> InvertedResidual:
    return _build(InvertedResidual, seed)


# -------------------------------------------------------------------- F. grouped conv


class GroupedConv(nn.Module):
    """Conv(3, 8, 3)-BN-ReLU, Conv(8, 12, 3, groups=4)-BN-ReLU, spatial mean, Linear(12, 5).
    Group ``i`` of the grouped conv reads channels 2i, 2i+1 and writes 3i .. 3i+2."""

    GROUPS = 4

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, groups=self.GROUPS)
        self.bn2 = nn.BatchNorm2d(12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean([2, 3]))


@_copying
def permute_grouped_conv(model: GroupedConv, generator: torch.Generator) -> None:
    """One group order (4) shared by both sides of the grouped conv, with independent
    within-group perms per group and side.

    * input side (8 = 4 groups x 2): new channel (g, j) = old channel
      (order[g], in_within[g][j]); conv1 rows (+bias) and bn1;
    * output side (12 = 4 groups x 3): new channel (g, k) = old (order[g], out_within[g][k]);
      conv2 rows (+bias), bn2, head columns;
    * conv2 weight (12, 2, 3, 3): rows by the output index, then the input axis of the
      rows of new group g by in_within[g] (group g now reads what old group order[g] read).
    """
    groups = model.conv2.groups
    out_size = model.conv2.out_channels // groups
    in_size = model.conv2.in_channels // groups
    outputs, order, _ = _grouped(groups, out_size, generator)
    inputs, _, in_within = _grouped(groups, in_size, generator, order=order)
    _rows(model.conv1, inputs)
    _norm(model.bn1, inputs)
    _rows(model.conv2, outputs)
    _grouped_conv_inputs(model.conv2, in_within)
    _norm(model.bn2, outputs)
    _cols(model.head, outputs)


def make_grouped_conv(seed: int) -> GroupedConv:
    return _build(GroupedConv, seed)


# ---------------------------------------------------------------- G. GroupNorm, RMSNorm


class GroupNormNet(nn.Module):
    """Conv(3, 8)-GroupNorm(4, 8)-ReLU, Conv(8, 8)-GroupNorm(8, 8)-ReLU,
    Conv(8, 8)-GroupNorm(1, 8)-ReLU, spatial mean, Linear(8, 5)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn1 = nn.GroupNorm(4, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.gn2 = nn.GroupNorm(8, 8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.gn3 = nn.GroupNorm(1, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.gn1(self.conv1(x)))
        x = torch.relu(self.gn2(self.conv2(x)))
        x = torch.relu(self.gn3(self.conv3(x)))
        return self.head(x.mean([2, 3]))


@_copying
def permute_groupnorm(model: GroupNormNet, generator: torch.Generator) -> None:
    """conv1 out (8 = 4 groups x 2 of gn1): whole groups and units within each group
    (block-structured): conv1 rows, gn1, conv2 columns. conv2 out (gn2: one channel per
    group) and conv3 out (gn3: one group of all): any perm, on conv rows, the GroupNorm
    and the next layer's columns."""
    first, _, _ = _grouped(model.gn1.num_groups, 8 // model.gn1.num_groups, generator)
    second = _perm(8, generator)
    third = _perm(8, generator)
    _rows(model.conv1, first)
    _norm(model.gn1, first)
    _cols(model.conv2, first)
    _rows(model.conv2, second)
    _norm(model.gn2, second)
    _cols(model.conv3, second)
    _rows(model.conv3, third)
    _norm(model.gn3, third)
    _cols(model.head, third)


def make_groupnorm(seed: int) -> GroupNormNet:
    return _build(GroupNormNet, seed)


class RMSNormMLP(nn.Module):
    """Linear(6, 16) - RMSNorm(16) - ReLU - Linear(16, 5)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.norm = nn.RMSNorm(16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


@_copying
def permute_rmsnorm(model: RMSNormMLP, generator: torch.Generator) -> None:
    """One perm: fc1 rows (+bias), the RMSNorm weight, fc2 columns."""
    hidden = _perm(16, generator)
    _rows(model.fc1, hidden)
    _norm(model.norm, hidden)
    _cols(model.fc2, hidden)


def make_rmsnorm(seed: int) -> RMSNormMLP:
    return _build(RMSNormMLP, seed)


# ------------------------------------------------------------------- H. concatenation


class DenseCat(nn.Module):
    """DenseNet-style: x0 = stem Conv(3, 4); x1 = Conv(4, 4)(ReLU(x0));
    ``torch.cat([x0, x1], dim)`` (8 channels) -> BN -> ReLU -> Conv(8, 6) -> spatial mean ->
    Linear(6, 5). ``dim`` is 1 or -3."""

    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = dim
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x0 = self.stem(x)
        x1 = self.conv1(torch.relu(x0))
        y = torch.relu(self.bn(torch.cat([x0, x1], dim=self.dim)))
        return self.head(self.conv2(y).mean([2, 3]))


@_copying
def permute_dense_cat(model: DenseCat, generator: torch.Generator) -> None:
    """x0's perm (4): stem rows, conv1 columns; x1's perm (4): conv1 rows. The concatenated
    axis carries their direct sum [x0 perm, x1 perm + 4]: bn, conv2 columns. conv2's
    perm (6): conv2 rows, head columns."""
    first = _perm(4, generator)
    second = _perm(4, generator)
    joined = _direct_sum(first, second)
    last = _perm(6, generator)
    _rows(model.stem, first)
    _cols(model.conv1, first)
    _rows(model.conv1, second)
    _norm(model.bn, joined)
    _cols(model.conv2, joined)
    _rows(model.conv2, last)
    _cols(model.head, last)


def make_dense_cat(seed: int) -> DenseCat:
    return _build(DenseCat, seed)


def make_dense_cat_negative_dim(seed: int) -> DenseCat:
    return _build(lambda: DenseCat(dim=-3), seed)


class Fire(nn.Module):
    """SqueezeNet Fire module: stem Conv(3, 8, 3)-ReLU; squeeze 1x1 Conv(8, 4)-ReLU;
    ``cat([ReLU(expand1x1(s)), ReLU(expand3x3(s))], 1)`` (6 + 6 channels); spatial mean;
    Linear(12, 5)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.squeeze = nn.Conv2d(8, 4, 1)
        self.expand1x1 = nn.Conv2d(4, 6, 1)
        self.expand3x3 = nn.Conv2d(4, 6, 3, padding=1)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        s = torch.relu(self.squeeze(x))
        y = torch.cat([torch.relu(self.expand1x1(s)), torch.relu(self.expand3x3(s))], 1)
        return self.head(y.mean([2, 3]))


@_copying
def permute_fire(model: Fire, generator: torch.Generator) -> None:
    """stem perm (8): stem rows, squeeze columns; squeeze perm (4): squeeze rows, both
    expands' columns; expand1x1 perm (6) and expand3x3 perm (6): their rows; head columns:
    the direct sum [expand1x1 perm, expand3x3 perm + 6]."""
    stem = _perm(8, generator)
    squeeze = _perm(4, generator)
    one = _perm(6, generator)
    three = _perm(6, generator)
    _rows(model.stem, stem)
    _cols(model.squeeze, stem)
    _rows(model.squeeze, squeeze)
    _cols(model.expand1x1, squeeze)
    _cols(model.expand3x3, squeeze)
    _rows(model.expand1x1, one)
    _rows(model.expand3x3, three)
    _cols(model.head, _direct_sum(one, three))


def make_fire(seed: int) -> Fire:
    return _build(Fire, seed)


# -------------------------------------------------------------------------- I. idioms


class OptionalArg(nn.Module):
    """``forward(self, x, hidden=None)`` (word_language_model style): the optional state is
    passed on to LSTM(6, 8); ``out[:, -1]`` -> Linear(8, 5)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 8, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x, hidden=None):
        out, hidden = self.lstm(x, hidden)
        return self.head(out[:, -1])


class StackedLSTM(nn.Module):
    """LSTM(6, 8, num_layers=2, batch_first) classifier reading the last layer's final
    state ``h_n[-1]`` (``last_step=False``) or the last time step ``out[:, -1]``."""

    def __init__(self, last_step: bool = False):
        super().__init__()
        self.last_step = last_step
        self.lstm = nn.LSTM(6, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        out, (h_n, _) = self.lstm(x)
        return self.head(out[:, -1] if self.last_step else h_n[-1])


class RecurrentHead(nn.Module):
    """``rnn`` (batch first) -> ``out[:, -1]`` -> Linear(out features, 5)."""

    def __init__(self, rnn: nn.RNNBase):
        super().__init__()
        self.rnn = rnn
        directions = 2 if rnn.bidirectional else 1
        self.head = nn.Linear(directions * (rnn.proj_size or rnn.hidden_size), 5)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _recurrent_rule(attribute: str):
    @_copying
    def permute(model: nn.Module, generator: torch.Generator) -> None:
        """Each direction of each layer has its own hidden perm (all gate blocks alike);
        layer l > 0 reads the direct sum [forward perm, backward perm + H] of layer l - 1;
        with ``proj_size`` the cells and the projected outputs have separate perms
        (weight_hr: columns by the cells, rows by the projection, which also orders
        weight_hh's columns). The head reads the last layer's direct sum."""
        _cols(model.head, _permute_rnn(getattr(model, attribute), generator))

    return permute


permute_optional_arg = _recurrent_rule("lstm")
permute_stacked_lstm = _recurrent_rule("lstm")
permute_recurrent_head = _recurrent_rule("rnn")


def make_optional_arg(seed: int) -> OptionalArg:
    return _build(OptionalArg, seed)


def make_lstm2_final_state(seed: int) -> StackedLSTM:
    return _build(StackedLSTM, seed)


def make_lstm2_last_step(seed: int) -> StackedLSTM:
    return _build(lambda: StackedLSTM(last_step=True), seed)


class InputBuffers(nn.Module):
    """Registered input normalisation ``(x - self.mean) / self.std`` (buffers of shape
    (1, 3, 1, 1): input channels, never permuted), Conv(3, 8)-BN-ReLU, mean, Linear(8, 5)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = (x - self.mean) / self.std
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(x.mean([2, 3]))


@_copying
def permute_conv_bn_head(model: nn.Module, generator: torch.Generator) -> None:
    """One perm: conv rows (+bias), its BatchNorm when there is one, head columns. Buffers
    that are not a layer's statistics are left alone."""
    channels = _perm(model.conv.out_channels, generator)
    _rows(model.conv, channels)
    if getattr(model, "bn", None) is not None:
        _norm(model.bn, channels)
    _cols(model.head, channels)


def make_input_buffers(seed: int) -> InputBuffers:
    return _build(InputBuffers, seed)


class UnusedBuffer(MLP):
    """:class:`MLP` (hidden width 10) with two registered buffers ``forward`` never reads:
    a float one as long as the hidden layer (a shape-only guess would take it for a
    hidden-unit axis) and an integer one."""

    def __init__(self):
        super().__init__(hidden=10)
        self.register_buffer("unused", torch.linspace(-1.0, 1.0, 10))
        self.register_buffer("version", torch.tensor(3))


def make_unused_buffer(seed: int) -> UnusedBuffer:
    return _build(UnusedBuffer, seed)


class SqueezeUnsqueeze(nn.Module):
    """(B, 1, 6) -> ``squeeze(1)`` -> Linear(6, 8)-ReLU -> ``unsqueeze(2)`` -> 1x1
    Conv1d(8, 8)-ReLU -> ``squeeze(2)`` -> Linear(8, 5)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.conv = nn.Conv1d(8, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.fc(x.squeeze(1))).unsqueeze(2)
        h = torch.relu(self.conv(h)).squeeze(2)
        return self.head(h)


def make_squeeze_unsqueeze(seed: int) -> SqueezeUnsqueeze:
    return _build(SqueezeUnsqueeze, seed)


class FlattenAfterMean(nn.Module):
    """Conv(3, 8)-ReLU -> ``mean([2, 3], keepdim=True)`` (B, 8, 1, 1) -> ``flatten(1)``
    (merges only singleton axes) -> Linear(8, 5)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x)).mean([2, 3], keepdim=True)
        return self.head(x.flatten(1))


class ViewBatch(nn.Module):
    """Conv(3, 8)-BN-ReLU -> AdaptiveAvgPool2d(1) (B, 8, 1, 1) -> ``view(x.size(0), -1)`` ->
    Linear(8, 5) (the torchvision classifier idiom)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.head(x.view(x.size(0), -1))


def make_flatten_after_mean(seed: int) -> FlattenAfterMean:
    return _build(FlattenAfterMean, seed)


def make_view_batch(seed: int) -> ViewBatch:
    return _build(ViewBatch, seed)


@_copying
def permute_squeeze_unsqueeze(model: SqueezeUnsqueeze, generator: torch.Generator) -> None:
    """fc perm (8): fc rows, conv columns; conv perm (8): conv rows, head columns."""
    first = _perm(8, generator)
    second = _perm(8, generator)
    _rows(model.fc, first)
    _cols(model.conv, first)
    _rows(model.conv, second)
    _cols(model.head, second)


# ----------------------------------------------------- J. bidirectional / projected RNNs


def make_bilstm2(seed: int) -> RecurrentHead:
    return _build(lambda: RecurrentHead(
        nn.LSTM(6, 8, num_layers=2, bidirectional=True, batch_first=True)), seed)


def make_bigru(seed: int) -> RecurrentHead:
    return _build(lambda: RecurrentHead(nn.GRU(6, 8, bidirectional=True, batch_first=True)),
                  seed)


def make_birnn(seed: int) -> RecurrentHead:
    return _build(lambda: RecurrentHead(nn.RNN(6, 8, bidirectional=True, batch_first=True)),
                  seed)


def make_lstm_proj(seed: int) -> RecurrentHead:
    return _build(lambda: RecurrentHead(nn.LSTM(6, 12, proj_size=4, batch_first=True)), seed)


# ---------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Architecture:
    make: Callable[[int], nn.Module]
    permute: Callable[[nn.Module, torch.Generator], nn.Module]
    inputs: Callable[[torch.Generator], torch.Tensor]


SUPPORTED: dict[str, Architecture] = {
    "mlp": Architecture(make_mlp, permute_mlp, vector_inputs),
    # A
    "tied-lm": Architecture(make_tied_lm, permute_tied_lm, token_inputs),
    # B
    "transpose-head": Architecture(make_transpose_head, permute_two_layer, vector_inputs),
    "double-t": Architecture(make_double_t, permute_two_layer, vector_inputs),
    "kw-transpose": Architecture(make_kw_transpose, permute_fc_conv_head, row_inputs),
    "permute-kw": Architecture(make_permute_kw, permute_fc_conv_head, row_inputs),
    "matrix-t": Architecture(make_matrix_t, permute_fc_conv_head, row_inputs),
    # E
    "inverted-residual": Architecture(make_inverted_residual, permute_inverted_residual,
                                      image_inputs),
    # F
    "grouped-conv": Architecture(make_grouped_conv, permute_grouped_conv, image_inputs),
    # G
    "groupnorm": Architecture(make_groupnorm, permute_groupnorm, image_inputs),
    "rmsnorm": Architecture(make_rmsnorm, permute_rmsnorm, vector_inputs),
    # H
    "dense-cat": Architecture(make_dense_cat, permute_dense_cat, image_inputs),
    "dense-cat-negative-dim": Architecture(make_dense_cat_negative_dim, permute_dense_cat,
                                           image_inputs),
    "fire": Architecture(make_fire, permute_fire, image_inputs),
    # I
    "optional-arg": Architecture(make_optional_arg, permute_optional_arg, sequence_inputs),
    "input-buffers": Architecture(make_input_buffers, permute_conv_bn_head, image_inputs),
    "unused-buffer": Architecture(make_unused_buffer, permute_mlp, vector_inputs),
    "squeeze-unsqueeze": Architecture(make_squeeze_unsqueeze, permute_squeeze_unsqueeze,
                                      squeezable_inputs),
    "flatten-after-mean": Architecture(make_flatten_after_mean, permute_conv_bn_head,
                                       image_inputs),
    "view-batch": Architecture(make_view_batch, permute_conv_bn_head, image_inputs),
    "lstm2-final-state": Architecture(make_lstm2_final_state, permute_stacked_lstm,
                                      sequence_inputs),
    "lstm2-last-step": Architecture(make_lstm2_last_step, permute_stacked_lstm,
                                    sequence_inputs),
    # J
    "bilstm2": Architecture(make_bilstm2, permute_recurrent_head, sequence_inputs),
    "bigru": Architecture(make_bigru, permute_recurrent_head, sequence_inputs),
    "birnn": Architecture(make_birnn, permute_recurrent_head, sequence_inputs),
    "lstm-proj": Architecture(make_lstm_proj, permute_recurrent_head, sequence_inputs),
}
"""Architectures the engine must fuse and align: id -> (make, permute, inputs)."""


REFUSED: dict[str, tuple[Callable[[int], nn.Module], Callable, str]] = {
    "avgpool-hidden": (make_avgpool_hidden, pool_inputs, "pool"),
    "maxpool-hidden": (make_maxpool_hidden, pool_inputs, "pool"),
    "conv-lstm": (make_conv_lstm, conv_lstm_inputs, "lstm"),
}
"""Architectures the engine must refuse: id -> (make, inputs, the module's qualified name
the error must contain)."""
