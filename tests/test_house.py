"""bench/house.py on a toy tree with known answers: its top-level modules, packages, import
circle, upward imports, an unplaced module, and the path a toy test.py's predictions take."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench.house import (SCRIPT, UnplacedModule, collapse, import_circles, import_graph, packages, path_figures,
                         prediction_path, project_modules, top_level_modules, upward_imports, wing_path)

TOY = {
    "utils.py": "def later():\n    import helper\n    return helper\n",           # lazy, upward (0 -> 1)
    "helper.py": "VALUE = 1\n",
    "loop_a.py": "from loop_b import g\n",                                       # a circle: loop_a <-> loop_b
    "loop_b.py": "def g():\n    from loop_a import g as again\n    return again\n",
    "train.py": "import pkg.core\n\nif __name__ == \"__main__\":\n    pkg.core.run()\n",  # seed name, a script
    "tool.py": "import utils\n\nif __name__ == '__main__':\n    utils.later()\n",      # an entry script
    "pkg/__init__.py": "",
    "pkg/core.py": "from helper import VALUE\n\n\ndef run():\n"
                   "    import tool\n    return tool, VALUE\n",                    # upward (2 -> 3)
    "tests/__init__.py": "",
    "tests/test_toy.py": "import loop_a\n",                                      # tests/ is not the project
    "loose/mod.py": "import utils\n",                                            # no __init__.py: not a package
}
TOY_LAYERS = [["utils"], ["helper", "loop_*"], ["pkg", "pkg.*"], [SCRIPT]]


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_modules_packages_and_top_level_kinds(tmp_path) -> None:
    root = write(tmp_path, TOY)
    assert packages(root) == ["pkg"]
    assert sorted(project_modules(root)) == ["helper", "loop_a", "loop_b", "pkg", "pkg.core", "tool", "train",
                                             "utils"]
    assert top_level_modules(root) == {"seed": ["train", "utils"], "scripts": ["tool"],
                                       "library": ["helper", "loop_a", "loop_b"]}


def test_the_circle_and_the_upward_imports(tmp_path) -> None:
    root = write(tmp_path, TOY)
    graph, _ = import_graph(root)
    assert graph == {"utils": {"helper"}, "helper": set(), "loop_a": {"loop_b"}, "loop_b": {"loop_a"},
                     "train": {"pkg.core"}, "tool": {"utils"}, "pkg": set(), "pkg.core": {"helper", "tool"}}
    assert import_circles(graph) == [["loop_a", "loop_b"]]
    assert upward_imports(root, TOY_LAYERS) == [("pkg.core", "tool"), ("utils", "helper")]


def test_a_module_no_layer_names_is_an_error(tmp_path) -> None:
    root = write(tmp_path, TOY)
    with pytest.raises(UnplacedModule, match="module loop_a "):
        upward_imports(root, [["utils"], ["helper"], ["pkg", "pkg.*"], [SCRIPT]])
    (root / "tool.py").write_text("import utils\n")  # no __main__ block: the SCRIPT pattern no longer takes it
    with pytest.raises(UnplacedModule, match="module tool "):
        upward_imports(root, TOY_LAYERS)


TOY_RUN = {
    "engine.py": "import numpy as np\n\n\nclass Predictions:\n"
                 "    def __init__(self, scores, maps):\n        self.scores, self.maps = scores, maps\n\n\n"
                 "def predict():\n    scores = np.arange(3.0)\n"
                 "    return Predictions(scores, np.zeros((3, 2, 2)))\n\n\n"
                 "def score(values):\n    return float(values.sum())\n",
    "report.py": "import engine\n\n\ndef show(predictions):\n"
                 "    return engine.score(predictions.maps) + len(describe(predictions.scores.tolist()))\n\n\n"
                 "def describe(items):\n    return str(items)\n",  # holds a list made from the scores: not them
    "test.py": "import sys\n\nimport engine\nimport report\n\n\ndef main():\n    predictions = engine.predict()\n"
               "    report.show(predictions)\n    engine.score(predictions.scores)\n"
               "    assert sys.argv[1:] == ['--flag']\n\n\n"
               "if __name__ == \"__main__\":\n    main()\n",
}


def test_the_predictions_path_of_a_toy_test_run(tmp_path) -> None:
    frames = prediction_path(write(tmp_path, TOY_RUN), ["--flag"])
    assert frames == [("test", "main"), ("engine", "predict"), ("report", "show"), ("engine", "score"),
                      ("engine", "score")]
    path = collapse([module for module, _ in frames])
    assert path == ["test", "engine", "report", "engine"]
    assert path_figures(path) == {"rooms": 3, "moves": 3, "climbs": 1}


def test_path_figures_of_the_issues_path() -> None:
    """#23's words for 8cbd4b8: "4 rooms, 5 moves and 2 climbs back up"."""
    path = ["test", "inference", "metrics", "evaluation", "metrics", "evaluation"]
    assert path_figures(path) == {"rooms": 4, "moves": 5, "climbs": 2}
    assert collapse(["a", "a", "b", "a", "a"]) == ["a", "b", "a"]


def test_a_path_by_wing_joins_a_package_s_modules() -> None:
    """Modules of one package are one wing; a return to a wing is still a climb back."""
    path = ["test", "evaluation.predict", "evaluation.results", "CLIP.MedVMAD", "evaluation.metrics", "test"]
    assert wing_path(path) == ["test", "evaluation", "CLIP", "evaluation", "test"]
    assert path_figures(wing_path(path)) == {"rooms": 3, "moves": 4, "climbs": 2}


def test_a_failing_test_run_is_an_error(tmp_path) -> None:
    write(tmp_path, {"test.py": "raise SystemExit(3)\n"})
    with pytest.raises(RuntimeError, match=r"failed \(3\)"):
        prediction_path(tmp_path, [])
