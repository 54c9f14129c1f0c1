"""The house: how the project's modules are laid out, measured (issue #23's before/after figures).

    python -m bench.house [--root PATH] [--no-run]

Prints one table for the tree at --root (default: the repository this file lives in):

1. top-level ``.py`` modules, split into the seed's layout names (``SEED_NAMES``), entry scripts
   (a ``if __name__ == "__main__":`` block) and other library modules (named);
2. import circles: strongly connected components of more than one module of the import graph
   (every import, lazy ones inside functions too);
3. cross-module underscored imports (``from M import _x``, ``M._x``), and upward imports: a module
   importing one of a strictly higher layer of ``LAYERS``;
4. the modules a test run's predictions pass through: a tiny ``test.py`` run on the tree under a
   tracer, every project frame holding the run's ``Predictions`` or one of its arrays, in call
   order; rooms (distinct modules), moves and climbs back (moves into a module already visited),
   and the same by wing (a top-level module or package: ``evaluation.metrics`` is ``evaluation``).

The data and checkpoint of that run are built once in a temporary folder with this repository's
code (a small demo set, a tiny checkpoint trained one epoch): the same for every tree measured.
Modules are found by reading files (``ast``); only the test run executes the tree's code.
"""
from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The seed repository's top-level modules (its layout names): the five the README's layout names
# and the seed's other top-level files.
SEED_NAMES = ("dataset", "prompt_ensemble", "train", "test", "test_one_example",
              "loss", "utils", "visualization", "metrics", "logger", "plot_loss_curve")

SCRIPT = "<__main__ block>"  # a pattern of LAYERS: any module with an ``if __name__ == "__main__":`` block

# The layers, lowest first; each a list of module-name patterns (fnmatch). A module sits in the
# first layer, from the lowest, with a pattern matching it (so ``evaluation.metrics`` below the
# other ``evaluation.*``), SCRIPT last of all. Old names (before #23: top-level metrics,
# inference, evaluation, calibration, maps_io, tables; CLIP.backbone holding the factory) stand
# where their role puts them, today's names beside them. By role:
LAYERS: list[list[str]] = [
    ["utils"],                                                  # helpers every layer may use
    ["dataset", "medical_io", "volume_io", "scans", "scans.*",  # files & data: reading scans and
     "curves", "distributed"],                                  # images, training curves, processes
    ["CLIP", "CLIP.backbone"],                                  # model: the backbone's config and interface
    ["CLIP.backbone_clip", "CLIP.backbone_timm_hf",             # its implementations, each behind
     "CLIP.torchscript_weights"],                               # the interface
    ["CLIP.factory"],                                           # chooses and builds an implementation
    ["prompt_ensemble", "CLIP.memory_bank"],                    # the model's parts above the backbone
    ["CLIP.MedVMAD"],                                           # the model
    ["loss", "CLIP.checkpoint"],                                # what training and saving do with it
    ["visualization"],                                          # drawing: overlays, montages, curves (matplotlib)
    ["metrics", "evaluation.metrics"],                          # evaluation: metrics over arrays, model-free
    ["inference", "evaluation", "calibration", "maps_io",       # predictions and what is made of them,
     "tables", "evaluation.*"],                                 # their figures drawn with visualization
    ["cli"],                                                    # the scripts' shared flags, builds the model
    ["generate_dataset", "generate_dataset.*"],                 # converters and the demo set, run as tools
    ["bench", "bench.*", SCRIPT],                               # entry scripts and benchmarks: nothing imports them
]


class UnplacedModule(ValueError):
    """A module no pattern of the layer table matches: place it in LAYERS."""


# --- modules and their imports

