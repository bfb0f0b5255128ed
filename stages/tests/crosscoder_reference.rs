//! The crosscoder losses, gradients, clipping, Adam, dead-latent counters, threshold and
//! geometric median against values recorded from the reference implementation
//! (jkminder/dictionary_learning, in float64; see `fixtures/crosscoder/README.md`). Ours runs in
//! f32, so the comparison is relative, at f32 precision. Both ways of computing a step are checked:
//! candle's autograd (any device) and the CPU step with hand-written gradients (`train::cpu`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use stages::train::adam::{Adam, clip_grad_norm};
use stages::train::cpu;
use stages::train::crosscoder::{
    BatchTopK, CodeNormalization, Crosscoder, geometric_median, l1_loss, min_positive_scaled,
};

const PARAMS: [&str; 4] = ["encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"];

fn fixture() -> HashMap<String, Tensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/crosscoder/reference.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn get(fx: &HashMap<String, Tensor>, name: &str) -> Tensor {
    fx.get(name).unwrap_or_else(|| panic!("fixture has no {name}")).clone()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// max |a − b| / max(max |b|, floor): errors relative to the tensor's scale.
fn close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let (g, w) = (f32s(got), f32s(want));
    assert_eq!(g.len(), w.len(), "{what}: sizes");
    let scale = w.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    let err = g.iter().zip(&w).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
    assert!(err <= tol, "{what}: relative error {err:.3e} > {tol:.1e}");
}

fn scalar(t: &Tensor, i: usize) -> f64 {
    t.get(i).unwrap().to_dtype(DType::F64).unwrap().to_scalar().unwrap()
}

fn model(fx: &HashMap<String, Tensor>, prefix: &str) -> Crosscoder {
    let var = |n: &str| {
        Var::from_tensor(&get(fx, &format!("{prefix}.init.{n}")).to_dtype(DType::F32).unwrap()).unwrap()
    };
    Crosscoder {
        w_enc: var("encoder.weight"),
        b_enc: var("encoder.bias"),
        w_dec: var("decoder.weight"),
        b_dec: var("decoder.bias"),
        norm: CodeNormalization::Crosscoder,
        d: 8,
        f: 32,
        matmul_dtype: DType::F32,
    }
}

/// How a step's loss and gradients are computed.
#[derive(Clone, Copy, Debug)]
enum Way {
    Autograd,
    Cpu,
}

/// A step's results as tensors, whichever the path.
struct Step {
    l2: Tensor,
    sparsity: Option<Tensor>,
    auxk: Option<Tensor>,
    f: Tensor,
    x_hat: Tensor,
    grads: Vec<Tensor>,
    /// The smallest positive f·c (for the threshold).
    min_scaled: f32,
}

/// One step of the L1 (`topk` None, penalty `mu`) or BatchTopK loss, gradients clipped to
/// `clip` when given; returns the step and the norm before clipping.
fn step(
    path: Way,
    cc: &Crosscoder,
    topk: Option<&mut BatchTopK>,
    x: &Tensor,
    mu: f64,
    clip: Option<f64>,
) -> (Step, f64) {
    let scalar = |v: f32| Tensor::new(v, &Device::Cpu).unwrap();
    match path {
        Way::Autograd => {
            let out = match topk {
                Some(t) => t.loss(cc, x).unwrap(),
                None => l1_loss(cc, x, mu).unwrap(),
            };
            let g = out.loss.backward().unwrap();
            let mut grads: Vec<Tensor> =
                cc.vars().iter().map(|v| g.get(v.as_tensor()).unwrap().clone()).collect();
            let norm = clip.map(|c| clip_grad_norm(&mut grads, c).unwrap()).unwrap_or(f64::NAN);
            let min_scaled = min_positive_scaled(cc, &out.f).unwrap();
            let step = Step {
                l2: out.l2,
                sparsity: out.sparsity,
                auxk: out.auxk,
                f: out.f,
                x_hat: out.x_hat,
                grads,
                min_scaled,
            };
            (step, norm)
        }
        Way::Cpu => {
            let b = x.dim(0).unwrap();
            let host = f32s(x);
            let mut out = match topk {
                Some(t) => cpu::batchtopk(t, cc, &host, b).unwrap(),
                None => cpu::l1(cc, &host, b, mu).unwrap(),
            };
            let norm = clip.map(|c| cpu::clip_grad_norm(&mut out.grads, c)).unwrap_or(f64::NAN);
            let step = Step {
                l2: scalar(out.l2),
                sparsity: out.sparsity.map(scalar),
                auxk: out.auxk.map(scalar),
                f: Tensor::from_vec(out.codes.to_dense(b, cc.f), (b, cc.f), &Device::Cpu).unwrap(),
                x_hat: Tensor::from_vec(out.x_hat, (b, 2, cc.d), &Device::Cpu).unwrap(),
                grads: cpu::grad_tensors(cc, out.grads).unwrap(),
                min_scaled: out.min_scaled.unwrap_or(0.0),
            };
            (step, norm)
        }
    }
}

#[test]
fn l1_crosscoder_matches_the_reference_by_autograd() {
    l1_matches_the_reference(Way::Autograd);
}

#[test]
fn l1_crosscoder_matches_the_reference_on_the_cpu_path() {
    l1_matches_the_reference(Way::Cpu);
}

#[test]
fn batchtopk_crosscoder_matches_the_reference_by_autograd() {
    batchtopk_matches_the_reference(Way::Autograd);
}

#[test]
fn batchtopk_crosscoder_matches_the_reference_on_the_cpu_path() {
    batchtopk_matches_the_reference(Way::Cpu);
}

