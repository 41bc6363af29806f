"""Small FX helpers shared by passes."""

from __future__ import annotations

import torch
import torch.fx
import torch.utils._pytree as pytree

from graphlora.trace import fake_mode_of


def propagate_fake_value(node: torch.fx.Node, fake_mode=None) -> None:
    """Compute ``node.meta['val']`` by running the node's op on its inputs' fake values.

    New nodes made by a pass (or by ``subgraph_rewriter``) have no ``val``; downstream passes and
    dumps need it. The fake mode must be the graph's own (never a new one).
    """
    if node.op != "call_function":
        return
    fake_mode = fake_mode or fake_mode_of(node.graph)

    def val(a):
        return a.meta["val"] if isinstance(a, torch.fx.Node) else a

    args = pytree.tree_map(val, node.args)
    kwargs = pytree.tree_map(val, node.kwargs)
    if fake_mode is None:
        return
    with fake_mode:
        node.meta["val"] = node.target(*args, **kwargs)
