"""Tree shaking: of each module the submission imports, only the statements its entry can reach.

The exported script ships what the runner runs (:mod:`pgolf.submit.bundle`), and a module the
runner imports for one function would bring all the others with it: the pipeline's writers, the
readers of older formats, the helpers of stages. :func:`shake` reads the syntax trees from the
entry's ``main`` outwards and keeps, of each module, the top-level definitions (functions,
classes, names assigned, with the statements that only configure one: ``X.method(...)``,
``X.attr = v``) that kept code names, and every other top-level statement of a module that
loads at all. A name read in kept code keeps what binds it in that module, or, imported from a
project module, what binds it there (through re-exports); ``module.name`` keeps ``name`` of
that module; a module used as a value (passed, not read as ``module.name``) keeps all of it;
an import inside a function loads its module, unless that module is left out (an option the
baked params switch off: its lazy import stays and is never run; importing one where a module
loads is an error). Imports that no kept statement reads are dropped, and a module that
nothing kept imports does not ship. A name counts wherever it is read, whatever it refers to
there (a local of the same name keeps the global too), so the rule errs only towards shipping
more; a class ships whole. What it cannot see is a name built at run time (``globals()[...]``,
``getattr(module, text)`` on a module it did not see passed), which the shipped modules do not
use. Annotations of function signatures are never evaluated (every shipped module starts with
``from __future__ import annotations``; the minifier then drops them), so they keep nothing;
class-level ones are evaluated by ``typing.get_type_hints`` (the config sections check their
fields by them, the runner finds its sections by them) and keep what they name.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "pgolf"
ENTRY_FUNCTION = "main"


@dataclass
class Module:
    """One project module as the shaker reads it."""

    name: str  # dotted: pgolf.room.module (a package's name for its __init__.py)
    path: str  # relative to the root: pgolf/room/module.py
    tree: ast.Module
    binders: dict[str, list[ast.stmt]] = field(default_factory=dict)  # top-level name -> the statements binding it
    # local name -> what it imports: (module, name) or (module, None) for ``import pgolf.a.b`` (several, for ``pgolf``)
    imports: dict[str, list[tuple[str, str | None]]] = field(default_factory=dict)
    local_imports: dict[str, list[tuple[str, str | None]]] = field(default_factory=dict)  # those inside functions
    postponed: bool = False  # ``from __future__ import annotations``: signature annotations are never evaluated


def module_file(name: str, root: Path) -> Path | None:
    """The source file of module ``name`` under ``root``, or None when it is not a module."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_module(name: str, root: Path) -> bool:
    return module_file(name, root) is not None


def read_module(name: str, root: Path) -> Module:
    source = module_file(name, root)
    if source is None:
        raise FileNotFoundError(f"module {name} is not under {root}")
    path = source.relative_to(root).as_posix()
    tree = ast.parse(source.read_text(encoding="utf-8"), filename=path)
    module = Module(name, path, tree)
    for stmt in tree.body:
        for bound in bound_names(stmt) or [name for name in [configured_name(stmt)] if name in module.binders]:
            module.binders.setdefault(bound, []).append(stmt)
        if isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__":
            module.postponed |= any(alias.name == "annotations" for alias in stmt.names)
        for local, target in project_imports(stmt):
            module.imports.setdefault(local, []).append(target)
        for node in ast.walk(stmt) if not isinstance(stmt, (ast.Import, ast.ImportFrom)) else ():
            for local, target in project_imports(node):
                module.local_imports.setdefault(local, []).append(target)
    return module


def bound_names(stmt: ast.stmt) -> list[str]:
    """The names a top-level definition binds; [] for every other statement (those always run)."""
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [stmt.name]
    if isinstance(stmt, (ast.AnnAssign, ast.AugAssign)):
        return [stmt.target.id] if isinstance(stmt.target, ast.Name) else []
    if isinstance(stmt, ast.Assign):
        names = [name for target in stmt.targets for name in target_names(target)]
        return names if all(target_names(target) for target in stmt.targets) else []
    return []


def configured_name(stmt: ast.stmt) -> str | None:
    """The name a statement only configures (``X.method(...)``, ``X.attr = v``, ``X[k] = v``), or None: such a
    statement belongs to ``X``'s definition when ``X`` is one (it runs, and ships, with it)."""
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
        target = stmt.value.func
    elif isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
        target = stmt.targets[0]
    else:
        return None
    if isinstance(target, (ast.Attribute, ast.Subscript)) and isinstance(target.value, ast.Name):
        return target.value.id
    return None


