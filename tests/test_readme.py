"""Every command of the README runs as written, in a fresh shell after the setup
command, and leaves no process behind; the README cannot drift from what works.

Each ```bash block of the README is classified below by its first line: run in CI
(quick), run in CI but marked slow, or not runnable on this machine (with the reason).
A new block that is not classified fails :func:`test_every_readme_command_is_classified`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from readme_blocks import ROOT, readme_blocks, readme_file
from safetensors.torch import save_file

from otfusion.zoo import build_model

SETUP = re.compile(r"^python3 -m venv \.venv && \.venv/bin/pip install [^&]*&& ")
"""The setup command the README's first block starts with; done once, then stripped."""

QUICK, SLOW = "quick", "slow"
BLOCKS: dict[str, str] = {
    "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0": SLOW,  # the main job
    "python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0": (
        "not run: it is the test command itself"),
    'export PATH="$PWD/.venv/bin:$PATH" FLWR_HOME="$PWD/.flwr"': SLOW,
    "ray start --head --port 6379": "not run: needs a Ray cluster and 1000 virtual clients",
    ".venv/bin/otfusion fuse a.safetensors b.safetensors c.safetensors": QUICK,
    "openssl req -x509 -newkey rsa:2048": (
        "not run: two machines and a DNS name (the loopback TLS deployment is tested in "
        "tests/deploy/test_deployment.py)"),
    ".venv/bin/flower-server --simulation --num-clients 10 --fusion-robust-aggregate": SLOW,
    ".venv/bin/python docker/make_demo_data.py": (
        "not run: no Docker engine here (tests/deploy/test_docker.py checks the files)"),
    "PYTHONPATH=. .venv/bin/otfusion demo --model mypkg.models:SmallNet": QUICK,
    ".venv/bin/python hf_bert.py": QUICK,
    ".venv/bin/flower-server --simulation --num-clients 10 --dataset mnist": (
        "not run: downloads from the Hugging Face hub (tests/task/test_hub_data.py runs the "
        "hub path on local data)"),
}


def write_users_files(folder: Path) -> None:
    """The README's ``mypkg/models.py`` and ``hf_bert.py``, as a user would save them."""
    (folder / "mypkg").mkdir()
    (folder / "mypkg" / "__init__.py").write_text("")
    for name in ("mypkg/models.py", "hf_bert.py"):
        (folder / name).write_text(readme_file(name))


def kind_of(block: str) -> str | None:
    return next((kind for start, kind in BLOCKS.items() if block.startswith(start)), None)


def blocks_of(kind: str) -> list:
    return [pytest.param(b, id=b.splitlines()[0][:60]) for b in readme_blocks()
            if kind_of(b) == kind]


def superlinks() -> set[int]:
    found = subprocess.run(["pgrep", "-f", "flower-superlink"], capture_output=True, text=True)
    return {int(pid) for pid in found.stdout.split()}


def run_as_written(block: str, cwd: Path, timeout: float) -> str:
    """The block in a fresh non-login bash (``set -e``) in ``cwd``, with the checkout's
    ``.venv`` where the README's setup command puts it; its output."""
    script = "set -e\n" + SETUP.sub("", block)
    env = {"HOME": os.environ.get("HOME", str(cwd)), "PATH": os.defpath, "LANG": "C.UTF-8",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    before = superlinks()
    done = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    deadline = time.monotonic() + 20  # a SuperLink takes a moment to exit on SIGTERM
    while (left := superlinks() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left behind: {left}\n{output[-2000:]}"
    return output


def test_every_readme_command_is_classified():
    blocks = readme_blocks()
    assert blocks, "no ```bash blocks found in the README"
    unclassified = [b.splitlines()[0] for b in blocks if kind_of(b) is None]
    assert not unclassified, f"classify these README commands in BLOCKS: {unclassified}"
    assert SETUP.match(blocks[0]), "the README must start with the setup command"


@pytest.mark.parametrize("block", blocks_of(QUICK))
def test_quick_readme_commands_run_as_written(block, tmp_path):
    """The offline tools, on checkpoints made here (the README's a, b, c), with the
    README's own model and with its Hugging Face model."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / ".venv").symlink_to(ROOT / ".venv")
    write_users_files(workdir)
    for k, name in enumerate("abc"):
        state = build_model("mlp", seed=k, widths=(400, 200, 100)).state_dict()
        save_file({n: t.contiguous() for n, t in state.items()},
                  str(workdir / f"{name}.safetensors"))
    output = run_as_written(block, workdir, timeout=300)
    if "otfusion fuse" in block:
        assert (workdir / "fused.safetensors").stat().st_size > 0
    elif "hf_bert" in block:
        gap = re.search(r"computes the same function: relative gap (\S+)", output)
        assert gap and float(gap.group(1)) < 1e-5, output
    else:
        assert "OT fusion" in output and "ensemble" in output


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("block", blocks_of(SLOW))
def test_slow_readme_commands_run_as_written(block, tmp_path):
    """The simulations, from a copy of the checkout's app files (outputs land there)."""
    workdir = tmp_path / "checkout"
    workdir.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, workdir / name)
    (workdir / ".venv").symlink_to(ROOT / ".venv")
    output = run_as_written(block, workdir, timeout=850)
    assert "DEPRECATED" not in output or block.startswith("export")
    assert list((workdir / "outputs").glob("run-*/report.json")), output[-3000:]
