"""Fusion of models trained on the embedded digits data from different initialisations."""

from __future__ import annotations

import pytest

from otfusion.fusion import FusionConfig, fuse
from otfusion.task.data import load_digits_dataset, partition
from otfusion.task.training import evaluate, recipe_for
from otfusion.tools.comparison import compare, train_clients
from otfusion.zoo import build_model


@pytest.fixture(scope="module")
def four_mlps():
    train, test = load_digits_dataset()
    parts = partition(train, 4, "iid")
    clients = train_clients("mlp", parts, recipe_for("mlp"))
    return clients, [len(p) for p in parts], test


def test_ot_fusion_keeps_client_accuracy_where_averaging_collapses(four_mlps):
    clients, sizes, test = four_mlps
    result = compare(clients, sizes, test, {
        "average": FusionConfig(method="average"), "ot": FusionConfig(),
    })
    mean_client = sum(result.clients) / len(result.clients)
    assert result.methods["ot"] >= mean_client - 0.02
    assert result.methods["ot"] >= result.methods["average"] + 0.20


def test_fused_mlp_of_different_widths_is_a_working_classifier(four_mlps):
    """Clients of widths 400-200-100 fused into a narrower target still classify."""
    clients, sizes, test = four_mlps
    target = build_model("mlp", widths=(300, 150, 75))
    fused = fuse(clients, sizes, target=target)
    assert fused.layers[0].weight.shape == (300, 64)
    assert evaluate(fused, test)[1] >= 0.85
