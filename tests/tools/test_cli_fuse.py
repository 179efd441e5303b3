"""The ``otfusion fuse`` and ``otfusion lmc`` commands on safetensors checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from otfusion.fusion import FusionConfig, fuse, fuse_result
from otfusion.tools.cli import main
from otfusion.zoo import build_model

KWARGS = {"mlp": {"widths": [16, 12]}, "cnn": {"channels": [4, 8], "hidden": 12}}


def write_checkpoints(folder, name: str, seeds=(0, 1, 2)):
    """Zoo models of different seeds and their checkpoint paths (as strings)."""
    models, paths = [], []
    for seed in seeds:
        model = build_model(name, seed=seed, **KWARGS[name]).eval()
        path = folder / f"{name}-{seed}.safetensors"
        save_file(model.state_dict(), str(path))
        models.append(model)
        paths.append(str(path))
    return models, paths


def model_options(name: str) -> list[str]:
    return ["--model", name, "--model-kwargs", json.dumps(KWARGS[name])]


@pytest.mark.parametrize(
    ("name", "options", "config"),
    [
        pytest.param("mlp", [], FusionConfig(), id="mlp-exact"),
        pytest.param("cnn", [], FusionConfig(), id="cnn-exact"),
        pytest.param("mlp", ["--solver", "sinkhorn", "--reg", "0.05", "--max-iter", "3"],
                     FusionConfig.from_options(solver="sinkhorn", reg=0.05, max_iter=3),
                     id="mlp-sinkhorn"),
        pytest.param("mlp", ["--method", "average"], FusionConfig(method="average"),
                     id="mlp-average"),
    ],
)
def test_fused_file_equals_fuse(tmp_path, name, options, config):
    models, paths = write_checkpoints(tmp_path, name)
    output = tmp_path / "fused.safetensors"
    main(["fuse", *paths, *model_options(name), "--weights", "1", "2", "3.5", *options,
          "-o", str(output)])
    expected = fuse(models, [1, 2, 3.5], config).state_dict()
    got = load_file(str(output))
    assert set(got) == set(expected)  # safetensors stores the keys sorted
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
    with safe_open(str(output), framework="pt") as file:
        assert file.metadata() == {"model": name, "model_kwargs": json.dumps(KWARGS[name])}


def test_distill_from_uses_the_moments_of_the_file(tmp_path, capsys):
    import numpy as np

    from otfusion.fusion import input_moments

    models, paths = write_checkpoints(tmp_path, "cnn")
    x = np.random.default_rng(0).random((40, 64), dtype=np.float32)
    data = tmp_path / "data.npz"
    np.savez(data, x=x, y=np.zeros(40, dtype=np.int64))
    output = tmp_path / "fused.safetensors"
    main(["fuse", *paths, *model_options("cnn"), "--distill-from", str(data),
          "-o", str(output)])
    moments = input_moments(torch.from_numpy(x).reshape(40, 1, 8, 8), components=16)
    assert moments.components.shape == (4, 1, 8, 8)  # one per 10 examples
    expected = fuse_result(models, None, FusionConfig(), input_moments=moments)
    undistilled = fuse(models, None, FusionConfig()).state_dict()
    got = load_file(str(output))
    for key, tensor in expected.model.state_dict().items():
        assert torch.equal(got[key], tensor), key
    assert not torch.equal(got["head.weight"], undistilled["head.weight"])
    said = " ".join(capsys.readouterr().out.split())
    assert f"a KL divergence of {expected.distill_loss:.4f} from their ensemble" in said


def test_fused_file_loads_into_the_model(tmp_path, capsys):
    _, paths = write_checkpoints(tmp_path, "mlp", seeds=(0, 1))
    output = tmp_path / "fused.safetensors"
    main(["fuse", *paths, *model_options("mlp"), "-o", str(output)])
    assert "fused 2 'mlp' checkpoints" in capsys.readouterr().out
    build_model("mlp", **KWARGS["mlp"]).load_state_dict(load_file(str(output)))


def fails(argv, capsys) -> str:
    """Run ``main(argv)``, expecting a clean non-zero exit; return its stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_missing_file(tmp_path, capsys):
    _, paths = write_checkpoints(tmp_path, "mlp", seeds=(0,))
    missing = str(tmp_path / "nope.safetensors")
    err = fails(["fuse", paths[0], missing, *model_options("mlp"), "-o",
                 str(tmp_path / "out.safetensors")], capsys)
    assert "no such checkpoint file" in err and "nope.safetensors" in err
    assert not (tmp_path / "out.safetensors").exists()


