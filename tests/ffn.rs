//! The fused feed-forward block's CPU reference and Rust API, forward and backward,
//! against an f64 definition written in tests/ffn_common (independent of the library);
//! gradients also against central finite differences of that definition; validation
//! errors.

#![allow(clippy::needless_range_loop)] // index-parallel numeric loops read best as such

mod ffn_common;

use ffn_common::{
    act, assert_within, round, subnormal_floor, unit_roundoff, y_bounds, Case, Defined, Flags, Mat,
    Rng, Tensors, ACTIVATIONS,
};
use flashkernels::ffn::{self, FfnActivation, FfnLayouts, FfnOptions, Inputs};
use flashkernels::{DType, Error, HostTensor, Layout};

fn opts(c: &Case) -> FfnOptions {
    FfnOptions::new(c.act).residual(c.residual)
}

fn inputs(t: &Tensors) -> Inputs<'_, HostTensor> {
    Inputs::new(&t.x, &t.w1, &t.w2).gate(t.w3.as_ref()).biases(
        t.b1.as_ref(),
        t.b2.as_ref(),
        t.b3.as_ref(),
    )
}

/// Runs the forward and checks y (and h) against the definition within one rounding of
/// the hidden activation and one of the output.
fn check_forward(c: &Case, x_pad: usize) {
    let t = c.tensors(x_pad);
    let o = ffn::forward(&inputs(&t).keep_hidden(true), &opts(c)).unwrap();
    let d = c.define();
    assert_eq!(o.y.shape(), &[c.x.rows, c.x.cols]);
    assert_eq!(o.y.dtype(), c.dtype);
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
    assert_within(
        &format!("y, {what}"),
        &o.y.to_f32_vec(),
        &d.y.v,
        &y_bounds(c, &d),
    );
    let u = unit_roundoff(c.dtype);
    let sub = subnormal_floor(c.dtype);
    let hb: Vec<f64> = d.h.v.iter().map(|h| 2.0 * u * h.abs() + sub).collect();
    let h = o.hidden.expect("keep_hidden");
    assert_eq!(h.shape(), &[c.x.rows, c.w1.rows]);
    assert_within(&format!("h, {what}"), &h.to_f32_vec(), &d.h.v, &hb);
}

const TOKENS: [usize; 4] = [1, 7, 33, 129];

#[test]
fn forward_matches_definition_every_activation_and_gate() {
    let mut rng = Rng::new(1);
    let mut seed = 100;
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for &a in &ACTIVATIONS {
            for gated in [false, true] {
                for (k, &tokens) in TOKENS.iter().enumerate() {
                    // Widths 8..=72, multiples of 8 or not (the CPU path takes any).
                    let d_model = 8 + rng.below(65);
                    let d_hidden = 8 + rng.below(65);
                    let biases = k % 2 == 0;
                    let residual = k % 3 != 1;
                    seed += 1;
                    let c = Case::random(
                        seed,
                        dtype,
                        tokens,
                        d_model,
                        d_hidden,
                        a,
                        Flags {
                            gated,
                            biases,
                            residual,
                        },
                    );
                    check_forward(&c, if k == 3 { 5 } else { 0 });
                }
            }
        }
    }
}

#[test]
fn every_bias_alone_and_widths_multiple_of_eight() {
    for (i, (b1, b2, b3)) in [
        (true, false, false),
        (false, true, false),
        (false, false, true),
        (false, false, false),
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = Case::random(
            7 + i as u64,
            DType::BF16,
            33,
            64,
            72,
            FfnActivation::Silu,
            Flags {
                gated: true,
                biases: true,
                residual: i % 2 == 0,
            },
        );
        if !b1 {
            c.b1 = None;
        }
        if !b2 {
            c.b2 = None;
        }
        if !b3 {
            c.b3 = None;
        }
        check_forward(&c, 8);
    }
}

