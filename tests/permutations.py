"""Function-preserving permutations of the hidden units of zoo models.

Written independently of the fusion engine (nothing from ``otfusion.strategies`` is
imported): every model family is handled by an explicit rule that says which tensor
axes a hidden unit owns, so the engine's alignment graph is checked against a second,
hand-written description of the same symmetries.

Input features and output classes are never permuted.
"""

from __future__ import annotations

import copy

import attention_models
import torch
from reindex import blocks as _blocks
from reindex import random_perm as _perm
from reindex import take as _take
from torch import nn

from otfusion.zoo import (
    CNN,
    MLP,
    VGG,
    GRUClassifier,
    LlamaClassifier,
    LSTMClassifier,
    MobileNetV2,
    ResNet,
    RNNClassifier,
    TransformerClassifier,
    ViT,
    build_model,
)

_GATES = {nn.RNN: 1, nn.GRU: 3, nn.LSTM: 4}





def _permute_outputs(layer: nn.Module, perm: torch.Tensor) -> None:
    """Rows of a Linear/Conv weight (and its bias)."""
    _take(layer.weight, 0, perm)
    if getattr(layer, "bias", None) is not None:
        _take(layer.bias, 0, perm)


def _permute_inputs(layer: nn.Module, perm: torch.Tensor, inner: int = 1) -> None:
    """Input columns of a Linear/Conv weight; ``inner`` entries per unit (flattened C*H*W)."""
    _take(layer.weight, 1, _blocks(perm, inner=inner))


def _permute_batchnorm(bn: nn.Module, perm: torch.Tensor) -> None:
    """Affine parameters and running statistics (whichever exist: a GroupNorm has only
    the affine parameters)."""
    for name in ("weight", "bias", "running_mean", "running_var"):
        tensor = getattr(bn, name, None)
        if tensor is not None:
            _take(tensor, 0, perm)


def _chain(layers: list[nn.Module], head: nn.Module, generator: torch.Generator) -> None:
    """A plain feed-forward chain of Linear/Conv (each optionally followed by a BatchNorm)
    ending in the Linear ``head``; a flatten before a Linear gives channel-major blocks."""
    producers = [m for m in layers if isinstance(m, nn.Linear | nn.Conv2d)]
    consumers = [*producers[1:], head]
    for producer, consumer in zip(producers, consumers, strict=True):
        width = producer.weight.shape[0]
        perm = _perm(width, generator)
        _permute_outputs(producer, perm)
        index = layers.index(producer)
        following = layers[index + 1] if index + 1 < len(layers) else None
        if isinstance(following, nn.BatchNorm1d | nn.BatchNorm2d):
            _permute_batchnorm(following, perm)
        inner = consumer.weight.shape[1] // width
        assert inner * width == consumer.weight.shape[1]
        _permute_inputs(consumer, perm, inner=inner)


def _mlp(model: MLP, generator: torch.Generator) -> None:
    _chain(list(model.layers), model.head, generator)


def _cnn(model: CNN, generator: torch.Generator) -> None:
    _chain([*model.features, *model.classifier], model.head, generator)


def _vgg(model: VGG, generator: torch.Generator) -> None:
    _chain(list(model.features), model.head, generator)


def _resnet(model: ResNet, generator: torch.Generator) -> None:
    """Stream and block channels; with GroupNorm, only group-preserving permutations
    (every channel set is normalised by GroupNorms with the same num_groups)."""

    def perm(norm: nn.Module) -> torch.Tensor:
        if isinstance(norm, nn.GroupNorm):
            return _group_perm(norm, generator)
        return _perm(norm.num_features, generator)

    # Stem: its output channels are the residual stream of the first stage.
    stream = perm(model.bn1)
    _permute_outputs(model.conv1, stream)
    _permute_batchnorm(model.bn1, stream)
    for index in range(model.num_stages):
        for block in getattr(model, f"layer{index + 1}"):
            incoming = stream
            if isinstance(block.shortcut, nn.Sequential):
                conv, bn = block.shortcut
                stream = perm(bn)  # a new stream starts here
                _permute_inputs(conv, incoming)
                _permute_outputs(conv, stream)
                _permute_batchnorm(bn, stream)
            else:
                assert isinstance(block.shortcut, nn.Identity)
            inner = perm(block.bn1)  # the block's own channels
            _permute_inputs(block.conv1, incoming)
            _permute_outputs(block.conv1, inner)
            _permute_batchnorm(block.bn1, inner)
            _permute_inputs(block.conv2, inner)
            _permute_outputs(block.conv2, stream)  # added into the stream
            _permute_batchnorm(block.bn2, stream)
    _permute_inputs(model.head, stream)


