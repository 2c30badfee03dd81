"""The lrzip program as pgolf runs it: the record's flags, exact round trips, and bounded, clear failures."""

from __future__ import annotations

import struct
import subprocess
import tracemalloc

import pytest

from pgolf.artifact import lrzip
from pgolf.artifact.tensors import ArtifactError


def test_lrzip_runs_with_the_records_flags_on_temporary_files(monkeypatch):
    calls = []
    real_run = subprocess.run

    def record(args, **kwargs):
        calls.append(list(args))
        return real_run(args, **kwargs)

    monkeypatch.setattr(lrzip.subprocess, "run", record)
    data = bytes(range(256)) * 64
    stream = lrzip.lrzip_compress(data)
    assert calls[0][1:4] == ["-z", "-L", "9"] and calls[0][-3] == "-o"
    assert lrzip.lrzip_decompress(stream, len(data)) == data


def test_the_declared_size_is_read_from_the_header_and_none_for_other_bytes():
    stream = lrzip.lrzip_compress(b"pgolf " * 1000)
    assert lrzip.lrzip_declared_size(stream) == 6000
    assert lrzip.lrzip_declared_size(b"not an lrzip stream") is None and lrzip.lrzip_declared_size(stream[:10]) is None


def test_an_lrzip_stream_inflating_beyond_the_expected_size_is_stopped():
    stream = lrzip.lrzip_compress(bytes(200_000))
    lying = stream[:6] + struct.pack("<Q", 1_000) + stream[14:]
    tracemalloc.start()
    with pytest.raises(ArtifactError, match="inflates beyond the 1,000 bytes expected|corrupt"):
        lrzip.lrzip_decompress(lying, 1_000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 << 20, f"reading lrzip's output allocated {peak:,} bytes"
