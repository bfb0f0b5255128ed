"""Latent Scaling and `collect` in plain PyTorch (CPU), the computations of the `scale` and
`collect` stages, for bench/analysis.sh. PyTorch rather than NumPy: the same code, faster matmuls
(MKL / oneDNN, multi-threaded) and a native `torch.nonzero`, so the faster honest choice.

Reads what `analysis_bench gen DIR ...` wrote: DIR/{web,chat}/shards/*.safetensors (`activations`
(n, 2, d) f32, `doc_offsets`) and DIR/crosscoder.safetensors (dictionary_learning names plus a
BatchTopK `threshold`). Codes as the stages compute them (DOMAIN.md §2b, inference path):
post = ReLU(x.reshape(B, 2d) @ W_enc.reshape(2d, F) + b_enc), c_j = Σ_l ‖W_dec[l, j]‖,
f = post · [post · c > θ].

scale (SA:tools/latent_scaler/closed_form.py's method, DOMAIN.md §5b): per batch of 4,096 tokens
of both caches, x̂ = f @ W_dec[l] + b_dec[l], then per target y (8: reconstruction, error,
activation, activation_no_bias × base, chat) the (F, d) float32 accumulator A += f.T @ y, plus
C = Σ f², count_active; at the end B_j = d_j · A_j (d_j = chat decoder row), D_j = ‖d_j‖²,
β = B / (C D). The error target y_ij = x − x̂ + f_ij d_j^l depends on j; its A is accumulated as
f.T @ (x − x̂) and C_j d_j^l is added at the end (the same numbers; the original materialises
an (F, n, d) tensor for it, which does not fit for all latents).

collect (SA:scripts/collect_dictionary_activations.py, DOMAIN.md §6a/6b): per cache, per batch
of 4,096 tokens, A = f · c; per-latent max and count (per cache) and sum; the nonzero entries by
torch.nonzero, as values and int64 (seq, pos, latent) ids, the sequence from the shards'
`doc_offsets` (searchsorted), all concatenated at the end.

Prints one JSON line: tokens, seconds (reading the shards with safetensors.torch.load_file
included, as the stage's time includes reading its mmapped caches), tokens/s, peak RSS; with
--check, compares with DIR/pipe_betas.safetensors or DIR/pipe_collect.safetensors.

    python bench/analysis_numpy.py --data DIR --what scale --threads 2 [--check]
"""

import argparse
import glob
import json
import os
import resource
import time

import torch
from safetensors.torch import load_file

BATCH = 4096
DTYPE = torch.float32  # --f64: float64 throughout (a reference for the agreement check, not timed)
TARGETS = ["reconstruction", "error", "activation", "activation_no_bias"]


def shards(d):
    return sorted(glob.glob(os.path.join(d, "shards", "*.safetensors")))


def load_cache(d):
    """(n, 2, d) f32 activations and the global doc offsets of one cache."""
    acts, offs, base = [], [torch.zeros(1, dtype=torch.int64)], 0
    for f in shards(d):
        t = load_file(f)
        acts.append(t["activations"].to(DTYPE))
        offs.append(t["doc_offsets"][1:] + base)
        base += t["activations"].shape[0]
    return torch.cat(acts), torch.cat(offs)


class CC:
    def __init__(self, path, dtype=torch.float32):
        t = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(path).items()}
        self.w_enc, self.b_enc = t["encoder.weight"], t["encoder.bias"]
        self.w_dec, self.b_dec = t["decoder.weight"], t["decoder.bias"]
        self.threshold = float(t["threshold"])
        _, self.d, self.f = self.w_enc.shape
        self.enc_flat = self.w_enc.reshape(2 * self.d, self.f).contiguous()
        self.dec_flat = self.w_dec.transpose(0, 1).reshape(self.f, 2 * self.d).contiguous()
        self.c = self.w_dec.norm(dim=2).sum(dim=0)  # (F,)

    def encode(self, x):  # (B, 2, d) -> unscaled codes f (B, F), threshold path
        post = torch.relu(x.reshape(x.shape[0], -1) @ self.enc_flat + self.b_enc)
        return post * (post * self.c > self.threshold)

    def decode(self, f):
        return (f @ self.dec_flat).reshape(f.shape[0], 2, self.d) + self.b_dec


