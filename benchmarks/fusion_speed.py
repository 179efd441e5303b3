"""Fusion time and peak memory against the number of clients.

Each measurement runs in a fresh process: warm up on two tiny models of the family,
build K models (independent seeds), reset the process's peak-RSS counter, fuse, and
report the wall time and the peak RSS above the RSS before fusing, next to a plain
weighted average of the same models. Writes
``results/fusion_speed.json`` and ``results/fusion_speed.png`` beside this script.

    python benchmarks/fusion_speed.py                 # mlp K=2..64, resnet18 K=2..10
    python benchmarks/fusion_speed.py --cases mlp:8
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
    "resnet18": {"width_multiplier": 1.0, "in_channels": 3, "image_size": 32},
}
TINY = {"mlp": {"widths": (8, 4)}, "resnet18": {"width_multiplier": 0.05}}
DEFAULT_CASES = [f"mlp:{k}" for k in (2, 4, 8, 16, 32, 64)] + \
    [f"resnet18:{k}" for k in (2, 4, 6, 8, 10)]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(model: str, clients: int, method: str, threads: int) -> dict:
    """Runs in the child process: one fusion of ``clients`` fresh models."""
    import torch

    from otfusion.fusion import FusionConfig, fuse_result
    from otfusion.zoo import build_model

    torch.set_num_threads(threads)
    tiny = {**MODELS[model], **TINY[model]}
    fuse_result([build_model(model, seed=k, **tiny) for k in range(2)])  # one-time warm-up
    models = [build_model(model, seed=k, **MODELS[model]) for k in range(clients)]
    model_mib = sum(t.numel() * t.element_size() for m in models
                    for t in m.state_dict().values()) / 2**20
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter
    start = time.perf_counter()
    result = fuse_result(models, config=FusionConfig(method=method))
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return {"model": model, "K": clients, "method": method, "seconds": seconds,
            "peak_above_mib": (peak - before) / 1024, "models_mib": model_mib,
            "iterations": max(result.group_iterations.values(), default=0)}


def run_case(case: str, method: str, threads: int) -> dict:
    model, clients = case.split(":")
    out = subprocess.run(
        [sys.executable, __file__, "--child", model, clients, method, str(threads)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for method in ("wasserstein", "average"):
            points = [(r["K"], r["seconds"]) for r in rows
                      if r["model"] == model and r["method"] == method]
            ax.plot(*zip(*points, strict=True), marker="o", label=method)
        ax.set(title=model, xlabel="clients K", ylabel="fusion time (s)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="MODEL:K")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, clients, method, threads = args.child
        print(json.dumps(measure(model, int(clients), method, int(threads))))
        return
    rows = []
    print(f"{'model':<9} {'K':>3} {'OT fuse (s)':>12} {'OT peak above (MiB)':>20} "
          f"{'average (s)':>12} {'models (MiB)':>13} {'iters':>6}")
    for case in args.cases:
        ot, average = (run_case(case, m, args.threads) for m in ("wasserstein", "average"))
        rows += [ot, average]
        print(f"{ot['model']:<9} {ot['K']:>3} {ot['seconds']:>12.3f} "
              f"{ot['peak_above_mib']:>20.1f} {average['seconds']:>12.3f} "
              f"{ot['models_mib']:>13.1f} {ot['iterations']:>6}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fusion_speed.json").write_text(json.dumps(rows, indent=1))
    plot(rows, RESULTS / "fusion_speed.png")
    print(f"wrote {RESULTS / 'fusion_speed.json'} and fusion_speed.png")


if __name__ == "__main__":
    main()
