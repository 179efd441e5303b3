"""Fusion quality on real images: clients, FedAvg, OT fusion, ensemble.

For every model, number of clients K and data split, trains K clients from their own
initialisations, fuses them with every method, and prints one table row of test
accuracies. Writes ``results/fusion_quality.json`` and ``results/fusion_quality.png``
beside this script (``--name`` changes the stem).

    python benchmarks/fusion_quality.py                       # the full grid
    python benchmarks/fusion_quality.py --models mlp --clients 4 --no-sinkhorn
    python benchmarks/fusion_quality.py --models mlp --seeds 0 1 2 --threads 1
    python benchmarks/fusion_quality.py --dataset fashion-mnist --models cnn --clients 5

The data is scikit-learn's 8x8 digits (``--dataset digits``, the default) or 28x28
Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (skipped with a message
where it is not installed), its training set cut to ``--train-size`` examples.

With several seeds, a summary table gives every accuracy as mean ± standard deviation
over the seeds, and ``gap closed``: (OT - vanilla average) / (ensemble - vanilla
average) of the default fusion, the issue's target being >= 90%.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from bar_chart import accuracy_bars
from benchmark_data import DATASETS, FASHION, load, model_kwargs, recipe

from otfusion.fusion import FusionConfig
from otfusion.task.data import label_counts, partition
from otfusion.tools.comparison import Method, client_input_moments, compare, train_clients

RESULTS = Path(__file__).resolve().parent / "results"
RECURRENT = {"rnn", "lstm", "gru"}


DEFAULT = "OT default"
PAPER = FusionConfig.from_options(neuron_weights="uniform", rescale="none")
TEACHERS = {name: FusionConfig.from_options(distill_teacher=teacher)
            for name, teacher in (("OT mean teacher", "mean"),
                                  ("OT class-weighted teacher", "class-weighted"))}


def methods_for(model: str, sinkhorn: bool) -> dict[str, Method]:
    """Vanilla average; the paper's exact OT (uniform neuron weights, no rescaling, head
    weighted by the client weights); the same with the head weighted per class by the
    clients' label counts; the data-free engine defaults (``FusionConfig()``: neurons
    weighted by their squared outgoing norm, norm rescaling) with the label-weighted
    head; the default, the same distilled on synthetic inputs from the clients' input
    moments, which is what ``OTFusion`` does with the ClientApp's replies; and, to show
    what the optimal transport adds, the vanilla average distilled the same way; and the
    default with the other teachers instead of the mixed one: the plain mean of the
    clients' probabilities and the class-weighted ensemble (``distill_teacher``)."""
    methods = {
        "vanilla average": Method(FusionConfig(method="average")),
        "OT paper": Method(PAPER),
        "OT paper + labels": Method(PAPER, label_weighted=True),
        "OT data-free": Method(FusionConfig(), label_weighted=True),
        DEFAULT: Method(FusionConfig(), label_weighted=True, distilled=True),
        "average + distill": Method(FusionConfig(method="average"), distilled=True),
        **{name: Method(config, label_weighted=True, distilled=True)
           for name, config in TEACHERS.items()},
    }
    if sinkhorn:
        methods["OT sinkhorn + labels"] = Method(FusionConfig.from_options(solver="sinkhorn"), True)
    if model in RECURRENT:
        methods["OT GW + labels"] = Method(FusionConfig(method="gromov-wasserstein"), True)
    return methods


def run(models, clients, splits, seeds, methods: Callable[[str], dict[str, Method]],
        class_moments: bool, dataset: str, train, test, side: int) -> list[dict]:
    """One row per (model, split, K, seed): the clients trained on their partitions and
    fused with every method of ``methods(model)``."""
    rows = []
    for model in models:
        for split, alpha in splits:
            for k in clients:
                for seed in seeds:
                    parts = partition(train, k, split, alpha=alpha, seed=seed)
                    trained = train_clients(model, parts, recipe(model, dataset), seed=seed,
                                            **model_kwargs(model, side))
                    counts = [label_counts(p, 10).tolist() for p in parts]
                    result = compare(trained, [len(p) for p in parts], test,
                                     methods(model), counts,
                                     client_input_moments(trained[0], parts, class_moments))
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


