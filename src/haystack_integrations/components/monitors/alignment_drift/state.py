"""The drift monitor's state file: JSON, written atomically, shared safely by every instance that names it.

Private to `AlignmentDriftMonitor`. Writers on one path (threads, instances, processes) serialise on an
exclusive `fcntl.flock` of a sidecar `<state>.lock` file and read-merge-write under it, so none overwrites
another's samples. The state file itself is only ever replaced by `os.replace` of a fully written and
fsynced temporary file in the same directory: a crash leaves either the old or the new state, plus at most
an orphan `<state>.<random>.tmp`, which the next holder of the lock removes (every temporary file is
created under the lock, so one found while holding it belongs to a dead writer).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from haystack_integrations.common.multimodal_rag.errors import DriftStateError
from haystack_integrations.common.multimodal_rag.validation import check_int

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: processes are not serialised (documented)
    fcntl = None  # type: ignore[assignment]

STATE_VERSION = 1
GROUPS = ("text", "visual")

# One in-process lock per state file as well: flock serialises processes and separate open file descriptions,
# this keeps the guarantee where flock is missing (threads of one process still never lose samples).
_PROCESS_LOCKS: dict[str, threading.Lock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


def _process_lock(path: Path) -> threading.Lock:
    with _PROCESS_LOCKS_GUARD:
        return _PROCESS_LOCKS.setdefault(os.path.abspath(path), threading.Lock())


@dataclass
class StoredState:
    """The content of a state file, validated: every score finite."""

    windows: dict[str, list[float]] = field(default_factory=lambda: {g: [] for g in GROUPS})
    baseline: dict[str, list[float]] = field(default_factory=dict)
    pending: dict[str, list[float]] = field(default_factory=lambda: {g: [] for g in GROUPS})
    modality_counts: dict[str, int] = field(default_factory=dict)
    calls: int = 0
    drifted: bool = False

    def to_json(self) -> str:
        """:returns: The compact JSON text of the file (scores written with full float precision)."""
        payload = {
            "version": STATE_VERSION,
            "windows": self.windows,
            "baseline": self.baseline,
            "pending": self.pending,
            "modality_counts": self.modality_counts,
            "calls": self.calls,
            "drifted": self.drifted,
        }
        return json.dumps(payload, separators=(",", ":"), allow_nan=False)


def _refuse_constant(name: str) -> float:
    msg = f"non-finite number {name} (NaN and infinities are refused)"
    raise ValueError(msg)


def _finite_list(values: Any, what: str) -> list[float]:
    if not isinstance(values, list):
        msg = f"{what} must be a list, got {type(values).__name__}"
        raise TypeError(msg)
    out: list[float] = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float):
            msg = f"{what} holds a non-number {value!r}"
            raise TypeError(msg)
        number = float(value)
        if not math.isfinite(number):  # e.g. 1e999 parses to inf
            msg = f"{what} holds a non-finite number {value!r}"
            raise ValueError(msg)
        out.append(number)
    return out


def parse_state(text: str, modalities: tuple[str, ...]) -> StoredState:
    """
    Parse and validate the text of a state file.

    :param text: The file's content.
    :param modalities: Modality names whose counts the file may hold.
    :returns: The state.
    :raises ValueError: On malformed JSON, an unknown version, NaN or infinite numbers.
    :raises TypeError: On values of the wrong type.
    :raises KeyError: On missing required keys.
    """
    state = json.loads(text, parse_constant=_refuse_constant)
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        version = state.get("version") if isinstance(state, dict) else None
        msg = f"unknown state format (version {version!r}, expected {STATE_VERSION})"
        raise ValueError(msg)
    windows = {g: _finite_list(state["windows"].get(g, []), f"windows[{g!r}]") for g in GROUPS}
    baseline = {g: _finite_list(values, f"baseline[{g!r}]") for g, values in state["baseline"].items() if g in GROUPS}
    pending = {g: _finite_list(state.get("pending", {}).get(g, []), f"pending[{g!r}]") for g in GROUPS}
    counts: dict[str, int] = {}
    for modality in modalities:
        count = state.get("modality_counts", {}).get(modality, 0)
        counts[modality] = check_int(f"modality_counts[{modality!r}]", count, minimum=0)
    calls = check_int("calls", state["calls"], minimum=0)
    return StoredState(windows, baseline, pending, counts, calls, bool(state["drifted"]))


class DriftStateFile:
    """
    One state file and its sidecar lock. Nothing touches the disk until a method is called.

    Usage: `with state_file.locked(): current = state_file.read(...); state_file.write(merged)`.
    """

    def __init__(self, path: str | Path) -> None:
        """
        Name the file.

        :param path: Path of the JSON state file; the lock is `<path>.lock` beside it.
        """
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    @contextmanager
    def locked(self) -> Iterator[None]:
        """
        Hold the exclusive lock of this state file (blocks until other writers, in any process, are done).

        Creates the parent folder and the lock file when missing.

        :raises DriftStateError: When the folder or lock file cannot be created.
        """
        with _process_lock(self.path):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                msg = f"cannot open the lock file '{self.lock_path}' of drift state '{self.path}': {e}"
                raise DriftStateError(msg) from e
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing releases the flock

    def remove_orphans(self) -> list[Path]:
        """
        Delete temporary files left by writers that died between creating and renaming them. Call under `locked()`.

        :returns: The removed paths.
        """
        removed = []
        for orphan in self.path.parent.glob(f"{self.path.name}.*.tmp"):
            try:
                orphan.unlink()
            except FileNotFoundError:
                continue
            removed.append(orphan)
        return removed

    def read(self, modalities: tuple[str, ...]) -> StoredState | None:
        """
        Read and validate the state. Call under `locked()`.

        :param modalities: Modality names whose counts the file may hold.
        :returns: The state, or `None` when the file does not exist.
        :raises DriftStateError: When it exists but is unreadable, malformed or holds NaN/infinite numbers.
        """
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as e:
            msg = f"AlignmentDriftMonitor state file '{self.path}' cannot be read: {e}"
            raise DriftStateError(msg) from e
        try:
            return parse_state(text, modalities)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            msg = (
                f"AlignmentDriftMonitor state file '{self.path}' is corrupt ({type(e).__name__}: {e}). "
                "Fix or delete it, or pass reset_corrupt_state=True to move it aside and start fresh."
            )
            raise DriftStateError(msg) from e

    def move_aside(self) -> Path:
        """
        Rename a corrupt state file to `<path>.corrupt` (replacing an older one). Call under `locked()`.

        :returns: The new path.
        """
        aside = self.path.with_name(self.path.name + ".corrupt")
        os.replace(self.path, aside)
        return aside

    def write(self, state: StoredState) -> None:
        """
        Replace the file atomically: temporary file in the same folder, fsync, rename, fsync the folder.

        Call under `locked()`.

        :param state: The state to write.
        :raises DriftStateError: When it cannot be written (the previous file is left as it was).
        """
        payload = state.to_json()
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        except OSError as e:
            msg = f"cannot write the drift state '{self.path}': {e}"
            raise DriftStateError(msg) from e
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as tmp:
                tmp.write(payload)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_name, self.path)
        except BaseException as e:
            Path(tmp_name).unlink(missing_ok=True)
            if isinstance(e, OSError):
                msg = f"cannot write the drift state '{self.path}': {e}"
                raise DriftStateError(msg) from e
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
