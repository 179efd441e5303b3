"""Deployment mode of ``flower-server``: a SuperLink, this app, and one run of it.

``flower-server`` (without ``--simulation``) starts a ``flower-superlink`` (or uses an
existing one named by ``--superlink``), waits until it answers, and runs this app on it
with Flower's own CLI, ``flwr run APP CONNECTION --run-config FILE --stream``. Real
clients join with ``flower-client`` (a ``flower-supernode`` for this app) from their
own machines; the strategy waits until ``min-train-nodes`` of them are connected.

Everything flower-server writes lives in its state directory:

- ``flwr-home/``: a private ``FLWR_HOME`` with the connection (``config.toml``) and the
  apps the SuperLink installed,
- ``app/pyproject.toml``: a minimal Flower App generated at run time, whose components
  import the installed ``otfusion`` package (nothing depends on a source checkout),
- ``run-config.toml``: the run's settings from the command line flags,
- ``superlink.db`` and ``superlink.log``: the SuperLink's state and log.

``flwr run --stream`` exits 0 even when the run failed, so the final status is read
with ``flwr ls CONNECTION --run-id ID --format json`` and a failed run is an error.
The SuperLink started here is stopped on exit, also on errors and Ctrl-C.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import tomli_w

if TYPE_CHECKING:  # imported lazily: flower-client uses this module without torch
    from otfusion.task.config import RunConfig

DEFAULT_ADDRESS = "127.0.0.1:9091"
"""Where ``flower-server`` runs its SuperLink unless ``--address`` says otherwise."""

DEFAULT_STATE_DIR = ".flower-server"
CONNECTION = "otfusion"
"""Name of the SuperLink connection written into the private ``FLWR_HOME``."""

APP_NAME = "flwr-otfusion"
PUBLISHER = "flwr-otfusion"
COMPONENTS = {"serverapp": "otfusion.server.app:app", "clientapp": "otfusion.client.app:app"}

_RUN_ID = re.compile(r"started run (\d+)")


class DeploymentError(RuntimeError):
    """A problem the user can fix (bad flags, SuperLink not reachable, failed run)."""


def say(message: str) -> None:
    print(f"flower-server: {message}", file=sys.stderr, flush=True)


# --- addresses ----------------------------------------------------------------------

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


# --- security -----------------------------------------------------------------------

@dataclass(frozen=True)
class Security:
    """Transport security of the SuperLink and of flower-server's connection to it."""

    insecure: bool
    ssl_ca_certfile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    root_certificates: Path | None = None
    enable_supernode_auth: bool = False

    def superlink_args(self) -> list[str]:
        if self.insecure:
            return ["--insecure"]
        args = ["--ssl-ca-certfile", str(self.ssl_ca_certfile),
                "--ssl-certfile", str(self.ssl_certfile),
                "--ssl-keyfile", str(self.ssl_keyfile)]
        if self.enable_supernode_auth:
            args.append("--enable-supernode-auth")
        return args

    def connection(self, address: str) -> dict[str, object]:
        """The connection's entries in ``FLWR_HOME/config.toml``."""
        if self.insecure:
            return {"address": address, "insecure": True}
        return {"address": address, "root-certificates": str(self.root_certificates)}

    def ssl_context(self) -> ssl.SSLContext | None:
        """For the health check of our own SuperLink: verify the chain against the CA;
        the host name is not checked because we may reach it through 127.0.0.1."""
        if self.insecure:
            return None
        context = ssl.create_default_context(cafile=str(self.root_certificates))
        context.check_hostname = False
        return context


def _existing_file(path: str | os.PathLike | None, flag: str) -> Path | None:
    if path is None:
        return None
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise DeploymentError(f"{flag} {path}: no such file")
    return resolved


