"""Shared pytest setup."""

from __future__ import annotations

import os

# Flower and flwr-datasets read these when first imported: no telemetry or update
# checks from the tests (the machine is offline).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op torch thread per test: the models are tiny, and on a 2-core machine
    torch's default thread pool makes such work several times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def task_identity(monkeypatch):
    """Instruction Messages need the runtime's TaskIdentity; set one for the test."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, f"{name}", 1)


@pytest.fixture
def processes(tmp_path):
    """Process trees started in their own sessions (``Processes`` of
    deployment_helpers.py), with a temporary ``FLWR_HOME``; all killed at the end."""
    from deployment_helpers import Processes

    from otfusion.deploy.processes import child_env

    home = tmp_path / "flwr-home"
    home.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Processes(child_env(home), logs)
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture
def flwr_logs(caplog):
    """Records of Flower's 'flwr' logger (INFO and up), whatever its propagation."""
    import logging

    logger = logging.getLogger("flwr")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="flwr")
    yield caplog
    logger.removeHandler(caplog.handler)
