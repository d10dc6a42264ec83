//! The CUDA feed-forward kernels through the Rust API against the f64 definition of
//! tests/ffn_common (and against the CPU reference's shapes and dtypes). Every test needs
//! a GPU (or the emulated device: scripts/emulate_rust_path.sh runs `smoke`): they are
//! ignored by default; run them with `cargo test --test gpu_ffn -- --ignored`. Without a
//! GPU an ignored run fails loudly instead of passing.
#![cfg(any(feature = "cuda", feature = "emulator"))]

mod common;
mod ffn_common;

use common::gpu_stream;
use ffn_common::{
    act, assert_within, subnormal_floor, unit_roundoff, y_bounds, Case, Flags, Mat, Rng, Tensors,
    ACTIVATIONS,
};
use flashkernels::ffn::{self, FfnActivation, FfnOptions, Inputs};
use flashkernels::{DType, DeviceTensor, Error, HostTensor, Stream, Tensor};

fn dev(s: &Stream, t: &HostTensor) -> Tensor {
    Tensor::Cuda(DeviceTensor::from_host(s, t).unwrap())
}

struct DeviceInputs {
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    w3: Option<Tensor>,
    b1: Option<Tensor>,
    b2: Option<Tensor>,
    b3: Option<Tensor>,
}

fn upload(s: &Stream, t: &Tensors) -> DeviceInputs {
    let o = |t: &Option<HostTensor>| t.as_ref().map(|t| dev(s, t));
    DeviceInputs {
        x: dev(s, &t.x),
        w1: dev(s, &t.w1),
        w2: dev(s, &t.w2),
        w3: o(&t.w3),
        b1: o(&t.b1),
        b2: o(&t.b2),
        b3: o(&t.b3),
    }
}

fn inputs(d: &DeviceInputs) -> Inputs<'_, Tensor> {
    Inputs::new(&d.x, &d.w1, &d.w2).gate(d.w3.as_ref()).biases(
        d.b1.as_ref(),
        d.b2.as_ref(),
        d.b3.as_ref(),
    )
}

/// Runs the device forward and checks y and h elementwise against the definition: one
/// rounding of h (through W2) and one of y, as on the CPU, plus 1e-5 of the absolute
/// products for the kernels' f32 accumulation.
fn check(s: &Stream, c: &Case, x_pad: usize) {
    let d = upload(s, &c.tensors(x_pad));
    let opts = FfnOptions::new(c.act).residual(c.residual);
    let o = ffn::forward(&inputs(&d).keep_hidden(true), &opts).unwrap();
    let y = o.y.to_host().unwrap();
    let h = o.hidden.expect("keep_hidden").to_host().unwrap();
    assert_eq!((y.shape(), y.dtype()), (&[c.x.rows, c.x.cols][..], c.dtype));
    assert_eq!(h.shape(), &[c.x.rows, c.w1.rows]);
    let def = c.define();
    let what = format!(
        "{:?} {:?} tokens {} d_model {} d_hidden {} gated {} biases {} residual {}",
        c.dtype,
        c.act,
        c.x.rows,
        c.x.cols,
        c.w1.rows,
        c.w3.is_some(),
        c.b1.is_some(),
        c.residual
    );
    // The f32 accumulation: 1e-5 of |x| |W1|ᵀ (times |g| when gated, and the gate's own
    // products times |act(u)|), and of |h| |W2|ᵀ for y.
    let mag1 = c.x.abs_mul(&c.w1.t());
    let mag3 = c.w3.as_ref().map(|w3| c.x.abs_mul(&w3.t()));
    let u = unit_roundoff(c.dtype);
    let sub = subnormal_floor(c.dtype);
    let hb: Vec<f64> = (0..def.h.v.len())
        .map(|i| {
            let acc = match (&def.g, &mag3) {
                (Some(g), Some(m3)) => {
                    1.13 * mag1.v[i] * g.v[i].abs()
                        + ffn_common::act(c.act, def.u.v[i]).abs() * m3.v[i]
                }
                _ => 1.13 * mag1.v[i],
            };
            2.0 * u * def.h.v[i].abs() + 1e-5 * acc + sub
        })
        .collect();
    assert_within(&format!("h, {what}"), &h.to_f32_vec(), &def.h.v, &hb);
    let prop = def.h.abs_mul(&c.w2.t());
    let yb: Vec<f64> = y_bounds(c, &def)
        .iter()
        .zip(&prop.v)
        .zip(&def.y.v)
        .map(|((b, p), y)| b + 1e-5 * (p + y.abs()))
        .collect();
    assert_within(&format!("y, {what}"), &y.to_f32_vec(), &def.y.v, &yb);
}

fn case(seed: u64, dtype: DType, dims: [usize; 3], act: FfnActivation, f: Flags) -> Case {
    Case::random(seed, dtype, dims[0], dims[1], dims[2], act, f)
}

