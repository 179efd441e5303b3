"""How ``flower-server`` runs this app: a SuperLink, the app, and one run of it.

``flower-server`` starts a ``flower-superlink`` (or, deployed, uses an existing one
named by ``--superlink``), waits until it answers, and runs this app on it with Flower's
own CLI, ``flwr run APP CONNECTION --run-config FILE --stream``. Deployed, real clients
join with ``flower-client`` (a ``flower-supernode`` for this app) from their own
machines, and the strategy waits until ``min-train-nodes`` of them are connected. With
``--simulation`` (:class:`Simulation`), the SuperLink runs in simulation mode on
loopback and runs the clients itself (``flwr run --federation-config
"num-supernodes=N ..."``).

Everything flower-server writes lives in its state directory:

- ``flwr-home/``: a private ``FLWR_HOME`` with the connection (``config.toml``) and the
  apps the SuperLink installed,
- ``app/pyproject.toml``: a minimal Flower App generated at run time, whose components
  import the installed ``otfusion`` package (nothing depends on a source checkout),
- ``run-config.toml``: the run's settings from the command line flags,
- ``superlink.db`` and ``superlink.log``: the SuperLink's state (in memory for a
  simulation) and log,
- ``run.log``: the streamed log of a simulated run (see :mod:`otfusion.server.console`).

``flwr run --stream`` exits 0 even when the run failed, so the final status is read
with ``flwr ls CONNECTION --run-id ID --format json`` and a failed run is an error.
The SuperLink started here is stopped on exit, also on errors and Ctrl-C.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from otfusion.deploy.addresses import (
    DEFAULT_ADDRESS,
    check_reachable,
    is_local,
    join_address,
    local_host,
    port_in_use,
    split_address,
)
from otfusion.deploy.errors import DeploymentError, say
from otfusion.deploy.flwr_cli import final_status, register_supernodes, stream_run
from otfusion.deploy.processes import ManagedProcess, child_env, executable
from otfusion.deploy.security import Security
from otfusion.deploy.state_files import (
    CONNECTION,
    write_app_dir,
    write_flwr_config,
    write_run_config,
)
from otfusion.deploy.superlink import superlink_command, wait_until_healthy

if TYPE_CHECKING:  # only for annotations
    from otfusion.task.config import RunConfig

DEFAULT_STATE_DIR = ".flower-server"


@dataclass(frozen=True)
class Simulation:
    """A SuperLink in simulation mode: ``num_supernodes`` virtual clients, each with
    ``client_cpus`` CPUs of the Ray backend."""

    num_supernodes: int
    client_cpus: float = 1.0

    def federation_config(self) -> str:
        """The ``flwr run --federation-config`` value."""
        cpus = self.client_cpus
        return (f"num-supernodes={self.num_supernodes} "  # Flower wants 1, not 1.0
                f"client-resources-num-cpus={int(cpus) if cpus == int(cpus) else cpus}")


@dataclass
class DeploymentOptions:
    """How to reach (or start) the SuperLink; see ``flower-server --help``. With
    ``simulation``, the SuperLink started here runs the clients itself."""

    security: Security
    address: str = DEFAULT_ADDRESS
    superlink: str | None = None
    state_dir: Path = field(default_factory=lambda: Path(DEFAULT_STATE_DIR))
    startup_timeout: float = 60.0
    supernode_public_keys: Sequence[Path] = ()
    simulation: Simulation | None = None


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
    if options.simulation is not None:
        argv += ["--federation-config", options.simulation.federation_config()]
    env = child_env(flwr_home)
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's FutureWarning
    return state, env, argv, config


def deploy(config: RunConfig, options: DeploymentOptions,
           echo: Callable[[str], None] | None = None) -> int:
    """Run the app once on a SuperLink; returns the exit code (0: run completed).
    ``echo`` receives every line of the run's output (default: printed)."""
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
            if options.simulation is not None:
                say(f"starting a local SuperLink in simulation mode on "
                    f"{join_address(host, port)} (log: {state / 'superlink.log'})")
            else:
                say(f"starting flower-superlink on {join_address(host, port)} "
                    f"({'insecure' if options.security.insecure else 'TLS'}; "
                    f"log: {state / 'superlink.log'})")
            superlink = ManagedProcess(
                superlink_command(host, port, options.security,
                                  None if options.simulation else state / "superlink.db",
                                  simulation=options.simulation is not None),
                log_path=state / "superlink.log", cwd=state, env=env, tied=True)
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
        if options.simulation is None:
            shown = "SERVER" if host in ("", "0.0.0.0", "::") else host
            say(f"running the app; the strategy waits for {config.min_train_nodes} "
                f"SuperNode(s): start flower-client --superlink {join_address(shown, port)} "
                f"on each client (outputs: {config.output_dir})")
        code, run_id = stream_run(argv, env, echo=echo, on_run_id=started.append)
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
