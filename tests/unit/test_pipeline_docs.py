"""docs/architecture.md lists the pass pipeline as graphlora/pipeline.py defines it, and every pass module
of graphlora/passes is in some list."""

import pathlib
import re

from graphlora import pipeline

ROOT = pathlib.Path(__file__).resolve().parents[2]
LISTS = {"analysis": pipeline.ANALYSIS, "labelling": pipeline.LABELLING, "transform": pipeline.TRANSFORM,
         "lowering": pipeline.LOWERING}


def test_the_architecture_page_lists_the_pipeline():
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"<!-- pipeline:begin -->\n(.*?)<!-- pipeline:end -->", text, re.S).group(1)
    expected = "".join(f"- {name}: {', '.join(p.name for p in passes)}\n" for name, passes in LISTS.items())
    assert block == expected


def test_every_pass_module_runs_in_a_list():
    listed = {p.__module__ for passes in LISTS.values() for p in passes}
    modules = {f"graphlora.passes.{f.stem}" for f in (ROOT / "graphlora" / "passes").glob("*_pass.py")}
    assert modules == listed
    assert list(pipeline.STAGES[:2]) == [pipeline.RECORD_STAGE, pipeline.EXPORT_STAGE]
