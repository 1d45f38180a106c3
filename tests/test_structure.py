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
