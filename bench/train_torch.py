"""The `train` stage's training step in plain PyTorch, dictionary_learning style, for bench/train.sh.

BatchTopK crosscoder (DOMAIN.md §2b): dense encode (B, 2d) @ (2d, F) + b, ReLU, scaled by the
decoder norms c_j = Σ_l ||W_dec[l, j]||, the k·B largest scaled codes of the flattened (B·F) batch
by torch.topk, dense decode, l2 = mean_{b,l} ||e||, auxiliary loss over dead latents
(dead_tokens), the inference-threshold EMA after threshold_start_step, clip_grad_norm 1.0, Adam
with a linear warmup; step 0 sets the decoder bias to the per-model geometric median of the first
batch. L1 (§2a): ReLU codes, recon + mu · mean_b Σ_j f c_j, no clipping. Every log_every steps
the same metrics as the stage (l0, fraction of variance explained) are computed.

Reads the caches written by `train_bench gen` (DIR/web, DIR/chat: shards/*.safetensors with
`activations` (n, 2, d)) into memory, then draws random batches from both. Prints one JSON line:
seconds (init + steps + saving the state dict; loading the data excluded), steps/s, peak RSS.

    python bench/train_torch.py --data DIR --loss batchtopk --steps 150 --threads 2

On a GPU (bench/gpu/run.sh): --device cuda and --precision f32 (plain FP32 matmuls), tf32
(`torch.set_float32_matmul_precision('high')`, as the original trains) or bf16 (autocast of the
step's forward and loss, weights and Adam in f32). The data then lives on the device and peak
device memory (`torch.cuda.max_memory_allocated`) is reported.
"""

import argparse
import glob
import json
import os
import resource
import tempfile
import time

import torch
from safetensors.torch import load_file


def load(dirs):
    parts = []
    for d in dirs:
        for f in sorted(glob.glob(os.path.join(d, "shards", "*.safetensors"))):
            parts.append(load_file(f)["activations"].float())
    return torch.cat(parts)


def geometric_median(points, max_iter=100, tol=1e-5):
    # dictionary_learning's Weiszfeld: start at the mean, both models iterated together.
    guess = points.mean(dim=0)
    for _ in range(max_iter):
        prev = guess
        weights = 1 / torch.norm(points - guess, dim=-1)
        weights /= weights.sum(dim=0)
        guess = (weights.unsqueeze(-1) * points).sum(dim=0)
        if torch.norm(guess - prev, dim=-1).max() < tol:
            break
    return guess


