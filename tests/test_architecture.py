"""The package's shape: imports point down a fixed order of layers (function-level imports included), no import
circle, and no module grows past what a reader takes in at once."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "conformer"
# Lowest first: a module may import its own layer (without a circle) and the layers below, never one above.
LAYERS = (
    ("conformer.vocabulary", "conformer.secrets", "conformer.errors", "conformer.checks"),
    ("conformer.kernels",),
    ("conformer.runtime",),
    ("conformer.models", "conformer.data"),
    ("conformer.tracking",),
    ("conformer.train",),
    ("conformer.serving",),
    ("conformer.config",),
    ("conformer.sweeps",),
    ("conformer.tasks",),
    ("conformer.app",),
)
MAX_LINES = 450
LONG_ALLOWED = {"conformer.data.randaugment"}  # RandAugment's op table, ported one to one from timm


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its body (the longest known prefix of each import)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names)
    resolved = set()
    for target in targets:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name and target.startswith("conformer"):
            resolved.add(target)
    return resolved


def _layer(name: str) -> int | None:
    for index, prefixes in enumerate(LAYERS):
        if any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes):
            return index
    return None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer_and_imports_point_down() -> None:
    graph = _graph()
    assert [name for name in graph if name != "conformer" and _layer(name) is None] == []
    upward = sorted(f"{name} -> {target}" for name, targets in graph.items() if name != "conformer"
                    for target in targets if target != "conformer" and _layer(target) > _layer(name))
    assert upward == []
    assert [name for name, targets in graph.items() if "conformer" in targets] == []  # the root is the top


def test_no_import_circle() -> None:
    graph = _graph()
    circles = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == []


def test_the_architecture_test_sees_function_level_imports_and_circles(tmp_path: Path) -> None:
    """The walk finds an import inside a function (the kind that hid a circle before)."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from conformer.tasks.common import RunContext\n")
    assert _imports("conformer.vocabulary", source, _modules()) == {"conformer.tasks.common"}


def test_no_module_is_longer_than_a_reader_takes_in() -> None:
    long = {name: n for name, path in _modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES and name not in LONG_ALLOWED}
    assert long == {}


def test_paths_found_from_a_module_file_point_at_the_package() -> None:
    """What the package's own files are (the compile cache's key, the served model's code) after any move."""
    import conformer
    from conformer.runtime import compile_cache
    from conformer.runtime.paths import PACKAGE_DIR
    from conformer.serving.pyfunc_model import MODEL_CODE

    assert PACKAGE_DIR == compile_cache.PACKAGE == Path(conformer.__file__).resolve().parent == PACKAGE
    assert MODEL_CODE.is_file() and MODEL_CODE.parent.name == "serving"