def test_not_a_safetensors_file(tmp_path, capsys):
    _, paths = write_checkpoints(tmp_path, "mlp", seeds=(0,))
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a checkpoint")
    err = fails(["fuse", paths[0], str(junk), *model_options("mlp"), "-o",
                 str(tmp_path / "out.safetensors")], capsys)
    assert "cannot read" in err and "junk.safetensors" in err


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        pytest.param(lambda: build_model("mlp", widths=(16,)).state_dict(),
                     ["missing keys layers.2.bias, layers.2.weight", "head.weight (10, 16)"],
                     id="shallower"),
        pytest.param(lambda: {**build_model("mlp", widths=(16, 12)).state_dict(),
                              "extra.weight": torch.zeros(3)},
                     ["unexpected keys extra.weight"], id="extra-key"),
        pytest.param(lambda: build_model("cnn", channels=(4, 8), hidden=12).state_dict(),
                     ["missing keys", "unexpected keys classifier.1.bias", "(1 more)"],
                     id="other-model"),
    ],
)
def test_keys_that_do_not_fit_the_model(tmp_path, capsys, state, expected):
    _, paths = write_checkpoints(tmp_path, "mlp", seeds=(0,))
    odd = tmp_path / "odd.safetensors"
    save_file(state(), str(odd))
    err = fails(["fuse", paths[0], str(odd), *model_options("mlp"), "-o",
                 str(tmp_path / "out.safetensors")], capsys)
    assert "odd.safetensors does not fit the model" in err
    for fragment in expected:
        assert fragment in err


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        pytest.param(["--weights", "1"], "got 1 --weights for 2 checkpoints", id="weights-count"),
        pytest.param(["--weights", "1", "-1"], "non-negative", id="negative-weight"),
        pytest.param(["--reg", "0"], "--reg: Input should be greater than 0", id="bad-reg"),
        pytest.param(["--model-kwargs", "{widths"], "--model-kwargs is not valid JSON",
                     id="bad-json"),
        pytest.param(["--model-kwargs", "[16]"], "must be a JSON object", id="json-list"),
        pytest.param(["--model-kwargs", '{"width": [16, 12]}'], "unexpected keyword argument "
                     "'width'", id="unknown-kwarg"),
        pytest.param(["-o", "no/such/folder/out.safetensors"], "cannot write", id="bad-output"),
    ],
)
def test_invalid_options(tmp_path, capsys, monkeypatch, options, expected):
    monkeypatch.chdir(tmp_path)
    _, paths = write_checkpoints(tmp_path, "mlp", seeds=(0, 1))
    err = fails(["fuse", *paths, *model_options("mlp"), "-o", "out.safetensors", *options],
                capsys)
    assert expected in err


def test_unknown_model_is_a_usage_error(tmp_path, capsys):
    _, paths = write_checkpoints(tmp_path, "mlp", seeds=(0, 1))
    err = fails(["fuse", *paths, "--model", "nope", "-o", "out.safetensors"], capsys)
    assert "invalid choice: 'nope'" in err


def test_lmc_prints_the_barriers(tmp_path, capsys):
    _, paths = write_checkpoints(tmp_path, "mlp", seeds=(0, 1))
    main(["lmc", *paths, *model_options("mlp"), "--steps", "3"])
    out = capsys.readouterr().out
    for fragment in ("loss barrier", "accuracy barrier", "a -> b", "a -> align(b, a)",
                     "450 held-out digits"):
        assert fragment in out


def test_lmc_errors(tmp_path, capsys):
    _, paths = write_checkpoints(tmp_path, "mlp", seeds=(0, 1))
    err = fails(["lmc", *paths, *model_options("mlp"), "--steps", "1"], capsys)
    assert "steps must be at least 2" in err
    err = fails(["lmc", *paths, *model_options("mlp"), "--method", "average"], capsys)
    assert "align needs an optimal-transport method" in err
