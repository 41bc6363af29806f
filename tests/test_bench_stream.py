"""tools/bench_stream.py --smoke keeps working: both models train on the same varied stream, graphlora makes
its traces on the first batch only, and both start from the same loss (same weights, sites and batches)."""

import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "bench_stream.py"


def _load():
    spec = importlib.util.spec_from_file_location("graphlora_tool_bench_stream", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stream_shapes_vary_as_a_dataset_does():
    """The stream draws batch size, text length and (for dynamic-resolution families) image size."""
    shapes = _load().stream_shapes("qwen2_vl", 16, seed=0)
    assert len({s["batch_size"] for s in shapes}) > 1
    assert len({s["text_len"] for s in shapes}) > 1
    assert len({s["image_size"] for s in shapes}) > 1


def test_bench_stream_smoke(tmp_path):
    result = _load().main(["--smoke", "--threads", "1", "--json", str(tmp_path / "out.json")])
    rows = {r["family"]: r for r in result["rows"]}
    assert set(rows) == {"qwen2_vl", "llava"}
    for family, row in rows.items():
        assert row["batches"] == 4 and len(row["step_times"]["graphlora"]) == len(row["step_times"]["peft"]) == 4
        assert row["distinct_shapes"] > 1, family
        assert row["traces_after_first_batch"] == 0, row["trace_log"]
        assert row["traces"] == len(row["block_classes"]), row["trace_log"]
        assert row["first_loss"][0] == pytest.approx(row["first_loss"][1], rel=1e-4), family
    assert (tmp_path / "out.json").exists()
