"""Robust fusion against hostile but well-formed clients (``FusionConfig.robust``).

Honest clients are permuted copies of one model (the permutation helper of the tests,
independent of the engine); hostile ones send arbitrary well-formed models.
"""

from __future__ import annotations

import pytest
import torch
from permuted_families import make_family, relative_difference

from otfusion.fusion import FusionConfig, InputMoments, fuse, fuse_result
from otfusion.fusion.robust import (
    cap_class_weights,
    cap_weights,
    class_probes,
    client_probabilities,
    clip_norms,
    flat_predictions,
    misclassifying_clients,
    prediction_outliers,
    robust_mean,
    weighted_median,
    weighted_trimmed_mean,
)
from otfusion.zoo import build_model

EXACT_TOL = 1e-5
PLAIN = {"distill_steps": 0}
ROBUST = [pytest.param({"robust_aggregate": "median", **PLAIN}, id="median"),
          pytest.param({"robust_aggregate": "trimmed-mean", **PLAIN}, id="trimmed-mean"),
          pytest.param({"robust_screen": True, **PLAIN}, id="screen")]
FAMILIES = [("mlp", {"widths": (16, 12)}), ("cnn", {"channels": (4, 8), "hidden": 12})]


def hostile(name: str, kwargs: dict, seed: int, scale: float = 5.0) -> torch.nn.Module:
    """A model of the zoo architecture with arbitrary, large (but bounded) weights."""
    attacker = build_model(name, seed=seed, **kwargs)
    with torch.no_grad():
        for parameter in attacker.parameters():
            parameter.mul_(scale)
    return attacker.eval()


MLP = ("mlp", {"widths": (16, 12)})


# ---------------------------------------------------------------- estimators


def test_weighted_median_and_trimmed_mean_against_direct_computation():
    values = torch.tensor([[1.0, 10.0], [2.0, -5.0], [100.0, 0.0], [3.0, 1.0]])
    weights = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert torch.equal(weighted_median(values, weights), torch.tensor([2.0, 0.0]))
    # trim 0.25 of four equal weights drops the lowest and the highest per coordinate
    expected = torch.tensor([(2.0 + 3.0) / 2, (0.0 + 1.0) / 2])
    torch.testing.assert_close(weighted_trimmed_mean(values, weights, 0.25), expected)
    # no trimming is the weighted mean
    w = torch.tensor([0.1, 0.2, 0.3, 0.4])
    torch.testing.assert_close(weighted_trimmed_mean(values, w, 0.0),
                               (w[:, None] * values).sum(0))
    # a weight above one half decides the median
    assert torch.equal(weighted_median(values, torch.tensor([0.1, 0.1, 0.7, 0.1])),
                       torch.tensor([100.0, 0.0]))


def test_robust_mean_with_per_coordinate_weights():
    values = [torch.tensor([1.0, 1.0]), torch.tensor([5.0, 5.0]), torch.tensor([9.0, 9.0])]
    weights = [torch.tensor([0.8, 0.1]), torch.tensor([0.1, 0.1]), torch.tensor([0.1, 0.8])]
    assert torch.equal(robust_mean(values, weights, "median"), torch.tensor([1.0, 9.0]))
    assert torch.equal(robust_mean(values, [0.5, 0.25, 0.25], "mean"),
                       torch.tensor([4.0, 4.0]))
    with pytest.raises(ValueError, match="unknown aggregate"):
        robust_mean(values, [1, 1, 1], "mode")


