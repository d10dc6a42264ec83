//! Reformer LSH attention's CPU reference and Rust API (issue 16) against an f64
//! definition written in tests/reformer_common (independent of the library): hashing,
//! HF's sort key over the concatenated rounds, circular chunk look-back across rounds,
//! masks, logsumexp combination, unsort; given buckets reproduce O; the backward
//! against central finite differences of the definition with the buckets fixed; bad
//! inputs are typed errors; Hugging Face's LSHSelfAttention golden fixtures.

#![allow(clippy::needless_range_loop)]

mod reformer_common;

use flashkernels::reference::{try_reformer, try_reformer_backward, ReformerInputs};
use flashkernels::reformer::{
    self, validate, Buckets, ReformerLayouts, ReformerOptions, ReformerProblem, TokenMask,
};
use flashkernels::{DType, Error, HostTensor, Layout};
use reformer_common::{
    define, define_buckets, f64s, inputs, load_fixtures, max_abs, max_abs_diff, tensor, Case, Rng,
};

/// (b, n, h, d), (n_hashes, n_buckets, c), (before, after), causal, padded.
type Shape = (
    (usize, usize, usize, usize),
    (usize, usize, usize),
    (usize, usize),
    bool,
    bool,
);

const SHAPES: [Shape; 10] = [
    ((2, 16, 2, 8), (1, 4, 4), (1, 0), false, false),
    ((1, 24, 3, 8), (3, 6, 4), (1, 0), true, false),
    ((2, 32, 2, 8), (3, 8, 8), (1, 0), false, true),
    ((2, 24, 1, 16), (2, 4, 6), (1, 1), true, true),
    ((1, 12, 2, 8), (2, 4, 12), (1, 0), false, false), // N = C: full attention
    ((2, 7, 2, 4), (3, 4, 16), (1, 0), true, true),    // N < C: full attention
    ((1, 16, 2, 8), (4, 2, 4), (2, 1), false, false),  // windows wrap onto themselves
    ((1, 8, 1, 8), (1, 8, 4), (3, 2), true, false),    // 2 chunks, 6 visits
    ((3, 20, 2, 12), (2, 10, 5), (0, 0), false, true), // no look-back
    ((1, 48, 2, 8), (3, 8, 16), (1, 0), true, false),
];

fn cases(dtype: DType) -> Vec<Case> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(k, &(dims, hash, chunks, causal, pad))| {
            Case::random(k as u64 + 7, dtype, dims, hash, chunks, causal, pad)
        })
        .collect()
}

fn problem(c: &Case) -> ReformerProblem {
    let s = Layout::contiguous(&[c.b, c.n, c.h, c.d]);
    let r = Layout::contiguous(&[c.h, c.d, c.n_hashes, c.n_buckets / 2]);
    let m = c.mask();
    let t = ReformerLayouts {
        qk: (c.dtype, &s),
        v: (c.dtype, &s),
        rotations: (DType::F32, &r),
    };
    validate(&t, m.as_ref(), &c.opts()).unwrap()
}

fn ref_inputs(c: &Case) -> ReformerInputs<'_> {
    ReformerInputs {
        qk: &c.qk,
        v: &c.v,
        rotations: &c.rot,
    }
}

#[test]
fn reference_matches_the_definition_in_f64() {
    for c in cases(DType::F32) {
        let p = problem(&c);
        let f = try_reformer(&p, &ref_inputs(&c), None).unwrap();
        let want_b = c.hashed().then(|| define_buckets(&c));
        assert_eq!(f.buckets, want_b, "{c:?}");
        let want = define(&c, &c.qk, &c.v, None);
        let err = max_abs_diff(&f.out, &want);
        assert!(err <= 1e-12 * (1.0 + max_abs(&want)), "{err:e} for {c:?}");
        assert_eq!(f.lse.len(), c.b * c.h * p.lse_rounds() * c.n);
        // Given buckets: the same output, bit for bit.
        if let Some(bk) = &f.buckets {
            let g = try_reformer(&p, &ref_inputs(&c), Some(bk)).unwrap();
            assert_eq!(g.out, f.out);
        }
    }
}

