"""Deployment: flower-server and flower-client with real Flower processes on loopback,
and fast unit tests of their flags, the generated app folder and the security rule.

The slow tests start ``flower-superlink`` / ``flower-supernode`` processes on free
ports with a temporary ``FLWR_HOME``; every process tree they start is killed in a
``finally``, and the tests check with ``pgrep`` that nothing is left behind.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from deployment_helpers import assert_no_leftovers, free_ports, make_tls_files, write_client_data

from otfusion.client import flower_client
from otfusion.deploy.addresses import (
    DEFAULT_ADDRESS,
    is_local,
    join_address,
    local_host,
    split_address,
)
from otfusion.deploy.deployment import DeploymentOptions, deploy, prepare
from otfusion.deploy.errors import DeploymentError
from otfusion.deploy.flwr_cli import parse_status, stream_run
from otfusion.deploy.processes import ManagedProcess, _exists, descendants, executable
from otfusion.deploy.security import Security, choose_security
from otfusion.deploy.state_files import (
    CONNECTION,
    app_version,
    write_app_dir,
    write_flwr_config,
    write_run_config,
)
from otfusion.deploy.superlink import health_check, superlink_command
from otfusion.server import flower_server
from otfusion.task.config import RunConfig

# --- end to end (slow) --------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(500)
def test_tls_deployment_with_three_flower_clients_and_a_failing_second_run(tmp_path, processes):
    """One SuperLink, two runs, both through flower-server:

    - the default path: flower-server starts its own SuperLink with TLS; three
      flower-client SuperNodes with their own .npz data join; the fused model is saved;
    - meanwhile, on the same SuperLink through ``--superlink``, a run whose ServerApp
      fails: flower-server registers a SuperNode key, then exits non-zero (``flwr run
      --stream`` itself exits 0 for a failed run).
    """
    link, *node_ports = ports = free_ports(4)
    tls = make_tls_files(tmp_path)
    outputs, state = tmp_path / "outputs", tmp_path / "state"
    data = write_client_data(tmp_path, 3)
    start = time.monotonic()
    try:
        server = processes.start("flower-server", [
            executable("flower-server"), "--ssl-ca-certfile", str(tls["ca"]),
            "--ssl-certfile", str(tls["cert"]), "--ssl-keyfile", str(tls["key"]),
            "--address", f"127.0.0.1:{link}", "--state-dir", str(state),
            "--min-clients", "3", "--local-epochs", "1", "--output-dir", str(outputs)])
        security = Security(insecure=False, root_certificates=tls["ca"])
        deadline = time.monotonic() + 150
        while not health_check("127.0.0.1", link, security):
            assert server.alive(), processes.logs_text()
            assert time.monotonic() < deadline, processes.logs_text()
            time.sleep(0.5)
        for k, (port, path) in enumerate(zip(node_ports, data, strict=True)):
            processes.start(f"flower-client{k}", [
                executable("flower-client"), "--superlink", f"127.0.0.1:{link}",
                "--root-certificates", str(tls["ca"]), "--data", str(path),
                "--port", str(port)])

        failing = subprocess.run(
            [executable("flower-server"), "--superlink", f"127.0.0.1:{link}",
             "--root-certificates", str(tls["ca"]), "--supernode-public-key",
             str(tls["node.pub"]), "--state-dir", str(tmp_path / "state2"),
             "--model", "no-such-model", "--output-dir", str(tmp_path / "outputs2")],
            capture_output=True, text=True, timeout=300, env=processes.env)
        output = failing.stdout + failing.stderr
        assert failing.returncode == 1, output + processes.logs_text()
        assert "registered SuperNode key" in output
        assert "finished:failed" in output and "no-such-model" in output
        assert "stopping the SuperLink" not in output  # it did not start that SuperLink
        print(f"failing run done after {time.monotonic() - start:.0f} s")

        try:
            code = server.process.wait(timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail("flower-server did not finish:\n" + processes.logs_text())
        print(f"deployment run: {time.monotonic() - start:.0f} s")
        assert code == 0, processes.logs_text()
        log = server.log_path.read_text()
        assert "completed" in log and "stopping the SuperLink" in log

        (run,) = outputs.glob("run-*")
        report = json.loads((run / "report.json").read_text())
        assert report["train_metrics"]["1"]["accepted-replies"] == 3
        assert report["run_config"]["min-train-nodes"] == 3
        assert report["run_config"]["local-epochs"] == 1
        from safetensors.torch import load_file

        from otfusion.zoo import build_model

        build_model("mlp").load_state_dict(load_file(run / "global_model.safetensors"))
        assert (state / "flwr-home" / "config.toml").is_file()
        assert (state / "superlink.db").is_file()
        assert not (tmp_path / "outputs2").exists()
    finally:
        processes.stop_all()
        assert_no_leftovers(ports)


# --- flags and the security rule ----------------------------------------------------

def parse(*argv: str):
    return flower_server.build_parser().parse_args(list(argv))


def test_security_must_be_chosen_explicitly(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        flower_server.main(["--state-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--insecure" in error and "--ssl-certfile" in error
    assert not (tmp_path / "flwr-home").exists()  # nothing started, nothing written


def test_insecure_or_complete_tls(tmp_path):
    ca, cert, key = (tmp_path / name for name in ("ca.crt", "server.crt", "server.key"))
    for path in (ca, cert, key):
        path.write_text("pem")
    assert choose_security(insecure=True) == Security(insecure=True)
    tls = choose_security(ssl_ca_certfile=str(ca), ssl_certfile=str(cert),
                          ssl_keyfile=str(key), enable_supernode_auth=True)
    assert tls.root_certificates == ca and not tls.insecure
    assert tls.superlink_args() == ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert),
                                    "--ssl-keyfile", str(key), "--enable-supernode-auth"]
    assert tls.connection("127.0.0.1:9") == {"address": "127.0.0.1:9",
                                             "root-certificates": str(ca)}
    with pytest.raises(DeploymentError, match="cannot be combined"):
        choose_security(insecure=True, ssl_ca_certfile=str(ca))
    with pytest.raises(DeploymentError, match="--ssl-keyfile"):
        choose_security(ssl_ca_certfile=str(ca), ssl_certfile=str(cert))
    with pytest.raises(DeploymentError, match="no such file"):
        choose_security(ssl_ca_certfile=str(ca), ssl_certfile=str(cert),
                        ssl_keyfile=str(tmp_path / "missing.key"))
    with pytest.raises(DeploymentError, match="needs TLS"):
        choose_security(insecure=True, enable_supernode_auth=True)
    # an existing SuperLink: only the CA
    remote = choose_security(root_certificates=str(ca), own_superlink=False)
    assert remote == Security(insecure=False, root_certificates=ca)
    with pytest.raises(DeploymentError, match="--root-certificates"):
        choose_security(own_superlink=False)
    with pytest.raises(DeploymentError, match="--ssl-certfile"):
        choose_security(root_certificates=str(ca), ssl_certfile=str(cert),
                        own_superlink=False)


def test_deployment_flags(tmp_path):
    args = parse("--insecure", "--min-clients", "3", "--local-epochs", "2")
    config = flower_server.run_config_from_args(args)
    assert (config.min_train_nodes, config.local_epochs) == (3, 2)
    options = flower_server.deployment_options(args)
    assert options.address == DEFAULT_ADDRESS and options.superlink is None
    assert options.state_dir == Path(".flower-server") and options.security.insecure
    assert flower_server.run_config_from_args(parse("--min-train-nodes", "4")).min_train_nodes == 4
    with pytest.raises(DeploymentError, match="does not apply"):
        flower_server.deployment_options(parse("--insecure", "--superlink", "h:1",
                                               "--address", "127.0.0.1:2"))
    with pytest.raises(DeploymentError, match="HOST:PORT"):
        flower_server.deployment_options(parse("--insecure", "--superlink", "nohostport"))
    with pytest.raises(DeploymentError, match="needs TLS"):
        pub = tmp_path / "node.pub"
        pub.write_text("key")
        flower_server.deployment_options(parse("--insecure", "--supernode-public-key", str(pub)))


def test_simulation_refuses_deployment_flags(capsys):
    with pytest.raises(SystemExit):
        flower_server.main(["--simulation", "--insecure"])
    assert "deployment flag" in capsys.readouterr().err


def test_help_documents_every_flag():
    text = flower_server.build_parser().format_help()
    for action in flower_server.build_parser()._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help, action.option_strings
    for flag in ("--address", "--superlink", "--insecure", "--ssl-certfile", "--min-clients",
                 "--state-dir", "--simulation", "--fusion-solver"):
        assert flag in text
    for action in flower_client.build_parser()._actions:
        assert action.help, action.option_strings


def test_addresses():
    assert split_address("127.0.0.1:9091") == ("127.0.0.1", 9091)
    assert split_address("[::1]:9091") == ("::1", 9091)
    assert split_address("server.example.org:443") == ("server.example.org", 443)
    for bad in ("9091", "host:", "host:99999", "::1:9091"):
        with pytest.raises(DeploymentError):
            split_address(bad)
    assert join_address("::1", 5) == "[::1]:5"
    assert local_host("0.0.0.0") == "127.0.0.1"
    assert is_local("0.0.0.0") and is_local("localhost")
    assert not is_local("10.0.0.7") and not is_local("server.example.org")


# --- generated files ----------------------------------------------------------------

def test_generated_app_folder_is_a_valid_flower_app_outside_the_checkout(tmp_path, monkeypatch):
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import load_and_validate

    monkeypatch.chdir(tmp_path)  # nothing may depend on the source checkout
    app = write_app_dir(tmp_path / "app")
    assert [p.name for p in app.iterdir()] == ["pyproject.toml"]
    config, warnings = load_and_validate(app / "pyproject.toml")  # imports the components
    assert warnings == []
    flwr_app = config["tool"]["flwr"]["app"]
    assert flwr_app["components"] == {"serverapp": "otfusion.server.app:app",
                                      "clientapp": "otfusion.client.app:app"}
    assert flwr_app["config"] == RunConfig().as_run_config()
    assert config["project"]["version"] == app_version()
    assert len(build_fab_from_disk(app)) < 10_000


def test_connection_and_run_config_files_are_read_by_flower(tmp_path, monkeypatch):
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.common.config import parse_config_args

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    write_flwr_config(tmp_path / "home", "127.0.0.1:9091", Security(insecure=True))
    connection = read_superlink_connection(CONNECTION)
    assert (connection.address, connection.insecure) == ("127.0.0.1:9091", True)
    assert read_superlink_connection(None).name == CONNECTION

    config = RunConfig(local_epochs=3, output_dir="with space/it's here")
    path = write_run_config(tmp_path / "run-config.toml", config)
    assert parse_config_args([str(path)]) == config.as_run_config()


def test_prepare_resolves_local_output_dirs_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    options = DeploymentOptions(security=Security(insecure=True),
                                state_dir=Path("state"))
    state, env, argv, config = prepare(RunConfig(output_dir="outs"), options)
    assert state == tmp_path / "state" and env["FLWR_HOME"] == str(state / "flwr-home")
    assert config.output_dir == str(tmp_path / "outs")
    assert argv[1:] == ["run", str(state / "app"), CONNECTION,
                        "--run-config", str(state / "run-config.toml"), "--stream"]
    remote = DeploymentOptions(security=Security(insecure=True),
                               superlink="10.1.2.3:9091", state_dir=Path("state"))
    assert prepare(RunConfig(output_dir="outs"), remote)[3].output_dir == "outs"
    assert 'address = "10.1.2.3:9091"' in (state / "flwr-home" / "config.toml").read_text()


def test_superlink_command():
    command = superlink_command("0.0.0.0", 9091, Security(insecure=True),
                                Path("/state/superlink.db"))
    assert Path(command[0]).name == "flower-superlink"
    assert command[1:] == ["--insecure", "--disable-runtime-dependency-installation",
                           "--host", "0.0.0.0", "--port", "9091",
                           "--database", "/state/superlink.db"]


def test_a_taken_port_is_an_error_before_anything_starts(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        options = DeploymentOptions(security=Security(insecure=True),
                                    address=f"127.0.0.1:{port}",
                                    state_dir=tmp_path / "state")
        assert deploy(RunConfig(output_dir=str(tmp_path)), options) == 1
    error = capsys.readouterr().err
    assert "is in use" in error and "--superlink" in error
    assert not (tmp_path / "state" / "superlink.log").exists()


# --- the run's status ---------------------------------------------------------------

def test_stream_run_finds_the_run_id_and_parse_status_reads_flwr_ls():
    lines = []
    code, run_id = stream_run(
        [sys.executable, "-c", "print('Using SuperLink: x'); print('Successfully started run "
                               "1234567890123'); print('logs...')"],
        dict(os.environ), echo=lines.append)
    assert (code, run_id) == (0, 1234567890123) and len(lines) == 3
    listing = json.dumps({"success": True, "runs": [
        {"run-id": "1234567890123", "status": "finished:failed",
         "status-details": "ServerApp raised ValueError"}]})
    assert parse_status("noise\n" + listing, 1234567890123) == (
        "finished:failed", "ServerApp raised ValueError")
    assert parse_status("not json", 5)[0] == ""


def test_managed_process_stops_children_in_other_sessions():
    """Like the SuperLink, which starts its SuperExec with start_new_session=True."""
    script = ("import subprocess, sys, time\n"
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
              " start_new_session=True)\n"
              "time.sleep(60)\n")
    process = ManagedProcess([sys.executable, "-c", script])
    deadline = time.monotonic() + 20
    while not descendants(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    (child,) = descendants(process.pid)
    process.stop(grace=2.0)
    assert not process.alive()
    deadline = time.monotonic() + 5
    while _exists(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _exists(child)


# --- flower-client ------------------------------------------------------------------

def client_command(*argv: str) -> list[str]:
    return flower_client.supernode_command(flower_client.build_parser().parse_args(list(argv)))


def test_flower_client_builds_the_supernode_command(tmp_path):
    data = tmp_path / "my data.npz"
    np.savez(data, x=np.zeros((4, 64), np.float32), y=np.zeros(4, np.int64))
    command = client_command("--superlink", "server:9091", "--insecure", "--data", str(data),
                             "--port", "9100")
    assert Path(command[0]).name == "flower-supernode"
    assert command[1:] == ["--superlink", "server:9091", "--insecure",
                           "--node-config", f"data-path='{data}'", "--host", "127.0.0.1",
                           "--port", "9100"]
    ca, key = tmp_path / "ca.crt", tmp_path / "node"
    ca.write_text("pem")
    key.write_text("key")
    command = client_command("--superlink", "server:9091", "--root-certificates", str(ca),
                             "--auth-supernode-private-key", str(key),
                             "--partition-id", "1", "--num-partitions", "3")
    assert command[1:7] == ["--superlink", "server:9091", "--root-certificates", str(ca),
                            "--auth-supernode-private-key", str(key)]
    assert command[7:9] == ["--node-config", "partition-id=1 num-partitions=3"]


def test_flower_client_node_config_is_read_by_flower(tmp_path):
    from flwr.common.config import parse_config_args

    data = tmp_path / "my data.npz"
    np.savez(data, x=np.zeros((4, 64), np.float32), y=np.zeros(4, np.int64))
    command = client_command("--superlink", "h:1", "--insecure", "--data", str(data))
    node_config = command[command.index("--node-config") + 1]
    assert parse_config_args([node_config]) == {"data-path": str(data)}


def test_flower_client_refuses_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, features=np.zeros(3))
    with pytest.raises(DeploymentError, match=r"lacks the arrays \['x', 'y'\]"):
        client_command("--superlink", "h:1", "--insecure", "--data", str(bad))
    with pytest.raises(DeploymentError, match="either --data or"):
        client_command("--superlink", "h:1", "--insecure", "--data", str(bad),
                       "--partition-id", "0", "--num-partitions", "2")
    with pytest.raises(DeploymentError, match="--data FILE.npz, or"):
        client_command("--superlink", "h:1", "--insecure")
    with pytest.raises(DeploymentError, match="0..1"):
        client_command("--superlink", "h:1", "--insecure", "--partition-id", "2",
                       "--num-partitions", "2")
    for argv in (["--superlink", "h:1", "--partition-id", "0", "--num-partitions", "2"],
                 ["--superlink", "h:1", "--insecure", "--root-certificates", "ca"]):
        with pytest.raises(SystemExit):
            flower_client.main(argv)
    assert "--insecure" in capsys.readouterr().err
