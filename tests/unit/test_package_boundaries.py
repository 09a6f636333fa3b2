"""Nothing outside a package touches its underscored names: what one package reads of another is public.

A package here is herd.engine, herd.model, herd.kernels, herd.workers, each herd.platform.<sub>, and the modules
directly under herd.platform together. A module may not import another package's `_name`, nor read
`something._name` (other than its own: self, cls, super()) where another package of Herd defines `_name` (a
function, class, attribute, argument or global). A library's private names are not this test's business.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

HERD = Path(__file__).resolve().parents[2] / "herd"


def package(path: Path) -> str:
    parts = path.relative_to(HERD.parent).with_suffix("").parts
    if parts[1] == "platform" and len(parts) > 3:
        return ".".join(parts[:3])
    return ".".join(parts[:2]) if len(parts) > 2 else ".".join(parts)


def module_package(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 2 and parts[1] == "platform" and (HERD / "platform" / parts[2]).is_dir():
        return ".".join(parts[:3])
    return ".".join(parts[:2])


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def sources() -> dict[Path, str]:
    return {p: p.read_text() for p in sorted(HERD.rglob("*.py")) if "protos" not in p.parts}


def definitions(files: dict[Path, str]) -> dict[str, set[str]]:
    """Private name -> the packages that define it."""
    defined: dict[str, set[str]] = defaultdict(set)
    for path, text in files.items():
        for node in ast.walk(ast.parse(text)):
            names: list[str] = []
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names = [node.name]
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names = [node.id]
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names = [node.attr]
            elif isinstance(node, ast.arg):
                names = [node.arg]
            for name in names:
                if private(name):
                    defined[name].add(package(path))
    return defined


def violations(files: dict[Path, str]) -> list[str]:
    defined = definitions(files)
    found = []
    for path, text in files.items():
        here = package(path)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("herd"):
                theirs = module_package(node.module)
                found += [f"{path.relative_to(HERD.parent)}:{node.lineno} imports {alias.name} from {node.module}"
                          for alias in node.names if private(alias.name) and theirs != here]
            elif isinstance(node, ast.Attribute) and private(node.attr) and not _own(node.value):
                others = defined.get(node.attr, set()) - {here}
                if others:
                    found.append(f"{path.relative_to(HERD.parent)}:{node.lineno} reads .{node.attr} of "
                                 f"{', '.join(sorted(others))}")
    return found


def _own(value: ast.expr) -> bool:
    """self._x, cls._x, super()._x: an object's own."""
    if isinstance(value, ast.Name):
        return value.id in ("self", "cls")
    return isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super"


def test_no_package_reads_anothers_private_names() -> None:
    assert violations(sources()) == []


def test_the_check_sees_a_crossing() -> None:
    """The check can fail: the replica reaching into the engine's request table, as it once did, is seen."""
    probe = {HERD / "workers" / "probe.py": "from herd.engine.llm_engine import _is_token_list\n\n"
                                           "def drain(engine):\n    return list(engine._requests)\n"}
    found = violations(sources() | probe)
    assert "herd/workers/probe.py:4 reads ._requests of herd.engine" in found
    assert "herd/workers/probe.py:1 imports _is_token_list from herd.engine.llm_engine" in found
