"""The front page stays a front page, and every document and section the code cites exists in a plain clone."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CODE = sorted(p for top in ("pgolf", "stages", "benchmarks", "tools", "tests") for p in (REPO_ROOT / top).rglob("*.py"))
CITATION = re.compile(r"(docs/[A-Z_]+\.md)((?:,? ?§ ?\d+(?:\.\d+)*)+)?")
SECTION = re.compile(r"§ ?(\d+(?:\.\d+)*)")
OUTSIDE = re.compile(r"\b(SEEDS_SPEC|FRONTIER_SPEC|REFERENCE\.md)\b")


def citations() -> list[tuple[str, str, str | None]]:
    """(file, document, section) of every docs/X.md [§N] in the code."""
    found = []
    for path in CODE:
        if path.name == "test_docs.py":
            continue
        for match in CITATION.finditer(path.read_text(encoding="utf-8")):
            sections = SECTION.findall(match.group(2) or "") or [None]
            found += [(str(path.relative_to(REPO_ROOT)), match.group(1), section) for section in sections]
    return found


def test_the_readme_is_a_front_page():
    lines = (REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move the manual into docs/"


def test_every_document_the_readme_names_exists():
    for name in set(re.findall(r"docs/[A-Z_]+\.md", (REPO_ROOT / "README.md").read_text(encoding="utf-8"))):
        assert (REPO_ROOT / name).is_file(), name


@pytest.mark.parametrize("where,document,section", citations())
def test_every_cited_document_and_section_exists(where, document, section):
    path = REPO_ROOT / document
    assert path.is_file(), f"{where} cites {document}, which is not in the repository"
    if section is not None:
        headings = [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
        number = re.compile(rf"^#+ {re.escape(section)}[. ]")
        assert any(number.match(h) for h in headings), f"{where} cites {document} §{section}: no such section"


def test_no_code_cites_a_specification_outside_the_repository():
    cited = [(str(p.relative_to(REPO_ROOT)), m.group(1)) for p in CODE if p.name != "test_docs.py"
             for m in OUTSIDE.finditer(p.read_text(encoding="utf-8"))]
    assert not cited, f"cite docs/ instead: {cited[:10]}"
