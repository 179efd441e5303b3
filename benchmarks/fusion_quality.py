"""Fusion quality on the embedded digits data: clients, FedAvg, OT fusion, ensemble.

For every model, number of clients K and data split, trains K clients from their own
initialisations, fuses them with every method, and prints one table row of test
accuracies. Writes ``results/fusion_quality.json`` and ``results/fusion_quality.png``
beside this script.

    python benchmarks/fusion_quality.py                       # the full grid
    python benchmarks/fusion_quality.py --models mlp --clients 4 --no-sinkhorn
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import torch

from otfusion.client.data import load_digits_dataset, partition
from otfusion.client.training import recipe_for
from otfusion.server.oneshot import compare, train_clients
from otfusion.strategies.fusion import FusionConfig

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RECURRENT = {"rnn", "lstm", "gru"}


def methods_for(model: str, sinkhorn: bool) -> dict[str, FusionConfig]:
    methods = {"vanilla average": FusionConfig(method="average"), "OT exact": FusionConfig()}
    if sinkhorn:
        methods["OT sinkhorn"] = FusionConfig(solver="sinkhorn")
    if model in RECURRENT:
        methods["OT exact + GW"] = FusionConfig(method="gromov-wasserstein")
    return methods


def run(models, clients, splits, seeds, sinkhorn: bool) -> list[dict]:
    train, test = load_digits_dataset()
    rows = []
    for model in models:
        for split, alpha in splits:
            for k in clients:
                for seed in seeds:
                    parts = partition(train, k, split, alpha=alpha, seed=seed)
                    trained = train_clients(model, parts, recipe_for(model), seed=seed)
                    result = compare(trained, [len(p) for p in parts], test,
                                     methods_for(model, sinkhorn))
                    row = {"model": model, "split": f"{split}" + (f"({alpha})" if alpha else ""),
                           "K": k, "seed": seed, **dict(result.rows()),
                           **{f"{name} seconds": s for name, s in result.seconds.items()}}
                    rows.append(row)
                    print(format_row(row), flush=True)
    return rows


def format_row(row: dict) -> str:
    accuracies = [f"{key} {value:.1%}" for key, value in row.items()
                  if isinstance(value, float) and not key.endswith("seconds")]
    return f"{row['model']:<6} {row['split']:<15} K={row['K']:<2} seed={row['seed']}  " + \
        " | ".join(accuracies)


def plot(rows: list[dict], path: Path) -> None:
    names = [k for k in rows[0] if isinstance(rows[0][k], float) and not k.endswith("seconds")]
    names = [n for n in names if all(n in r for r in rows)]
    labels = [f"{r['model']}\n{r['split']}\nK={r['K']}" for r in rows]
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.9), 4.5))
    for i, name in enumerate(names):
        ax.bar([x + i * width for x in range(len(rows))], [r[name] for r in rows], width,
               label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], labels, fontsize=7)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=3)
    ax.set_title("One-shot fusion of clients trained from different initialisations (digits)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "lstm"])
    parser.add_argument("--clients", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--splits", nargs="+", default=["iid", "dirichlet:0.5"],
                        help="iid, dirichlet:ALPHA or pathological")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--no-sinkhorn", action="store_true", help="skip the slow solver")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    splits = [(s.split(":")[0], float(s.split(":")[1]) if ":" in s else None)
              for s in args.splits]
    rows = run(args.models, args.clients, splits, args.seeds, not args.no_sinkhorn)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fusion_quality.json").write_text(json.dumps(rows, indent=1))
    plot(rows, RESULTS / "fusion_quality.png")
    print(f"wrote {RESULTS / 'fusion_quality.json'} and fusion_quality.png")


if __name__ == "__main__":
    main()
