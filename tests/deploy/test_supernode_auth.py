"""SuperNode authentication on loopback: a SuperLink with TLS and
``--enable-supernode-auth`` admits a ``flower-client`` whose public key was registered
and refuses one whose key was not."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from deployment_helpers import (
    assert_no_leftovers,
    free_ports,
    make_tls_files,
    write_client_data,
)

from otfusion.deploy.flwr_cli import register_supernodes
from otfusion.deploy.processes import executable
from otfusion.deploy.security import Security
from otfusion.deploy.state_files import write_flwr_config
from otfusion.deploy.superlink import health_check, superlink_command

pytestmark = pytest.mark.slow


def unregistered_key(folder: Path) -> Path:
    key = ec.generate_private_key(ec.SECP384R1())
    path = folder / "stranger"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    return path


def activated_nodes(log: Path) -> list[str]:
    return re.findall(r"Activated node_id=(\d+)", log.read_text(errors="replace"))


@pytest.mark.timeout(300)
def test_only_registered_supernodes_are_admitted(tmp_path, processes):  # noqa: F811
    link, known_port, stranger_port = ports = free_ports(3)
    tls = make_tls_files(tmp_path)
    security = Security(insecure=False, ssl_ca_certfile=tls["ca"], ssl_certfile=tls["cert"],
                        ssl_keyfile=tls["key"], root_certificates=tls["ca"],
                        enable_supernode_auth=True)
    env = processes.env
    write_flwr_config(Path(env["FLWR_HOME"]), f"127.0.0.1:{link}", security)
    (data,) = write_client_data(tmp_path, 1)
    try:
        superlink = processes.start("superlink", superlink_command(
            "127.0.0.1", link, security, None))
        deadline = time.monotonic() + 120
        while not health_check("127.0.0.1", link, security):
            assert superlink.alive() and time.monotonic() < deadline, processes.logs_text()
            time.sleep(0.5)
        register_supernodes([tls["node.pub"]], env)

        def client(name: str, key: Path, port: int):
            return processes.start(name, [
                executable("flower-client"), "--superlink", f"127.0.0.1:{link}",
                "--root-certificates", str(tls["ca"]), "--auth-supernode-private-key",
                str(key), "--data", str(data), "--port", str(port)])

        stranger = client("stranger", unregistered_key(tmp_path), stranger_port)
        known = client("known", tls["node"], known_port)
        deadline = time.monotonic() + 120
        while not activated_nodes(superlink.log_path):
            assert known.alive() and time.monotonic() < deadline, processes.logs_text()
            time.sleep(0.5)

        assert len(activated_nodes(superlink.log_path)) == 1, processes.logs_text()
        assert known.alive(), known.log_tail(40)
        deadline = time.monotonic() + 60
        while stranger.alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not stranger.alive(), stranger.log_tail(40)  # it gave up: exit code 305
        assert "Failed to activate SuperNode" in stranger.log_tail(200)
        assert "No SuperNode found with the given public key" in superlink.log_path.read_text(
            errors="replace")
    finally:
        processes.stop_all()
        assert_no_leftovers(ports)
