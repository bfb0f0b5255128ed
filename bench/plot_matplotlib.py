"""The plot stage's figures in matplotlib, as the original draws them (SA:notebooks/art.py and
SA:scripts/eval_betas.py, DOMAIN.md §7), from the same latent table and metrics.jsonl that
stages/examples/plot_bench.rs draws: the baseline of bench/plot.sh.

    python bench/plot_matplotlib.py DIR OUT

Reads DIR/latents.parquet (pandas + pyarrow) and DIR/metrics.jsonl, writes each figure as PNG and
SVG into OUT at the same pixel sizes as pipe (1600 × 1000; two-panel figures 3200 × 1000; the
training figure 3200 × 1400; dpi 100), and prints one JSON line: latents, figures, files,
seconds (from reading the table to the last file written; the imports excluded), max RSS.
"""

import json
import os
import resource
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

BASE_ONLY, SHARED, CHAT_ONLY, SPECIFIC, OTHER = "C2", "C1", (0, 0.6, 1), "darkblue", "#b0b0b0"


def save(fig, out, stem):
    for ext in ("png", "svg"):
        fig.savefig(os.path.join(out, f"{stem}.{ext}"), dpi=100)
    plt.close(fig)


def delta_norm(df, out):
    alive = df[~df["dead"]]
    d = alive["delta_norm"].to_numpy()
    fig, ax = plt.subplots(figsize=(16, 10))
    bins = np.linspace(0, 1, 101)
    for lo, hi, c, name in [(0, 0.1, BASE_ONLY, "Base only"), (0.4, 0.6, SHARED, "Shared"), (0.9, 1.01, CHAT_ONLY, "Chat only")]:
        ax.hist(d[(d >= lo) & (d < hi)], bins=bins, color=c, label=name)
    other = d[((d >= 0.1) & (d < 0.4)) | ((d >= 0.6) & (d < 0.9))]
    ax.hist(other, bins=bins, color=OTHER, label="Other")
    spec = alive.loc[alive["chat_specific"], "delta_norm"].to_numpy()
    ax.hist(spec, bins=bins, color=SPECIFIC, label="Chat specific")
    for x in (0.1, 0.4, 0.6, 0.9):
        ax.axvline(x, ls="--", color="k", alpha=0.6)
    ax.set_xticks([0, 0.1, 0.4, 0.5, 0.6, 0.9, 1])
    ax.set_xlabel("Δ_norm")
    ax.set_ylabel("Latents")
    ax.set_title("Relative decoder norm difference")
    ax.legend(loc="upper left")
    inset = ax.inset_axes([0.55, 0.5, 0.43, 0.45])
    zb = np.linspace(0.9, 1, 21)
    inset.hist(d[d >= 0.9], bins=zb, color=CHAT_ONLY)
    inset.hist(spec[spec >= 0.9], bins=zb, color=SPECIFIC)
    save(fig, out, "delta_norm")


def decoder_cosine(df, out):
    alive = df[~df["dead"]]
    fig, ax = plt.subplots(figsize=(16, 10))
    groups, weights, labels, colors = [], [], [], []
    for name, c in [("Chat only", CHAT_ONLY), ("Base only", BASE_ONLY), ("Other", OTHER), ("Shared", SHARED)]:
        v = alive.loc[alive["class"] == name, "dec_cos_sim"].to_numpy()
        if len(v):
            groups.append(v)
            weights.append(np.ones_like(v) / len(v))
            labels.append(f"{name} ({len(v)})")
            colors.append(c)
    ax.hist(groups, bins=np.linspace(-1, 1, 21), weights=weights, label=labels, color=colors)
    ax.set_xlabel("cos(d_base, d_chat)")
    ax.set_ylabel("Share of the class's latents")
    ax.set_title("Decoder cosine similarity by class")
    ax.legend(loc="upper left")
    save(fig, out, "decoder_cosine")