#[test]
fn row_strided_x_gives_the_contiguous_result() {
    let c = Case::random(
        3,
        DType::F16,
        7,
        24,
        40,
        FfnActivation::GeluTanh,
        Flags {
            gated: false,
            biases: true,
            residual: true,
        },
    );
    let a = c.tensors(0);
    let b = c.tensors(13);
    let ya = ffn::forward(&inputs(&a), &opts(&c)).unwrap().y;
    let yb = ffn::forward(&inputs(&b), &opts(&c)).unwrap().y;
    assert_eq!(ya.to_f32_vec(), yb.to_f32_vec());
}

/// The gradients by their definition, in f64: returns (dx, dW1, db1, dW2, db2, dW3, db3)
/// with dh = dy W2, du = dh ∘ g ∘ act'(u), dg = dh ∘ act(u) where act' is a central
/// difference of `act` (step 1e-5, accurate to ~1e-10 on the smooth activations; ReLU's
/// kink is avoided by the tests' random values almost surely).
fn define_grads(c: &Case, d: &Defined, dy: &Mat) -> Vec<Vec<f64>> {
    let dh = dy.mul(&c.w2);
    let eps = 1e-5;
    let mut du = dh.clone();
    let mut dg = dh.clone();
    for i in 0..du.v.len() {
        let u = d.u.v[i];
        let deriv = (act(c.act, u + eps) - act(c.act, u - eps)) / (2.0 * eps);
        let g = d.g.as_ref().map_or(1.0, |g| g.v[i]);
        du.v[i] = dh.v[i] * g * deriv;
        dg.v[i] = dh.v[i] * act(c.act, u);
    }
    let mut dx = du.mul(&c.w1);
    if let Some(w3) = &c.w3 {
        let d3 = dg.mul(w3);
        for i in 0..dx.v.len() {
            dx.v[i] += d3.v[i];
        }
    }
    if c.residual {
        for i in 0..dx.v.len() {
            dx.v[i] += dy.v[i];
        }
    }
    let colsum = |m: &Mat| -> Vec<f64> {
        (0..m.cols)
            .map(|j| (0..m.rows).map(|r| m.at(r, j)).sum())
            .collect()
    };
    vec![
        dx.v,
        du.t().mul(&c.x).v,
        colsum(&du),
        dy.t().mul(&d.h).v,
        colsum(dy),
        dg.t().mul(&c.x).v,
        colsum(&dg),
    ]
}

fn check_backward(c: &Case) {
    let t = c.tensors(3);
    let mut rng = Rng::new(99);
    let dy = Mat::random(&mut rng, c.x.rows, c.x.cols, 1.0, c.dtype);
    let dyt = dy.tensor(c.dtype, 0);
    let g = ffn::backward(&ffn::BackwardInputs::new(inputs(&t), &dyt), &opts(c)).unwrap();
    let d = c.define();
    let want = define_grads(c, &d, &dy);
    let u = unit_roundoff(c.dtype);
    // Each gradient is rounded once; dW2 = dyᵀ h also sees h rounded once.
    let h_prop = dy.t().abs_mul(&d.h).v;
    let names = ["dx", "dW1", "db1", "dW2", "db2", "dW3", "db3"];
    let got = [
        Some(&g.dx),
        Some(&g.dw1),
        g.db1.as_ref(),
        Some(&g.dw2),
        g.db2.as_ref(),
        g.dw3.as_ref(),
        g.db3.as_ref(),
    ];
    let expected_present = [
        true,
        true,
        c.b1.is_some(),
        true,
        c.b2.is_some(),
        c.w3.is_some(),
        c.b3.is_some(),
    ];
    for k in 0..7 {
        assert_eq!(
            got[k].is_some(),
            expected_present[k],
            "{} presence",
            names[k]
        );
        let Some(gt) = got[k] else { continue };
        let scale = want[k].iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let bound: Vec<f64> = want[k]
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let hp = if k == 3 {
                    // h's rounding, subnormal floor included, through dyᵀ.
                    let dy_abs: f64 = (0..dy.rows).map(|r| dy.at(r, i / c.w1.rows).abs()).sum();
                    2.0 * u * h_prop[i] + subnormal_floor(c.dtype) * dy_abs
                } else {
                    0.0
                };
                // 1e-8 of the largest: the definition's finite-difference act'.
                2.0 * u * v.abs() + hp + 1e-8 * scale + subnormal_floor(c.dtype)
            })
            .collect();
        assert_within(
            &format!(
                "{} {:?} {:?} gated {}",
                names[k],
                c.dtype,
                c.act,
                c.w3.is_some()
            ),
            &gt.to_f32_vec(),
            &want[k],
            &bound,
        );
    }
}

