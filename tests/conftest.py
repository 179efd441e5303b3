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
