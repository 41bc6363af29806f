"""Adapters in PEFT's format (both directions), merging, merged checkpoints, and safe file writes."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import graphlora
from graphlora.adapters import AdapterError, AdapterExistsError
from graphlora.testing import zoo
from helpers import set_random_lora

EXACT = dict(atol=1e-5, rtol=1e-5)  # the same computation in fp32, summed in another order

#: One policy per family: per-site ranks/alphas and modules_to_save (LLaVA), plain (Qwen2-VL), rsLoRA
#: (Mllama), and the Gemma 3 projector, a raw parameter matmul (PEFT's target_parameters).
POLICIES = {
    "llava": dict(modules_to_save=["lm_head"], rules=[{"match": {"role": "attn.q"}, "r": 4, "alpha": 8}]),
    "qwen2_vl": dict(),
    "mllama": dict(use_rslora=True, r=8),
    "gemma3": dict(finetune_vision_layers=False, finetune_projector=True),
}

#: Gemma 3's projector is a raw parameter matmul: whole-model tracing (with verification, the default)
#: adapts it; "whole" is pinned so a regression to the regional fallback (which cannot adapt a raw
#: matmul in eager glue) fails here instead of passing with fewer sites.
REWRITE_KWARGS = {"gemma3": dict(trace_mode="whole")}

_CASES: dict[str, "Case"] = {}


class Case:
    """A tiny model, a pristine copy, a graphlora model with random LoRA (and a perturbed modules_to_save
    copy), its reference logits and its adapter saved once."""

    def __init__(self, name: str, root: Path):
        self.name = name
        self.model = zoo.build_tiny_model(name)
        self.inputs = zoo.tiny_example_inputs(name, self.model)
        self.pristine = copy.deepcopy(self.model)
        self.kwargs = REWRITE_KWARGS.get(name, {})
        self.lora_model = graphlora.rewrite(self.model, POLICIES[name], self.inputs, **self.kwargs)
        set_random_lora(self.lora_model)
        perturb_modules_to_save(self.lora_model, self.lora_model.policy.modules_to_save)
        self.lora_model.eval()
        self.reference = logits(self.lora_model, self.inputs)
        self.adapter = root / f"{name}-adapter"
        self.lora_model.save_adapter(self.adapter)

    def fresh(self) -> torch.nn.Module:
        return copy.deepcopy(self.pristine)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")

    def get(name: str) -> Case:
        if name not in _CASES:
            _CASES[name] = Case(name, root)
        return _CASES[name]

    yield get
    _CASES.clear()


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, graphlora.GraphLoraModel):
            return model(**inputs).logits
        return model(**inputs, use_cache=False).logits


def perturb_modules_to_save(model, names, seed: int = 5) -> None:
    """Make trained-looking modules_to_save copies (they start equal to the originals)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for path, module in model.named_modules():
            if path and any(path == n or path.endswith("." + n) for n in names or []):
                for p in module.parameters():
                    p.add_(torch.randn(p.shape, generator=generator) * 0.1)


def relative_error(value, reference) -> float:
    return ((value.float() - reference.float()).norm() / reference.float().norm()).item()


def peft_adapted_modules(peft_model) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer))


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def file_contents(directory: Path) -> dict[str, object]:
    """Like file_bytes, but a safetensors file as (metadata, tensors): its header order is not stable."""
    from safetensors import safe_open

    out: dict[str, object] = {}
    for name, data in file_bytes(directory).items():
        if name.endswith(".safetensors"):
            with safe_open(str(directory / name), "pt") as f:
                out[name] = (f.metadata(), {k: f.get_tensor(k).tolist() for k in sorted(f.keys())})
        else:
            out[name] = data
    return out