def choose_security(*, insecure: bool = False, ssl_ca_certfile: str | None = None,
                    ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
                    root_certificates: str | None = None, enable_supernode_auth: bool = False,
                    own_superlink: bool = True) -> Security:
    """Security must be an explicit choice: ``--insecure``, or TLS.

    With its own SuperLink, TLS means the three ``--ssl-*`` files (the connection then
    trusts ``--ssl-ca-certfile``, or ``--root-certificates`` if given). With an existing
    SuperLink (``--superlink``), TLS means the CA that signed its certificate:
    ``--root-certificates`` (``--ssl-ca-certfile`` is accepted as the same thing).
    """
    server_files = {"--ssl-certfile": ssl_certfile, "--ssl-keyfile": ssl_keyfile}
    tls_flags = {"--ssl-ca-certfile": ssl_ca_certfile, "--root-certificates": root_certificates,
                 **server_files}
    given_tls = [flag for flag, value in tls_flags.items() if value is not None]
    if insecure:
        if given_tls:
            raise DeploymentError(f"--insecure cannot be combined with {', '.join(given_tls)}: "
                                  "choose either an insecure or a TLS connection")
        if enable_supernode_auth:
            raise DeploymentError("--enable-supernode-auth needs TLS (Flower refuses it "
                                  "with --insecure)")
        return Security(insecure=True)
    if not given_tls:
        if own_superlink:
            hint = ("--insecure (plain HTTP: only on a trusted network) or TLS with "
                    "--ssl-ca-certfile CA --ssl-certfile CERT --ssl-keyfile KEY")
        else:
            hint = ("--insecure (plain HTTP) or --root-certificates CA (the CA that signed "
                    "the SuperLink's certificate)")
        raise DeploymentError(f"choose the transport security explicitly: {hint}")
    if own_superlink:
        missing = [flag for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile")
                   if tls_flags[flag] is None]
        if missing:
            raise DeploymentError(f"TLS for the SuperLink needs {', '.join(missing)} as well")
        ca = _existing_file(ssl_ca_certfile, "--ssl-ca-certfile")
        return Security(
            insecure=False,
            ssl_ca_certfile=ca,
            ssl_certfile=_existing_file(ssl_certfile, "--ssl-certfile"),
            ssl_keyfile=_existing_file(ssl_keyfile, "--ssl-keyfile"),
            root_certificates=_existing_file(root_certificates, "--root-certificates") or ca,
            enable_supernode_auth=enable_supernode_auth,
        )
    wrong = [flag for flag, value in server_files.items() if value is not None]
    if wrong:
        raise DeploymentError(f"{', '.join(wrong)} configure the SuperLink that flower-server "
                              "starts; with --superlink give only --root-certificates CA")
    if enable_supernode_auth:
        raise DeploymentError("--enable-supernode-auth is a setting of the SuperLink: start "
                              "that SuperLink with it (not possible with --superlink)")
    if ssl_ca_certfile and root_certificates and (
            Path(ssl_ca_certfile).resolve() != Path(root_certificates).resolve()):
        raise DeploymentError("--ssl-ca-certfile and --root-certificates name different files; "
                              "with --superlink give only --root-certificates")
    ca = _existing_file(root_certificates or ssl_ca_certfile, "--root-certificates")
    return Security(insecure=False, root_certificates=ca)


# --- files in the state directory ---------------------------------------------------

def app_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(APP_NAME)
    except PackageNotFoundError:
        return "0.0.0"


def app_pyproject(version: str | None = None) -> dict[str, object]:
    """A minimal Flower App: metadata, components from the installed package, and the
    run-config defaults of :class:`RunConfig`."""
    from otfusion.task.config import RunConfig

    return {
        "project": {
            "name": APP_NAME,
            "version": version or app_version(),
            "description": "One-shot federated learning: OT fusion of the clients' models "
                           "(generated by flower-server; runs the installed otfusion package)",
            "license": "Apache-2.0",
        },
        "tool": {"flwr": {"app": {
            "publisher": PUBLISHER,
            "components": dict(COMPONENTS),
            "config": RunConfig().as_run_config(),
        }}},
    }


def write_app_dir(directory: Path) -> Path:
    """Write the app folder (only a ``pyproject.toml``) and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(tomli_w.dumps(app_pyproject()))
    return directory


def write_flwr_config(flwr_home: Path, address: str, security: Security) -> Path:
    """``FLWR_HOME/config.toml`` with one connection, :data:`CONNECTION`, the default."""
    flwr_home.mkdir(parents=True, exist_ok=True, mode=0o700)
    config = {"superlink": {"default": CONNECTION, CONNECTION: security.connection(address)}}
    path = flwr_home / "config.toml"
    path.write_text(tomli_w.dumps(config))
    return path


def write_run_config(path: Path, config: RunConfig) -> Path:
    """All run-config keys as a TOML file for ``flwr run --run-config FILE`` (a file
    keeps paths with spaces or quotes intact, unlike ``key=value`` pairs)."""
    path.write_text(tomli_w.dumps(config.as_run_config()))
    return path


# --- processes ----------------------------------------------------------------------

def executable(name: str) -> str:
    """A Flower command of this environment: next to the running Python first (a venv
    used without activating it), then on PATH."""
    sibling = Path(sys.executable).parent / name
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(f"{name} not found: is flwr installed in this environment?")
    return found


def child_env(flwr_home: Path | None = None, base: Mapping[str, str] | None = None
              ) -> dict[str, str]:
    """Environment for Flower's processes: this environment's scripts first on PATH
    (the SuperLink and SuperNode start ``flower-superexec`` by name), no telemetry, no
    update check, and the private ``FLWR_HOME`` if given."""
    env = dict(os.environ if base is None else base)
    scripts = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([scripts, env.get("PATH", "")]) if env.get("PATH") else scripts
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # the command name may contain spaces and parentheses: the ppid follows the last ")"
        fields = text[text.rfind(")") + 2:].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _start_time(pid: int) -> str | None:
    """The process's start time (from /proc), to tell it from a later one with its pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def _snapshot(pid: int) -> list[tuple[int, str | None]]:
    return [(p, _start_time(p)) for p in (pid, *descendants(pid))]


