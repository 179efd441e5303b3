"""``flower-client``: join a federation of this app with your own data.

Starts a Flower SuperNode (``flower-supernode``, which replaces this process) that
connects to the SuperLink of ``flower-server`` and runs this app's ClientApp on this
machine's data: ``--data FILE.npz`` (arrays ``x``, ``y`` and optionally ``x_test``,
``y_test``), or a partition of the embedded digits data for tests and demos. The
installed ``flwr-otfusion`` package provides the ClientApp; nothing is downloaded.

Transport security is an explicit choice: ``--insecure``, or ``--root-certificates CA``
(the CA that signed the SuperLink's certificate). Each SuperNode on one machine needs
its own ``--port``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from otfusion.deploy.addresses import split_address
from otfusion.deploy.errors import DeploymentError
from otfusion.deploy.processes import child_env, executable

DEFAULT_PORT = 9094


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flower-client", description=__doc__.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--superlink", required=True, metavar="HOST:PORT",
                        help="the SuperLink of flower-server (its --address, with the server "
                             "machine's name or IP)")
    security = parser.add_mutually_exclusive_group(required=True)
    security.add_argument("--insecure", action="store_true",
                          help="no TLS (only if flower-server runs with --insecure)")
    security.add_argument("--root-certificates", metavar="CA",
                          help="TLS: the CA certificate (PEM) that signed the SuperLink's "
                               "certificate")
    data = parser.add_argument_group("data (one of)")
    data.add_argument("--data", metavar="FILE.npz",
                      help="this client's own data: arrays x, y and optionally x_test, y_test")
    data.add_argument("--partition-id", type=int, metavar="I",
                      help="train on partition I of the embedded digits data ...")
    data.add_argument("--num-partitions", type=int, metavar="N",
                      help="... split into N partitions (demos and tests)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="port of this SuperNode's local runtime API; every SuperNode on "
                             f"one machine needs its own (default: {DEFAULT_PORT})")
    parser.add_argument("--host", default="127.0.0.1",
                        help="host of the runtime API (default: 127.0.0.1)")
    parser.add_argument("--auth-supernode-private-key", metavar="KEY",
                        help="private key (OpenSSH ECDSA) whose public key the server "
                             "registered, when the SuperLink runs with --enable-supernode-auth")
    return parser


def _file(path: str, flag: str) -> Path:
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise DeploymentError(f"{flag} {path}: no such file")
    return resolved


def _check_npz(path: Path) -> None:
    import numpy as np

    try:
        with np.load(path) as arrays:
            missing = {"x", "y"} - set(arrays.files)
    except (OSError, ValueError) as err:
        raise DeploymentError(f"--data {path}: not a readable .npz file ({err})") from None
    if missing:
        raise DeploymentError(f"--data {path} lacks the arrays {sorted(missing)}")


def node_config(args: argparse.Namespace) -> str:
    """The SuperNode's ``--node-config``: ``data-path`` or the partition of the digits."""
    partition = (args.partition_id, args.num_partitions)
    if args.data is not None:
        if partition != (None, None):
            raise DeploymentError("give either --data or --partition-id/--num-partitions")
        path = _file(args.data, "--data")
        if "'" in str(path):
            raise DeploymentError(f"--data {path}: the path must not contain a quote (')")
        _check_npz(path)
        return f"data-path='{path}'"
    if None in partition:
        raise DeploymentError("give --data FILE.npz, or --partition-id I with --num-partitions N")
    index, count = partition
    if not 0 <= index < count:
        raise DeploymentError(f"--partition-id must be in 0..{count - 1}, got {index}")
    return f"partition-id={index} num-partitions={count}"


def supernode_command(args: argparse.Namespace) -> list[str]:
    split_address(args.superlink)
    command = [executable("flower-supernode"), "--superlink", args.superlink]
    if args.insecure:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(_file(args.root_certificates,
                                                     "--root-certificates"))]
    if args.auth_supernode_private_key:
        command += ["--auth-supernode-private-key",
                    str(_file(args.auth_supernode_private_key, "--auth-supernode-private-key"))]
    command += ["--node-config", node_config(args), "--host", args.host,
                "--port", str(args.port)]
    return command


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        command = supernode_command(args)
    except DeploymentError as err:
        parser.error(str(err))
    print("flower-client: " + " ".join(command), file=sys.stderr, flush=True)
    os.execve(command[0], command, child_env())
