//! Fuzz suite of Linformer attention (issue 15), forward and backward on host tensors:
//! arbitrary shapes (B, N, H, H_kv, D, k, N_max) with dimensions replaced, added or
//! dropped, dtypes (one tensor of another), strides (random, heads-first with padded rows,
//! E and F transposed as lucidrains' `proj_k.T`), sharing levels (E / F heads 1 or H_kv, F
//! absent, F with the wrong heads, k or N_max), k = 0, N > N_max, H % H_kv != 0, key
//! padding masks (right, wrong shape, wrong value count, fully padded sequences), scales,
//! and the backward's O / LSE / kp / vp / dO of the wrong shape, dtype or strides; plus
//! consistent calls of any size, described without storage and validated. Every call is
//! Ok exactly when the inputs are valid by the rules written here, and then equal to the
//! f64 definition of tests/linformer_common; otherwise a typed Err (TooLarge when only
//! the size is wrong), never a panic or a hang (harness: tests/fuzz_common).

mod fuzz_common;
mod linformer_common;

use fuzz_common::*;
use std::sync::atomic::Ordering;

use flashkernels::linformer::{
    self, LinformerBackwardLayouts, LinformerLayouts, LinformerOptions, TokenMask, MAX_HEAD_DIM,
};
use flashkernels::{DType, Error, HostTensor, Layout};
use linformer_common::{define, define_backward, Case, Dims};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// The most elements a validated size product may have (the crate's
/// `common::MAX_ELEMENTS`, whose f64 buffers' byte counts cannot overflow).
const MAX_ELEMENTS: u128 = (isize::MAX as usize / 8) as u128;

/// Calls with a tensor or product above this many elements are validated only, never run.
const RUN_LIMIT: u128 = 1 << 14;

const NAMES: [&str; 5] = ["q", "k", "v", "e", "f"];

fn scale() -> impl Strategy<Value = Option<f32>> {
    prop_oneof![
        10 => Just(None),
        8 => (0.05f32..2.0).prop_map(Some),
        3 => prop::sample::select(vec![
            0.0f32, -0.0, -1.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY,
            1e-45, 1e-38, 1e30, f32::MAX,
        ]).prop_map(Some),
    ]
}

fn scale_is_moderate(s: Option<f32>) -> bool {
    s.is_none_or(|s| (1e-3..=1e3).contains(&s))
}

// ---------------------------------------------------------------------------------------
// Random calls.

/// How a tensor is laid out beyond its spec's random strides.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Special {
    /// The spec's strides.
    None,
    /// A rank-4 tensor (B, N, H, D) stored heads-first (B, H, N, D + pad).
    HeadsFirst(usize),
    /// A rank-3 projection (He, k, N_max) stored as (He, N_max, k).
    Transposed,
}

#[derive(Debug, Clone)]
struct Tspec {
    spec: TensorSpec,
    special: Special,
}

/// What the backward is given in place of one of its extra tensors.
#[derive(Debug, Clone, Copy, PartialEq)]
enum BadBackward {
    /// out, lse, kp, vp, dout: one dimension one larger.
    Shape(usize),
    /// out, lse, kp, vp, dout: another dtype (lse: f16; the others: not q's).
    DType(usize),
    /// out, kp, vp, dout: a head dim of stride 2.
    Stride(usize),
    /// lse of rank 2 (B·H, N).
    LseRank,
}

#[derive(Debug, Clone)]
enum MaskSpec {
    None,
    /// (B, N) flags; the listed sequences fully padded.
    Right(Vec<bool>, Vec<usize>),
    /// Some other shape with as many values.
    Shape(Vec<usize>, Vec<bool>),
    /// (B, N) with one value too many or too few.
    Count(bool),
}

#[derive(Debug, Clone)]
struct LinCase {
    /// q, k, v, e, f.
    specs: Vec<Tspec>,
    f_given: bool,
    mask: MaskSpec,
    scale: Option<f32>,
    dout: Tspec,
    bad: Option<BadBackward>,
}

/// A tensor of `shape`; unless `wild`, no stride past any storage, no short storage and
/// a unit-stride last dimension (most calls are then valid).
fn tspec(shape: Vec<usize>, special: Special, wild: bool) -> impl Strategy<Value = Tspec> {
    spec(Just(shape)).prop_map(move |mut spec| {
        if !wild {
            spec.short = false;
            for s in &mut spec.strides {
                if matches!(s, StrideKind::Huge(_)) {
                    *s = StrideKind::Contiguous;
                }
            }
            if let Some(last) = spec.strides.last_mut() {
                *last = StrideKind::Contiguous;
            }
        }
        Tspec { spec, special }
    })
}

