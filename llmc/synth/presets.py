"""The shapes of real models, for synthetic stand-ins with random weights.

Each preset is the model's Hugging Face ``config.json`` (exact shapes, RoPE and tying) plus what
its tokenizer looks like from outside: where the special tokens sit and how text is split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmc.compiler.errors import InputError

_LLAMA3_ROPE_SCALING = {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}

_LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _llama3_specials(vocab_size: int, first: int) -> dict[int, str]:
    """Llama 3's 256 special tokens at the top of the vocab (named as in the real tokenizer)."""
    named = {
        0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>", 6: "<|start_header_id|>",
        7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>", 10: "<|python_tag|>",
    }
    specials: dict[int, str] = {}
    reserved = 0
    for offset in range(vocab_size - first):
        if offset in named:
            specials[first + offset] = named[offset]
        else:
            specials[first + offset] = f"<|reserved_special_token_{reserved}|>"
            reserved += 1
    return specials


_SMOLLM_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>", "<filename>",
    "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>",
    "<jupyter_code>", "<jupyter_output>", "<jupyter_script>", "<empty_output>",
]


@dataclass(frozen=True)
class Preset:
    """A real model's shapes and tokenizer layout."""

    name: str
    hf_config: dict[str, Any]
    specials: dict[int, str]
    pre_tokenizer: str  # llama.cpp's tokenizer.ggml.pre name: "llama-bpe" or "smollm"
    add_bos: bool
    chat_template: str
    init_std: float = 0.02
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config["vocab_size"])

    @property
    def bos_token_id(self) -> int:
        return int(self.hf_config["bos_token_id"])

    @property
    def eos_token_id(self) -> int:
        eos = self.hf_config["eos_token_id"]
        return int(eos[0] if isinstance(eos, list) else eos)


def _llama_config(**values: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "mlp_bias": False,
        "model_type": "llama",
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "use_cache": True,
    }
    config.update(values)
    return dict(sorted(config.items()))


PRESETS: dict[str, Preset] = {
    "llama-3.2-1b": Preset(
        name="llama-3.2-1b",
        hf_config=_llama_config(
            bos_token_id=128000, eos_token_id=128001, head_dim=64, hidden_size=2048, intermediate_size=8192,
            max_position_embeddings=131072, num_attention_heads=32, num_hidden_layers=16, num_key_value_heads=8,
            rope_scaling=dict(_LLAMA3_ROPE_SCALING), rope_theta=500000.0, tie_word_embeddings=True,
            torch_dtype="bfloat16", vocab_size=128256,
        ),
        specials=_llama3_specials(128256, 128000),
        pre_tokenizer="llama-bpe",
        add_bos=True,
        chat_template=_LLAMA3_CHAT_TEMPLATE,
        notes="meta-llama/Llama-3.2-1B: 1.24B params, GQA 32/8, tied embeddings, llama3 RoPE scaling",
    ),
    "llama-3.2-3b": Preset(
        name="llama-3.2-3b",
        hf_config=_llama_config(
            bos_token_id=128000, eos_token_id=128001, head_dim=128, hidden_size=3072, intermediate_size=8192,
            max_position_embeddings=131072, num_attention_heads=24, num_hidden_layers=28, num_key_value_heads=8,
            rope_scaling=dict(_LLAMA3_ROPE_SCALING), rope_theta=500000.0, tie_word_embeddings=True,
            torch_dtype="bfloat16", vocab_size=128256,
        ),
        specials=_llama3_specials(128256, 128000),
        pre_tokenizer="llama-bpe",
        add_bos=True,
        chat_template=_LLAMA3_CHAT_TEMPLATE,
        notes="meta-llama/Llama-3.2-3B: 3.21B params, GQA 24/8, tied embeddings, llama3 RoPE scaling",
    ),
    "smollm2-135m": Preset(
        name="smollm2-135m",
        hf_config=_llama_config(
            bos_token_id=1, eos_token_id=2, head_dim=64, hidden_size=576, intermediate_size=1536,
            max_position_embeddings=8192, num_attention_heads=9, num_hidden_layers=30, num_key_value_heads=3,
            rope_scaling=None, rope_theta=100000.0, tie_word_embeddings=True, torch_dtype="bfloat16",
            vocab_size=49152,
        ),
        specials=dict(enumerate(_SMOLLM_SPECIALS)),
        pre_tokenizer="smollm",
        add_bos=False,
        chat_template=_CHATML_TEMPLATE,
        notes="HuggingFaceTB/SmolLM2-135M-Instruct: 135M params, GQA 9/3, tied embeddings",
    ),
    "tiny": Preset(
        name="tiny",
        hf_config=_llama_config(
            bos_token_id=508, eos_token_id=509, head_dim=16, hidden_size=64, intermediate_size=160,
            max_position_embeddings=256, num_attention_heads=4, num_hidden_layers=2, num_key_value_heads=2,
            rope_scaling={**_LLAMA3_ROPE_SCALING, "factor": 8.0, "original_max_position_embeddings": 64},
            rope_theta=10000.0, tie_word_embeddings=True, torch_dtype="float32", vocab_size=512,
        ),
        specials=_llama3_specials(512, 508),
        pre_tokenizer="llama-bpe",
        add_bos=True,
        chat_template=_LLAMA3_CHAT_TEMPLATE,
        init_std=0.1,
        notes="a Llama 3.2 in miniature (tied, GQA, llama3 RoPE scaling that matters at short context) for tests",
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a clear error lists the others."""
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(f"unknown synth preset {name!r}; choose from {', '.join(PRESETS)}") from None
