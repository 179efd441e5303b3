"""The main job on Flower's supported simulation path next to the deprecated one.

Times, in one run and alternating, each path as a fresh process (interpreter start
included) with the same run config:

- ``flwr run``: ``flower-server --simulation --num-clients N``, which starts a local
  ``flower-superlink --simulation`` and runs the app with ``flwr run`` (what the README's
  main job does);
- ``run_simulation``: Flower's deprecated in-process ``flwr.simulation.run_simulation``
  with this project's ServerApp and ClientApp, as ``flower-server`` did before.

Prints the wall times (median of ``--repeats``) and their ratio, and the global model's
accuracy of each path (from the report) to show they ran the same job. Writes
``results/simulation_paths.json``.

    python benchmarks/simulation_paths.py --clients 10 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

RUN_SIMULATION = """
import sys
from flwr.simulation import run_simulation
from otfusion.client.app import create_client_app
from otfusion.server.app import create_server_app
from otfusion.task.config import RunConfig

config = RunConfig(output_dir=sys.argv[1])
run_simulation(server_app=create_server_app(config), client_app=create_client_app(config),
               num_supernodes=int(sys.argv[2]),
               backend_config={"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0}})
"""


def flwr_run(clients: int, folder: Path) -> list[str]:
    script = Path(sys.executable).parent / "flower-server"
    return [str(script), "--simulation", "--num-clients", str(clients), "--output-dir",
            str(folder / "outputs"), "--state-dir", str(folder / "state")]


def run_simulation(clients: int, folder: Path) -> list[str]:
    return [sys.executable, "-c", RUN_SIMULATION, str(folder / "outputs"), str(clients)]


PATHS = {"flwr run": flwr_run, "run_simulation": run_simulation}


def timed(argv: list[str], folder: Path) -> tuple[float, float | None]:
    """Wall seconds of ``argv`` and the global model's last accuracy from its report."""
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=folder, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    reports = sorted((folder / "outputs").glob("run-*/report.json"))
    if not reports:
        return seconds, None
    comparison = json.loads(reports[-1].read_text())["comparison"]
    return seconds, comparison.get("global model (otfusion)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in PATHS}
    accuracy: dict[str, float | None] = {}
    for repeat in range(args.repeats):
        for name, command in PATHS.items():
            with tempfile.TemporaryDirectory() as tmp:
                seconds, accuracy[name] = timed(command(args.clients, Path(tmp)), Path(tmp))
            times[name].append(seconds)
            print(f"repeat {repeat + 1}: {name:15s} {seconds:6.1f} s", flush=True)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"\n{args.clients} clients, median of {args.repeats} | wall (s) | ratio | global acc")
    for name in PATHS:
        acc = accuracy[name]
        print(f"{name:15s} | {median[name]:8.1f} | {median[name] / median['run_simulation']:5.2f}"
              f" | {'-' if acc is None else f'{100 * acc:.2f}'}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "simulation_paths.json"
    out.write_text(json.dumps({"clients": args.clients, "seconds": times,
                               "global_accuracy": accuracy}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
