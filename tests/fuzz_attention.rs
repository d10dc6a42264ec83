//! Fuzz suite (issue 13) of dense attention and Longformer, forward and backward, on host
//! tensors: arbitrary shapes, strides, dtypes, windows, scales, masks and global tokens;
//! Ok-and-equal to an f64 definition written here, or a typed Err, never a panic or a hang
//! (harness: tests/fuzz_common).

mod fuzz_common;

use fuzz_common::*;
use std::sync::atomic::Ordering;

use flashkernels::attention::{self, AttentionOptions};
use flashkernels::longformer::{self, LongformerOptions, TokenMask};
use flashkernels::HostTensor;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

// ---------------------------------------------------------------------------------------
// Dense attention.

fn window() -> impl Strategy<Value = Option<usize>> {
    prop_oneof![3 => Just(None), 4 => (0usize..6).prop_map(Some), 1 => huge().prop_map(Some)]
}

fn scale() -> impl Strategy<Value = Option<f32>> {
    prop_oneof![
        10 => Just(None),
        8 => (0.05f32..2.0).prop_map(Some),
        2 => prop::sample::select(vec![
            0.0f32, -0.0, -1.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY,
            1e-45, 1e-38, 1e30, f32::MAX,
        ]).prop_map(Some),
    ]
}

fn scale_is_moderate(s: Option<f32>) -> bool {
    s.is_none_or(|s| (1e-3..=1e3).contains(&s))
}

#[derive(Debug, Clone)]
struct AttnCase {
    q: TensorSpec,
    k: TensorSpec,
    v: TensorSpec,
    opts: AttentionOptions,
    dout_seed: u64,
}

/// Mostly consistent shapes (b, nq, h, d) / (b, nk, h_kv, d), sometimes one dimension
/// replaced by an arbitrary one.
fn attn_case() -> impl Strategy<Value = AttnCase> {
    (
        (
            dim(2),
            dim(6),
            dim(6),
            prop_oneof![8 => 1usize..=3, 1 => Just(0usize)],
            1usize..=3,
            dim(8),
        ),
        prop::option::weighted(0.1, (0usize..3, 0usize..4, dim(8))),
        prop::bool::weighted(0.9),
    )
        .prop_flat_map(|((b, nq, nk, hkv, g, d), mutate, same_dtype)| {
            let mut shapes = [
                vec![b, nq, hkv * g, d],
                vec![b, nk, hkv, d],
                vec![b, nk, hkv, d],
            ];
            if let Some((t, i, x)) = mutate {
                shapes[t][i] = x;
            }
            let [sq, sk, sv] = shapes;
            (
                spec(Just(sq)),
                spec(Just(sk)),
                spec(Just(sv)),
                (window(), window(), any::<bool>(), scale()),
                any::<u64>(),
                Just(same_dtype),
            )
        })
        .prop_map(
            |(q, mut k, mut v, (wl, wr, causal, scale), dout_seed, same)| {
                if same {
                    k.dtype = q.dtype;
                    v.dtype = q.dtype;
                }
                AttnCase {
                    q,
                    k,
                    v,
                    opts: AttentionOptions {
                        scale,
                        causal,
                        window_left: wl,
                        window_right: wr,
                    },
                    dout_seed,
                }
            },
        )
}

/// Keys [lo, hi) that query i of (nq, nk) sees, in i128 from the definition.
fn naive_keys(o: &AttentionOptions, i: usize, nq: usize, nk: usize) -> std::ops::Range<usize> {
    let diag = i as i128 + nk as i128 - nq as i128;
    let right = if o.causal { Some(0) } else { o.window_right };
    let lo = o.window_left.map_or(0, |w| diag - w as i128).max(0);
    let hi = right
        .map_or(nk as i128, |w| diag + w as i128 + 1)
        .min(nk as i128);
    if lo >= hi {
        0..0
    } else {
        lo as usize..hi as usize
    }
}