fn special4() -> impl Strategy<Value = Special> {
    prop_oneof![6 => Just(Special::None), 2 => (0usize..3).prop_map(Special::HeadsFirst)]
}

fn special3() -> impl Strategy<Value = Special> {
    prop_oneof![6 => Just(Special::None), 2 => Just(Special::Transposed)]
}

/// Mostly consistent shapes; sometimes projection heads, k or N_max wrong, one tensor's
/// dimension replaced, added or dropped, one tensor of another dtype.
fn lin_case() -> impl Strategy<Value = LinCase> {
    (
        (
            dimw(2),
            dimw(5),
            prop_oneof![30 => 1usize..=2, 1 => Just(0usize)],
            prop_oneof![30 => 1usize..=3, 1 => Just(0usize)],
            prop_oneof![20 => dimw(6), 1 => prop::sample::select(vec![MAX_HEAD_DIM, MAX_HEAD_DIM + 1])],
            prop_oneof![20 => 1usize..=4, 2 => Just(0usize), 1 => huge()],
            // N_max - N: mostly >= 0; sometimes N_max < N, or huge.
            prop_oneof![20 => 0usize..3, 2 => Just(usize::MAX), 1 => huge()],
        ),
        // e heads: 1, H_kv or wrong; f: absent, 1, H_kv, wrong heads / k / N_max.
        (0usize..7, 0usize..12, prop::bool::weighted(0.05)),
        prop::option::weighted(0.12, (0usize..6, 0usize..4, 0usize..5, dim(6))),
        prop::option::weighted(0.05, 0usize..6),
        (
            prop::option::weighted(0.4, (any::<u64>(), 0usize..4)),
            0usize..12,
            scale(),
        ),
        prop::option::weighted(0.25, (0usize..11, 0usize..5)),
        (special4(), special4(), special4(), special3(), special3(), special4()),
        prop::bool::weighted(0.25),
    )
        .prop_flat_map(
            |((b, n, hkv, g, d, k, extra), (eh, fh, odd_heads), mutate, other, m, bad, sp, wild)| {
                let (m, kind, scale) = m;
                let n_max = if extra == usize::MAX {
                    n.saturating_sub(1)
                } else if extra >= 3 {
                    extra
                } else {
                    n.saturating_add(extra)
                };
                let mut h = hkv.saturating_mul(g);
                if odd_heads && hkv > 1 {
                    h += 1;
                }
                let heads = |c: usize| match c {
                    0..=2 => 1,
                    3..=5 => hkv,
                    _ => hkv + 1,
                };
                let e_heads = heads(eh);
                let (f_given, f_shape) = match fh {
                    0..=2 => (false, vec![e_heads, k, n_max]),
                    3..=5 => (true, vec![1, k, n_max]),
                    6..=8 => (true, vec![hkv, k, n_max]),
                    9 => (true, vec![hkv + 1, k, n_max]),
                    10 => (true, vec![e_heads, k.saturating_add(1), n_max]),
                    _ => (true, vec![e_heads, k, n_max.saturating_add(1)]),
                };
                let mut shapes = vec![
                    vec![b, n, h, d],
                    vec![b, n, hkv, d],
                    vec![b, n, hkv, d],
                    vec![e_heads, k, n_max],
                    f_shape,
                    vec![b, n, h, d],
                ];
                if let Some((i, how, at, v)) = mutate {
                    let s = &mut shapes[i];
                    match how {
                        0 | 1 => {
                            let at = at % s.len();
                            s[at] = v;
                        }
                        2 => {
                            let at = at % (s.len() + 1);
                            s.insert(at, v.clamp(1, 3));
                        }
                        _ => {
                            let at = at % s.len();
                            s.remove(at);
                        }
                    }
                }
                let mask = match m {
                    None => MaskSpec::None,
                    Some((seed, full)) => {
                        let bn = if small(&[b, n], 64) { b * n } else { 4 };
                        let vals: Vec<bool> = values(seed, bn).iter().map(|x| *x > 1.0).collect();
                        match kind {
                            0..=8 => MaskSpec::Right(
                                vals,
                                if full == 0 { vec![] } else { vec![full % b.max(1)] },
                            ),
                            9 => MaskSpec::Shape(
                                if seed % 2 == 0 { vec![n, b] } else { vec![bn] },
                                vals,
                            ),
                            10 => MaskSpec::Shape(vec![b, n, 1], vals),
                            _ => MaskSpec::Count(full % 2 == 0),
                        }
                    }
                };
                let specials = [sp.0, sp.1, sp.2, sp.3, sp.4, sp.5];
                let specs: Vec<_> = shapes
                    .into_iter()
                    .zip(specials)
                    .map(|(s, x)| tspec(s, x, wild))
                    .collect();
                (
                    specs,
                    Just((f_given, mask, other, scale, bad)),
                )
            },
        )
        .prop_map(|(mut specs, (f_given, mask, other, scale, bad))| {
            let dtype = specs[0].spec.dtype;
            for (i, s) in specs.iter_mut().enumerate() {
                s.spec.dtype = if other == Some(i) && i > 0 && i < 5 {
                    other_dtype(dtype)
                } else {
                    dtype
                };
            }
            let dout = specs.pop().expect("dout");
            let bad = bad.map(|(kind, which)| match kind {
                0..=3 => BadBackward::Shape(which),
                4..=6 => BadBackward::DType(which),
                7..=9 => BadBackward::Stride([0, 2, 3, 4][which % 4]),
                _ => BadBackward::LseRank,
            });
            LinCase {
                specs,
                f_given,
                mask,
                scale,
                dout,
                bad,
            }
        })
}

