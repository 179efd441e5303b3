"""What the flower-server console makes of the run's streamed log."""

from __future__ import annotations

from io import StringIO

from rich.console import Console

from otfusion.server.console import RunConsole
from otfusion.task.config import RunConfig


def test_the_console_shows_the_distillation_step(tmp_path):
    console = RunConsole(RunConfig(), 3, tmp_path / "run.log",
                         console=Console(file=StringIO()))
    with console:
        console.echo("INFO :      fuse_round (round 1): distillation step 150/300, "
                     "divergence 0.0123\n")
        shown = str(console._status.status)
    assert shown == "round 1: distilling the fused model, step 150/300 (KL divergence 0.0123)"
