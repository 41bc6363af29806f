"""transformers.Trainer with a GraphLoraModel (graphlora/integrations.py).

The acceptance run: 20 optimizer steps on the tiny LLaVA (vision + language LoRA) with
``gradient_accumulation_steps=2``, Trainer's defaults for ``remove_unused_columns`` (True) and
``num_items_in_batch`` (passed to the forward), evaluation every 10 steps, a checkpoint every 10 steps;
then a fresh model resumes from checkpoint-10 and must end exactly where the first run ended.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainingArguments

import graphlora
from graphlora.adapters import AdapterError
from graphlora.integrations import GraphLoraTrainer, GraphLoraTrainerMixin, unwrap_graphlora
from graphlora.testing import synthetic, zoo

POLICY = dict(finetune_vision_layers=True, finetune_language_layers=True, r=8, lora_alpha=16, lora_dropout=0.0)
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "graphlora_policy.yaml"}
TRAINER_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}


class PairDataset(torch.utils.data.Dataset):
    """A torch Dataset of single-sample dicts (graphlora.testing.synthetic.caption_dataset)."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return dict(self.samples[i])


class RecordingCollator:
    """graphlora.testing.synthetic.collate, recording which columns reached it (after remove_unused_columns)."""

    def __init__(self):
        self.seen: set[str] = set()

    def __call__(self, samples):
        for s in samples:
            self.seen.update(s)
        return synthetic.collate(samples)


def build(**rewrite_kwargs):
    model = zoo.build_tiny_model("llava")
    pairs = synthetic.caption_dataset(model, 8)
    lora_model = graphlora.rewrite(model, POLICY, example_inputs=synthetic.collate(pairs[:2]), **rewrite_kwargs)
    return lora_model, pairs


def arguments(output_dir, **overrides) -> TrainingArguments:
    args = dict(output_dir=str(output_dir), max_steps=20, per_device_train_batch_size=2, per_device_eval_batch_size=2,
                gradient_accumulation_steps=2, learning_rate=5e-3, logging_steps=1, save_steps=10,
                eval_strategy="steps", eval_steps=10, report_to="none", use_cpu=True, dataloader_num_workers=0,
                disable_tqdm=True, seed=0)
    args.update(overrides)
    return TrainingArguments(**args)