#[test]
fn host_api_matches_the_definition_per_dtype() {
    for (dtype, tol) in [(DType::F32, 2e-6), (DType::F16, 2e-3), (DType::BF16, 1e-2)] {
        for c in cases(dtype) {
            let t = c.tensors();
            let m = c.mask();
            let o = reformer::forward(&inputs(&t, m.as_ref(), None), &c.opts()).unwrap();
            assert_eq!(o.out.dtype(), dtype);
            assert_eq!(o.lse.dtype(), DType::F32);
            let want = define(&c, &c.qk, &c.v, None);
            let err = max_abs_diff(&f64s(&o.out), &want);
            assert!(
                err <= tol * (1.0 + max_abs(&want)),
                "{dtype}: {err:e} {c:?}"
            );
            match &o.buckets {
                Some(b) => {
                    assert_eq!(b.shape, [c.b, c.h, c.n_hashes, c.n]);
                    assert_eq!(b.values, define_buckets(&c));
                    // Passing them back reproduces O exactly.
                    let again =
                        reformer::forward(&inputs(&t, m.as_ref(), Some(b)), &c.opts()).unwrap();
                    assert_eq!(again.out.to_f32_vec(), o.out.to_f32_vec());
                }
                None => assert!(!c.hashed()),
            }
        }
    }
}

#[test]
fn other_buckets_are_used_as_given() {
    let c = &cases(DType::F32)[2];
    let mut r = Rng(99);
    let per_round = c.n_buckets + 1; // the case is padded
    let bk: Vec<i32> = (0..c.b * c.h * c.n_hashes * c.n)
        .map(|at| {
            let round = (at / c.n) % c.n_hashes;
            (round * per_round + (r.next_u64() as usize % per_round)) as i32
        })
        .collect();
    let t = c.tensors();
    let m = c.mask();
    let given = Buckets::new(bk.clone(), [c.b, c.h, c.n_hashes, c.n]);
    let o = reformer::forward(&inputs(&t, m.as_ref(), Some(&given)), &c.opts()).unwrap();
    assert_eq!(o.buckets.as_ref(), Some(&given));
    let want = define(c, &c.qk, &c.v, Some(&bk));
    assert!(max_abs_diff(&f64s(&o.out), &want) <= 2e-6 * (1.0 + max_abs(&want)));
}

/// Σ out · w of the definition (buckets fixed).
fn loss(c: &Case, qk: &[f64], v: &[f64], bk: Option<&[i32]>, w: &[f64]) -> f64 {
    define(c, qk, v, bk).iter().zip(w).map(|(a, b)| a * b).sum()
}

#[test]
fn backward_matches_finite_differences() {
    for c in cases(DType::F32) {
        let p = problem(&c);
        let x = ref_inputs(&c);
        let f = try_reformer(&p, &x, None).unwrap();
        let mut r = Rng(5);
        let w: Vec<f64> = (0..c.qk.len()).map(|_| r.unit()).collect();
        let g = try_reformer_backward(&p, &x, f.buckets.as_deref(), &f.out, &f.lse, &w).unwrap();
        let bk = f.buckets.as_deref();
        let eps = 1e-6;
        let fd = |which: usize, at: usize| {
            let (mut qk, mut v) = (c.qk.clone(), c.v.clone());
            let t = if which == 0 { &mut qk } else { &mut v };
            t[at] += eps;
            let plus = loss(&c, &qk, &v, bk, &w);
            let t = if which == 0 { &mut qk } else { &mut v };
            t[at] -= 2.0 * eps;
            (plus - loss(&c, &qk, &v, bk, &w)) / (2.0 * eps)
        };
        let scale = 1.0 + max_abs(&g.dqk).max(max_abs(&g.dv));
        // Every element on small cases, a stride through the larger ones.
        let step = (c.qk.len() / 97).max(1);
        for at in (0..c.qk.len()).step_by(step) {
            for (which, got) in [(0, g.dqk[at]), (1, g.dv[at])] {
                let want = fd(which, at);
                assert!(
                    (got - want).abs() <= 1e-6 * scale,
                    "{} [{at}]: {got} vs fd {want} for {c:?}",
                    ["dqk", "dv"][which]
                );
            }
        }
    }
}

