"""``flower-server``: run the server side of this Flower App.

Flower itself no longer has a ``flower-server`` command; this one runs the OT fusion
app. ``--simulation --num-clients N`` runs it in this process with N virtual clients on
Flower's simulation engine (Ray). Every run-config key of the app is a flag
(``--local-epochs 5``, ``--fusion-solver sinkhorn``, ...).
"""

from __future__ import annotations

import argparse
import os
import typing
from collections.abc import Sequence

from otfusion.server.config import RunConfig


def _add_run_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per run-config key, typed and with choices from :class:`RunConfig`."""
    group = parser.add_argument_group("run config (defaults from the app's pyproject)")
    for name, field in RunConfig.model_fields.items():
        if name == "strategy":
            continue
        flag = "--" + name.replace("_", "-")
        choices = typing.get_args(field.annotation) or None
        kind = field.annotation if choices is None else type(choices[0])
        group.add_argument(flag, type=kind, choices=choices, default=None, dest=name,
                           help=f"default: {field.default}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flower-server", description=__doc__)
    parser.add_argument("--strategy", choices=["otfusion", "fedavg"], default="otfusion",
                        help="otfusion: OT fusion of the clients' models; fedavg: weighted "
                             "averaging (default: otfusion)")
    parser.add_argument("--simulation", action="store_true",
                        help="run in this process with --num-clients virtual clients")
    parser.add_argument("--num-clients", type=int, default=10,
                        help="number of virtual clients with --simulation (default: 10)")
    parser.add_argument("--client-cpus", type=float, default=1.0,
                        help="CPUs reserved per virtual client in the Ray backend")
    _add_run_config_flags(parser)
    return parser


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    given = {name: getattr(args, name) for name in RunConfig.model_fields
             if getattr(args, name, None) is not None}
    return RunConfig(**given)


def simulate(config: RunConfig, num_clients: int, client_cpus: float = 1.0) -> None:
    """Run the app on Flower's simulation engine with ``num_clients`` virtual clients."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.simulation import run_simulation

    from otfusion.client.app import create_client_app
    from otfusion.server.app import create_server_app

    run_simulation(
        server_app=create_server_app(config),
        client_app=create_client_app(config),
        num_supernodes=num_clients,
        backend_config={"client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0}},
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = run_config_from_args(args)
    if not args.simulation:
        parser.error("deployment mode is not available yet: use --simulation, or run "
                     "'flwr run .' against your SuperLink")
    simulate(config, args.num_clients, args.client_cpus)