/// O, LSE and the probabilities of dense attention in f64.
#[allow(clippy::type_complexity)]
fn naive_attention(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    [b, nq, h, d]: [usize; 4],
    [nk, hkv]: [usize; 2],
    scale: f64,
    o: &AttentionOptions,
) -> (Vec<f64>, Vec<f64>, Vec<Vec<(usize, f64)>>) {
    let g = h / hkv;
    let mut out = vec![0.0; b * nq * h * d];
    let mut lse = vec![f64::NEG_INFINITY; b * h * nq];
    let mut probs = vec![Vec::new(); b * h * nq];
    for bi in 0..b {
        for hi in 0..h {
            let hk = hi / g;
            for i in 0..nq {
                let keys = naive_keys(o, i, nq, nk);
                if keys.is_empty() {
                    continue;
                }
                let qi = &q[((bi * nq + i) * h + hi) * d..][..d];
                let s: Vec<f64> = keys
                    .clone()
                    .map(|j| {
                        let kj = &k[((bi * nk + j) * hkv + hk) * d..][..d];
                        qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                let row = (bi * h + hi) * nq + i;
                lse[row] = m + z.ln();
                for (j, sj) in keys.zip(&s) {
                    let p = (sj - m).exp() / z;
                    probs[row].push((j, p));
                    let vj = &v[((bi * nk + j) * hkv + hk) * d..][..d];
                    for (acc, x) in out[((bi * nq + i) * h + hi) * d..][..d].iter_mut().zip(vj) {
                        *acc += p * x;
                    }
                }
            }
        }
    }
    (out, lse, probs)
}

fn attention_case(c: &AttnCase) -> Result<(), TestCaseError> {
    let (Some(q), Some(k), Some(v)) = (build(&c.q)?, build(&c.k)?, build(&c.v)?) else {
        return Ok(());
    };
    let what = format!(
        "attention {:?} {:?} {:?} {:?}",
        q.layout(),
        k.layout(),
        v.layout(),
        c.opts
    );
    let r = call(&what, || {
        attention::forward(&attention::Inputs::new(&q, &k, &v), &c.opts)
    })?;
    let f = match r {
        Ok(f) => f,
        Err(e) => return typed(&what, &e),
    };
    let [b, nq, h, d] = <[usize; 4]>::try_from(q.shape()).unwrap();
    let [_, nk, hkv, _] = <[usize; 4]>::try_from(k.shape()).unwrap();
    prop_assert_eq!(f.out.shape(), q.shape());
    prop_assert_eq!(f.lse.shape(), &[b, h, nq]);
    prop_assert!(c.q.dtype == c.k.dtype && c.q.dtype == c.v.dtype && h % hkv == 0);
    prop_assert!(
        small(q.shape(), 1 << 12) && small(k.shape(), 1 << 12),
        "accepted huge {}",
        what
    );
    let scale = c.opts.scale.map_or(1.0 / (d as f64).sqrt(), f64::from);
    prop_assert!(
        scale.is_finite() && scale > 0.0,
        "accepted scale {:?}",
        c.opts.scale
    );
    // Backward from the forward's O and LSE, with a random dO.
    let dout = HostTensor::from_vec(values(c.dout_seed, b * nq * h * d), &[b, nq, h, d])
        .unwrap()
        .to_contiguous(c.q.dtype);
    let rb = call(&what, || {
        attention::backward(
            &attention::BackwardInputs::new([&q, &k, &v, &f.out, &f.lse, &dout]),
            &c.opts,
        )
    })?;
    let g = rb.map_err(|e| TestCaseError::fail(format!("{what}: backward: {e}")))?;
    prop_assert_eq!(g.dq.shape(), q.shape());
    prop_assert_eq!(g.dk.shape(), k.shape());
    prop_assert_eq!(g.dv.shape(), v.shape());
    // A wrong LSE shape is an error.
    let bad_lse = HostTensor::from_vec(vec![0f32; b * h * nq + 1], &[b * h * nq + 1]).unwrap();
    let rb = call(&what, || {
        attention::backward(
            &attention::BackwardInputs::new([&q, &k, &v, &f.out, &bad_lse, &dout]),
            &c.opts,
        )
    })?;
    prop_assert!(rb.is_err());
    if !scale_is_moderate(c.opts.scale) {
        tally(|t| t.ok.fetch_add(1, Ordering::Relaxed));
        return Ok(());
    }
    let (qv, kv, vv) = (logical(&q), logical(&k), logical(&v));
    let (o, lse, probs) = naive_attention(&qv, &kv, &vv, [b, nq, h, d], [nk, hkv], scale, &c.opts);
    let tol = 4.0 * eps(c.q.dtype) + 1e-5;
    close(&format!("{what}: out"), &logical(&f.out), &o, tol)?;
    close(&format!("{what}: lse"), &logical(&f.lse), &lse, 1e-5)?;
    // dV = P^T dO (P from the definition).
    let dov = logical(&dout);
    let g_ = h / hkv;
    let mut dv = vec![0.0; b * nk * hkv * d];
    for bi in 0..b {
        for hi in 0..h {
            for i in 0..nq {
                for &(j, p) in &probs[(bi * h + hi) * nq + i] {
                    for x in 0..d {
                        dv[((bi * nk + j) * hkv + hi / g_) * d + x] +=
                            p * dov[((bi * nq + i) * h + hi) * d + x];
                    }
                }
            }
        }
    }
    close(
        &format!("{what}: dv"),
        &logical(&g.dv),
        &dv,
        8.0 * eps(c.q.dtype) + 1e-5,
    )?;
    for (name, t) in [("dq", &g.dq), ("dk", &g.dk)] {
        prop_assert!(
            logical(t).iter().all(|x| x.is_finite()),
            "{}: {} not finite",
            what,
            name
        );
    }
    tally(|t| t.checked.fetch_add(1, Ordering::Relaxed));
    Ok(())
}

#[test]
fn fuzz_attention() {
    fuzz("fuzz_attention", CASES, attn_case(), attention_case);
}

// ---------------------------------------------------------------------------------------
// Longformer.

#[derive(Debug, Clone)]
struct LfCase {
    q: TensorSpec,
    k: TensorSpec,
    v: TensorSpec,
    globals: Option<[TensorSpec; 3]>,
    window: usize,
    dilation: Vec<usize>,
    causal: bool,
    scale: Option<f32>,
    global_mask: Option<(Vec<usize>, Vec<bool>)>,
    padding_mask: Option<(Vec<usize>, Vec<bool>)>,
    dout_seed: u64,
}

fn mask(shape: [usize; 2]) -> impl Strategy<Value = Option<(Vec<usize>, Vec<bool>)>> {
    let n = if small(&shape, 64) {
        shape[0] * shape[1]
    } else {
        4
    };
    prop_oneof![
        6 => Just(None),
        6 => prop::collection::vec(prop::bool::weighted(0.2), n)
            .prop_map(move |v| Some((shape.to_vec(), v))),
        1 => (prop::collection::vec(dim(6), 0..=3), prop::collection::vec(any::<bool>(), 0..20))
            .prop_map(Some),
    ]
}

fn lf_case() -> impl Strategy<Value = LfCase> {
    (
        (dim(2), dim(9), 1usize..=2, dim(8)),
        prop::option::weighted(0.1, (0usize..3, 0usize..4, dim(8))),
        any::<bool>(),
    )
        .prop_flat_map(|((b, n, h, d), mutate, with_globals)| {
            let mut shapes = [vec![b, n, h, d], vec![b, n, h, d], vec![b, n, h, d]];
            if let Some((t, i, x)) = mutate {
                shapes[t][i] = x;
            }
            let [sq, sk, sv] = shapes;
            let base = vec![b, n, h, d];
            (
                (spec(Just(sq)), spec(Just(sk)), spec(Just(sv))),
                prop::option::weighted(
                    if with_globals { 0.5 } else { 0.01 },
                    (
                        spec(Just(base.clone())),
                        spec(Just(base.clone())),
                        spec(Just(base)),
                    ),
                ),
                prop_oneof![5 => 0usize..5, 1 => huge()],
                prop::collection::vec(
                    prop_oneof![16 => 1usize..4, 1 => Just(0usize), 1 => huge()],
                    1..=3,
                ),
                (any::<bool>(), scale()),
                mask([b, n]),
                mask([b, n]),
                any::<u64>(),
            )
        })
        .prop_map(
            |((q, k, v), g, window, dilation, (causal, scale), gm, pm, dout_seed)| {
                let (mut k, mut v) = (k, v);
                k.dtype = q.dtype;
                v.dtype = q.dtype;
                let globals = g.map(|(a, b, c)| {
                    let mut t = [a, b, c];
                    for x in &mut t {
                        x.dtype = q.dtype;
                    }
                    t
                });
                LfCase {
                    q,
                    k,
                    v,
                    globals,
                    window,
                    dilation,
                    causal,
                    scale,
                    global_mask: gm,
                    padding_mask: pm,
                    dout_seed,
                }
            },
        )
}

/// The Longformer rule from the module docs, in f64: O and LSE.
fn naive_longformer(
    x: [&[f64]; 6],
    [b, n, h, d]: [usize; 4],
    c: &LfCase,
    dil: &[usize],
    global: &[bool],
    padded: &[bool],
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0; b * n * h * d];
    let mut lse = vec![f64::NEG_INFINITY; b * h * n];
    let at = |bi: usize, i: usize, hi: usize| ((bi * n + i) * h + hi) * d;
    for bi in 0..b {
        for hi in 0..h {
            for i in 0..n {
                if padded[bi * n + i] {
                    continue;
                }
                let is_global = global[bi * n + i];
                let keys: Vec<usize> = (0..n)
                    .filter(|&j| !padded[bi * n + j] && (!c.causal || j <= i))
                    .filter(|&j| {
                        if is_global || global[bi * n + j] {
                            return true;
                        }
                        let (dj, di) = (j as i128 - i as i128, dil[hi] as i128);
                        dj % di == 0 && (dj / di).abs() <= c.window as i128
                    })
                    .collect();
                let (q, k, v) = if is_global {
                    (x[3], x[4], x[5])
                } else {
                    (x[0], x[1], x[2])
                };
                let qi = &q[at(bi, i, hi)..][..d];
                let s: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        qi.iter()
                            .zip(&k[at(bi, j, hi)..][..d])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                lse[(bi * h + hi) * n + i] = m + z.ln();
                for (&j, sj) in keys.iter().zip(&s) {
                    let p = (sj - m).exp() / z;
                    for (acc, y) in out[at(bi, i, hi)..][..d]
                        .iter_mut()
                        .zip(&v[at(bi, j, hi)..][..d])
                    {
                        *acc += p * y;
                    }
                }
            }
        }
    }
    (out, lse)
}

fn longformer_case(c: &LfCase) -> Result<(), TestCaseError> {
    let (Some(q), Some(k), Some(v)) = (build(&c.q)?, build(&c.k)?, build(&c.v)?) else {
        return Ok(());
    };
    let globals = match &c.globals {
        Some([a, b, g]) => match (build(a)?, build(b)?, build(g)?) {
            (Some(a), Some(b), Some(g)) => Some([a, b, g]),
            _ => return Ok(()),
        },
        None => None,
    };
    let gm = c
        .global_mask
        .as_ref()
        .map(|(s, v)| TokenMask::new(v.clone(), s));
    let pm = c
        .padding_mask
        .as_ref()
        .map(|(s, v)| TokenMask::new(v.clone(), s));
    let opts = LongformerOptions {
        window: c.window,
        dilation: c.dilation.clone(),
        causal: c.causal,
        scale: c.scale,
    };
    let inputs = longformer::Inputs::new(&q, &k, &v)
        .globals(
            globals
                .as_ref()
                .map(|[a, b, g]| longformer::GlobalProjections { q: a, k: b, v: g }),
        )
        .masks(gm.as_ref(), pm.as_ref());
    let what = format!(
        "longformer {:?} {:?} {:?}",
        q.layout(),
        opts,
        (gm.as_ref().map(|m| &m.shape), pm.as_ref().map(|m| &m.shape))
    );
    let f = match call(&what, || longformer::forward(&inputs, &opts))? {
        Ok(f) => f,
        Err(e) => return typed(&what, &e),
    };
    let [b, n, h, d] = <[usize; 4]>::try_from(q.shape()).unwrap();
    prop_assert!(small(q.shape(), 1 << 12), "accepted huge {}", what);
    prop_assert_eq!(f.out.shape(), q.shape());
    prop_assert_eq!(f.lse.shape(), &[b, h, n]);
    let dout = HostTensor::from_vec(values(c.dout_seed, b * n * h * d), &[b, n, h, d])
        .unwrap()
        .to_contiguous(c.q.dtype);
    let g = call(&what, || {
        longformer::backward(&inputs.backward(&f.out, &f.lse, &dout), &opts)
    })?
    .map_err(|e| TestCaseError::fail(format!("{what}: backward: {e}")))?;
    prop_assert_eq!(g.dq.shape(), q.shape());
    prop_assert_eq!(g.global.is_some(), globals.is_some());
    if !scale_is_moderate(c.scale) {
        tally(|t| t.ok.fetch_add(1, Ordering::Relaxed));
        return Ok(());
    }
    let dil: Vec<usize> = if c.dilation.len() == 1 {
        vec![c.dilation[0]; h]
    } else {
        c.dilation.clone()
    };
    let global = gm.map_or(vec![false; b * n], |m| m.values);
    let padded = pm.map_or(vec![false; b * n], |m| m.values);
    let (qv, kv, vv) = (logical(&q), logical(&k), logical(&v));
    let gv = globals
        .as_ref()
        .map(|[a, b, g]| [logical(a), logical(b), logical(g)]);
    let x6 = match &gv {
        Some([a, b, g]) => [&qv[..], &kv, &vv, a, b, g],
        None => [&qv[..], &kv, &vv, &qv, &kv, &vv],
    };
    let scale = c.scale.map_or(1.0 / (d as f64).sqrt(), f64::from);
    let (o, lse) = naive_longformer(x6, [b, n, h, d], c, &dil, &global, &padded, scale);
    close(
        &format!("{what}: out"),
        &logical(&f.out),
        &o,
        4.0 * eps(c.q.dtype) + 1e-5,
    )?;
    close(&format!("{what}: lse"), &logical(&f.lse), &lse, 1e-5)?;
    for t in [&g.dq, &g.dk, &g.dv] {
        prop_assert!(
            logical(t).iter().all(|x| x.is_finite()),
            "{}: gradient not finite",
            what
        );
    }
    tally(|t| t.checked.fetch_add(1, Ordering::Relaxed));
    Ok(())
}

#[test]
fn fuzz_longformer() {
    fuzz("fuzz_longformer", CASES, lf_case(), longformer_case);
}
