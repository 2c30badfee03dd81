"""Outputs that appear whole or not at all, and stage transactions over several of them.

Every file or directory a stage produces is written under a temporary name
beside its destination (``.NAME.tmp-PID``), flushed to disk with ``fsync``
(every file of a directory tree, then the directories) and only then renamed
into place. A file replaces a file with one atomic ``os.replace``. A directory
cannot be replaced atomically, so the old one is first renamed aside
(``.NAME.old-PID``), the new one renamed in, and the old one deleted: at every
instant either the complete old or the complete new directory exists, under
its own name or the aside name, and ``recover`` (called by every writer and
reader here) puts a stranded old one back, or deletes it once the new one is in.

``stage_outputs`` is a stage's transaction: it hands out temporary paths for
all outputs and replaces them together, in registration order (metrics last),
only when the block ends without an exception; a failure before or during the
commit leaves every previous output as it was. A SIGKILL during the commit
itself (a few renames) can leave the outputs committed so far new and the later
ones old; registering the metrics last means such a stage's metrics are never
newer than the outputs they describe. ``OutputError`` reports an
operating-system failure (disk full, read-only or missing directory) as one
line naming the operation and the path; it is both an ``OSError`` and a
``ValueError``, so callers that turn bad input into a message catch it either way.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TMP_TAG = "tmp"
OLD_TAG = "old"


class OutputError(OSError, ValueError):
    """An output that could not be written, flushed or renamed into place (names the path)."""


def _side_name(path: Path, tag: str, pid: int | None = None) -> Path:
    return path.with_name(f".{path.name}.{tag}-{os.getpid() if pid is None else pid}")


def _side_paths(path: Path, tag: str) -> list[tuple[int, Path]]:
    """Existing ``.NAME.TAG-PID`` siblings of ``path`` with their PIDs."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{tag}-(\d+)")
    if not path.parent.is_dir():
        return []
    found = [(m, p) for p in path.parent.iterdir() if (m := pattern.fullmatch(p.name))]
    return [(int(m.group(1)), p) for m, p in found]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def recover(path: str | Path) -> None:
    """Finish or undo an interrupted replacement of ``path``.

    A stranded old copy (``.NAME.old-PID``) is renamed back when ``path`` is
    absent: the new one never arrived (whoever made it, since a PID may have been
    reused after a restart and one replacement of a path runs at a time). Old
    copies are deleted when ``path`` is present (the new one is complete: it is
    only ever renamed in whole) and their process is gone or is this one, and
    so are temporaries of processes that no longer run.
    """
    path = Path(path)
    try:
        olds = _side_paths(path, OLD_TAG)
        if olds and not _exists(path):
            newest = max(olds, key=lambda item: item[1].lstat().st_ctime_ns)  # a rename updates ctime
            _rename(newest[1], path, "restore the previous version of")
            _fsync_dir(path.parent)
            olds.remove(newest)
        for pid, old in olds:
            if pid == os.getpid() or not _alive(pid):
                _remove(old)
        for pid, tmp in _side_paths(path, TMP_TAG):
            if pid != os.getpid() and not _alive(pid):
                _remove(tmp)
    except OutputError:
        raise
    except OSError as exc:
        raise _error("recover", path, exc) from exc


# ---------------------------------------------------------------- flushing


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # some platforms cannot open a directory; nothing more to flush there
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # EINVAL: a file system without directory fsync
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """Flush a file, or every file and directory of a tree, to disk."""
    path = Path(path)
    if path.is_symlink():
        return
    if not path.is_dir():
        _fsync_file(path)
        return
    for root, _dirs, files in os.walk(path):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                _fsync_file(Path(root, name))
        _fsync_dir(Path(root))


# ---------------------------------------------------------------- replacing


def _error(operation: str, path: Path, exc: OSError) -> OutputError:
    reason = exc.strerror or str(exc)
    return OutputError(exc.errno, f"cannot {operation} {path}: {reason}")


def _rename(source: Path, destination: Path, operation: str) -> None:
    try:
        os.rename(source, destination)
    except OSError as exc:
        raise _error(operation, destination, exc) from exc