#[test]
fn host_backward_rounds_the_reference_once() {
    for c in cases(DType::F32).into_iter().step_by(2) {
        let t = c.tensors();
        let m = c.mask();
        let i = inputs(&t, m.as_ref(), None);
        let o = reformer::forward(&i, &c.opts()).unwrap();
        let mut r = Rng(11);
        let w: Vec<f64> = (0..c.qk.len()).map(|_| r.unit()).collect();
        let dout = tensor(DType::F32, &w, &[c.b, c.n, c.h, c.d]);
        let i = i.buckets(o.buckets.as_ref());
        let g = reformer::backward(&i.backward(&o.out, &o.lse, &dout), &c.opts()).unwrap();
        // Without given buckets: hashed again, the same gradients.
        let i2 = inputs(&t, m.as_ref(), None);
        let g2 = reformer::backward(&i2.backward(&o.out, &o.lse, &dout), &c.opts()).unwrap();
        assert_eq!(g.dqk.to_f32_vec(), g2.dqk.to_f32_vec());
        let p = problem(&c);
        let f = try_reformer(&p, &ref_inputs(&c), None).unwrap();
        let want = try_reformer_backward(&p, &ref_inputs(&c), None, &f.out, &f.lse, &w).unwrap();
        for (got, want) in [(&g.dqk, &want.dqk), (&g.dv, &want.dv)] {
            let err = max_abs_diff(&f64s(got), want);
            assert!(err <= 1e-5 * (1.0 + max_abs(want)), "{err:e} for {c:?}");
        }
    }
}

fn lay(shape: &[usize]) -> Layout {
    Layout::contiguous(shape)
}

fn check(
    qk: &[usize],
    v: &[usize],
    rot: &[usize],
    dt: [DType; 3],
    mask: Option<&TokenMask>,
    o: &ReformerOptions,
) -> Result<ReformerProblem, Error> {
    let (a, b, r) = (lay(qk), lay(v), lay(rot));
    validate(
        &ReformerLayouts {
            qk: (dt[0], &a),
            v: (dt[1], &b),
            rotations: (dt[2], &r),
        },
        mask,
        o,
    )
}

