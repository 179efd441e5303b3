"""The ``otfusion`` command: operator tools around the fusion engine."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import replace

from rich.console import Console
from rich.table import Table

from otfusion.client.data import label_counts, load_digits_dataset, partition
from otfusion.client.training import recipe_for
from otfusion.zoo import available_models

from .oneshot import DEFAULT_METHODS, compare, train_clients


def _demo(args: argparse.Namespace) -> None:
    console = Console()
    train_data, test_data = load_digits_dataset(seed=args.seed)
    parts = partition(train_data, args.clients, args.partitioner, alpha=args.alpha,
                      seed=args.seed)
    console.print(
        f"[bold]One-shot fusion demo[/]: {args.clients} '{args.model}' clients on "
        f"scikit-learn digits ({args.partitioner} split, sizes {[len(p) for p in parts]}), "
        "each from its own initialisation."
    )
    recipe = recipe_for(args.model)
    overrides = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size}
    recipe = replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    with console.status(f"training clients ({recipe})"):
        clients = train_clients(args.model, parts, recipe, seed=args.seed)
    weights = [float(label_counts(p).sum()) for p in parts]
    with console.status("fusing"):
        result = compare(clients, weights, test_data, DEFAULT_METHODS)
    table = Table(title=f"test accuracy on {len(test_data)} held-out digits")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    table.add_column("fusion time", justify="right")
    for name, accuracy in result.rows():
        seconds = result.seconds.get(name)
        table.add_row(name, f"{accuracy:.2%}", "" if seconds is None else f"{seconds:.3f} s")
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="otfusion", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train clients on the embedded digits data, fuse them, print a table"
    )
    demo.add_argument("--model", default="mlp", choices=available_models())
    demo.add_argument("--clients", type=int, default=8)
    demo.add_argument("--partitioner", default="iid",
                      choices=["iid", "dirichlet", "pathological"])
    demo.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    demo.add_argument("--epochs", type=int, help="default: the model's training recipe")
    demo.add_argument("--lr", type=float, help="default: the model's training recipe")
    demo.add_argument("--batch-size", type=int, help="default: the model's training recipe")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)
