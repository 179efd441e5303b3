"""``flower-server``: run the server side of this Flower App.

Flower itself no longer has a ``flower-server`` command; this one runs the OT fusion
app. Every run-config key of the app is a flag (``--local-epochs 5``,
``--fusion-solver sinkhorn``, ...).

Deployment (the default): start a Flower SuperLink on ``--address`` (or use the one
named by ``--superlink``) and run the app on it; clients join with ``flower-client`` on
their own machines, and the run starts once ``--min-clients`` of them are connected.
The transport security is an explicit choice: ``--insecure``, or TLS with
``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``. The exit code is 0 only if the run
completed.

Simulation: ``--simulation --num-clients N`` runs the app the way Flower supports, on
a local SuperLink in simulation mode (``flower-superlink --simulation``, then
``flwr run --federation-config num-supernodes=N``) with N virtual clients (Ray), offline
and without run-time dependency installation, and stops that SuperLink afterwards. It
shows a banner, a progress display and the final table; Flower's log goes to
``<state-dir>/run.log`` (``--verbose`` shows it).
"""

from __future__ import annotations

import argparse
import signal
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from otfusion.deploy.addresses import DEFAULT_ADDRESS, free_port, join_address, split_address
from otfusion.deploy.deployment import (
    DEFAULT_STATE_DIR,
    DeploymentOptions,
    Simulation,
    deploy,
)
from otfusion.deploy.errors import DeploymentError, say
from otfusion.deploy.security import choose_security
from otfusion.server.console import RunConsole
from otfusion.task.config import RunConfig