/// The spec's layout, or the special one when its rank fits.
fn layout_special(t: &Tspec) -> Layout {
    let s = &t.spec.shape;
    match (t.special, s.len()) {
        (Special::HeadsFirst(pad), 4) => {
            let [n, h, d] = [s[1], s[2], s[3]];
            let ld = d.saturating_add(pad);
            Layout {
                shape: s.clone(),
                strides: vec![
                    h.saturating_mul(n).saturating_mul(ld),
                    ld,
                    n.saturating_mul(ld),
                    1,
                ],
            }
        }
        (Special::Transposed, 3) => {
            let [_, k, nm] = [s[0], s[1], s[2]];
            Layout {
                shape: s.clone(),
                strides: vec![nm.saturating_mul(k), 1, k],
            }
        }
        _ => layout_of(&t.spec),
    }
}

/// Builds the tensor: the spec's (constructor checked by [`build`]), or the special
/// layout over exactly its span (must be accepted when small enough to build).
fn build_t(t: &Tspec) -> Result<Option<HostTensor>, TestCaseError> {
    let layout = layout_special(t);
    if t.special == Special::None || layout.strides == layout_of(&t.spec).strides {
        return build(&t.spec);
    }
    let span = span_u128(&layout);
    if span > MAX_STORAGE as u128 || numel_u128(&layout.shape) > MAX_STORAGE as u128 {
        return Ok(None);
    }
    let data = host_data(t.spec.dtype, &values(t.spec.seed, span as usize));
    let r = call("HostTensor::from_data", || {
        HostTensor::from_data(data, layout.clone())
    })?;
    match r {
        Ok(t) => Ok(Some(t)),
        Err(e) => Err(TestCaseError::fail(format!(
            "from_data refused {layout:?} over its span {span}: {e}"
        ))),
    }
}

/// Why a call must fail, or None when it must succeed: the validator's rules restated.
enum Verdict {
    /// Dims, e heads, f heads (of F, or of E when F = E).
    Valid(Dims, usize, usize),
    /// Valid but for the size: must be `TooLarge`.
    TooLarge,
    Invalid,
}

fn mask_of(m: &MaskSpec, b: usize, n: usize) -> Option<TokenMask> {
    match m {
        MaskSpec::None => None,
        MaskSpec::Right(v, full) => {
            let mut v = v.clone();
            if b > 0 && v.len() == b * n {
                for s in full.iter().map(|s| s % b) {
                    v[s * n..(s + 1) * n].iter_mut().for_each(|x| *x = true);
                }
            }
            Some(TokenMask::new(v, &[b, n]))
        }
        MaskSpec::Shape(s, v) => Some(TokenMask::new(v.clone(), s)),
        MaskSpec::Count(more) => {
            let len = if small(&[b, n], 64) { b * n } else { 4 };
            let len = if *more {
                len + 1
            } else {
                len.saturating_sub(1)
            };
            Some(TokenMask::new(vec![false; len], &[b, n]))
        }
    }
}