class _Replacement:
    """One destination's move: new in, old kept aside until the whole commit succeeded."""

    def __init__(self, tmp: Path, dest: Path):
        self.tmp, self.dest = tmp, dest
        self.aside: Path | None = None
        self.linked = False  # the old file stays in place and is hard-linked aside
        self.done = False

    def apply(self) -> None:
        if not _exists(self.tmp):
            raise OutputError(f"cannot replace {self.dest}: nothing was written to its temporary {self.tmp.name}")
        if _exists(self.dest):
            self._keep_old()
        if self.linked:  # a file over a file: one atomic step
            try:
                os.replace(self.tmp, self.dest)
            except OSError as exc:
                raise _error("rename the new version into", self.dest, exc) from exc
        else:
            _rename(self.tmp, self.dest, "rename the new version into")
        self.done = True

    def _keep_old(self) -> None:
        """Keep the old version at the aside name: a hard link for a file (it stays in place), else a rename."""
        aside = _side_name(self.dest, OLD_TAG)
        _remove(aside)
        if not self.tmp.is_dir() and self.dest.is_file() and not self.dest.is_symlink():
            try:
                os.link(self.dest, aside)
                self.aside, self.linked = aside, True
                return
            except OSError:
                pass  # no hard links here: move it aside instead
        _rename(self.dest, aside, "move aside the previous version of")
        self.aside = aside

    def undo(self) -> None:
        """Put the old version back (best effort: what cannot be undone, ``recover`` finishes)."""
        with contextlib.suppress(OSError):
            if self.linked:
                if self.done:
                    os.replace(self.aside, self.dest)
                else:
                    self.aside.unlink()
            else:
                if self.done:
                    _remove(self.dest)
                if self.aside is not None:
                    os.rename(self.aside, self.dest)
            self.aside = None

    def finish(self) -> None:
        """The commit succeeded: the old version goes."""
        if self.aside is not None:
            _remove(self.aside)


def _commit(pairs: list[tuple[Path, Path]]) -> None:
    """Replace every destination by its temporary, in order; all or (on failure) none."""
    for tmp, dest in pairs:
        try:
            if _exists(tmp):
                fsync_tree(tmp)
            _fsync_dir(dest.parent)
        except OSError as exc:
            raise _error("flush to disk", dest, exc) from exc
    replacements = [_Replacement(tmp, dest) for tmp, dest in pairs]
    try:
        for replacement in replacements:
            try:
                replacement.apply()
            except OutputError:
                raise
            except OSError as exc:
                raise _error("replace", replacement.dest, exc) from exc
        for parent in dict.fromkeys(dest.parent for _, dest in pairs):
            try:
                _fsync_dir(parent)
            except OSError as exc:
                raise _error("flush to disk the directory", parent, exc) from exc
    except BaseException:
        for replacement in reversed(replacements):
            replacement.undo()
        raise
    for replacement in replacements:
        try:
            replacement.finish()
        except OSError:
            pass  # the new outputs are in; recover deletes the leftover old copy next time


class StageOutputs:
    """The outputs of one stage run: temporary paths now, all replaced together at the end."""

    def __init__(self) -> None:
        self._pairs: list[tuple[Path, Path]] = []

    def path(self, dest: str | Path) -> Path:
        """A fresh temporary path for ``dest`` (write a file or make a directory there)."""
        dest = Path(dest)
        if any(dest == d for _, d in self._pairs):
            raise ValueError(f"{dest}: registered twice as an output of this stage")
        recover(dest)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = _side_name(dest, TMP_TAG)
            _remove(tmp)
        except OSError as exc:
            raise _error("create the directory of", dest, exc) from exc
        self._pairs.append((tmp, dest))
        return tmp

    def write_bytes(self, dest: str | Path, data: bytes) -> None:
        tmp = self.path(dest)
        try:
            tmp.write_bytes(data)
        except OSError as exc:
            raise _error("write", Path(dest), exc) from exc

    def write_text(self, dest: str | Path, text: str) -> None:
        self.write_bytes(dest, text.encode("utf-8"))

    def write_json(self, dest: str | Path, obj: Any) -> None:
        self.write_text(dest, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def write_csv(self, dest: str | Path, rows: list[dict[str, Any]]) -> None:
        self.write_text(dest, csv_text(rows, dest))

    def commit(self) -> None:
        _commit(self._pairs)
        self._pairs = []

    def discard(self) -> None:
        for tmp, _ in self._pairs:
            with contextlib.suppress(OSError):
                _remove(tmp)
        self._pairs = []


@contextlib.contextmanager
def stage_outputs() -> Iterator[StageOutputs]:
    """A stage transaction: on success every registered output is replaced, in order; on error none."""
    outputs = StageOutputs()
    try:
        yield outputs
        outputs.commit()
    finally:
        outputs.discard()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces ``path`` (file or directory)."""
    with stage_outputs() as outputs:
        yield outputs.path(path)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", **kwargs: Any) -> Iterator[IO[Any]]:
    """``open`` for writing whose result only appears once the block succeeds."""
    with atomic_path(path) as tmp:
        try:
            handle = open(tmp, mode, **kwargs)
        except OSError as exc:
            raise _error("write", Path(path), exc) from exc
        with handle:
            yield handle


def csv_text(rows: list[dict[str, Any]], dest: str | Path) -> str:
    """Rows of equal keys as CSV with a header: plot data, which DVC and the plots stage read."""
    if not rows:
        raise ValueError(f"{dest}: no rows to write")
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def write_bytes(path: str | Path, data: bytes) -> None:
    with stage_outputs() as outputs:
        outputs.write_bytes(path, data)


def write_json(path: str | Path, obj: Any) -> None:
    with stage_outputs() as outputs:
        outputs.write_json(path, obj)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif _exists(path):
        path.unlink()

