"""The package's imports point one way: no cycles (lazy imports inside functions included), compute never
imports widgets, and `import lca_notebook` stays light."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lca_notebook"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _edges() -> dict[str, set[str]]:
    """Module -> package modules it imports anywhere in its body (a package's own __init__ excluded)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {m: set() for m in modules}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                targets = [stem] + [f"{stem}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and t != "lca_notebook" and not name.startswith(t + "."):
                    edges[name].add(t)
    return edges


def _cycle(edges):
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return [*stack[stack.index(n) :], n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_package_imports_in_no_cycle():
    edges = _edges()
    assert len(edges) > 20  # the walk found the package
    assert _cycle(edges) is None, " -> ".join(_cycle(edges))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_compute_never_imports_widgets_and_nothing_below_api_imports_it():
    edges = _edges()
    front = {m for m in edges if m.startswith("lca_notebook.widgets")} | {"lca_notebook.magics"}
    top = {"lca_notebook", "lca_notebook.api", "lca_notebook.analyses", "lca_notebook.__main__", *front}
    for module, targets in edges.items():
        if module not in top:
            assert not targets & front, f"{module} imports {targets & front}"
            assert "lca_notebook.api" not in targets, f"{module} imports api, which sits above it"


def test_import_lca_notebook_is_light():
    code = (
        "import sys, lca_notebook as lca; "
        "names = ('sklearn', 'ipywidgets', 'bqplot', 'distributed', 'lca_notebook.models'); "
        "heavy = [m for m in names if m in sys.modules]; "
        "print(heavy); assert not heavy; assert callable(lca.open) and 'open' not in lca.__all__; "
        "assert lca.models.mlp and lca.analyses.fractions"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