#[test]
#[ignore = "needs a CUDA device"]
fn smoke() {
    let s = gpu_stream();
    // SwiGLU with every bias and the residual; a plain tanh-GELU block on a row-strided x
    // whose rows are off 16-byte alignment (the element-gather path).
    let swiglu = Flags {
        gated: true,
        biases: true,
        residual: true,
    };
    check(
        &s,
        &case(1, DType::BF16, [33, 40, 72], FfnActivation::Silu, swiglu),
        0,
    );
    let plain = Flags {
        gated: false,
        biases: false,
        residual: false,
    };
    check(
        &s,
        &case(2, DType::F16, [7, 24, 136], FfnActivation::GeluTanh, plain),
        3,
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn every_activation_gate_and_dtype() {
    let s = gpu_stream();
    let widths = [8, 24, 40, 72, 136];
    let mut seed = 10;
    for dtype in [DType::F16, DType::BF16] {
        for &a in &ACTIVATIONS {
            for gated in [false, true] {
                for (k, &tokens) in [1usize, 7, 33, 129].iter().enumerate() {
                    seed += 1;
                    let dims = [
                        tokens,
                        widths[seed as usize % 5],
                        widths[(seed as usize / 5) % 5],
                    ];
                    let f = Flags {
                        gated,
                        biases: k % 2 == 1,
                        residual: k != 2,
                    };
                    check(
                        &s,
                        &case(seed, dtype, dims, a, f),
                        if k == 3 { 8 } else { 0 },
                    );
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn device_errors() {
    let s = gpu_stream();
    let f = Flags {
        gated: false,
        biases: false,
        residual: false,
    };
    let opts = FfnOptions::new(FfnActivation::Relu);
    // A width that is not a multiple of 8: the CPU takes it, the kernels refuse it.
    let c = case(3, DType::F16, [4, 12, 16], FfnActivation::Relu, f);
    let d = upload(&s, &c.tensors(0));
    let e = ffn::forward(&inputs(&d), &opts).unwrap_err();
    assert!(
        matches!(&e, Error::Unsupported(m) if m.contains("d_model = 12")),
        "{e}"
    );
    // f32 has no kernel.
    let c = case(4, DType::F32, [4, 16, 16], FfnActivation::Relu, f);
    let t = c.tensors(0);
    let d = upload(&s, &t);
    let e = ffn::forward(&inputs(&d), &opts).unwrap_err();
    assert!(matches!(e, Error::UnsupportedDType { .. }), "{e}");
    // Host and device tensors mixed.
    let w1 = Tensor::Host(t.w1.clone());
    let e = ffn::forward(&Inputs::new(&d.x, &w1, &d.w2), &opts).unwrap_err();
    assert!(
        matches!(&e, Error::DeviceMismatch { detail } if detail.contains("w1 on cpu")),
        "{e}"
    );
    // The backward refuses f32 as the forward does.
    let dy = dev(&s, &t.x);
    let e = ffn::backward(&ffn::BackwardInputs::new(inputs(&d), &dy), &opts).unwrap_err();
    assert!(matches!(e, Error::UnsupportedDType { .. }), "{e}");
}

/// The device backward against the gradients' f64 definitions. du and dg are stored once
/// in the storage dtype and each gradient once more, so each gradient is within 2 u of
/// the absolute sum of its terms, taken at the intermediates' magnitudes (mdu = |dy| |W2|
/// |g| |act'(u)|, mdg = |dy| |W2| |act(u)|), plus 2e-5 of it for the f32 accumulations and
/// f16's subnormal floor per rounding.
fn check_backward(s: &Stream, c: &Case) {
    let t = c.tensors(0);
    let d = upload(s, &t);
    let dy = Mat::random(&mut Rng::new(7), c.x.rows, c.x.cols, 1.0, c.dtype);
    let dyd = dev(s, &dy.tensor(c.dtype, 0));
    let opts = FfnOptions::new(c.act).residual(c.residual);
    let g = ffn::backward(&ffn::BackwardInputs::new(inputs(&d), &dyd), &opts).unwrap();
    let def = c.define();
    let (tn, dm, dh) = (c.x.rows, c.x.cols, c.w1.rows);
    let rel = 2.0 * unit_roundoff(c.dtype) + 2e-5;
    let sub = subnormal_floor(c.dtype);
    let dhm = dy.mul(&c.w2);
    let mdh = dy.abs_mul(&c.w2);
    let eps = 1e-6;
    let (mut du, mut dg, mut mdu, mut mdg) = (dhm.clone(), dhm.clone(), dhm.clone(), dhm.clone());
    for i in 0..tn * dh {
        let u = def.u.v[i];
        let gv = def.g.as_ref().map_or(1.0, |g| g.v[i]);
        let dd = if c.act == FfnActivation::Relu {
            f64::from(u > 0.0)
        } else {
            (act(c.act, u + eps) - act(c.act, u - eps)) / (2.0 * eps)
        };
        du.v[i] = dhm.v[i] * gv * dd;
        dg.v[i] = dhm.v[i] * act(c.act, u);
        mdu.v[i] = mdh.v[i] * gv.abs() * (dd.abs() + 1e-5);
        mdg.v[i] = mdh.v[i] * (act(c.act, u).abs() + 1e-5);
    }
    let absm = |m: &Mat| Mat {
        v: m.v.iter().map(|x| x.abs()).collect(),
        ..m.clone()
    };
    let ones = Mat {
        rows: 1,
        cols: tn,
        v: vec![1.0; tn],
    };
    let what = format!(
        "{:?} {:?} tokens {tn} d_model {dm} d_hidden {dh}",
        c.dtype, c.act
    );
    let check = |name: &str, got: &Tensor, want: &Mat, mag: &Mat, floor: &[f64]| {
        let b: Vec<f64> = (0..want.v.len())
            .map(|i| rel * (mag.v[i] + want.v[i].abs()) + sub * floor[i] + 1e-30)
            .collect();
        let got = got.to_host().unwrap().to_f32_vec();
        assert_within(&format!("{name}, {what}"), &got, &want.v, &b);
    };
    // dx = du W1 [+ dg W3] [+ dy].
    let mut dx = du.mul(&c.w1);
    let mut mx = mdu.mul(&absm(&c.w1));
    let mut wsum: Vec<f64> = (0..dm)
        .map(|k| (0..dh).map(|j| c.w1.at(j, k).abs()).sum())
        .collect();
    if let Some(w3) = &c.w3 {
        let a = dg.mul(w3);
        let m = mdg.mul(&absm(w3));
        for i in 0..dx.v.len() {
            dx.v[i] += a.v[i];
            mx.v[i] += m.v[i];
        }
        for (k, w) in wsum.iter_mut().enumerate() {
            *w += (0..dh).map(|j| w3.at(j, k).abs()).sum::<f64>();
        }
    }
    if c.residual {
        for i in 0..dx.v.len() {
            dx.v[i] += dy.v[i];
        }
    }
    let fx: Vec<f64> = (0..tn * dm).map(|i| wsum[i % dm] + 1.0).collect();
    check("dx", &g.dx, &dx, &mx, &fx);
    // Weight gradients.
    let xs: Vec<f64> = (0..dm)
        .map(|k| (0..tn).map(|r| c.x.at(r, k).abs()).sum())
        .collect();
    let fw: Vec<f64> = (0..dh * dm).map(|i| xs[i % dm] + 1.0).collect();
    let xa = absm(&c.x);
    check("dW1", &g.dw1, &du.t().mul(&c.x), &mdu.t().mul(&xa), &fw);
    if c.w3.is_some() {
        let dw3 = g.dw3.as_ref().unwrap();
        check("dW3", dw3, &dg.t().mul(&c.x), &mdg.t().mul(&xa), &fw);
    }
    let dys: Vec<f64> = (0..dm)
        .map(|k| (0..tn).map(|r| dy.at(r, k).abs()).sum())
        .collect();
    let f2: Vec<f64> = (0..dm * dh).map(|i| dys[i / dh] + 1.0).collect();
    check(
        "dW2",
        &g.dw2,
        &dy.t().mul(&def.h),
        &dy.t().abs_mul(&def.h),
        &f2,
    );
    // Bias gradients, where the biases were given.
    let fb = vec![tn as f64 + 1.0; dm.max(dh)];
    if let Some(db1) = &g.db1 {
        check("db1", db1, &ones.mul(&du), &ones.mul(&mdu), &fb);
    }
    if let Some(db2) = &g.db2 {
        check("db2", db2, &ones.mul(&dy), &ones.abs_mul(&dy), &fb);
    }
    if let Some(db3) = &g.db3 {
        check("db3", db3, &ones.mul(&dg), &ones.mul(&mdg), &fb);
    }
    assert_eq!(g.db1.is_some(), c.b1.is_some());
    assert_eq!(g.db2.is_some(), c.b2.is_some());
    assert_eq!(g.db3.is_some(), c.b3.is_some());
    assert_eq!(g.dw3.is_some(), c.w3.is_some());
}

#[test]
#[ignore = "needs a CUDA device"]
fn backward_smoke() {
    let s = gpu_stream();
    let swiglu = Flags {
        gated: true,
        biases: true,
        residual: true,
    };
    check_backward(
        &s,
        &case(5, DType::BF16, [33, 40, 72], FfnActivation::Silu, swiglu),
    );
    let plain = Flags {
        gated: false,
        biases: true,
        residual: false,
    };
    check_backward(
        &s,
        &case(6, DType::F16, [7, 24, 16], FfnActivation::GeluTanh, plain),
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn backward_every_activation_and_gate() {
    let s = gpu_stream();
    let widths = [8, 24, 40, 72, 136];
    let mut seed = 300;
    for dtype in [DType::F16, DType::BF16] {
        for &a in &ACTIVATIONS {
            for gated in [false, true] {
                for (k, &tokens) in [1usize, 7, 33, 129].iter().enumerate() {
                    seed += 1;
                    let dims = [
                        tokens,
                        widths[seed as usize % 5],
                        widths[(seed as usize / 5) % 5],
                    ];
                    let f = Flags {
                        gated,
                        biases: k % 2 == 0,
                        residual: k != 1,
                    };
                    check_backward(&s, &case(seed, dtype, dims, a, f));
                }
            }
        }
    }
}
