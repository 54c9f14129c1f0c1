"""Module boundaries: no project module imports another's underscored names, and the project's
import graph (every import, lazy ones in functions included) has no circle. The graph is
bench/house.py's (``python -m bench.house`` measures the layout: circles, layers, upward imports)."""
from __future__ import annotations

import ast
from pathlib import Path

from bench.house import ROOT, import_circles, import_graph, imports, upward_imports


def test_the_graph_sees_imports_and_circles() -> None:
    """The checker itself: it finds a lazy import's circle and both forms of underscored use."""
    modules = {"a": Path("a.py"), "b": Path("b.py"), "CLIP": Path(), "CLIP.c": Path()}
    tree = ast.parse("import a\nfrom b import _hidden, shown\nfrom CLIP import c\n"
                     "def f():\n    return a._private + c._other + a.__name__")
    targets, private = imports(tree, modules)
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


def test_no_module_imports_one_of_a_higher_layer() -> None:
    """bench/house.py's LAYERS (utils < files & data < model < evaluation < generate_dataset <
    entry scripts): every module is placed, and none imports upward."""
    assert upward_imports() == []


def test_runtime_readers_do_not_import_the_converters() -> None:
    """Converters (generate_dataset/) import readers, never the reverse; entry scripts may call them."""
    graph, _ = import_graph()
    readers = ("dataset", "scans.files", "scans.framing", "scans.volumes")
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
