"""Tree shaking: a module ships what the entry's main reaches, and the shaken code runs as the whole code did."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pgolf.submit.shake import shake
from tests.submit.test_bundle import write


def top_level_names(source: str) -> set[str]:
    """The names the top-level statements of ``source`` bind or import."""
    names = set()
    for stmt in ast.parse(source).body:
        if isinstance(stmt, (ast.FunctionDef, ast.ClassDef)):
            names.add(stmt.name)
        elif isinstance(stmt, ast.Assign):
            names |= {t.id for t in stmt.targets if isinstance(t, ast.Name)}
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in stmt.names}
    return names


def run_shaken(files: dict[str, str], root: Path) -> str:
    """``repr(main())`` of the shaken entry, in a fresh interpreter that sees only the shaken modules."""
    for path, source in files.items():
        write(root, path, source)
    result = subprocess.run([sys.executable, "-c", "from pgolf.entry import main; print(repr(main()))"], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def write_tree(root: Path, files: dict[str, str]) -> None:
    for path, source in {"pgolf/__init__.py": "", **files}.items():
        write(root, path, source)


PROJECT = {
    "pgolf/__init__.py": "VERSION = '1'\n",
    "pgolf/room/__init__.py": "",
    "pgolf/entry.py": (
        "from __future__ import annotations\n"
        "import json\nimport os\n"
        "from pgolf.room import tools\nfrom pgolf.room.shapes import Square, area\n"
        "from pgolf.room.unused import nothing\n"
        "LIMIT = 3\nUNUSED_CONSTANT = 4\n"
        "def helper() -> int:\n    return LIMIT\n"
        "def main():\n    return [area(Square(helper())), tools.double(2), tools.lazy(), json.dumps(1)]\n"
        "def never() -> os.PathLike:\n    return nothing()\n"
    ),
    "pgolf/room/shapes.py": (
        "from __future__ import annotations\n"
        "from dataclasses import dataclass\nfrom typing import TYPE_CHECKING\n"
        "from pgolf.room.units import Metres, Unused\n"
        "if TYPE_CHECKING:\n    from pgolf.room.typing_only import Shape\n"
        "@dataclass\nclass Square:\n    side: Metres\n    def describe(self) -> Shape:\n        return squared(self)\n"
        "def squared(shape: Unused) -> int:\n    return shape.side ** 2\n"
        "def area(shape):\n    return squared(shape)\n"
        "def perimeter(shape):\n    return 4 * shape.side\n"
    ),
    "pgolf/room/units.py": "Metres = int\nUnused = float\nREGISTRY = {}\nREGISTRY['m'] = Metres\n",
    "pgolf/room/typing_only.py": "Shape = object\n",
    "pgolf/room/tools.py": (
        "def double(x):\n    return 2 * x\n"
        "def lazy():\n    from pgolf.room.later import value\n    return value()\n"
        "def dead():\n    from pgolf.room.never import value\n    return value()\n"
    ),
    "pgolf/room/later.py": "def value():\n    return 'later'\ndef other():\n    return 0\n",
    "pgolf/room/never.py": "def value():\n    return 'never'\n",
    "pgolf/room/unused.py": "def nothing():\n    return None\n",
}


def test_only_what_main_reaches_ships_and_it_runs_as_before(tmp_path):
    write_tree(tmp_path / "src", PROJECT)
    files = shake(["pgolf/entry.py"], tmp_path / "src")
    assert sorted(files) == ["pgolf/__init__.py", "pgolf/entry.py", "pgolf/room/__init__.py", "pgolf/room/later.py",
                             "pgolf/room/shapes.py", "pgolf/room/tools.py", "pgolf/room/units.py"]
    assert top_level_names(files["pgolf/entry.py"]) == {"annotations", "json", "tools", "Square", "area", "LIMIT",
                                                         "helper", "main"}
    # a class ships whole (its method's call keeps squared); perimeter, never read, does not; nor do the
    # annotations-only imports (TYPE_CHECKING, Unused); a class-level annotation (Metres) is evaluated: kept
    assert top_level_names(files["pgolf/room/shapes.py"]) == {"annotations", "dataclass", "Metres", "Square",
                                                               "squared", "area"}
    # REGISTRY['m'] = ... only configures REGISTRY, which no one reads; the lazy import keeps later.value, not other
    assert top_level_names(files["pgolf/room/units.py"]) == {"Metres"}
    assert "REGISTRY" not in files["pgolf/room/units.py"]
    assert top_level_names(files["pgolf/room/later.py"]) == {"value"}
    assert top_level_names(files["pgolf/room/tools.py"]) == {"double", "lazy"}
    assert files["pgolf/__init__.py"] == ""  # VERSION is read by no one
    assert run_shaken(files, tmp_path / "shipped") == "[9, 4, 'later', '1']"


def test_a_module_used_as_a_value_ships_whole_and_attributes_keep_their_names(tmp_path):
    write_tree(tmp_path, {
        "pgolf/entry.py": "import pgolf.deep as d\nfrom pgolf import deeper\n"
                          "def main():\n    return d.one() + getattr(deeper, 'two')()\n",
        "pgolf/deep.py": "def one():\n    return 1\ndef unused():\n    return 0\n",
        "pgolf/deeper.py": "def two():\n    return 2\ndef three():\n    return 3\n"})
    files = shake(["pgolf/entry.py"], tmp_path)
    assert top_level_names(files["pgolf/deep.py"]) == {"one"}
    assert top_level_names(files["pgolf/deeper.py"]) == {"two", "three"}


def test_names_reach_through_reexports_globals_and_later_entry_files(tmp_path):
    write_tree(tmp_path, {
        "pgolf/entry.py": "from pgolf.facade import f\nCOUNT = 0\ndef main():\n    global COUNT\n    return f()\n",
        "pgolf/facade.py": "from pgolf.impl import f, g\n",
        "pgolf/impl.py": "def f():\n    return 1\ndef g():\n    return 2\ndef h():\n    return 3\n",
        "pgolf/extra.py": "from pgolf.impl import h\ndef anything():\n    return h()\n"})
    files = shake(["pgolf/entry.py"], tmp_path)
    assert top_level_names(files["pgolf/facade.py"]) == {"f"} and top_level_names(files["pgolf/impl.py"]) == {"f"}
    assert "COUNT" in top_level_names(files["pgolf/entry.py"])
    files = shake(["pgolf/entry.py", "pgolf/extra.py"], tmp_path)  # a later entry file ships whole
    assert top_level_names(files["pgolf/impl.py"]) == {"f", "h"} and "anything" in files["pgolf/extra.py"]


def test_a_left_out_module_ships_only_behind_a_lazy_import(tmp_path):
    write_tree(tmp_path, {
        "pgolf/entry.py": "def main(option=False):\n    if option:\n"
                          "        from pgolf.option import run\n        return run()\n    return 0\n",
        "pgolf/option.py": "def run():\n    return 1\n"})
    assert "pgolf/option.py" in shake(["pgolf/entry.py"], tmp_path)
    files = shake(["pgolf/entry.py"], tmp_path, frozenset({"pgolf.option"}))
    assert "pgolf/option.py" not in files and "from pgolf.option import run" in files["pgolf/entry.py"]
    write(tmp_path, "pgolf/entry.py", "from pgolf.option import run\ndef main():\n    return run()\n")
    with pytest.raises(ValueError, match="pgolf.option is left out of this submission but a module imports it"):
        shake(["pgolf/entry.py"], tmp_path, frozenset({"pgolf.option"}))


def test_a_missing_entry_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="pgolf/nope.py"):
        shake(["pgolf/nope.py"], tmp_path)


def test_a_module_imported_inside_a_function_keeps_the_names_read_from_it(tmp_path):
    write_tree(tmp_path, {"pgolf/entry.py": "def main():\n    from pgolf import coder\n    return coder.VERSION\n",
                          "pgolf/coder.py": "VERSION = 3\nOTHER = 4\n"})
    assert top_level_names(shake(["pgolf/entry.py"], tmp_path)["pgolf/coder.py"]) == {"VERSION"}
    files = shake(["pgolf/entry.py"], tmp_path, frozenset({"pgolf.coder"}))
    assert "pgolf/coder.py" not in files


def test_a_statement_that_configures_a_definition_ships_with_it_and_other_statements_always(tmp_path):
    write_tree(tmp_path, {
        "pgolf/entry.py": "from pgolf.loaders import Loader\ndef main():\n    return Loader.extra\n",
        "pgolf/loaders.py": "import os\nclass Loader:\n    pass\nLoader.extra = 5\nclass Other:\n    pass\n"
                            "Other.register(1)\nprint(os.sep)\n"})
    shipped = shake(["pgolf/entry.py"], tmp_path)["pgolf/loaders.py"]
    assert "Loader.extra = 5" in shipped and "Other" not in shipped and "print(os.sep)" in shipped
