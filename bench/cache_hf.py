#!/usr/bin/env python3
"""The transformers competitor of the `cache` stage (bench/cache.sh): the same work, in PyTorch.

    python bench/cache_hf.py --base DIR --chat DIR --data FILE.jsonl --out DIR --layer L \
        [--batch-size 8] [--context-len 1024] [--threads 2] [--device cpu] [--dtype f32] [--store-dtype f32]

What it does, step for step as stages/src/cache/stage.rs:
  - tokenizer: `tokenizers.Tokenizer.from_file(chat/tokenizer.json)` (the stage's default
    `tokenizer = "chat"`), padding off, truncation right to --context-len, special tokens added by
    the tokenizer's post-processor (BOS); `encode_batch` per window.
  - windows of 8 × batch_size documents in dataset order; inside a window documents are sorted
    longest first (stable) and cut into micro-batches of batch_size, each right-padded (id 0) to its
    longest document, with an attention mask.
  - base model, then chat model, per micro-batch: `LlamaForCausalLM.from_pretrained(dtype=f32)`, its
    `model.model` with `layers` truncated to the first L + 1 blocks and the final norm replaced by
    Identity, so `last_hidden_state` is the output of block L (= transformers'
    `hidden_states[L + 1]`) and nothing after block L is computed. attn_implementation "sdpa" (the
    default on the CPU), use_cache=False, torch.inference_mode, torch threads = --threads.
  - --device / --dtype: where and in which dtype the models run (cpu / f32 by default; the GPU
    benchmark, bench/gpu/run.sh, runs cuda / bf16 with --store-dtype bf16, as the stage's
    `dtype = "bf16"`, `store_dtype = "bf16"`).
  - non-padding rows gathered with the mask, put back in dataset order per window, stacked
    (n, 2, d) in --store-dtype and appended with a raw write to OUT/activations.<dtype> (tokens
    to OUT/tokens.u32);
    per-dimension running sums (f64) over the rows, as the stage's statistics.
  - OUT/summary.json: tokens, docs, d, seconds (model load + tokenize + forward + write, i.e. from
    before loading the models to the end, as the stage's own `tokens_per_s`), forward seconds.
"""

import argparse
import json
import time

T_START = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

READ_AHEAD = 8  # documents per window = READ_AHEAD × batch_size, as the stage


DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def load(path, layer, device, dtype):
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device)
    inner = model.model
    inner.layers = inner.layers[: layer + 1]
    inner.config.num_hidden_layers = layer + 1
    inner.norm = torch.nn.Identity()
    return inner.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--chat", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--context-len", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--column", default="text")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    ap.add_argument("--store-dtype", choices=sorted(DTYPES), default="f32")
    args = ap.parse_args()
    dev, dtype, store = torch.device(args.device), DTYPES[args.dtype], DTYPES[args.store_dtype]
    # bf16 rows go to disk as their 16-bit patterns (numpy has no bf16).
    store_np = np.float32 if store == torch.float32 else np.int16

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    base = load(args.base, args.layer, dev, dtype)
    chat = load(args.chat, args.layer, dev, dtype)
    d = base.config.hidden_size
    tok = Tokenizer.from_file(f"{args.chat}/tokenizer.json")
    tok.no_padding()
    tok.enable_truncation(args.context_len, direction="right")
    t_loaded = time.perf_counter()

    docs = [json.loads(line)[args.column] for line in open(args.data) if line.strip()]
    window = READ_AHEAD * args.batch_size
    acts_f = open(f"{args.out}/activations.{args.store_dtype}", "wb")
    toks_f = open(f"{args.out}/tokens.u32", "wb")
    total = 0
    s1 = np.zeros(2 * d)
    s2 = np.zeros(2 * d)
    t_forward = 0.0
    with torch.inference_mode():
        for w0 in range(0, len(docs), window):
            enc = [e.ids for e in tok.encode_batch(docs[w0 : w0 + window])]
            lengths = [len(e) for e in enc]
            offsets = np.cumsum([0] + lengths)
            n = int(offsets[-1])
            out = np.empty((n, 2, d), dtype=store_np)
            sums = torch.zeros((2, 2 * d), dtype=torch.float64, device=dev)
            order = sorted(range(len(enc)), key=lambda j: -lengths[j])  # stable, longest first
            for g0 in range(0, len(order), args.batch_size):
                group = order[g0 : g0 + args.batch_size]
                t = lengths[group[0]]
                ids = torch.zeros((len(group), t), dtype=torch.long)
                mask = torch.zeros((len(group), t), dtype=torch.long)
                for r, j in enumerate(group):
                    ids[r, : lengths[j]] = torch.tensor(enc[j])
                    mask[r, : lengths[j]] = 1
                ids, mask = ids.to(dev), mask.to(dev)
                keep = mask.bool()
                tf = time.perf_counter()
                for m, model in enumerate((base, chat)):
                    h = model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                    kept = h[keep].to(store)  # (sum of lengths, d), row-major: document by document
                    wide = kept.double()
                    sums[0, m * d : (m + 1) * d] += wide.sum(0)
                    sums[1, m * d : (m + 1) * d] += (wide * wide).sum(0)
                    rows = (kept if store == torch.float32 else kept.view(torch.int16)).cpu().numpy()
                    at = 0
                    for j in group:
                        out[offsets[j] : offsets[j + 1], m] = rows[at : at + lengths[j]]
                        at += lengths[j]
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t_forward += time.perf_counter() - tf
            s1 += sums[0].cpu().numpy()
            s2 += sums[1].cpu().numpy()
            acts_f.write(out.tobytes())
            toks_f.write(np.concatenate([np.asarray(e, dtype=np.uint32) for e in enc]).tobytes())
            total += n
    acts_f.close()
    toks_f.close()
    secs = time.perf_counter() - t0
    summary = {
        "tokens": total,
        "docs": len(docs),
        "d_model": d,
        "seconds": secs,
        "load_seconds": t_loaded - t0,
        "forward_seconds": t_forward,
        "since_process_start_seconds": time.perf_counter() - T_START,
        "tokens_per_s": total / secs,
        "mean_norm": float(np.linalg.norm(s1 / total)),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "device": str(dev),
        "dtype": args.dtype,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if dev.type == "cuda" else 0,
    }
    json.dump(summary, open(f"{args.out}/summary.json", "w"), indent=1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
