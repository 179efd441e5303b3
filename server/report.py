"""Run outputs: the global model (safetensors), a JSON report and a PNG plot."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import matplotlib
from safetensors.torch import save_file
from torch import nn

from otfusion.fusion import FusionConfig
from otfusion.server.evaluation import central_test_data
from otfusion.strategies.updates import ClientUpdate
from otfusion.task.config import RunConfig
from otfusion.task.training import evaluate
from otfusion.tools.comparison import compare

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _records(history) -> dict[str, dict]:
    return {str(r): {k: v for k, v in record.items()} for r, record in history.items()}


class LastFusion:
    """An ``on_fused`` callback of the strategies that keeps the last fused round's
    client updates, for :func:`write_report`."""

    def __init__(self) -> None:
        self.updates: list[ClientUpdate] = []

    def __call__(self, server_round: int, updates: Sequence[ClientUpdate]) -> None:
        self.updates = list(updates)


def comparison(config: RunConfig, updates: Sequence[ClientUpdate],
               global_model: nn.Module) -> dict[str, float]:
    """Accuracy of the last fused round's clients, their FedAvg, the global model (their
    OT fusion, or their FedAvg with ``strategy=fedavg``) and their ensemble."""
    test = central_test_data(config)
    if test is None or not updates:
        return {}
    fedavg = {"FedAvg (same replies)": FusionConfig(method="average")}
    rows = compare([u.model for u in updates], [u.weight for u in updates], test,
                   fedavg).rows()
    rows.insert(-1, (f"global model ({config.strategy})", evaluate(global_model, test)[1]))
    return dict(rows)


def versions() -> dict[str, str]:
    """The versions of the packages that make a run's figures."""
    return {name: metadata.version(name) for name in ("flwr-otfusion", "flwr", "torch")}


def phase_seconds(result) -> dict[str, dict[str, float]]:
    """Per round, the wall time of each phase: client training (mean over the clients),
    screening, fusion (without the screening and the distillation), distillation and
    central evaluation; a phase that did not run is left out."""
    phases: dict[str, dict[str, float]] = {}
    for server_round, metrics in result.train_metrics_clientapp.items():
        row = phases.setdefault(str(server_round), {})
        if "train-seconds" in metrics:
            row["client training"] = float(metrics["train-seconds"])
        distill = float(metrics.get("distill-seconds", 0.0))
        screen = float(metrics.get("screen-seconds", 0.0))
        if "screen-seconds" in metrics:
            row["screening"] = screen
        if "fusion-seconds" in metrics:
            row["fusion"] = float(metrics["fusion-seconds"]) - distill - screen
        if "distill-seconds" in metrics:
            row["distillation"] = distill
    for server_round, metrics in result.evaluate_metrics_serverapp.items():
        if "evaluate-seconds" in metrics:
            phases.setdefault(str(server_round), {})["central evaluation"] = float(
                metrics["evaluate-seconds"])
    return phases


def write_report(config: RunConfig, result, updates: Sequence[ClientUpdate],
                 seconds: float | None = None) -> dict:
    """Write ``global_model.safetensors``, ``report.json`` and ``report.png`` into a new
    folder under ``config.output_dir``; return the report. ``result`` is the strategy's
    ``Result``, ``updates`` the client updates of the last fused round and ``seconds``
    the run's wall time."""
    folder = Path(config.output_dir) / time.strftime("run-%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in result.arrays.to_torch_state_dict().items()}
    save_file(state, str(folder / "global_model.safetensors"))
    global_model = config.build_model()
    global_model.load_state_dict(state)
    report = {
        "run_config": config.as_run_config(),
        "train_metrics": _records(result.train_metrics_clientapp),
        "central_evaluation": _records(result.evaluate_metrics_serverapp),
        "comparison": comparison(config, updates, global_model),
        "versions": versions(),
        "phase_seconds": phase_seconds(result),
        "total_seconds": seconds,
        "output_dir": str(folder),
    }
    (folder / "report.json").write_text(json.dumps(report, indent=1))
    _plot(report, folder / "report.png")
    return report


def _plot(report: dict, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    table = report["comparison"]
    if table:
        bars = left.barh(list(table), list(table.values()))
        left.bar_label(bars, labels=[f"{v:.1%}" for v in table.values()], padding=2,
                       fontsize=8)
        left.set_xlim(0, 1.15)
        left.invert_yaxis()
        left.set_title("last round: test accuracy")
    central = report["central_evaluation"]
    rounds = sorted(central, key=int)
    if rounds:
        right.plot([int(r) for r in rounds], [central[r].get("accuracy") for r in rounds],
                   marker="o")
        right.set(xlabel="round", ylabel="central test accuracy", ylim=(0, 1))
        right.xaxis.set_major_locator(MaxNLocator(integer=True))
        right.set_title(f"global model ({report['run_config']['strategy']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
