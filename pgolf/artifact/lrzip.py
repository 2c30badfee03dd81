"""The lrzip program, run as a subprocess: the coder of PR #1855's per-group artifact and of lrzip-coded scripts.

``lrzip -z -L 9`` (the record's flags: rzip's long-range matching, then ZPAQ context mixing at
level 9) codes a byte string through temporary files; decoding reads lrzip's standard output and
stops it as soon as it passes the size the caller expects, which the stream's header must declare
before lrzip runs, so a corrupt or hostile stream cannot inflate without bound. No ``lrzip.conf``
may change the coding (``LRZIP=NOCONFIG``). Users: :mod:`pgolf.artifact.pergroup` (the artifact's
code groups) and :mod:`pgolf.submit.bundle` (``compress.code_compressor: lrzip``). lrzip's output
depends on its version (0.651 on Debian 12); a missing program is an error naming its package.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from pgolf.artifact.tensors import ArtifactError

LRZIP_OPTIONS = ("-z", "-L", "9")  # the record's: ZPAQ back end, level 9
LRZIP_PACKAGE = "lrzip"  # the Debian / Ubuntu package of the program
_LRZIP_MAGIC = b"LRZI"
_LRZIP_SIZE = struct.Struct("<Q")  # at byte 6 of an lrzip file: its decompressed size
_PIECE = 1 << 20  # bytes per read of lrzip's output


class LrzipError(OSError):
    """The ``lrzip`` program failed to code a byte string."""


class LrzipMissingError(LrzipError):
    """The ``lrzip`` program is not installed."""


def lrzip_program() -> str:
    """The path of ``lrzip``, or an error naming the package that provides it."""
    found = shutil.which("lrzip")
    if found is None:
        raise LrzipMissingError(
            "compress.compressor pergroup and compress.code_compressor lrzip need the lrzip program, which is not "
            f"installed: install the Debian/Ubuntu package '{LRZIP_PACKAGE}' (apt-get install {LRZIP_PACKAGE})")
    return found


def _environment() -> dict[str, str]:
    return {**os.environ, "LRZIP": "NOCONFIG"}  # no lrzip.conf may change the coding


def lrzip_compress(data: bytes) -> bytes:
    """``lrzip -z -L 9`` of ``data`` (empty for empty data), through temporary files."""
    if not data:
        return b""
    program = lrzip_program()
    with tempfile.TemporaryDirectory(prefix="pgolf-lrzip-") as tmp:
        source, target = Path(tmp) / "data.bin", Path(tmp) / "data.lrz"
        source.write_bytes(data)
        done = subprocess.run([program, *LRZIP_OPTIONS, "-q", "-o", str(target), str(source)],
                              capture_output=True, env=_environment(), check=False)
        if done.returncode != 0 or not target.is_file():
            raise LrzipError(f"lrzip failed (exit {done.returncode}): {done.stderr.decode(errors='replace')[-500:]}")
        return target.read_bytes()


def lrzip_decompress(stream: bytes, size: int) -> bytes:
    """The ``size`` bytes of an lrzip stream, refused before lrzip runs when the stream declares
    another size and stopped as soon as its output passes ``size``."""
    if size == 0:
        if stream:
            raise ArtifactError(f"an lrzip stream of {len(stream):,} bytes where none was expected (corrupt)")
        return b""
    declared = lrzip_declared_size(stream)
    if declared != size:
        raise ArtifactError(f"lrzip stream declares {declared} bytes, expected {size:,} (corrupt)")
    program = lrzip_program()
    with tempfile.TemporaryDirectory(prefix="pgolf-lrzip-") as tmp:
        source = Path(tmp) / "data.lrz"
        source.write_bytes(stream)
        with open(Path(tmp) / "stderr", "w+b") as errors:
            process = subprocess.Popen([program, "-d", "-q", "-o", "-", str(source)], stdout=subprocess.PIPE,
                                       stderr=errors, env=_environment())
            out = _read_at_most(process, size)
            errors.seek(0)
            message = errors.read().decode(errors="replace")[-500:]
    if process.returncode != 0 or len(out) != size:
        raise ArtifactError(f"lrzip stream is corrupt or truncated: it decoded to {len(out):,} of {size:,} bytes "
                            f"(lrzip exit {process.returncode}: {message.strip()})")
    return out


def lrzip_declared_size(stream: bytes) -> int | None:
    """The decompressed size an lrzip stream's header declares; None when ``stream`` is not an lrzip stream."""
    return _LRZIP_SIZE.unpack_from(stream, 6)[0] if len(stream) >= 14 and stream[:4] == _LRZIP_MAGIC else None


def _read_at_most(process: subprocess.Popen, size: int) -> bytes:
    """``process``'s standard output, killing it once the output passes ``size`` bytes."""
    out = bytearray()
    try:
        while piece := process.stdout.read(_PIECE):
            out += piece
            if len(out) > size:
                process.kill()
                raise ArtifactError(f"lrzip stream inflates beyond the {size:,} bytes expected: refused")
    finally:
        process.stdout.close()
        process.wait()
    return bytes(out)
