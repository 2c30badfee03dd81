"""Documents in, one at a time: the JSON Lines reader and the embedded default corpus.

The tokenize stage reads a documents file (one ``{"text": ...}`` object per
line, the format of FineWeb's ``docs_selected.jsonl``) as a stream, so memory
does not grow with the file. When no file is configured it builds one from
real, human-written English text that every Python install carries offline:
the docstrings of the standard library's modules, classes and functions, and
the language-reference topics that ``pydoc`` ships. The result depends only on
the Python version; its sha256 goes into the dataset manifest. The larger
``stdlib_torch`` corpus (the research preset's, about 14 MB) adds the docstrings
of torch and of the packages torch itself requires, so it too is on every
install of pgolf; its documents are put in the order of their sha256, so that
the validation split (the first documents) is a fair sample of the whole.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import sys
import sysconfig
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

# Parts of the standard library that distributions often package separately
# (or leave out), and generated files: skipping them keeps the corpus the same
# for every install of one Python version.
SKIPPED_DIRS = frozenset(
    {
        "test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "lib2to3",
        "ensurepip", "site-packages", "dist-packages", "__pycache__",
    }
)
SKIPPED_PREFIXES = ("_sysconfigdata", "config-")
# Shorter docstrings are mostly one-line stubs ("Return self.") repeated everywhere.
MIN_DOC_CHARS = 80
TOPICS_MODULE = Path("pydoc_data") / "topics.py"
# torch and what torch 2.13 requires (or its requirements do): installed wherever pgolf is.
TORCH_PACKAGES = ("torch", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "fsspec", "filelock",
                  "typing_extensions")
EMBEDDED_CORPORA = ("stdlib", "stdlib_torch")


class CorpusError(ValueError):
    """A documents file that cannot be read as JSON Lines of {"text": ...}."""


def iter_documents(path: str | Path, on_line: Callable[[bytes], None] | None = None) -> Iterator[str]:
    """Yield the ``"text"`` of each line of a JSON Lines file, streaming.

    ``on_line`` sees every raw line (bytes) first, e.g. to hash the file or
    drive a progress bar. Errors name the file and the 1-based line number.
    """
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: documents file not found")
    count = 0
    with open(path, "rb") as handle:
        for count, line in enumerate(handle, start=1):
            if on_line is not None:
                on_line(line)
            yield parse_line(line, path, count)
    if count == 0:
        raise CorpusError(f"{path}: documents file is empty (expected JSON Lines of {{\"text\": ...}})")


def parse_line(line: bytes, path: Path, line_number: int) -> str:
    where = f"{path}:{line_number}"
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorpusError(f"{where}: line is not valid JSON ({exc})") from None
    if not isinstance(record, dict) or "text" not in record:
        raise CorpusError(f"{where}: expected an object with a \"text\" field")
    text = record["text"]
    if not isinstance(text, str):
        raise CorpusError(f"{where}: \"text\" must be a string, got {type(text).__name__}")
    return text


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def embedded_documents(root: Path | None = None) -> Iterator[str]:
    """The default corpus: standard-library docstrings, then the pydoc topics.

    Files are visited in sorted path order and each docstring is cleaned as
    ``inspect.getdoc`` does; a text seen before is not repeated.
    """
    root = root or stdlib_dir()
    docstrings = (text for path in stdlib_sources(root) for text in module_docstrings(path))
    return _distinct(itertools.chain(docstrings, pydoc_topics(root / TOPICS_MODULE)))


def _distinct(texts: Iterator[str], seen: set[str] | None = None) -> Iterator[str]:
    """The texts of at least MIN_DOC_CHARS characters not seen before, in order."""
    seen = set() if seen is None else seen
    for text in texts:
        if len(text) >= MIN_DOC_CHARS and text not in seen:
            seen.add(text)
            yield text


def package_sources(package: str) -> list[Path]:
    """The Python files of an installed top-level ``package`` (tests left out), sorted; [] if absent."""
    try:
        files = metadata.files(package.replace("_", "-")) or []
    except metadata.PackageNotFoundError:
        return []
    paths = [Path(str(file.locate())) for file in files
             if file.suffix == ".py" and not SKIPPED_DIRS.intersection(file.parts[:-1])]
    return sorted(p for p in paths if p.is_file())


def stdlib_torch_documents() -> list[str]:
    """The research corpus: the default corpus plus torch's and its requirements' docstrings, by sha256."""
    seen: set[str] = set()
    texts = list(_distinct(embedded_documents(), seen))
    for package in TORCH_PACKAGES:
        texts.extend(_distinct((t for path in package_sources(package) for t in module_docstrings(path)), seen))
    return sorted(texts, key=lambda text: hashlib.sha256(text.encode("utf-8")).digest())


def package_versions() -> dict[str, str]:
    """The installed version of each of TORCH_PACKAGES (for the manifest)."""
    versions = {}
    for package in TORCH_PACKAGES:
        try:
            versions[package] = metadata.version(package.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return versions


def stdlib_sources(root: Path) -> list[Path]:
    if not root.is_dir():
        raise CorpusError(f"{root}: Python standard library sources not found (needed by the embedded corpus)")
    sources = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(part in SKIPPED_DIRS for part in parts[:-1]):
            continue
        if any(part.startswith(SKIPPED_PREFIXES) for part in parts):
            continue
        if path.relative_to(root) != TOPICS_MODULE:
            sources.append(path)
    if not sources:
        raise CorpusError(f"{root}: no Python sources found for the embedded corpus")
    return sources


def module_docstrings(path: Path) -> Iterator[str]:
    """Docstrings of a module and of its classes and functions, in source order."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):
        return  # a few stdlib files are deliberately invalid (tokenizer test data)
    documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = [node for node in ast.walk(tree) if isinstance(node, documented)]
    nodes.sort(key=lambda node: getattr(node, "lineno", 0))
    for node in nodes:
        text = ast.get_docstring(node, clean=True)
        if text:
            yield text


def pydoc_topics(path: Path) -> Iterator[str]:
    """The language-reference topics (``pydoc_data.topics``), one document per topic, by name."""
    if not path.is_file():
        return
    tree = ast.parse(path.read_bytes(), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            topics = ast.literal_eval(node.value)
            for name in sorted(topics):
                text = topics[name].strip()
                if text:
                    yield text


def write_embedded_corpus(path: str | Path, max_docs: int = 0, corpus: str = "stdlib") -> dict[str, object]:
    """Write an embedded corpus (its first ``max_docs`` documents; 0: all) as JSON Lines.

    Returns its provenance: source, Python version, documents, bytes, sha256.
    """
    if corpus not in EMBEDDED_CORPORA:
        raise CorpusError(f"unknown embedded corpus {corpus!r}: expected one of {', '.join(EMBEDDED_CORPORA)}")
    texts = embedded_documents() if corpus == "stdlib" else iter(stdlib_torch_documents())
    digest = hashlib.sha256()
    documents = size = 0
    with open(path, "wb") as handle:
        for text in itertools.islice(texts, max_docs or None):
            line = (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8")
            handle.write(line)
            digest.update(line)
            documents += 1
            size += len(line)
    return {
        "source": "python-stdlib-docstrings" if corpus == "stdlib" else "python-stdlib-and-torch-docstrings",
        "python": sys.version.split()[0],
        **({"packages": package_versions()} if corpus == "stdlib_torch" else {}),
        "documents": documents,
        "bytes": size,
        "sha256": digest.hexdigest(),
    }
