"""The package list in pyproject.toml covers every package of the source tree."""

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_subpackage_is_installed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "package-dir" not in config, "no package remap: every package lies where it is imported from"
    include = config["packages"]["find"]["include"]
    from setuptools import find_packages

    found = set(find_packages(str(ROOT), include=include))
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "graphlora").rglob("__init__.py")}
    assert on_disk and on_disk == found, f"packages setuptools would miss: {sorted(on_disk - found)}"


def test_passes_are_a_plain_subpackage():
    import graphlora.passes

    assert pathlib.Path(graphlora.passes.__file__).parent == ROOT / "graphlora" / "passes"
    assert (ROOT / "passes").resolve() == ROOT / "graphlora" / "passes"  # the layout's passes/ is a link


def test_a_plain_checkout_imports_without_an_install(tmp_path):
    """A copy of the source tree on sys.path imports whole, from itself alone: no module (the passes
    included) comes from the editable install of another tree."""
    import shutil
    import subprocess
    import sys

    shutil.copytree(ROOT / "graphlora", tmp_path / "graphlora", ignore=shutil.ignore_patterns("__pycache__"))
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import graphlora.model, graphlora.passes.insert_lora_branches_pass as p\n"
        "import pathlib\n"
        "root = pathlib.Path(sys.argv[1]).resolve()\n"
        "for m in (graphlora.model, p):\n"
        "    assert root in pathlib.Path(m.__file__).resolve().parents, m.__file__\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_public_names_survive_importing_every_submodule():
    """A submodule named like a public function (``graphlora/rewrite.py`` beside ``graphlora.rewrite``)
    would replace the function with the module once anything imports it: ``graphlora.rewrite(...)`` then
    fails with "'module' object is not callable", depending on import order. Import every submodule
    first, in a fresh interpreter, then check each public name."""
    import subprocess
    import sys

    script = (
        "import importlib, pkgutil, types, graphlora\n"
        "for info in pkgutil.walk_packages(graphlora.__path__, 'graphlora.'):\n"
        "    if not info.name.endswith('__main__'):\n"
        "        importlib.import_module(info.name)\n"
        "bad = [n for n in graphlora.__all__ if isinstance(getattr(graphlora, n), types.ModuleType)]\n"
        "assert not bad, f'public names shadowed by submodules: {bad}'\n"
        "assert callable(graphlora.rewrite) and callable(graphlora.explain)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _import_graph() -> "dict[str, set[str]]":
    """graphlora module -> the graphlora modules it imports (module level or inside functions; imports
    under ``if TYPE_CHECKING:`` are annotations only and do not count)."""
    import ast

    sources = {}
    for path in (ROOT / "graphlora").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        sources[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(name: str) -> str | None:
        while name and name not in sources:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in sources.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        skipped = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skipped.update(id(n) for n in ast.walk(node))
        edges = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                edges.update(resolve(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                for alias in node.names:
                    edges.add(resolve(f"{base}.{alias.name}") if f"{base}.{alias.name}" in sources else resolve(base))
        graph[module] = {e for e in edges if e and e != module and e.startswith("graphlora")}
    return graph


def test_no_import_cycle_among_graphlora_modules():
    """One direction between modules (model -> adapters, rewriter -> model, cli -> dump ...): a cycle makes
    import order matter and the next engineer's refactoring hard. Lazy imports inside functions count."""
    import networkx as nx

    graph = nx.DiGraph()
    for module, targets in _import_graph().items():
        graph.add_node(module)
        graph.add_edges_from((module, t) for t in targets)
    cycles = sorted(sorted(c) for c in nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_the_import_graph_sees_lazy_imports():
    graph = _import_graph()
    assert "graphlora.adapters" in graph["graphlora.model"]  # imported inside GraphLoraModel's methods
    assert "graphlora.ops.dropout_rng" in graph["graphlora.ops.lora_linear"]  # from . import dropout_rng


def test_no_adapters_submodule_is_named_like_a_name_the_package_exports():
    """``graphlora.adapters.merge`` is a function; a ``merge.py`` beside it would make the dotted name mean
    two things (``import graphlora.adapters.merge as m`` gives the function, ``mock.patch`` strings reach
    the wrong object)."""
    import pkgutil

    import graphlora.adapters

    submodules = {info.name for info in pkgutil.iter_modules(graphlora.adapters.__path__)}
    assert not submodules & set(graphlora.adapters.__all__)


def test_core_modules_import_the_testing_package_only_lazily():
    """graphlora.testing (the zoo, synthetic data, the demo) is test and demo support: outside it only the
    command line and the MODEL SPEC resolution import it, and only inside the function that needs it."""
    import ast

    users = {module for module, targets in _import_graph().items()
             if not module.startswith("graphlora.testing") and any(t.startswith("graphlora.testing") for t in targets)}
    assert users <= {"graphlora.cli", "graphlora.model_spec"}, sorted(users)
    for module in users:
        tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
        in_functions = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                        for n in ast.walk(f)}
        top_level = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                     and id(n) not in in_functions and "graphlora.testing" in ast.unparse(n)]
        assert not top_level, f"{module} imports graphlora.testing at module level: {top_level}"
