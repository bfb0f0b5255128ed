"""Writes stages/tests/fixtures/crosscoder/reference.safetensors (+ config.json) by running the
REAL reference trainers of jkminder/dictionary_learning (trainers/crosscoder.py:
CrossCoderTrainer, BatchTopKCrossCoderTrainer; dictionary.py: CrossCoder, BatchTopKCrossCoder)
in float64 on a small random problem (d=8, F=32, 2 models, B=16).

Only dictionary.py, trainers/trainer.py and trainers/crosscoder.py are imported; the package
__init__ files and utils.py (datasets/zstandard/nnsight imports) are replaced by stubs. No
reference math is changed, with ONE documented exception: the reference forces float32 in two
places of trainers/crosscoder.py (the auxk loss does `.float()` on the residual and the aux
reconstruction; update_threshold does `.to(dtype=th.float32)`). The saved fixture comes from a
copy of crosscoder.py with just those casts removed ("pure f64"); the script also runs the
unmodified file and writes the max differences into config.json, and saves the unmodified
threshold trajectory as `btk.threshold_asis`.

What the script does NOT do, on purpose: it never calls trainer.loss() outside trainer.update()
(the reference's logging/validation calls to loss() also bump BatchTopK's
num_tokens_since_fired); intermediate values are read out of the reference's own frames with a
profile hook (sys.setprofile), the gradients with an optimizer step pre-hook, and the pre-clip
norm by wrapping torch.nn.utils.clip_grad_norm_ (return value recorded, call unchanged).

Run (needs torch, einops, safetensors, huggingface_hub; /work/.venv-parity has them):

    /work/.venv-parity/bin/python scripts/make_crosscoder_reference.py \
        [--dl-src DIR_CONTAINING_dictionary_learning_PACKAGE]

Without --dl-src the source is exported from the offline mirror
/work/.mirror/jkminder+dictionary_learning/repo (git archive HEAD).
"""

import argparse
import importlib
import json
import subprocess
import sys
import tarfile
import io
import tempfile
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "stages" / "tests" / "fixtures" / "crosscoder"
MIRROR = Path("/work/.mirror/jkminder+dictionary_learning/repo")

SEED = 42  # trainer seed (torch.manual_seed inside the trainer constructors)
DATA_SEED = 1234  # separate generator for the activations
D = 8
F = 32
L = 2
B = 16

L1_CFG = dict(
    steps=6,
    lr=1e-3,
    l1_penalty=0.041,
    warmup_steps=3,
    norm_init_scale=0.005,
    same_init_for_all_layers=True,
    init_with_transpose=True,
    code_normalization="CROSSCODER",
)
BTK_CFG = dict(
    steps=8,
    lr=1e-3,
    k=4,
    auxk_alpha=1 / 32,
    warmup_steps=3,
    norm_init_scale=1.0,
    same_init_for_all_layers=True,
    init_with_transpose=True,
    code_normalization="CROSSCODER",
    threshold_beta=0.999,
    threshold_start_step=2,
    dead_feature_threshold=32,  # tokens (reference default 10_000_000; hard-coded attribute)
    clip_max_norm=1.0,  # hard-coded in BatchTopKCrossCoderTrainer.update
)

# float32 casts in trainers/crosscoder.py removed for the "pure f64" variant: (old, new, count)
F64_PATCHES = [
    ("(residual_BD.float() - x_reconstruct_aux.float())", "(residual_BD - x_reconstruct_aux)", 1),
    ("(residual_BD.float() - residual_mu.float())", "(residual_BD - residual_mu)", 1),
    ("min_activation = active.min().detach().to(dtype=th.float32)", "min_activation = active.min().detach()", 1),
]


# --------------------------------------------------------------------------- reference loading
def export_mirror() -> tuple[Path, str]:
    commit = subprocess.check_output(["git", "--git-dir", str(MIRROR), "rev-parse", "HEAD"], text=True).strip()
    data = subprocess.check_output(["git", "--git-dir", str(MIRROR), "archive", "HEAD", "dictionary_learning"])
    tmp = Path(tempfile.mkdtemp(prefix="dl_ref_"))
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        tf.extractall(tmp)
    return tmp, commit


