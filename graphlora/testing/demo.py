"""The main job: rewrite a tiny VLM with the language-only strategy, train a few steps, generate.

Run with ``make demo`` or ``python -m graphlora demo``.
"""

from __future__ import annotations

import time

import torch

from graphlora.model_spec import load_model_spec
from graphlora.report import component_table
from graphlora.rewriter import rewrite
from graphlora.testing.synthetic import caption_batches, caption_dataset


def run_demo(model_spec: str = "llava", strategy: str = "language-only", steps: int = 12,
             lr: float = 1e-2, new_tokens: int = 6, seed: int = 0) -> dict:
    """Returns the losses and generated tokens (also printed)."""
    from graphlora.policy import load_preset

    torch.manual_seed(seed)
    model, example_inputs = load_model_spec(model_spec)
    policy = load_preset(strategy)
    print(f"graphlora demo: model {model_spec} ({type(model).__name__}), strategy {strategy}")
    t0 = time.perf_counter()
    lora_model = rewrite(model, policy, example_inputs)
    print(f"rewritten in {time.perf_counter() - t0:.1f} s ({lora_model.num_traces} trace)\n")
    print(component_table(lora_model))
    if lora_model.skipped_sites:
        print("\nnot adapted:")
        for s in lora_model.skipped_sites:
            print(f"  {s.name}: {s.reason}")

    print(f"\ntraining {steps} steps (AdamW, lr {lr}) on synthetic image + caption batches")
    lora_model.train()
    optimizer = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step, batch in enumerate(caption_batches(model, steps, batch_size=2, seed=seed)):
        loss = lora_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        print(f"  step {step + 1:3d}  loss {loss.item():.4f}")

    lora_model.eval()
    prompt = {k: v for k, v in caption_dataset(model, 1, seed)[0].items() if k != "labels"}
    with torch.no_grad():
        generated = lora_model.generate(**prompt, max_new_tokens=new_tokens, do_sample=False)
    new = generated[0, prompt["input_ids"].shape[1]:].tolist()
    print(f"\ngenerated {len(new)} tokens: {new}")
    print(f"traces made: {lora_model.num_traces}")
    return {"losses": losses, "generated": new, "model": lora_model}
