//! Fuzz suite (issue 13's, extended to issue 14's fused feed-forward block), forward and
//! backward on host tensors: arbitrary shapes, strides, dtypes, activations, gates and
//! biases (missing, extra, of the wrong shape), the residual, dy of the wrong shape or
//! dtype, empty and huge sizes. Every call is Ok exactly when the inputs are valid by the
//! rules written here, and then equal to an f64 definition written here; otherwise a typed
//! Err (TooLarge when only the size is wrong), never a panic or a hang (harness:
//! tests/fuzz_common).

mod fuzz_common;

use fuzz_common::*;
use std::sync::atomic::Ordering;

use flashkernels::ffn::problem::{KERNEL_MAX_D_HIDDEN, KERNEL_MAX_D_MODEL, KERNEL_MAX_TOKENS};
use flashkernels::ffn::{self, FfnActivation, FfnLayouts, FfnOptions};
use flashkernels::{DType, Error, HostTensor};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// The most elements a validated size product may have (the crate's
/// `common::MAX_ELEMENTS`, whose f64 buffers' byte counts cannot overflow).
const MAX_ELEMENTS: u128 = (isize::MAX as usize / 8) as u128;

/// Problems with a size product above this are validated only, never run.
const RUN_LIMIT: u128 = 1 << 16;

fn activation() -> impl Strategy<Value = FfnActivation> {
    prop::sample::select(vec![
        FfnActivation::Relu,
        FfnActivation::GeluTanh,
        FfnActivation::GeluErf,
        FfnActivation::Silu,
    ])
}

// ---------------------------------------------------------------------------------------
// The definition, in f64.

/// erf in f64: its Maclaurin series for |x| < 2.5 (terms below 1e-17 relative), else
/// 1 - erfc from erfc's continued fraction (60 levels, converged for x >= 2.5).
fn erf(x: f64) -> f64 {
    let a = x.abs();
    let v = if a < 2.5 {
        let (mut term, mut sum, mut n) = (a, a, 0.0f64);
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -a * a / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        let mut f = a;
        for k in (1..=60).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        1.0 - (-a * a).exp() / (f * std::f64::consts::PI.sqrt())
    };
    v.copysign(x)
}

fn act(a: FfnActivation, u: f64) -> f64 {
    match a {
        FfnActivation::Relu => u.max(0.0),
        FfnActivation::GeluTanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * u * (1.0 + (c * (u + 0.044715 * u * u * u)).tanh())
        }
        FfnActivation::GeluErf => 0.5 * u * (1.0 + erf(u / std::f64::consts::SQRT_2)),
        FfnActivation::Silu => u / (1.0 + (-u).exp()),
    }
}

/// d act / du (ReLU's is 0 at 0, as torch's).
fn act_grad(a: FfnActivation, u: f64) -> f64 {
    match a {
        FfnActivation::Relu => f64::from(u > 0.0),
        FfnActivation::GeluTanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let t = (c * (u + 0.044715 * u * u * u)).tanh();
            0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * u * u)
        }
        FfnActivation::GeluErf => {
            let pdf = (-0.5 * u * u).exp() / (2.0 * std::f64::consts::PI).sqrt();
            0.5 * (1.0 + erf(u / std::f64::consts::SQRT_2)) + u * pdf
        }
        FfnActivation::Silu => {
            let s = 1.0 / (1.0 + (-u).exp());
            s * (1.0 + u * (1.0 - s))
        }
    }
}

/// `v` rounded once to `dtype` (the hidden activation is stored in the dtype between
/// the two GEMMs: part of the op's definition).
fn round_to(dtype: DType, v: f64) -> f64 {
    match dtype {
        DType::F32 => v as f32 as f64,
        DType::F16 => half::f16::from_f64(v).to_f64(),
        DType::BF16 => half::bf16::from_f64(v).to_f64(),
    }
}

