#!/usr/bin/env python3
"""Writes a random-weight Llama base/chat pair of a real model's shape for bench/gpu/run.sh.

    python3 bench/gpu/make_models.py OUT_DIR --shape llama8b --layers 17 [--device cuda] [--dtype bf16]

Shapes (hidden, intermediate, heads / kv heads, vocab):
  llama8b   Llama-3.1-8B:  4096, 14336, 32 / 8, 128256 (head_dim 128)
  llama1b   Llama-3.2-1B:  2048,  8192, 32 / 8, 128256 (head_dim 64)
  smoke     a CPU-sized check of the script: 128, 256, 4 / 2, 512

Only the first --layers decoder blocks are written (config.json says so): the cache stage and the
transformers script both stop after block `layer`, so the later blocks would only cost disk and
load time. Rope: Llama 3.1's llama3 scaling. Embeddings tied (the cache never reaches lm_head).
Weights: N(0, 0.02) matrices and unit norms, drawn with torch.manual_seed(0) on --device, saved in
--dtype as OUT/base/model.safetensors; chat = base + N(0, 0.002) on every matrix (seed 1). The
tokenizer is the tiny pipeline's (pipelines/tiny/llama/base, 512 ids), so ids stay below any vocab.
Needs torch and safetensors only (no transformers).
"""

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "pipelines" / "tiny" / "llama" / "base"
SHAPES = {
    "llama8b": dict(hidden=4096, inter=14336, heads=32, kv=8, vocab=128256),
    "llama1b": dict(hidden=2048, inter=8192, heads=32, kv=8, vocab=128256),
    "smoke": dict(hidden=128, inter=256, heads=4, kv=2, vocab=512),
}


def config(shape, layers):
    s = SHAPES[shape]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": s["vocab"],
        "hidden_size": s["hidden"],
        "intermediate_size": s["inter"],
        "num_hidden_layers": layers,
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv"],
        "head_dim": s["hidden"] // s["heads"],
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 0,
        "eos_token_id": 4,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "torch_dtype": "bfloat16",
    }


def shapes(cfg):
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out |= {
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--chat-noise", type=float, default=0.002)
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    t0 = time.perf_counter()
    cfg = config(a.shape, a.layers)
    cfg["torch_dtype"] = "bfloat16" if a.dtype == "bf16" else "float32"
    torch.manual_seed(0)
    base = {}
    for name, shape in shapes(cfg).items():
        if len(shape) == 1:
            base[name] = torch.ones(shape, device=a.device, dtype=dtype)
        else:
            base[name] = (torch.randn(shape, device=a.device) * 0.02).to(dtype)
    gen = torch.Generator(device=a.device).manual_seed(1)
    chat = {
        n: (t.float() + torch.randn(t.shape, device=a.device, generator=gen) * a.chat_noise).to(dtype)
        if t.dim() > 1
        else t.clone()
        for n, t in base.items()
    }
    params = sum(t.numel() for t in base.values())
    for side, weights in (("base", base), ("chat", chat)):
        d = a.out / side
        d.mkdir(parents=True, exist_ok=True)
        save_file({n: t.contiguous().cpu() for n, t in weights.items()}, d / "model.safetensors", {"format": "pt"})
        (d / "config.json").write_text(json.dumps(cfg, indent=1))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(TINY / f, d / f)
    print(
        json.dumps(
            {
                "shape": a.shape,
                "layers": a.layers,
                "parameters": params,
                "dtype": a.dtype,
                "seconds": round(time.perf_counter() - t0, 1),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