def lora_snapshot(lora_model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lora_model.lora_state_dict().items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer")
    lora_model, pairs = build()
    initial = lora_snapshot(lora_model)
    collator = RecordingCollator()
    trainer = GraphLoraTrainer(model=lora_model, args=arguments(out), train_dataset=PairDataset(pairs),
                               eval_dataset=PairDataset(pairs[:4]), data_collator=collator)
    trainer.train()
    return dict(out=out, lora_model=lora_model, pairs=pairs, trainer=trainer, initial=initial,
                final=lora_snapshot(lora_model), collator=collator)


def test_trains_with_accumulation_and_loss_falls(trained):
    history = trained["trainer"].state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert all(not torch.equal(trained["final"][k], trained["initial"][k]) for k in trained["final"] if ".lora_B." in k)


def test_evaluation_reports_eval_loss(trained):
    evals = [h for h in trained["trainer"].state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [10, 20]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]


def test_default_remove_unused_columns_keeps_the_model_inputs(trained):
    trainer = trained["trainer"]
    assert trainer.args.remove_unused_columns is True
    assert trained["collator"].seen == set(trained["pairs"][0])  # input_ids, attention_mask, labels, pixel_values
    assert trainer.label_names == ["labels"]


def test_num_items_in_batch_is_a_program_input(trained):
    """Trainer passes ``num_items_in_batch`` (a tensor); it is traced as an input, not a per-value constant.

    (transformers hands it on to every decoder layer in ``**kwargs``: the block programs take it too.)"""
    lora_model = trained["lora_model"]
    keys = [key for key, _ in lora_model.runtime.keyed_programs()]
    train_keys = [k for k in keys if k.training]
    assert train_keys and all("num_items_in_batch" in k.tensor_names for k in train_keys)
    assert not any(name == "num_items_in_batch" for k in keys for name, _ in k.constants)
    # rewrite + train + eval (+ eval with the count), per block class: no trace per step
    assert lora_model.num_traces <= 4 * len(lora_model.block_classes())


def test_checkpoint_holds_adapter_and_trainer_state_only(trained):
    for step in (10, 20):
        ckpt = trained["out"] / f"checkpoint-{step}"
        files = set(os.listdir(ckpt))
        assert ADAPTER_FILES <= files, files
        assert files <= ADAPTER_FILES | TRAINER_FILES, files - ADAPTER_FILES - TRAINER_FILES
        assert not {"model.safetensors", "pytorch_model.bin"} & files
        config = json.loads((ckpt / "adapter_config.json").read_text())
        assert config["r"] == 8 and config["peft_type"] == "LORA"
        weights = load_file(ckpt / "adapter_model.safetensors")
        assert all(".lora_A." in k or ".lora_B." in k for k in weights)
    final = load_file(trained["out"] / "checkpoint-20" / "adapter_model.safetensors")
    for key, value in trained["final"].items():
        assert torch.equal(final[f"base_model.model.{key}"], value)


def test_resume_restores_lora_weights_and_continues_identically(trained, tmp_path):
    ckpt = trained["out"] / "checkpoint-10"
    saved = load_file(ckpt / "adapter_model.safetensors")
    lora_model, pairs = build()
    loaded = {}

    class Recording(GraphLoraTrainer):
        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            loaded.update(lora_snapshot(unwrap_graphlora(self.model)))

    trainer = Recording(model=lora_model, args=arguments(trained["out"]), train_dataset=PairDataset(pairs),
                        eval_dataset=PairDataset(pairs[:4]), data_collator=synthetic.collate)
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert loaded and set(loaded) == set(trained["initial"])
    for key, value in loaded.items():
        assert torch.equal(value, saved[f"base_model.model.{key}"]), key
    assert any(not torch.equal(loaded[k], trained["initial"][k]) for k in loaded)
    # Same data order (Trainer's RNG state), same optimizer state: the resumed run ends where the first ended.
    for key, value in lora_snapshot(lora_model).items():
        torch.testing.assert_close(value, trained["final"][key], rtol=0, atol=1e-6)
    first = [h["loss"] for h in trained["trainer"].state.log_history if "loss" in h]
    resumed = [h["loss"] for h in trainer.state.log_history if "loss" in h]  # starts with the checkpoint's history
    assert len(resumed) == 20 and resumed[:10] == first[:10]
    assert resumed[10:] == pytest.approx(first[10:], rel=1e-5)


def test_load_best_model_loads_the_best_checkpoint(trained):
    lora_model = copy.deepcopy(trained["lora_model"])
    trainer = GraphLoraTrainer(model=lora_model, args=arguments(trained["out"] / "best", eval_strategy="no"),
                               data_collator=synthetic.collate)
    trainer.state.best_model_checkpoint = str(trained["out"] / "checkpoint-10")
    trainer._load_best_model()
    saved = load_file(trained["out"] / "checkpoint-10" / "adapter_model.safetensors")
    for key, value in lora_model.lora_state_dict().items():
        assert torch.equal(value, saved[f"base_model.model.{key}"])


def test_load_adapter_weights_refuses_what_does_not_fit(trained, tmp_path):
    src = trained["out"] / "checkpoint-10"
    lora_model = copy.deepcopy(trained["lora_model"])
    # Another rank: the saved config disagrees with the model's.
    other, _ = build_rank4()
    with pytest.raises(AdapterError, match="not this model's adapter.*r"):
        other.load_adapter_weights(src)
    # A missing key and a wrong shape, with a config that belongs to the weights.
    tensors = load_file(src / "adapter_model.safetensors")
    from safetensors import safe_open

    with safe_open(str(src / "adapter_model.safetensors"), "pt") as f:
        metadata = f.metadata()
    for name in ("adapter_config.json", "graphlora_policy.yaml"):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    keys = sorted(tensors)
    broken = dict(tensors)
    del broken[keys[0]]
    broken[keys[1]] = torch.zeros(3, 3)
    save_file(broken, tmp_path / "adapter_model.safetensors", metadata=metadata)
    with pytest.raises(AdapterError) as info:
        lora_model.load_adapter_weights(tmp_path)
    message = str(info.value)
    assert "missing 1 key" in message and keys[0] in message
    assert "shape mismatch" in message and keys[1] in message
    with pytest.raises(AdapterError, match="no such file"):
        lora_model.load_adapter_weights(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="Can't find a graphlora adapter"):
        trainer = GraphLoraTrainer(model=lora_model, args=arguments(tmp_path / "o", eval_strategy="no"),
                                   data_collator=synthetic.collate)
        trainer._load_from_checkpoint(str(tmp_path / "nowhere"))


def build_rank4():
    model = zoo.build_tiny_model("llava")
    pairs = synthetic.caption_dataset(model, 2)
    return graphlora.rewrite(model, {**POLICY, "r": 4}, example_inputs=synthetic.collate(pairs), verify=False), pairs


def test_python_int_num_items_in_batch_does_not_retrace(trained):
    """A Python number for ``num_items_in_batch`` becomes a tensor input: one trace (per block class, which all
    receive it) for every value."""
    lora_model = copy.deepcopy(trained["lora_model"])
    lora_model.train()
    batch = synthetic.collate(trained["pairs"][:2])
    count = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        mean = lora_model(**batch).loss
        before = lora_model.num_traces
        losses = [lora_model(**batch, num_items_in_batch=n).loss for n in (count, 2 * count, 3 * count)]
    assert lora_model.num_traces <= before + max(1, len(lora_model.block_classes()))
    for k, loss in enumerate(losses, start=1):
        torch.testing.assert_close(loss, mean / k, rtol=1e-5, atol=1e-6)


def test_trainer_activation_checkpointing_switches_to_blocks(trained, tmp_path):
    """``activation_checkpointing=True`` reaches GraphLoraModel.activation_checkpointing_enable; same losses."""
    lora_model, pairs = copy.deepcopy(trained["lora_model"]), trained["pairs"]
    reference = copy.deepcopy(lora_model)
    runs = []
    for model, extra in ((lora_model, dict(activation_checkpointing=True)), (reference, {})):
        trainer = GraphLoraTrainer(model=model, args=arguments(tmp_path / str(len(runs)), max_steps=4,
                                                                save_strategy="no", eval_strategy="no", **extra),
                                   train_dataset=PairDataset(pairs), data_collator=synthetic.collate)
        trainer.train()
        runs.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert lora_model.trace_mode == "blocks" and lora_model.is_activation_checkpointing
    assert not reference.is_activation_checkpointing
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)


