"""One-shot simulation with many virtual clients: wall time, fusion and distillation
shares, peak memory, global accuracy.

Runs ``flower-server --simulation --num-clients N --client-init MODE`` for every N and
mode in a fresh process tree (the simulation's workers included), samples the tree's
total resident memory, and reads the fusion and distillation times from the run's
report. Writes ``results/simulation_scale.json``.

    python benchmarks/simulation_scale.py --clients 100 1000 --client-init local-seed global
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from otfusion.deploy.processes import descendants

RESULTS = Path(__file__).resolve().parent / "results"


def tree_rss_mib(root: int) -> float:
    """Resident memory of ``root`` and all its descendants."""
    total = 0
    for pid in (root, *descendants(root)):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def run(num_clients: int, client_init: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        command = [str(Path(sys.executable).with_name("flower-server")), "--simulation",
                   "--num-clients", str(num_clients), "--client-init", client_init,
                   "--output-dir", out, *extra]
        start, peak = time.perf_counter(), 0.0
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
        while process.poll() is None:
            peak = max(peak, tree_rss_mib(process.pid))
            time.sleep(0.5)
        wall = time.perf_counter() - start
        if process.returncode != 0:
            raise RuntimeError(process.stderr.read().decode()[-3000:])
        (report,) = Path(out).glob("run-*/report.json")
        data = json.loads(report.read_text())
    metrics = data["train_metrics"]["1"]
    return {"clients": num_clients, "client_init": client_init, "wall_seconds": wall,
            "fusion_seconds": metrics["fusion-seconds"],
            "distill_seconds": metrics.get("distill-seconds", 0.0),
            "screen_seconds": metrics.get("screen-seconds", 0.0), "peak_rss_mib": peak,
            "accepted": metrics["accepted-replies"],
            "excluded": metrics.get("excluded-replies", 0), "comparison": data["comparison"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", nargs="+", type=int, default=[100, 1000])
    parser.add_argument("--client-init", nargs="+", default=["local-seed", "global"],
                        choices=["local-seed", "global"])
    parser.add_argument("extra", nargs="*", help="more flower-server flags, after --")
    args = parser.parse_args()
    rows = []
    print(f"{'clients':>8} {'client init':>11} {'wall (s)':>9} {'fusion (s)':>11} "
          f"{'fusion share':>13} {'screen share':>13} {'distil share':>13} "
          f"{'peak RSS (MiB)':>15} "
          f"{'screened out':>13} {'global model acc':>17}")
    for init in args.client_init:
        for n in args.clients:
            row = run(n, init, args.extra)
            rows.append(row)
            accuracy = row["comparison"].get("global model (otfusion)", float("nan"))
            print(f"{n:>8} {init:>11} {row['wall_seconds']:>9.1f} "
                  f"{row['fusion_seconds']:>11.1f} "
                  f"{row['fusion_seconds'] / row['wall_seconds']:>13.1%} "
                  f"{row['screen_seconds'] / row['wall_seconds']:>13.1%} "
                  f"{row['distill_seconds'] / row['wall_seconds']:>13.1%} "
                  f"{row['peak_rss_mib']:>15.0f} {row['excluded']:>13.0f} "
                  f"{accuracy:>17.1%}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "simulation_scale.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
