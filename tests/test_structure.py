"""The package's structure: the module-level imports of pyens form no cycle (issue 21).

Imports inside functions are lazy on purpose (a missing backend or optional library must not
break ``import pyens``) and are left out; a cycle among module-level imports makes import
order matter, which is what this test forbids.
"""
import ast
from pathlib import Path

import pyens

ROOT = Path(pyens.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("pyens", *path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.parse(path.read_text()).body:  # module level only
            for n in node.body if isinstance(node, (ast.If, ast.Try)) else [node]:
                if isinstance(n, ast.Import):
                    deps |= {owner(a.name) for a in n.names if a.name.startswith("pyens")}
                elif isinstance(n, ast.ImportFrom) and n.level == 0 and (n.module or "").startswith("pyens"):
                    deps |= {owner(f"{n.module}.{a.name}") for a in n.names}
        graph[name] = deps - {None, name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, path = {}, []

    def visit(v):
        state[v] = "open"
        path.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == "open":
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = "done"
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_module_level_imports_have_no_cycle():
    graph = _graph(_modules())
    assert "pyens.training.methods" in graph and "pyens.training.method_base" in graph["pyens.training.methods"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


# ---------------------------------------------------------------------------------------------
# tests reach pyens through public names only

TESTS = Path(__file__).parent


def _private(name: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in name.split("."))


def private_uses(path: Path) -> list[str]:
    """``file:line name`` for each private name of pyens a test file reaches: an import of a
    private module or name (``from pyens.ops.dispatch import X``, ``from pyens.cli import
    _flags``) or an attribute ``_x`` read off a pyens module (``checkpoint._numpy_tuple``,
    also as a ``monkeypatch.setattr(module, "_x", ...)`` target)."""
    tree = ast.parse(path.read_text())
    modules: set[str] = set()  # local names bound to pyens modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("pyens"):
                    if _private(a.name):
                        found.append((node.lineno, a.name))
                    modules.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("pyens"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if _private(full):
                    found.append((node.lineno, full))
                if f"{node.module}.{a.name}" in MODULES:
                    modules.add(a.asname or a.name)
        elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith("importlib.import_module"):
            if node.args and isinstance(node.args[0], ast.Constant) and _private(str(node.args[0].value)):
                found.append((node.lineno, node.args[0].value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in modules:
                found.append((node.lineno, ast.unparse(node)))
        elif (isinstance(node, ast.Call) and ast.unparse(node.func).endswith("setattr") and len(node.args) >= 2
              and isinstance(node.args[0], ast.Name) and node.args[0].id in modules
              and isinstance(node.args[1], ast.Constant) and _private(str(node.args[1].value))):
            found.append((node.lineno, f"{node.args[0].id}.{node.args[1].value}"))
    return [f"{path.name}:{line} {name}" for line, name in sorted(set(found))]


MODULES = set(_modules())


def test_tests_use_no_private_name_of_pyens():
    found = [use for path in sorted(TESTS.glob("*.py")) for use in private_uses(path)]
    assert not found, "tests reach private names of pyens (make the name public or test the public path):\n" + "\n".join(found)


def test_private_use_finder_finds_each_kind(tmp_path):
    src = tmp_path / "test_probe.py"
    src.write_text("import pyens.ops._internal\nfrom pyens.ops import _internal\nfrom pyens.cli import _flags, main\n"
                   "from pyens.training import checkpoint\ncheckpoint._numpy_tuple(1)\n"
                   "monkeypatch.setattr(checkpoint, '_x', 1)\ncheckpoint.save(1)\nfrom pyens.ops import lp_step\n")
    assert private_uses(src) == ["test_probe.py:1 pyens.ops._internal", "test_probe.py:2 pyens.ops._internal",
                                 "test_probe.py:3 pyens.cli._flags", "test_probe.py:5 checkpoint._numpy_tuple",
                                 "test_probe.py:6 checkpoint._x"]


def cross_package_private_imports(path: Path, module: str) -> list[str]:
    """Imports in pyens module ``module`` of a private name that belongs to another package
    (``pyens.eval.x`` importing ``pyens.attacks._y``); a package's own private modules and
    the compiled extension ``pyens._C`` are fine."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("pyens"):
            names = [f"{node.module}.{a.name}" for a in node.names]
        for full in names:
            parts = full.split(".")
            first = next((i for i, p in enumerate(parts) if p.startswith("_") and not p.startswith("__")), None)
            if full.startswith("pyens") and first is not None and full != "pyens._C":
                owner = ".".join(parts[:first])
                if owner != package:
                    found.append(f"{module}:{node.lineno} {full}")
    return found


def test_no_module_imports_another_packages_private_name():
    found = [use for name, path in sorted(_modules().items()) for use in cross_package_private_imports(path, name)]
    assert not found, "private names imported across packages:\n" + "\n".join(found)


def test_cross_package_finder_finds_them(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("from pyens.attacks._common import a\nfrom pyens.eval._y import b\nfrom pyens.eval import _z\n"
                   "import pyens._C\nfrom pyens.cli import _f\n")
    assert cross_package_private_imports(src, "pyens.eval.x") == [
        "pyens.eval.x:1 pyens.attacks._common.a", "pyens.eval.x:5 pyens.cli._f"]
