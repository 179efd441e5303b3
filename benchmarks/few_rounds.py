"""Few-round mode: test accuracy per communication round.

Three ways to spend R rounds on the same clients (digits, a Dirichlet split):

- ``OT, then FedAvg``: round 1 as in the one-shot setting (every client trains from its
  own seed), fused by OT (``FusionConfig()`` with the label-weighted head and the
  distillation from the clients' input moments, what ``OTFusion(ot_rounds="first")``
  does with the ClientApp's replies); later rounds start from the global model and are
  averaged.
- ``FedAvg from the same start``: the same round-1 clients, averaged, then FedAvg.
- ``FedAvg from scratch``: standard FedAvg, every client starts from the same model.

Rounds after the first train ``--local-epochs`` epochs. Prints the table, writes
``results/few_rounds.json`` and ``results/few_rounds.png``.

    python benchmarks/few_rounds.py --clients 8 --alpha 0.5 --rounds 5 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import replace
from pathlib import Path

import matplotlib
import torch

from otfusion.fusion import FusionConfig, fuse
from otfusion.task.data import label_counts, load_digits_dataset, partition
from otfusion.task.training import evaluate, recipe_for, train
from otfusion.tools.comparison import client_input_moments, train_clients
from otfusion.zoo import build_model

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMES = ("OT, then FedAvg", "FedAvg from the same start", "FedAvg from scratch")


def local_round(global_model, parts, recipe, seed: int, server_round: int):
    """Every client trains a copy of ``global_model`` on its data."""
    clients = []
    for k, data in enumerate(parts):
        client = copy.deepcopy(global_model)
        train(client, data, epochs=recipe.epochs, lr=recipe.lr, batch_size=recipe.batch_size,
              optimizer=recipe.optimizer, seed=seed * 1000 + 100 * server_round + k)
        clients.append(client)
    return clients


def run_seed(model: str, k: int, alpha: float, rounds: int, epochs: int, seed: int) -> dict:
    train_data, test = load_digits_dataset()
    parts = partition(train_data, k, "dirichlet", alpha=alpha, seed=seed)
    weights = [len(p) for p in parts]
    counts = [label_counts(p, 10).tolist() for p in parts]
    first = recipe_for(model)
    later = replace(first, epochs=epochs)
    average = FusionConfig(method="average")
    one_shot = train_clients(model, parts, first, seed=seed)
    start = {
        "OT, then FedAvg": fuse(one_shot, weights, FusionConfig(), class_weights=counts,
                                input_moments=client_input_moments(one_shot[0], parts)),
        "FedAvg from the same start": fuse(one_shot, weights, average),
        "FedAvg from scratch": fuse(local_round(build_model(model, seed=seed), parts, first,
                                                seed, 1), weights, average),
    }
    curves = {}
    for scheme, global_model in start.items():
        accuracies = [evaluate(global_model, test)[1]]
        for server_round in range(2, rounds + 1):
            clients = local_round(global_model, parts, later, seed, server_round)
            global_model = fuse(clients, weights, average)
            accuracies.append(evaluate(global_model, test)[1])
        curves[scheme] = accuracies
    return curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = [run_seed(args.model, args.clients, args.alpha, args.rounds, args.local_epochs, s)
            for s in args.seeds]
    mean = {scheme: [sum(run[scheme][r] for run in runs) / len(runs)
                     for r in range(args.rounds)] for scheme in SCHEMES}
    print(f"{args.model}, K={args.clients}, Dirichlet({args.alpha}), seeds {args.seeds}: "
          "mean test accuracy after each round")
    print(f"{'scheme':<28}" + "".join(f"{f'round {r + 1}':>10}" for r in range(args.rounds)))
    for scheme, values in mean.items():
        print(f"{scheme:<28}" + "".join(f"{v:>10.1%}" for v in values))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "few_rounds.json").write_text(json.dumps(
        {"settings": vars(args), "runs": runs, "mean": mean}, indent=1))
    fig, ax = plt.subplots(figsize=(6, 4))
    for scheme, values in mean.items():
        ax.plot(range(1, args.rounds + 1), values, marker="o", label=scheme)
    ax.set(xlabel="communication round", ylabel="test accuracy", ylim=(0, 1),
           title=f"{args.model}, K={args.clients}, Dirichlet({args.alpha})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "few_rounds.png", dpi=110)


if __name__ == "__main__":
    main()
