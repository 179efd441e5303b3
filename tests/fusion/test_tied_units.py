"""Units that the layer defining them cannot tell apart: filters pruned to zeros in place
(``torch.nn.utils.prune.ln_structured``, then ``prune.remove``) or units duplicated
(Net2Wider), each followed by a norm whose parameters differ from unit to unit. A model
fused with permuted copies of itself must still compute its own function: the norm's
parameters tell the tied units apart. The permutations are written by hand here,
independently of the engine.
"""

from __future__ import annotations

import copy

import pytest
import torch
from model_checks import assert_same_function as _same_function
from reindex import blocks, take
from torch import nn

from otfusion.fusion import FusionConfig, align, fuse

CONFIGS = {
    "weights": FusionConfig.from_options(distill_steps=0),
    "activations": FusionConfig.from_options(distill_steps=0, cost="activations"),
}


class PrunedCNN(nn.Module):
    """A convolution with some filters zeroed, BatchNorm, and a second convolution."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)
        self.input_shape = (2, 5, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.head(torch.relu(self.conv2(h)).mean(dim=(2, 3)))


class DuplicatedMLP(nn.Module):
    """A Linear with two pairs of identical units, LayerNorm, and an output Linear."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)
        self.input_shape = (5,)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.fc(x))))


def _pruned_cnn(seed: int) -> PrunedCNN:
    torch.manual_seed(seed)
    model = PrunedCNN()
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        model.conv.weight[[1, 4]] = 0.0  # pruned filters, bias included
        model.conv.bias[[1, 4]] = 0.0
        bn = model.bn
        for tensor in (bn.weight, bn.bias, bn.running_mean):
            tensor.copy_(torch.randn(6, generator=generator))
        bn.running_var.copy_(0.5 + torch.rand(6, generator=generator))
    return model.eval()


def _duplicated_mlp(seed: int) -> DuplicatedMLP:
    torch.manual_seed(seed)
    model = DuplicatedMLP()
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for copy_, original in ((3, 0), (5, 2)):
            model.fc.weight[copy_] = model.fc.weight[original]
            model.fc.bias[copy_] = model.fc.bias[original]
        model.norm.weight.copy_(1 + 0.5 * torch.randn(6, generator=generator))
        model.norm.bias.copy_(0.5 * torch.randn(6, generator=generator))
    return model.eval()


NORM = ("weight", "bias", "running_mean", "running_var")


def _reindexed(model: nn.Module, moves: list[tuple[str, int, torch.Tensor]]) -> nn.Module:
    """A copy of ``model`` with each ``(tensor name, dim, index)`` of ``moves`` applied:
    the tensor reindexed along that dim."""
    permuted = copy.deepcopy(model)
    state = permuted.state_dict()
    with torch.no_grad():
        for name, dim, index in moves:
            take(state[name], dim, index)
    return permuted


def _permute_cnn(model: PrunedCNN, index: torch.Tensor) -> PrunedCNN:
    return _reindexed(model, [("conv.weight", 0, index), ("conv.bias", 0, index),
                              *((f"bn.{n}", 0, index) for n in NORM),
                              ("conv2.weight", 1, index)])


def _permute_mlp(model: DuplicatedMLP, index: torch.Tensor) -> DuplicatedMLP:
    return _reindexed(model, [*((t, 0, index) for t in ("fc.weight", "fc.bias",
                                                             "norm.weight", "norm.bias")),
                              ("head.weight", 1, index)])


CASES = {
    "pruned-cnn": (_pruned_cnn, _permute_cnn, (2, 5, 5)),
    "duplicated-mlp": (_duplicated_mlp, _permute_mlp, (5,)),
}


