"""The SuperLink that flower-server starts: its ``flower-superlink`` command line, the
check of its HTTP(S) ``/health`` endpoint, and the wait until it answers there (an error
if it exits first or does not answer in time)."""

from __future__ import annotations

import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

from otfusion.deploy.addresses import join_address, local_host
from otfusion.deploy.errors import DeploymentError
from otfusion.deploy.processes import ManagedProcess, executable
from otfusion.deploy.security import Security


def superlink_command(host: str, port: int, security: Security,
                      database: Path | None, simulation: bool = False) -> list[str]:
    """``flower-superlink`` with its state in the SQLite file ``database`` (None: in
    memory, lost when it stops); with ``simulation``, one that runs the app's clients as
    virtual SuperNodes itself (Flower's simulation runtime)."""
    command = [executable("flower-superlink"), *security.superlink_args(),
               "--disable-runtime-dependency-installation", "--host", host, "--port", str(port),
               *(["--simulation"] if simulation else [])]
    return command + (["--database", str(database)] if database is not None else [])


def health_check(host: str, port: int, security: Security, timeout: float = 2.0) -> bool:
    scheme = "http" if security.insecure else "https"
    url = f"{scheme}://{join_address(local_host(host), port)}/health"
    opener = urllib.request.build_opener(  # never through an HTTP proxy of the environment
        urllib.request.ProxyHandler({}),
        urllib.request.HTTPSHandler(context=security.ssl_context()))
    try:
        with opener.open(url, timeout=timeout) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


def wait_until_healthy(host: str, port: int, security: Security, process: ManagedProcess,
                       timeout: float) -> float:
    """Seconds until the SuperLink answered ``/health``; raises if it exits or times out."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not process.alive():
            raise DeploymentError(f"flower-superlink exited with code {process.process.returncode}"
                                  f"; its log ({process.log_path}):\n{process.log_tail()}")
        if health_check(host, port, security):
            return time.monotonic() - start
        time.sleep(0.25)
    raise DeploymentError(f"flower-superlink did not become healthy within {timeout:.0f} s; "
                          f"its log ({process.log_path}):\n{process.log_tail()}")