def load_reference(src_root: Path):
    """Registers stub packages and imports dictionary.py + trainers/trainer.py. Returns
    (dictionary module, crosscoder module as-is, crosscoder module with f32 casts removed)."""
    pkg_dir = src_root / "dictionary_learning"
    pkg = types.ModuleType("dictionary_learning")
    pkg.__path__ = [str(pkg_dir)]
    sys.modules["dictionary_learning"] = pkg
    trainers = types.ModuleType("dictionary_learning.trainers")
    trainers.__path__ = [str(pkg_dir / "trainers")]
    sys.modules["dictionary_learning.trainers"] = trainers
    utils = types.ModuleType("dictionary_learning.utils")  # real one imports datasets/zstandard

    def _unused(*a, **k):
        raise NotImplementedError("stubbed: not used by the crosscoder trainers")

    utils.set_decoder_norm_to_unit_norm = _unused
    utils.remove_gradient_parallel_to_decoder_directions = _unused
    sys.modules["dictionary_learning.utils"] = utils

    dictionary = importlib.import_module("dictionary_learning.dictionary")
    importlib.import_module("dictionary_learning.trainers.trainer")
    src = (pkg_dir / "trainers" / "crosscoder.py").read_text()

    def load(name, text):
        mod = types.ModuleType(name)
        mod.__package__ = "dictionary_learning.trainers"
        mod.__file__ = str(pkg_dir / "trainers" / "crosscoder.py")
        sys.modules[name] = mod
        exec(compile(text, mod.__file__, "exec"), mod.__dict__)
        return mod

    asis = load("dictionary_learning.trainers.crosscoder", src)
    patched = src
    for old, new, count in F64_PATCHES:
        assert patched.count(old) == count, f"patch target not found exactly {count}x: {old}"
        patched = patched.replace(old, new)
    f64 = load("dictionary_learning.trainers.crosscoder_f64", patched)
    return dictionary, asis, f64


# --------------------------------------------------------------------------- data
def make_data(n_batches: int, gen: torch.Generator) -> torch.Tensor:
    """(n_batches, B, 2, d): sparse nonnegative combinations of 12 ground-truth features
    (6 shared with a slightly rotated chat direction, 3 base-only, 3 chat-only) + a constant
    offset per model + small Gaussian noise."""
    n_shared, n_base, n_chat = 6, 3, 3
    n = n_shared + n_base + n_chat
    dirs = torch.zeros(n, L, D)
    u = torch.randn(n, D, generator=gen)
    u = u / u.norm(dim=-1, keepdim=True)
    v = torch.randn(n, D, generator=gen)
    for i in range(n_shared):
        dirs[i, 0] = u[i]
        w = u[i] + 0.3 * v[i]
        dirs[i, 1] = w / w.norm()
    for i in range(n_shared, n_shared + n_base):
        dirs[i, 0] = u[i]
    for i in range(n_shared + n_base, n):
        dirs[i, 1] = u[i]
    offset = torch.randn(L, D, generator=gen) * 0.7
    total = n_batches * B
    active = torch.rand(total, n, generator=gen) < 0.25
    mag = 0.5 + 1.5 * torch.rand(total, n, generator=gen)
    coef = active * mag
    x = torch.einsum("tn,nld->tld", coef, dirs) + offset + 0.05 * torch.randn(total, L, D, generator=gen)
    return x.reshape(n_batches, B, L, D)


# --------------------------------------------------------------------------- capture helpers
class FrameCapture:
    """Records the locals of selected functions at their return (sys.setprofile)."""

    def __init__(self, codes: dict):
        self.codes = codes  # code object -> name
        self.records: dict[str, list[dict]] = {n: [] for n in codes.values()}

    def __call__(self, frame, event, arg):
        if event == "return" and frame.f_code in self.codes:
            # clone tensors now: some are aliased by later in-place updates (e.g. the geometric
            # median tensor becomes decoder.bias.data and is then updated by Adam in place)
            loc = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in frame.f_locals.items()}
            loc["__return__"] = arg.detach().clone() if isinstance(arg, torch.Tensor) else arg
            self.records[self.codes[frame.f_code]].append(loc)

    def __enter__(self):
        sys.setprofile(self)
        return self

    def __exit__(self, *exc):
        sys.setprofile(None)


def param_dict(ae) -> dict:
    return {
        "encoder.weight": ae.encoder.weight.detach().clone(),
        "encoder.bias": ae.encoder.bias.detach().clone(),
        "decoder.weight": ae.decoder.weight.detach().clone(),
        "decoder.bias": ae.decoder.bias.detach().clone(),
    }


PARAM_NAMES = ["encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"]