/// The logical values of one call's inputs, row-major f64.
struct Values {
    x: Vec<f64>,
    w1: Vec<f64>,
    w2: Vec<f64>,
    w3: Option<Vec<f64>>,
    b1: Option<Vec<f64>>,
    b2: Option<Vec<f64>>,
    b3: Option<Vec<f64>>,
}

/// Per (token, hidden unit): u = x·W1[j] + b1[j], g = x·W3[j] + b3[j] (1 when not
/// gated), h = round(act(u) g).
struct Hidden {
    u: Vec<f64>,
    g: Vec<f64>,
    h: Vec<f64>,
}

fn hidden(v: &Values, [t, dm, dh]: [usize; 3], a: FfnActivation, dtype: DType) -> Hidden {
    let mut out = Hidden {
        u: vec![0.0; t * dh],
        g: vec![1.0; t * dh],
        h: vec![0.0; t * dh],
    };
    for i in 0..t {
        for j in 0..dh {
            let dot = |w: &[f64]| {
                (0..dm)
                    .map(|c| v.x[i * dm + c] * w[j * dm + c])
                    .sum::<f64>()
            };
            let k = i * dh + j;
            out.u[k] = dot(&v.w1) + v.b1.as_ref().map_or(0.0, |b| b[j]);
            if let Some(w3) = &v.w3 {
                out.g[k] = dot(w3) + v.b3.as_ref().map_or(0.0, |b| b[j]);
            }
            out.h[k] = round_to(dtype, act(a, out.u[k]) * out.g[k]);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Random calls.

#[derive(Debug, Clone)]
struct FfnCase {
    /// x, w1, w2, w3, b1, b2, b3, dy.
    specs: Vec<TensorSpec>,
    /// Which of w3, b1, b2, b3 are passed.
    given: [bool; 4],
    opts: FfnOptions,
    keep_hidden: bool,
}

const NAMES: [&str; 8] = ["x", "w1", "w2", "w3", "b1", "b2", "b3", "dy"];

/// Mostly consistent shapes (tokens, d_model, d_hidden); sometimes one tensor's dimension
/// replaced, one added or one dropped, one tensor of another dtype, b3 without w3.
fn ffn_case() -> impl Strategy<Value = FfnCase> {
    (
        (dim(5), dim(6), dim(6)),
        (
            any::<bool>(),
            prop::bool::weighted(0.6),
            prop::bool::weighted(0.6),
            prop::bool::weighted(0.6),
        ),
        prop::option::weighted(0.15, (0usize..8, 0usize..4, dim(6))),
        prop::option::weighted(0.05, 0usize..8),
        (activation(), any::<bool>(), any::<bool>()),
    )
        .prop_flat_map(
            |((t, dm, dh), (gated, b1, b2, b3), mutate, other, (a, residual, keep))| {
                let mut shapes = vec![
                    vec![t, dm],
                    vec![dh, dm],
                    vec![dm, dh],
                    vec![dh, dm],
                    vec![dh],
                    vec![dm],
                    vec![dh],
                    vec![t, dm],
                ];
                if let Some((i, how, v)) = mutate {
                    let s = &mut shapes[i];
                    match how {
                        0 | 1 => {
                            let at = how % s.len();
                            s[at] = v;
                        }
                        2 => s.push(v),
                        _ => {
                            s.pop();
                        }
                    }
                }
                // b3 without w3 now and then (an error).
                let given = [
                    gated,
                    b1,
                    b2,
                    b3 && (gated || mutate.is_some_and(|m| m.0 == 6)),
                ];
                (
                    shapes
                        .into_iter()
                        .map(|s| spec(Just(s)))
                        .collect::<Vec<_>>(),
                    Just(given),
                    Just(other),
                    Just(FfnOptions::new(a).residual(residual)),
                    Just(keep),
                )
            },
        )
        .prop_map(|(mut specs, given, other, opts, keep_hidden)| {
            let dtype = specs[0].dtype;
            for (i, s) in specs.iter_mut().enumerate() {
                s.dtype = if other == Some(i) && i > 0 {
                    other_dtype(dtype)
                } else {
                    dtype
                };
            }
            FfnCase {
                specs,
                given,
                opts,
                keep_hidden,
            }
        })
}

/// Why a call must fail, or None when it must succeed: the validator's rules restated.
enum Verdict {
    Valid([usize; 3]),
    /// Valid but for the size: must be `TooLarge`.
    TooLarge,
    Invalid,
}

fn verdict(t: &[Option<&HostTensor>; 7]) -> Verdict {
    let x = t[0].expect("x");
    let ranks = [2, 2, 2, 2, 1, 1, 1];
    let rows_ok = t.iter().zip(ranks).all(|(t, r)| {
        t.is_none_or(|t| t.shape().len() == r && t.strides()[r - 1] == 1 && t.dtype() == x.dtype())
    });
    if !rows_ok || (t[6].is_some() && t[3].is_none()) {
        return Verdict::Invalid;
    }
    let (tok, dm, dh) = (x.shape()[0], x.shape()[1], t[1].expect("w1").shape()[0]);
    let want: [&[usize]; 7] = [
        &[tok, dm],
        &[dh, dm],
        &[dm, dh],
        &[dh, dm],
        &[dh],
        &[dm],
        &[dh],
    ];
    if t.iter()
        .zip(want)
        .any(|(t, w)| t.is_some_and(|t| t.shape() != w))
    {
        return Verdict::Invalid;
    }
    if tok == 0 || dm == 0 || dh == 0 {
        return Verdict::Invalid;
    }
    let (a, b, c) = (tok as u128, dm as u128, dh as u128);
    if a * b > MAX_ELEMENTS || a * c > MAX_ELEMENTS || b * c > MAX_ELEMENTS {
        return Verdict::TooLarge;
    }
    Verdict::Valid([tok, dm, dh])
}

fn layouts<'a>(t: &[Option<&'a HostTensor>; 7]) -> FfnLayouts<'a> {
    let d = |i: usize| t[i].map(HostTensor::described);
    FfnLayouts {
        x: d(0).expect("x"),
        w1: d(1).expect("w1"),
        w2: d(2).expect("w2"),
        w3: d(3),
        b1: d(4),
        b2: d(5),
        b3: d(6),
    }
}

