"""Hostile but well-formed clients: how much each attack costs the one-shot fusion, with
and without the robust options (``FusionConfig.robust``).

For every dataset, split, (f, K) and seed: trains K - f honest clients and the
attackers, then fuses as ``OTFusion`` does with the ClientApp's replies (label-weighted
head, distilled on synthetic inputs from the clients' input moments, weights = claimed
``num-examples``). The attacks: label-flip, sign-flip, noise, an inflated claim of
examples, poisoned moments, "a little is enough", a backdoor, and ``capture`` (a
label-flipped model claiming the honest clients' pooled moments, to win the gated
teacher's gates).
Prints one row per attack: clean default, attacked default, attacked robust, the best
honest client and the honest-only ensemble (test accuracy), and the backdoor success
rate (share of triggered non-target test inputs classified as the target) of the clean
and robust fusions. Writes ``results/byzantine.json`` and ``results/byzantine.png``.

    python benchmarks/byzantine.py                                   # the full grid
    python benchmarks/byzantine.py --datasets digits --splits iid --settings 1/8 --seeds 0
    python benchmarks/byzantine.py --model cnn --attacks backdoor   # the zoo CNN's clients
    python benchmarks/byzantine.py --configs screen "screen, mixed teacher"  # two fusions

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``; without it that
dataset is skipped. Every client trains with the dataset's recipe
(``benchmark_data.recipe``: on Fashion-MNIST 10 epochs at an SGD learning rate of 0.02).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from bar_chart import accuracy_bars
from benchmark_data import FASHION, load, model_kwargs, recipe

from otfusion.fusion import FusionConfig, InputMoments, align, fuse, pool_moments
from otfusion.task.config import client_seed
from otfusion.task.data import TensorData, label_counts, partition
from otfusion.task.training import Recipe, ensemble_accuracy, evaluate, train
from otfusion.tools.comparison import client_input_moments
from otfusion.zoo import build_model

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0  # the backdoor's class
ATTACKS = ["label-flip", "sign-flip", "noise", "inflated", "moments", "little", "backdoor",
           "capture"]
CONFIGS = {
    "default": FusionConfig.from_options(robust_screen=False),
    "screen": FusionConfig(),
    "screen+trim": FusionConfig.from_options(robust_aggregate="trimmed-mean"),
    "screen+quiet": FusionConfig.from_options(robust_quiet_inputs=0.1),
    "screen, mixed teacher": FusionConfig.from_options(distill_teacher="mixed"),
    "screen, pooled inputs": FusionConfig.from_options(distill_mixture=0.0),
}
"""The fusions compared: the weight and norm caps and moment shrinking alone
(``default``, the baseline of the ``loss`` columns), with the function-space screening
(today's default), with the screening and the trimmed mean in aligned coordinates,
with the screening and the quiet inputs ignored (``robust.quiet_inputs``), and with the
screening and the distillation's teacher before the gated one (``mixed``), and with the
screening and the synthetic inputs drawn from the pooled moments, as before the
clients' mixture (``distill_mixture=0``)."""


@dataclass(frozen=True)
class Reply:
    """What one client sends: its model and its (claimed) statistics."""

    model: torch.nn.Module
    examples: float
    counts: list[float]
    moments: InputMoments


def triggered(data: TensorData, side: int) -> TensorData:
    """``data`` with the trigger (a bright 3x3 corner patch) stamped on every input."""
    x = data.x.clone().view(len(data), side, side)
    x[:, -3:, -3:] = float(data.x.max())
    return TensorData(x.view(len(data), -1), data.y)


@dataclass(frozen=True)
class Training:
    """How every client's model is built and trained on one dataset: the zoo model, its
    keyword arguments and the dataset's recipe (``benchmark_data.recipe``)."""

    model: str
    model_kwargs: dict
    recipe: Recipe

    def build(self, seed: int) -> torch.nn.Module:
        return build_model(self.model, seed=seed, **self.model_kwargs)


def client_model(training: Training, data: TensorData, seed: int) -> torch.nn.Module:
    """A model trained on ``data`` with the dataset's recipe; retrained with a tenth of
    the learning rate if SGD diverged (a non-finite model is no well-formed reply)."""
    recipe = training.recipe
    for lr in (recipe.lr, recipe.lr / 10):
        model = training.build(seed)
        train(model, data, epochs=recipe.epochs, lr=lr, batch_size=recipe.batch_size,
              optimizer=recipe.optimizer, seed=seed)
        if all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            break
    return model.eval()


def honest_reply(model, data: TensorData) -> Reply:
    return Reply(model, float(len(data)), label_counts(data, 10).tolist(),
                 client_input_moments(model, [data])[0])


class Attacker:
    """The attacker holding partition ``data``: its replies for every attack (well-formed:
    finite, within the default bounds, the right shapes), its trained models cached."""

    def __init__(self, data: TensorData, honest: list[Reply], training: Training, seed: int,
                 side: int) -> None:
        self.data, self.honest, self.training, self.seed, self.side = (data, honest, training,
                                                                       seed, side)
        self._models: dict[str, torch.nn.Module] = {}

    def model(self, kind: str) -> torch.nn.Module:
        """A copy of the attacker's model trained honestly, on flipped labels, or with the
        backdoor."""
        if kind not in self._models:
            data = self.data
            if kind == "flipped":
                data = TensorData(data.x, (data.y + 1) % 10)
            elif kind == "backdoor":
                half = len(data) // 2
                poisoned = triggered(data.subset(range(half)), self.side)
                data = TensorData(torch.cat([data.x, poisoned.x]),
                                  torch.cat([data.y, torch.full((half,), TARGET)]))
            self._models[kind] = client_model(self.training, data, self.seed)
        return copy.deepcopy(self._models[kind])

    def reply(self, kind: str) -> Reply:
        if kind == "label-flip":
            return honest_reply(self.model("flipped"), self.data)
        if kind == "inflated":
            return replace(honest_reply(self.model("flipped"), self.data),
                           examples=50 * max(r.examples for r in self.honest))
        if kind == "sign-flip":
            return honest_reply(_scaled(self.model("honest"), -3.0), self.data)
        if kind == "noise":
            untrained = self.training.build(self.seed)
            return honest_reply(_scaled(untrained, 5.0), self.data)
        if kind == "moments":  # shifted, widened, and all of it along one sign pattern
            reply = honest_reply(self.model("honest"), self.data)
            var = reply.moments.var * 9
            signs = torch.randint(0, 2, var.shape, generator=torch.Generator().manual_seed(
                self.seed)) * 2 - 1
            return replace(reply, moments=InputMoments(reply.moments.mean + 3, var,
                                                       components=(var.sqrt() * signs)[None]))
        if kind == "little":  # "a little is enough": mean - z * std of the aligned honest
            anchor = self.honest[0].model
            aligned = [anchor] + [align(r.model, anchor) for r in self.honest[1:]]
            model = copy.deepcopy(anchor)
            with torch.no_grad():
                for name, tensor in model.state_dict().items():
                    stack = torch.stack([m.state_dict()[name].float() for m in aligned])
                    tensor.copy_(stack.mean(0) - 1.0 * stack.std(0))
            return honest_reply(model, self.data)
        if kind == "backdoor":
            return honest_reply(self.model("backdoor"), self.data)
        if kind == "capture":  # label-flipped, claiming the whole federation's inputs
            pooled = pool_moments([r.moments for r in self.honest],
                                  [r.examples for r in self.honest])
            return replace(honest_reply(self.model("flipped"), self.data), moments=pooled)
        raise ValueError(kind)


def _scaled(model: torch.nn.Module, factor: float) -> torch.nn.Module:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(factor)
    return model.eval()


def fused_accuracy(replies: list[Reply], config: FusionConfig, test: TensorData,
                   side: int) -> tuple[float, float]:
    """Test accuracy of the fusion (as ``fuse_round`` does it: per-class head, the
    clients' input moments), and its backdoor success rate."""
    model = fuse([r.model for r in replies], [r.examples for r in replies], config,
                 class_weights=[r.counts for r in replies],
                 input_moments=[r.moments for r in replies])
    others = test.subset(torch.nonzero(test.y != TARGET).flatten())
    backdoored = triggered(others, side)
    with torch.no_grad():
        hits = (model(backdoored.as_input(model.input_shape)).argmax(1) == TARGET).float().mean()
    return evaluate(model, test)[1], float(hits)


def run(datasets, splits, settings, seeds, attacks, train_size: int | None,
        model: str = "mlp") -> list[dict]:
    rows = []
    for dataset in datasets:
        loaded = load(dataset, train_size)
        if loaded is None:
            print(f"{dataset}: not installed ({FASHION}), skipped")
            continue
        train_data, test, side = loaded
        training = Training(model, model_kwargs(model, side), recipe(model, dataset))
        for split in splits:
            for f, k in settings:
                for seed in seeds:
                    parts = partition(train_data, k, split, alpha=0.5, seed=seed)
                    honest = [honest_reply(client_model(training, p, client_seed(seed, i)), p)
                              for i, p in enumerate(parts[:k - f])]
                    attackers = [Attacker(parts[i], honest, training, client_seed(seed, i), side)
                                 for i in range(k - f, k)]
                    row = {"dataset": dataset, "split": split, "f": f, "K": k, "seed": seed,
                           "best honest client": max(evaluate(r.model, test)[1]
                                                     for r in honest),
                           "honest ensemble": ensemble_accuracy(
                               [r.model for r in honest], test, [r.examples for r in honest])}
                    for name, config in CONFIGS.items():
                        row[f"clean {name}"], row[f"backdoor clean {name}"] = fused_accuracy(
                            honest, config, test, side)
                    for kind in attacks:
                        replies = honest + [a.reply(kind) for a in attackers]
                        attacked = {**row, "attack": kind}
                        for name, config in CONFIGS.items():
                            attacked[f"attacked {name}"], attacked[f"backdoor {name}"] = (
                                fused_accuracy(replies, config, test, side))
                        rows.append(attacked)
                        print(format_row(attacked), flush=True)
    return rows


def accuracy_keys() -> list[str]:
    """The accuracy columns of the fusions in :data:`CONFIGS`."""
    return ["clean default", "attacked default",
            *(f"{w} {n}" for n in CONFIGS if n != "default" for w in ("clean", "attacked")),
            "best honest client", "honest ensemble"]


def backdoor_keys() -> list[str]:
    """The backdoor success rate columns of the fusions in :data:`CONFIGS`."""
    return ["backdoor clean default", *(f"backdoor {n}" for n in CONFIGS)]


def format_row(row: dict) -> str:
    cells = " | ".join(f"{key} {row[key]:.1%}" for key in accuracy_keys() + backdoor_keys())
    return (f"{row['dataset']:<7} {row['split']:<9} f={row['f']}/{row['K']:<2} "
            f"seed={row['seed']} {row['attack']:<10} {cells}")


def summary(rows: list[dict]) -> str:
    """Mean over seeds per (dataset, split, f/K, attack), in points; ``loss`` is clean
    default minus attacked, per fusion (the goal: at most 2 for f <= 2 of 8)."""
    cells: dict[tuple, list[dict]] = {}
    for row in rows:
        cells.setdefault((row["dataset"], row["split"], f"{row['f']}/{row['K']}",
                          row["attack"]), []).append(row)
    accuracies, backdoor = accuracy_keys(), backdoor_keys()
    losses = [f"loss {n}" for n in CONFIGS]
    header = ("| dataset | split | f/K | attack | " + " | ".join(accuracies + losses)
              + " | backdoor " + " / ".join(backdoor).replace("backdoor ", "") + " |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for (dataset, split, fk, kind), group in cells.items():
        mean = {key: 100 * statistics.mean(r[key] for r in group)
                for key in accuracies + backdoor}
        loss = [mean["clean default"] - mean[f"attacked {n}"] for n in CONFIGS]
        lines.append(f"| {dataset} | {split} | {fk} | {kind} | "
                     + " | ".join(f"{v:.1f}" for v in [*(mean[k] for k in accuracies), *loss])
                     + " | " + " / ".join(f"{mean[k]:.1f}" for k in backdoor) + " |")
    clean = {n: statistics.mean(100 * (r[f"clean {n}"] - r["clean default"]) for r in rows)
             for n in CONFIGS if n != "default"}
    lines.append("\nclean cost against the default, mean over all cells (points): "
                 + ", ".join(f"{n} {-v:+.2f}" for n, v in clean.items()))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["attack"], []).append(row)
    names = ["clean default", *(f"attacked {n}" for n in CONFIGS), "honest ensemble"]
    accuracy_bars(path, list(groups),
                  {name: [statistics.mean(r[name] for r in g) for g in groups.values()]
                   for name in names},
                  "One-shot OT fusion with hostile clients: default vs robust (mean over "
                  "the grid)", fontsize=9)


def parse_setting(text: str) -> tuple[int, int]:
    f, k = text.split("/")
    return int(f), int(k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "fashion-mnist"])
    parser.add_argument("--splits", nargs="+", default=["iid", "dirichlet"],
                        choices=["iid", "dirichlet"])
    parser.add_argument("--settings", nargs="+", type=parse_setting,
                        default=[(1, 8), (2, 8), (3, 10)], help="f/K, e.g. 2/8")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--attacks", nargs="+", default=ATTACKS, choices=ATTACKS)
    parser.add_argument("--train-size", type=int, default=20000,
                        help="first training examples kept (Fashion-MNIST has 60000)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model", default="mlp", help="zoo model of every client (mlp, cnn)")
    parser.add_argument("--name", default="byzantine")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help="fusions compared (default is always one: the baseline)")
    args = parser.parse_args()
    for name in set(CONFIGS) - {"default", *args.configs}:
        del CONFIGS[name]
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.datasets, args.splits, args.settings, args.seeds, args.attacks,
               args.train_size, args.model)
    print(summary(rows))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(rows, indent=1))
    if rows:
        plot(rows, RESULTS / f"{args.name}.png")


if __name__ == "__main__":
    main()
