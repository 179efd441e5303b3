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


def test_deployment_writes_the_import_path_into_the_run_config(tmp_path):
    """flower-server's deployment helpers pass the path on to the ServerApp and the
    ClientApps (the generated app names no model; the run config does)."""
    import tomllib

    from otfusion.deploy.deployment import DeploymentOptions, prepare
    from otfusion.deploy.security import Security

    config = RunConfig(model=PATH, model_kwargs='{"hidden": 8}', output_dir=str(tmp_path))
    state, _, argv, _ = prepare(config, DeploymentOptions(Security(insecure=True),
                                                          state_dir=tmp_path / "state"))
    written = tomllib.loads((state / "run-config.toml").read_text())
    assert written["model"] == PATH and written["model-kwargs"] == '{"hidden": 8}'
    assert RunConfig.from_run_config(written).build_model().body[0].out_features == 8
    assert "--run-config" in argv


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_simulation_fuses_a_users_model(tmp_path, monkeypatch):
    """flower-server --simulation with model='own_models:make_net': the SuperLink's
    ServerApp and ClientApp processes import it (from PYTHONPATH, as a user's package
    installed in the environment would be)."""
    import json
    from pathlib import Path

    from otfusion.server.flower_server import simulate

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    config = RunConfig(model=PATH, model_kwargs='{"hidden": 16}', local_epochs=5,
                       min_train_nodes=3, output_dir=str(tmp_path / "out"))
    assert simulate(config, num_clients=3, state_dir=tmp_path / "state") == 0
    (run,) = (tmp_path / "out").glob("run-*")
    report = json.loads((run / "report.json").read_text())
    assert report["train_metrics"]["1"]["accepted-replies"] == 3
    model = build_model(PATH, hidden=16)
    model.load_state_dict(load_file(run / "global_model.safetensors"))
    assert report["comparison"]["global model (otfusion)"] > 0.5