def accuracy_keys(row: dict) -> list[str]:
    return [k for k, v in row.items() if isinstance(v, float) and not k.endswith("seconds")]


def summary(rows: list[dict]) -> str:
    """One line per (model, split, K): every accuracy as mean ± std over the seeds, and
    the share of the average-to-ensemble gap that the default fusion closes."""
    cells: dict[tuple, list[dict]] = {}
    for row in rows:
        cells.setdefault((row["model"], row["split"], row["K"]), []).append(row)
    lines = []
    for (model, split, k), group in cells.items():
        parts = []
        for key in accuracy_keys(group[0]):
            values = [r[key] for r in group]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            parts.append(f"{key} {statistics.mean(values):.1%}±{spread:.1%}")
        if DEFAULT in group[0] and "vanilla average" in group[0]:
            gaps = [(r[DEFAULT] - r["vanilla average"]) / max(
                r["ensemble"] - r["vanilla average"], 1e-9) for r in group]
            parts.append(f"gap closed {statistics.mean(gaps):.0%}")
        lines.append(f"{model:<6} {split:<15} K={k:<2} seeds={len(group)}  " + " | ".join(parts))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, dataset: str) -> None:
    names = [k for k in rows[0] if isinstance(rows[0][k], float) and not k.endswith("seconds")]
    names = [n for n in names if all(n in r for r in rows)]
    accuracy_bars(path, [f"{r['model']}\n{r['split']}\nK={r['K']}" for r in rows],
                  {name: [r[name] for r in rows] for name in names},
                  f"One-shot fusion of clients trained from different initialisations "
                  f"({dataset})")


def grid_arguments(description: str, name: str) -> argparse.ArgumentParser:
    """The options of a grid of (model, split, K, seed) cells on one dataset."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "lstm"])
    parser.add_argument("--clients", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--splits", nargs="+",
                        default=["iid", "dirichlet:0.5", "dirichlet:0.1"],
                        help="iid, dirichlet:ALPHA or pathological")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--dataset", default="digits", choices=DATASETS)
    parser.add_argument("--class-moments", action="store_true",
                        help="the clients send their input moments per class too "
                             "(send-class-moments): synthetic inputs drawn class by class")
    parser.add_argument("--train-size", type=int, default=20000,
                        help="first training examples kept (Fashion-MNIST has 60000)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default=name, help="stem of the result files under results/")
    return parser


def run_grid(args: argparse.Namespace, methods: Callable[[str], dict[str, Method]]
             ) -> list[dict]:
    """Run the grid of ``args`` (:func:`grid_arguments`) with ``methods``, print its rows
    and summary, write the JSON and the plot, and return the rows (none when the
    dataset is not installed)."""
    torch.set_num_threads(args.threads)
    splits = [(s.split(":")[0], float(s.split(":")[1]) if ":" in s else None)
              for s in args.splits]
    loaded = load(args.dataset, args.train_size)
    if loaded is None:
        print(f"{args.dataset}: not installed ({FASHION}), skipped")
        return []
    rows = run(args.models, args.clients, splits, args.seeds, methods, args.class_moments,
               args.dataset, *loaded)
    print("\nmean ± std over seeds " + " ".join(map(str, args.seeds)))
    print(summary(rows))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(rows, indent=1))
    plot(rows, RESULTS / f"{args.name}.png", args.dataset)
    print(f"wrote {RESULTS / args.name}.json and {args.name}.png")
    return rows


def main() -> None:
    parser = grid_arguments(__doc__.splitlines()[0], "fusion_quality")
    parser.add_argument("--no-sinkhorn", action="store_true", help="skip the slow solver")
    args = parser.parse_args()
    run_grid(args, lambda model: methods_for(model, not args.no_sinkhorn))


if __name__ == "__main__":
    main()
