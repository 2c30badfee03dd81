"""Outputs that appear whole or not at all.

Every file or directory a stage produces is written under a temporary name
beside its destination and renamed into place only when complete, so a killed
or failed stage never leaves something that DVC or a user would take for a
finished output.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces ``path`` (file or directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    _remove(tmp)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", **kwargs: Any) -> Iterator[IO[Any]]:
    """``open`` for writing whose result only appears once the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as handle:
        yield handle


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class StageOutputs:
    """The outputs of one stage run, written to temporary paths and committed together."""

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []  # (temporary, destination), in commit order

    def path(self, destination: str | Path) -> Path:
        """A temporary path (file or directory) that replaces ``destination`` at commit."""
        destination = Path(destination)
        destination.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary_name(destination)
        _remove(tmp)
        self._pending.append((tmp, destination))
        return tmp

    def write_bytes(self, destination: str | Path, data: bytes) -> None:
        self.path(destination).write_bytes(data)

    def write_text(self, destination: str | Path, text: str) -> None:
        self.path(destination).write_text(text, encoding="utf-8")

    def write_json(self, destination: str | Path, obj: Any) -> None:
        self.write_text(destination, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def commit(self) -> None:
        for tmp, destination in self._pending:
            if destination.is_dir() and not destination.is_symlink():
                shutil.rmtree(destination)
            os.replace(tmp, destination)
        self._pending.clear()

    def discard(self) -> None:
        for tmp, _ in self._pending:
            _remove(tmp)
        self._pending.clear()


@contextlib.contextmanager
def stage_outputs() -> Iterator[StageOutputs]:
    """Outputs that appear together when the block succeeds, and not at all when it fails."""
    outputs = StageOutputs()
    try:
        yield outputs
        outputs.commit()
    finally:
        outputs.discard()