def _mobilenet(model: MobileNetV2, generator: torch.Generator) -> None:
    # Stem: its output channels are the residual stream of the first block.
    stream = _perm(model.conv1.out_channels, generator)
    _permute_outputs(model.conv1, stream)
    _permute_batchnorm(model.bn1, stream)
    for block in model.blocks:
        incoming = stream
        if not block.use_residual:
            stream = _perm(block.project.out_channels, generator)  # a new stream starts here
        expanded = _perm(block.expand.out_channels, generator)  # the block's own channels
        _permute_inputs(block.expand, incoming)
        _permute_outputs(block.expand, expanded)
        _permute_batchnorm(block.bn1, expanded)
        # depthwise: one filter per channel, weight (C, 1, k, k); no input axis to permute
        _permute_outputs(block.depthwise, expanded)
        _permute_batchnorm(block.bn2, expanded)
        _permute_inputs(block.project, expanded)
        _permute_outputs(block.project, stream)  # added into the stream when residual
        _permute_batchnorm(block.bn3, stream)
    _permute_inputs(model.head, stream)


def _group_perm(norm: nn.GroupNorm, generator: torch.Generator) -> torch.Tensor:
    """A permutation of ``norm``'s channels that maps every group onto a group: the
    groups are reordered by one permutation and the channels inside each group by
    their own permutation."""
    size = norm.num_channels // norm.num_groups
    groups = _perm(norm.num_groups, generator)
    return torch.cat([int(g) * size + _perm(size, generator) for g in groups])


def _recurrent(model: nn.Module, generator: torch.Generator) -> None:
    rnn = model.rnn
    gates = _GATES[type(rnn)]
    hidden = rnn.hidden_size
    previous = None
    for layer in range(rnn.num_layers):
        perm = _perm(hidden, generator)
        rows = _blocks(perm, outer=gates)  # every gate block reordered the same way
        weight_ih = getattr(rnn, f"weight_ih_l{layer}")
        weight_hh = getattr(rnn, f"weight_hh_l{layer}")
        _take(weight_ih, 0, rows)
        if previous is not None:  # input of layer > 0 is the previous layer's hidden state
            _take(weight_ih, 1, previous)
        _take(weight_hh, 0, rows)
        _take(weight_hh, 1, perm)
        if rnn.bias:
            _take(getattr(rnn, f"bias_ih_l{layer}"), 0, rows)
            _take(getattr(rnn, f"bias_hh_l{layer}"), 0, rows)
        previous = perm
    _permute_inputs(model.head, previous)


def _transformer(model: ViT | TransformerClassifier, generator: torch.Generator) -> None:
    """The residual stream through the embedding (patch convolution or Linear), the class
    token and positions, every encoder layer, the final norm and the head's inputs;
    heads, within-head units and MLP units as in ``tests/attention_models.py``."""
    encoder = model.encoder.layers[0].self_attn
    plan = attention_models.Plan(generator, dim=encoder.embed_dim, heads=encoder.num_heads)
    embed = model.patch_embed if isinstance(model, ViT) else model.embed
    _permute_outputs(embed, plan.stream)
    for token in ("cls_token", "pos_embed"):
        if hasattr(model, token):
            _take(getattr(model, token), 2, plan.stream)
    attention_models.permute_encoder(model.encoder, plan)
    plan.norm(model.norm)
    _permute_inputs(model.head, plan.stream)