def test_mixin_composes_with_other_trainer_classes():
    class MyTrainer(GraphLoraTrainerMixin, Trainer):
        pass

    assert MyTrainer.__mro__.index(GraphLoraTrainerMixin) < MyTrainer.__mro__.index(Trainer)
    assert GraphLoraTrainer._save is GraphLoraTrainerMixin._save


# ------------------------------------------------------------------------------------------------ tools
def _load_tool(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"graphlora_tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_trainer_runs(tmp_path):
    """tools/example_trainer.py (docs/training.md): trains, saves the adapter, reloads it exactly."""
    result = _load_tool("example_trainer").main(["--output-dir", str(tmp_path), "--steps", "4", "--pairs", "4"])
    assert len(result["losses"]) >= 1 and all(torch.isfinite(torch.tensor(result["losses"])))
    assert ADAPTER_FILES <= set(os.listdir(result["adapter_dir"]))
    assert result["difference"] < 1e-5


def test_bench_train_step_smoke():
    """tools/bench_train_step.py --smoke: both models, the timing loop, and both memory subprocesses."""
    result = _load_tool("bench_train_step").main(["--smoke", "--threads", "1"])
    assert result["meta"]["first_loss"]["graphlora"] == pytest.approx(result["meta"]["first_loss"]["peft"], rel=1e-5)
    assert len(result["times"]["graphlora"]) == len(result["times"]["peft"]) == 2
    for kind in ("graphlora", "peft"):
        assert result["memory"][kind]["step_peak_mb"] > 0 and result["memory"][kind]["sites"] == 20
    assert "graphlora/PEFT" in result["table"]
