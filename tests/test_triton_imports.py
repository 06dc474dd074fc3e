"""The Triton backend's modules import each other without a cycle, counting imports made inside
functions (those under `if TYPE_CHECKING:` aside), and none reaches up into `attncc.ops`,
`attncc.manifest` or `attncc.cli`. A cycle hidden behind a function-level import still ties the
modules into one knot: none can be read, tested or replaced without the others."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "attncc.backends.triton"


def modules() -> dict[str, Path]:
    out = {}
    for path in (ROOT / "attncc").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The attncc modules `name` imports anywhere in its body, TYPE_CHECKING blocks excepted."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for block in ast.walk(tree)
               if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
               for n in ast.walk(block)}
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                      for a in node.names}
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()
            if name.startswith(PACKAGE)}


def test_the_triton_backend_has_no_import_cycle():
    edges = {m: {t for t in ts if t.startswith(PACKAGE)} for m, ts in graph().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_the_triton_backend_imports_nothing_above_the_backends():
    above = ("attncc.ops", "attncc.manifest", "attncc.cli", "attncc.api", "attncc.nn",
             "attncc.fx", "attncc.library")
    # backward.launch still reaches attncc.ops.softmax.backward; the backward seam removes it
    allowed = {("attncc.backends.triton.backward.launch", "attncc.ops.softmax.backward")}
    found = {(m, t) for m, ts in graph().items() for t in ts if t.startswith(above)}
    assert found <= allowed, sorted(found - allowed)