# =====================================================================================================
# 1. PEFT interoperability
# =====================================================================================================
@pytest.mark.parametrize("name", list(POLICIES))
def test_peft_reads_graphlora_adapter(cases, name):
    from peft import PeftModel
    from safetensors import safe_open

    case = cases(name)
    sites = case.lora_model.sites
    assert {p.name for p in case.adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                        "graphlora_policy.yaml"}
    config = json.loads((case.adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["bias"] == "none" and config["use_dora"] is False
    assert config["target_modules"] == sorted(s.name for s in sites if s.kind == "linear")
    assert config.get("target_parameters") == (sorted(s.name for s in sites if s.kind != "linear") or None)
    assert config["use_rslora"] == case.lora_model.policy.use_rslora
    for site in sites:
        assert config["rank_pattern"].get(site.name, config["r"]) == site.r
        assert config["alpha_pattern"].get(site.name, config["lora_alpha"]) == site.alpha
    expected_keys = set(case.lora_model.lora_state_dict(peft_keys=True))
    if name == "llava":
        assert config["modules_to_save"] == ["lm_head"]
        assert config["rank_pattern"] and config["alpha_pattern"]
        expected_keys.add("base_model.model.lm_head.weight")
    with safe_open(str(case.adapter / "adapter_model.safetensors"), "pt") as f:
        assert set(f.keys()) == expected_keys

    peft_model = PeftModel.from_pretrained(case.fresh(), case.adapter).eval()
    assert peft_adapted_modules(peft_model) == sorted(s.module for s in sites)  # exactly the sites
    torch.testing.assert_close(logits(peft_model, case.inputs), case.reference, **EXACT)


@pytest.mark.parametrize("name", list(POLICIES))
def test_graphlora_reads_peft_adapter(cases, name, tmp_path):
    from peft import LoraConfig, get_peft_model

    case = cases(name)
    sites = case.lora_model.sites
    kwargs = dict(
        r=case.lora_model.policy.r, lora_alpha=16,
        target_modules=[s.name for s in sites if s.kind == "linear"],
        target_parameters=[s.name for s in sites if s.kind != "linear"] or None,
        use_rslora=case.lora_model.policy.use_rslora,
    )
    if name == "llava":  # per-site ranks and alphas the way users write them: suffix patterns
        kwargs.update(rank_pattern={"q_proj": 4, "fc1": 2}, alpha_pattern={"v_proj": 32}, modules_to_save=["lm_head"])
    peft_model = get_peft_model(case.fresh(), LoraConfig(**kwargs))
    set_random_lora(peft_model, seed=3)
    perturb_modules_to_save(peft_model, ["modules_to_save.default"])
    peft_model.save_pretrained(tmp_path)
    peft_model.eval()
    expected = logits(peft_model, case.inputs)

    loaded = graphlora.load_adapter(case.fresh(), tmp_path, case.inputs, **case.kwargs).eval()
    assert sorted(s.name for s in loaded.sites) == sorted(s.name for s in sites)
    if name == "llava":
        ranks = {s.name.rpartition(".")[2]: (s.r, s.alpha) for s in loaded.sites}
        assert ranks["q_proj"] == (4, 16) and ranks["fc1"] == (2, 16) and ranks["v_proj"] == (16, 32)
    torch.testing.assert_close(logits(loaded, case.inputs), expected, **EXACT)


def test_peft_all_linear_adapter_and_unreachable_modules(cases, tmp_path):
    """PEFT's all-linear also adapts LLaVA's last CLIP layer, whose output never reaches the logits: with
    lora_B still zero (it never gets a gradient) it is left out exactly; with a non-zero lora_B it is an
    error naming the module and why."""
    from peft import LoraConfig, get_peft_model

    case = cases("llava")
    peft_model = get_peft_model(case.fresh(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    dead = "model.vision_tower.encoder.layers.1."
    with torch.no_grad():
        generator = torch.Generator().manual_seed(7)
        for name, p in peft_model.named_parameters():
            if ".lora_A." in name or (".lora_B." in name and dead not in name):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(tmp_path / "a")
    peft_model.eval()
    with pytest.warns(UserWarning, match="never reach"):
        loaded = graphlora.load_adapter(case.fresh(), tmp_path / "a", case.inputs).eval()
    assert "model.multi_modal_projector.linear_1" in {s.name for s in loaded.sites}
    assert not any(s.name.startswith(dead) for s in loaded.sites)
    torch.testing.assert_close(logits(loaded, case.inputs), logits(peft_model, case.inputs), **EXACT)

    rewrite_weights(tmp_path / "a", lambda t: t[f"base_model.model.{dead}mlp.fc1.lora_B.weight"].fill_(1.0))
    with pytest.raises(AdapterError, match=rf"{dead}mlp\.fc1, which graphlora cannot adapt: its output never reaches"):
        graphlora.load_adapter(case.fresh(), tmp_path / "a", case.inputs)


def test_rank_pattern_keys_are_exact_under_peft_matching():
    """PEFT reads a rank_pattern key as a regular expression matched against a name's tail ('.' matches
    any character): plain names are written only when that gives every site its own rank."""
    from graphlora.adapters.config import _patterns
    from graphlora.adapters.peft_compat import peft_pattern_value
    from graphlora.lora import Site

    def site(name, r):
        return Site(name, "language", "attn.q", 0, r, 16.0, 0.0, 1.0, "test")

    plain = [site("m.layers.1.q_proj", 4), site("m.layers.11.q_proj", 16)]
    plain_patterns = _patterns(plain, 16, "r", {s.name: s.name for s in plain})
    assert plain_patterns == {"m.layers.1.q_proj": 4}
    clash = [site("blk.q", 4), site("blk_q", 16)]  # "blk.q" as a pattern also matches "blk_q"
    patterns = _patterns(clash, 16, "r", {s.name: s.name for s in clash})
    assert patterns == {r"^blk\.q": 4}
    assert [peft_pattern_value(patterns, s.name, 16) for s in clash] == [4, 16]
    from peft.utils.other import get_pattern_key  # PEFT's own lookup reads the patterns the same way

    assert [patterns.get(get_pattern_key(list(patterns), s.name), 16) for s in clash] == [4, 16]
    assert [plain_patterns.get(get_pattern_key(list(plain_patterns), s.name), 16) for s in plain] == [4, 16]


def test_graphlora_round_trip_uses_the_saved_policy(cases):
    case = cases("llava")
    loaded = graphlora.load_adapter(case.fresh(), case.adapter, case.inputs).eval()
    assert loaded.policy == case.lora_model.policy
    assert [(s.name, s.r, s.alpha) for s in loaded.sites] == [(s.name, s.r, s.alpha) for s in case.lora_model.sites]
    torch.testing.assert_close(logits(loaded, case.inputs), case.reference, rtol=0, atol=0)
    torch.testing.assert_close(loaded.get_parameter("lm_head.weight"), case.lora_model.get_parameter("lm_head.weight"))


def test_an_edited_policy_file_is_not_trusted(cases, tmp_path):
    case = cases("llava")
    d = copy_adapter(case, tmp_path / "a")
    with open(d / "graphlora_policy.yaml", "a") as f:
        f.write("finetune_vision_layers: false\n")
    with pytest.warns(UserWarning, match="graphlora_policy.yaml was not saved together"):
        loaded = graphlora.load_adapter(case.fresh(), d, case.inputs).eval()
    assert loaded.policy != case.lora_model.policy and not loaded.policy.finetune_language_layers  # rebuilt
    assert [(s.name, s.r, s.alpha) for s in loaded.sites] == [(s.name, s.r, s.alpha) for s in case.lora_model.sites]
    torch.testing.assert_close(logits(loaded, case.inputs), case.reference, **EXACT)


def test_save_refuses_what_peft_cannot_say(cases, tmp_path):
    import dataclasses

    case = cases("llava")
    sites = case.lora_model.sites
    try:
        case.lora_model.sites = [dataclasses.replace(sites[0], dropout=0.1)] + sites[1:]
        with pytest.raises(AdapterError, match="one lora_dropout"):
            case.lora_model.save_adapter(tmp_path / "a")
    finally:
        case.lora_model.sites = sites
    gemma = cases("gemma3").lora_model
    sites = gemma.sites
    try:
        gemma.sites = [dataclasses.replace(s, dropout=0.1) for s in sites]
        with pytest.raises(AdapterError, match="mm_input_projection_weight.*target_parameters"):
            gemma.save_adapter(tmp_path / "b")
    finally:
        gemma.sites = sites
    assert not (tmp_path / "a" / "adapter_config.json").exists()


# =====================================================================================================
# 2. merging
# =====================================================================================================
def test_merge_unmerge_is_exact_and_forward_skips_the_branch(cases):
    case = cases("llava")
    lm, original = case.lora_model, case.model
    before = {k: v.clone() for k, v in original.state_dict().items()}
    site = lm.sites[0]
    assert not lm.merged
    lm.merge()
    try:
        assert lm.merged
        # The user's model shares the weights: merging changed it.
        assert not torch.equal(original.get_parameter(f"{site.name}.weight"), before[f"{site.name}.weight"])
        torch.testing.assert_close(logits(lm, case.inputs), case.reference, **EXACT)
        with pytest.raises(graphlora.GraphLoraError, match="unmerge"):
            with lm.disable_adapter():
                pass
    finally:
        lm.unmerge()
    assert not lm.merged
    after = original.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # bitwise
    torch.testing.assert_close(logits(lm, case.inputs), case.reference, rtol=0, atol=0)


def test_save_merged_reloads_with_from_pretrained(cases, tmp_path):
    case = cases("llava")
    lm = case.lora_model
    state = {k: v.clone() for k, v in lm.state_dict().items()}
    config = lm.base_model.config.to_dict()
    lm.save_merged(tmp_path / "merged")
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "merged").iterdir()}
    # The live model is unchanged (weights, LoRA, config), and nothing was merged into it.
    assert not lm.merged
    assert all(torch.equal(lm.state_dict()[k], v) for k, v in state.items())
    assert lm.base_model.config.to_dict() == config
    reloaded = type(case.model).from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(reloaded, case.inputs), case.reference, **EXACT)
    # Saved while merged: the same checkpoint (merged from the saved originals, not merged twice).
    lm.merge()
    try:
        lm.save_merged(tmp_path / "merged2")
    finally:
        lm.unmerge()
    assert (tmp_path / "merged2" / "model.safetensors").read_bytes() == (tmp_path / "merged" / "model.safetensors").read_bytes()
    with pytest.raises(AdapterExistsError):
        lm.save_merged(tmp_path / "merged")


def test_save_merged_shards_and_overwrite_removes_stale_shards(cases, tmp_path):
    case = cases("llava")
    case.lora_model.save_merged(tmp_path, max_shard_size="200KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    reloaded = type(case.model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, case.inputs), case.reference, **EXACT)
    (tmp_path / "README.md").write_text("mine")
    case.lora_model.save_merged(tmp_path, overwrite=True)  # one file now: the old shards must go
    names = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in names and "README.md" in names
    assert not any(n.startswith("model-") or n.endswith(".index.json") or "graphlora" in n for n in names)
    reloaded = type(case.model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, case.inputs), case.reference, **EXACT)


def test_merge_in_bfloat16(tiny):
    model, inputs = tiny("qwen2_vl")
    lm = graphlora.rewrite(model, dict(finetune_vision_layers=False), inputs)
    set_random_lora(lm)
    lm.to(torch.bfloat16)
    inputs = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in inputs.items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        unmerged = lm(**inputs).logits
        base = model(**inputs, use_cache=False).logits
    lm.merge()
    with torch.no_grad():
        merged = lm(**inputs).logits
    lm.unmerge()
    assert merged.dtype == torch.bfloat16
    assert relative_error(merged, unmerged) < 0.02 < relative_error(base, unmerged)
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())  # bitwise, bf16


