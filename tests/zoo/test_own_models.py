"""A user's own model by import path ("package.module:callable"), on every path that
builds models: the zoo's build_model, the run config (ServerApp, ClientApp,
flower-server, flower-client) and ``otfusion fuse``."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from otfusion.fusion import FusionConfig, fuse
from otfusion.task.config import RunConfig
from otfusion.tools.cli import main
from otfusion.zoo import build_model

PATH = "own_models:make_net"


def test_build_model_imports_a_users_model_with_kwargs_and_seed():
    a = build_model(PATH, seed=3, hidden=10)
    b = build_model(PATH, seed=3, hidden=10)
    c = build_model("own_models:TinyNet", seed=4, hidden=10)
    assert type(a).__name__ == "TinyNet" and a.body[0].out_features == 10
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                  b.state_dict().values(), strict=True))
    assert not torch.equal(a.out.weight, c.out.weight)
    before = torch.random.get_rng_state()
    build_model(PATH, seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_the_run_config_builds_it():
    model = RunConfig(model=PATH, model_kwargs='{"hidden": 6}').build_model(seed=1)
    assert model.body[0].out_features == 6


@pytest.mark.parametrize(("name", "expected"), [
    ("no_such_module_here:make", "cannot import model 'no_such_module_here:make'"),
    ("own_models:missing", "cannot import model 'own_models:missing'"),
    ("own_models:NOT_CALLABLE", "'own_models:NOT_CALLABLE' is not callable"),
    ("own_models:broken", "building model 'own_models:broken' failed: RuntimeError: no GPU"),
    ("own_models:not_a_module", "returned a str, not a torch.nn.Module"),
    ("nope", "or an import path 'package.module:callable'"),
])
def test_errors_name_the_path(name, expected):
    with pytest.raises(ValueError, match=expected):
        build_model(name)


def test_wrong_kwargs_name_the_model():
    with pytest.raises(TypeError, match="'own_models:make_net'"):
        build_model(PATH, width=3)


def test_otfusion_fuse_fuses_checkpoints_of_a_users_model(tmp_path, capsys):
    models = [build_model(PATH, seed=s, hidden=8) for s in range(2)]
    paths = []
    for k, model in enumerate(models):
        paths.append(str(tmp_path / f"client{k}.safetensors"))
        save_file({n: t.contiguous() for n, t in model.state_dict().items()}, paths[-1])
    out = tmp_path / "fused.safetensors"
    main(["fuse", *paths, "--model", PATH, "--model-kwargs", '{"hidden": 8}', "-o", str(out)])
    expected = fuse(models, config=FusionConfig.from_options(distill_steps=0)).state_dict()
    fused = load_file(str(out))
    assert all(torch.equal(fused[n], t) for n, t in expected.items())


def test_otfusion_fuse_names_a_bad_path(tmp_path, capsys):
    models = [build_model(PATH, seed=s) for s in range(2)]
    paths = []
    for k, model in enumerate(models):
        paths.append(str(tmp_path / f"client{k}.safetensors"))
        save_file(dict(model.state_dict()), paths[-1])
    with pytest.raises(SystemExit):
        main(["fuse", *paths, "--model", "own_models:missing", "-o", str(tmp_path / "o")])
    assert "cannot import model 'own_models:missing'" in capsys.readouterr().err
