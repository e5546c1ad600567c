"""The package's shape: no import cycles, the command line on top, no sys.path edits, modules of a readable size.

Imports are read from the source with `ast` (module level and inside functions alike: a lazy import that
closes a cycle is still a cycle), so the check needs no import side effects and can fail on any module.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "p2p_engine"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """Dotted name -> file for every module of p2p_engine (kernels/ is installed as p2p_engine.kernels)."""
    out = {}
    for base, prefix in ((PACKAGE, "p2p_engine"), (ROOT / "kernels", "p2p_engine.kernels")):
        for f in base.rglob("*.py"):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = f
    return out


def _known() -> set[str]:
    """Module names, the C++ extension (`p2p_engine._native`, built in place) included."""
    return set(_modules()) | {"p2p_engine._native"}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from .x import y` may name a module y of package x, or a name defined in x
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import p2p_engine.x.y` imports p2p_engine.x.y; keep the longest known
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    return {name: _imports(name, path, _known()) for name, path in _modules().items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles():
    graph = import_graph()
    assert "p2p_engine.editing" in graph["p2p_engine.inversion"]  # the reader sees real edges
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cli_is_the_top():
    graph = import_graph()
    users = sorted(n for n, deps in graph.items() if "p2p_engine.cli" in deps)
    assert users == ["p2p_engine.__main__"], users
    for low in ("p2p_engine.jobs", "p2p_engine.pipeline", "p2p_engine.maps"):
        assert "p2p_engine" not in graph[low], f"{low} imports the package's top"


def _is_sys_path(node) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
            and node.value.id == "sys")


def sys_path_edits(source: str) -> list[int]:
    """Lines that change sys.path: its mutating methods, assignment to it or to a slice of it, del. Reading it
    (kernels/__init__.py looks past the checkout's root) is no edit."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _is_sys_path(node.func.value)
                and node.func.attr in ("insert", "append", "extend", "remove", "pop", "clear", "reverse", "sort")):
            lines.append(node.lineno)
        targets = (node.targets if isinstance(node, (ast.Assign, ast.Delete)) else
                   [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        for t in targets:
            if _is_sys_path(t) or (isinstance(t, ast.Subscript) and _is_sys_path(t.value)):
                lines.append(node.lineno)
    return lines


def test_the_sys_path_check_sees_edits():
    for edit in ("import sys\nsys.path.insert(0, 'x')", "import sys\nsys.path[:] = []", "import sys\nsys.path += ['x']",
                 "import sys\nsys.path = ['x']", "import sys\ndel sys.path[0]", "import sys\nsys.path.append('x')"):
        assert sys_path_edits(edit) == [2], edit
    assert sys_path_edits("import sys\nrest = [p for p in sys.path if p]") == []


def test_no_sys_path_edits():
    for name, path in _modules().items():
        assert not sys_path_edits(path.read_text()), f"{name} edits sys.path"


@pytest.mark.parametrize("name", sorted(_modules()))
def test_module_size(name):
    """~400 lines at most, unless the module's docstring says why it is longer."""
    path = _modules()[name]
    lines = path.read_text().count("\n")
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert lines <= MAX_LINES or "longer than" in doc, f"{name}: {lines} lines and no reason in its docstring"


def test_readme_layout_names_every_module():
    """The README's layout section names every module of the package and every top-level folder."""
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout"):]
    for f in sorted(PACKAGE.glob("*.py")):
        if f.stem not in ("__init__", "__main__"):
            assert f"`{f.name}`" in layout, f"README layout does not name p2p_engine/{f.name}"
    for folder in ("kernels/", "csrc/", "tests/", "benchmarks/", "toy/", "data/"):
        assert f"`{folder}`" in layout, folder
