"""The engine against independent references on tiny float64 MLPs.

(a) the first layer's barycenter against POT's ``ot.lp.free_support_barycenter``;
(b) the whole engine against ``reference.reference_fuse_mlp``, a direct implementation
    that materialises the 4-D cost tensor (equal and different widths, exact and
    Sinkhorn transport, uniform and non-uniform client weights);
(c) ``method="average"`` against the hand-computed weighted average.

Tolerance 1e-6 (absolute, on weights of size ~0.5): both sides compute the same fixed
point in float64, so agreement is ~1e-15 unless a convention differs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import (
    linear_layers,
    pot_first_layer_barycenter,
    reference_fuse_mlp,
    weighted_average_state,
)

from otfusion.fusion import FusionConfig, fuse, fuse_result
from otfusion.zoo import build_model

TOL = 1e-6
PAPER = {"neuron_weights": "uniform", "rescale": "none",
         "max_weight_ratio": None}  # the paper weights clients as given
"""The paper's averaging, which the direct reference and POT implement (the defaults'
neuron weighting and rescaling are checked in test_fusion_class_weights.py)."""
IN_FEATURES, NUM_CLASSES = 6, 3


def make_mlps(widths: list[tuple[int, ...]], seed: int = 0) -> list[torch.nn.Module]:
    """One float64 MLP per entry of ``widths``, each from its own random init."""
    return [
        build_model("mlp", seed=seed + 10 * k, in_features=IN_FEATURES,
                    num_classes=NUM_CLASSES, widths=w).double()
        for k, w in enumerate(widths)
    ]


def make_target(widths: tuple[int, ...] | None) -> torch.nn.Module | None:
    if widths is None:
        return None
    return build_model("mlp", seed=999, in_features=IN_FEATURES, num_classes=NUM_CLASSES,
                       widths=widths).double()


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().double().numpy()


# ------------------------------------------------------------------ (a) POT first layer

POT_CASES = [
    pytest.param([(5, 4)] * 3, None, None, id="equal-widths-uniform"),
    pytest.param([(5, 4)] * 3, [1.0, 2.0, 1.5], None, id="equal-widths-weighted"),
    pytest.param([(4, 4), (6, 4), (5, 4)], [1.0, 1.0, 2.0], None, id="widths-4-6-5"),
    pytest.param([(4, 4), (6, 4), (5, 4)], [1.0, 3.0, 1.0], (5, 4), id="widths-4-6-5-target-5"),
]


@pytest.mark.parametrize(("widths", "weights", "target_widths"), POT_CASES)
def test_first_layer_equals_pot_free_support_barycenter(widths, weights, target_widths):
    models = make_mlps(widths)
    target = make_target(target_widths)
    result = fuse_result(models, weights=weights, target=target,
                         config=FusionConfig.from_options(max_iter=100, tol=1e-12, **PAPER))
    first = linear_layers(result.model)[0][1]
    fused_rows = np.concatenate([as_numpy(first.weight), as_numpy(first.bias)[:, None]], 1)
    assert result.group_iterations["layers.0"] < 100  # converged, not cut off

    expected = pot_first_layer_barycenter(models, weights, fused_rows.shape[0], max_iter=100)
    np.testing.assert_allclose(fused_rows, expected, rtol=0, atol=TOL)


# ---------------------------------------------------------- (b) direct whole-engine reference

ENGINE_CASES = [
    pytest.param([(5, 4)] * 3, None, None, "exact", id="equal-widths-uniform"),
    pytest.param([(5, 4)] * 2, None, None, "exact", id="two-clients-uniform"),
    pytest.param([(5, 4, 3)] * 2, [1.0, 3.0], None, "exact", id="two-clients-weighted"),
    pytest.param([(5, 4)] * 3, [1.0, 2.0, 1.5], None, "exact", id="equal-widths-weighted"),
    pytest.param([(5, 4, 3)] * 3, [2.0, 1.0, 1.0], None, "exact", id="three-hidden-layers"),
    pytest.param([(4, 4), (6, 6), (4, 6)], [1.0, 2.0, 1.0], (5, 5), "exact",
                 id="widths-4-6-into-5"),
    pytest.param([(4, 3), (6, 5), (5, 4)], [1.0, 1.0, 3.0], None, "exact",
                 id="widths-4-6-5-default-target"),
    pytest.param([(5, 4)] * 3, [1.0, 2.0, 1.5], None, "sinkhorn", id="sinkhorn-equal-widths"),
    pytest.param([(4, 4), (6, 6), (4, 6)], [1.0, 2.0, 1.0], (5, 5), "sinkhorn",
                 id="sinkhorn-widths-4-6-into-5"),
]


@pytest.mark.parametrize(("widths", "weights", "target_widths", "solver"), ENGINE_CASES)
def test_engine_equals_direct_reference(widths, weights, target_widths, solver):
    models = make_mlps(widths, seed=1)
    target = make_target(target_widths)
    if solver == "exact":
        config = FusionConfig.from_options(max_iter=100, tol=1e-12, **PAPER)
    else:  # a fixed number of barycenter iterations on both sides
        config = FusionConfig.from_options(solver="sinkhorn", reg=0.2, max_iter=4, tol=0.0,
                                           sinkhorn_max_iter=2000, sinkhorn_tol=1e-12,
                                           **PAPER)
    fused = fuse(models, weights=weights, target=target, config=config)

    hidden = target_widths or widths[int(np.argmax(weights or [1.0] * len(widths)))]
    expected = reference_fuse_mlp(models, weights, hidden, max_iter=config.barycenter.max_iter,
                                  tol=config.barycenter.tol, solver=solver,
                                  reg=config.transport.reg)
    state = fused.state_dict()
    assert set(expected) == set(state)
    for key, value in expected.items():
        assert state[key].shape == value.shape, key
        np.testing.assert_allclose(as_numpy(state[key]), value, rtol=0, atol=TOL, err_msg=key)


@pytest.mark.parametrize("support_clients", [1, 2, 3])
def test_support_from_the_heaviest_clients_equals_direct_reference(support_clients):
    models = make_mlps([(5, 4)] * 5, seed=2)
    weights = [1.0, 3.0, 2.0, 3.0, 0.5]  # ties: the first of equal weights is kept
    config = FusionConfig.from_options(max_iter=100, tol=1e-12,
                                       support_clients=support_clients, **PAPER)
    fused = fuse(models, weights=weights, config=config)
    expected = reference_fuse_mlp(models, weights, (5, 4), max_iter=config.barycenter.max_iter,
                                  tol=config.barycenter.tol, support_clients=support_clients)
    everyone = reference_fuse_mlp(models, weights, (5, 4), max_iter=config.barycenter.max_iter,
                                  tol=config.barycenter.tol)
    state = fused.state_dict()
    assert any(not np.allclose(expected[k], everyone[k]) for k in expected)  # it matters
    for key, value in expected.items():
        np.testing.assert_allclose(as_numpy(state[key]), value, rtol=0, atol=TOL, err_msg=key)


def test_reference_is_sensitive_to_the_input_coupling_convention():
    """Guard for the oracle itself: using the averaging map on the consumer's input axis
    (instead of the mass-preserving one) gives a visibly different fusion for
    heterogeneous widths, so the comparison above does pin the convention down."""
    import reference

    models = make_mlps([(4, 4), (6, 6), (4, 6)], seed=1)
    args = dict(max_iter=100, tol=1e-12)
    right = reference_fuse_mlp(models, [1.0, 2.0, 1.0], (5, 5), **args)
    original = reference.input_map
    try:
        reference.input_map = reference.neuron_map
        wrong = reference_fuse_mlp(models, [1.0, 2.0, 1.0], (5, 5), **args)
    finally:
        reference.input_map = original
    assert np.abs(right["head.weight"] - wrong["head.weight"]).max() > 1e-3


# ------------------------------------------------------------------------ (c) averaging


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 3.0]])
def test_average_method_is_the_weighted_average(weights):
    models = make_mlps([(5, 4)] * 3, seed=2)
    fused = fuse(models, weights=weights, config=FusionConfig(method="average"))
    expected = weighted_average_state(models, weights)
    state = fused.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-12, msg=key)


def test_average_method_with_batchnorm_and_a_target():
    """Float tensors (BN running stats included) are averaged with the client weights;
    the target only fixes the architecture; integer buffers come from the target."""
    models = [build_model("vgg11", seed=k, width_multiplier=0.125, batch_norm=True)
              for k in range(3)]
    generator = torch.Generator().manual_seed(0)
    for k, model in enumerate(models):
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.num_batches_tracked.fill_(10 + k)
    target = build_model("vgg11", seed=7, width_multiplier=0.125, batch_norm=True)
    weights = [3.0, 1.0, 4.0]
    fused = fuse(models, weights=weights, config=FusionConfig(method="average"), target=target)
    expected = weighted_average_state(models, weights)
    state = fused.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(state[key].double(), value, rtol=1e-6, atol=1e-7, msg=key)
    for key, tensor in target.state_dict().items():
        if not tensor.is_floating_point():
            assert torch.equal(state[key], tensor), key