def _signal_all(processes: Sequence[tuple[int, str | None]], sig: int) -> None:
    """Signal every (pid, start time) that is still the same process; a group leader
    gets the signal for its whole group."""
    for pid, started in processes:
        if _start_time(pid) != started:  # gone, or its pid now belongs to another process
            continue
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class ManagedProcess:
    """A child process in its own session (process group) whose whole tree is stopped
    by :meth:`stop`: SIGTERM, then SIGKILL after ``grace`` seconds. Flower's SuperLink
    starts its SuperExec in a separate session, so the tree is collected from /proc."""

    def __init__(self, argv: Sequence[str], *, log_path: Path | None = None,
                 cwd: Path | None = None, env: Mapping[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        log = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=cwd,
                                            env=dict(env) if env is not None else None,
                                            start_new_session=True)
        finally:
            if log is not subprocess.DEVNULL:
                log.close()

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace: float = 10.0) -> None:
        if self.process.returncode is not None:
            return
        tree = _snapshot(self.pid)
        _signal_all(tree, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + min(grace, 5.0)
        while time.monotonic() < deadline and any(_exists(pid) for pid, _ in tree[1:]):
            time.sleep(0.2)
        if self.process.poll() is None:
            tree += _snapshot(self.pid)
        _signal_all(tree, signal.SIGKILL)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie of ours still "exists"; treat it as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def superlink_command(host: str, port: int, security: Security,
                      database: Path | None) -> list[str]:
    """``flower-superlink`` with its state in the SQLite file ``database`` (None: in
    memory, lost when it stops)."""
    command = [executable("flower-superlink"), *security.superlink_args(),
               "--disable-runtime-dependency-installation", "--host", host, "--port", str(port)]
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


# --- the run ------------------------------------------------------------------------

def _echo(line: str) -> None:
    sys.stdout.write(line)
    sys.stdout.flush()


def stream_run(argv: Sequence[str], env: Mapping[str, str],
               echo: Callable[[str], None] = _echo,
               on_run_id: Callable[[int], None] | None = None) -> tuple[int, int | None]:
    """Run ``flwr run ... --stream``, echoing its output; returns (exit code, run id).
    ``on_run_id`` is called as soon as the run id is known (before the run ends)."""
    run_id = None
    process = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, text=True, errors="replace",
                               env=dict(env))
    try:
        assert process.stdout is not None
        for line in process.stdout:
            echo(line)
            if run_id is None and (match := _RUN_ID.search(line)):
                run_id = int(match[1])
                if on_run_id is not None:
                    on_run_id(run_id)
        return process.wait(), run_id
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def parse_status(ls_output: str, run_id: int) -> tuple[str, str]:
    """(status, details) of ``run_id`` from ``flwr ls --format json`` output."""
    start = ls_output.find("{")
    try:
        payload = json.loads(ls_output[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        payload = {}
    for run in payload.get("runs", []):
        if str(run.get("run-id")) == str(run_id):
            return str(run.get("status", "")), str(run.get("status-details", ""))
    return "", ls_output.strip()[-500:]


def final_status(run_id: int, env: Mapping[str, str], timeout: float = 60.0) -> tuple[str, str]:
    """Poll ``flwr ls`` until the run's status starts with ``finished``."""
    deadline = time.monotonic() + timeout
    status, details = "", ""
    while True:
        listing = subprocess.run(
            [executable("flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
            capture_output=True, text=True, env=dict(env), stdin=subprocess.DEVNULL)
        status, details = parse_status(listing.stdout, run_id)
        if status.startswith("finished") or time.monotonic() > deadline:
            return status, details
        time.sleep(1.0)


def register_supernodes(public_keys: Sequence[Path], env: Mapping[str, str]) -> None:
    for key in public_keys:
        done = subprocess.run([executable("flwr"), "supernode", "register", str(key), CONNECTION],
                              capture_output=True, text=True, env=dict(env),
                              stdin=subprocess.DEVNULL)
        output = (done.stdout + done.stderr).strip()
        if done.returncode == 0:
            say(f"registered SuperNode key {key}")
        else:  # e.g. already registered in a persistent database: the run can go on
            say(f"warning: registering {key} failed (exit {done.returncode}): {output[-300:]}")


@dataclass
class DeploymentOptions:
    """How to reach (or start) the SuperLink; see ``flower-server --help``."""

    security: Security
    address: str = DEFAULT_ADDRESS
    superlink: str | None = None
    state_dir: Path = field(default_factory=lambda: Path(DEFAULT_STATE_DIR))
    startup_timeout: float = 60.0
    supernode_public_keys: Sequence[Path] = ()


def prepare(config: RunConfig, options: DeploymentOptions) -> tuple[Path, dict[str, str],
                                                                     list[str], RunConfig]:
    """Write the state directory; return (state dir, env, ``flwr run`` argv, config)."""
    state = options.state_dir.expanduser().resolve()
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    flwr_home = state / "flwr-home"
    host, port = split_address(options.superlink or options.address)
    connect = join_address(local_host(host), port)
    write_flwr_config(flwr_home, connect, options.security)
    app_dir = write_app_dir(state / "app")
    if is_local(host):  # the ServerApp writes its outputs on this machine: resolve here
        outputs = Path(config.output_dir).expanduser().resolve()
        config = config.model_copy(update={"output_dir": str(outputs)})
    run_config = write_run_config(state / "run-config.toml", config)
    argv = [executable("flwr"), "run", str(app_dir), CONNECTION,
            "--run-config", str(run_config), "--stream"]
    return state, child_env(flwr_home), argv, config


def deploy(config: RunConfig, options: DeploymentOptions) -> int:
    """Run the app once on a SuperLink; returns the exit code (0: run completed)."""
    state, env, argv, config = prepare(config, options)
    superlink: ManagedProcess | None = None
    started: list[int] = []
    try:
        if options.superlink is None:
            host, port = split_address(options.address)
            if port_in_use(host, port):
                raise DeploymentError(
                    f"{join_address(host, port)} is in use: choose another --address, or "
                    "run on the SuperLink listening there with --superlink HOST:PORT")
            say(f"starting flower-superlink on {join_address(host, port)} "
                f"({'insecure' if options.security.insecure else 'TLS'}; "
                f"log: {state / 'superlink.log'})")
            superlink = ManagedProcess(
                superlink_command(host, port, options.security, state / "superlink.db"),
                log_path=state / "superlink.log", cwd=state, env=env)
            seconds = wait_until_healthy(host, port, options.security, superlink,
                                         options.startup_timeout)
            if not superlink.alive():  # answered by another server that took the port
                raise DeploymentError(f"flower-superlink exited; its log ({superlink.log_path})"
                                      f":\n{superlink.log_tail()}")
            say(f"SuperLink healthy after {seconds:.1f} s")
        else:
            host, port = split_address(options.superlink)
            check_reachable(host, port)
        if options.supernode_public_keys:
            register_supernodes(options.supernode_public_keys, env)
        shown = "SERVER" if host in ("", "0.0.0.0", "::") else host
        say(f"running the app; the strategy waits for {config.min_train_nodes} SuperNode(s): "
            f"start flower-client --superlink {join_address(shown, port)} on each client "
            f"(outputs: {config.output_dir})")
        code, run_id = stream_run(argv, env, on_run_id=started.append)
        if run_id is None:
            say(f"flwr run did not start a run (exit {code})")
            return code or 1
        status, details = final_status(run_id, env)
        if status != "finished:completed":
            say(f"run {run_id} did not complete: status {status or 'unknown'}"
                + (f": {details}" if details else ""))
            return 1
        say(f"run {run_id} completed; outputs under {config.output_dir}")
        return 0
    except DeploymentError as err:
        say(f"error: {err}")
        return 1
    except KeyboardInterrupt:
        say("interrupted")
        if started and superlink is None:  # someone else's SuperLink: stop our run there
            subprocess.run([executable("flwr"), "stop", str(started[0]), CONNECTION], env=env,
                           capture_output=True, stdin=subprocess.DEVNULL)
        return 130
    finally:
        if superlink is not None:
            say("stopping the SuperLink")
            superlink.stop()
