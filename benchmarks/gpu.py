"""Fusion and distillation on the CPU and on a CUDA GPU, side by side, in one short run.

Made for a session that has a GPU machine for a few minutes: one call, under 5 minutes
on one GPU. For every case it fuses the same K models (independent seeds) on each
device, times the fusion (the optimal-transport part: distillation off) and then the
distillation of the fused model from the K clients on synthetic inputs, and checks
that the GPU's fused model computes what the CPU's does (largest difference of their
outputs on random inputs; the assignment runs on the CPU either way). Without CUDA it
says so and runs the CPU column alone. Writes ``results/gpu.json`` beside this script
(``results/gpu-MODEL.json`` with ``--only``).

    python benchmarks/gpu.py                # mlp K=8, resnet18 K=10, cnn K=8
    python benchmarks/gpu.py --quick        # tiny models: a check that the script runs
    python benchmarks/gpu.py --only resnet18  # the cases of these models alone
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from otfusion.fusion import fuse_result
from otfusion.fusion.config import DistillationConfig
from otfusion.fusion.distillation import distill
from otfusion.fusion.moments import InputMoments
from otfusion.zoo import build_model

RESULTS = Path(__file__).resolve().parent / "results"
CASES = {  # name: (model, K, model kwargs, distillation steps)
    "mlp K=8": ("mlp", 8, {"in_features": 784, "widths": (400, 200, 100)}, 300),
    "resnet18 K=10": ("resnet18", 10, {"width_multiplier": 1.0, "in_channels": 3,
                                       "image_size": 32}, 50),
    "cnn K=8": ("cnn", 8, {"in_channels": 1, "image_size": 28}, 300),
}
QUICK = {
    "mlp K=3": ("mlp", 3, {"in_features": 12, "widths": (8, 6)}, 5),
    "cnn K=3": ("cnn", 3, {"in_channels": 1, "image_size": 8, "channels": (4, 8),
                           "hidden": 8}, 5),
}


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_case(model: str, clients: int, kwargs: dict, steps: int, device: str) -> dict:
    """Fuse and distil ``clients`` fresh models on ``device``; seconds and the model."""
    models = [build_model(model, seed=k, **kwargs).to(device) for k in range(clients)]
    fuse_result(models[:2])  # warm-up: kernels, allocator, imports
    _synchronize(device)
    start = time.perf_counter()
    fused = fuse_result(models).model
    _synchronize(device)
    fuse_seconds = time.perf_counter() - start
    shape = models[0].input_shape
    moments = InputMoments(torch.zeros(shape), torch.ones(shape))
    student = copy.deepcopy(fused)
    start = time.perf_counter()
    loss = distill(student, models, [1.0] * clients, moments, DistillationConfig(steps=steps))
    _synchronize(device)
    return {"fuse_s": fuse_seconds, "distill_s": time.perf_counter() - start,
            "distill_steps": steps, "distill_loss": loss, "model": fused.cpu()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models (a smoke run)")
    parser.add_argument("--only", nargs="+", metavar="MODEL",
                        choices=sorted({case[0] for case in (*CASES.values(), *QUICK.values())}),
                        help="run only the cases of these models (default: all)")
    args = parser.parse_args()
    cases = {name: case for name, case in (QUICK if args.quick else CASES).items()
             if args.only is None or case[0] in args.only}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if len(devices) == 1:
        print("no CUDA device: CPU only")
    else:
        print(f"GPU: {torch.cuda.get_device_name(0)}; CPU threads: {torch.get_num_threads()}")
    rows = []
    header = f"{'case':<14} {'device':<6} {'fuse (s)':>9} {'distil (s)':>11} {'steps':>6}"
    print(header + f" {'max |output diff| vs cpu':>25}")
    for name, (model, clients, kwargs, steps) in cases.items():
        results = {d: run_case(model, clients, kwargs, steps, d) for d in devices}
        probe = torch.randn(64, *results["cpu"]["model"].input_shape)
        with torch.no_grad():
            reference = results["cpu"]["model"].eval()(probe)
        for device, r in results.items():
            with torch.no_grad():
                difference = float((r["model"].eval()(probe) - reference).abs().max())
            rows.append({"case": name, "device": device, **{k: v for k, v in r.items()
                                                            if k != "model"},
                         "output_difference": difference})
            print(f"{name:<14} {device:<6} {r['fuse_s']:>9.3f} {r['distill_s']:>11.2f} "
                  f"{steps:>6} {difference:>25.2e}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / ("gpu.json" if args.only is None else f"gpu-{'-'.join(args.only)}.json")
    path.write_text(json.dumps(rows, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
