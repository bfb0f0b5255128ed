"""Compares two runs of pipelines/tiny.toml (say CPU and GPU) stage by stage, for
scripts/device-check.sh. Reads the results folders ($DATASTORE/results/tiny of each run) with
torch only (the GPU machine's Python has it; safetensors is parsed by hand).

    python scripts/compare_runs.py A/results/tiny B/results/tiny

Checks, with the tolerances the two devices' arithmetic allows (f32 on both):
- caches: identical tokens and document offsets; activations within 1e-3 of the largest |x|
  (per model), since the two devices sum in other orders;
- train: the crosscoders need not be close after hundreds of steps of chaotic optimisation from
  slightly different activations, so the outcome is compared instead: final validation FVE within
  0.05 and L0 within 10 % of each other;
- scale: both find chat-specific latents (the tiny chat model's planted direction), and their
  chat-only counts differ by at most 2;
- plot: both wrote the same figure files.
Prints one line per check and exits 1 if any fails.
"""

import json
import os
import struct
import sys

import torch

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "U32": torch.int32,
          "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8}


def load_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        buf = bytearray(data[base + start:base + end])
        t = torch.frombuffer(buf, dtype=DTYPES[info["dtype"]]) if buf else torch.empty(0, dtype=DTYPES[info["dtype"]])
        out[name] = t.reshape(info["shape"])
    return out


failures = []


def check(ok, what):
    print(f"{'ok  ' if ok else 'FAIL'} {what}")
    if not ok:
        failures.append(what)


def compare_cache(a, b, stage):
    meta = json.load(open(os.path.join(a, "cache.json")))
    shards = sorted(os.listdir(os.path.join(a, "shards")))
    check(shards == sorted(os.listdir(os.path.join(b, "shards"))), f"{stage}: same shard files ({len(shards)})")
    worst = [0.0, 0.0]
    for s in shards:
        x = load_safetensors(os.path.join(a, "shards", s))
        y = load_safetensors(os.path.join(b, "shards", s))
        check(torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["doc_offsets"], y["doc_offsets"]),
              f"{stage}/{s}: identical tokens and documents")
        xa, ya = x["activations"].float(), y["activations"].float()
        for m in range(2):
            scale = xa[:, m].abs().max().item() or 1.0
            worst[m] = max(worst[m], (xa[:, m] - ya[:, m]).abs().max().item() / scale)
    check(max(worst) <= 1e-3, f"{stage}: activations agree to {worst[0]:.2e} (base), {worst[1]:.2e} (chat) of max |x| (≤ 1e-3); d = {meta.get('d_model')}")


def last_val(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return [r for r in rows if r.get("split") == "val"][-1]


def compare_train(a, b, stage):
    va, vb = last_val(os.path.join(a, "metrics.jsonl")), last_val(os.path.join(b, "metrics.jsonl"))
    fa, fb = va["frac_variance_explained"], vb["frac_variance_explained"]
    check(abs(fa - fb) <= 0.05, f"{stage}: final validation FVE {fa:.4f} vs {fb:.4f} (within 0.05)")
    la, lb = va["l0"], vb["l0"]
    check(abs(la - lb) <= 0.1 * max(la, lb), f"{stage}: final validation L0 {la:.3f} vs {lb:.3f} (within 10 %)")
    wa = load_safetensors(os.path.join(a, "crosscoder.safetensors"))["decoder.weight"].float()
    wb = load_safetensors(os.path.join(b, "crosscoder.safetensors"))["decoder.weight"].float()
    rel = ((wa - wb).norm() / wa.norm()).item()
    print(f"info {stage}: decoder weights differ by {rel:.2e} (relative Frobenius norm; not checked)")


def latents(path):
    rows = open(path).read().splitlines()
    head = rows[0].split(",")
    return [dict(zip(head, r.split(","))) for r in rows[1:]]


def compare_scale(a, b, stage):
    ra, rb = latents(os.path.join(a, "latents.csv")), latents(os.path.join(b, "latents.csv"))
    sa = sum(r["chat_specific"] == "true" for r in ra)
    sb = sum(r["chat_specific"] == "true" for r in rb)
    check(sa >= 1 and sb >= 1, f"{stage}: chat-specific latents found by both ({sa} vs {sb})")
    ca = sum(r["class"] == "Chat only" for r in ra)
    cb = sum(r["class"] == "Chat only" for r in rb)
    check(abs(ca - cb) <= 2, f"{stage}: chat-only latents {ca} vs {cb} (within 2)")


def main():
    a, b = sys.argv[1], sys.argv[2]
    for stage in sorted(os.listdir(a)):
        da, db = os.path.join(a, stage), os.path.join(b, stage)
        if not os.path.isdir(db):
            check(False, f"{stage}: missing in {b}")
        elif os.path.isfile(os.path.join(da, "cache.json")):
            compare_cache(da, db, stage)
        elif os.path.isfile(os.path.join(da, "crosscoder.safetensors")) and os.path.isfile(os.path.join(da, "metrics.jsonl")):
            compare_train(da, db, stage)
        elif os.path.isfile(os.path.join(da, "betas.safetensors")):
            compare_scale(da, db, stage)
        elif os.path.isfile(os.path.join(da, "figures.json")):
            check(sorted(os.listdir(da)) == sorted(os.listdir(db)), f"{stage}: same figure files")
    print(f"{len(failures)} check(s) failed" if failures else "all checks passed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
