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
commit leaves every previous output as it was. A commit of several outputs is
journaled: before the first rename a journal listing every replacement is
flushed to disk in the outputs' common directory (``.pgolf-commit-PID.json``),
and its deletion, once every new output is in and flushed, is the commit point.
The committing process holds an exclusive ``flock`` on the journal, which the
system releases however the process dies, so a journal whose lock is free was
abandoned: ``recover`` of any of its outputs rolls the whole commit back, and
a SIGKILL between two renames leaves the previous complete set, never a mix.
``exclusive_lock`` is the lock a stage run holds on its workspace.
``OutputError`` reports an operating-system failure (disk full, file too large,
read-only or missing directory) as one line naming the operation and the
output; it is both an ``OSError`` and a ``ValueError``, so callers that turn
bad input into a message catch it either way. No output commits a NaN or an
infinite number in JSON (``NonFiniteValue``).
"""
from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import math
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

    First, an abandoned commit journal that names ``path`` (its process is gone) is
    rolled back: every output of that commit gets its previous version back. Then a
    stranded old copy (``.NAME.old-PID``) is renamed back when ``path`` is absent: the
    new one never arrived (whoever made it, since a PID may have been reused after a
    restart and one replacement of a path runs at a time). Old copies are deleted when
    ``path`` is present (the new one is complete: it is only ever renamed in whole) and
    their process is gone or is this one, and so are temporaries of processes that no
    longer run. The side copies of a commit still running in another process are left alone.
    """
    path = Path(path)
    try:
        running = _recover_journals(path)
        olds = [(pid, old) for pid, old in _side_paths(path, OLD_TAG) if pid not in running]
        if olds and not _exists(path):
            newest = max(olds, key=lambda item: item[1].lstat().st_ctime_ns)  # a rename updates ctime
            _rename(newest[1], path, "restore the previous version of")
            _fsync_dir(path.parent)
            olds.remove(newest)
        for pid, old in olds:
            if pid == os.getpid() or not _alive(pid):
                _remove(old)
        for pid, tmp in _side_paths(path, TMP_TAG):
            if pid != os.getpid() and pid not in running and not _alive(pid):
                recover(tmp)  # a temporary's own temporaries (a model file written inside a stage's commit)
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
    return OutputError(exc.errno, f"cannot {operation} {destination_of(path)}: {reason}")


def destination_of(path: Path) -> Path:
    """The output a temporary (``.NAME.tmp-PID``) stands for, so that errors name what the user asked for."""
    match = re.fullmatch(rf"\.(.+)\.{TMP_TAG}-\d+", path.name)
    return path.with_name(match.group(1)) if match else path


def _rename(source: Path, destination: Path, operation: str) -> None:
    try:
        os.rename(source, destination)
    except OSError as exc:
        raise _error(operation, destination, exc) from exc


class _Replacement:
    """One destination's move: new in, old kept aside (``.NAME.old-PID``) until the whole commit succeeded."""

    def __init__(self, tmp: Path, dest: Path, aside: Path | None = None, existed: bool | None = None):
        self.tmp, self.dest = tmp, dest
        self.aside = aside or _side_name(dest, OLD_TAG)
        self.existed = _exists(dest) if existed is None else existed  # before the commit

    def apply(self) -> None:
        if not _exists(self.tmp):
            raise OutputError(f"cannot replace {self.dest}: nothing was written to its temporary {self.tmp.name}")
        if _exists(self.dest) and self._keep_old():  # a file over a file: one atomic step
            try:
                os.replace(self.tmp, self.dest)
            except OSError as exc:
                raise _error("rename the new version into", self.dest, exc) from exc
        else:
            _rename(self.tmp, self.dest, "rename the new version into")

    def _keep_old(self) -> bool:
        """Keep the old version at the aside name: a hard link for a file (it stays in place; True), else a rename."""
        _remove(self.aside)
        if not self.tmp.is_dir() and self.dest.is_file() and not self.dest.is_symlink():
            try:
                os.link(self.dest, self.aside)
                return True
            except OSError:
                pass  # no hard links here: move it aside instead
        _rename(self.dest, self.aside, "move aside the previous version of")
        return False

    def undo(self) -> None:
        """Put the old version back, reading what is on disk, so that a recovery may repeat it after any step."""
        if _exists(self.aside):
            if _exists(self.dest) and os.path.samefile(self.aside, self.dest):
                self.aside.unlink()  # the old file, linked aside, is still in place
            else:
                if _exists(self.dest) and (self.aside.is_dir() or self.dest.is_dir()):
                    _remove(self.dest)  # the new directory (or a file where the old directory was)
                os.replace(self.aside, self.dest)
        elif not self.existed and not _exists(self.tmp) and _exists(self.dest):
            _remove(self.dest)  # the new version arrived where there was none
        if _exists(self.tmp):
            _remove(self.tmp)

    def finish(self) -> None:
        """The commit succeeded: the old version goes."""
        _remove(self.aside)

    def record(self, anchor: Path) -> dict[str, Any]:
        return {"dest": os.path.relpath(self.dest, anchor), "tmp": os.path.relpath(self.tmp, anchor),
                "aside": os.path.relpath(self.aside, anchor), "existed": self.existed}

    @classmethod
    def from_record(cls, anchor: Path, record: dict[str, Any]) -> _Replacement:
        return cls(anchor / record["tmp"], anchor / record["dest"], anchor / record["aside"], bool(record["existed"]))