#[test]
fn bad_inputs_are_typed_errors() {
    let f = [DType::F32; 3];
    let (s, rs) = ([2, 16, 2, 8], [2, 8, 3, 2]);
    let o = ReformerOptions::new(4);
    assert!(check(&s, &s, &rs, f, None, &o).is_ok());
    // Rotations in another dtype are fine.
    assert!(check(&s, &s, &rs, [DType::F32, DType::F32, DType::BF16], None, &o).is_ok());
    let err = |r: Result<ReformerProblem, Error>| r.unwrap_err();
    assert!(matches!(
        err(check(&s, &s, &rs, f, None, &o.n_buckets(Some(5)))),
        Error::InvalidArgument(m) if m.contains("even")
    ));
    assert!(matches!(
        err(check(&s, &s, &rs, f, None, &o.n_buckets(Some(8)))),
        Error::ShapeMismatch { .. }
    ));
    assert!(check(&s, &s, &rs, f, None, &o.n_buckets(Some(4))).is_ok());
    for bad in [[2, 4, 3, 2], [3, 8, 3, 2]] {
        assert!(matches!(
            err(check(&s, &s, &bad, f, None, &o)),
            Error::ShapeMismatch { .. }
        ));
    }
    assert!(matches!(
        err(check(&s, &s, &[2, 8, 3], f, None, &o)),
        Error::Rank { .. }
    ));
    assert!(matches!(
        err(check(&s, &s, &[2, 8, 0, 2], f, None, &o)),
        Error::Empty { .. }
    ));
    assert!(matches!(
        err(check(&s, &s, &[2, 8, 3, 0], f, None, &o)),
        Error::Empty { .. }
    ));
    assert!(matches!(
        err(check(&s, &s, &rs, f, None, &ReformerOptions::new(0))),
        Error::InvalidArgument(m) if m.contains("chunk_length = 0")
    ));
    assert!(matches!(
        err(check(&s, &s, &rs, f, None, &ReformerOptions::new(5))),
        Error::InvalidArgument(m) if m.contains("not a multiple")
    ));
    // N <= C needs no multiple.
    assert!(check(&s, &s, &rs, f, None, &ReformerOptions::new(17)).is_ok());
    assert!(matches!(
        err(check(&s, &[2, 16, 2, 4], &rs, f, None, &o)),
        Error::ShapeMismatch { .. }
    ));
    assert!(matches!(
        err(check(
            &s,
            &s,
            &rs,
            [DType::F32, DType::F16, DType::F32],
            None,
            &o
        )),
        Error::DTypeMismatch { .. }
    ));
    assert!(matches!(
        err(check(&[2, 0, 2, 8], &[2, 0, 2, 8], &rs, f, None, &o)),
        Error::Empty { .. }
    ));
    let m = TokenMask::new(vec![false; 15], &[1, 15]);
    assert!(matches!(
        err(check(&s, &s, &rs, f, Some(&m), &o)),
        Error::ShapeMismatch { .. }
    ));
    // Bucket values past i32.
    assert!(matches!(
        err(check(
            &[1, 16, 1, 8],
            &[1, 16, 1, 8],
            &[1, 8, 1 << 20, 1 << 12],
            f,
            None,
            &o
        )),
        Error::TooLarge { .. }
    ));
    assert!(matches!(
        err(check(&s, &s, &rs, f, None, &o.chunks(usize::MAX, 1))),
        Error::TooLarge { .. }
    ));
    // A window wraps around the chunks, so a tiny input with a vast window would cost
    // the window for every query: each side is capped (found by tests/fuzz_reformer.rs).
    let cap = flashkernels::reformer::MAX_CHUNKS_AROUND;
    for (before, after) in [(cap + 1, 0), (0, cap + 1), (1 << 40, 0)] {
        assert!(matches!(
            err(check(&s, &s, &rs, f, None, &o.chunks(before, after))),
            Error::TooLarge { what, .. } if what.starts_with("chunks_")
        ));
    }
    assert!(check(&s, &s, &rs, f, None, &o.chunks(cap, cap)).is_ok());
    // Unhashed (N <= C) calls use no chunk window: a huge C is fine.
    assert!(check(&s, &s, &rs, f, None, &ReformerOptions::new(1 << 62)).is_ok());
}