def check_param_order(ae):
    # optimizer / clip_grad_norm_ order (decoder registers its bias before its weight)
    names = [n for n, _ in ae.named_parameters()]
    assert names == ["encoder.weight", "encoder.bias", "decoder.bias", "decoder.weight"], names


def grads_of(ae) -> dict:
    return {
        "encoder.weight": ae.encoder.weight.grad.detach().clone(),
        "encoder.bias": ae.encoder.bias.grad.detach().clone(),
        "decoder.weight": ae.decoder.weight.grad.detach().clone(),
        "decoder.bias": ae.decoder.bias.grad.detach().clone(),
    }


def stack_dicts(dicts: list[dict]) -> dict:
    return {k: torch.stack([d[k] for d in dicts]) for k in dicts[0]}


def optimizer_settings(opt) -> dict:
    g = opt.param_groups[0]
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"} | {
        "initial_lr": g.get("initial_lr")
    }


# --------------------------------------------------------------------------- scenario 1: L1
def run_l1(cc_mod, xs: torch.Tensor) -> tuple[dict, dict]:
    cfg = L1_CFG
    trainer = cc_mod.CrossCoderTrainer(
        num_layers=L,
        activation_dim=D,
        dict_size=F,
        lr=cfg["lr"],
        l1_penalty=cfg["l1_penalty"],
        warmup_steps=cfg["warmup_steps"],
        seed=SEED,
        device="cpu",
        layer=0,
        lm_name="fixture",
        dict_class_kwargs=dict(
            same_init_for_all_layers=cfg["same_init_for_all_layers"],
            norm_init_scale=cfg["norm_init_scale"],
            init_with_transpose=cfg["init_with_transpose"],
            code_normalization=cfg["code_normalization"],
        ),
    )
    ae = trainer.ae
    check_param_order(ae)
    assert all(p.dtype == torch.float64 for p in ae.parameters())
    init = param_dict(ae)
    opt_settings = optimizer_settings(trainer.optimizer)

    grads, lrs, after = [], [], []

    def pre_hook(opt, args, kwargs):
        grads.append(grads_of(ae))
        lrs.append(opt.param_groups[0]["lr"])

    h = trainer.optimizer.register_step_pre_hook(pre_hook)
    cap = FrameCapture({cc_mod.CrossCoderTrainer.loss.__code__: "loss"})
    for step in range(cfg["steps"]):
        with cap:
            trainer.update(step, xs[step].clone())
        after.append(param_dict(ae))
    h.remove()
    recs = cap.records["loss"]
    assert len(recs) == cfg["steps"], "loss() must run exactly once per step"

    out = {f"l1.init.{k}": v for k, v in init.items()}
    out["l1.x"] = xs[: cfg["steps"]].clone()
    out["l1.lr"] = torch.tensor(lrs, dtype=torch.float64)
    for key, name in [("l2_loss", "l2_loss"), ("mse_loss", "mse_loss"), ("l1_loss", "l1_loss"), ("loss", "loss")]:
        out[f"l1.{name}"] = torch.stack([r[key].detach() for r in recs])
    out["l1.f_scaled"] = torch.stack([r["f"].detach() for r in recs])
    out["l1.x_hat"] = torch.stack([r["x_hat"].detach() for r in recs])
    out |= {f"l1.grad.{k}": v for k, v in stack_dicts(grads).items()}
    out |= {f"l1.after.{k}": v for k, v in stack_dicts(after).items()}
    info = {"optimizer_param_groups": opt_settings, "scheduler_lr_per_step": lrs}
    return out, info


