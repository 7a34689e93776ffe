"""A stage's code version: one hash of the source of every Gauntlet module the stage imports.

The modules are found from the imports themselves: the stage's module is parsed, every ``import`` and
``from … import`` of a Gauntlet module is followed (inside functions too, type-checking-only blocks
excepted), transitively. So editing a module a stage never imports leaves its cache key alone, and
editing the trainer changes the training stage's key (it imports the program it launches). Each source
is hashed as its syntax tree without docstrings, so comments, docstrings and formatting never re-run work.

No Prefect here: ``tasks/_stage.py`` puts the version into every stage's cache key.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "gauntlet"
MAPPED = {"gauntlet.tasks": "tasks", "gauntlet.flows": "flows"}   # the Prefect layer, at the repository's top
# CPython 3.11's parser is not safe in threads ("AST constructor recursion depth mismatch"), and stages
# run in Prefect's worker threads: one parse at a time.
_PARSE_LOCK = threading.Lock()


@dataclass(frozen=True)
class SourceTree:
    """Where the package's modules live: ``gauntlet/`` plus the folders mapped into it."""

    roots: tuple[tuple[str, Path], ...]      # (package name, folder), longest name first

    @classmethod
    def at(cls, checkout: Path) -> SourceTree:
        """The modules of a checkout of this repository (tests edit copies)."""
        checkout = Path(checkout).resolve()
        roots = {PACKAGE: checkout / "gauntlet", **{pkg: checkout / folder for pkg, folder in MAPPED.items()}}
        return cls(tuple(sorted(roots.items(), key=lambda kv: -len(kv[0]))))

    @classmethod
    def installed(cls) -> SourceTree:
        """The modules this process runs (found without importing the Prefect layer)."""
        roots = {}
        for pkg in (PACKAGE, *MAPPED):
            spec = importlib.util.find_spec(pkg)
            if spec is not None and spec.submodule_search_locations:
                roots[pkg] = Path(next(iter(spec.submodule_search_locations))).resolve()
        return cls(tuple(sorted(roots.items(), key=lambda kv: -len(kv[0]))))

    def file_of(self, module: str) -> Path | None:
        for pkg, folder in self.roots:
            if module == pkg:
                init = folder / "__init__.py"
                return init if init.is_file() else None
            if module.startswith(pkg + "."):
                rel = Path(folder, *module[len(pkg) + 1:].split("."))
                for candidate in (rel.with_suffix(".py"), rel / "__init__.py"):
                    if candidate.is_file():
                        return candidate
                return None
        return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST):
    """Every node, except what an ``if TYPE_CHECKING:`` block imports for annotations only."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for orelse in child.orelse:
                yield from _walk_one(orelse)
            continue
        yield from _walk_one(child)


def _walk_one(node: ast.AST):
    yield node
    yield from _walk(node)


def imported_names(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Dotted names ``module`` may import: each ``import x.y``, and for ``from a import b`` both ``a`` and ``a.b``."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in _walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _parse(path: Path) -> ast.Module:
    with _PARSE_LOCK:
        return ast.parse(path.read_text(encoding="utf-8"))


def _stamp(path: Path) -> tuple:
    """What says a file changed: the caches below are keyed on it, so an edit is seen at once."""
    st = path.stat()
    return (str(path), st.st_mtime_ns, st.st_size)


def normalized_source(path: Path) -> str:
    """The module's syntax tree without docstrings or positions: what it does, not how it is written."""
    return _normalized(_stamp(path))


@functools.lru_cache(maxsize=512)
def _normalized(stamp: tuple) -> str:
    tree = _parse(Path(stamp[0]))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False)


def _with_parents(module: str, tree: SourceTree) -> list[str]:
    """The module and the packages above it that run when it is imported."""
    parts = module.split(".")
    return [m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if tree.file_of(m)]


def module_closure(module: str, tree: SourceTree) -> dict[str, Path]:
    """Every Gauntlet module ``module`` imports, directly or not (itself included) → its file."""
    found: dict[str, Path] = {}
    pending = _with_parents(module, tree)
    while pending:
        name = pending.pop()
        path = tree.file_of(name)
        if name in found or path is None:
            continue
        found[name] = path
        for imported in _imports(_stamp(path), name):
            if imported.split(".")[0] == PACKAGE:
                pending += [m for m in _with_parents(imported, tree) if m not in found]
    return found


@functools.lru_cache(maxsize=512)
def _imports(stamp: tuple, module: str) -> frozenset[str]:
    path = Path(stamp[0])
    return frozenset(imported_names(_parse(path), module, path.name == "__init__.py"))


def code_version(module: str, tree: SourceTree | None = None) -> str:
    """The code version of a stage whose Prefect task is defined in ``module`` (16 hex digits). Each file is
    parsed once per content (the caches are keyed on its modification time and size)."""
    tree = tree or SourceTree.installed()
    if tree.file_of(module) is None:
        raise ValueError(f"{module} is not a module of the gauntlet package (import stages as gauntlet.tasks.*)")
    h = hashlib.sha256()
    for name, path in sorted(module_closure(module, tree).items()):
        h.update(name.encode())
        h.update(normalized_source(path).encode())
    return h.hexdigest()[:16]