fn verdict(t: &[Option<&HostTensor>; 5], mask: Option<&TokenMask>, scale: Option<f32>) -> Verdict {
    let q = t[0].expect("q");
    let ranks = [4, 4, 4, 3, 3];
    let rows_ok = t.iter().zip(ranks).enumerate().all(|(i, (t, r))| {
        t.is_none_or(|t| {
            t.shape().len() == r
                && (i >= 3 || t.strides()[r - 1] == 1)
                && t.dtype() == q.dtype()
                && !t.shape().contains(&0)
        })
    });
    if !rows_ok {
        return Verdict::Invalid;
    }
    let (qs, ks, es) = (
        q.shape(),
        t[1].expect("k").shape(),
        t[3].expect("e").shape(),
    );
    let [b, n, h, d] = [qs[0], qs[1], qs[2], qs[3]];
    let hkv = ks[2];
    let [he, kk, nm] = [es[0], es[1], es[2]];
    let hf = t[4].map_or(he, |f| f.shape()[0]);
    let heads_ok = |x: usize| x == 1 || x == hkv;
    let f_ok = t[4].is_none_or(|f| f.shape()[1..] == [kk, nm]);
    let s = scale.unwrap_or(1.0 / (d as f32).sqrt());
    let mask_ok = mask
        .is_none_or(|m| m.shape == [b, n] && m.values.len() as u128 == (b as u128) * (n as u128));
    if ks != [b, n, hkv, d]
        || t[2].expect("v").shape() != ks
        || h % hkv != 0
        || d > MAX_HEAD_DIM
        || !heads_ok(he)
        || !heads_ok(hf)
        || !f_ok
        || n > nm
        || !(s.is_finite() && s > 0.0)
        || !mask_ok
    {
        return Verdict::Invalid;
    }
    let sizes = [
        numel_u128(qs),
        numel_u128(ks),
        numel_u128(es),
        numel_u128(&[hf, kk, nm]),
        numel_u128(&[b, kk, hkv, d]),
        numel_u128(&[b, h, n]),
    ];
    if sizes.iter().any(|&x| x > MAX_ELEMENTS) {
        return Verdict::TooLarge;
    }
    let dims = Dims {
        b,
        n,
        h,
        hkv,
        d,
        k: kk,
        n_max: nm,
    };
    Verdict::Valid(dims, he, hf)
}

fn layouts<'a>(t: &[Option<&'a HostTensor>; 5]) -> LinformerLayouts<'a> {
    let d = |i: usize| t[i].map(HostTensor::described);
    LinformerLayouts {
        q: d(0).expect("q"),
        k: d(1).expect("k"),
        v: d(2).expect("v"),
        e: d(3).expect("e"),
        f: d(4),
    }
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0f64, |a, x| a.max(x.abs()))
}

