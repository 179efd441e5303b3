"""Fusion time against its compute floor, and peak memory, per model and number of clients.

Each case runs in a fresh process: warm up on two tiny models of the family, build K
models (independent seeds), reset the process's peak-RSS counter, fuse, then time in the
same process:

- the floor: per matched group, one (n x D) @ (D x n) product and one exact assignment
  (scipy) on the cost it gives, times the couplings the engine really needs: with two
  clients one; else one per sampled client and barycenter iteration, less the anchor's
  first (the identity), plus every client once more when only a sample moved the support;
- the same fusion again (``again``, the best of three), given the model's traced graph
  and with every import done, as in every round after a server's first (the strategy
  traces the model once);
- a plain weighted average of the same models.

It prints fusion / floor for both fusions, the goal being at most 1.5.
``--distill-cases`` also times the post-fusion distillation against its own floor: the
same number of Adam steps on batches of the same size, plus one teacher forward pass over
the synthetic set; and ``--lap-widths`` one exact assignment per layer width. Writes
``results/fusion_speed.json`` and ``results/fusion_speed.png`` beside this script.

    python benchmarks/fusion_speed.py                  # the issue's cases
    python benchmarks/fusion_speed.py --cases mlp:8 --distill-cases mlp:8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {
    "mlp": {"in_features": 784, "widths": (400, 200, 100)},
    "cnn": {"in_channels": 1, "image_size": 28},
    "vgg11": {"width_multiplier": 1.0, "in_channels": 3, "image_size": 32},
    "resnet18": {"width_multiplier": 1.0, "in_channels": 3, "image_size": 32},
    "vgg11_bn": {},
}
TINY = {"mlp": {"widths": (8, 4)}, "cnn": {"channels": (4, 8), "hidden": 8},
        "vgg11": {"width_multiplier": 0.05}, "resnet18": {"width_multiplier": 0.05},
        "vgg11_bn": {"width_multiplier": 0.05, "hidden": 16}}
DEFAULT_CASES = ["mlp:2", "mlp:8", "mlp:64", "vgg11:2", "resnet18:2", "resnet18:10",
                 "vgg11_bn:2"]
DEFAULT_DISTILL = ["mlp:8", "cnn:8"]


def vgg11_bn(width_multiplier: float = 1.0, hidden: int = 4096, num_classes: int = 10):
    """torchvision's VGG-11 with BatchNorm in its CIFAR layout: the zoo's convolutions
    (32x32 inputs pooled to 1x1) and a classifier of two ``hidden``-wide layers."""
    import torch
    from torch import nn

    from otfusion.zoo.vgg import VGG

    class VGG11BN(nn.Module):
        input_shape = (3, 32, 32)

        def __init__(self):
            super().__init__()
            features = VGG(width_multiplier=width_multiplier, batch_norm=True,
                           in_channels=3, image_size=32)
            self.features = features.features
            width = features.head.in_features
            self.classifier = nn.Sequential(
                nn.Flatten(), nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                nn.ReLU(), nn.Linear(hidden, num_classes))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.features(x))

    return VGG11BN()


def build(model: str, seed: int, **kwargs):
    """A zoo model, or this script's ``vgg11_bn`` through the zoo's import-path form."""
    from otfusion.zoo import build_model

    return build_model("fusion_speed:vgg11_bn" if model == "vgg11_bn" else model, seed=seed,
                       **kwargs)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def couplings_needed(clients: int, iterations: int, support_clients: int | None) -> int:
    """Transport problems the barycenter of one group must solve (see the docstring)."""
    if clients == 2:
        return 1
    sample = clients if support_clients is None else min(clients, support_clients)
    return iterations * sample - 1 + (clients if sample < clients else 0)


def fusion_floor(models, result, config) -> float:
    """Seconds of the floor: per matched group, one product and one assignment between
    two clients' own neuron rows, times :func:`couplings_needed`."""
    import torch

    from otfusion.fusion import traced_graph
    from otfusion.fusion.graph import is_recurrent
    from otfusion.fusion.projection import as_rows, dense_state
    from otfusion.fusion.transport import assignment

    graph = traced_graph(models[0])
    states = [dense_state(graph, m.state_dict()) for m in models[:2]]
    total = 0.0
    for group in graph.groups:
        if group.label not in result.group_iterations:
            continue
        a, b = (torch.cat([as_rows(state[spec.name], spec.neuron_axis,
                                   spec.axes[spec.neuron_axis])
                           for spec in graph.cost_tensors(group.id) if not is_recurrent(spec)],
                          dim=1) for state in states)
        start = time.perf_counter()
        cost = a.square().sum(1)[:, None] + b.square().sum(1)[None, :] - 2 * a @ b.T
        assignment(cost.numpy())
        once = time.perf_counter() - start
        total += once * couplings_needed(len(models), result.group_iterations[group.label],
                                         config.barycenter.support_clients)
    return total


