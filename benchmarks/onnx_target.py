#!/usr/bin/env python
"""The ONNX target beside the torch target and ONNX Runtime GenAI's own int4 build, in one run.

    python benchmarks/onnx_target.py --work ~/.cache/llmc/onnx-bench --threads 2 \\
        --prompt-len 128 --gen-len 64 --markdown out.md --json out.json

1. SmolLM2-135M-Instruct Q4_1 (``llmc.assets.fetch_smollm2``; ``--synthetic`` uses the
   ``smollm2-135m`` synthetic preset instead) is written once as a Hugging Face folder of its
   dequantized float32 weights (Q/K rows permuted back to rotate-half) with its tokenizer.
2. llmc compiles the GGUF with ``--quant native`` (the Q4_1/Q8_0 blocks as stored) for the torch
   target and for the onnx target at ``accuracy_level`` 0 (float32 activations) and 4 (int8
   activations), and (``--fp32``) the dequantized weights for both targets.
3. ``benchmarks/peers.py`` runs every llmc artifact and ``ort-genai`` (the onnxruntime-genai
   builder's ``-p int4 -e cpu`` build of the HF folder) in separate processes, batch 1, greedy:
   prefill tok/s of one ``--prompt-len`` prompt and decode tok/s over ``--gen-len`` tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from llmc.compiler.frontends.source import ModelSource, load_source
from llmc.compiler.weights import as_float
from llmc.driver import CompileOptions, compile_model

HF_LAYER = {"attn_norm": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
            "v": "self_attn.v_proj", "o": "self_attn.o_proj", "mlp_norm": "post_attention_layernorm",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def to_rotate_half(w: np.ndarray, heads: int) -> np.ndarray:
    """Q/K rows from adjacent-pair (GGUF/Meta) order to Hugging Face's rotate-half order."""
    out, dim = w.shape
    return w.reshape(heads, out // heads // 2, 2, dim).transpose(0, 2, 1, 3).reshape(out, dim)


def write_hf_folder(source: ModelSource, out: Path) -> Path:
    """A LlamaForCausalLM folder (float32 safetensors, config, tokenizer) of ``source``'s weights."""
    if (out / "config.json").exists():
        return out
    c = source.config
    if c.rope_scaling is not None or c.rotary_dim != c.head_dim:
        raise SystemExit("only plain full-rotary Llama configs are exported")
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {"model.embed_tokens.weight": as_float(source.weights["embed"]),
                                      "model.norm.weight": as_float(source.weights["final_norm"])}
    if not c.tie_word_embeddings:
        tensors["lm_head.weight"] = as_float(source.weights["lm_head"])
    for i in range(c.num_layers):
        for name, hf in HF_LAYER.items():
            w = as_float(source.weights[f"layers.{i}.{name}"])
            if c.rope_style == "interleaved" and name in ("q", "k"):
                w = to_rotate_half(w, c.num_heads if name == "q" else c.num_kv_heads)
            tensors[f"model.layers.{i}.{hf}.weight"] = np.ascontiguousarray(w)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c.hidden_size,
              "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
              "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
              "vocab_size": c.vocab_size, "max_position_embeddings": c.max_position, "rms_norm_eps": c.rms_norm_eps,
              "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_word_embeddings, "hidden_act": "silu",
              "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_ids[0] if c.eos_token_ids else None,
              "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    if source.tokenizer is not None:
        source.tokenizer.save(out)
        meta = source.tokenizer.meta
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": meta.bos_token, "eos_token": meta.eos_token}))
    return out


def compile_once(source: Path, out: Path, target: str, quant: str, **target_options: object) -> Path:
    if (out / "manifest.json").exists():
        return out
    return compile_model(source, out, CompileOptions(target=target, quant=quant, target_options=dict(target_options)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "llmc" / "onnx-bench")
    parser.add_argument("--synthetic", action="store_true", help="Use the synthetic smollm2-135m preset.")
    parser.add_argument("--fp32", action="store_true", help="Also compare float32 artifacts of both targets.")
    parser.add_argument("--only", default=None,
                        help="Comma list of runs to keep: torch-q4, onnx-q4, onnx-q4-acc4, torch-fp32, onnx-fp32, "
                             "ort-genai (default: all).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)

    if args.synthetic:
        from llmc.synth import synthesize

        hf = synthesize("smollm2-135m", work / "synth-hf", dtype="float32")
        model, quant, name = hf, "int4", "smollm2-135m (synthetic)"
    else:
        from llmc.assets import fetch_smollm2

        model, quant, name = fetch_smollm2(), "native", "SmolLM2-135M-Instruct Q4_1"
        hf = write_hf_folder(load_source(model), work / "smollm2-hf")

    runs = {  # name -> (source, target, quant, target options)
        "torch-q4": (model, "torch", quant, {}),
        "onnx-q4": (model, "onnx", quant, {}),
        "onnx-q4-acc4": (model, "onnx", quant, {"accuracy_level": 4}),
    }
    if args.fp32:
        runs |= {"torch-fp32": (hf, "torch", "none", {}), "onnx-fp32": (hf, "onnx", "none", {})}
    keep = set(args.only.split(",")) if args.only else {*runs, "ort-genai"}
    artifacts = [compile_once(src, work / run, target, q, **opts)
                 for run, (src, target, q, opts) in runs.items() if run in keep]
    engines = "ort-genai" if "ort-genai" in keep else ""
    cmd = [sys.executable, str(Path(__file__).with_name("peers.py")), "--name", name, "--hf", str(hf),
           "--engines", engines, "--ort-precision", "int4", "--work-dir", str(work / "peers"),
           "--scenario", "single", "--batch-sizes", "1", "--prompt-len", str(args.prompt_len),
           "--gen-len", str(args.gen_len), "--repeat", str(args.repeat), "--threads", str(args.threads)]
    for art in artifacts:
        cmd += ["--llmc", str(art)]
    if args.json:
        cmd += ["--json", str(args.json)]
    if args.markdown:
        cmd += ["--markdown", str(args.markdown)]
    return subprocess.run(cmd, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