/// The kernels' extra limits on a validated problem: Ok exactly within them.
fn check_kernel_verdict(what: &str, p: &ffn::FfnProblem) -> Result<(), TestCaseError> {
    let r = call(what, || ffn::check_kernel_limits(p))?;
    let fits = p.dtype != DType::F32
        && p.d_model % 8 == 0
        && p.d_hidden % 8 == 0
        && p.tokens <= KERNEL_MAX_TOKENS
        && p.d_model <= KERNEL_MAX_D_MODEL
        && p.d_hidden <= KERNEL_MAX_D_HIDDEN;
    match r {
        Ok(()) => prop_assert!(fits, "{}: kernels accepted {:?}", what, p),
        Err(e) => {
            prop_assert!(!fits, "{}: kernels refused {:?}: {}", what, p, e);
            typed(what, &e)?;
            if p.dtype != DType::F32 && p.d_model % 8 == 0 && p.d_hidden % 8 == 0 {
                prop_assert!(matches!(e, Error::TooLarge { .. }), "{}: {:?}", what, e);
            }
        }
    }
    Ok(())
}

fn ffn_case_run(c: &FfnCase) -> Result<(), TestCaseError> {
    let mut built = Vec::new();
    for (i, s) in c.specs.iter().enumerate() {
        let wanted = i < 3 || i == 7 || c.given[i - 3];
        built.push(if wanted { build(s)? } else { None });
        if wanted && built[i].is_none() {
            return Ok(()); // refused by the constructor
        }
    }
    let t: [Option<&HostTensor>; 7] = std::array::from_fn(|i| built[i].as_ref());
    let dy = built[7].as_ref().expect("dy");
    let what = format!(
        "ffn {:?} keep_hidden {} {}",
        c.opts,
        c.keep_hidden,
        NAMES
            .iter()
            .zip(&built)
            .filter_map(|(n, t)| t.as_ref().map(|t| format!(
                "{n} {:?} {:?}",
                t.dtype(),
                t.layout()
            )))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let v = verdict(&t);
    // Sizes too big to compute here: validate only.
    let [x, w1] = [t[0].expect("x"), t[1].expect("w1")];
    if x.shape().len() == 2 && w1.shape().len() == 2 {
        let (tok, dm, dh) = (
            x.shape()[0] as u128,
            x.shape()[1] as u128,
            w1.shape()[0] as u128,
        );
        if (tok * dm).max(tok * dh).max(dm * dh) > RUN_LIMIT {
            let r = call(&what, || ffn::validate(&layouts(&t), &c.opts))?;
            tally(|t| t.ok.fetch_add(1, Ordering::Relaxed));
            return match (r, v) {
                (Ok(p), Verdict::Valid(_)) => check_kernel_verdict(&what, &p),
                (Ok(p), _) => Err(TestCaseError::fail(format!("{what}: accepted as {p:?}"))),
                (Err(e), Verdict::TooLarge) => {
                    typed(&what, &e)?;
                    prop_assert!(matches!(e, Error::TooLarge { .. }), "{}: {:?}", what, e);
                    Ok(())
                }
                (Err(e), Verdict::Invalid) => typed(&what, &e),
                (Err(e), Verdict::Valid(_)) => {
                    Err(TestCaseError::fail(format!("{what}: refused: {e}")))
                }
            };
        }
    }
    let inputs = ffn::Inputs::new(x, w1, t[2].expect("w2"))
        .gate(t[3])
        .biases(t[4], t[5], t[6])
        .keep_hidden(c.keep_hidden);
    let f = call(&what, || ffn::forward(&inputs, &c.opts))?;
    let (f, s) = match (f, v) {
        (Ok(f), Verdict::Valid(s)) => (f, s),
        (Ok(_), _) => return Err(TestCaseError::fail(format!("{what}: accepted"))),
        (Err(e), Verdict::Valid(_)) => {
            return Err(TestCaseError::fail(format!("{what}: refused: {e}")))
        }
        (Err(e), _) => return typed(&what, &e),
    };
    let dtype = x.dtype();
    let [tok, dm, dh] = s;
    prop_assert_eq!(f.y.shape(), &[tok, dm], "{}: y", what);
    prop_assert_eq!(f.y.dtype(), dtype);
    prop_assert_eq!(f.hidden.is_some(), c.keep_hidden);
    let vals = Values {
        x: logical(x),
        w1: logical(w1),
        w2: logical(t[2].expect("w2")),
        w3: t[3].map(logical),
        b1: t[4].map(logical),
        b2: t[5].map(logical),
        b3: t[6].map(logical),
    };
    let hid = hidden(&vals, s, c.opts.activation, dtype);
    let mut y = vec![0.0; tok * dm];
    for i in 0..tok {
        for o in 0..dm {
            let residual = if c.opts.residual {
                vals.x[i * dm + o]
            } else {
                0.0
            };
            y[i * dm + o] = (0..dh)
                .map(|j| hid.h[i * dh + j] * vals.w2[o * dh + j])
                .sum::<f64>()
                + vals.b2.as_ref().map_or(0.0, |b| b[o])
                + residual;
        }
    }
    let tol = 4.0 * eps(dtype) + 1e-9;
    close(&format!("{what}: y"), &logical(&f.y), &y, tol)?;
    if let Some(h) = &f.hidden {
        prop_assert_eq!(h.shape(), &[tok, dh], "{}: hidden", what);
        close(&format!("{what}: hidden"), &logical(h), &hid.h, tol)?;
    }
    backward_check(c, &what, &t, dy, &vals, &hid, s)?;
    tally(|t| t.checked.fetch_add(1, Ordering::Relaxed));
    Ok(())
}

/// The backward of a valid forward call: Ok exactly when dy is (tokens, d_model) of x's
/// dtype with a unit last stride, and then equal to the definition.
fn backward_check(
    c: &FfnCase,
    what: &str,
    t: &[Option<&HostTensor>; 7],
    dy: &HostTensor,
    v: &Values,
    hid: &Hidden,
    [tok, dm, dh]: [usize; 3],
) -> Result<(), TestCaseError> {
    let x = t[0].expect("x");
    let inputs = ffn::Inputs::new(x, t[1].expect("w1"), t[2].expect("w2"))
        .gate(t[3])
        .biases(t[4], t[5], t[6]);
    let what = format!("{what}: backward, dy {:?} {:?}", dy.dtype(), dy.layout());
    let r = call(&what, || {
        ffn::backward(&ffn::BackwardInputs::new(inputs, dy), &c.opts)
    })?;
    let dy_ok = dy.shape() == [tok, dm] && dy.dtype() == x.dtype() && dy.strides()[1] == 1;
    let g = match r {
        Err(e) => {
            prop_assert!(!dy_ok, "{}: refused: {}", what, e);
            return typed(&what, &e);
        }
        Ok(g) => {
            prop_assert!(dy_ok, "{}: accepted", what);
            g
        }
    };
    let a = c.opts.activation;
    let dyv = logical(dy);
    let gated = v.w3.is_some();
    // dh = dy W2; du = dh g act'(u); dg = dh act(u).
    let (mut du, mut dg) = (vec![0.0; tok * dh], vec![0.0; tok * dh]);
    for i in 0..tok {
        for j in 0..dh {
            let k = i * dh + j;
            let dhv: f64 = (0..dm).map(|o| dyv[i * dm + o] * v.w2[o * dh + j]).sum();
            du[k] = dhv * hid.g[k] * act_grad(a, hid.u[k]);
            dg[k] = dhv * act(a, hid.u[k]);
        }
    }
    let mut dx = vec![0.0; tok * dm];
    for i in 0..tok {
        for col in 0..dm {
            let mut s: f64 = (0..dh).map(|j| du[i * dh + j] * v.w1[j * dm + col]).sum();
            if let Some(w3) = &v.w3 {
                s += (0..dh)
                    .map(|j| dg[i * dh + j] * w3[j * dm + col])
                    .sum::<f64>();
            }
            if c.opts.residual {
                s += dyv[i * dm + col];
            }
            dx[i * dm + col] = s;
        }
    }
    // aᵀ b over tokens, a (tok, r), b (tok, k) -> (r, k); column sums.
    let outer = |a: &[f64], r: usize, b: &[f64], k: usize| {
        let mut o = vec![0.0; r * k];
        for i in 0..tok {
            for p in 0..r {
                for q in 0..k {
                    o[p * k + q] += a[i * r + p] * b[i * k + q];
                }
            }
        }
        o
    };
    let colsum = |a: &[f64], k: usize| {
        (0..k)
            .map(|q| (0..tok).map(|i| a[i * k + q]).sum())
            .collect::<Vec<f64>>()
    };
    let tol = 4.0 * eps(x.dtype()) + 1e-9;
    let chk = |name: &str, got: Option<&HostTensor>, want: Option<(Vec<f64>, Vec<usize>)>| match (
        got, want,
    ) {
        (None, None) => Ok(()),
        (Some(g), Some((w, shape))) => {
            prop_assert_eq!(g.shape(), &shape[..], "{}: {} shape", what, name);
            prop_assert_eq!(g.dtype(), x.dtype(), "{}: {} dtype", what, name);
            close(&format!("{what}: {name}"), &logical(g), &w, tol)
        }
        (g, w) => Err(TestCaseError::fail(format!(
            "{what}: {name} given {}, expected {}",
            g.is_some(),
            w.is_some()
        ))),
    };
    chk("dx", Some(&g.dx), Some((dx, vec![tok, dm])))?;
    chk(
        "dw1",
        Some(&g.dw1),
        Some((outer(&du, dh, &v.x, dm), vec![dh, dm])),
    )?;
    chk(
        "dw2",
        Some(&g.dw2),
        Some((outer(&dyv, dm, &hid.h, dh), vec![dm, dh])),
    )?;
    let dw3 = gated.then(|| (outer(&dg, dh, &v.x, dm), vec![dh, dm]));
    chk("dw3", g.dw3.as_ref(), dw3)?;
    chk(
        "db1",
        g.db1.as_ref(),
        v.b1.is_some().then(|| (colsum(&du, dh), vec![dh])),
    )?;
    chk(
        "db2",
        g.db2.as_ref(),
        v.b2.is_some().then(|| (colsum(&dyv, dm), vec![dm])),
    )?;
    chk(
        "db3",
        g.db3.as_ref(),
        v.b3.is_some().then(|| (colsum(&dg, dh), vec![dh])),
    )?;
    Ok(())
}

#[test]
fn fuzz_ffn() {
    fuzz("fuzz_ffn", CASES, ffn_case(), ffn_case_run);
}

// ---------------------------------------------------------------------------------------
// Sizes only: consistent calls of any size, described (no storage), validated and held
// to the kernels' limits.

fn size() -> impl Strategy<Value = usize> {
    prop_oneof![
        6 => (1usize..=64).prop_map(|n| n * 8),
        2 => 1usize..=40,
        1 => Just(0usize),
        2 => prop::sample::select(vec![
            KERNEL_MAX_TOKENS,
            KERNEL_MAX_TOKENS + 8,
            KERNEL_MAX_D_MODEL,
            KERNEL_MAX_D_MODEL + 8,
            KERNEL_MAX_D_HIDDEN,
            KERNEL_MAX_D_HIDDEN + 8,
            1 << 31,
            1 << 32,
            (1 << 40) + 8,
        ]),
        2 => huge(),
    ]
}

#[test]
fn fuzz_ffn_sizes() {
    let case = (
        size(),
        size(),
        size(),
        any::<bool>(),
        dtype(),
        any::<bool>(),
    );
    fuzz(
        "fuzz_ffn_sizes",
        CASES,
        case,
        |&(tok, dm, dh, gated, dtype, bias)| {
            let (x, w1, w2) = (
                contiguous(&[tok, dm]),
                contiguous(&[dh, dm]),
                contiguous(&[dm, dh]),
            );
            let (bh, bm) = (contiguous(&[dh]), contiguous(&[dm]));
            let l = FfnLayouts {
                x: (dtype, &x),
                w1: (dtype, &w1),
                w2: (dtype, &w2),
                w3: gated.then_some((dtype, &w1)),
                b1: bias.then_some((dtype, &bh)),
                b2: bias.then_some((dtype, &bm)),
                b3: (bias && gated).then_some((dtype, &bh)),
            };
            let what =
                format!("validate tokens {tok} d_model {dm} d_hidden {dh} gated {gated} {dtype:?}");
            let r = call(&what, || ffn::validate(&l, &FfnOptions::default()))?;
            let (a, b, c) = (tok as u128, dm as u128, dh as u128);
            let fits = a * b <= MAX_ELEMENTS && a * c <= MAX_ELEMENTS && b * c <= MAX_ELEMENTS;
            match r {
                Ok(p) => {
                    prop_assert!(tok > 0 && dm > 0 && dh > 0 && fits, "{}: accepted", what);
                    prop_assert_eq!(
                        (p.tokens, p.d_model, p.d_hidden, p.gated),
                        (tok, dm, dh, gated)
                    );
                    tally(|t| t.ok.fetch_add(1, Ordering::Relaxed));
                    check_kernel_verdict(&what, &p)
                }
                Err(e) => {
                    typed(&what, &e)?;
                    let empty = tok == 0 || dm == 0 || dh == 0;
                    // Whichever the validator meets first (x before w1 before w2).
                    let why = match e {
                        Error::Empty { .. } => empty,
                        Error::TooLarge { .. } => !fits,
                        _ => false,
                    };
                    prop_assert!(why, "{}: {:?}", what, e);
                    Ok(())
                }
            }
        },
    );
}
