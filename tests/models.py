"""Builders of small seeded models for tests (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

# ../shared beside the repo; LLMC_SHARED_DIR points elsewhere (e.g. a copy carried to a GPU host)
SHARED = Path(os.environ.get("LLMC_SHARED_DIR") or Path(__file__).resolve().parents[1].parent / "shared")


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


# A model TVM's CUDA attention kernels accept (head_dim 64; stories260k's head_dim 8 is refused):
# tests/targets/test_cuda.py and benchmarks/gpu/prepare.sh write it with write_random_hf_model.
CUDA_TINY: dict[str, Any] = {
    "seed": 3, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 64, "vocab_size": 512, "max_position_embeddings": 256,
}


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


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_level_tokenizer(vocab_size: int, printable_only: bool = False) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` without merges (one token per byte) plus the
    special tokens ``<s>`` (0, added as BOS), ``<|im_start|>`` (1) and ``<|im_end|>`` (2).

    ``printable_only`` keeps only the bytes of printable ASCII and newline (99 tokens in all),
    so that every id a random model samples decodes to readable text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if printable_only:
        alphabet = [_byte_level_char(b) for b in [10, *range(32, 127)]]
    vocab = {"<s>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "<|im_start|>", "<|im_end|>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tok


def _byte_level_char(byte: int) -> str:
    """The character GPT-2's byte-level alphabet spells ``byte`` with."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if byte in printable:
        return chr(byte)
    return chr(256 + [b for b in range(256) if b not in printable].index(byte))


def write_byte_level_tokenizer(directory: Path, vocab_size: int, chat_template: str = CHATML_TEMPLATE,
                               printable_only: bool = False) -> Path:
    """Add ``tokenizer.json`` and a ``tokenizer_config.json`` (ChatML template, EOS ``<|im_end|>``)
    to a model folder."""
    import json

    byte_level_tokenizer(vocab_size, printable_only).save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": {"content": "<|im_end|>"}, "chat_template": chat_template,
    }))
    return directory


def hf_step_logits(folder: Path, prompt: list[int], decode: list[int]) -> list[np.ndarray]:
    """transformers' float32 Llama on ``folder``: the prompt's logits, then one decode step's per token
    of ``decode`` (through its KV cache) -- the reference the target tests compare with."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        outs.append(out.logits[0].numpy())
        for token in decode:
            out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            outs.append(out.logits[0].numpy())
    return outs