def distillation_floor(student, teachers, moments, config) -> float:
    """Seconds of ``config.steps`` Adam steps on random batches (KL to fixed targets)
    plus one forward pass of every teacher over ``config.samples`` inputs."""
    import torch
    import torch.nn.functional as F

    inputs = moments.mean + torch.randn(config.samples, *moments.mean.shape)
    start = time.perf_counter()
    with torch.no_grad():
        targets = sum(F.softmax(t(inputs), dim=1) for t in teachers) / len(teachers)
    optimizer = torch.optim.Adam(student.parameters(), lr=config.lr)
    for _ in range(config.steps):
        index = torch.randint(0, len(inputs), (config.batch_size,))
        loss = F.kl_div(F.log_softmax(student(inputs[index]), dim=1), targets[index],
                        reduction="batchmean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def assignment_seconds(width: int, dim: int = 512, seed: int = 0) -> float:
    """Seconds of one exact assignment (the engine's, SciPy's solver) between two sets
    of ``width`` random Gaussian neurons of ``dim`` incoming weights: the part of a wide
    layer's fusion that grows fastest (cubically in the worst case)."""
    import torch

    from otfusion.fusion.transport import assignment

    generator = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(width, dim, generator=generator) for _ in range(2))
    cost = torch.cdist(a, b).square().numpy()
    start = time.perf_counter()
    assignment(cost)
    return time.perf_counter() - start