def test_tied_head_merge_is_refused_and_save_merged_unties(tiny, tmp_path):
    model, inputs = tiny("gemma3")
    policy = dict(finetune_vision_layers=False, rules=[{"match": {"component": "head"}, "target": True}])
    lm = graphlora.rewrite(model, policy, inputs)
    set_random_lora(lm)
    assert "lm_head" in {s.name for s in lm.sites}
    with pytest.raises(AdapterError, match="tied"):
        lm.merge()
    assert not lm.merged
    lm.save_merged(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    assert model.config.tie_word_embeddings is True
    reloaded = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, inputs), logits(lm, inputs), **EXACT)


# =====================================================================================================
# 3. errors and safe writes
# =====================================================================================================
def copy_adapter(case: Case, to: Path) -> Path:
    shutil.copytree(case.adapter, to)
    return to


def rewrite_weights(directory: Path, edit) -> None:
    """Rewrite adapter_model.safetensors as PEFT would (no graphlora metadata), after ``edit(tensors)``."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(directory / "adapter_model.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})


def edit_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_truncated_and_corrupt_weights_name_the_file(cases, tmp_path):
    case = cases("llava")
    for kind in ("truncated", "corrupt"):
        d = copy_adapter(case, tmp_path / kind)
        path = d / "adapter_model.safetensors"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if kind == "truncated" else b"\xff" * 8 + data[8:])
        with pytest.raises(AdapterError, match=r"adapter_model\.safetensors.*(truncated or corrupt)"):
            graphlora.load_adapter(case.pristine, d)


def test_rank_mismatch_missing_and_unexpected_keys_are_named(cases, tmp_path):
    case = cases("llava")
    key_a = "base_model.model.model.language_model.layers.0.self_attn.k_proj.lora_A.weight"
    key_b = key_a.replace("lora_A", "lora_B")

    d = copy_adapter(case, tmp_path / "rank")
    rewrite_weights(d, lambda t: t.update({key_a: t[key_a][:3].contiguous(), key_b: t[key_b][:, :3].contiguous()}))
    with pytest.raises(AdapterError, match=r"rank mismatch .* r=16, but .*k_proj\.lora_A\.weight has shape \[3, 32\]"):
        graphlora.load_adapter(case.pristine, d)

    d = copy_adapter(case, tmp_path / "missing")
    rewrite_weights(d, lambda t: t.pop(key_b))
    with pytest.raises(AdapterError, match=r"missing keys.*layers\.0\.self_attn\.k_proj\.lora_B\.weight"):
        graphlora.load_adapter(case.pristine, d)

    d = copy_adapter(case, tmp_path / "unexpected")
    rewrite_weights(d, lambda t: t.update({"base_model.model.model.foo.lora_A.weight": torch.zeros(2, 2)}))
    with pytest.raises(AdapterError, match=r"unexpected keys.*model\.foo\.lora_A\.weight"):
        graphlora.load_adapter(case.pristine, d)

    d = copy_adapter(case, tmp_path / "apart")  # graphlora's own files: the pairing is checked
    edit_config(d, r=8)
    with pytest.raises(AdapterError, match="not saved together.*r differ"):
        graphlora.load_adapter(case.pristine, d)


@pytest.mark.parametrize("field, value", [
    ("use_dora", True), ("fan_in_fan_out", True), ("bias", "all"), ("lora_bias", True),
    ("layers_to_transform", [0]), ("exclude_modules", ["q_proj"]), ("init_lora_weights", "pissa"),
    ("trainable_token_indices", [1, 2]), ("megatron_config", {"tp": 2}), ("loftq_config", {"loftq_bits": 4}),
    ("alora_invocation_tokens", [5]), ("layer_replication", [[0, 1]]), ("some_future_option", {"x": 1}),
])
def test_unsupported_peft_features_are_refused_by_name(cases, tmp_path, field, value):
    case = cases("llava")
    d = copy_adapter(case, tmp_path / "a")
    edit_config(d, **{field: value})
    with pytest.raises(AdapterError, match=f"unsupported PEFT config: .*{field}="):
        graphlora.load_adapter(case.pristine, d)


def test_a_target_graphlora_cannot_adapt_is_named(cases, tmp_path):
    case = cases("llava")
    d = copy_adapter(case, tmp_path / "a")
    rewrite_weights(d, lambda t: None)  # as PEFT writes it (no graphlora metadata)
    config = json.loads((d / "adapter_config.json").read_text())
    edit_config(d, target_modules=config["target_modules"] + ["embed_tokens"])
    with pytest.raises(AdapterError, match=r"selects model\.language_model\.embed_tokens, a Embedding"):
        graphlora.load_adapter(case.pristine, d)


def test_other_adapter_types_and_pickles_are_refused(cases, tmp_path):
    case = cases("llava")
    d = copy_adapter(case, tmp_path / "ia3")
    edit_config(d, peft_type="IA3")
    with pytest.raises(AdapterError, match="not LoRA"):
        graphlora.load_adapter(case.pristine, d)
    d = copy_adapter(case, tmp_path / "bin")
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    with pytest.raises(AdapterError, match="pickled"):
        graphlora.load_adapter(case.pristine, d)


def previous_adapter(case: Case, directory: Path) -> dict[str, bytes]:
    """A different, complete adapter already in ``directory`` (and a trainer's file); its bytes."""
    copy_adapter(case, directory)
    rewrite_weights(directory, lambda t: t.update({k: v + 1 for k, v in t.items()}))
    (directory / "trainer_state.json").write_text("{}")
    return file_bytes(directory)


def test_existing_adapter_is_kept_unless_overwrite(cases, tmp_path):
    case = cases("llava")
    before = previous_adapter(case, tmp_path / "a")
    with pytest.raises(AdapterExistsError, match="overwrite=True"):
        case.lora_model.save_adapter(tmp_path / "a")
    assert file_bytes(tmp_path / "a") == before
    case.lora_model.save_adapter(tmp_path / "a", overwrite=True)
    after = file_bytes(tmp_path / "a")
    assert after["trainer_state.json"] == before["trainer_state.json"]
    assert file_contents(tmp_path / "a") == file_contents(case.adapter) | {"trainer_state.json": b"{}"}


@pytest.mark.parametrize("failure", ["safetensors_writer", "second_replace"])
def test_interrupted_save_leaves_the_previous_adapter(cases, tmp_path, monkeypatch, failure):
    import safetensors.torch

    case = cases("llava")
    real_replace = os.replace

    def broken_writer(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    def install() -> type[BaseException]:
        if failure == "safetensors_writer":
            monkeypatch.setattr(safetensors.torch, "save_file", broken_writer)
            return OSError
        calls = []

        def interrupted_replace(src, dst):
            calls.append(dst)
            if len(calls) == 2:  # the weights are already in place: interrupted before the next file
                raise KeyboardInterrupt
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", interrupted_replace)
        return KeyboardInterrupt

    before = previous_adapter(case, tmp_path / "a")
    with pytest.raises(install()):
        case.lora_model.save_adapter(tmp_path / "a", overwrite=True)
    monkeypatch.undo()
    assert file_bytes(tmp_path / "a") == before  # the previous adapter, no temporary or backup files

    (tmp_path / "b").mkdir()
    with pytest.raises(install()):
        case.lora_model.save_adapter(tmp_path / "b")
    monkeypatch.undo()
    assert list((tmp_path / "b").iterdir()) == []  # no partial adapter at all