def _llama(model: LlamaClassifier, generator: torch.Generator) -> None:
    """The residual stream through the embedding, every block's norms, attention and
    SwiGLU, the final norm and the head's inputs; the key/value heads whole, each with
    its query heads, units within heads as in ``tests/attention_models.py`` (queries'
    and keys' in place: rotary embeddings)."""
    attn = model.blocks[0].attn
    plan = attention_models.Plan(generator, dim=attn.q.in_features, heads=attn.n_head)
    _permute_outputs(model.embed, plan.stream)
    for block in model.blocks:
        plan.norm(block.attn_norm)
        plan.grouped_attention(block.attn, rotary=True)
        plan.norm(block.mlp_norm)
        plan.swiglu(block.mlp)
    plan.norm(model.norm)
    _permute_inputs(model.head, plan.stream)


_RULES = (
    (MLP, _mlp),
    (CNN, _cnn),
    (VGG, _vgg),
    (ResNet, _resnet),
    (MobileNetV2, _mobilenet),
    ((RNNClassifier, LSTMClassifier, GRUClassifier), _recurrent),
    ((ViT, TransformerClassifier), _transformer),
    (LlamaClassifier, _llama),
)


def permute_hidden_units(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """A deep copy of the zoo ``model`` with every hidden unit randomly permuted.

    The copy computes exactly the same function (up to floating point summation order).
    """
    permuted = copy.deepcopy(model)
    with torch.no_grad():
        for family, rule in _RULES:
            if isinstance(permuted, family):
                rule(permuted, generator)
                break
        else:
            raise TypeError(f"no permutation rule for {type(model).__name__}")
    return permuted


SMALL_MODELS = [("mlp", {"widths": (16, 12)}), ("cnn", {"channels": (4, 8), "hidden": 12}),
                ("lstm", {"hidden_size": 8})]
"""(name, kwargs) of small zoo models of three layer families, for quick invariance tests."""


def model_and_permuted_copies(name: str, kwargs: dict, count: int,
                              generator: torch.Generator) -> list[nn.Module]:
    """The zoo model ``name`` (seed 0, eval mode) followed by ``count`` copies of it whose
    hidden units are randomly permuted: all compute the same function."""
    model = build_model(name, seed=0, **kwargs).eval()
    return [model] + [permute_hidden_units(model, generator) for _ in range(count)]


def randomize_batchnorm_stats(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Random running statistics and affine parameters for every BatchNorm, random
    affine parameters for every GroupNorm, LayerNorm and RMSNorm, and random values for any other
    all-zero parameter (attention biases, a class token), in place.

    Fresh BatchNorms have mean 0 / var 1 / weight 1 / bias 0 (GroupNorms, LayerNorms and
    RMSNorms weight 1 / bias 0), which a wrong permutation leaves unchanged; random values make
    every entry matter. Returns ``model``.
    """
    with torch.no_grad():
        for module in model.modules():
            norm = isinstance(module, nn.GroupNorm | nn.LayerNorm | nn.RMSNorm)
            if norm and module.weight is not None:
                shape, dtype = module.weight.shape, module.weight.dtype
                module.weight.copy_((1.0 + 0.3 * torch.randn(shape, generator=generator)).to(
                    dtype))
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_((0.3 * torch.randn(shape, generator=generator)).to(dtype))
                continue
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                dtype = module.running_mean.dtype
                module.running_mean.copy_(0.5 * torch.randn(n, generator=generator).to(dtype))
                module.running_var.copy_(
                    (0.5 + 1.5 * torch.rand(n, generator=generator)).to(dtype)
                )
                if module.affine:
                    module.weight.copy_(
                        (1.0 + 0.3 * torch.randn(n, generator=generator)).to(dtype)
                    )
                    module.bias.copy_((0.3 * torch.randn(n, generator=generator)).to(dtype))
                continue
            for parameter in module.parameters(recurse=False):
                if parameter.is_floating_point() and not parameter.any():
                    parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model
