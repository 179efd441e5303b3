"""What flower-server and flower-client tell their user: :class:`DeploymentError` for a
problem the user can fix, raised throughout this package and shown as a message instead of
a traceback, and :func:`say` for flower-server's progress and error lines on stderr."""

from __future__ import annotations

import sys


class DeploymentError(RuntimeError):
    """A problem the user can fix (bad flags, SuperLink not reachable, failed run)."""


def say(message: str) -> None:
    print(f"flower-server: {message}", file=sys.stderr, flush=True)
