"""The fusion pass on real models: every selected site fused (or listed with a reason),
numerics equal to the unfused graph and to an eager W + s B A copy, forward and backward;
torch.compile of the fused model on CPU."""

import copy

import pytest
import torch

import graphlora
from graphlora.labels import get_site_step
from helpers import EagerLoraReference, merged_copy, set_random_lora

POLICY = dict(finetune_vision_layers=True, finetune_language_layers=True, finetune_projector=True)
MERGED = dict(atol=1e-5, rtol=1e-4)


def running_graphs(lora_model) -> list[tuple[torch.fx.GraphModule, int]]:
    """(graph, calls per forward) of what runs: the last whole-model program, or each block class's last
    LoRA program once per block of the class."""
    if lora_model.trace_mode == "whole":
        return [(lora_model.programs()[-1].graph_module, 1)]
    programs = lora_model.block_programs()
    return [(programs[c.name].graph_module, len(c.instances)) for c in lora_model.block_classes()]


def op_counts(lora_model):
    """Ops per forward; in blocks mode a glue linear's module-level LoRA counts as one fused op."""
    counts = {}
    for gm, calls in running_graphs(lora_model):
        for node in gm.graph.nodes:
            if node.op == "call_function":
                counts[str(node.target)] = counts.get(str(node.target), 0) + calls
    glue = len(lora_model.planner.glue_forwards) if lora_model.fuse else 0
    if glue:
        counts["graphlora.lora_linear.default"] = counts.get("graphlora.lora_linear.default", 0) + glue
    return counts


def lora_grads(lora_model):
    return {n: p.grad.clone() for n, p in lora_model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("trace_mode", ["whole", "blocks"])
def test_every_llava_site_is_fused_and_matches(tiny, trace_mode):
    model, inputs = tiny("llava")
    fused = graphlora.rewrite(model, POLICY, inputs, trace_mode=trace_mode, fuse=True)
    unfused = graphlora.rewrite(copy.deepcopy(model), POLICY, inputs, fuse=False, trace_mode=trace_mode)
    set_random_lora(fused)
    set_random_lora(unfused)

    report = fused.fusion_report()
    assert sorted(report) == sorted(s.name for s in fused.sites)
    assert all(entry["fused"] for entry in report.values()), report
    counts = op_counts(fused)
    # q/k/v share one group op per attention (2 CLIP + 2 Llama layers... CLIP layer 1 is skipped),
    # gate/up one per Llama layer; the rest are single fused ops.
    assert counts["graphlora.lora_linear_group.default"] == 5
    assert counts["graphlora.lora_linear.default"] == len(fused.sites) - 3 * 3 - 2 * 2
    assert not any(get_site_step(n) and get_site_step(n)[1] != "fused"
                   for gm, _ in running_graphs(fused) for n in gm.graph.nodes)
    assert "graphlora.lora_linear.default" not in op_counts(unfused)

    out_f, out_u = fused(**inputs), unfused(**inputs)
    with torch.no_grad():
        ref = merged_copy(model, fused)(**inputs, use_cache=False)
    torch.testing.assert_close(out_f.logits, out_u.logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out_f.logits, ref.logits, **MERGED)
    out_f.loss.backward()
    out_u.loss.backward()
    grads_f, grads_u = lora_grads(fused), lora_grads(unfused)
    assert grads_f.keys() == grads_u.keys() and len(grads_f) == 2 * len(fused.sites)
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_u[name], atol=1e-5, rtol=1e-4, msg=name)
        assert grads_f[name].abs().sum() > 0, name

    # And against eager PyTorch: the same LoRA as forward hooks on the original modules (x W^T + s B A x).
    for p in fused.parameters():
        p.grad = None
    with EagerLoraReference(model, fused):
        eager_out = model(**inputs, use_cache=False)
    eager_out.loss.backward()
    torch.testing.assert_close(out_f.logits, eager_out.logits, atol=1e-6, rtol=1e-6)
    for name, grad in lora_grads(fused).items():
        torch.testing.assert_close(grads_f[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_training_with_dropout_uses_the_seeded_op(tiny):
    model, inputs = tiny("llava")
    lora_model = graphlora.rewrite(model, dict(lora_dropout=0.3), inputs, fuse=True)
    set_random_lora(lora_model)
    lora_model.train()
    counts = None
    torch.manual_seed(0)
    a = lora_model(**inputs).logits
    counts = op_counts(lora_model)
    assert counts.get("aten.randint.low", 0) >= 1  # one seed per fused call site group
    torch.manual_seed(0)
    b = lora_model(**inputs).logits
    torch.manual_seed(1)
    c = lora_model(**inputs).logits
    torch.testing.assert_close(a, b)  # same global seed -> same masks
    assert (a - c).abs().max() > 1e-5  # another seed -> other masks
    lora_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(lora_model(**inputs).logits, merged_copy(model, lora_model)(**inputs, use_cache=False).logits, **MERGED)


@pytest.mark.parametrize("trace_mode", ["whole", "blocks"])
def test_unfusable_sites_are_listed_with_reasons(tiny, trace_mode):
    model, inputs = tiny("gemma3")
    lora_model = graphlora.rewrite(model, POLICY, inputs, trace_mode=trace_mode, fuse=True)
    report = lora_model.fusion_report()
    projector = "model.multi_modal_projector.mm_input_projection_weight"
    assert report[projector]["fused"] is False
    assert "raw parameter matmul" in report[projector]["reason"]
    assert all(entry["fused"] for site, entry in report.items() if site != projector)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lora_model(**inputs)
    autocast_report = lora_model.fusion_report()
    assert all(not e["fused"] and "autocast" in e["reason"] for e in autocast_report.values())


@pytest.mark.slow
def test_torch_compile_on_cpu_matches_eager_program(tiny):
    model, inputs = tiny("llava")
    compiled = graphlora.rewrite(model, POLICY, inputs, compile=True, fuse=True)
    plain = graphlora.rewrite(copy.deepcopy(model), POLICY, inputs, fuse=True)
    set_random_lora(compiled)
    set_random_lora(plain)
    compiled.train()
    plain.train()
    out_c, out_p = compiled(**inputs), plain(**inputs)
    torch.testing.assert_close(out_c.logits, out_p.logits, atol=1e-5, rtol=1e-4)
    out_c.loss.backward()
    out_p.loss.backward()
    for name, grad in lora_grads(compiled).items():
        torch.testing.assert_close(grad, lora_grads(plain)[name], atol=1e-4, rtol=1e-3, msg=name)
    assert all(p.runner is not None for p in compiled.programs())