# --------------------------------------------------------------------------- scenario 2: BatchTopK
def run_btk(cc_mod, xs: torch.Tensor, x_eval: torch.Tensor) -> tuple[dict, dict]:
    cfg = BTK_CFG
    trainer = cc_mod.BatchTopKCrossCoderTrainer(
        steps=cfg["steps"],
        activation_dim=D,
        dict_size=F,
        k=cfg["k"],
        layer=0,
        lm_name="fixture",
        num_layers=L,
        lr=cfg["lr"],
        auxk_alpha=cfg["auxk_alpha"],
        warmup_steps=cfg["warmup_steps"],
        threshold_beta=cfg["threshold_beta"],
        threshold_start_step=cfg["threshold_start_step"],
        seed=SEED,
        device="cpu",
        dict_class_kwargs=dict(
            same_init_for_all_layers=cfg["same_init_for_all_layers"],
            norm_init_scale=cfg["norm_init_scale"],
            init_with_transpose=cfg["init_with_transpose"],
            code_normalization=cfg["code_normalization"],
        ),
    )
    trainer.dead_feature_threshold = cfg["dead_feature_threshold"]
    ae = trainer.ae
    check_param_order(ae)
    assert all(p.dtype == torch.float64 for p in ae.parameters())
    # the threshold buffer is created float32 explicitly; make it float64 (pure-f64 run). The
    # as-is run keeps whatever the reference produces (float32 after the first update).
    ae.threshold = ae.threshold.to(torch.float64)
    init = param_dict(ae)
    opt_settings = optimizer_settings(trainer.optimizer)

    grads, lrs, after, pre_clip, norms, thresholds, ntsf = [], [], [], [], [], [], []

    def pre_hook(opt, args, kwargs):
        grads.append(grads_of(ae))
        lrs.append(opt.param_groups[0]["lr"])

    orig_clip = torch.nn.utils.clip_grad_norm_

    def clip_wrapper(parameters, max_norm, *a, **k):
        parameters = list(parameters)
        assert max_norm == cfg["clip_max_norm"]
        pre_clip.append(grads_of(ae))
        n = orig_clip(parameters, max_norm, *a, **k)
        norms.append(n.detach().clone())
        return n

    h = trainer.optimizer.register_step_pre_hook(pre_hook)
    cls = cc_mod.BatchTopKCrossCoderTrainer
    cap = FrameCapture(
        {
            cls.loss.__code__: "loss",
            cls.get_auxiliary_loss.__code__: "aux",
            cls.geometric_median.__code__: "gm",
        }
    )
    torch.nn.utils.clip_grad_norm_ = clip_wrapper
    try:
        for step in range(cfg["steps"]):
            with cap:
                trainer.update(step, xs[step].clone())
            after.append(param_dict(ae))
            thresholds.append(ae.threshold.detach().clone().to(torch.float64))
            ntsf.append(trainer.num_tokens_since_fired.clone())
    finally:
        torch.nn.utils.clip_grad_norm_ = orig_clip
    h.remove()
    recs, aux, gm = cap.records["loss"], cap.records["aux"], cap.records["gm"]
    assert len(recs) == cfg["steps"] and len(aux) == cfg["steps"] and len(gm) == 1

    out = {f"btk.init.{k}": v for k, v in init.items()}
    out["btk.x"] = xs[: cfg["steps"]].clone()
    out["btk.geometric_median"] = gm[0]["__return__"].detach().clone()
    out["btk.lr"] = torch.tensor(lrs, dtype=torch.float64)
    for key in ["l2_loss", "mse_loss", "auxk_loss", "loss"]:
        out[f"btk.{key}"] = torch.stack([r[key].detach().to(torch.float64) for r in recs])
    out["btk.pre_norm_auxk_loss"] = torch.tensor([_pre_norm(a) for a in aux], dtype=torch.float64)
    out["btk.num_dead"] = torch.tensor([int(a["dead_features"].sum()) for a in aux], dtype=torch.int64)
    out["btk.k_aux"] = torch.tensor([int(a.get("k_aux", 0)) for a in aux], dtype=torch.int64)
    out["btk.auxk_loss_denom"] = torch.tensor(
        [float(a["loss_denom"]) if "loss_denom" in a else -1.0 for a in aux], dtype=torch.float64
    )
    out["btk.did_fire"] = torch.stack([r["did_fire"].to(torch.uint8) for r in recs])
    out["btk.post_relu_f"] = torch.stack([r["post_relu_f"].detach() for r in recs])
    out["btk.f"] = torch.stack([r["f"].detach() for r in recs])
    out["btk.f_scaled"] = torch.stack([r["f_scaled"].detach() for r in recs])
    out["btk.x_hat"] = torch.stack([r["x_hat"].detach() for r in recs])
    out["btk.grad_norm_before_clip"] = torch.stack(norms).to(torch.float64)
    out |= {f"btk.grad_preclip.{k}": v for k, v in stack_dicts(pre_clip).items()}
    out |= {f"btk.grad.{k}": v for k, v in stack_dicts(grads).items()}
    out["btk.threshold"] = torch.stack(thresholds)
    out["btk.num_tokens_since_fired"] = torch.stack(ntsf)
    out |= {f"btk.after.{k}": v for k, v in stack_dicts(after).items()}

    # final weights: inference encode on a held-out batch (no loss() call -> counters untouched)
    with torch.no_grad():
        out["btk.eval.x"] = x_eval.clone()
        out["btk.eval.code_normalization"] = ae.get_code_normalization().detach().reshape(F).clone()
        out["btk.eval.encode_threshold"] = ae.encode(x_eval.clone(), use_threshold=True)
        out["btk.eval.encode_topk"] = ae.encode(x_eval.clone(), use_threshold=False)
        out["btk.eval.get_activations_threshold"] = ae.get_activations(x_eval.clone(), use_threshold=True)
        out["btk.eval.get_activations_topk"] = ae.get_activations(x_eval.clone(), use_threshold=False)
        out["btk.eval.x_hat_threshold"] = ae.decode(out["btk.eval.encode_threshold"])
    info = {
        "optimizer_param_groups": opt_settings,
        "scheduler_lr_per_step": lrs,
        "geometric_median_last_iter_index": int(gm[0]["_"]),
        "threshold_dtype_after_training": str(ae.threshold.dtype),
    }
    return out, info


