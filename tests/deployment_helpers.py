"""Helpers of the deployment tests, which run real Flower processes on loopback: free
ports, a check that no process is left behind, process trees started and killed
together (the ``processes`` fixture of conftest.py), client data files and TLS
material."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import subprocess
import time
from pathlib import Path

import numpy as np

from otfusion.deploy.processes import ManagedProcess


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def leftovers(ports: list[int]) -> list[str]:
    """Processes whose command line names one of our ports (SuperLink, SuperNodes,
    their SuperExecs and app processes all carry one)."""
    pattern = "127\\.0\\.0\\.1:(" + "|".join(str(port) for port in ports) + ")\\b"
    found = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True)
    return [line for line in found.stdout.splitlines() if "pgrep" not in line]


def assert_no_leftovers(ports: list[int], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (left := leftovers(ports)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left behind: {left}"


class Processes:
    """Starts process trees in their own sessions and kills all of them at the end."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs, self.started = env, logs, []

    def start(self, name: str, argv: list[str]) -> ManagedProcess:
        process = ManagedProcess(argv, log_path=self.logs / f"{name}.log", env=self.env)
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.started):
            process.stop(grace=3.0)

    def logs_text(self) -> str:
        return "\n".join(f"--- {p.log_path.name}\n{p.log_tail(40)}" for p in self.started)


def write_client_data(folder: Path, count: int) -> list[Path]:
    """The digits training set split into ``count`` .npz files (x, y, x_test, y_test)."""
    from otfusion.task.data import load_digits_dataset

    train, test = load_digits_dataset()
    paths = []
    for k in range(count):
        path = folder / f"client{k}.npz"
        np.savez(path, x=train.x[k::count].numpy(), y=train.y[k::count].numpy(),
                 x_test=test.x[k::count].numpy(), y_test=test.y[k::count].numpy())
        paths.append(path)
    return paths


def make_tls_files(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost, and a SuperNode key pair."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test-ca")).issuer_name(name("test-ca"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                       x509.DNSName("localhost")])
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(name("test-ca"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    node = ec.generate_private_key(ec.SECP384R1())
    pem = serialization.Encoding.PEM
    files = {
        "ca": (ca.public_bytes(pem)),
        "cert": cert.public_bytes(pem),
        "key": key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption()),
        "node": node.private_bytes(pem, serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()),
        "node.pub": node.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                   serialization.PublicFormat.OpenSSH),
    }
    paths = {}
    for label, data in files.items():
        paths[label] = folder / label
        paths[label].write_bytes(data)
    return paths
