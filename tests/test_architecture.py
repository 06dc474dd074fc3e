"""The layering of the package (docs/architecture.md), checked from the source:

- import-linter's contracts in pyproject.toml ([tool.importlinter]) pass: layers
  ir -> passes -> validate -> backends -> ops -> front ends, backends independent of each other,
  and only `attncc.backends.registry` imports a concrete backend;
- no module under attncc/ir or attncc/passes imports attncc.backends or attncc.ops;
- the import graph of attncc is acyclic, counting imports made inside functions (only
  `if TYPE_CHECKING:` blocks are left out): a function-level import may not hide a cycle;
- outside attncc/backends, no code names a concrete backend module;
- exactly one `cache_key` function."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "attncc"
CONCRETE_BACKENDS = ("attncc.backends.triton", "attncc.backends.reference",
                     "attncc.backends.cuda")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skipped


def imports_of(module: str) -> list[str]:
    """The attncc modules `module` imports anywhere in its body (functions included), as
    Python resolves them: `from attncc.x import y` is attncc.x.y when that is a module."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    skipped = _type_checking_nodes(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append(sub if sub in MODULES else base)
    return [m for m in found if m in MODULES and m != module]


def import_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    for module in MODULES:
        graph.add_node(module)
        graph.add_edges_from((module, target) for target in imports_of(module))
    return graph


def test_import_graph_is_acyclic():
    graph = import_graph()
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not cycles, f"import cycles (function-level imports counted): {cycles}"


def test_ir_and_passes_import_no_backend_or_op():
    bad = [(m, t) for m in MODULES if m.startswith(("attncc.ir", "attncc.passes"))
           for t in imports_of(m) if t.startswith(("attncc.backends", "attncc.ops"))]
    assert not bad, f"the IR and the passes must not depend on backends or ops: {bad}"


def test_only_backends_name_a_concrete_backend():
    """Imports and string constants (an importlib path is a way round the registry too)."""
    bad = []
    for module, path in MODULES.items():
        if module.startswith("attncc.backends"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names = [node.value]
            bad += [(module, n[:60]) for n in names if any(b in n for b in CONCRETE_BACKENDS)]
    assert not bad, f"outside attncc/backends, reach a backend through the registry: {bad}"


def test_one_cache_key():
    defs = [f"{m}:{n.lineno}" for m, p in MODULES.items()
            for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "cache_key"]
    assert len(defs) == 1, f"one cache_key function (attncc/backends/keys.py), found {defs}"


def test_import_linter_contracts():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint, "import-linter is a test dependency (pip install -e '.[test]')"
    done = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "broken" in done.stdout and " 0 broken" in done.stdout, done.stdout[-3000:]


def test_the_checks_see_a_cycle(tmp_path, monkeypatch):
    """The cycle check is not vacuous: a function-level import closing a loop is found."""
    a, b = PACKAGE / "ir" / "symbols.py", PACKAGE / "ir" / "nodes.py"
    assert "attncc.ir.symbols" in imports_of("attncc.ir.nodes")
    source = b.read_text()  # nodes imports symbols; a symbols -> nodes import closes a loop
    fake = tmp_path / "symbols.py"
    fake.write_text(a.read_text() + "\n\ndef _late():\n    from attncc.ir import nodes\n")
    monkeypatch.setitem(MODULES, "attncc.ir.symbols", fake)
    with pytest.raises(AssertionError, match="'attncc.ir.nodes', 'attncc.ir.symbols'"):
        test_import_graph_is_acyclic()
    assert source == b.read_text()


@pytest.mark.slow
def test_installed_wheel_finds_its_templates(tmp_path):
    """`pip install .` (not editable), then a compile from another directory: the Jinja
    templates ship inside the package (attncc/backends/triton/templates) and are found there."""
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                          str(ROOT)], check=True, capture_output=True, cwd=elsewhere)
    (wheel,) = wheels.glob("attncc-*.whl")
    subprocess.run(pip + ["install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, cwd=elsewhere)
    shipped = sorted(p.name for p in (target / "attncc/backends/triton/templates").glob("*.j2"))
    in_repo = sorted(p.name for p in (PACKAGE / "backends/triton/templates").glob("*.j2"))
    assert shipped == in_repo and in_repo
    cuda = "attncc/backends/cuda/templates"  # headers the CUDA sources include
    assert sorted(p.name for p in (target / cuda).glob("*.cuh")) == sorted(
        p.name for p in (ROOT / cuda).glob("*.cuh")) != []
    script = (
        "import os, torch, attncc\n"
        f"assert attncc.__file__.startswith({str(target)!r}), attncc.__file__\n"
        "attn = attncc.compile(attncc.Attention(mask=attncc.causal()))\n"
        "q = torch.randn(1, 2, 19, 16, dtype=torch.float32, generator=torch.manual_seed(0))\n"
        "o = attn(q, q, q, backend='triton')\n"
        "ref = attn(q, q, q, backend='reference')  # fp32 PyTorch reference\n"
        "assert (o - ref).abs().max() < 1e-5, (o - ref).abs().max()  # fp32 tolerance\n"
        "print('ok', attn.name)\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(target), "TRITON_INTERPRET": "1",
           "ATTNCC_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout + done.stderr[-3000:]
