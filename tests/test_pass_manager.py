"""The pass manager: order, checks after each pass, errors naming the pass and its predecessors."""

import pytest
import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from graphlora.errors import PassError, PolicyError
from graphlora.labels import set_site_step
from graphlora.pass_manager import PassManager


def small_graph_module():
    class M(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x) + 1

    return torch.fx.symbolic_trace(M())


class Record(PassBase):
    def __init__(self, name, log):
        super().__init__()
        self.name, self.log = name, log

    def call(self, gm):
        self.log.append(self.name)
        return PassResult(gm, False)


class Boom(PassBase):
    name = "boom"

    def call(self, gm):
        raise ValueError("kaboom")


class BreakBranch(PassBase):
    """Tags a node as a LoRA step without the rest of the branch: the invariant check must catch it."""

    name = "break_branch"

    def call(self, gm):
        node = next(n for n in gm.graph.nodes if n.op == "call_function")
        set_site_step(node, "some.site", "lora_a")
        return PassResult(gm, True)


class UserError(PassBase):
    name = "user_error"

    def call(self, gm):
        raise PolicyError("rules[0] matches nothing", key_path="rules[0]")


def test_runs_in_order_and_records():
    log = []
    records = PassManager([Record("a", log), Record("b", log)])(small_graph_module())
    assert log == ["a", "b"]
    assert [r.name for r in records] == ["a", "b"] and not any(r.modified for r in records)


def test_failure_names_pass_and_previous_passes():
    with pytest.raises(PassError, match=r"graph pass 'boom' failed \(passes run before it: a, b\): ValueError: kaboom"):
        PassManager([Record("a", []), Record("b", []), Boom()])(small_graph_module())


def test_label_invariants_checked_after_each_pass():
    with pytest.raises(PassError, match=r"'break_branch'.*step 'base' 0 times"):
        PassManager([BreakBranch()])(small_graph_module())


def test_user_errors_keep_their_type():
    with pytest.raises(PolicyError) as info:
        PassManager([UserError()])(small_graph_module())
    assert info.value.key_path == "rules[0]"