def _pre_norm(a: dict) -> float:
    if "l2_loss_aux" in a:
        return float(a["l2_loss_aux"])
    return -1.0


# --------------------------------------------------------------------------- main
def max_diffs(a: dict, b: dict) -> dict:
    res = {}
    for k in a:
        if a[k].dtype.is_floating_point:
            d = (a[k].to(torch.float64) - b[k].to(torch.float64)).abs().max().item()
            res[k] = d
    return {k: v for k, v in sorted(res.items(), key=lambda kv: -kv[1])[:12]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dl-src", type=Path, default=None)
    args = ap.parse_args()
    if args.dl_src is None:
        src_root, commit = export_mirror()
    else:
        src_root, commit = args.dl_src, "unknown (--dl-src)"

    torch.set_default_dtype(torch.float64)
    _, cc_asis, cc_f64 = load_reference(src_root)

    gen = torch.Generator().manual_seed(DATA_SEED)
    xs = make_data(max(L1_CFG["steps"], BTK_CFG["steps"]) + 1, gen)
    x_eval = xs[-1]
    assert xs.dtype == torch.float64

    out, config = {}, {"reference_repo": "jkminder/dictionary_learning", "reference_commit": commit}
    o, config["l1_run"] = run_l1(cc_f64, xs)
    out |= o
    o_btk, config["btk_run"] = run_btk(cc_f64, xs, x_eval)
    out |= o_btk

    # the unmodified reference (float32 casts kept) for comparison
    o_l1_asis, _ = run_l1(cc_asis, xs)
    o_btk_asis, info_asis = run_btk(cc_asis, xs, x_eval)
    out["btk.threshold_asis"] = o_btk_asis["btk.threshold"]
    config["asis_vs_pure_f64_max_abs_diff"] = {
        "l1 (no f32 casts in this trainer, expect 0)": max_diffs(
            {k: v for k, v in out.items() if k.startswith("l1.")}, o_l1_asis
        ),
        "btk (largest 12)": max_diffs({k: v for k, v in out.items() if k in o_btk_asis}, o_btk_asis),
        "btk threshold dtype as-is": info_asis["threshold_dtype_after_training"],
    }

    config["problem"] = {
        "activation_dim": D,
        "dict_size": F,
        "num_layers": L,
        "batch_size": B,
        "trainer_seed": SEED,
        "data_seed": DATA_SEED,
        "data": "sparse (p=0.25, magnitude U(0.5,2)) combos of 6 shared (chat dir = base dir + 0.3*noise,"
        " renormalised), 3 base-only, 3 chat-only unit directions + per-model offset N(0,0.49) + N(0,0.05^2) noise;"
        " btk.eval.x = the batch after the last training batch",
    }
    config["l1"] = L1_CFG
    config["btk"] = BTK_CFG
    config["f64_patches_to_reference"] = [p[0] + "  ->  " + p[1] for p in F64_PATCHES]

    out = {k: v.contiguous() for k, v in out.items()}
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    save_file(out, str(OUT_DIR / "reference.safetensors"), metadata={"config": json.dumps(config)})
    (OUT_DIR / "reference.safetensors").chmod(0o644)  # save_file creates it 0600
    (OUT_DIR / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    size = (OUT_DIR / "reference.safetensors").stat().st_size
    print(f"wrote {OUT_DIR / 'reference.safetensors'} ({size} bytes, {len(out)} tensors)")
    for k, v in out.items():
        print(f"  {k:45s} {str(v.dtype):14s} {tuple(v.shape)}")
    print(json.dumps(config, indent=2))


if __name__ == "__main__":
    main()
