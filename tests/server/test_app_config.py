"""The Flower App's run-config defaults and the flower-server flags agree with RunConfig."""

from __future__ import annotations

from pathlib import Path

import pytest

from otfusion.fusion import FusionConfig
from otfusion.server.flower_server import build_parser, run_config_from_args
from otfusion.task.config import RunConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_pyproject_run_config_equals_the_defaults():
    app = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]
    assert app["config"] == RunConfig().as_run_config()
    assert app["components"] == {"serverapp": "otfusion.server.app:app",
                                 "clientapp": "otfusion.client.app:app"}


def test_run_config_reads_hyphenated_keys_and_rejects_unknown_ones():
    config = RunConfig.from_run_config({"local-epochs": 3, "model": "cnn"})
    assert (config.local_epochs, config.model, config.lr) == (3, "cnn", 0.1)
    with pytest.raises(ValueError, match="no-such-key"):
        RunConfig.from_run_config({"no-such-key": 1})
    with pytest.raises(ValueError, match="partitioner"):
        RunConfig.from_run_config({"partitioner": "random"})


def test_flower_server_flags_map_onto_run_config_keys():
    args = build_parser().parse_args(
        ["--strategy", "fedavg", "--simulation", "--num-clients", "20", "--local-epochs", "2",
         "--fusion-solver", "sinkhorn", "--partitioner", "dirichlet", "--alpha", "0.1"])
    config = run_config_from_args(args)
    assert (config.strategy, config.local_epochs, config.fusion_solver) == ("fedavg", 2, "sinkhorn")
    assert (config.partitioner, config.alpha, args.num_clients) == ("dirichlet", 0.1, 20)
    assert run_config_from_args(build_parser().parse_args([])) == RunConfig()


def test_model_kwargs_build_the_run_model_and_bad_json_is_refused():
    config = RunConfig.from_run_config({"model-kwargs": '{"widths": [8, 4], "in_features": 784}'})
    model = config.build_model()
    assert model.input_shape == (784,)
    assert model.layers[0].out_features == 8 and model.layers[2].out_features == 4
    args = build_parser().parse_args(["--resume", "--round-timeout", "30",
                                      "--model-kwargs", '{"widths": [8]}'])
    config = run_config_from_args(args)
    assert config.resume and config.round_timeout == 30 and config.build_model(seed=1)
    with pytest.raises(ValueError, match="not valid JSON"):
        RunConfig(model_kwargs="{widths: 8}")
    with pytest.raises(ValueError, match="JSON object"):
        RunConfig(model_kwargs="[8]")


def test_the_distillation_keys_reach_the_fusion_config():
    args = build_parser().parse_args(
        ["--fusion-distill-temperature", "3", "--fusion-distill-schedule", "cosine",
         "--fusion-distill-patience", "4", "--fusion-distill-teacher", "mean",
         "--fusion-distill-mixture", "0.25"])
    distillation = run_config_from_args(args).fusion().distillation
    assert (distillation.temperature, distillation.schedule, distillation.patience,
            distillation.teacher, distillation.mixture) == (3.0, "cosine", 4, "mean", 0.25)
    assert RunConfig().fusion().distillation.patience is None  # 0: every step
    assert RunConfig().fusion().distillation == FusionConfig().distillation


def test_the_robust_keys_reach_the_fusion_config():
    args = build_parser().parse_args(
        ["--fusion-max-norm-ratio", "0", "--fusion-robust-screen-threshold", "4",
         "--fusion-robust-min-spread", "0", "--fusion-robust-probe-steps", "5",
         "--fusion-robust-probe-error", "0.5", "--fusion-robust-aggregate", "trimmed-mean",
         "--fusion-robust-trim", "0.1", "--no-fusion-robust-screen"])
    robust = run_config_from_args(args).fusion().robust
    assert (robust.max_norm_ratio, robust.screen_threshold, robust.min_spread,
            robust.probe_steps, robust.probe_error, robust.aggregate, robust.trim,
            robust.screen) == (None, 4.0, None, 5, 0.5, "trimmed-mean", 0.1, False)
    assert RunConfig().fusion().robust == FusionConfig().robust  # the same defaults