def packages(root: Path = ROOT) -> list[str]:
    """The top-level folders holding an ``__init__.py`` (tests/ apart), sorted."""
    return sorted(path.parent.name for path in Path(root).glob("*/__init__.py") if path.parent.name != "tests")


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file of every project module outside tests/ (``CLIP/backbone.py`` -> ``CLIP.backbone``)."""
    root = Path(root)
    files = sorted(root.glob("*.py"))
    files += [path for package in packages(root) for path in sorted((root / package).glob("*.py"))]
    modules = {}
    for path in files:
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports(tree: ast.AST, modules: dict[str, Path]) -> tuple[set[str], list[str]]:
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


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """Module -> the project modules it imports; module -> the underscored names it takes from others."""
    modules = project_modules(root)
    graph, private = {}, {}
    for name, path in modules.items():
        targets, names = imports(ast.parse(path.read_text(), str(path)), modules)
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
        for target in sorted(graph.get(node, ())):
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


def has_main_block(path: Path) -> bool:
    """Whether the module has a top-level ``if __name__ == "__main__":`` block."""
    for node in ast.parse(Path(path).read_text(), str(path)).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and len(node.test.ops) == 1 \
                and isinstance(node.test.ops[0], ast.Eq):
            sides = {ast.unparse(node.test.left), ast.unparse(node.test.comparators[0])}
            if sides in ({"__name__", "'__main__'"}, {"__name__", '"__main__"'}):
                return True
    return False


# --- 1. top-level modules

def top_level_modules(root: Path = ROOT) -> dict[str, list[str]]:
    """The top-level ``.py`` modules' names, sorted, as "seed" (SEED_NAMES), "scripts" (a __main__
    block, not seed) and "library" (the others)."""
    found = {"seed": [], "scripts": [], "library": []}
    for path in sorted(Path(root).glob("*.py")):
        kind = "seed" if path.stem in SEED_NAMES else "scripts" if has_main_block(path) else "library"
        found[kind].append(path.stem)
    return found


# --- 3. layers and upward imports

def layer_of(name: str, path: Path, layers: list[list[str]] = LAYERS) -> int:
    """The index in ``layers`` of the first layer with a pattern matching ``name`` (SCRIPT matches a
    module with a __main__ block, after every name pattern); UnplacedModule when none does."""
    for number, patterns in enumerate(layers):
        if any(pattern != SCRIPT and fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            return number
    if has_main_block(path):
        for number, patterns in enumerate(layers):
            if SCRIPT in patterns:
                return number
    raise UnplacedModule(f"module {name} ({path}) matches no pattern of the layer table: place it in LAYERS")


def upward_imports(root: Path = ROOT, layers: list[list[str]] = LAYERS) -> list[tuple[str, str]]:
    """Every (importer, imported) where the imported module sits in a strictly higher layer, sorted.
    Every module must be placed (UnplacedModule names the first that is not)."""
    modules = project_modules(root)
    layer = {name: layer_of(name, path, layers) for name, path in modules.items()}
    graph, _ = import_graph(root)
    return sorted((name, target) for name, targets in graph.items() for target in targets
                  if layer[target] > layer[name])


# --- 4. the predictions' path

# Run inside the measured tree (cwd = that tree, ``python -c``): argv = setup.json out.json test.py
# FLAGS. setup.json maps each project file to its module name. A profile hook numbers the calls of
# project frames; when a function named ``predict`` returns, its return value and that value's
# numpy arrays are tracked (by identity); a frame holding one as a local (checked when it is
# called, when it calls and when it returns) is recorded with its call number.
TRACER = r'''
import json, os, runpy, sys
setup, out = sys.argv[1], sys.argv[2]
files = json.load(open(setup))
sys.argv = sys.argv[3:]
tracked, live, held, names, calls = {}, {}, {}, {}, [0]

def module_of(code):
    try:
        return names[code]
    except KeyError:
        names[code] = name = files.get(os.path.realpath(code.co_filename))
        return name

def look(frame):
    number = live.get(frame)
    if number is None or number in held or not tracked:
        return
    for value in list(frame.f_locals.values()):
        if id(value) in tracked and tracked[id(value)] is value:
            held[number] = (module_of(frame.f_code), frame.f_code.co_name)
            return

def track(value):
    numpy = sys.modules.get("numpy")
    tracked[id(value)] = value
    for item in list(getattr(value, "__dict__", {}).values()):
        if numpy is not None and isinstance(item, numpy.ndarray):
            tracked[id(item)] = item

def profile(frame, event, arg):
    if event == "call":
        if module_of(frame.f_code) is None:
            return
        calls[0] += 1
        live[frame] = calls[0]
        look(frame)
        if frame.f_back is not None:
            look(frame.f_back)
    elif event == "return" and frame in live:
        if frame.f_code.co_name == "predict" and arg is not None:
            track(arg)
        look(frame)
        del live[frame]

code = 0
sys.setprofile(profile)
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as stop:
    code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
finally:
    sys.setprofile(None)
with open(out, "w") as file:
    json.dump([held[number] for number in sorted(held)], file)
sys.exit(code)
'''


def prediction_path(root: Path, flags: list[str], timeout: float = 600) -> list[tuple[str, str]]:
    """Run ``test.py FLAGS`` in ``root`` (its own code, cwd = root) under the tracer: the (module,
    function) of every project frame that held the run's predictions, in call order."""
    root = Path(root).resolve()
    files = {os.path.realpath(path): name for name, path in project_modules(root).items()}
    with tempfile.TemporaryDirectory(prefix="house-trace-") as folder:
        setup, out = Path(folder, "setup.json"), Path(folder, "frames.json")
        setup.write_text(json.dumps(files))
        run = subprocess.run([sys.executable, "-c", TRACER, str(setup), str(out), "test.py", *flags], cwd=root,
                             env=quiet_env(), capture_output=True, text=True, timeout=timeout)
        if run.returncode != 0 or not out.exists():
            raise RuntimeError(f"test.py in {root} failed ({run.returncode}):\n"
                               f"{run.stdout[-3000:]}{run.stderr[-3000:]}")
        return [tuple(frame) for frame in json.loads(out.read_text())]


def collapse(modules: list[str]) -> list[str]:
    """Consecutive repeats as one."""
    return [name for number, name in enumerate(modules) if number == 0 or modules[number - 1] != name]


