"""The nested FusionConfig: its parts, the flat option names and the deprecated forms."""

from __future__ import annotations

import pydantic
import pytest

from otfusion.fusion import (
    DistillationConfig,
    FusionConfig,
    TransportConfig,
    fuse_models,
    fuse_result,
)
from otfusion.fusion.config import option_name
from otfusion.zoo import build_model


def test_flat_options_fill_the_parts():
    config = FusionConfig.from_options(solver="sinkhorn", reg=0.05, sinkhorn_max_iter=7,
                                       max_iter=3, neuron_weights="uniform",
                                       distill_steps=0, robust_screen=True)
    assert config.transport == TransportConfig(solver="sinkhorn", reg=0.05, max_iter=7)
    assert config.barycenter.max_iter == 3 and config.averaging.neuron_weights == "uniform"
    assert config.distillation == DistillationConfig(steps=0)
    assert config.robust.screen
    assert config == FusionConfig(transport={"solver": "sinkhorn", "reg": 0.05, "max_iter": 7},
                                  barycenter={"max_iter": 3},
                                  averaging={"neuron_weights": "uniform"},
                                  distillation={"steps": 0}, robust={"screen": True})


def test_replace_validates_and_keeps_the_rest():
    config = FusionConfig.from_options(reg=0.05)
    changed = config.replace(method="average", max_iter=9)
    assert changed.method == "average" and changed.barycenter.max_iter == 9
    assert changed.transport.reg == 0.05 and config.barycenter.max_iter == 5
    with pytest.raises(pydantic.ValidationError):
        config.replace(reg=-1.0)


def test_flat_constructor_keywords_are_deprecated_but_work():
    with pytest.warns(DeprecationWarning, match="from_options"):
        config = FusionConfig(reg=0.05, distill_steps=0)
    assert config == FusionConfig.from_options(reg=0.05, distill_steps=0)


def test_fuse_models_is_a_deprecated_alias_of_fuse_result():
    models = [build_model("mlp", seed=k, widths=(8,)) for k in range(2)]
    config = FusionConfig.from_options(distill_steps=0)
    with pytest.warns(DeprecationWarning, match="fuse_result"):
        old = fuse_models(models, config=config)
    new = fuse_result(models, config=config)
    assert all((old.model.state_dict()[k] == v).all()
               for k, v in new.model.state_dict().items())


def test_errors_name_the_flat_option():
    with pytest.raises(pydantic.ValidationError) as error:
        FusionConfig.from_options(reg=0.0)
    assert option_name(error.value.errors()[0]["loc"]) == "reg"
    assert option_name(("transport", "max_iter")) == "sinkhorn_max_iter"
    assert option_name(("method",)) == "method"


def test_only_optimal_transport_distils():
    assert FusionConfig().distils
    assert not FusionConfig(method="average").distils
    assert not FusionConfig.from_options(distill_steps=0).distils
