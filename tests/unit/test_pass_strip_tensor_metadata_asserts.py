"""strip_tensor_metadata_asserts: export records the dtype each ``.to()`` saw as an ``_assert_tensor_metadata``
node; the pass removes every such node and nothing else, so a program serves a model cast to another dtype."""

import pytest
import torch
from torch.testing import FileCheck

from toy import aten, count, run_analysis

ASSERT = aten._assert_tensor_metadata.default


def _other_nodes(gm):
    return [(n.op, str(n.target)) for n in gm.graph.nodes if n.target != ASSERT]


def _as_float64(toy):
    toy.model.to(torch.float64)
    toy.inputs["pixel_values"] = toy.inputs["pixel_values"].double()


def test_removes_the_assert_a_cast_records(make_toy):
    toy = make_toy(float_logits=True)
    assert count(toy.gm, ASSERT) >= 1, "logits.float() should leave an assert in the export"
    FileCheck().check("aten._assert_tensor_metadata").check("aten.to.dtype").run(toy.gm.code)
    others = _other_nodes(toy.gm)

    [record] = run_analysis(toy, ["strip_tensor_metadata_asserts"])

    assert record.modified
    assert count(toy.gm, ASSERT) == 0
    FileCheck().check_not("_assert_tensor_metadata").run(toy.gm.code)
    assert _other_nodes(toy.gm) == others  # only the asserts went; the cast itself stays


def test_the_program_serves_a_model_cast_to_float64_only_after_the_pass(make_toy):
    toy = make_toy(float_logits=True)
    _as_float64(toy)
    with pytest.raises(Exception, match="(?i)dtype"):
        toy.run()  # the assert still expects the float32 logits export saw

    run_analysis(toy, ["strip_tensor_metadata_asserts"])
    out = toy.run()
    assert out["logits"].dtype == torch.float32  # what .float() gives, from float64 logits
    with torch.no_grad():
        eager = toy.model(**toy.inputs)
    torch.testing.assert_close(out["logits"], eager["logits"])


def test_a_graph_without_asserts_is_left_alone(toy):
    assert count(toy.gm, ASSERT) == 0
    code = toy.gm.code
    [record] = run_analysis(toy, ["strip_tensor_metadata_asserts"])
    assert not record.modified
    assert toy.gm.code == code
