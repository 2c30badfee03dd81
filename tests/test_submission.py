"""What a submission counts: the code closure found from imports, its bytes, and the size gate."""

from __future__ import annotations

import brotli
import pytest

from pgolf.submission import SizeLimitError, check_size, code_bytes, import_closure


def write(root, name: str, text: str) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_closure_follows_every_project_import_and_nothing_else(tmp_path):
    write(tmp_path, "pgolf/__init__.py", "")
    write(tmp_path, "pgolf/entry.py", "import os\nfrom pgolf.a import f\nimport pgolf.b\n")
    write(tmp_path, "pgolf/a.py", "from pgolf import c\n")
    write(tmp_path, "pgolf/b.py", "import numpy\n")
    write(tmp_path, "pgolf/c.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pgolf import d\n")
    write(tmp_path, "pgolf/d.py", "")  # imported only for annotations: not shipped
    write(tmp_path, "pgolf/unused.py", "")
    assert import_closure(["pgolf/entry.py"], tmp_path) == [
        "pgolf/__init__.py", "pgolf/a.py", "pgolf/b.py", "pgolf/c.py", "pgolf/entry.py"]


def test_code_bytes_count_the_closure_raw_or_as_one_brotli_stream(tmp_path):
    source = "def f(x):\n    return x + 1\n" * 200
    write(tmp_path, "pgolf/__init__.py", "")
    write(tmp_path, "pgolf/a.py", "from pgolf.b import f\n" + source)
    write(tmp_path, "pgolf/b.py", source)
    files = ["pgolf/__init__.py", "pgolf/a.py", "pgolf/b.py"]
    raw = code_bytes(["pgolf/a.py"], compressed=False, root=tmp_path)
    assert raw == sum((tmp_path / name).stat().st_size for name in files)
    bundle = b"".join(f"# {name}\n".encode() + (tmp_path / name).read_bytes() for name in files)
    assert code_bytes(["pgolf/a.py"], root=tmp_path) == len(brotli.compress(bundle, quality=11)) < raw // 10


def test_a_missing_entry_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="pgolf/nope.py"):
        code_bytes(["pgolf/nope.py"], root=tmp_path)


def test_the_shipped_code_is_everything_evaluation_imports():
    """The default entry modules pull in every project module they import (none is left uncounted)."""
    closure = import_closure(["pgolf/model.py", "pgolf/codec.py", "pgolf/evaluate.py", "pgolf/tokenizer.py"])
    assert {"pgolf/config.py", "pgolf/checkpoint.py", "pgolf/shards.py", "pgolf/runtime.py"} <= set(closure)
    assert not any(name.startswith("stages/") for name in closure)


def test_the_gate_names_size_limit_and_overshoot():
    check_size(900, 100, 1000)  # exactly at the limit fits
    with pytest.raises(SizeLimitError, match=r"900 artifact \+ 101 code = 1,001 bytes, over the limit of 1,000 by 1"):
        check_size(900, 101, 1000)