fn lin_case_run(c: &LinCase) -> Result<(), TestCaseError> {
    let mut built = Vec::new();
    for (i, s) in c.specs.iter().enumerate() {
        if i == 4 && !c.f_given {
            built.push(None);
            continue;
        }
        let t = build_t(s)?;
        if t.is_none() {
            return Ok(()); // refused by the constructor (or too big to store here)
        }
        built.push(t);
    }
    let t: [Option<&HostTensor>; 5] = std::array::from_fn(|i| built[i].as_ref());
    let q = t[0].expect("q");
    let (mb, mn) = (q.shape()[0], q.shape().get(1).copied().unwrap_or(1));
    let mask = mask_of(&c.mask, mb, mn);
    let opts = LinformerOptions::new().scale(c.scale);
    let what = format!(
        "linformer {:?} mask {:?} {}",
        c.scale,
        mask.as_ref().map(|m| (&m.shape, m.values.len())),
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
    let v = verdict(&t, mask.as_ref(), c.scale);
    let big = t
        .iter()
        .flatten()
        .any(|t| numel_u128(t.shape()) > RUN_LIMIT)
        || matches!(&v, Verdict::Valid(x, _, _) if numel_u128(&[x.b, x.k, x.hkv, x.d]) > RUN_LIMIT);
    if big {
        // Too big to compute here: validate only.
        let r = call(&what, || {
            linformer::validate(&layouts(&t), mask.as_ref(), &opts)
        })?;
        tally(|t| t.ok.fetch_add(1, Ordering::Relaxed));
        return match (r, v) {
            (Ok(p), Verdict::Valid(x, he, hf)) => {
                prop_assert_eq!(
                    (p.batch, p.seqlen, p.heads, p.heads_kv, p.head_dim, p.k_proj, p.n_max),
                    (x.b, x.n, x.h, x.hkv, x.d, x.k, x.n_max),
                    "{}",
                    what
                );
                prop_assert_eq!(
                    (p.e_heads, p.f_heads, p.shared_kv),
                    (he, hf, t[4].is_none())
                );
                Ok(())
            }
            (Ok(p), _) => Err(TestCaseError::fail(format!("{what}: accepted as {p:?}"))),
            (Err(e), Verdict::TooLarge) => {
                typed(&what, &e)?;
                prop_assert!(matches!(e, Error::TooLarge { .. }), "{}: {:?}", what, e);
                Ok(())
            }
            (Err(e), Verdict::Invalid) => typed(&what, &e),
            (Err(e), Verdict::Valid(..)) => {
                Err(TestCaseError::fail(format!("{what}: refused: {e}")))
            }
        };
    }
    let inputs = linformer::Inputs::new(
        q,
        t[1].expect("k"),
        t[2].expect("v"),
        t[3].expect("e"),
        t[4],
    )
    .key_padding_mask(mask.as_ref());
    let r = call(&what, || linformer::forward(&inputs, &opts))?;
    let (o, dims, he, hf) = match (r, v) {
        (Ok(o), Verdict::Valid(x, he, hf)) => (o, x, he, hf),
        (Ok(_), _) => return Err(TestCaseError::fail(format!("{what}: accepted"))),
        (Err(e), Verdict::Valid(..)) => {
            return Err(TestCaseError::fail(format!("{what}: refused: {e}")))
        }
        (Err(e), Verdict::TooLarge) => {
            typed(&what, &e)?;
            prop_assert!(matches!(e, Error::TooLarge { .. }), "{}: {:?}", what, e);
            return Ok(());
        }
        (Err(e), Verdict::Invalid) => return typed(&what, &e),
    };
    let dtype = q.dtype();
    let Dims {
        b, n, h, hkv, d, k, ..
    } = dims;
    prop_assert_eq!(o.out.shape(), &[b, n, h, d], "{}: out", what);
    prop_assert_eq!(o.lse.shape(), &[b, h, n], "{}: lse", what);
    prop_assert_eq!(o.kp.shape(), &[b, k, hkv, d], "{}: kp", what);
    prop_assert_eq!(o.vp.shape(), &[b, k, hkv, d], "{}: vp", what);
    prop_assert_eq!(
        [o.out.dtype(), o.lse.dtype(), o.kp.dtype(), o.vp.dtype()],
        [dtype, DType::F32, dtype, dtype]
    );
    let case = Case {
        dtype,
        dims,
        e_heads: he,
        f_heads: hf,
        shared: t[4].is_none(),
        scale: c.scale,
        q: logical(q),
        k: logical(t[1].expect("k")),
        v: logical(t[2].expect("v")),
        e: logical(t[3].expect("e")),
        f: t[4].map(logical),
        pad: mask.as_ref().map(|m| m.values.clone()),
    };
    let moderate = scale_is_moderate(c.scale);
    let u = eps(dtype);
    if moderate {
        let def = define(&case, Some(dtype));
        // kp, vp: the same sums in the same order, rounded once: equal.
        within(&format!("{what}: kp"), &logical(&o.kp), &def.kp, 0.0)?;
        within(&format!("{what}: vp"), &logical(&o.vp), &def.vp, 0.0)?;
        close(
            &format!("{what}: out"),
            &logical(&o.out),
            &def.out,
            2.0 * u + 1e-9,
        )?;
        close(&format!("{what}: lse"), &logical(&o.lse), &def.lse, 1e-6)?;
    }
    backward_check(c, &what, &t, &inputs, &o, &case, &opts)?;
    tally(|t| {
        if moderate {
            t.checked.fetch_add(1, Ordering::Relaxed)
        } else {
            t.ok.fetch_add(1, Ordering::Relaxed)
        }
    });
    Ok(())
}

/// The exact dkp, dvp of the attention backward from the given O, LSE, kp, vp, dO (for
/// the gradients' rounding bounds).
fn dproj(c: &Case, [out, lse, kp, vp, dout]: [&[f64]; 5]) -> (Vec<f64>, Vec<f64>) {
    let Dims {
        b, n, h, hkv, d, k, ..
    } = c.dims;
    let scale = c.scale_f64();
    let mut dkp = vec![0.0; b * k * hkv * d];
    let mut dvp = vec![0.0; b * k * hkv * d];
    for bb in 0..b {
        for hh in 0..h {
            let g = hh / (h / hkv);
            for i in 0..n {
                let at = ((bb * n + i) * h + hh) * d;
                let delta: f64 = (0..d).map(|x| dout[at + x] * out[at + x]).sum();
                for r in 0..k {
                    let kv = ((bb * k + r) * hkv + g) * d;
                    let s = scale * (0..d).map(|x| c.q[at + x] * kp[kv + x]).sum::<f64>();
                    let p = (s - lse[(bb * h + hh) * n + i]).exp();
                    let dp: f64 = (0..d).map(|x| dout[at + x] * vp[kv + x]).sum();
                    for x in 0..d {
                        dkp[kv + x] += scale * p * (dp - delta) * c.q[at + x];
                        dvp[kv + x] += p * dout[at + x];
                    }
                }
            }
        }
    }
    (dkp, dvp)
}

/// The backward of a valid forward call: with one of O, LSE, kp, vp, dO wrong a typed
/// Err; else Ok and equal to the definition (from the forward's O, LSE, kp, vp).
fn backward_check(
    c: &LinCase,
    what: &str,
    t: &[Option<&HostTensor>; 5],
    inputs: &linformer::Inputs<'_, HostTensor>,
    o: &linformer::LinformerOutput<HostTensor>,
    case: &Case,
    opts: &LinformerOptions,
) -> Result<(), TestCaseError> {
    let dims = case.dims;
    let dtype = case.dtype;
    let mut ds = c.dout.clone();
    ds.spec.shape = vec![dims.b, dims.n, dims.h, dims.d];
    ds.spec.dtype = dtype;
    ds.spec.short = false;
    if ds.spec.strides.len() != 4 {
        ds.spec.strides = vec![StrideKind::Contiguous; 4];
    }
    ds.spec.strides[3] = StrideKind::Contiguous;
    for s in &mut ds.spec.strides {
        if matches!(s, StrideKind::Huge(_)) {
            *s = StrideKind::Contiguous;
        }
    }
    let Some(dout) = build_t(&ds)? else {
        return Ok(()); // a dO layout the constructor refuses (a broadcast's huge stride)
    };
    let mut given = [&o.out, &o.lse, &o.kp, &o.vp, &dout];
    let bad_t;
    let what = format!(
        "{what}: backward, dout {:?}, bad {:?}",
        dout.layout(),
        c.bad
    );
    if let Some(bad) = c.bad {
        bad_t = match bad {
            BadBackward::Shape(i) => grown(given[i], i + 1, 7),
            BadBackward::DType(i) => {
                let to = if i == 1 {
                    DType::F16
                } else {
                    other_dtype(dtype)
                };
                given[i].to_contiguous(to)
            }
            BadBackward::Stride(i) => strided(given[i]),
            BadBackward::LseRank => {
                let (b, h, n) = (dims.b, dims.h, dims.n);
                HostTensor::from_fn(DType::F32, &[b * h, n], |_| 0.0).expect("small")
            }
        };
        let i = match bad {
            BadBackward::Shape(i) | BadBackward::DType(i) | BadBackward::Stride(i) => i,
            BadBackward::LseRank => 1,
        };
        given[i] = &bad_t;
        let [out, lse, kp, vp, dout] = given;
        let r = call(&what, || {
            linformer::backward(&inputs.backward(out, lse, kp, vp, dout), opts)
        })?;
        return match r {
            Ok(_) => Err(TestCaseError::fail(format!("{what}: accepted"))),
            Err(e) => typed(&what, &e),
        };
    }
    let [out, lse, kp, vp, dout] = given;
    let r = call(&what, || {
        linformer::backward(&inputs.backward(out, lse, kp, vp, dout), opts)
    })?;
    let g = r.map_err(|e| TestCaseError::fail(format!("{what}: refused: {e}")))?;
    let shape = |x: &HostTensor| x.shape().to_vec();
    prop_assert_eq!(shape(&g.dq), shape(t[0].expect("q")), "{}: dq", what);
    prop_assert_eq!(shape(&g.dk), shape(t[1].expect("k")), "{}: dk", what);
    prop_assert_eq!(shape(&g.dv), shape(t[2].expect("v")), "{}: dv", what);
    prop_assert_eq!(shape(&g.de), shape(t[3].expect("e")), "{}: de", what);
    prop_assert_eq!(g.df.as_ref().map(shape), t[4].map(shape), "{}: df", what);
    for x in [&g.dq, &g.dk, &g.dv, &g.de]
        .into_iter()
        .chain(g.df.as_ref())
    {
        prop_assert_eq!(x.dtype(), dtype, "{}: gradient dtype", what);
    }
    if !scale_is_moderate(c.scale) {
        return Ok(());
    }
    let vals = [out, lse, kp, vp, dout].map(logical);
    let refs = [&vals[0][..], &vals[1], &vals[2], &vals[3], &vals[4]];
    let want = define_backward(case, Some(dtype), refs);
    let (dkp, dvp) = dproj(case, refs);
    let Dims {
        b,
        n,
        hkv,
        d,
        k,
        n_max,
        ..
    } = dims;
    let u = eps(dtype);
    // A one-ulp difference in a rounded dkp / dvp element (the sums' order differs), and
    // each gradient's own rounding.
    let sub = 2f64.powi(-24);
    let (mk, mv) = (2.0 * u * max_abs(&dkp) + sub, 2.0 * u * max_abs(&dvp) + sub);
    let (me, mf) = (max_abs(&case.e), max_abs(case.f_values()));
    let (mkk, mvv) = (max_abs(&case.k), max_abs(&case.v));
    let sum_bhd = (b * hkv * d) as f64;
    let round_of = |w: &[f64]| u * max_abs(w) + sub;
    within(
        &format!("{what}: dq"),
        &logical(&g.dq),
        &want.dq,
        2.0 * round_of(&want.dq) + 1e-9 * max_abs(&want.dq),
    )?;
    within(
        &format!("{what}: dk"),
        &logical(&g.dk),
        &want.dk,
        k as f64 * me * mk + round_of(&want.dk) + 1e-9,
    )?;
    within(
        &format!("{what}: dv"),
        &logical(&g.dv),
        &want.dv,
        k as f64 * mf * mv + round_of(&want.dv) + 1e-9,
    )?;
    let de_bound = sum_bhd * (mkk * mk + if case.shared { mvv * mv } else { 0.0 });
    within(
        &format!("{what}: de"),
        &logical(&g.de),
        &want.de,
        de_bound + round_of(&want.de) + 1e-9,
    )?;
    if let (Some(df), Some(wdf)) = (&g.df, &want.df) {
        within(
            &format!("{what}: df"),
            &logical(df),
            wdf,
            sum_bhd * mvv * mv + round_of(wdf) + 1e-9,
        )?;
    }
    // Exact zeros: padded keys' dK, dV rows; dE, dF columns >= N.
    let (gdk, gdv, gde) = (logical(&g.dk), logical(&g.dv), logical(&g.de));
    for bb in 0..b {
        for j in 0..n {
            if case.padded(bb, j) {
                let at = (bb * n + j) * hkv * d;
                prop_assert!(
                    gdk[at..at + hkv * d]
                        .iter()
                        .chain(&gdv[at..at + hkv * d])
                        .all(|&x| x == 0.0),
                    "{}: padded key {} of sequence {} has a gradient",
                    what,
                    j,
                    bb
                );
            }
        }
    }
    let gdf = g.df.as_ref().map(logical);
    for p in std::iter::once(&gde).chain(gdf.as_ref()) {
        for (i, &x) in p.iter().enumerate() {
            prop_assert!(
                i % n_max < n || x == 0.0,
                "{}: projection gradient column {} >= N = {} is {}",
                what,
                i % n_max,
                n,
                x
            );
        }
    }
    Ok(())
}

#[test]
fn fuzz_linformer() {
    fuzz("fuzz_linformer", CASES, lin_case(), lin_case_run);
}

// ---------------------------------------------------------------------------------------
// Sizes only: consistent calls of any size, described (no storage), validated, with the
// backward's tensors validated against the problem.

fn size() -> impl Strategy<Value = usize> {
    prop_oneof![
        8 => 1usize..=64,
        1 => Just(0usize),
        2 => prop::sample::select(vec![
            MAX_HEAD_DIM,
            MAX_HEAD_DIM + 1,
            1 << 20,
            1 << 31,
            1 << 32,
            (1 << 40) + 8,
        ]),
        2 => huge(),
    ]
}

#[derive(Debug, Clone)]
struct SizeCase {
    /// b, n, hkv, d, k, n_max.
    sizes: [usize; 6],
    group: usize,
    /// E shared by every head (else one per K/V head).
    e_shared: bool,
    /// None: F = E; Some(true): F shared by every head; Some(false): one per K/V head.
    f: Option<bool>,
    dtype: DType,
    scale: Option<f32>,
}

fn size_case() -> impl Strategy<Value = SizeCase> {
    (
        [size(), size(), size(), size(), size(), size()],
        1usize..=4,
        any::<bool>(),
        prop::option::of(any::<bool>()),
        dtype(),
        prop_oneof![8 => Just(None), 1 => Just(Some(f32::NAN)), 1 => Just(Some(0.5f32))],
    )
        .prop_map(|(sizes, group, e_shared, f, dtype, scale)| SizeCase {
            sizes,
            group,
            e_shared,
            f,
            dtype,
            scale,
        })
}

fn size_case_run(c: &SizeCase) -> Result<(), TestCaseError> {
    let [b, n, hkv, d, k, n_max] = c.sizes;
    let Some(h) = hkv.checked_mul(c.group) else {
        return Ok(());
    };
    let he = if c.e_shared { 1 } else { hkv };
    let hf = match c.f {
        None => he,
        Some(true) => 1,
        Some(false) => hkv,
    };
    let (q, kv) = (contiguous(&[b, n, h, d]), contiguous(&[b, n, hkv, d]));
    let (e, f) = (contiguous(&[he, k, n_max]), contiguous(&[hf, k, n_max]));
    let dt = c.dtype;
    let l = LinformerLayouts {
        q: (dt, &q),
        k: (dt, &kv),
        v: (dt, &kv),
        e: (dt, &e),
        f: c.f.map(|_| (dt, &f)),
    };
    let opts = LinformerOptions::new().scale(c.scale);
    let what = format!("validate {c:?}");
    let products = [
        numel_u128(&[b, n, h, d]),
        numel_u128(&[b, n, hkv, d]),
        numel_u128(&[he, k, n_max]),
        numel_u128(&[hf, k, n_max]),
        numel_u128(&[b, k, hkv, d]),
        numel_u128(&[b, h, n]),
    ];
    let fits = products.iter().all(|&x| x <= MAX_ELEMENTS);
    let empty = [b, n, hkv, d, n_max].contains(&0);
    let scale_ok = c.scale.is_none_or(|s| s.is_finite() && s > 0.0);
    let valid = fits && !empty && k > 0 && d <= MAX_HEAD_DIM && n <= n_max && scale_ok;
    let r = call(&what, || linformer::validate(&l, None, &opts))?;
    match r {
        Ok(p) => {
            prop_assert!(valid, "{}: accepted", what);
            prop_assert_eq!(
                (p.batch, p.seqlen, p.heads, p.heads_kv, p.head_dim, p.k_proj, p.n_max),
                (b, n, h, hkv, d, k, n_max)
            );
            prop_assert_eq!((p.e_heads, p.f_heads, p.shared_kv), (he, hf, c.f.is_none()));
            tally(|t| t.ok.fetch_add(1, Ordering::Relaxed));
            // The backward's tensors of the problem's shapes pass; LSE in another dtype,
            // or kp one row longer, does not.
            let (qs, lse, proj) = (
                contiguous(&p.q_shape()),
                contiguous(&p.lse_shape()),
                contiguous(&p.proj_shape()),
            );
            let bl = LinformerBackwardLayouts {
                out: (dt, &qs),
                lse: (DType::F32, &lse),
                kp: (dt, &proj),
                vp: (dt, &proj),
                dout: (dt, &qs),
            };
            let r = call(&what, || linformer::validate_backward(&p, &bl))?;
            prop_assert!(r.is_ok(), "{}: backward refused: {:?}", what, r);
            let r = call(&what, || {
                linformer::validate_backward(
                    &p,
                    &LinformerBackwardLayouts {
                        lse: (dt, &lse),
                        ..bl
                    },
                )
            })?;
            prop_assert_eq!(r.is_err(), dt != DType::F32, "{}: lse {:?}", what, dt);
            let longer = contiguous(&[b, k.saturating_add(1), hkv, d]);
            let r = call(&what, || {
                linformer::validate_backward(
                    &p,
                    &LinformerBackwardLayouts {
                        kp: (dt, &longer),
                        ..bl
                    },
                )
            })?;
            match r {
                Ok(()) => {
                    return Err(TestCaseError::fail(format!(
                        "{what}: kp {longer:?} accepted"
                    )))
                }
                Err(e) => typed(&what, &e)?,
            }
            Ok(())
        }
        Err(e) => {
            typed(&what, &e)?;
            prop_assert!(!valid, "{}: refused: {:?}", what, e);
            // Whichever the validator meets first, among the reasons that apply.
            let why = match e {
                Error::Empty { .. } => empty || k == 0,
                Error::TooLarge { .. } => !fits,
                Error::InvalidArgument(_) => k == 0 || !scale_ok,
                Error::Unsupported(_) => d > MAX_HEAD_DIM,
                Error::ShapeMismatch { .. } => n > n_max,
                _ => false,
            };
            prop_assert!(why, "{}: {:?}", what, e);
            Ok(())
        }
    }
}

#[test]
fn fuzz_linformer_sizes() {
    fuzz("fuzz_linformer_sizes", CASES, size_case(), size_case_run);
}
