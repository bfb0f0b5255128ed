#!/usr/bin/env python3
"""Writes a random-init Llama-3-shaped base/chat pair of ~100M parameters for bench/cache.sh.

    /work/.venv-parity/bin/python scripts/make_bench_llama.py OUT_DIR [--chat-noise 0.002]

Writes OUT_DIR/base and OUT_DIR/chat, each with config.json, model.safetensors (f32,
save_pretrained) and the tiny tokenizer files copied from pipelines/tiny/llama/base/
(tokenizer.json, tokenizer_config.json; 512 tokens, BOS added by its post-processor).

Shape: hidden 768, 12 layers, 12 heads / 4 kv heads (head_dim 64), intermediate 2048, SiLU MLP,
rope_type llama3 with Llama 3.1's values (theta 500000, factor 8, low/high 1/4, original context
8192), tied embeddings, vocab 32768 (the tokenizer uses ids 0..511 only; the larger table brings the
count to ~100M as in a real vocabulary). Weights: transformers' own init (N(0, 0.02) matrices,
norms at 1) under torch.manual_seed(0); chat = base + N(0, chat_noise) on every parameter
(generator seed 1). Not in git: bench/cache.sh regenerates it in its scratch folder.
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "pipelines" / "tiny" / "llama" / "base"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--chat-noise", type=float, default=0.002)
    ap.add_argument("--vocab", type=int, default=32768)
    args = ap.parse_args()

    tiny_vocab = json.loads((TINY / "config.json").read_text())["vocab_size"]
    assert args.vocab >= tiny_vocab, f"vocab {args.vocab} < the tiny tokenizer's {tiny_vocab}"
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
        hidden_act="silu",
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=0,
        eos_token_id=4,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    n_params = sum(p.numel() for p in model.parameters())  # tied: the embedding counts once
    print(f"parameters: {n_params:,} (transformers {transformers.__version__}, torch {torch.__version__})")

    def save(name):
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        (out / "generation_config.json").unlink(missing_ok=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(TINY / f, out / f)
        print(f"wrote {out}")

    save("base")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=gen) * args.chat_noise)
    save("chat")


if __name__ == "__main__":
    main()