#[test]
fn bad_buckets_and_backward_tensors_are_typed_errors() {
    let c = &cases(DType::F32)[1]; // (1, 24, 3, 8), 3 hashes, 6 buckets, C 4, no padding
    let t = c.tensors();
    let shape = [c.b, c.h, c.n_hashes, c.n];
    let good = define_buckets(c);
    let run = |b: &Buckets| reformer::forward(&inputs(&t, None, Some(b)), &c.opts()).map(|_| ());
    assert!(run(&Buckets::new(good.clone(), shape)).is_ok());
    let mut bad = good.clone();
    bad[c.n] = 0; // round 1 holding a round-0 bucket
    assert!(
        matches!(run(&Buckets::new(bad, shape)), Err(Error::InvalidArgument(m)) if m.contains("round 1"))
    );
    let mut bad = good.clone();
    bad[0] = -1;
    assert!(matches!(
        run(&Buckets::new(bad, shape)),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        run(&Buckets::new(good.clone(), [c.b, c.h, 2, c.n])),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        run(&Buckets::new(good[1..].to_vec(), shape)),
        Err(Error::InvalidArgument(_))
    ));
    // Buckets for a full-attention call.
    let full = &cases(DType::F32)[4];
    let tf = full.tensors();
    let bf = Buckets::new(vec![0; 24], [1, 2, 1, 12]);
    assert!(matches!(
        reformer::forward(&inputs(&tf, None, Some(&bf)), &full.opts()),
        Err(Error::InvalidArgument(m)) if m.contains("full")
    ));
    // Backward tensors.
    let o = reformer::forward(&inputs(&t, None, None), &c.opts()).unwrap();
    let i = inputs(&t, None, None);
    let lse16 = HostTensor::from_fn(DType::F16, o.lse.shape(), |_| 0.0).unwrap();
    assert!(matches!(
        reformer::backward(&i.backward(&o.out, &lse16, &o.out), &c.opts()),
        Err(Error::UnsupportedDType { name: "lse", .. })
    ));
    let lse1 = HostTensor::from_fn(DType::F32, &[c.b, c.h, 1, c.n], |_| 0.0).unwrap();
    assert!(matches!(
        reformer::backward(&i.backward(&o.out, &lse1, &o.out), &c.opts()),
        Err(Error::ShapeMismatch { .. })
    ));
    let d16 = HostTensor::from_fn(DType::F16, o.out.shape(), |_| 0.0).unwrap();
    assert!(matches!(
        reformer::backward(&i.backward(&o.out, &o.lse, &d16), &c.opts()),
        Err(Error::DTypeMismatch { .. })
    ));
}

/// Hugging Face LSHSelfAttention (transformers 5.25, float64) golden fixtures.
#[test]
fn matches_hugging_face_fixtures() {
    let fx = load_fixtures();
    assert!(fx.len() >= 6, "{} fixtures", fx.len());
    for f in &fx {
        let g = |k: &str| f.get(k);
        let (b, n, h, d) = (g("batch"), g("seqlen"), g("heads"), g("head_dim"));
        let pad = f
            .tensor("attention_mask")
            .map(|(_, m)| m.iter().map(|&x| x == 0.0).collect::<Vec<bool>>());
        let c = Case {
            b,
            n,
            h,
            d,
            n_hashes: g("num_hashes"),
            n_buckets: g("num_buckets"),
            c: g("chunk_length"),
            before: g("chunks_before"),
            after: g("chunks_after"),
            causal: g("causal") == 1,
            pad,
            dtype: DType::F32,
            qk: f.tensor("qk").unwrap().1.clone(),
            v: f.tensor("v").unwrap().1.clone(),
            rot: f.tensor("rotations").unwrap().1.clone(),
        };
        let want = &f.tensor("out").unwrap().1;
        let hf_buckets: Option<Vec<i32>> = f
            .tensor("buckets")
            .map(|(_, v)| v.iter().map(|&x| x as i32).collect());
        assert_eq!(hf_buckets.is_some(), c.hashed(), "{}", f.name);
        // The reference in f64 with HF's f64 rotations: the same buckets and output.
        let p = problem(&c);
        let r = try_reformer(&p, &ref_inputs(&c), None).unwrap();
        assert_eq!(r.buckets, hf_buckets, "{}: buckets", f.name);
        let err = max_abs_diff(&r.out, want);
        assert!(err <= 1e-9, "{}: {err:e}", f.name);
        // The public API (f32 tensors: qk, v exact; rotations rounded) with HF's buckets.
        let t = c.tensors();
        let m = c.mask();
        let hb = hf_buckets.map(|v| Buckets::new(v, [b, h, c.n_hashes, n]));
        let o = reformer::forward(&inputs(&t, m.as_ref(), hb.as_ref()), &c.opts()).unwrap();
        let err = max_abs_diff(&f64s(&o.out), want);
        assert!(
            err <= 2e-6 * (1.0 + max_abs(want)),
            "{}: f32 {err:e}",
            f.name
        );
    }
}
