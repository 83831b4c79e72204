"""The package's import graph: no cycles between modules, and no import that goes up the layers.

Every import counts, including the ones inside functions (a lazy import hides a cycle from the
interpreter at import time but not from the design) and the module names the command line loads
by string (``importlib.import_module``). A module may import from its own layer and the layers
below it. The order, lowest first, and why each layer sits where it does:

* ``foundation``: the config schema, the one wrapper of torch.distributed, the debug checks, the
  user-error base class and the output-folder rules every writer follows;
* ``checkpoints``: finding, verifying, reading and consolidating checkpoints on disk; below the
  model (``model.pretrained`` may name a checkpoint), the trainer and the exporter;
* ``data``: shards -> Batch, and the tools that write shards (annotation, negatives);
* ``model``: open_clip towers, dense outputs, ``Features``; builds from a config or a checkpoint;
* ``losses``: the terms and their composer, on ``Features`` and ``Batch``;
* ``eval``: the benchmarks (the trainer runs them periodically, so they sit below it);
* ``train``: the loop, engine, checkpoints of a run, resume;
* ``export``: a run or checkpoint -> an open_clip folder;
* ``eval_io``: evaluating exported artefacts and runs (``powerclip eval``), built on the export;
* ``launch``: Slurm submission and job arrays, which run training or the shard tools;
* ``cli``: the ``powerclip`` command.

A new module is placed by the longest prefix below that names it; one that matches none fails the
test, so each new top-level module or package is placed deliberately.
"""

from __future__ import annotations

import ast
from pathlib import Path

