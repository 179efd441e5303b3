"""Write demo client data for the compose stacks: one ``.npz`` per client.

    python docker/make_demo_data.py [--clients 3] [--out docker/data]

Splits the digits data that ships with scikit-learn (the app's default dataset: 64
features, labels 0..9, the input of the default ``mlp`` model) into ``--clients``
partitions and writes ``OUT/client1/data.npz``, ``OUT/client2/data.npz``, ... with the
arrays ``x``, ``y`` (training) and ``x_test``, ``y_test`` (that client's share of the
held-out split): the format a ClientApp reads from ``--node-config "data-path=..."``.
Real clients put their own file there instead. Needs this package installed.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from otfusion.task.data import PARTITIONERS, load_digits_dataset, partition

DEFAULT_OUT = Path(__file__).resolve().parent / "data"


def write_demo_data(out: Path, clients: int = 3, partitioner: str = "iid",
                    alpha: float = 0.5, seed: int = 0) -> list[Path]:
    """Write ``out/client{i}/data.npz`` for i = 1..clients; return the paths."""
    if clients < 1:
        raise ValueError(f"clients must be at least 1, got {clients}")
    train, test = load_digits_dataset(seed=seed)
    train_parts = partition(train, clients, partitioner, alpha=alpha, seed=seed)
    test_parts = partition(test, clients, "iid", seed=seed)
    paths = []
    for index, (part, held_out) in enumerate(zip(train_parts, test_parts, strict=True),
                                             start=1):
        folder = out / f"client{index}"
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o755)  # the containers' user (uid 49999) must read it
        path = folder / "data.npz"
        np.savez(path, x=part.x.numpy(), y=part.y.numpy(), x_test=held_out.x.numpy(),
                 y_test=held_out.y.numpy())
        os.chmod(path, 0o644)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=3,
                        help="number of clients (one folder each; default: 3)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="output folder (default: the data folder beside this script)")
    parser.add_argument("--partitioner", choices=PARTITIONERS, default="iid",
                        help="how the training split is divided (default: iid)")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="Dirichlet concentration for --partitioner dirichlet")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in write_demo_data(args.out, args.clients, args.partitioner, args.alpha,
                                args.seed):
        with np.load(path) as arrays:
            print(f"{path}: {len(arrays['y'])} training, {len(arrays['y_test'])} test samples")


if __name__ == "__main__":
    main()
