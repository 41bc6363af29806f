"""The package list in pyproject.toml covers every package of the source tree."""

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_subpackage_is_installed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "graphlora").rglob("__init__.py")}
    found.add("graphlora.passes")
    assert found <= listed, f"add to pyproject's packages: {sorted(found - listed)}"
    assert config["package-dir"]["graphlora.passes"] == "passes"


def test_passes_import_as_graphlora_passes_only():
    import graphlora.passes

    assert pathlib.Path(graphlora.passes.__file__).parent == ROOT / "passes"


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
