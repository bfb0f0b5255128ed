#!/usr/bin/env python3
"""Writes the tiny random-init models and transformers reference activations that the Rust parity
tests (stages/tests/parity.rs) compare against. Developer-only: CI never runs Python.

Set-up (CPU is enough; any recent torch / transformers):

    python3 -m venv .venv && .venv/bin/pip install torch transformers safetensors
    .venv/bin/python scripts/make_tiny_models.py

Writes, under stages/tests/fixtures/:

    tiny-llama/          Llama 3.2-shaped: GQA (4 heads / 2 kv heads, head_dim 16), 4 layers,
                         rope_scaling llama3 (small original context so all three frequency bands
                         occur), tied embeddings
    tiny-llama-plain/    Llama without rope_scaling, untied lm_head, 2 layers, 1 kv head
    tiny-gemma2/         Gemma 2-shaped: 4 layers, sliding_window 8 on blocks 0 and 2, attention
                         and final logit soft-capping set low enough to bite, query_pre_attn_scalar
                         != head_dim

Each folder holds config.json + model.safetensors (save_pretrained) and reference.safetensors:

    input_ids       (2, 16) int64, right padded (rows of 16 and 11 real tokens; padding id 0)
    attention_mask  (2, 16) int64
    layer_{i}_out   (2, 16, d) float32: the output of decoder block i (a forward hook, as the
                    paper's nnsight `layers[i].output[0]`); equal to hidden_states[i + 1] except for
                    the last block, whose hidden_states entry is after the final norm
    hidden_states_{i} (2, 16, d) float32: transformers' output_hidden_states tuple, i = 0..n
    logits          (2, 16, vocab) float32

Everything is seeded; rerunning rewrites byte-identical weights for a given torch version.
Weights are drawn wider than transformers' init (std 0.1 for matrices, random norm weights) so
that soft-capping, norms and RoPE scaling all matter numerically.
"""

from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

FIXTURES = Path(__file__).resolve().parent.parent / "stages" / "tests" / "fixtures"
SEQ_LEN = 16
REAL_LENGTHS = (16, 11)


def randomize(model, norm_offset):
    """Redraws every parameter: N(0, 0.1) matrices, norm weights norm_offset + N(0, 0.1)."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(noise + norm_offset if "norm" in name else noise)


def batch(vocab_size):
    gen = torch.Generator().manual_seed(99)
    ids = torch.randint(1, vocab_size, (len(REAL_LENGTHS), SEQ_LEN), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(REAL_LENGTHS):
        mask[row, :n] = 1
    ids = ids * mask  # padding id 0
    return ids, mask


def write(name, model):
    out = FIXTURES / name
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)

    ids, mask = batch(model.config.vocab_size)
    layer_outs = {}

    def hook(i):
        def fn(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            layer_outs[i] = hidden.detach().clone()

        return fn

    handles = [
        layer.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        res = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    for h in handles:
        h.remove()

    n = model.config.num_hidden_layers
    hs = res.hidden_states
    assert len(hs) == n + 1
    for i in range(n - 1):
        assert torch.equal(layer_outs[i], hs[i + 1]), f"{name}: hook {i} != hidden_states[{i + 1}]"
    tensors = {"input_ids": ids, "attention_mask": mask, "logits": res.logits.float()}
    tensors.update({f"layer_{i}_out": layer_outs[i].float() for i in range(n)})
    tensors.update({f"hidden_states_{i}": h.float() for i, h in enumerate(hs)})
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        out / "reference.safetensors",
        metadata={"torch": torch.__version__, "transformers": transformers.__version__},
    )
    print(f"wrote {out} (transformers {transformers.__version__}, torch {torch.__version__})")


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(cfg)
    randomize(model, norm_offset=1.0)
    write("tiny-llama", model)


def tiny_llama_plain():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(cfg)
    randomize(model, norm_offset=1.0)
    write("tiny-llama-plain", model)


def tiny_gemma2():
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=8,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        hidden_activation="gelu_pytorch_tanh",
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        attn_implementation="eager",
    )
    model = transformers.Gemma2ForCausalLM(cfg)
    randomize(model, norm_offset=0.0)  # Gemma scales by (1 + w)
    write("tiny-gemma2", model)


if __name__ == "__main__":
    tiny_llama()
    tiny_llama_plain()
    tiny_gemma2()
