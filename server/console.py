"""What ``flower-server --simulation`` shows: a banner with what is about to run, a
progress display fed by the run's streamed log, then the run's table.

Flower's own output (its log and the warnings of Flower and Ray, which a user cannot act
on) goes to ``run.log`` in the state directory; ``--verbose`` shows it as it comes."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.panel import Panel
from rich.status import Status
from rich.table import Table

from otfusion.task.config import RunConfig

# What a line of the streamed run says, and the status it moves the display to.
_EVENTS = [
    (re.compile(r"Starting Flower Simulation"), "starting {clients} virtual clients"),
    (re.compile(r"\[ROUND (\d+)/(\d+)\]"), "round {0}/{1}: clients training locally"),
    (re.compile(r"aggregate_train \(round (\d+)\): (\d+) replies accepted"),
     "round {0}: fusing {1} client models"),
    (re.compile(r"\(round (\d+)\): distillation step (\d+)/(\d+), divergence (\S+)"),
     "round {0}: distilling the fused model, step {1}/{2} (KL divergence {3})"),
    (re.compile(r"Test accuracy of the last round's models"), "writing the report"),
]


class RunConsole:
    """The console of one simulated run; ``echo`` takes the run's output line by line."""

    def __init__(self, config: RunConfig, num_clients: int, log_path: Path,
                 verbose: bool = False, console: Console | None = None) -> None:
        self.config, self.num_clients, self.verbose = config, num_clients, verbose
        self.console = console or Console(stderr=True)
        self.log_path = log_path
        self.start = time.time()
        self._log: TextIO | None = None
        self._status: Status | None = None

    def __enter__(self) -> RunConsole:
        self.console.print(self.banner())
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("w")
        self._status = self.console.status("starting a local SuperLink")
        self._status.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._status is not None:
            self._status.stop()
        if self._log is not None:
            self._log.close()

    def banner(self) -> Panel:
        c = self.config
        method = "FedAvg (weighted average)" if c.strategy == "fedavg" else (
            f"OT fusion ({c.fusion_method}, {c.fusion_solver}; distilled "
            f"{c.fusion_distill_steps} steps)")
        return Panel.fit(
            f"[bold]flwr-otfusion[/] simulation: {self.num_clients} clients, "
            f"{c.num_server_rounds} round(s)\n"
            f"model [bold]{c.model}[/] on {c.dataset} ({c.partitioner} split), "
            f"{c.local_epochs} local epochs, clients from {c.client_init} initialisations\n"
            f"aggregation: {method}\n"
            f"Flower's log: {self.log_path}", title="flower-server")

    def echo(self, line: str) -> None:
        """Record one line of the run's output and move the progress display."""
        assert self._log is not None and self._status is not None
        self._log.write(line)
        self._log.flush()
        if self.verbose:
            self.console.out(line.rstrip("\n"), highlight=False)
        for pattern, status in _EVENTS:
            match = pattern.search(line)
            if match:
                self._status.update(status.format(*match.groups(), clients=self.num_clients))

    def report_table(self) -> Table | None:
        """The newest run report written since the run started, as a table."""
        reports = [p for p in Path(self.config.output_dir).glob("run-*/report.json")
                   if p.stat().st_mtime >= self.start]
        if not reports:
            return None
        path = max(reports, key=lambda p: p.stat().st_mtime)
        report = json.loads(path.read_text())
        table = Table(title="test accuracy, last round", caption=f"report: {path}")
        table.add_column("model")
        table.add_column("accuracy", justify="right")
        for name, accuracy in (report.get("comparison") or {}).items():
            table.add_row(name, f"{accuracy:.2%}")
        central = report.get("central_evaluation") or {}
        if not table.rows and central:
            last = max(central, key=int)
            table.add_row(f"global model (round {last})", f"{central[last]['accuracy']:.2%}")
        return table

    def finish(self, code: int) -> None:
        """The table of a completed run, or where to look when it failed."""
        if self._status is not None:
            self._status.stop()
        if code == 0:
            table = self.report_table()
            if table is not None:
                self.console.print(table)
            return
        tail = self.log_path.read_text().splitlines()[-20:] if self.log_path.exists() else []
        self.console.print(f"[red]the run failed[/]; the end of Flower's log "
                           f"({self.log_path}):")
        self.console.out("\n".join(tail), highlight=False)
