"""Module boundaries: no project module imports another's underscored names, and the project's
import graph (every import, lazy ones in functions included) has no circle."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("CLIP", "evaluation", "generate_dataset", "bench")  # folders of library and script modules (tests apart)


def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every project module outside tests/ (``CLIP/backbone.py`` -> ``CLIP.backbone``)."""
    files = list(ROOT.glob("*.py")) + [path for package in PACKAGES for path in (ROOT / package).glob("*.py")]
    modules = {}
    for path in files:
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(tree: ast.AST, modules: dict[str, Path]) -> tuple[set[str], list[str]]:
    """The project modules ``tree`` imports, and its uses of other modules' underscored names
    (``from M import _x``, ``M._x``) as ``M._x``."""
    targets: set[str] = set()
    private: list[str] = []
    aliases: dict[str, str] = {}  # local name -> project module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    targets.add(alias.name)
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module in modules and not node.level:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if submodule in modules:
                    targets.add(submodule)
                    aliases[alias.asname or alias.name] = submodule
                else:
                    targets.add(node.module)
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append(f"{node.module}.{alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = ast.unparse(node.value)
            if base in aliases:
                private.append(f"{aliases[base]}.{node.attr}")
    return targets, private


def import_graph() -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """Module -> the project modules it imports; module -> the underscored names it takes from others."""
    modules = project_modules()
    graph, private = {}, {}
    for name, path in modules.items():
        targets, names = _imports(ast.parse(path.read_text(), str(path)), modules)
        graph[name] = targets - {name}
        private[name] = [used for used in names if not used.startswith(f"{name}.")]
    return graph, private


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_the_graph_sees_imports_and_circles() -> None:
    """The checker itself: it finds a lazy import's circle and both forms of underscored use."""
    modules = {"a": Path("a.py"), "b": Path("b.py"), "CLIP": Path(), "CLIP.c": Path()}
    tree = ast.parse("import a\nfrom b import _hidden, shown\nfrom CLIP import c\n"
                     "def f():\n    return a._private + c._other + a.__name__")
    targets, private = _imports(tree, modules)
    assert targets == {"a", "b", "CLIP.c"}
    assert sorted(private) == ["CLIP.c._other", "a._private", "b._hidden"]
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_another_modules_underscored_names() -> None:
    _, private = import_graph()
    assert {name: used for name, used in private.items() if used} == {}


def test_the_project_import_graph_has_no_circle() -> None:
    graph, _ = import_graph()
    assert import_circles(graph) == []


def test_runtime_readers_do_not_import_the_converters() -> None:
    """Converters (generate_dataset/) import readers, never the reverse; entry scripts may call them."""
    graph, _ = import_graph()
    readers = ("dataset", "medical_io", "volume_io")
    assert {name: sorted(graph[name]) for name in readers
            if any(target.startswith("generate_dataset") for target in graph[name])} == {}


def test_evaluation_results_take_settings_not_the_command_line():
    """evaluation/results.py reads explicit settings (EvaluationSettings, built once by test.py), never
    test.py's argparse namespace."""
    tree = ast.parse((ROOT / "evaluation" / "results.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "argparse" not in imported
    assert "args" not in {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