#[test]
fn backward_matches_definition() {
    let mut seed = 500;
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for &a in &ACTIVATIONS {
            for gated in [false, true] {
                for &tokens in &[1, 7, 33] {
                    seed += 1;
                    let c = Case::random(
                        seed,
                        dtype,
                        tokens,
                        8 + (seed as usize * 7) % 41,
                        8 + (seed as usize * 13) % 57,
                        a,
                        Flags {
                            gated,
                            biases: tokens != 7,
                            residual: tokens != 33,
                        },
                    );
                    check_backward(&c);
                }
            }
        }
    }
}

/// L = Σ y ∘ dy of the f64 definition, for finite differences.
fn loss(c: &Case, dy: &Mat) -> f64 {
    let y = c.define().y;
    y.v.iter().zip(&dy.v).map(|(a, b)| a * b).sum()
}

#[test]
fn backward_matches_finite_differences() {
    for &a in &ACTIVATIONS {
        for gated in [false, true] {
            let c = Case::random(
                77,
                DType::F32,
                3,
                5,
                6,
                a,
                Flags {
                    gated,
                    biases: true,
                    residual: true,
                },
            );
            let mut rng = Rng::new(5);
            let dy = Mat::random(&mut rng, 3, 5, 1.0, DType::F32);
            let t = c.tensors(0);
            let g = ffn::backward(
                &ffn::BackwardInputs::new(inputs(&t), &dy.tensor(DType::F32, 0)),
                &opts(&c),
            )
            .unwrap();
            let eps = 1e-6;
            // Perturb one value of one input of a copy of the case.
            let fd = |f: &dyn Fn(&mut Case, f64)| -> f64 {
                let (mut p, mut m) = (c.clone(), c.clone());
                f(&mut p, eps);
                f(&mut m, -eps);
                (loss(&p, &dy) - loss(&m, &dy)) / (2.0 * eps)
            };
            let close = |what: &str, got: f32, want: f64| {
                assert!(
                    (got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{what} {a:?} gated {gated}: {got} vs finite difference {want}"
                );
            };
            let dx = g.dx.to_f32_vec();
            for i in 0..c.x.v.len() {
                close("dx", dx[i], fd(&|k, e| k.x.v[i] += e));
            }
            let dw1 = g.dw1.to_f32_vec();
            for i in 0..c.w1.v.len() {
                close("dW1", dw1[i], fd(&|k, e| k.w1.v[i] += e));
            }
            let dw2 = g.dw2.to_f32_vec();
            for i in 0..c.w2.v.len() {
                close("dW2", dw2[i], fd(&|k, e| k.w2.v[i] += e));
            }
            let db1 = g.db1.unwrap().to_f32_vec();
            for i in 0..db1.len() {
                close("db1", db1[i], fd(&|k, e| k.b1.as_mut().unwrap()[i] += e));
            }
            let db2 = g.db2.unwrap().to_f32_vec();
            for i in 0..db2.len() {
                close("db2", db2[i], fd(&|k, e| k.b2.as_mut().unwrap()[i] += e));
            }
            if gated {
                let dw3 = g.dw3.unwrap().to_f32_vec();
                for i in 0..dw3.len() {
                    close("dW3", dw3[i], fd(&|k, e| k.w3.as_mut().unwrap().v[i] += e));
                }
                let db3 = g.db3.unwrap().to_f32_vec();
                for i in 0..db3.len() {
                    close("db3", db3[i], fd(&|k, e| k.b3.as_mut().unwrap()[i] += e));
                }
            } else {
                assert!(g.dw3.is_none() && g.db3.is_none());
            }
        }
    }
}

#[test]
fn activation_names_round_trip() {
    for &a in &ACTIVATIONS {
        assert_eq!(FfnActivation::from_name(a.name()).unwrap(), a);
    }
    assert!(matches!(
        FfnActivation::from_name("swish"),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn library_activations_match_definition() {
    for &a in &ACTIVATIONS {
        for i in -40..=40 {
            let x = i as f64 * 0.15 + 0.01;
            let got = flashkernels::reference::ffn_activate(a, x);
            assert!((got - act(a, x)).abs() <= 1e-13, "{a:?}({x})");
            let d = flashkernels::reference::ffn_activation_derivative(a, x);
            let fd = (act(a, x + 1e-6) - act(a, x - 1e-6)) / 2e-6;
            assert!((d - fd).abs() <= 1e-7, "{a:?}'({x}): {d} vs {fd}");
        }
    }
    assert_eq!(round(DType::BF16, 1.0 + 2f64.powi(-9)), 1.0);
}

// ----------------------------------------------------------------------------- errors

fn lay(shape: &[usize]) -> Layout {
    Layout::contiguous(shape)
}

/// Validates a call described by shapes (all `dtype` unless overridden).
fn check(
    x: &Layout,
    w1: &Layout,
    w2: &Layout,
    w3: Option<&Layout>,
    b: [Option<&Layout>; 3],
    dtypes: [DType; 3],
) -> flashkernels::Result<ffn::FfnProblem> {
    ffn::validate(
        &FfnLayouts {
            x: (dtypes[0], x),
            w1: (dtypes[1], w1),
            w2: (dtypes[2], w2),
            w3: w3.map(|l| (dtypes[1], l)),
            b1: b[0].map(|l| (dtypes[0], l)),
            b2: b[1].map(|l| (dtypes[0], l)),
            b3: b[2].map(|l| (dtypes[0], l)),
        },
        &FfnOptions::default(),
    )
}

const BF: [DType; 3] = [DType::BF16; 3];

#[test]
fn errors_name_the_mismatch() {
    let (x, w1, w2) = (lay(&[7, 16]), lay(&[32, 16]), lay(&[16, 32]));
    let p = check(&x, &w1, &w2, None, [None; 3], BF).unwrap();
    assert_eq!(
        (p.tokens, p.d_model, p.d_hidden, p.gated),
        (7, 16, 32, false)
    );
    assert!(ffn::check_kernel_limits(&p).is_ok());

    let e = check(&x, &lay(&[32, 24]), &w2, None, [None; 3], BF).unwrap_err();
    assert!(
        matches!(&e, Error::ShapeMismatch { detail } if detail.contains("w1")),
        "{e}"
    );
    let e = check(&x, &w1, &lay(&[32, 16]), None, [None; 3], BF).unwrap_err();
    assert!(
        matches!(&e, Error::ShapeMismatch { detail } if detail.contains("w2")),
        "{e}"
    );
    let e = check(&x, &w1, &w2, Some(&lay(&[16, 16])), [None; 3], BF).unwrap_err();
    assert!(
        matches!(&e, Error::ShapeMismatch { detail } if detail.contains("w3")),
        "{e}"
    );
    let b16 = lay(&[16]);
    let b32 = lay(&[32]);
    let e = check(&x, &w1, &w2, None, [Some(&b16), None, None], BF).unwrap_err();
    assert!(
        matches!(&e, Error::ShapeMismatch { detail } if detail.contains("b1")),
        "{e}"
    );
    let e = check(&x, &w1, &w2, None, [None, Some(&b32), None], BF).unwrap_err();
    assert!(
        matches!(&e, Error::ShapeMismatch { detail } if detail.contains("b2")),
        "{e}"
    );
    let e = check(&x, &w1, &w2, None, [None, None, Some(&b32)], BF).unwrap_err();
    assert!(
        matches!(&e, Error::InvalidArgument(m) if m.contains("b3")),
        "{e}"
    );
    let e = check(
        &x,
        &w1,
        &w2,
        None,
        [None; 3],
        [DType::BF16, DType::F16, DType::BF16],
    )
    .unwrap_err();
    assert!(
        matches!(&e, Error::DTypeMismatch { detail } if detail.contains("w1")),
        "{e}"
    );

    let e = check(&lay(&[0, 16]), &w1, &w2, None, [None; 3], BF).unwrap_err();
    assert!(matches!(e, Error::Empty { name: "x", .. }), "{e}");
    let e = check(&lay(&[7, 16, 1]), &w1, &w2, None, [None; 3], BF).unwrap_err();
    assert!(matches!(e, Error::Rank { name: "x", .. }), "{e}");
    let col_major = Layout {
        shape: vec![7, 16],
        strides: vec![1, 7],
    };
    let e = check(&col_major, &w1, &w2, None, [None; 3], BF).unwrap_err();
    assert!(matches!(e, Error::NonUnitStride { name: "x", .. }), "{e}");

    // dy of the wrong shape or dtype.
    let e = ffn::validate_backward(&p, (DType::BF16, &lay(&[7, 32]))).unwrap_err();
    assert!(
        matches!(&e, Error::ShapeMismatch { detail } if detail.contains("dy")),
        "{e}"
    );
    let e = ffn::validate_backward(&p, (DType::F32, &lay(&[7, 16]))).unwrap_err();
    assert!(matches!(e, Error::DTypeMismatch { .. }), "{e}");
}

#[test]
fn kernel_limits_and_overflow() {
    // Widths that are not multiples of 8: fine on the CPU, refused for the kernels.
    let p = check(
        &lay(&[3, 12]),
        &lay(&[24, 12]),
        &lay(&[12, 24]),
        None,
        [None; 3],
        BF,
    )
    .unwrap();
    let e = ffn::check_kernel_limits(&p).unwrap_err();
    assert!(
        matches!(&e, Error::Unsupported(m) if m.contains("d_model = 12")),
        "{e}"
    );
    let p = check(
        &lay(&[3, 16]),
        &lay(&[20, 16]),
        &lay(&[16, 20]),
        None,
        [None; 3],
        BF,
    )
    .unwrap();
    let e = ffn::check_kernel_limits(&p).unwrap_err();
    assert!(
        matches!(&e, Error::Unsupported(m) if m.contains("d_hidden = 20")),
        "{e}"
    );
    let p = check(
        &lay(&[3, 16]),
        &lay(&[16, 16]),
        &lay(&[16, 16]),
        None,
        [None; 3],
        [DType::F32; 3],
    )
    .unwrap();
    let e = ffn::check_kernel_limits(&p).unwrap_err();
    assert!(matches!(e, Error::UnsupportedDType { .. }), "{e}");
    // Too many tokens for the kernels' 32-bit rows (the layouts are never allocated).
    let big = 1usize << 31;
    let p = check(
        &lay(&[big, 8]),
        &lay(&[8, 8]),
        &lay(&[8, 8]),
        None,
        [None; 3],
        BF,
    )
    .unwrap();
    let e = ffn::check_kernel_limits(&p).unwrap_err();
    assert!(
        matches!(&e, Error::TooLarge { what, .. } if what == "tokens"),
        "{e}"
    );
    // tokens x d_hidden overflows: a typed error, not a panic.
    let huge = 1usize << 40;
    let e = check(
        &lay(&[huge, 8]),
        &lay(&[huge, 8]),
        &lay(&[8, huge]),
        None,
        [None; 3],
        BF,
    )
    .unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
}

#[test]
fn api_errors_on_host_tensors() {
    let c = Case::random(
        9,
        DType::F32,
        4,
        8,
        16,
        FfnActivation::Relu,
        Flags {
            gated: false,
            biases: false,
            residual: false,
        },
    );
    let t = c.tensors(0);
    let bad_dy = Mat::random(&mut Rng::new(1), 4, 16, 1.0, DType::F32).tensor(DType::F32, 0);
    let e = ffn::backward(&ffn::BackwardInputs::new(inputs(&t), &bad_dy), &opts(&c)).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    let e = ffn::forward(&Inputs::new(&t.x, &t.w2, &t.w1), &opts(&c)).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
}
