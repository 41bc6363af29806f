"""graphlora/labels.py is the only module that reads or writes graphlora's metadata on graphs.

Every other module of the package goes through its accessors; this test reads the source of the
package and fails on a raw key (``node.meta["custom"]``, a ``"graphlora.<field>"`` key, the graph-level
``"graphlora"`` key) anywhere else.
"""

import ast
import pathlib

import torch

from graphlora import labels

PACKAGE = pathlib.Path(labels.__file__).resolve().parent
FIELDS = {key.removeprefix("graphlora.") for key in labels.NODE_KEYS}


def _used_as_key(node: ast.Constant, parent: ast.AST | None) -> bool:
    """``x["key"]``, ``x.get("key")``, ``x.setdefault("key", ...)``, ``x.pop("key")``, ``"key" in x``."""
    if isinstance(parent, ast.Subscript):
        return parent.slice is node
    if isinstance(parent, ast.Call) and isinstance(parent.func, ast.Attribute):
        return parent.func.attr in ("get", "setdefault", "pop") and parent.args[:1] == [node]
    return isinstance(parent, ast.Compare) and parent.left is node


def _raw_uses(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        value = node.value
        node_key = value.startswith("graphlora.") and value.removeprefix("graphlora.") in FIELDS
        if node_key or value == "graphlora." or (value in ("custom", "graphlora")
                                                  and _used_as_key(node, parents.get(node))):
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {value!r}")
    return found


def test_no_module_but_labels_touches_graph_metadata():
    offenders = [use for path in sorted(PACKAGE.rglob("*.py")) if path.name != "labels.py" or path.parent != PACKAGE
                 for use in _raw_uses(path)]
    assert not offenders, "read or write graph metadata through graphlora.labels:\n" + "\n".join(offenders)


def test_the_scan_sees_a_raw_key(tmp_path):
    """The checker itself: a raw read of a node key and of the graph key are both caught."""
    bad = tmp_path / "bad.py"
    bad.write_text('x = node.meta["custom"]["graphlora.base_node"]\ny = gm.meta.get("graphlora")\n')
    uses = [u.split(": ", 1)[1] for u in _raw_uses_in(bad)]
    assert sorted(uses) == ["'custom'", "'graphlora'", "'graphlora.base_node'"]


def _raw_uses_in(path):
    global PACKAGE
    saved, PACKAGE = PACKAGE, path.parent
    try:
        return _raw_uses(path)
    finally:
        PACKAGE = saved


def test_graph_meta_is_one_object_and_round_trips_node_fields():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    meta = labels.graph_meta(gm)
    assert labels.graph_meta(gm) is meta
    meta.towers["language"] = 3
    assert labels.graph_meta(gm).towers == {"language": 3}
    node = next(n for n in gm.graph.nodes if n.op == "call_function" or n.op == "call_module")
    labels.set_base_node(node, "linear")
    labels.set_fusion_group(node, ["a", "b"])
    decision = labels.SiteDecision(False, "why", skipped=True, cause=labels.SkipCause.UNREACHABLE)
    labels.set_decision(node, decision)
    assert labels.get_base_node(node) == "linear"
    assert labels.get_fusion_group(node) == ["a", "b"]
    assert labels.get_decision(node) == decision
    assert set(labels.node_metadata(node)) == {"base_node", "group", "decision"}
    assert set(labels.node_metadata(node)) <= labels.KNOWN_NODE_FIELDS
