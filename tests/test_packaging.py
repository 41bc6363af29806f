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