JOURNAL_PREFIX = ".pgolf-commit-"  # + PID + ".json": a commit of several outputs in progress, in their common directory


class _Journal:
    """The replacements of a commit of several outputs, on disk while they are made.

    Written (flushed) before the first replacement and deleted once the last is flushed:
    that deletion is the commit point. While it exists its process holds an exclusive
    ``flock`` on it, which the system releases when the process dies however it dies, so
    a journal whose lock can be taken was abandoned and :func:`recover` rolls it back.
    """

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    @classmethod
    def begin(cls, replacements: list[_Replacement]) -> _Journal:
        anchor = Path(os.path.commonpath([os.path.abspath(r.dest.parent) for r in replacements]))
        path = anchor / f"{JOURNAL_PREFIX}{os.getpid()}.json"
        part = path.with_suffix(".part")  # renamed in once complete: a journal is never read half-written
        text = json.dumps({"pid": os.getpid(), "outputs": [r.record(anchor) for r in replacements]}, indent=1)
        try:
            fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            raise _error("write the commit journal", path, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, text.encode("utf-8"))
            os.fsync(fd)
            os.rename(part, path)
            _fsync_dir(anchor)
        except OSError as exc:
            for written in (part, path):
                with contextlib.suppress(OSError):
                    written.unlink()
            os.close(fd)
            raise _error("write the commit journal", path, exc) from exc
        return cls(path, fd)

    def commit(self) -> None:
        """The commit point: once the journal is gone, the new outputs stand."""
        try:
            self.path.unlink()
            _fsync_dir(self.path.parent)
        except OSError as exc:
            raise _error("remove the commit journal", self.path, exc) from exc

    def close(self, rolled_back: bool = True) -> None:
        """Release the lock, first removing the journal if its commit was wholly rolled back here; a journal
        left behind is an abandoned commit from now on, which the next ``recover`` finishes rolling back."""
        if rolled_back:
            with contextlib.suppress(OSError):
                self.path.unlink()
        os.close(self.fd)


def _recover_journals(path: Path) -> set[int]:
    """Roll back every abandoned commit journal (in ``path``'s ancestors) that names ``path``; the PIDs of the
    journals whose commit is still running."""
    target = Path(os.path.abspath(path))
    running: set[int] = set()
    for directory in target.parents:
        try:
            names = [entry.name for entry in os.scandir(directory) if entry.name.startswith(JOURNAL_PREFIX)]
        except OSError:
            continue
        for name in names:
            pid = _roll_back_abandoned(directory / name, target)
            if pid is not None:
                running.add(pid)
    return running