def wing_path(path: list[str]) -> list[str]:
    """A collapsed module path as wings (the top-level module or package of each), collapsed."""
    return collapse([module.split(".")[0] for module in path])


def path_figures(path: list[str]) -> dict[str, int]:
    """Rooms (distinct modules), moves (transitions) and climbs back (moves into a module already
    visited) of a collapsed path."""
    return {"rooms": len(set(path)), "moves": max(len(path) - 1, 0),
            "climbs": sum(name in path[:number] for number, name in enumerate(path) if number)}


def quiet_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "PYTHONHASHSEED": "0"}


TINY = ["--model_name", "tiny", "--pretrained", "none", "--image_size", "64", "--batch_size", "4",
        "--num_workers", "0", "--device", "cpu"]
TRAIN_ONLY = ["--n_ctx", "4", "--depth", "2", "--t_n_ctx", "2", "--epoch", "1", "--learning_rate", "1e-3"]


def build_test_inputs(folder: Path) -> tuple[str, str]:
    """A small demo set (2 train, 2+2 valid, 3+3 test images at 64 px) and a tiny checkpoint trained
    one epoch on it, both built by this repository's code in ``folder``: (data root, checkpoint)."""
    data = Path(folder, "data")
    build = f"from generate_dataset.demo import build_demo; print(build_demo({str(data)!r}, n_train=2, " \
            "n_valid=(2, 2), n_test=(3, 3), image_size=64))"
    made = subprocess.run([sys.executable, "-c", build], cwd=ROOT, env=quiet_env(), capture_output=True, text=True,
                          check=True)
    root = made.stdout.strip().splitlines()[-1]
    run = Path(folder, "run")
    subprocess.run([sys.executable, "train.py", "--train_data_path", root, "--save_path", str(run), *TINY,
                    *TRAIN_ONLY], cwd=ROOT, env=quiet_env(), capture_output=True, text=True, check=True)
    return root, str(run / "best.pth")


def test_run_flags(data: str, checkpoint: str, save_path: Path) -> list[str]:
    return ["--data_path", data, "--checkpoint_path", checkpoint, "--save_path", str(save_path), *TINY]


# --- the table

def measure(root: Path, run_test: bool = True) -> list[tuple[str, str]]:
    """The table's rows for the tree at ``root``."""
    root = Path(root).resolve()
    top = top_level_modules(root)
    graph, private = import_graph(root)
    underscored = sorted(f"{name} -> {used}" for name, names in private.items() for used in names)
    circles = import_circles(graph)
    upward = upward_imports(root)
    total = sum(len(names) for names in top.values())
    rows = [("tree", f"{root} ({git_commit(root)})"),
            ("top-level modules", f"{total}: {len(top['seed'])} seed layout names, {len(top['scripts'])} entry "
                                  f"scripts ({', '.join(top['scripts'])}), {len(top['library'])} other library"),
            ("other library modules", ", ".join(top["library"]) or "none"),
            ("packages", ", ".join(packages(root))),
            ("import circles", f"{len(circles)}" + "".join(f"; {' <-> '.join(circle)}" for circle in circles)),
            ("cross-module underscored imports", f"{len(underscored)}" + "".join(f"; {u}" for u in underscored)),
            ("upward imports", f"{len(upward)}" + "".join(f"; {importer} -> {imported}"
                                                          for importer, imported in upward))]
    if run_test:
        start = time.time()
        with tempfile.TemporaryDirectory(prefix="house-") as folder:
            data, checkpoint = build_test_inputs(Path(folder))
            frames = prediction_path(root, test_run_flags(data, checkpoint, Path(folder, "results")))
        path = collapse([module for module, _ in frames])
        figures = path_figures(path)
        rows.append(("predictions' path", f"{figures['rooms']} rooms, {figures['moves']} moves, {figures['climbs']} "
                                          f"climbs back: {' -> '.join(path)}"))
        wings = wing_path(path)
        figures = path_figures(wings)
        rows.append(("  by wing (top-level module or package)",
                     f"{figures['rooms']} wings, {figures['moves']} moves, {figures['climbs']} climbs back: "
                     f"{' -> '.join(wings)}"))
        rows.append(("  frames (module.function)", " -> ".join(collapse([f"{m}.{f}" for m, f in frames]))))
        rows.append(("  measured in", f"{time.time() - start:.0f} s (demo set, tiny checkpoint, traced test.py)"))
    return rows


def git_commit(root: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"


def main(argv: list[str] | None = None) -> list[tuple[str, str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(ROOT), help="the checkout to measure (default: this repository)")
    parser.add_argument("--no-run", action="store_true", help="skip the traced test run (item 4)")
    args = parser.parse_args(argv)
    rows = measure(Path(args.root), run_test=not args.no_run)
    print("| figure | value |\n|---|---|")
    for figure, value in rows:
        print(f"| {figure} | {value} |")
    return rows


if __name__ == "__main__":
    main()
