"""Flower's processes on this machine: its commands, found next to the running Python
(:func:`executable`), their environment (:func:`child_env`), and :class:`ManagedProcess`,
which starts one in its own session and stops its whole tree, the parts in other sessions
included, by signalling the descendants it reads from /proc."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from otfusion.deploy.errors import DeploymentError


def executable(name: str) -> str:
    """A Flower command of this environment: next to the running Python first (a venv
    used without activating it), then on PATH."""
    sibling = Path(sys.executable).parent / name
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(f"{name} not found: is flwr installed in this environment?")
    return found


def child_env(flwr_home: Path | None = None, base: Mapping[str, str] | None = None
              ) -> dict[str, str]:
    """Environment for Flower's processes: this environment's scripts first on PATH
    (the SuperLink and SuperNode start ``flower-superexec`` by name), no telemetry, no
    update check, and the private ``FLWR_HOME`` if given."""
    env = dict(os.environ if base is None else base)
    scripts = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([scripts, env.get("PATH", "")]) if env.get("PATH") else scripts
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # the command name may contain spaces and parentheses: the ppid follows the last ")"
        fields = text[text.rfind(")") + 2:].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _start_time(pid: int) -> str | None:
    """The process's start time (from /proc), to tell it from a later one with its pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def _snapshot(pid: int) -> list[tuple[int, str | None]]:
    return [(p, _start_time(p)) for p in (pid, *descendants(pid))]


def _signal_all(processes: Sequence[tuple[int, str | None]], sig: int) -> None:
    """Signal every (pid, start time) that is still the same process; a group leader
    gets the signal for its whole group."""
    for pid, started in processes:
        if _start_time(pid) != started:  # gone, or its pid now belongs to another process
            continue
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _killed_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL when the parent dies. Not SIGTERM: a
    SuperLink whose parent is gone waits on its run forever; killed, its SuperExec and
    simulation processes notice their parent is gone and exit by themselves."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class ManagedProcess:
    """A child process in its own session (process group) whose whole tree is stopped
    by :meth:`stop`: SIGTERM, then SIGKILL after ``grace`` seconds. Flower's SuperLink
    starts its SuperExec in a separate session, so the tree is collected from /proc.
    With ``tied``, the child is also killed if this process dies without stopping it
    (by SIGKILL; Linux only), so that no SuperLink outlives a killed flower-server."""

    def __init__(self, argv: Sequence[str], *, log_path: Path | None = None,
                 cwd: Path | None = None, env: Mapping[str, str] | None = None,
                 tied: bool = False) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        log = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=cwd,
                                            env=dict(env) if env is not None else None,
                                            start_new_session=True,
                                            preexec_fn=_killed_with_parent
                                            if tied and sys.platform == "linux" else None)
        finally:
            if log is not subprocess.DEVNULL:
                log.close()

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace: float = 10.0) -> None:
        if self.process.returncode is not None:
            return
        tree = _snapshot(self.pid)
        _signal_all(tree, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + min(grace, 5.0)
        while time.monotonic() < deadline and any(_exists(pid) for pid, _ in tree[1:]):
            time.sleep(0.2)
        if self.process.poll() is None:
            tree += _snapshot(self.pid)
        _signal_all(tree, signal.SIGKILL)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie of ours still "exists"; treat it as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True
