"""Per-round checkpoints: the global model and the run state, written atomically.

A checkpoint folder holds ``global_model-<round>.safetensors`` and ``state.json`` (the
completed round, the run config, the metrics history and the model file's SHA-256).
Every file is written under a temporary name, flushed to disk and renamed; renaming
``state.json`` is the commit point, so a crash at any moment leaves either the previous
round's checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import Result
from safetensors.torch import load, save

STATE = "state.json"
HISTORIES = ("train_metrics_clientapp", "evaluate_metrics_clientapp",
             "evaluate_metrics_serverapp")
RESUMABLE_CHANGES = frozenset({"num-server-rounds", "resume", "output-dir"})
"""Run-config keys that may differ between a checkpoint and the run that resumes it."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed: unreadable, damaged or from another run."""


class RunCheckpoint:
    """The latest completed round of a run, kept in ``folder``.

    ``run_config`` is stored with every round; :meth:`load` refuses a checkpoint whose
    run config differs in any key other than :data:`RESUMABLE_CHANGES`.
    """

    def __init__(self, folder: str | Path, run_config: Mapping[str, object]) -> None:
        self.folder = Path(folder)
        self.run_config = dict(run_config)

    @property
    def state_path(self) -> Path:
        return self.folder / STATE

    def exists(self) -> bool:
        return self.state_path.is_file()

    def clear(self) -> None:
        """Remove the checkpoint (a new run starts from round 0)."""
        if self.exists():
            self.state_path.unlink()
        for path in self.folder.glob("global_model-*.safetensors"):
            path.unlink()

    def save(self, server_round: int, arrays: ArrayRecord, history: Result) -> None:
        """Record ``server_round`` as completed with global ``arrays`` and ``history``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        model_name = f"global_model-{server_round:05d}.safetensors"
        state = {k: v.contiguous() for k, v in arrays.to_torch_state_dict().items()}
        model_bytes = save(state)
        _write_atomically(self.folder / model_name, model_bytes)
        record = {
            "round": server_round,
            "model_file": model_name,
            "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
            "keys": list(state),  # safetensors files sort their keys
            "run_config": self.run_config,
            **{name: {str(r): dict(m) for r, m in getattr(history, name).items()}
               for name in HISTORIES},
        }
        _write_atomically(self.state_path, json.dumps(record, indent=1).encode())
        for old in self.folder.glob("global_model-*.safetensors"):
            if old.name != model_name:
                old.unlink()

    def load(self) -> tuple[int, ArrayRecord, Result] | None:
        """(completed round, global arrays, metrics history), or None without a
        checkpoint. Raises :class:`CheckpointError` for one that cannot be resumed."""
        if not self.exists():
            return None
        try:
            record = json.loads(self.state_path.read_text())
            model_path = self.folder / record["model_file"]
            model_bytes = model_path.read_bytes()
            if hashlib.sha256(model_bytes).hexdigest() != record["model_sha256"]:
                raise CheckpointError(f"{model_path} does not match its SHA-256 in "
                                      f"{self.state_path}")
            tensors = load(model_bytes)
            arrays = ArrayRecord({key: tensors[key] for key in record["keys"]})
            history = Result(arrays=arrays, **{
                name: {int(r): MetricRecord(m) for r, m in record[name].items()}
                for name in HISTORIES})
            completed, saved_config = int(record["round"]), record["run_config"]
        except CheckpointError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot read the checkpoint in {self.folder} "
                                  f"({type(exc).__name__}: {exc})") from exc
        changed = sorted(k for k in set(saved_config) | set(self.run_config)
                         if k not in RESUMABLE_CHANGES
                         and saved_config.get(k) != self.run_config.get(k))
        if changed:
            details = ", ".join(f"{k}: {saved_config.get(k)!r} -> {self.run_config.get(k)!r}"
                                for k in changed)
            raise CheckpointError(f"the checkpoint in {self.folder} is from a run with other "
                                  f"settings ({details}); resume with the same settings or "
                                  "start a new run without resume")
        log(20, "Checkpoint: round %d completed, from %s", completed, self.folder)
        return completed, arrays, history


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` under a temporary name, flush it to disk and rename it to ``path``
    (atomic on POSIX), then flush the directory entry."""
    temporary = path.parent / f".{path.name}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