@pytest.mark.parametrize("cost", CONFIGS)
@pytest.mark.parametrize("case", CASES)
def test_a_model_fused_with_permuted_copies_keeps_its_tied_units_apart(case, cost):
    build, permute, shape = CASES[case]
    model, other = build(0), build(1)
    x = torch.randn(32, *shape, generator=torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(3)
    copies = [permute(model, torch.randperm(6, generator=generator)) for _ in range(2)]
    swapped = permute(model, torch.tensor([0, 4, 2, 3, 1, 5]))  # the tied units alone
    config = CONFIGS[cost]
    _same_function(align(other, model, config=config, inputs=x), other, x)
    _same_function(fuse([model, swapped], config=config, inputs=x), model, x)
    _same_function(fuse([copies[0], model, copies[1]], [3.0, 1.0, 2.0], config=config,
                        inputs=x), model, x)


class PrunedDenseNet(nn.Module):
    """Two DenseNet layers (features concatenated, then normalised), pruned filters in
    both: only the norms over the concatenations tell their units apart."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.conv1, self.bn1 = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(10)
        self.conv2, self.bn2 = nn.Conv2d(10, 6, 3, padding=1), nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 3)
        self.input_shape = (2, 5, 5)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.cat([h, self.conv1(h)], 1)
        h = torch.cat([h, self.conv2(torch.relu(self.bn1(h)))], 1)
        return self.head(torch.relu(self.bn2(h)).mean(dim=(2, 3)))


def _pruned_densenet(seed: int) -> PrunedDenseNet:
    torch.manual_seed(seed)
    model = PrunedDenseNet()
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for conv in (model.conv1, model.conv2):
            conv.weight[[1, 4]] = 0.0
            conv.bias[[1, 4]] = 0.0
        for bn in (model.bn1, model.bn2):
            for tensor in (bn.weight, bn.bias, bn.running_mean):
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
            bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=generator))
    return model.eval()


def _permute_densenet(model: PrunedDenseNet, first: torch.Tensor, second: torch.Tensor
                      ) -> PrunedDenseNet:
    """``conv1``'s units reordered by ``first``, ``conv2``'s by ``second``, and every
    tensor over the concatenations with them."""
    joined1 = torch.cat([torch.arange(4), 4 + first])
    joined2 = torch.cat([joined1, 10 + second])
    return _reindexed(model, [
        ("conv1.weight", 0, first), ("conv1.bias", 0, first),
        ("conv2.weight", 0, second), ("conv2.weight", 1, joined1), ("conv2.bias", 0, second),
        *((f"bn1.{n}", 0, joined1) for n in NORM), *((f"bn2.{n}", 0, joined2) for n in NORM),
        ("head.weight", 1, joined2)])


@pytest.mark.parametrize("cost", CONFIGS)
def test_norms_over_concatenations_keep_tied_units_apart(cost):
    model, other = _pruned_densenet(0), _pruned_densenet(1)
    x = torch.randn(32, 2, 5, 5, generator=torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(3)
    copies = [_permute_densenet(model, torch.randperm(6, generator=generator),
                                torch.randperm(6, generator=generator)) for _ in range(2)]
    swapped = torch.tensor([0, 4, 2, 3, 1, 5])  # the tied units alone
    config = CONFIGS[cost]
    _same_function(align(other, model, config=config, inputs=x), other, x)
    _same_function(fuse([model, _permute_densenet(model, swapped, swapped)], config=config,
                        inputs=x), model, x)
    _same_function(fuse([copies[0], model, copies[1]], [3.0, 1.0, 2.0], config=config,
                        inputs=x), model, x)


class PrunedResidual(nn.Module):
    """A residual stream whose stem has two units pruned to zeros and whose norm treats
    them alike: only the branch's output rows (without a bias, LLaMA-style), whose
    inputs are aligned after the stream, tell them apart."""

    def __init__(self):
        super().__init__()
        self.stem, self.norm = nn.Linear(5, 6), nn.LayerNorm(6)
        self.fc1, self.fc2 = nn.Linear(6, 7), nn.Linear(7, 6, bias=False)
        self.head = nn.Linear(6, 3)
        self.input_shape = (5,)

    def forward(self, x):
        h = self.stem(x)
        return self.head(h + self.fc2(torch.relu(self.fc1(self.norm(h)))))


class PrunedLSTM(nn.Module):
    """An LSTM whose units 1 and 4 read nothing from the input (pruned rows and biases
    in every gate): only its recurrent weights tell them apart."""

    def __init__(self, hidden: int = 6):
        super().__init__()
        self.lstm, self.head = nn.LSTM(3, hidden, batch_first=True), nn.Linear(hidden, 3)
        self.input_shape = (4, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def _pruned_residual(seed: int) -> PrunedResidual:
    torch.manual_seed(seed)
    model = PrunedResidual()
    with torch.no_grad():
        model.stem.weight[[1, 4]] = 0.0
        model.stem.bias[[1, 4]] = 0.0
    return model.eval()


def _pruned_lstm(seed: int) -> PrunedLSTM:
    torch.manual_seed(seed)
    model = PrunedLSTM()
    with torch.no_grad():
        for gate in range(4):
            for unit in (1, 4):
                row = 6 * gate + unit
                model.lstm.weight_ih_l0[row] = 0.0
                model.lstm.bias_ih_l0[row] = 0.0
                model.lstm.bias_hh_l0[row] = 0.0
    return model.eval()


def _permute_residual(model: PrunedResidual, index: torch.Tensor) -> PrunedResidual:
    return _reindexed(model, [*((t, 0, index) for t in ("stem.weight", "stem.bias",
                                                        "norm.weight", "norm.bias",
                                                        "fc2.weight")),
                              ("fc1.weight", 1, index), ("head.weight", 1, index)])


def _permute_lstm(model: PrunedLSTM, index: torch.Tensor) -> PrunedLSTM:
    """The hidden units reordered in every gate block, and in the recurrent inputs."""
    gates = blocks(index, outer=4)
    return _reindexed(model, [*((f"lstm.{t}", 0, gates) for t in (
        "weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")),
        ("lstm.weight_hh_l0", 1, index), ("head.weight", 1, index)])


LATER = {
    "residual": (_pruned_residual, _permute_residual, (5,)),
    "lstm": (_pruned_lstm, _permute_lstm, (4, 3)),
}


@pytest.mark.parametrize("method", ["wasserstein", "gromov-wasserstein"])
@pytest.mark.parametrize("case", LATER)
def test_members_with_inputs_aligned_later_keep_tied_units_apart(case, method):
    """The member that tells the tied units apart reads units not aligned yet: its rows
    are compared by their sorted values."""
    build, permute, shape = LATER[case]
    model, other = build(0), build(1)
    x = torch.randn(32, *shape, generator=torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(3)
    copies = [permute(model, torch.randperm(6, generator=generator)) for _ in range(2)]
    config = FusionConfig.from_options(distill_steps=0, method=method)
    _same_function(align(other, model, config=config, inputs=x), other, x)
    _same_function(fuse([model, permute(model, torch.tensor([0, 4, 2, 3, 1, 5]))],
                        config=config, inputs=x), model, x)
    _same_function(fuse([copies[0], model, copies[1]], [3.0, 1.0, 2.0], config=config,
                        inputs=x), model, x)


def test_clients_of_other_widths_fuse_with_tied_units():
    """Sorted rows over unaligned inputs differ in length between clients of different
    widths: they are left out there, rather than crash the cost."""
    tied = _pruned_lstm(0)
    torch.manual_seed(1)
    wider = PrunedLSTM(hidden=8).eval()
    x = torch.randn(8, 4, 3)
    for fused in (fuse([tied, wider], config=CONFIGS["weights"]),
                  fuse([tied, wider], config=CONFIGS["weights"], target=wider),
                  align(wider, tied, config=CONFIGS["weights"])):
        with torch.no_grad():
            assert torch.isfinite(fused(x)).all()
