"""The parameter reference, generated from ``pgolf/config.py``: one source for every key's meaning.

Each section of ``params.yaml`` is a dataclass of :mod:`pgolf.config`; this module renders
them as Markdown: the section's docstring, then per key what it allows (from the field's
type), its default (the record's value) and what it is (the comments written beside and
above the field in config.py), and whether a change re-runs anything (a run setting does
not). ``pgolf params --reference`` prints it; ``python -m pgolf.pipeline.reference --write``
writes docs/PARAMS.md, which a test holds to this output.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
from pathlib import Path

from pgolf import config

FIELD = re.compile(r"^    (\w+): ")  # a dataclass field, at the class body's indent
REFERENCE_FILE = Path(__file__).resolve().parents[2] / "docs" / "PARAMS.md"


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the source: the ``#`` lines right above it and the one beside it."""
    comments: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsourcelines(cls)[0]:
        text = line.strip()
        field = FIELD.match(line)
        if text.startswith("#"):
            above.append(text.lstrip("#").strip())
        elif field:
            beside = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            comments[field.group(1)] = " ".join(part for part in (*above, beside) if part)
            above = []
        else:
            above = []
    return comments


def section_table(name: str, cls: type) -> str:
    comments = field_comments(cls)
    hints = config.type_hints(cls)
    outputs = set(config.output_keys(cls))
    rows = [f"## `{name}:`", "", inspect.getdoc(cls) or "", "",
            "| key | allowed | default | what it is |", "| --- | --- | --- | --- |"]
    for field in dataclasses.fields(cls):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        note = comments.get(field.name, "")
        if field.name not in outputs:
            note = (note + " " if note else "") + "(a run setting: changing it re-runs nothing)"
        cells = [f"`{field.name}`", config.describe(hints[field.name]), f"`{default!r}`", note]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"


def reference() -> str:
    head = ("# Parameter reference\n\nGenerated from `pgolf/config.py` by `python -m pgolf.pipeline.reference "
            "--write` (`pgolf params --reference` prints it); do not edit by hand. Defaults are the record's "
            "values (PR #1394); `params.yaml` and every preset spell out every key, so `dvc exp run -S` finds "
            "any of them. A value outside what a key allows is one error naming the file, section, key, value "
            "and range, before any work.\n")
    return "\n".join([head] + [section_table(name, cls) for name, cls in config.SECTIONS.items()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pgolf.pipeline.reference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"write {REFERENCE_FILE.name} (else print)")
    args = parser.parse_args(argv)
    if args.write:
        REFERENCE_FILE.write_text(reference(), encoding="utf-8")
        print(f"wrote {REFERENCE_FILE}")
    else:
        print(reference(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
