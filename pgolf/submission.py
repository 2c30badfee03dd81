"""What a submission counts: the compressed artifact plus the code that loads and scores it.

The challenge's size is compressed model bytes + code bytes, at most 16,000,000 (decimal).
The code counted is never listed by hand: it is the import closure of entry modules
(``compress.code_files``: the modules needed to load and evaluate an artifact), every
``pgolf`` module they import, directly or not, found by reading their import statements.
With ``compress.compress_code`` the closure counts as one brotli-11 stream of the files
(what the records' self-extracting scripts unpack), otherwise as their raw sizes. The size
gate lives here, so the quantize stage's size search and the compress stage count alike.
"""

from __future__ import annotations

import ast
from pathlib import Path

import brotli

from pgolf.codec import QuantizedModel, QuantizedTensor, compress, compressed_tensor_sizes, serialize
from pgolf.config import CompressConfig

PACKAGE = "pgolf"
REPO_ROOT = Path(__file__).resolve().parents[1]


class SizeLimitError(ValueError):
    """A submission over the size limit."""


def imported_modules(path: Path) -> set[str]:
    """The ``pgolf`` modules one source file imports (``pgolf.x`` names)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == PACKAGE:  # from pgolf import layout
                names |= {f"{PACKAGE}.{alias.name}" for alias in node.names}
            elif node.module.split(".")[0] == PACKAGE:
                names.add(node.module)
    return names


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except the bodies of ``if TYPE_CHECKING:`` (imports for annotations only)."""
    nodes, pending = [], [tree]
    while pending:
        node = pending.pop()
        nodes.append(node)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            pending.extend(node.orelse)
            continue
        pending.extend(ast.iter_child_nodes(node))
    return nodes


def module_file(name: str, root: Path) -> Path | None:
    """The source file of module ``name`` under ``root``, or None when it is not a module."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def import_closure(entry_files: list[str], root: Path = REPO_ROOT) -> list[str]:
    """Every project file the entry files need, themselves included (paths relative to ``root``)."""
    missing = [name for name in entry_files if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"compress.code_files: not found under {root}: {', '.join(missing)}")
    seen: set[Path] = set()
    pending = [root / name for name in entry_files]
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in imported_modules(path):
            source = module_file(module, root)
            if source is not None:
                pending.append(source)
    package_init = root / PACKAGE / "__init__.py"
    if package_init.is_file() and any(p.parent == root / PACKAGE for p in seen):
        seen.add(package_init)  # importing any pgolf module runs the package's __init__
    return sorted(str(p.relative_to(root)) for p in seen)


def code_bytes(entry_files: list[str], compressed: bool = True, root: Path = REPO_ROOT) -> int:
    """The bytes of the code a submission ships: the import closure of ``entry_files``."""
    files = import_closure(entry_files, root)
    if not compressed:
        return sum((root / name).stat().st_size for name in files)
    bundle = b"".join(f"# {name}\n".encode() + (root / name).read_bytes() for name in files)
    return len(brotli.compress(bundle, quality=11))


def submission_bytes(qm: QuantizedModel, cfg: CompressConfig, code: int) -> int:
    """Compressed artifact + code bytes of a quantized model, exactly as the compress stage counts."""
    return len(compress(serialize(qm), cfg)) + code


def check_size(artifact_bytes: int, code: int, limit: int) -> None:
    """The challenge's gate: compressed artifact + code bytes at most ``limit``."""
    total = artifact_bytes + code
    if total > limit:
        raise SizeLimitError(
            f"submission too large: {artifact_bytes:,} artifact + {code:,} code = {total:,} bytes, "
            f"over the limit of {limit:,} by {total - limit:,} bytes (raise quantize clip sigmas or lower bits)"
        )


def tensor_size_rows(qm: QuantizedModel, cfg: CompressConfig) -> list[dict]:
    """Each tensor's compressed size (compressed alone) and bits per weight, for the size plot."""
    rows = []
    for name, compressed in compressed_tensor_sizes(qm, cfg).items():
        tensor = qm.tensors[name]
        quantized = isinstance(tensor, QuantizedTensor)
        numel = tensor.q.numel() if quantized else tensor.numel()
        rows.append({
            "tensor": name,
            "kind": "quantized" if quantized else "passthrough",
            "bits": tensor.bits if quantized else 8 * tensor.element_size(),
            "numel": numel,
            "compressed_bytes": compressed,
            "bits_per_weight": round(8 * compressed / max(numel, 1), 4),
        })
    return rows