def scale(cc, dirs):
    acc = {f"{m}_{t}": torch.zeros(cc.f, cc.d, dtype=DTYPE) for m in ("base", "chat") for t in TARGETS}
    c_sum = torch.zeros(cc.f, dtype=DTYPE)
    count = torch.zeros(cc.f, dtype=torch.int64)
    tokens = 0
    for d in dirs:
        x_all, _ = load_cache(d)
        for s in range(0, x_all.shape[0], BATCH):
            x = x_all[s : s + BATCH]
            f = cc.encode(x)
            x_hat = cc.decode(f)
            ft = f.T
            for l, m in enumerate(("base", "chat")):
                xl, xhl = x[:, l], x_hat[:, l]
                acc[f"{m}_reconstruction"] += ft @ xhl
                acc[f"{m}_error"] += ft @ (xl - xhl)
                acc[f"{m}_activation"] += ft @ xl
                acc[f"{m}_activation_no_bias"] += ft @ (xl - cc.b_dec[l])
            c_sum += (f * f).sum(0)
            count += (f != 0).sum(0)
            tokens += x.shape[0]
    dchat = cc.w_dec[1]  # (F, d)
    norm_d = (dchat * dchat).sum(1)
    betas = {}
    for l, m in enumerate(("base", "chat")):
        acc[f"{m}_error"] += c_sum[:, None] * cc.w_dec[l]
        for t in TARGETS:
            b = (acc[f"{m}_{t}"] * dchat).sum(1)
            betas[f"{m}_{t}"] = b / (c_sum * norm_d)
    return tokens, betas, count


def collect(cc, dirs):
    stats, vals, ids = [], [], []
    sum_ = torch.zeros(cc.f, dtype=torch.float64)
    tokens, seq_base = 0, 0
    for d in dirs:
        x_all, offs = load_cache(d)
        mx = torch.zeros(cc.f, dtype=DTYPE)
        count = torch.zeros(cc.f, dtype=torch.int64)
        for s in range(0, x_all.shape[0], BATCH):
            x = x_all[s : s + BATCH]
            a = cc.encode(x) * cc.c
            mx = torch.maximum(mx, a.amax(0))
            count += (a > 0).sum(0)
            sum_ += a.sum(0, dtype=torch.float64)
            nz = torch.nonzero(a > 0)  # (n, 2): row, latent; row-major = by token then latent
            rows = nz[:, 0] + s
            seq = torch.searchsorted(offs, rows, right=True) - 1
            vals.append(a[nz[:, 0], nz[:, 1]])
            ids.append(torch.stack([seq + seq_base, rows - offs[seq], nz[:, 1]], 1))
        stats.append((mx, count))
        tokens += x_all.shape[0]
        seq_base += offs.shape[0] - 1
    vals, ids = torch.cat(vals), torch.cat(ids)
    return tokens, stats, sum_, vals, ids


def rel(a, b):
    a, b = a.double(), b.double()
    ok = torch.isfinite(a) & torch.isfinite(b)
    return float(((a - b).abs() / b.abs().clamp_min(1e-12))[ok].max()), int((~ok).sum())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--what", choices=["scale", "collect"], required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--f64", action="store_true")
    a = ap.parse_args()
    global DTYPE
    if a.f64:
        DTYPE = torch.float64
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    cc = CC(os.path.join(a.data, "crosscoder.safetensors"), DTYPE)
    dirs = [os.path.join(a.data, c) for c in ("web", "chat")]
    out = {"impl": "torch-f64" if a.f64 else "torch", "what": a.what}
    t = time.perf_counter()
    if a.what == "scale":
        tokens, betas, count = scale(cc, dirs)
        secs = time.perf_counter() - t
        out["nonzero"] = int(count.sum())
        if a.check:
            p = load_file(os.path.join(a.data, "pipe_betas.safetensors"))
            worst, worst_scaled, worst_same, nonfinite = 0.0, 0.0, 0.0, 0
            same = count == p["count_active"]
            for name, b in betas.items():
                q = p[f"betas_{name}"]
                r, n = rel(b, q)
                worst_same = max(worst_same, rel(b[same], q[same])[0])
                ok = torch.isfinite(b) & torch.isfinite(q)
                s = float((b.double() - q)[ok].abs().max() / q[ok].abs().max())
                worst, worst_scaled, nonfinite = max(worst, r), max(worst_scaled, s), nonfinite + n
            out["check"] = {
                "max_rel_diff_betas": worst, "max_rel_diff_betas_same_active_set": worst_same,
                "max_abs_diff_over_max_beta": worst_scaled,
                "non_finite_either": nonfinite,
                "count_active_differs_at": int((count != p["count_active"]).sum()),
                "nonzero_pipe": int(p["count_active"].sum()), "nonzero_torch": int(count.sum()),
            }
    else:
        tokens, stats, sum_, vals, ids = collect(cc, dirs)
        secs = time.perf_counter() - t
        out["nonzero"] = int(vals.shape[0])
        out["sequences"] = int(ids[-1, 0]) + 1 if len(ids) else 0
        if a.check:
            p = load_file(os.path.join(a.data, "pipe_collect.safetensors"))
            out["check"] = {
                "max_rel_diff_max": max(rel(stats[k][0], p[f"max_{k}"])[0] for k in range(len(stats))),
                "count_differs_at": sum(int((stats[k][1] != p[f"count_{k}"]).sum()) for k in range(len(stats))),
                "max_rel_diff_sum": rel(sum_, p["sum"])[0],
                "nonzero_pipe": int(sum(p[f"count_{k}"].sum() for k in range(len(stats)))),
                "nonzero_torch": int(vals.shape[0]),
            }
    out.update(tokens=tokens, seconds=secs, tokens_per_s=tokens / secs,
               vm_hwm=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, threads=a.threads)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