@pytest.mark.parametrize(("weights", "capped"), [
    ([1, 1, 1, 4.0], []),             # exactly at the cap: kept
    ([1, 1, 1, 4.001], [3]),          # above it: capped at 4 x median
    ([10, 10, 20, 1000], [3]),        # median 15 (the mean of the middle two)
    ([10, 10, 500, 1000], []),        # median 255
    ([1, 1000], []),                  # two clients have no majority median
])
def test_weight_cap_bites_exactly_above_ratio_times_the_median(weights, capped):
    new, which = cap_weights(weights, 4.0)
    assert which == capped
    median = sorted(weights)[len(weights) // 2 - 1:len(weights) // 2 + 1]
    cap = 4.0 * sum(median) / len(median) if len(weights) % 2 == 0 else None
    for k, (old, w) in enumerate(zip(weights, new, strict=True)):
        assert w == (cap if k in capped else old)
    assert cap_weights(weights, None) == ([float(w) for w in weights], [])


def test_label_count_totals_are_capped_like_weights_and_keep_their_proportions():
    counts = [[5, 5, 0], [0, 6, 4], [3, 3, 4], [0, 0, 900]]  # the last claims 90x
    rows, capped = cap_class_weights(counts, 2.0)
    assert capped == [3]
    assert rows[:3] == [[float(v) for v in row] for row in counts[:3]]
    assert rows[3] == [0.0, 0.0, 20.0]  # twice the median total (10)
    assert cap_class_weights(torch.tensor(counts), 2.0) == (rows, capped)
    assert cap_class_weights(counts, None) == ([[float(v) for v in r] for r in counts], [])


def test_inflated_label_counts_are_capped_in_the_fused_head():
    """A client claiming 1000x the label counts of the others (its num-examples honest)
    has its counts capped: its share of the head's rows is at most what twice the median
    total gives, and it is reported as capped."""
    models = [build_model("mlp", seed=k, widths=(16, 12)) for k in range(5)]
    counts = [[10] * 10] * 4 + [[10_000] * 10]
    config = FusionConfig.from_options(robust_screen=False, **PLAIN)
    capped = fuse_result(models, [100.0] * 5, config, class_weights=counts)
    assert capped.capped == [4]
    same = fuse_result(models, [100.0] * 5, config, class_weights=[[10] * 10] * 4 + [[20] * 10])
    for name, tensor in capped.model.state_dict().items():
        torch.testing.assert_close(tensor, same.model.state_dict()[name])
    uncapped = fuse_result(models, [100.0] * 5, config.replace(max_weight_ratio=None),
                           class_weights=counts)
    assert uncapped.capped == []
    assert not torch.allclose(uncapped.model.head.weight, capped.model.head.weight)


# ---------------------------------------------------------------- fusion


@pytest.mark.parametrize("options", ROBUST)
@pytest.mark.parametrize(("name", "kwargs"), FAMILIES)
def test_permuted_copies_fuse_to_the_same_function_with_robust_options(name, kwargs, options):
    original, permuted, inputs = make_family(name, kwargs, copies=3)
    config = FusionConfig.from_options(**options)
    moments = InputMoments(torch.zeros(original.input_shape), torch.ones(original.input_shape))
    result = fuse_result([permuted[0], original, *permuted[1:]], [1.0, 3.0, 1.0, 2.0], config,
                         input_moments=moments)
    assert result.excluded == {}
    assert relative_difference(result.model, original, inputs) <= EXACT_TOL


@pytest.mark.parametrize("options", ROBUST)
@pytest.mark.parametrize(("name", "kwargs"), FAMILIES)
def test_one_arbitrary_model_does_not_change_the_honest_function(name, kwargs, options):
    """Four honest permuted copies and one hostile model (random weights x 5): the robust
    fusion computes the honest model's function; the plain mean does not."""
    original, permuted, inputs = make_family(name, kwargs, copies=3)
    attacker = hostile(name, kwargs, seed=99)
    models = [permuted[0], original, attacker, *permuted[1:]]
    weights = [1.0, 1.0, 1.0, 1.0, 1.0]
    moments = InputMoments(torch.zeros(original.input_shape), torch.ones(original.input_shape))
    robust = fuse_result(models, weights, FusionConfig.from_options(**options),
                         input_moments=moments)
    assert relative_difference(robust.model, original, inputs) <= EXACT_TOL
    plain = fuse(models, weights, FusionConfig.from_options(**PLAIN))
    assert relative_difference(plain, original, inputs) > 0.05
    if options.get("robust_screen"):
        assert list(robust.excluded) == [2]


def test_screening_without_moments_or_inputs_warns_and_screens_nothing():
    original, permuted, _ = make_family(*MLP, copies=2)
    config = FusionConfig.from_options(robust_screen=True, **PLAIN)
    with pytest.warns(UserWarning, match="no client was screened"):
        result = fuse_result([original, *permuted, hostile(*MLP, 5)], config=config)
    assert result.excluded == {}


def test_prediction_outliers_leave_agreeing_clients_alone():
    original, permuted, inputs = make_family(*MLP, copies=4)
    assert prediction_outliers(client_probabilities([original, *permuted], inputs),
                               threshold=3.0) == {}
    flagged = prediction_outliers(
        client_probabilities([original, *permuted, hostile(*MLP, 3)], inputs), 3.0)
    assert list(flagged) == [5] and flagged[5] > 0.05


def _on_a_line(positions: list[float]) -> torch.Tensor:
    """Two-class probabilities (clients x 2 inputs x 2) whose class-0 probability is
    ``0.1 + position`` on both inputs: two clients' total-variation distance is the
    distance between their positions."""
    first = 0.1 + torch.tensor(positions, dtype=torch.float64)
    return torch.stack([first, 1 - first], dim=-1)[:, None].expand(-1, 2, -1)


def test_prediction_outliers_need_more_than_a_quarter_above_the_median():
    """Six clients at 0, .3, .3, .3, .6 and x on a line, so that a score is the median
    distance to the other five: the first five score .3 exactly, a MAD of zero. At
    x = .66 the sixth scores .36, 1.2 times the median (as far as honest non-IID
    clients were measured to stray), and is no outlier; at x = .84 it scores .54, 1.8
    times the median, and is one. Without the floor (``min_ratio=1``) the zero MAD
    makes .36 an outlier too."""
    honest = [0.0, 0.3, 0.3, 0.3, 0.6]
    assert prediction_outliers(_on_a_line([*honest, 0.66]), 5.0) == {}
    flagged = prediction_outliers(_on_a_line([*honest, 0.84]), 5.0)
    assert list(flagged) == [5] and flagged[5] == pytest.approx(0.54)
    unfloored = prediction_outliers(_on_a_line([*honest, 0.66]), 5.0, min_ratio=1.0)
    assert list(unfloored) == [5] and unfloored[5] == pytest.approx(0.36)


def test_prediction_outliers_among_many_clients_compare_with_a_reference_sample():
    """With more clients than ``references``, each is compared with a random sample of
    them: still every hostile client and no honest one is flagged."""
    original, permuted, inputs = make_family(*MLP, copies=39)
    attackers = [hostile(*MLP, seed) for seed in (3, 4, 5)]
    models = [original, *permuted[:20], *attackers, *permuted[20:]]
    flagged = prediction_outliers(client_probabilities(models, inputs), 3.0, references=8)
    assert sorted(flagged) == [21, 22, 23]


def _direct_spread(probabilities: torch.Tensor) -> list[float]:
    """Each client's mean total-variation distance between its predictions on input i
    and input i + N/2, written out pair by pair."""
    half = probabilities.shape[1] // 2
    return [sum(0.5 * float((client[i] - client[i + half]).abs().sum()) for i in range(half))
            / half for client in probabilities]


def test_flat_predictions_against_a_direct_computation():
    """Five clients with varied predictions, one constant and one that mixes 5% of a
    varied prediction into a constant one: exactly the two below a tenth of the median
    spread are flat, with their spread relative to the median's."""
    generator = torch.Generator().manual_seed(0)
    varied = torch.softmax(3 * torch.randn(5, 40, 6, generator=generator), dim=-1)
    constant = torch.softmax(torch.randn(6, generator=generator), dim=-1).expand(40, 6)
    nearly = 0.05 * varied[0] + 0.95 * constant
    probabilities = torch.cat([varied, constant[None], nearly[None]]).double()
    spread = _direct_spread(probabilities)
    median = sorted(spread)[len(spread) // 2]
    flat = flat_predictions(probabilities, 0.1)
    assert sorted(flat) == [5, 6]
    assert flat[5] == 0.0
    assert flat[6] == pytest.approx(spread[6] / median, rel=1e-9)
    assert flat_predictions(probabilities, 0.04) == {5: 0.0}
    # a constant majority: nobody is told apart
    assert flat_predictions(constant.expand(4, 40, 6).double(), 0.1) == {}


def test_screening_excludes_a_dead_model_and_says_why():
    """Four honest permuted copies and a dead copy (every first-layer unit off, a
    constant output): the screening excludes it as flat, and the fusion computes the
    honest function; without the flat rule a later stage excludes it, which the exact
    agreement of permuted copies makes easy."""
    original, permuted, inputs = make_family(*MLP, copies=3)
    models = [original, dead_copy(original), *permuted]
    moments = InputMoments(torch.zeros(original.input_shape), torch.ones(original.input_shape))
    result = fuse_result(models, config=FusionConfig.from_options(**PLAIN),
                         input_moments=moments)
    assert list(result.excluded) == [1]
    assert "hardly depend on its input" in result.excluded[1]
    assert relative_difference(result.model, original, inputs) <= EXACT_TOL
    unchecked = fuse_result(models, config=FusionConfig.from_options(
        robust_min_spread=None, **PLAIN), input_moments=moments)
    assert list(unchecked.excluded) == [1]
    assert "hardly depend" not in unchecked.excluded[1]


def dead_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose first hidden layer's biases are so negative that its
    ReLUs never fire: the output is the same for every input."""
    import copy

    dead = copy.deepcopy(model)
    with torch.no_grad():
        dead.layers[0].bias.fill_(-1e3)
    return dead.eval()


def _class_subset_model(weight: torch.Tensor, seen: list[int]) -> torch.nn.Module:
    """A linear classifier with the shared ``weight`` whose logits are -30 (probability
    ~0) on the classes outside ``seen``: an honest client that never saw them."""
    model = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        model.weight.copy_(weight)
        model.bias.fill_(-30.0)
        model.bias[seen] = 0.0
    return model.eval()


def test_screening_over_shared_classes_spares_non_iid_clients_and_finds_a_flipper():
    """Honest clients that each saw four of six classes (any two share two or more) agree
    exactly on the classes they share; a client that claims classes 0-3 but predicts them
    shifted by one is flagged, and still when it claims fewer classes."""
    generator = torch.Generator().manual_seed(0)
    weight = 3 * torch.randn(6, 4, generator=generator)
    seen = [[(k + i) % 6 for i in range(4)] for k in range(6)] + [[0, 1, 2, 3]]
    honest = [_class_subset_model(weight, classes) for classes in seen[:6]]
    flipper = _class_subset_model(weight.roll(-1, dims=0), [0, 1, 2, 3])
    mask = torch.zeros(7, 6, dtype=torch.bool)
    for k, classes in enumerate(seen):
        mask[k, classes] = True
    inputs = torch.randn(256, 4, generator=generator)
    probabilities = client_probabilities([*honest, flipper], inputs)
    assert list(prediction_outliers(probabilities, 3.0, seen=mask)) == [6]
    assert prediction_outliers(probabilities[:6], 3.0, seen=mask[:6]) == {}
    for claim in ([0], []):  # claiming fewer classes buys no less scrutiny
        mask[6] = False
        mask[6, claim] = True
        assert list(prediction_outliers(probabilities, 3.0, seen=mask)) == [6], claim


def test_shared_class_distances_against_a_direct_computation():
    """Every pair's mean total-variation distance over the classes both saw (all classes
    for a pair sharing fewer than two), written out pair by pair and input by input."""
    from otfusion.fusion.robust import _shared_class_distances

    generator = torch.Generator().manual_seed(3)
    probabilities = torch.softmax(2 * torch.randn(5, 7, 4, generator=generator,
                                                  dtype=torch.float64), dim=-1)
    seen = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0],
                         [0, 1, 1, 1]], dtype=torch.bool)
    chosen = torch.tensor([4, 0, 2])
    got = _shared_class_distances(probabilities, seen, chosen)
    for k in range(5):
        for column, j in enumerate(chosen.tolist()):
            shared = [c for c in range(4) if seen[k, c] and seen[j, c]]
            classes = shared if len(shared) >= 2 else list(range(4))
            total = 0.0
            for n in range(7):
                p = probabilities[k, n, classes] / probabilities[k, n, classes].sum()
                q = probabilities[j, n, classes] / probabilities[j, n, classes].sum()
                total += 0.5 * float((p - q).abs().sum())
            assert float(got[k, column]) == pytest.approx(total / 7, abs=1e-6), (k, j)


def test_misclassifying_clients_against_a_direct_computation():
    """Errors per class averaged with each client's label distribution, written out; a
    client claiming one class is averaged over every probed class."""
    classes = torch.tensor([0, 0, 1, 1, 2, 2])
    right = [0, 0, 1, 1, 2, 2]
    predicted = torch.tensor([right,
                              [0, 1, 1, 1, 2, 2],   # half wrong on class 0
                              [1, 1, 2, 2, 0, 0],   # a flipper
                              right,
                              [0, 0, 0, 0, 0, 0],   # claims class 0 only
                              right, right])
    probabilities = torch.nn.functional.one_hot(predicted, 3).double()
    counts = torch.tensor([[5.0, 5, 0], [30, 10, 0], [1, 1, 1], [0, 2, 2], [9, 0, 0],
                           [1, 1, 1], [1, 1, 1]])
    expected = {1: (30 * 0.5 + 10 * 0) / 40, 2: 1.0, 4: 2 / 3}  # the others: 0
    flagged = misclassifying_clients(probabilities, classes, counts, max_error=0.01)
    assert flagged == {k: pytest.approx(v) for k, v in expected.items()}
    assert misclassifying_clients(probabilities, classes, counts, max_error=0.5) == {
        2: pytest.approx(1.0), 4: pytest.approx(2 / 3)}


def _flipped_head(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its output classes shifted by one: a label-flipping client."""
    import copy

    flipper = copy.deepcopy(model)
    with torch.no_grad():
        flipper.head.weight.copy_(model.head.weight.roll(1, dims=0))
        flipper.head.bias.copy_(model.head.bias.roll(1, dims=0))
    return flipper.eval()


def test_class_probes_follow_the_claiming_majority_and_leave_the_models_alone():
    """Four honest permuted copies (untrained) and a flipper: after the steps, the
    honest models classify most probes as their class (a random model cannot be pushed
    to every class) and the flipper nearly none; the models' parameters get no gradient
    and their modes are restored."""
    original, permuted, _ = make_family(*MLP, copies=3)
    flipper = _flipped_head(original)
    models = [original, *permuted, flipper]
    original.train()
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(80, 64, generator=generator)
    classes = torch.arange(10).repeat_interleave(8)
    probes = class_probes(models, start, classes, torch.ones(5, 10, dtype=torch.bool),
                          steps=50)
    predicted = client_probabilities(models, probes).argmax(-1)
    accuracy = (predicted == classes).double().mean(dim=1)
    assert bool((accuracy[:4] >= 0.7).all()) and float(accuracy[4]) <= 0.1
    assert all(p.grad is None for m in models for p in m.parameters())
    assert original.training and not permuted[0].training
    with pytest.raises(ValueError, match="claimed by no client"):
        class_probes(models, start, classes, torch.zeros(5, 10, dtype=torch.bool), steps=1)


def test_screening_excludes_a_label_flipper_by_its_class_probes():
    """The flipper is excluded by the class probes, before the disagreement rule, and
    the fusion computes the honest function; with no probe steps another rule must
    catch it."""
    original, permuted, inputs = make_family(*MLP, copies=3)
    models = [original, *permuted[:2], _flipped_head(original), permuted[2]]
    moments = InputMoments(torch.zeros(original.input_shape), torch.ones(original.input_shape))
    result = fuse_result(models, config=FusionConfig.from_options(**PLAIN),
                         input_moments=moments, class_weights=[[1.0] * 10] * 5)
    assert list(result.excluded) == [3]
    assert result.excluded[3].startswith("it misclassifies")
    assert relative_difference(result.model, original, inputs) <= EXACT_TOL
    with torch.no_grad():  # the probes need input gradients all the same
        quiet = fuse_result(models, config=FusionConfig.from_options(**PLAIN),
                            input_moments=moments, class_weights=[[1.0] * 10] * 5)
    assert quiet.excluded == result.excluded
    without = fuse_result(models, config=FusionConfig.from_options(robust_probe_steps=0,
                                                                   **PLAIN),
                          input_moments=moments)
    assert "misclassifies" not in without.excluded.get(3, "")


def test_class_probes_cover_the_classes_their_shaping_clients_claim(monkeypatch):
    """With more clients than shape the probes, a class claimed only by clients outside
    that sample gets no probes (instead of failing the check)."""
    import warnings

    from otfusion.fusion import screening

    monkeypatch.setattr(screening, "PROBE_REFERENCES", 3)
    original, permuted, _ = make_family(*MLP, copies=5)
    models = [original, *permuted]
    counts = [[1.0 if c in (k, k + 1) else 0.0 for c in range(10)] for k in range(6)]
    moments = InputMoments(torch.zeros(original.input_shape), torch.ones(original.input_shape))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = fuse_result(models, config=FusionConfig.from_options(**PLAIN),
                             input_moments=moments, class_weights=counts)
    assert result.excluded == {}


def test_claimed_weight_is_capped_in_the_fusion():
    """An attacker claiming 1000x the examples of the honest clients gets twice the median
    weight (the default cap), not a majority: with the median aggregate the honest
    function survives; uncapped, it wins."""
    original, permuted, inputs = make_family(*MLP, copies=3)
    models = [original, *permuted, hostile(*MLP, 7)]
    weights = [10.0, 10.0, 10.0, 10.0, 10_000.0]
    config = FusionConfig.from_options(robust_aggregate="median", **PLAIN)
    result = fuse_result(models, weights, config)
    assert result.capped == [4]
    assert relative_difference(result.model, original, inputs) <= EXACT_TOL
    uncapped = fuse_result(models, weights, config.replace(max_weight_ratio=None))
    assert uncapped.capped == []
    assert relative_difference(uncapped.model, original, inputs) > 0.05


def test_clip_norms_against_a_direct_computation():
    norms = [1.0, 2.0, 3.0, 10.0]  # median 2.5: the cap at 2x is 5
    states = [{"w": torch.full((2, 2), n / 2), "b": torch.full((2,), n),
               "steps": torch.tensor(7)} for n in norms]  # biases are never clipped
    before = [{k: t.clone() for k, t in state.items()} for state in states]
    clipped, ratios = clip_norms(states, 2.0)
    assert ratios == pytest.approx({3: 4.0})
    torch.testing.assert_close(clipped[3]["w"].norm(), torch.tensor(5.0))
    assert all(clipped[k]["w"] is states[k]["w"] for k in range(3))
    assert all(clipped[k]["b"] is states[k]["b"] and clipped[k]["steps"] is states[k]["steps"]
               for k in range(4))
    for state, copy in zip(states, before, strict=True):  # the clients' own tensors
        assert all(torch.equal(state[k], copy[k]) for k in state)
    assert clip_norms(states, None)[1] == {} and clip_norms(states[2:], 2.0)[1] == {}
    zeros = [{"w": torch.zeros(1, 3)}, {"w": torch.zeros(1, 3)}, {"w": torch.ones(1, 3)}]
    assert clip_norms(zeros, 2.0)[1] == {}  # a zero median clips nothing


def test_a_scaled_copy_pulls_the_fusion_no_harder_than_the_norm_cap():
    """Four honest permuted copies and one copy with every tensor x10: each of its weight
    matrices is clipped to twice the honest norm, so the plain fused matrices are
    (4 + 2) / 5 = 1.2 times the honest ones, where unclipped they are (4 + 10) / 5 = 2.8
    times; biases are never clipped (2.8 times either way)."""
    original, permuted, _ = make_family(*MLP, copies=3)
    scaled = build_model(MLP[0], seed=0, **MLP[1])
    scaled.load_state_dict({k: 10 * t for k, t in original.state_dict().items()})
    models = [original, *permuted, scaled]
    config = FusionConfig.from_options(neuron_weights="uniform", rescale="none", **PLAIN)
    for ratio, factor, clipped in [(2.0, 1.2, [4]), (None, 2.8, [])]:
        result = fuse_result(models, config=config.replace(max_norm_ratio=ratio))
        assert list(result.clipped) == clipped
        for name, tensor in original.state_dict().items():
            expected = (factor if tensor.dim() >= 2 else 2.8) * tensor
            torch.testing.assert_close(result.model.state_dict()[name], expected)
    assert fuse_result(models).clipped == pytest.approx({4: 10.0})  # the defaults clip


def test_strategy_logs_and_counts_clipped_replies(flwr_logs):
    from flower_replies import reply

    from otfusion.strategies import OTFusion

    original, permuted, _ = make_family(*MLP, copies=3)
    scaled = {k: -3 * t for k, t in original.state_dict().items()}  # sign-flipped x3
    states = [m.state_dict() for m in (original, *permuted)] + [scaled]
    replies = [reply(20 + k, state, 10) for k, state in enumerate(states)]
    _, metrics = OTFusion(lambda: build_model("mlp", seed=0, widths=(16, 12)),
                          FusionConfig.from_options(**PLAIN)).aggregate_train(1, replies)
    assert metrics["clipped-replies"] == 1
    assert "the weights of node 24 are clipped (norm up to 3 times the median" in \
        flwr_logs.text


# ---------------------------------------------------------------- strategy


def test_strategy_logs_and_counts_excluded_and_capped_replies(flwr_logs):
    from flower_replies import reply

    from otfusion.strategies import OTFusion

    original, permuted, inputs = make_family(*MLP, copies=3)
    models = [original, *permuted, hostile(*MLP, 11)]
    claims = [10, 10, 10, 10, 5000]
    moments = {"input-mean": [0.0] * 64, "input-var": [1.0] * 64}
    replies = [reply(20 + k, m.state_dict(), n, **moments)
               for k, (m, n) in enumerate(zip(models, claims, strict=True))]
    config = FusionConfig.from_options(robust_screen=True, **PLAIN)
    arrays, metrics = OTFusion(lambda: build_model("mlp", seed=0, widths=(16, 12)),
                               config).aggregate_train(1, replies)
    assert metrics["excluded-replies"] == 1 and metrics["capped-replies"] == 1
    assert 0 < metrics["screen-seconds"] < metrics["fusion-seconds"]
    assert "node 24 excluded: it misclassifies 90% of the class probes" in flwr_logs.text
    assert "the weight or label counts of node 24 (5000 examples claimed) are capped" in \
        flwr_logs.text
    fused = build_model("mlp", seed=0, widths=(16, 12))
    fused.load_state_dict(arrays.to_torch_state_dict())
    assert relative_difference(fused, original, inputs) <= EXACT_TOL


def test_default_screening_without_moments_is_silent():
    """Screening is on by default; a fusion without input moments or inputs (the CLI's
    ``otfusion fuse``) has nothing to screen on and says nothing."""
    import warnings

    original, permuted, _ = make_family(*MLP, copies=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = fuse_result([original, *permuted, hostile(*MLP, 5)],
                             config=FusionConfig.from_options(**PLAIN))
    assert result.excluded == {}
    unscreened = fuse_result([original, *permuted],
                             config=FusionConfig.from_options(robust_screen=False, **PLAIN))
    assert unscreened.screen_seconds == 0.0
