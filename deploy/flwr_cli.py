"""Flower's ``flwr`` CLI on the connection :data:`~otfusion.deploy.state_files.CONNECTION`:
``flwr run --stream`` with its output echoed and the run id read from it, the run's final
status from ``flwr ls --format json`` (``flwr run --stream`` exits 0 even when the run
failed), and ``flwr supernode register`` for the SuperNodes' public keys."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from otfusion.deploy.errors import say
from otfusion.deploy.processes import executable
from otfusion.deploy.state_files import CONNECTION

_RUN_ID = re.compile(r"started run (\d+)")


def _echo(line: str) -> None:
    sys.stdout.write(line)
    sys.stdout.flush()


def stream_run(argv: Sequence[str], env: Mapping[str, str],
               echo: Callable[[str], None] | None = None,
               on_run_id: Callable[[int], None] | None = None) -> tuple[int, int | None]:
    """Run ``flwr run ... --stream``, passing each line of its output to ``echo``
    (default: print it); returns (exit code, run id).
    ``on_run_id`` is called as soon as the run id is known (before the run ends)."""
    run_id = None
    process = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, text=True, errors="replace",
                               env=dict(env))
    try:
        assert process.stdout is not None
        for line in process.stdout:
            (echo or _echo)(line)
            if run_id is None and (match := _RUN_ID.search(line)):
                run_id = int(match[1])
                if on_run_id is not None:
                    on_run_id(run_id)
        return process.wait(), run_id
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def parse_status(ls_output: str, run_id: int) -> tuple[str, str]:
    """(status, details) of ``run_id`` from ``flwr ls --format json`` output."""
    start = ls_output.find("{")
    try:
        payload = json.loads(ls_output[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        payload = {}
    for run in payload.get("runs", []):
        if str(run.get("run-id")) == str(run_id):
            return str(run.get("status", "")), str(run.get("status-details", ""))
    return "", ls_output.strip()[-500:]


def final_status(run_id: int, env: Mapping[str, str], timeout: float = 60.0) -> tuple[str, str]:
    """Poll ``flwr ls`` until the run's status starts with ``finished``."""
    deadline = time.monotonic() + timeout
    status, details = "", ""
    while True:
        listing = subprocess.run(
            [executable("flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
            capture_output=True, text=True, env=dict(env), stdin=subprocess.DEVNULL)
        status, details = parse_status(listing.stdout, run_id)
        if status.startswith("finished") or time.monotonic() > deadline:
            return status, details
        time.sleep(1.0)


def register_supernodes(public_keys: Sequence[Path], env: Mapping[str, str]) -> None:
    for key in public_keys:
        done = subprocess.run([executable("flwr"), "supernode", "register", str(key), CONNECTION],
                              capture_output=True, text=True, env=dict(env),
                              stdin=subprocess.DEVNULL)
        output = (done.stdout + done.stderr).strip()
        if done.returncode == 0:
            say(f"registered SuperNode key {key}")
        else:  # e.g. already registered in a persistent database: the run can go on
            say(f"warning: registering {key} failed (exit {done.returncode}): {output[-300:]}")