fn l1_matches_the_reference(path: Way) {
    let fx = fixture();
    let cc = model(&fx, "l1");
    let mut adam = Adam::new(&cc.vars()).unwrap();
    let xs = get(&fx, "l1.x");
    for s in 0..6 {
        let x = xs.get(s).unwrap().to_dtype(DType::F32).unwrap();
        let (out, _) = step(path, &cc, None, &x, 0.041, None);
        let at = |what: &str| format!("{path:?} step {s} {what}");
        close(&at("l2"), &out.l2, &get(&fx, "l1.l2_loss").get(s).unwrap(), 1e-5);
        close(&at("l1"), out.sparsity.as_ref().unwrap(), &get(&fx, "l1.l1_loss").get(s).unwrap(), 1e-4);
        close(&at("x_hat"), &out.x_hat, &get(&fx, "l1.x_hat").get(s).unwrap(), 1e-5);
        for (name, g) in PARAMS.iter().zip(&out.grads) {
            close(
                &at(&format!("grad {name}")),
                g,
                &get(&fx, &format!("l1.grad.{name}")).get(s).unwrap(),
                1e-4,
            );
        }
        adam.step(&cc.vars(), &out.grads, scalar(&get(&fx, "l1.lr"), s)).unwrap();
        for (name, v) in PARAMS.iter().zip(cc.vars()) {
            close(&at(name), v.as_tensor(), &get(&fx, &format!("l1.after.{name}")).get(s).unwrap(), 1e-4);
        }
    }
}

fn batchtopk_matches_the_reference(path: Way) {
    let fx = fixture();
    let cc = model(&fx, "btk");
    let mut adam = Adam::new(&cc.vars()).unwrap();
    let mut topk = BatchTopK {
        k: 4,
        auxk_alpha: 1.0 / 32.0,
        dead_tokens: 32,
        since_fired: vec![0; 32],
        threshold: -1.0,
    };
    let xs = get(&fx, "btk.x");
    for s in 0..8 {
        let at = |what: &str| format!("{path:?} step {s} {what}");
        let x = xs.get(s).unwrap().to_dtype(DType::F32).unwrap();
        if s == 0 {
            let host = f32s(&x);
            let median = Tensor::from_vec(geometric_median(&host, 16, 8), (2, 8), &Device::Cpu).unwrap();
            close("geometric median", &median, &get(&fx, "btk.geometric_median"), 1e-5);
            cc.b_dec.set(&median).unwrap();
        }
        // Unclipped first, for the gradients before clipping (the counters run once per step).
        let mut counters = topk.clone();
        let (raw, _) = step(path, &cc, Some(&mut counters), &x, 0.0, None);
        let (out, norm) = step(path, &cc, Some(&mut topk), &x, 0.0, Some(1.0));
        close(&at("f"), &out.f, &get(&fx, "btk.f").get(s).unwrap(), 1e-5);
        close(&at("l2"), &out.l2, &get(&fx, "btk.l2_loss").get(s).unwrap(), 1e-5);
        close(&at("auxk"), out.auxk.as_ref().unwrap(), &get(&fx, "btk.auxk_loss").get(s).unwrap(), 1e-4);
        let want_since: Vec<i64> = get(&fx, "btk.num_tokens_since_fired").get(s).unwrap().to_vec1().unwrap();
        assert_eq!(
            topk.since_fired.iter().map(|v| *v as i64).collect::<Vec<_>>(),
            want_since,
            "{}",
            at("counters")
        );
        for (name, g) in PARAMS.iter().zip(&raw.grads) {
            let want = get(&fx, &format!("btk.grad_preclip.{name}")).get(s).unwrap();
            close(&at(&format!("grad {name}")), g, &want, 1e-4);
        }
        let want_norm = scalar(&get(&fx, "btk.grad_norm_before_clip"), s);
        assert!((norm - want_norm).abs() <= 1e-4 * want_norm, "{} {norm} vs {want_norm}", at("norm"));
        for (name, g) in PARAMS.iter().zip(&out.grads) {
            close(
                &at(&format!("clipped {name}")),
                g,
                &get(&fx, &format!("btk.grad.{name}")).get(s).unwrap(),
                1e-4,
            );
        }
        if s > 2 {
            topk.fold_threshold(out.min_scaled);
        }
        let want_t = scalar(&get(&fx, "btk.threshold"), s) as f32;
        assert!(
            (topk.threshold - want_t).abs() <= 1e-5 * want_t.abs().max(1.0),
            "{} {} vs {want_t}",
            at("threshold"),
            topk.threshold
        );
        adam.step(&cc.vars(), &out.grads, scalar(&get(&fx, "btk.lr"), s)).unwrap();
        for (name, v) in PARAMS.iter().zip(cc.vars()) {
            close(&at(name), v.as_tensor(), &get(&fx, &format!("btk.after.{name}")).get(s).unwrap(), 1e-4);
        }
    }
    let x = get(&fx, "btk.eval.x").to_dtype(DType::F32).unwrap();
    close("code weights", &cc.code_weights().unwrap(), &get(&fx, "btk.eval.code_normalization"), 1e-5);
    let f = topk.encode_threshold(&cc, &x).unwrap();
    close("threshold encode", &f, &get(&fx, "btk.eval.encode_threshold"), 1e-4);
    let scaled = f.broadcast_mul(&cc.code_weights().unwrap()).unwrap();
    close("get_activations", &scaled, &get(&fx, "btk.eval.get_activations_threshold"), 1e-4);
    close("x_hat", &cc.decode(&f).unwrap(), &get(&fx, "btk.eval.x_hat_threshold"), 1e-4);
}