def nu_scatter(df, out):
    fig = plt.figure(figsize=(16, 10))
    grid = fig.add_gridspec(2, 2, width_ratios=(4, 1), height_ratios=(1, 4), hspace=0.05, wspace=0.05)
    ax = fig.add_subplot(grid[1, 0])
    top = fig.add_subplot(grid[0, 0], sharex=ax)
    right = fig.add_subplot(grid[1, 1], sharey=ax)
    for col, c, name in [("effective_chat_only", CHAT_ONLY, "Chat-only latents"), ("shared_baseline", SHARED, "Shared latents")]:
        s = df[df[col]]
        s = s[(s.nu_error > 0) & (s.nu_error < 1.1) & (s.nu_reconstruction > 0) & (s.nu_reconstruction < 1.1)]
        ax.scatter(s.nu_error, s.nu_reconstruction, alpha=0.2, s=5, color=c, label=f"{name} ({len(s)})")
        top.hist(s.nu_error, bins=50, range=(0, 1.1), alpha=0.5, color=c)
        right.hist(s.nu_reconstruction, bins=50, range=(0, 1.1), alpha=0.5, color=c, orientation="horizontal")
    ax.set_xlabel("ν^ε (error)")
    ax.set_ylabel("ν^r (reconstruction)")
    ax.legend(loc="upper left")
    fig.suptitle("Latent Scaling: ν^ε against ν^r")
    save(fig, out, "nu_scatter")


def nu_histograms(df, out, sets, stem, rng, bins):
    fig, axes = plt.subplots(1, 2, figsize=(32, 10))
    for ax, col, name in zip(axes, ["nu_error", "nu_reconstruction"], ["ν^ε (error)", "ν^r (reconstruction)"]):
        for mask, c, label in sets:
            ax.hist(df.loc[mask, col].dropna(), bins=bins, range=rng, alpha=0.5, color=c, label=label)
        ax.set_xlabel(name)
        ax.set_ylabel("Latents")
        ax.legend(loc="upper right")
    fig.suptitle("ν ratios")
    save(fig, out, stem)


def below_threshold(df, out):
    s = df[df["effective_chat_only"]]
    pis = np.linspace(0, 1, 100)
    counts = [((s.nu_error.abs() < p) & (s.nu_reconstruction.abs() < p)).sum() for p in pis]
    fig, ax = plt.subplots(figsize=(16, 10))
    ax.plot(pis, counts, label="synthetic")
    ax.set_yscale("log")
    ax.set_xlabel("π")
    ax.set_ylabel("Latents with |ν^ε| < π and |ν^r| < π")
    ax.set_title("Chat-only latents below a ν threshold")
    ax.legend(loc="upper left")
    save(fig, out, "latents_below_threshold")


def frequency_vs_nu(df, out):
    s = df[df["effective_chat_only"] & (df["frequency"] > 0)]
    fig, axes = plt.subplots(1, 2, figsize=(32, 10))
    for ax, col in zip(axes, ["nu_error", "nu_reconstruction"]):
        r = np.corrcoef(s.frequency, s[col])[0, 1]
        ax.scatter(s.frequency, s[col], s=5, alpha=0.5, color=CHAT_ONLY)
        ax.set_xscale("log")
        ax.set_xlabel("Activation frequency")
        ax.set_ylabel(col)
        ax.set_title(f"{col}: Pearson r = {r:.2f} (n = {len(s)})")
    fig.suptitle("Activation frequency against ν, chat-only latents")
    save(fig, out, "frequency_vs_nu")


def training(path, out):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    metrics = pd.DataFrame(rows)
    fig, axes = plt.subplots(2, 2, figsize=(32, 14))
    for ax, (m, title) in zip(axes.flat, [("loss", "Loss"), ("frac_variance_explained", "Fraction of variance explained"), ("l0", "L0"), ("frac_dead", "Dead latents (fraction)")]):
        for split, style in [("train", "-"), ("val", "o-")]:
            d = metrics[(metrics.split == split) & metrics[m].notna()] if m in metrics else metrics.iloc[:0]
            if len(d):
                ax.plot(d.step, d[m], style, label=split)
        ax.set_title(title)
        ax.set_xlabel("Step")
        ax.legend()
    fig.suptitle("Training")
    save(fig, out, "training")


def main():
    src, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    df = pd.read_parquet(os.path.join(src, "latents.parquet"))
    delta_norm(df, out)
    decoder_cosine(df, out)
    nu_scatter(df, out)
    chat, shared = df["effective_chat_only"], df["shared_baseline"]
    nu_histograms(df, out, [(chat, CHAT_ONLY, "Chat only"), (shared, SHARED, "Shared")], "nu_histograms", (-0.1, 1.1), 100)
    below_threshold(df, out)
    frequency_vs_nu(df, out)
    template = chat & (df["template_share"] > 0.5)
    nu_histograms(df, out, [(chat, OTHER, "All chat-only"), (template, CHAT_ONLY, "Template share > 0.5")], "nu_template", (-0.1, 1.1), 50)
    training(os.path.join(src, "metrics.jsonl"), out)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "latents": len(df), "figures": 8, "files": len(os.listdir(out)), "seconds": seconds,
        "vm_hwm_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
