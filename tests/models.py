"""Builders of small seeded models for tests (no downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def tiny_llama_config(**overrides: Any) -> dict[str, Any]:
    """A small LlamaForCausalLM config (GQA, untied head) as config.json keys."""
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 128,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    config.update(overrides)
    return config


def write_random_hf_model(directory: Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a randomly initialised transformers LlamaForCausalLM (float32) into ``directory``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_llama_config(**overrides)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))
    with torch.no_grad():  # larger-than-default weights make logits differ visibly between tokens
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.08)
            else:
                p.uniform_(0.8, 1.2)
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    return directory
