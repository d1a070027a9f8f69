"""The layout of src/pyvmbus holds: no import circle, no private names across modules.

Every import counts, at module level or inside a function (a lazy import is still an
arrow); only ``if TYPE_CHECKING:`` blocks are left out, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "pyvmbus"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import that can run."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.orelse:
                    visit(stmt)
                continue
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    mod = ".".join([*base, child.module] if child.module else base)
                else:
                    mod = child.module or ""
                names = [a.name for a in child.names]
                out.append((mod, names))
                out.extend((f"{mod}.{n}", []) for n in names)  # "from . import x" may be a module
            elif isinstance(child, ast.Import):
                out.extend((a.name, []) for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return out


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        deps = {mod for mod, _ in _imports(path) if mod in MODULES and mod != name}
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep):], dep]
            if dep not in state:
                found = walk(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = walk(node)
            if found:
                return found
    return None


def test_no_import_circle() -> None:
    # A package's __init__ re-exports its modules: an arrow into it is an arrow into them,
    # but its own imports of its submodules are not a circle with them.
    graph = _graph()
    for name in graph:
        graph[name] = {d for d in graph[name]
                       if not name.startswith(d + ".") or MODULES[d].name != "__init__.py"}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


C_EXTENSIONS = {"_atomic", "_ring"}
"""The package's own compiled helpers: private modules, imported by name from the package."""


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_across_modules(module: str) -> None:
    """No module takes a leading-underscore name from another: modules talk through names
    without one (those meant for the package only say so in their docstrings)."""
    taken = [(mod, n) for mod, names in _imports(MODULES[module]) for n in names if n.startswith("_")
             and n != "__version__" and not (mod == "pyvmbus" and n in C_EXTENSIONS)]
    assert taken == []


def test_aio_does_not_import_the_channel() -> None:
    """channel -> aio only: aio works through the AsyncChannel protocol."""
    assert "pyvmbus.channel" not in _graph()["pyvmbus.aio"]
    assert "pyvmbus.channel" not in _graph()["pyvmbus.dispatch"]


def test_aio_and_dispatch_use_no_private_attribute_of_a_channel() -> None:
    """No ``channel._x`` / ``ch._x`` reaches into a channel from the driver modules."""
    for module in ("pyvmbus.aio", "pyvmbus.dispatch"):
        tree = ast.parse(MODULES[module].read_text())
        bad = [f"{n.value.id}.{n.attr}" for n in ast.walk(tree)
               if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
               and n.value.id in ("channel", "ch", "primary", "sub") and n.attr.startswith("_")]
        assert bad == [], f"{module}: {bad}"


def test_no_cli_modules_at_the_top() -> None:
    assert not list(PKG.glob("cli_*.py")) and not (PKG / "cli.py").exists()
    assert (PKG / "cli" / "__init__.py").is_file()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("module", ["pyvmbus", "pyvmbus.cli"])
def test_python_dash_m_runs_the_command(module: str) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True,
                         timeout=50, check=True)
    assert out.stdout.startswith("vmbus, version ")


LAYERS = ["errors", "guid", "classes", "shm", "packet", "ring", "sysfs", "guardrails", "devlock",
          "binding", "uio", "signal", "lifecycle", "dispatch", "capture", "aio", "channel", "bus",
          "ic", "mock", "cli", "__main__"]
"""The layers bottom-up, as docs/architecture.md draws them (a package counts as one)."""


def test_modules_import_only_layers_below_them() -> None:
    graph = _graph()
    rank = {name: i for i, name in enumerate(LAYERS)}
    unplaced = sorted({m.split(".")[1] for m in graph if "." in m} - set(rank))
    assert unplaced == [], f"add these to LAYERS (and docs/architecture.md): {unplaced}"
    upward = [(m, d) for m, deps in graph.items() if "." in m for d in deps if "." in d
              and rank[d.split(".")[1]] > rank[m.split(".")[1]]]
    assert upward == []