def _roll_back_abandoned(journal: Path, target: Path) -> int | None:
    """Roll back ``journal`` if its process is gone and it names ``target``; its PID if its commit is running."""
    try:
        fd = os.open(journal, os.O_RDWR)
    except FileNotFoundError:
        return None  # committed (or rolled back) meanwhile
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            match = re.fullmatch(rf"{re.escape(JOURNAL_PREFIX)}(\d+)\.(json|part)", journal.name)
            return int(match.group(1)) if match else None
        if not _exists(journal) or os.fstat(fd).st_ino != journal.stat().st_ino:
            return None  # removed or replaced before the lock was ours
        if journal.suffix == ".part":  # its process died before the first replacement
            journal.unlink()
            return None
        try:
            outputs = json.loads(os.read(fd, os.fstat(fd).st_size).decode("utf-8"))["outputs"]
            replacements = [_Replacement.from_record(journal.parent, record) for record in outputs]
        except (ValueError, KeyError, TypeError) as exc:
            raise OutputError(f"cannot recover the commit of {journal}: unreadable journal ({exc})") from None
        if target not in {Path(os.path.abspath(r.dest)) for r in replacements}:
            return None
        for replacement in reversed(replacements):
            replacement.undo()
        for parent in dict.fromkeys(r.dest.parent for r in replacements):
            _fsync_dir(parent)
        journal.unlink()
        _fsync_dir(journal.parent)
        return None
    finally:
        os.close(fd)


def _commit(pairs: list[tuple[Path, Path]]) -> None:
    """Replace every destination by its temporary, in order; all or (on failure, or after a crash) none.

    A commit of several outputs is journaled (:class:`_Journal`), so that a crash between two of
    its renames is rolled back by the next :func:`recover` of any of them.
    """
    for tmp, dest in pairs:
        try:
            if _exists(tmp):
                fsync_tree(tmp)
            _fsync_dir(dest.parent)
        except OSError as exc:
            raise _error("flush to disk", dest, exc) from exc
    replacements = [_Replacement(tmp, dest) for tmp, dest in pairs]
    journal = _Journal.begin(replacements) if len(replacements) > 1 else None
    rolled_back = True
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
        if journal is not None:
            journal.commit()
    except BaseException:
        for replacement in reversed(replacements):
            try:
                replacement.undo()
            except OSError:
                rolled_back = False  # the journal stays: recover finishes the rollback
        raise
    finally:
        if journal is not None:
            journal.close(rolled_back)
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
        """``obj`` as JSON; a NaN or infinite number anywhere in it is refused, naming the file and the key."""
        check_finite_numbers(obj, str(dest))
        self.write_text(dest, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def write_csv(self, dest: str | Path, rows: list[dict[str, Any]]) -> None:
        self.write_text(dest, csv_text(rows, dest))

    def pending(self) -> list[tuple[Path, Path]]:
        """(temporary path, destination) of every output registered so far, in order."""
        return list(self._pairs)

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
    """Yield a temporary path; on success it replaces ``path`` (file or directory).

    A write that fails inside the block (disk full, file too large: an ``OSError`` that names
    no file) is reported as one ``OutputError`` naming ``path``.
    """
    with stage_outputs() as outputs:
        tmp = outputs.path(path)
        try:
            yield tmp
        except OutputError:
            raise
        except OSError as exc:
            if exc.filename is not None or exc.errno is None:
                raise
            raise _error("write", Path(path), exc) from exc


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


class NonFiniteValue(ValueError):
    """A metric or record that holds NaN or infinity: no output commits it."""


def check_finite_numbers(obj: Any, where: str) -> None:
    """Refuse ``obj`` (JSON-like) if a number in it is NaN or infinite, naming ``where`` and the key."""
    found = _first_non_finite(obj, ())
    if found is not None:
        keys, value = found
        raise NonFiniteValue(f"{where}: {'.'.join(map(str, keys)) or 'the value'} is {value}: refusing to commit a "
                             "non-finite number (NaN or inf)")


def _first_non_finite(obj: Any, keys: tuple) -> tuple[tuple, float] | None:
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (keys, obj)
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        if (found := _first_non_finite(value, (*keys, key))) is not None:
            return found
    return None


class Busy(ValueError):
    """A lock another live process holds (names the lock file and its holder)."""


@contextlib.contextmanager
def exclusive_lock(path: str | Path, holder: str, hint: str = "") -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` for the block, or refuse at once naming who holds it.

    The file records ``holder`` and the PID while locked; the system releases the lock when
    the process ends, however it ends, so a lock is never left behind by a killed run.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise _error("create the lock", path, exc) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held_by = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
            raise Busy(f"{path}: locked by {held_by}{hint}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{holder} (pid {os.getpid()})\n".encode("utf-8"))
        yield
    finally:
        os.close(fd)


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