def target_names(target: ast.expr) -> list[str]:
    """The names an assignment target binds, or [] when it also stores elsewhere (``a.b = ``, ``a[i] = ``)."""
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        names = [target_names(element) for element in target.elts]
        return [name for group in names for name in group] if all(names) else []
    return []


def project_imports(stmt: ast.AST) -> Iterator[tuple[str, tuple[str, str | None]]]:
    """``(local name, (module, imported name or None))`` of each project import an import statement binds
    (absolute imports: the project uses no relative ones)."""
    if isinstance(stmt, ast.Import):
        for alias in stmt.names:
            if alias.name.split(".")[0] == PACKAGE:
                yield alias.asname or PACKAGE, (alias.name, None)
    elif isinstance(stmt, ast.ImportFrom) and stmt.level == 0 and (stmt.module or "").split(".")[0] == PACKAGE:
        for alias in stmt.names:
            yield alias.asname or alias.name, (stmt.module, alias.name)


def is_type_checking_block(stmt: ast.stmt) -> bool:
    """``if TYPE_CHECKING:`` (imports for annotations only): never runs, never ships."""
    return isinstance(stmt, ast.If) and isinstance(stmt.test, ast.Name) and stmt.test.id == "TYPE_CHECKING"


class Shaker:
    """The reachability walk: which modules load, and which statements and imported names of each are kept."""

    def __init__(self, root: Path, left_out: frozenset[str] = frozenset()) -> None:
        self.root = root
        self.left_out = left_out  # modules that must not load: only a lazy import of one may stay in kept code
        self.modules: dict[str, Module] = {}
        self.kept: set[int] = set()  # id() of kept top-level statements
        self.used: dict[str, set[str]] = {}  # module -> the names read in its kept code
        self._pending: list[tuple[str, ast.AST]] = []  # (module, node) still to read

    def run(self, entry: str, whole: list[str]) -> None:
        """Walk from ``entry``'s ``main`` and from every name of the modules in ``whole``."""
        self.use(entry, ENTRY_FUNCTION)
        for module in whole:
            self.use_all(module)
        while self._pending:
            module, node = self._pending.pop()
            self._read(self.modules[module], node)

    def load(self, name: str) -> Module:
        """Import module ``name``: every package above it and its own non-definition statements run."""
        if name in self.modules:
            return self.modules[name]
        if name in self.left_out:
            raise ValueError(f"{name} is left out of this submission but a module imports it where it loads: "
                             "import it inside the branch of the option that needs it")
        module = self.modules[name] = read_module(name, self.root)
        self.used[name] = set()
        parts = name.split(".")
        for depth in range(1, len(parts)):
            if _is_module(".".join(parts[:depth]), self.root):
                self.load(".".join(parts[:depth]))
        definitions = {id(stmt) for stmts in module.binders.values() for stmt in stmts}
        for stmt in module.tree.body:
            if id(stmt) not in definitions and not isinstance(stmt, (ast.Import, ast.ImportFrom)) \
                    and not is_type_checking_block(stmt):
                self.keep(name, stmt)
        return module

    def keep(self, module: str, stmt: ast.stmt) -> None:
        if id(stmt) not in self.kept:
            self.kept.add(id(stmt))
            self._pending.append((module, stmt))

    def use(self, module: str, name: str) -> None:
        """Name ``name`` is read in ``module``'s kept code (or imported from it): keep what binds it."""
        found = self.load(module)
        if name in self.used[module]:
            return
        self.used[module].add(name)
        for stmt in found.binders.get(name, []):
            self.keep(module, stmt)
        imports = found.imports.get(name, [])
        for source, imported in imports:
            self.use_import(source, imported)
        if not imports and name not in found.binders and _is_module(f"{module}.{name}", self.root):
            self.load(f"{module}.{name}")  # a submodule read as an attribute of its package

    def use_import(self, source: str, name: str | None) -> None:
        if name is None:
            self.load(source)
        elif _is_module(f"{source}.{name}", self.root):
            self.load(source)
            self.load(f"{source}.{name}")
        else:
            self.use(source, name)

    def use_all(self, module: str) -> None:
        """A module used as a value: anything in it may be read."""
        for name in list(self.load(module).binders) + list(self.modules[module].imports):
            self.use(module, name)

    def module_of(self, module: Module, node: ast.expr) -> str | None:
        """The project module an expression names (``alias`` or ``alias.sub``), or None."""
        if isinstance(node, ast.Name) and (node.id in module.imports or node.id in module.local_imports):
            source, name = (module.imports.get(node.id) or module.local_imports[node.id])[0]
            if node.id == PACKAGE and name is None:  # import pgolf.a.b binds the package
                return PACKAGE
            dotted = source if name is None else f"{source}.{name}"
            return dotted if _is_module(dotted, self.root) and dotted not in self.left_out else None
        if isinstance(node, ast.Attribute):
            parent = self.module_of(module, node.value)
            if parent and _is_module(f"{parent}.{node.attr}", self.root):
                return f"{parent}.{node.attr}"
        return None

    def _read(self, module: Module, node: ast.AST) -> None:
        """Follow every name ``node`` reads (a kept statement of ``module``)."""
        attribute_values = set()
        for child in walk_evaluated(node, module.postponed):
            if isinstance(child, ast.Attribute):
                target = self.module_of(module, child.value)
                if target is not None:
                    attribute_values.add(id(child.value))
                    self.use(target, child.attr)
            elif isinstance(child, ast.Name) and not isinstance(child.ctx, ast.Store):
                self.use(module.name, child.id)
                target = self.module_of(module, child)
                if target is not None and id(child) not in attribute_values:
                    self.use_all(target)
            elif isinstance(child, (ast.Global, ast.Nonlocal)):
                for name in child.names:
                    self.use(module.name, name)
            elif isinstance(child, (ast.Import, ast.ImportFrom)) and child is not node:  # an import inside code
                for _, (source, name) in project_imports(child):
                    if not {source, f"{source}.{name or ''}"} & self.left_out:  # a left-out option's stays unrun
                        self.use_import(source, name)


