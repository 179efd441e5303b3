"""Linear mode connectivity against width on the embedded digits: loss and accuracy
barriers between independently trained models, before and after OT alignment.

For an MLP (two hidden layers of 32*m units) and the zoo CNN (channels 4*m and 8*m,
hidden 16*m) at width multipliers m = 1, 2, 4, 8, trains ``--models`` networks per width
from different seeds (own initialisation and batch order, same data: the digits training
split) with the model's training recipe, and for every pair (a, b) of them measures the
barriers along the segment from a to b and from a to ``align(b, a)`` (exact OT on the
weights), at ``--steps`` points, on the test split (loss and accuracy) and on the
training split (loss). Akash et al. (2022) report that the barrier after alignment
shrinks as the width grows. Barriers follow ``otfusion.tools.lmc``: max over t of the
excess over the straight line between the endpoints, positive when the path is worse.

Prints a table (mean over pairs), writes ``results/lmc.json`` (every pair, with its
curves) and ``results/lmc.png`` beside this script. The default grid (3 models, so 3
pairs, per width; the recipes' 30 epochs of SGD) takes about 6 minutes on 2 busy cores
with one torch thread; ``--epochs`` and ``--multipliers`` make it shorter.

    python benchmarks/lmc.py
    python benchmarks/lmc.py --archs mlp --multipliers 1 4 --models 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import replace
from pathlib import Path

import matplotlib
import torch

from otfusion.fusion import FusionConfig, align
from otfusion.task.data import load_digits_dataset
from otfusion.task.training import recipe_for
from otfusion.tools.comparison import train_clients
from otfusion.tools.lmc import interpolation_curve

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def model_kwargs(arch: str, m: int) -> dict:
    if arch == "mlp":
        return {"widths": (32 * m, 32 * m)}
    return {"channels": (4 * m, 8 * m), "hidden": 16 * m}


def train_models(arch: str, m: int, count: int, train_data, epochs: int | None):
    """``count`` models trained on ``train_data``, model k from seed k."""
    recipe = recipe_for(arch)
    if epochs is not None:
        recipe = replace(recipe, epochs=epochs)
    return train_clients(arch, [train_data] * count, recipe, **model_kwargs(arch, m)), recipe


def measure(arch: str, m: int, args, train_data, test_data) -> list[dict]:
    start = time.perf_counter()
    models, recipe = train_models(arch, m, args.models, train_data, args.epochs)
    rows = []
    for i, j in itertools.combinations(range(len(models)), 2):
        a, b = models[i], models[j]
        aligned = align(b, a, FusionConfig(cost="weights"))
        row = {"arch": arch, "multiplier": m, "kwargs": model_kwargs(arch, m),
               "params": sum(p.numel() for p in a.parameters()), "epochs": recipe.epochs,
               "seeds": [i, j]}
        for label, end in (("before", b), ("after", aligned)):
            test = interpolation_curve(a, end, test_data, args.steps)
            train_curve = interpolation_curve(a, end, train_data, args.steps)
            row[label] = {"test": test.as_dict(), "train": train_curve.as_dict()}
        rows.append(row)
    print(f"{arch} x{m}: {len(rows)} pairs in {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def _mean(rows: list[dict], *path: str) -> float:
    values = []
    for row in rows:
        value = row
        for key in path:
            value = value[key]
        values.append(value)
    return sum(values) / len(values)


def summary(rows: list[dict]) -> list[dict]:
    """One line per (arch, multiplier): barriers averaged over the pairs."""
    lines = []
    for key, group in itertools.groupby(rows, key=lambda r: (r["arch"], r["multiplier"])):
        group = list(group)
        line = {"arch": key[0], "multiplier": key[1], "params": group[0]["params"],
                "pairs": len(group),
                "accuracy": _mean(group, "before", "test", "accuracy", 0) / 2
                + _mean(group, "before", "test", "accuracy", -1) / 2}
        for label in ("before", "after"):
            line[f"test loss barrier {label}"] = _mean(group, label, "test", "loss_barrier")
            line[f"test acc barrier {label}"] = _mean(group, label, "test", "accuracy_barrier")
            line[f"train loss barrier {label}"] = _mean(group, label, "train", "loss_barrier")
        lines.append(line)
    return lines


def format_table(lines: list[dict]) -> str:
    columns = ("test loss barrier", "test acc barrier", "train loss barrier")
    header = f"{'model':<5} {'width':>5} {'params':>8} {'acc':>6}" + "".join(
        f" | {name:^18}" for name in columns)
    out = [header, " " * 27 + " | before -> after   " * len(columns), "-" * len(header)]
    for line in lines:
        cells = []
        for name in columns:
            spec = ".1%" if "acc" in name else ".3f"
            before, after = line[f"{name} before"], line[f"{name} after"]
            cells.append(f" | {format(before, spec):>6} -> {format(after, spec):<8}")
        out.append(f"{line['arch']:<5} {'x' + str(line['multiplier']):>5} {line['params']:>8} "
                   f"{line['accuracy']:>6.1%}" + "".join(cells))
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    metrics = (("loss_barrier", "test loss barrier"), ("accuracy_barrier", "test accuracy barrier"))
    for ax, (metric, title) in zip(axes, metrics, strict=True):
        for arch in sorted({r["arch"] for r in rows}):
            for label, style in (("before", "--"), ("after", "-")):
                points = {}
                for r in rows:
                    if r["arch"] == arch:
                        points.setdefault(r["multiplier"], []).append(r[label]["test"][metric])
                widths = sorted(points)
                means = [sum(points[m]) / len(points[m]) for m in widths]
                low = [mean - min(points[m]) for mean, m in zip(means, widths, strict=True)]
                high = [max(points[m]) - mean for mean, m in zip(means, widths, strict=True)]
                ax.errorbar(widths, means, yerr=[low, high], linestyle=style, marker="o",
                            capsize=3, label=f"{arch} {label} alignment")
        ax.set_xscale("log", base=2)
        multipliers = sorted({r["multiplier"] for r in rows})
        ax.set_xticks(multipliers, [f"x{m}" for m in multipliers])
        ax.set(xlabel="width multiplier", ylabel=title, title=f"{title} (mean, min-max)")
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.legend(fontsize=7)
    fig.suptitle("Linear mode connectivity of independently trained models (digits)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--multipliers", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--models", type=int, default=3, help="models per width (all pairs)")
    parser.add_argument("--epochs", type=int, help="default: the model's training recipe")
    parser.add_argument("--steps", type=int, default=11, help="points on each segment")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_data, test_data = load_digits_dataset()
    start = time.perf_counter()
    rows = [row for arch in args.archs for m in args.multipliers
            for row in measure(arch, m, args, train_data, test_data)]
    lines = summary(rows)
    print(format_table(lines))
    print(f"total {time.perf_counter() - start:.0f} s")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lmc.json").write_text(json.dumps({"summary": lines, "pairs": rows}, indent=1))
    plot(rows, RESULTS / "lmc.png")
    print(f"wrote {RESULTS / 'lmc.json'} and lmc.png")


if __name__ == "__main__":
    main()
