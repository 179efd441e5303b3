"""Addresses of the SuperLink: ``HOST:PORT`` (IPv6 as ``[ADDR]:PORT``) split and joined,
the address that reaches a server listening on a wildcard host from this machine, whether
a host is this machine, and TCP checks of whether a port is taken or reachable."""

from __future__ import annotations

import ipaddress
import re
import socket

from otfusion.deploy.errors import DeploymentError

DEFAULT_ADDRESS = "127.0.0.1:9091"
"""Where ``flower-server`` runs its SuperLink unless ``--address`` says otherwise."""


def split_address(address: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (IPv6 as ``"[::1]:PORT"``) into host and port."""
    match = re.fullmatch(r"\[(?P<v6>[^\]]+)\]:(?P<p1>\d+)|(?P<host>[^:\[\]]+):(?P<p2>\d+)",
                         address.strip())
    if not match:
        raise DeploymentError(f"address {address!r} is not HOST:PORT (IPv6: [ADDR]:PORT)")
    host = match["v6"] or match["host"]
    port = int(match["p1"] or match["p2"])
    if not 0 < port < 65536:
        raise DeploymentError(f"port {port} of {address!r} is out of range")
    return host, port


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def local_host(host: str) -> str:
    """The address to reach a server listening on ``host`` from the same machine."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def is_local(host: str) -> bool:
    """True for loopback and wildcard addresses (the SuperLink is on this machine)."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on ``host`` now (the operating system's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    try:
        socket.create_connection((local_host(host), port), timeout=2.0).close()
    except OSError:
        return False
    return True


def check_reachable(host: str, port: int, timeout: float = 5.0) -> None:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        raise DeploymentError(f"cannot reach the SuperLink at {join_address(host, port)}: "
                              f"{err}") from None
