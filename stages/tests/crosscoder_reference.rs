//! The crosscoder losses, gradients, clipping, Adam, dead-latent counters, threshold and
//! geometric median against values recorded from the reference implementation
//! (jkminder/dictionary_learning, in float64; see `fixtures/crosscoder/README.md`). Ours runs in
//! f32, so the comparison is relative, at f32 precision.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use stages::train::adam::{Adam, clip_grad_norm};
use stages::train::crosscoder::{BatchTopK, CodeNormalization, Crosscoder, geometric_median, l1_loss};

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

fn grads_of(cc: &Crosscoder, loss: &Tensor) -> Vec<Tensor> {
    let g = loss.backward().unwrap();
    cc.vars().iter().map(|v| g.get(v.as_tensor()).unwrap().clone()).collect()
}

#[test]
fn l1_crosscoder_matches_the_reference() {
    let fx = fixture();
    let cc = model(&fx, "l1");
    let mut adam = Adam::new(&cc.vars()).unwrap();
    let xs = get(&fx, "l1.x");
    for s in 0..6 {
        let x = xs.get(s).unwrap().to_dtype(DType::F32).unwrap();
        let out = l1_loss(&cc, &x, 0.041).unwrap();
        close(&format!("step {s} l2"), &out.l2, &get(&fx, "l1.l2_loss").get(s).unwrap(), 1e-5);
        close(
            &format!("step {s} l1"),
            out.sparsity.as_ref().unwrap(),
            &get(&fx, "l1.l1_loss").get(s).unwrap(),
            1e-4,
        );
        close(&format!("step {s} x_hat"), &out.x_hat, &get(&fx, "l1.x_hat").get(s).unwrap(), 1e-5);
        let g = grads_of(&cc, &out.loss);
        for (name, g) in PARAMS.iter().zip(&g) {
            close(
                &format!("step {s} grad {name}"),
                g,
                &get(&fx, &format!("l1.grad.{name}")).get(s).unwrap(),
                1e-4,
            );
        }
        adam.step(&cc.vars(), &g, scalar(&get(&fx, "l1.lr"), s)).unwrap();
        for (name, v) in PARAMS.iter().zip(cc.vars()) {
            close(
                &format!("step {s} {name}"),
                v.as_tensor(),
                &get(&fx, &format!("l1.after.{name}")).get(s).unwrap(),
                1e-4,
            );
        }
    }
}

#[test]
fn batchtopk_crosscoder_matches_the_reference() {
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
        let x = xs.get(s).unwrap().to_dtype(DType::F32).unwrap();
        if s == 0 {
            let host = f32s(&x);
            let median = Tensor::from_vec(geometric_median(&host, 16, 8), (2, 8), &Device::Cpu).unwrap();
            close("geometric median", &median, &get(&fx, "btk.geometric_median"), 1e-5);
            cc.b_dec.set(&median).unwrap();
        }
        let out = topk.loss(&cc, &x).unwrap();
        close(&format!("step {s} f"), &out.f, &get(&fx, "btk.f").get(s).unwrap(), 1e-5);
        close(&format!("step {s} l2"), &out.l2, &get(&fx, "btk.l2_loss").get(s).unwrap(), 1e-5);
        close(
            &format!("step {s} auxk"),
            out.auxk.as_ref().unwrap(),
            &get(&fx, "btk.auxk_loss").get(s).unwrap(),
            1e-4,
        );
        let want_since: Vec<i64> = get(&fx, "btk.num_tokens_since_fired").get(s).unwrap().to_vec1().unwrap();
        assert_eq!(
            topk.since_fired.iter().map(|v| *v as i64).collect::<Vec<_>>(),
            want_since,
            "step {s} counters"
        );
        let mut g = grads_of(&cc, &out.loss);
        for (name, g) in PARAMS.iter().zip(&g) {
            let want = get(&fx, &format!("btk.grad_preclip.{name}")).get(s).unwrap();
            close(&format!("step {s} grad {name}"), g, &want, 1e-4);
        }
        let norm = clip_grad_norm(&mut g, 1.0).unwrap();
        let want_norm = scalar(&get(&fx, "btk.grad_norm_before_clip"), s);
        assert!((norm - want_norm).abs() <= 1e-4 * want_norm, "step {s} norm {norm} vs {want_norm}");
        for (name, g) in PARAMS.iter().zip(&g) {
            close(
                &format!("step {s} clipped {name}"),
                g,
                &get(&fx, &format!("btk.grad.{name}")).get(s).unwrap(),
                1e-4,
            );
        }
        if s > 2 {
            topk.update_threshold(&cc, &out.f).unwrap();
        }
        let want_t = scalar(&get(&fx, "btk.threshold"), s) as f32;
        assert!(
            (topk.threshold - want_t).abs() <= 1e-5 * want_t.abs().max(1.0),
            "step {s} threshold {} vs {want_t}",
            topk.threshold
        );
        adam.step(&cc.vars(), &g, scalar(&get(&fx, "btk.lr"), s)).unwrap();
        for (name, v) in PARAMS.iter().zip(cc.vars()) {
            close(
                &format!("step {s} {name}"),
                v.as_tensor(),
                &get(&fx, &format!("btk.after.{name}")).get(s).unwrap(),
                1e-4,
            );
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
