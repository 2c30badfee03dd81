"""What a submission ships and counts: the exported script, the closure it bundles, its bytes, and the size gate."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from pgolf.artifact.size import SizeLimitError, check_size
from pgolf.submit.bundle import code_bytes, import_closure, read_bundle, script_text, shipped_source


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


def test_code_bytes_are_the_scripts_length_and_its_bundle_the_closure(tmp_path):
    source = "def f(x):\n    return x + 1\n" * 200
    write(tmp_path, "pgolf/__init__.py", "")
    write(tmp_path, "pgolf/a.py", "from pgolf.b import f\n" + source)
    write(tmp_path, "pgolf/b.py", source)
    params = {"train": {"seed": 7}}
    for compressed in (True, False):
        script = script_text(["pgolf/a.py"], params, compressed, tmp_path)
        assert code_bytes(["pgolf/a.py"], params, compressed, tmp_path) == len(script.encode())
        assert read_bundle(script) == {"params": params, "files": {
            name: shipped_source((tmp_path / name).read_text(), name)
            for name in ["pgolf/__init__.py", "pgolf/a.py", "pgolf/b.py"]}}
    raw = sum((tmp_path / name).stat().st_size for name in ["pgolf/a.py", "pgolf/b.py"])
    assert code_bytes(["pgolf/a.py"], params, True, tmp_path) < raw // 5  # one brotli stream


def test_a_missing_entry_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="pgolf/nope.py"):
        code_bytes(["pgolf/nope.py"], {}, root=tmp_path)


def test_the_script_runs_its_entry_and_refuses_an_uncounted_project_module(tmp_path):
    """A bundled module that imports a project file the closure missed fails, never loads it from elsewhere."""
    write(tmp_path, "pgolf/__init__.py", "")
    write(tmp_path, "pgolf/entry.py", "import importlib\nfrom pgolf.util import twice\n"
          "def main(params, script):\n    print(twice(params['x']))\n"
          "    importlib.import_module(params['module'])\n    return 0\n")
    write(tmp_path, "pgolf/util.py", "def twice(x):\n    return 2 * x\n")
    write(tmp_path, "pgolf/hidden.py", "")  # imported by name at run time: not in the closure
    for module, expected in (("json", 0), ("pgolf.hidden", 1)):
        script = tmp_path / "run" / "train_gpt.py"
        script.parent.mkdir(exist_ok=True)
        script.write_text(script_text(["pgolf/entry.py"], {"x": 21, "module": module}, root=tmp_path))
        result = subprocess.run([sys.executable, "train_gpt.py"], cwd=script.parent, capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(tmp_path)})  # an importable pgolf beside it
        assert result.returncode == expected and result.stdout.startswith("42"), result.stderr
    assert "pgolf.hidden is not in this submission" in result.stderr


def test_the_shipped_code_is_everything_the_runner_imports():
    """The runner's closure holds training, quantization, compression and evaluation, and no stage."""
    closure = import_closure(["pgolf/submit/runner.py"])
    assert {"pgolf/train/loop.py", "pgolf/quant/gptq.py", "pgolf/artifact/codec.py", "pgolf/eval/score.py", "pgolf/quant/calibrate.py"} <= set(closure)
    assert not any(name.startswith("stages/") for name in closure)
    assert "pgolf/pipeline/plots.py" not in closure and "pgolf/submit/export.py" not in closure


def test_the_gate_names_size_limit_and_overshoot():
    check_size(900, 100, 1000)  # exactly at the limit fits
    with pytest.raises(SizeLimitError, match=r"900 artifact \+ 101 code = 1,001 bytes, over the limit of 1,000 by 1"):
        check_size(900, 101, 1000)


def test_shipped_code_drops_docstrings_and_comments_but_runs_the_same():
    source = ('"""Module doc."""\nimport math\n\n\ndef area(r):\n    """Doc."""\n    # why: a comment\n'
              '    return math.pi * r ** 2\n\n\nclass Empty:\n    """Only a docstring."""\n')
    shipped = shipped_source(source, "m.py")
    assert "doc" not in shipped.lower() and "comment" not in shipped and len(shipped) < len(source)
    scope: dict = {}
    exec(compile(shipped, "m.py", "exec"), scope)
    assert scope["area"](2.0) == math.pi * 4 and isinstance(scope["Empty"](), scope["Empty"])