def _add_run_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per run-config key, typed and with choices from :class:`RunConfig`."""
    group = parser.add_argument_group("run config (defaults from the app's pyproject)")
    for name, field in RunConfig.model_fields.items():
        if name == "strategy":
            continue
        flags = ["--" + name.replace("_", "-")]
        help_text = "; ".join(filter(None, [field.description, f"default: {field.default}"]))
        if name == "min_train_nodes":
            flags.append("--min-clients")
            help_text = ("clients (SuperNodes) that must be connected before the round "
                         f"starts, and that train in it; {help_text}")
        if field.annotation is bool:
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None,
                               dest=name, help=help_text)
            continue
        choices = typing.get_args(field.annotation) or None
        kind = field.annotation if choices is None else type(choices[0])
        group.add_argument(*flags, type=kind, choices=choices, default=None, dest=name,
                           help=help_text)


def _add_deployment_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "deployment (the default mode: a Flower SuperLink that real clients join with "
        "flower-client)")
    group.add_argument("--address", default=None, metavar="HOST:PORT",
                       help="where the SuperLink that flower-server starts listens (one port "
                            "for clients and for flower-server itself); 0.0.0.0:PORT to "
                            "accept clients from other machines (default: "
                            f"{DEFAULT_ADDRESS})")
    group.add_argument("--superlink", metavar="HOST:PORT", default=None,
                       help="use this running SuperLink instead of starting one")
    group.add_argument("--insecure", action="store_true",
                       help="no TLS: plain HTTP between clients, SuperLink and flower-server "
                            "(only on a trusted network); either this or the TLS flags is "
                            "required")
    group.add_argument("--ssl-ca-certfile", metavar="CA", default=None,
                       help="TLS: CA certificate (PEM) that signed --ssl-certfile; clients "
                            "pass it to flower-client --root-certificates")
    group.add_argument("--ssl-certfile", metavar="CERT", default=None,
                       help="TLS: the SuperLink's certificate (PEM); its subject alternative "
                            "names must cover the address clients connect to and the host of "
                            "--address (127.0.0.1 for a wildcard address)")
    group.add_argument("--ssl-keyfile", metavar="KEY", default=None,
                       help="TLS: the private key of --ssl-certfile (PEM)")
    group.add_argument("--root-certificates", metavar="CA", default=None,
                       help="TLS: CA that flower-server trusts when it connects to the "
                            "SuperLink; required with --superlink unless --insecure "
                            "(default with its own SuperLink: --ssl-ca-certfile)")
    group.add_argument("--enable-supernode-auth", action="store_true",
                       help="only registered clients may connect (needs TLS); register their "
                            "public keys with --supernode-public-key")
    group.add_argument("--supernode-public-key", metavar="PUB", action="append", default=[],
                       help="register this client public key (OpenSSH ECDSA, from "
                            "ssh-keygen -t ecdsa -b 384) with the SuperLink before the run; "
                            "repeat for every client")
    group.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR",
                       help="flower-server's private folder: FLWR_HOME with the connection, "
                            "the generated app, the run config, the SuperLink's database and "
                            f"log (default: ./{DEFAULT_STATE_DIR})")
    group.add_argument("--startup-timeout", type=float, default=60.0, metavar="SECONDS",
                       help="how long to wait for the SuperLink to become healthy "
                            "(default: 60)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flower-server", description=__doc__.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", choices=["otfusion", "fedavg"], default="otfusion",
                        help="otfusion: OT fusion of the clients' models; fedavg: weighted "
                             "averaging (default: otfusion)")
    simulation = parser.add_argument_group("simulation")
    simulation.add_argument("--simulation", action="store_true",
                            help="run with --num-clients virtual clients on a local "
                                 "SuperLink in simulation mode instead of a deployment")
    simulation.add_argument("--num-clients", type=int, default=10,
                            help="number of virtual clients with --simulation (default: 10)")
    simulation.add_argument("--client-cpus", type=float, default=1.0,
                            help="CPUs reserved per virtual client in the Ray backend")
    simulation.add_argument("--verbose", action="store_true",
                            help="show Flower's log of the simulated run as it comes")
    _add_deployment_flags(parser)
    _add_run_config_flags(parser)
    return parser


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    given = {name: getattr(args, name) for name in RunConfig.model_fields
             if getattr(args, name, None) is not None}
    return RunConfig(**given)


def simulate(config: RunConfig, num_clients: int, client_cpus: float = 1.0,
             state_dir: Path = Path(DEFAULT_STATE_DIR), verbose: bool = False) -> int:
    """Run the app on a local SuperLink in simulation mode with ``num_clients`` virtual
    clients; returns the exit code (0: run completed)."""
    options = DeploymentOptions(
        security=choose_security(insecure=True, own_superlink=True),
        address=join_address("127.0.0.1", free_port()), state_dir=state_dir,
        simulation=Simulation(num_clients, client_cpus))
    with RunConsole(config, num_clients, state_dir.expanduser() / "run.log",
                    verbose=verbose) as console:
        code = deploy(config, options, echo=console.echo)
        console.finish(code)
    return code


_DEPLOYMENT_ONLY = ("address", "superlink", "insecure", "ssl_ca_certfile", "ssl_certfile",
                    "ssl_keyfile", "root_certificates", "enable_supernode_auth",
                    "supernode_public_key")


def deployment_options(args: argparse.Namespace) -> DeploymentOptions:
    """The deployment settings from the flags; raises DeploymentError on a bad choice."""
    security = choose_security(
        insecure=args.insecure, ssl_ca_certfile=args.ssl_ca_certfile,
        ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
        root_certificates=args.root_certificates,
        enable_supernode_auth=args.enable_supernode_auth,
        own_superlink=args.superlink is None)
    if args.superlink is not None and args.address is not None:
        raise DeploymentError("--address is where the SuperLink that flower-server "
                              "starts listens; it does not apply with --superlink")
    address = args.address or DEFAULT_ADDRESS
    split_address(args.superlink or address)
    keys = [Path(key).expanduser().resolve() for key in args.supernode_public_key]
    missing = [str(key) for key in keys if not key.is_file()]
    if missing:
        raise DeploymentError(f"--supernode-public-key: no such file {missing[0]}")
    if keys and security.insecure:
        raise DeploymentError("--supernode-public-key needs TLS and a SuperLink "
                              "with --enable-supernode-auth")
    return DeploymentOptions(
        security=security, address=address, superlink=args.superlink,
        state_dir=Path(args.state_dir), startup_timeout=args.startup_timeout,
        supernode_public_keys=keys)


def _terminate(signum, frame) -> None:  # SIGTERM: clean up like Ctrl-C
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = run_config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    if args.simulation:
        given = [name for name in _DEPLOYMENT_ONLY if getattr(args, name)]
        if given:
            parser.error(f"--{given[0].replace('_', '-')} is a deployment flag; it does not "
                         "apply with --simulation")
    else:
        try:
            options = deployment_options(args)
        except DeploymentError as err:
            parser.error(str(err))
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        code = (simulate(config, args.num_clients, args.client_cpus, Path(args.state_dir),
                         args.verbose)
                if args.simulation else deploy(config, options))
    except DeploymentError as err:
        say(f"error: {err}")
        code = 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    sys.exit(code)