class CrossCoder(torch.nn.Module):
    def __init__(self, d, f, norm_init_scale, gen):
        super().__init__()
        w = torch.empty(d, f)
        bound = (6.0 / f) ** 0.5
        w.uniform_(-bound, bound, generator=gen)
        w = w / w.norm(dim=0, keepdim=True) * norm_init_scale
        self.W_enc = torch.nn.Parameter(torch.stack([w, w]))  # (2, d, F)
        self.b_enc = torch.nn.Parameter(torch.zeros(f))
        self.W_dec = torch.nn.Parameter(torch.stack([w.T.clone(), w.T.clone()]))  # (2, F, d)
        self.b_dec = torch.nn.Parameter(torch.zeros(2, d))
        self.d, self.f = d, f

    def post(self, x):  # (B, 2, d) -> (B, F)
        b = x.shape[0]
        return torch.relu(x.reshape(b, -1) @ self.W_enc.reshape(-1, self.f) + self.b_enc)

    def code_weights(self):
        return self.W_dec.norm(dim=2).sum(dim=0)  # (F,)

    def dec_flat(self):
        return self.W_dec.transpose(0, 1).reshape(self.f, -1)  # (F, 2d)

    def decode(self, f):
        return (f @ self.dec_flat()).reshape(f.shape[0], 2, self.d) + self.b_dec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--loss", choices=["batchtopk", "l1"], default="batchtopk")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--dict-size", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup-steps", type=int, default=1000)
    ap.add_argument("--mu", type=float, default=0.041)
    ap.add_argument("--auxk-alpha", type=float, default=1 / 32)
    ap.add_argument("--dead-tokens", type=int, default=10_000_000)
    ap.add_argument("--threshold-start-step", type=int, default=1000)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["f32", "tf32", "bf16"], default="f32")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    torch.set_float32_matmul_precision("high" if a.precision == "tf32" else "highest")
    torch.backends.cudnn.allow_tf32 = a.precision == "tf32"
    dirs = [os.path.join(a.data, s) for s in ("web", "chat") if os.path.isdir(os.path.join(a.data, s))]
    data = load(dirs).to(dev)
    n, _, d = data.shape
    gen = torch.Generator().manual_seed(a.seed)
    B, F, topk = a.batch_size, a.dict_size, a.loss == "batchtopk"

    t0 = time.perf_counter()
    cc = CrossCoder(d, F, 1.0 if topk else 0.005, gen).to(dev)
    opt = torch.optim.Adam(cc.parameters(), lr=a.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(s / a.warmup_steps, 1.0) if a.warmup_steps else 1.0)
    since_fired = torch.zeros(F, dtype=torch.long, device=dev)
    threshold = -1.0
    last = {}
    for step in range(a.steps):
        x = data[torch.randint(0, n, (B,), generator=gen).to(dev)]
        if topk and step == 0:
            with torch.no_grad():
                cc.b_dec.copy_(geometric_median(x))
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda and a.precision == "bf16")
        autocast.__enter__()
        post = cc.post(x)
        if topk:
            c = cc.code_weights().detach()
            scaled = post * c
            flat = scaled.flatten()
            vals, idx = flat.topk(a.k * B, sorted=False)
            mask = torch.zeros_like(flat).scatter_(0, idx, 1.0).reshape(B, F)
            f = post * mask
            x_hat = cc.decode(f)
            e = x - x_hat
            l2 = e.norm(dim=-1).mean()
            fired = (f != 0).any(dim=0)
            since_fired += B
            since_fired[fired] = 0
            dead = since_fired >= a.dead_tokens
            n_dead = int(dead.sum())
            if n_dead > 0:
                k_aux = min(d // 2, n_dead)
                aux_scaled = torch.where(dead[None], scaled, -torch.inf)
                _, aidx = aux_scaled.topk(k_aux, dim=-1, sorted=False)
                aux_acts = torch.zeros_like(post).scatter(-1, aidx, post.gather(-1, aidx))
                x_aux = aux_acts @ cc.dec_flat()
                r = e.detach().reshape(B, -1)
                auxk = (r - x_aux).pow(2).sum(-1).mean() / (r - r.mean(0, keepdim=True)).pow(2).sum(-1).mean()
                auxk = torch.nan_to_num(auxk, 0.0)
            else:
                auxk = x.new_zeros(())
            loss = l2 + a.auxk_alpha * auxk
        else:
            f = post
            x_hat = cc.decode(f)
            l2 = (x - x_hat).norm(dim=-1).mean()
            sparsity = (f * cc.code_weights()).sum(-1).mean()
            loss = l2 + a.mu * sparsity
        autocast.__exit__(None, None, None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if topk:
            torch.nn.utils.clip_grad_norm_(cc.parameters(), 1.0)
            if step > a.threshold_start_step:
                with torch.no_grad():
                    s = (f * cc.code_weights())
                    pos = s[s > 0]
                    m = float(pos.min()) if pos.numel() else 0.0
                    threshold = m if threshold < 0 else 0.999 * threshold + 0.001 * m
        if step % a.log_every == 0 or step + 1 == a.steps:
            with torch.no_grad():
                l0 = float((f != 0).float().sum(-1).mean())
                tv = (x - x.mean(0)).pow(2).sum()
                rv = (x - x_hat).pow(2).sum()
                last = {"final_loss": float(loss), "final_l0": l0, "final_fve": float(1 - rv / tv)}
        opt.step()
        sched.step()
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(cc.state_dict(), os.path.join(tmp, "crosscoder.pt"))
    if cuda:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    print(json.dumps({
        "impl": "torch", "loss": a.loss, "steps": a.steps, "tokens_in_store": n, "seconds": secs,
        "steps_per_s": a.steps / secs, "vm_hwm": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "threads": torch.get_num_threads(), "device": str(dev), "precision": a.precision,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else 0, **last,
    }))


if __name__ == "__main__":
    main()