import powerclip

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("powerclip", "powerclip.atomic", "powerclip.config", "powerclip.distributed", "powerclip.checks",
                    "powerclip.progress", "powerclip.errors", "powerclip.outputs")),
    ("checkpoints", ("powerclip.checkpoints",)),
    ("data", ("powerclip.data", "powerclip.annotate", "powerclip.negatives")),
    ("model", ("powerclip.model",)),
    ("losses", ("powerclip.losses",)),
    ("eval", ("powerclip.eval",)),
    ("train", ("powerclip.train",)),
    ("export", ("powerclip.export",)),
    ("eval_io", ("powerclip.eval_io",)),
    ("launch", ("powerclip.launch",)),
    ("cli", ("powerclip.cli", "powerclip.__main__", "powerclip.config_cli")),
)


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package under ``root``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path], package: str) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (module level or in a function)."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def add(target: str) -> None:
        while target not in modules and "." in target:  # ``from pkg.mod import Name``: the module
            target = target.rsplit(".", 1)[0]
        if target in modules and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == package:
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != package:
                continue
            for alias in node.names:  # ``from pkg import submodule`` imports the submodule
                add(f"{mod}.{alias.name}" if f"{mod}.{alias.name}" in modules else mod)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in modules:
            add(node.value)  # a module loaded by name (importlib.import_module("powerclip.x"))
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    modules = module_files(root, package)
    return {name: imports_of(name, path, modules, package) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer_of(module: str, layers=LAYERS) -> int | None:
    """Index of the layer whose longest matching prefix names ``module`` (the root package: exact)."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(layers):
        for p in prefixes:
            exact_only = "." not in p
            if (module == p or (not exact_only and module.startswith(p + "."))) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def upward_imports(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    names = [n for n, _ in layers]
    bad = []
    for src in sorted(graph):
        for dst in sorted(graph[src]):
            ls, ld = layer_of(src, layers), layer_of(dst, layers)
            if ls is not None and ld is not None and ld > ls:
                bad.append(f"{src} ({names[ls]}) imports {dst} ({names[ld]})")
    return bad


def _package_graph() -> dict[str, set[str]]:
    root = Path(powerclip.__file__).resolve().parent.parent
    return import_graph(root, "powerclip")


def test_no_import_cycles():
    found = cycles(_package_graph())
    assert not found, "import cycles between powerclip modules:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_every_module_has_a_layer():
    unplaced = [m for m in sorted(_package_graph()) if layer_of(m) is None]
    assert not unplaced, f"modules outside every layer of LAYERS (place them in {__name__}): {unplaced}"


def test_no_upward_imports():
    bad = upward_imports(_package_graph())
    assert not bad, "imports against the layer order (see the docstring of this test):\n" + "\n".join(bad)


def test_checkpoints_import_only_the_foundation():
    """The checkpoint package is what model, train, export and eval all read checkpoints through."""
    graph = _package_graph()
    outside = {f"{m} -> {d}" for m, deps in graph.items() if m.startswith("powerclip.checkpoints")
               for d in deps if not d.startswith("powerclip.checkpoints") and layer_of(d) != 0}
    assert not outside, sorted(outside)
    assert any(d.startswith("powerclip.checkpoints") for d in graph["powerclip.model.factory"])
    assert any(d.startswith("powerclip.checkpoints") for d in graph["powerclip.export"])


def test_the_checker_sees_lazy_upward_imports_relative_imports_and_cycles(tmp_path):
    """The checks above are only as good as the parser: a toy package with each kind of import."""
    pkg = tmp_path / "toy"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("from . import base\n")
    (pkg / "low" / "base.py").write_text("def f():\n    from toy.high import g  # lazy, upward\n    return g\n")
    (pkg / "high.py").write_text("from .low.base import f\nimport importlib\n"
                                 "def g():\n    return importlib.import_module('toy.cli')\n")
    (pkg / "cli.py").write_text("import toy.high\n")
    graph = import_graph(tmp_path, "toy")
    assert graph == {"toy": set(), "toy.low": {"toy.low.base"}, "toy.low.base": {"toy.high"},
                     "toy.high": {"toy.low.base", "toy.cli"}, "toy.cli": {"toy.high"}}
    assert cycles(graph) == [["toy.cli", "toy.high", "toy.low.base"]]
    layers = (("low", ("toy", "toy.low")), ("high", ("toy.high",)), ("cli", ("toy.cli",)))
    assert upward_imports(graph, layers) == ["toy.high (high) imports toy.cli (cli)",
                                             "toy.low.base (low) imports toy.high (high)"]
    assert layer_of("toy.elsewhere", layers) is None  # the root package places only itself


def private_imports(files: list[Path], package: str) -> list[str]:
    """``from <package>... import _name`` anywhere in ``files``: a private name used outside its module
    (the owner may rename it freely, so a caller that needs it needs a public name)."""
    bad = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == package):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        bad.append(f"{path.name}:{node.lineno} imports {alias.name} from {node.module or '.'}")
    return bad


def test_no_private_name_imported_across_modules(tmp_path):
    root = Path(powerclip.__file__).resolve().parent.parent
    files = sorted((root / "powerclip").rglob("*.py")) + sorted((root / "tools").glob("*.py"))
    bad = private_imports(files, "powerclip")
    assert not bad, "private names imported from other modules (give them a public name):\n" + "\n".join(bad)
    toy = tmp_path / "toy.py"  # the checker itself sees both spellings
    toy.write_text("from powerclip.x import _hidden, public\nfrom .y import _other\nfrom powerclip import __version__\n")
    assert private_imports([toy], "powerclip") == ["toy.py:1 imports _hidden from powerclip.x",
                                                    "toy.py:2 imports _other from y"]


def test_each_package_folder_lies_in_one_layer():
    """The folder tree shows the layers: no module sits in a package folder of another layer (a
    prefix naming a module inside another layer's folder would hide an upward step in the tree)."""
    prefixes = [(name, p) for name, ps in LAYERS for p in ps if "." in p]
    bad = [f"{p} ({name}) lies inside {q} ({other})" for name, p in prefixes for other, q in prefixes
           if other != name and p.startswith(q + ".")]
    assert not bad, bad
    modules = _package_graph()
    packages = {m for m in modules if (Path(powerclip.__file__).parent.parent / m.replace(".", "/")).is_dir()}
    mixed = {pkg: sorted({LAYERS[layer_of(m)][0] for m in modules if m.startswith(pkg + ".")} - {LAYERS[layer_of(pkg)][0]})
             for pkg in packages if pkg != "powerclip"}
    assert not {k: v for k, v in mixed.items() if v}, mixed