def walk_evaluated(node: ast.AST, postponed: bool) -> Iterator[ast.AST]:
    """Every node under ``node`` (parents before children), less the annotations of function signatures when
    annotations are postponed (they are strings then, never evaluated)."""
    pending = [node]
    while pending:
        current = pending.pop()
        yield current
        children = list(ast.iter_child_nodes(current))
        if postponed and isinstance(current, (ast.FunctionDef, ast.AsyncFunctionDef)):
            children = [c for c in children if c is not current.returns]
        if postponed and isinstance(current, ast.arg):
            children = [c for c in children if c is not current.annotation]
        pending.extend(reversed(children))


def shake(entry_files: list[str], root: Path, left_out: frozenset[str] = frozenset()) -> dict[str, str]:
    """Path -> the source that ships, of every module reached from ``entry_files[0]``'s ``main`` and from all of
    the other entry files, without the modules in ``left_out`` (dotted names: options the baked params leave off,
    which kept code may import only inside the branch that needs them; importing one where a module loads is
    a ValueError)."""
    modules = [".".join(Path(name).with_suffix("").parts) for name in entry_files]
    missing = [name for name, module in zip(entry_files, modules, strict=True)
               if module_file(module, root) != root / name]
    if missing:
        raise FileNotFoundError(f"compress.code_files: not found under {root}: {', '.join(missing)}")
    shaker = Shaker(root, left_out)
    shaker.run(modules[0], modules[1:])
    return {module.path: kept_source(module, shaker) for module in shaker.modules.values()}


def kept_source(module: Module, shaker: Shaker) -> str:
    """The module's kept statements, its imports cut to the names kept code reads, as source text."""
    body = []
    for stmt in module.tree.body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            stmt = used_import(stmt, shaker.used[module.name])
            if stmt is not None:
                body.append(stmt)
        elif id(stmt) in shaker.kept:
            body.append(stmt)
    return ast.unparse(ast.Module(body=body, type_ignores=[])) + "\n" if body else ""


def used_import(stmt: ast.Import | ast.ImportFrom, used: set[str]) -> ast.stmt | None:
    """The import with only the names kept code reads (``from __future__`` whole), or None if none is read."""
    if isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__":
        return stmt
    names = [alias for alias in stmt.names if (alias.asname or alias.name.split(".")[0]) in used]
    if not names:
        return None
    if isinstance(stmt, ast.Import):
        return ast.Import(names=names)
    return ast.ImportFrom(module=stmt.module, names=names, level=stmt.level)
