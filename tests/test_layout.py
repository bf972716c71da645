"""The package's floors: no import cycles between modules (function-level imports included), kernels import
nothing of the model, and the weights floor imports nothing of the device program or serving."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_imports() -> dict[str, set[str]]:
    """Every module of kernels/ and minimax_m2/ -> the project modules it imports, anywhere in its body."""
    names = {}
    for package in ("kernels", "minimax_m2"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in names.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {other for other in found if other in names and other != name}
    return graph


def test_no_module_imports_one_that_builds_on_it():
    graph = module_imports()
    done, active = set(), []

    def visit(module: str) -> None:
        assert module not in active, "import cycle: " + " -> ".join(active[active.index(module):] + [module])
        if module in done:
            return
        active.append(module)
        for other in sorted(graph[module]):
            if other not in ("minimax_m2", "kernels"):  # a package's __init__ re-exports; importing it is a name
                visit(other)
        active.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_floors_import_only_downwards():
    graph = module_imports()
    for module, imports in graph.items():
        if module.startswith("kernels"):
            assert not any(other.startswith("minimax_m2") for other in imports), module
        if module.startswith("minimax_m2.weights"):
            assert not {o for o in imports if o.startswith(("minimax_m2.device", "minimax_m2.serving"))}, module
        if module.startswith("minimax_m2.serving"):
            assert not imports & {"minimax_m2.cli", "minimax_m2.run"}, module


def test_public_names_import_from_the_package():
    from minimax_m2 import CheckpointError, MiniMaxM2Config, MiniMaxM2Model  # noqa: F401