def _best_of(repeats: int, run) -> float:
    """The shortest of ``repeats`` timed calls of ``run()``, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def measure(model: str, clients: int, threads: int, distil: bool) -> dict:
    """Runs in the child process: one fusion of ``clients`` fresh models, its floor, the
    average, and (``distil``) the distillation against its floor."""
    import copy

    import torch

    from otfusion.fusion import FusionConfig, fuse_result, traced_graph
    from otfusion.fusion.distillation import distill
    from otfusion.fusion.moments import InputMoments

    torch.set_num_threads(threads)
    fuse_result([build(model, k, **{**MODELS[model], **TINY[model]}) for k in range(2)])
    models = [build(model, k, **MODELS[model]) for k in range(clients)]
    model_mib = sum(t.numel() * t.element_size() for m in models
                    for t in m.state_dict().values()) / 2**20
    config = FusionConfig()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter
    start = time.perf_counter()
    result = fuse_result(models, config=config)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    graph = traced_graph(models[0])  # a server traces once, before its first round
    again = _best_of(3, lambda: fuse_result(models, config=config, graph=graph))
    floor = fusion_floor(models, result, config)
    start = time.perf_counter()
    fuse_result(models, config=FusionConfig(method="average"))
    row = {"model": model, "K": clients, "seconds": seconds, "again": again, "floor": floor,
           "average": time.perf_counter() - start,
           "peak_above_mib": (peak - before) / 1024, "models_mib": model_mib,
           "iterations": max(result.group_iterations.values(), default=0)}
    if distil:
        shape = models[0].input_shape
        moments = InputMoments(torch.zeros(shape), torch.ones(shape))
        student = copy.deepcopy(result.model)
        torch.optim.Adam(student.parameters())  # its one-time imports, outside both timings
        start = time.perf_counter()
        distill(student, models, [1.0] * clients, moments, config.distillation)
        row["distill"] = time.perf_counter() - start
        row["distill_floor"] = distillation_floor(copy.deepcopy(result.model), models,
                                                  moments, config.distillation)
    return row


def run_case(case: str, threads: int, distil: bool) -> dict:
    model, clients = case.split(":")
    out = subprocess.run(
        [sys.executable, __file__, "--child", model, clients, str(threads), str(int(distil))],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    ax.bar([i - 0.2 for i in x], [r["seconds"] for r in rows], 0.4, label="fusion")
    ax.bar([i + 0.2 for i in x], [r["floor"] for r in rows], 0.4, label="floor")
    for i, r in enumerate(rows):
        ax.annotate(f"{r['seconds'] / r['floor']:.2f}x", (i, r["seconds"]), ha="center",
                    va="bottom", fontsize=8)
    ax.set_xticks(list(x), [f"{r['model']} K={r['K']}" for r in rows], fontsize=8)
    ax.set(ylabel="seconds", yscale="log", title="Fusion time against its floor")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=DEFAULT_CASES, help="MODEL:K")
    parser.add_argument("--distill-cases", nargs="*", default=DEFAULT_DISTILL, help="MODEL:K")
    parser.add_argument("--lap-widths", nargs="*", type=int, default=[512, 1024, 2048, 4096])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, clients, threads, distil = args.child
        print(json.dumps(measure(model, int(clients), int(threads), distil == "1")))
        return
    rows = []
    print(f"{'model':<9} {'K':>3} {'fuse (s)':>9} {'again (s)':>10} {'floor (s)':>10} "
          f"{'ratio':>6} {'again ratio':>12} {'average (s)':>12} {'peak above (MiB)':>17} "
          f"{'models (MiB)':>13} {'iters':>6}")
    for case in args.cases:
        row = run_case(case, args.threads, False)
        rows.append(row)
        print(f"{row['model']:<9} {row['K']:>3} {row['seconds']:>9.3f} {row['again']:>10.3f} "
              f"{row['floor']:>10.3f} {row['seconds'] / row['floor']:>6.2f} "
              f"{row['again'] / row['floor']:>12.2f} {row['average']:>12.3f} "
              f"{row['peak_above_mib']:>17.1f} {row['models_mib']:>13.1f} "
              f"{row['iterations']:>6}", flush=True)
    distilled = []
    if args.distill_cases:
        print(f"\n{'model':<9} {'K':>3} {'distil (s)':>11} {'floor (s)':>10} {'ratio':>6}")
    for case in args.distill_cases:
        row = run_case(case, args.threads, True)
        distilled.append(row)
        print(f"{row['model']:<9} {row['K']:>3} {row['distill']:>11.2f} "
              f"{row['distill_floor']:>10.2f} {row['distill'] / row['distill_floor']:>6.2f}",
              flush=True)
    lap = {}
    if args.lap_widths:
        print(f"\n{'width':>6} {'exact assignment (s)':>21}")
    for width in args.lap_widths:
        lap[width] = assignment_seconds(width)
        print(f"{width:>6} {lap[width]:>21.3f}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fusion_speed.json").write_text(json.dumps(
        {"fusion": rows, "distillation": distilled, "assignment": lap}, indent=1))
    if rows:
        plot(rows, RESULTS / "fusion_speed.png")
    print(f"wrote {RESULTS / 'fusion_speed.json'}" + (" and fusion_speed.png" if rows else ""))


if __name__ == "__main__":
    main()
