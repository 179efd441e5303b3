"""The ServerApp: one-shot OT fusion (or FedAvg) of the clients' models.

The strategy is chosen by the run-config key ``strategy``: ``otfusion`` fuses with the
configured method; ``fedavg`` runs the same strategy with ``method="average"``, which is
FedAvg weighted by ``num-examples`` with the same reply validation. After the last round
it evaluates the global model centrally (when the dataset is embedded), compares the
last round's clients, their FedAvg, their OT fusion and their ensemble, and writes the
global model (safetensors), a JSON report and a PNG plot to ``output-dir``. Every
completed round is checkpointed in ``<output-dir>/checkpoint``; ``resume=true`` continues
the run from there.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from otfusion.server.checkpoint import RunCheckpoint
from otfusion.server.evaluation import central_evaluator
from otfusion.server.report import LastFusion, write_report
from otfusion.strategies import OTFusion
from otfusion.strategies.rounds import FusedCallback
from otfusion.task.config import RunConfig


def make_strategy(config: RunConfig, on_fused: FusedCallback | None = None) -> OTFusion:
    """The strategy named by the run config."""
    return OTFusion(
        config.build_model,
        fusion=config.fusion(),
        ot_rounds=config.ot_rounds,
        fraction_train=config.fraction_train,
        min_train_nodes=config.min_train_nodes,
        min_available_nodes=config.min_train_nodes,
        fraction_evaluate=0.0,
        on_fused=on_fused,
    )


def central_evaluation(config: RunConfig):
    """``evaluate_fn`` on the embedded test split, or None for other datasets."""
    evaluate_state = central_evaluator(config)
    if evaluate_state is None:
        return None

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        start = time.perf_counter()
        loss, accuracy = evaluate_state(arrays.to_torch_state_dict())
        return MetricRecord({"loss": loss, "accuracy": accuracy,
                             "evaluate-seconds": time.perf_counter() - start})

    return evaluate_fn


def run_checkpoint(config: RunConfig) -> RunCheckpoint:
    """The run's checkpoint folder, ``<output-dir>/checkpoint``; cleared for a new run
    (``resume`` false), kept to continue from with ``resume`` true."""
    checkpoint = RunCheckpoint(Path(config.output_dir) / "checkpoint", config.as_run_config())
    if checkpoint.exists() and not config.resume:
        log(WARNING, "Starting a new run: the checkpoint in %s is replaced (set resume=true "
            "to continue it)", checkpoint.folder)
        checkpoint.clear()
    elif config.resume and not checkpoint.exists():
        log(WARNING, "resume=true but there is no checkpoint in %s: starting at round 1",
            checkpoint.folder)
    return checkpoint


def run(grid: Grid, config: RunConfig) -> dict:
    """Run the federation on ``grid`` and write the outputs; returns the report."""
    start = time.perf_counter()
    last_fusion = LastFusion()
    strategy = make_strategy(config, on_fused=last_fusion)
    initial = ArrayRecord(config.build_model().state_dict())
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=config.num_server_rounds,
        timeout=config.round_timeout,
        train_config=ConfigRecord({"lr": config.lr}),
        evaluate_fn=central_evaluation(config),
        checkpoint=run_checkpoint(config),
    )
    report = write_report(config, result, last_fusion.updates, time.perf_counter() - start)
    log_table = report.get("comparison")
    if log_table:
        lines = [f"{name:<22} {accuracy:7.2%}" for name, accuracy in log_table.items()]
        log(INFO, "Test accuracy of the last round's models:\n%s", "\n".join(lines))
    return report


def create_server_app(config: RunConfig | None = None) -> ServerApp:
    """A ServerApp that runs with ``config``, or by default with the run config of the
    Flower run (``[tool.flwr.app.config]`` and ``--run-config`` overrides)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run(grid, config or RunConfig.from_run_config(context.run_config))

    return server_app


app = create_server_app()
