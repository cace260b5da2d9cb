"""LoRA fine-tuning through peft, with target modules chosen per architecture."""

from __future__ import annotations

import torch

#: the linear layers LoRA adapts, per transformers model_type
TARGET_MODULES = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def lora_wrap(model, rank: int, seed: int, alpha: float | None = None):
    """Wrap a causal LM in rank-``rank`` LoRA adapters (only they train)."""
    from peft import LoraConfig, get_peft_model

    mtype = model.config.model_type
    if mtype not in TARGET_MODULES:
        raise ValueError(f"LoRA: no target modules known for model_type {mtype!r}; known: {sorted(TARGET_MODULES)}")
    torch.manual_seed(seed)
    conf = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=0.0,
                      target_modules=TARGET_MODULES[mtype], fan_in_fan_out=(mtype == "gpt2"),
                      bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, conf)
