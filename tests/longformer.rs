//! Longformer attention: the CPU reference against an independent dense definition
//! (tests/longformer_common), the backward against finite differences, and the Hugging Face
//! golden fixtures. The tile plan's properties are in tests/longformer_schedule.rs, the
//! error paths in tests/longformer_errors.rs.

mod common;
mod longformer_common;

use common::Rng;
use flashkernels::attention::{self, AttentionOptions};
use flashkernels::longformer::{
    self, GlobalProjections, LongformerOptions, LongformerProblem, TokenMask,
};
use flashkernels::reference::{self, LongformerInputs};
use flashkernels::{DType, HostTensor};
use longformer_common::{
    assert_close, case_strategy, f64s, forward_api, naive_of, random, six, tensor,
};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// The public f32 forward against the dense f64 definition.
    #[test]
    fn forward_matches_dense_definition((seed, c) in case_strategy(41, 9)) {
        let mut rng = Rng::new(seed.wrapping_add(1));
        let x = six(&mut rng, &c);
        let r = forward_api(&c, &x);
        let (o, l) = naive_of(&c, &std::array::from_fn(|i| f64s(&x[i])));
        assert_close("out", &r.out.to_f32_vec(), &o, 2e-5);
        assert_close("lse", &r.lse.to_f32_vec(), &l, 2e-5);
        // Padded rows: exactly zero output and -inf LSE.
        let [b, n, h, d] = c.dims;
        let out = r.out.to_f32_vec();
        let lse = r.lse.to_f32_vec();
        for s in 0..b {
            for i in (0..n).filter(|&i| c.padded[s * n + i]) {
                for hh in 0..h {
                    prop_assert_eq!(lse[(s * h + hh) * n + i], f32::NEG_INFINITY);
                    let at = ((s * n + i) * h + hh) * d;
                    prop_assert!(out[at..at + d].iter().all(|&y| y == 0.0));
                }
            }
        }
    }

    /// The f32 backward through the API: without global projections it equals the call
    /// with Q, K, V passed as the projections, its global gradients folded in.
    #[test]
    fn backward_without_projections_folds_global_gradients((seed, mut c) in case_strategy(20, 5)) {
        c.separate = false;
        let mut rng = Rng::new(seed.wrapping_add(2));
        let x = six(&mut rng, &c);
        let r = forward_api(&c, &x);
        let dout = tensor(&random(&mut rng, c.dims.iter().product()), &c.dims);
        let t: Vec<HostTensor> = x.iter().take(3).map(|v| tensor(v, &c.dims)).collect();
        let (gm, pm) = c.masks();
        let folded = longformer::backward(&longformer::Inputs::new(&t[0], &t[1], &t[2]).globals(None).masks(Some(&gm), Some(&pm)).backward(&r.out, &r.lse, &dout), &c.opts()).unwrap();
        prop_assert!(folded.global.is_none());
        let g = GlobalProjections { q: &t[0], k: &t[1], v: &t[2] };
        let split = longformer::backward(&longformer::Inputs::new(&t[0], &t[1], &t[2]).globals(Some(g)).masks(Some(&gm), Some(&pm)).backward(&r.out, &r.lse, &dout), &c.opts()).unwrap();
        let [gq, gk, gv] = split.global.unwrap();
        for (what, f, a, bb) in [("dq", &folded.dq, &split.dq, &gq), ("dk", &folded.dk, &split.dk, &gk),
            ("dv", &folded.dv, &split.dv, &gv)] {
            let want: Vec<f64> = a.to_f32_vec().iter().zip(bb.to_f32_vec()).map(|(x, y)| (x + y) as f64).collect();
            assert_close(what, &f.to_f32_vec(), &want, 1e-6);
        }
    }
}

/// A scalar loss sum(dO * O) of the f64 reference forward.
fn loss(p: &LongformerProblem, x: &[Vec<f64>; 6], dout: &[f64]) -> f64 {
    let inputs = LongformerInputs {
        q: &x[0],
        k: &x[1],
        v: &x[2],
        q_g: &x[3],
        k_g: &x[4],
        v_g: &x[5],
    };
    let (o, _) = reference::try_longformer(p, &inputs).unwrap();
    o.iter().zip(dout).map(|(a, b)| a * b).sum()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// The f64 backward against central finite differences of the f64 forward, for all
    /// six inputs (separate projections), padded and global tokens included.
    #[test]
    fn backward_matches_finite_differences((seed, mut c) in case_strategy(11, 4)) {
        c.separate = true;
        c.dims[0] = 1;
        c.global.truncate(c.dims[1]);
        c.padded.truncate(c.dims[1]);
        let p = c.problem();
        let mut rng = Rng::new(seed.wrapping_add(3));
        let x: [Vec<f64>; 6] = std::array::from_fn(|_| f64s(&random(&mut rng, c.dims.iter().product())));
        let dout = f64s(&random(&mut rng, c.dims.iter().product()));
        let inputs = LongformerInputs { q: &x[0], k: &x[1], v: &x[2], q_g: &x[3], k_g: &x[4], v_g: &x[5] };
        let (o, l) = reference::try_longformer(&p, &inputs).unwrap();
        let g = reference::try_longformer_backward(&p, &inputs, &o, &l, &dout).unwrap();
        let grads = [&g.dq, &g.dk, &g.dv, &g.dq_g, &g.dk_g, &g.dv_g];
        let eps = 1e-5;
        for (which, grad) in grads.iter().enumerate() {
            for e in 0..x[which].len() {
                let mut plus = x.clone();
                plus[which][e] += eps;
                let mut minus = x.clone();
                minus[which][e] -= eps;
                let fd = (loss(&p, &plus, &dout) - loss(&p, &minus, &dout)) / (2.0 * eps);
                prop_assert!((fd - grad[e]).abs() <= 1e-6 * (1.0 + fd.abs()),
                    "input {} element {}: analytic {} vs finite difference {}", which, e, grad[e], fd);
            }
        }
    }
}

/// With dilation 1, no globals and a window covering the sequence, Longformer is dense
/// attention (causal or not): a cross-check against the attention module.
#[test]
fn full_window_is_dense_attention() {
    let mut rng = Rng::new(7);
    let dims = [2, 13, 3, 5];
    let len: usize = dims.iter().product();
    let (q, k, v) = (
        random(&mut rng, len),
        random(&mut rng, len),
        random(&mut rng, len),
    );
    let (q, k, v) = (tensor(&q, &dims), tensor(&k, &dims), tensor(&v, &dims));
    for causal in [false, true] {
        let opts = LongformerOptions {
            causal,
            ..LongformerOptions::new(12)
        };
        let r = longformer::forward(
            &longformer::Inputs::new(&q, &k, &v)
                .globals(None)
                .masks(None, None),
            &opts,
        )
        .unwrap();
        let a = attention::forward(
            &attention::Inputs::new(&q, &k, &v),
            &AttentionOptions {
                causal,
                ..Default::default()
            },
        )
        .unwrap();
        let want: Vec<f64> = f64s(&a.out.to_f32_vec());
        assert_close("out", &r.out.to_f32_vec(), &want, 1e-6);
        assert_close("lse", &r.lse.to_f32_vec(), &f64s(&a.lse.to_f32_vec()), 1e-6);
    }
}

/// Window 0 without globals: every row sees only itself, so O = V.
#[test]
fn window_zero_is_identity_on_v() {
    let mut rng = Rng::new(9);
    let dims = [1, 6, 2, 3];
    let len: usize = dims.iter().product();
    let (q, k, v) = (
        random(&mut rng, len),
        random(&mut rng, len),
        random(&mut rng, len),
    );
    let r = longformer::forward(
        &longformer::Inputs::new(&tensor(&q, &dims), &tensor(&k, &dims), &tensor(&v, &dims))
            .globals(None)
            .masks(None, None),
        &LongformerOptions::new(0),
    )
    .unwrap();
    assert_eq!(r.out.to_f32_vec(), v);
}

#[test]
fn half_precision_inputs_run_and_keep_their_dtype() {
    let dims = [1, 9, 2, 4];
    let t = |dtype| HostTensor::from_fn(dtype, &dims, |i| (i as f32 * 0.31).sin()).unwrap();
    // The same values in f32: the half inputs widened exactly.
    let wide = |h: &HostTensor| HostTensor::from_vec(h.to_f32_vec(), h.shape()).unwrap();
    // The half result must be the f32 result (computed from the same half values) rounded
    // once to nearest: within half an ulp, 2^-8 relative for bf16 (8 significant bits),
    // 2^-11 for f16, plus half the f16 subnormal spacing. Truncation (one ulp) fails it.
    let check = |what: &str, dtype: DType, got: &HostTensor, want: &HostTensor| {
        assert_eq!(got.dtype(), dtype, "{what}");
        assert_eq!(got.shape(), want.shape(), "{what}");
        let (u, floor) = match dtype {
            DType::BF16 => (2f64.powi(-8), 0.0),
            _ => (2f64.powi(-11), 2f64.powi(-25)),
        };
        let (g, w) = (got.to_f32_vec(), want.to_f32_vec());
        assert!(w.iter().any(|&x| x != 0.0), "{what}: an all-zero reference");
        for (i, (&g, &w)) in g.iter().zip(&w).enumerate() {
            let bound = u * (w as f64).abs() + floor;
            assert!(
                (g as f64 - w as f64).abs() <= bound,
                "{what} {dtype}[{i}]: got {g}, want {w} (bound {bound})"
            );
        }
    };
    for dtype in [DType::F16, DType::BF16] {
        let (q, k, v) = (t(dtype), t(dtype), t(dtype));
        let gm = TokenMask::from_positions(1, 9, &[(0, 4)]).unwrap();
        let r = longformer::forward(
            &longformer::Inputs::new(&q, &k, &v)
                .globals(None)
                .masks(Some(&gm), None),
            &LongformerOptions::new(2),
        )
        .unwrap();
        assert_eq!(r.out.dtype(), dtype);
        assert_eq!(r.lse.dtype(), DType::F32);
        let (q32, k32, v32) = (wide(&q), wide(&k), wide(&v));
        let r32 = longformer::forward(
            &longformer::Inputs::new(&q32, &k32, &v32)
                .globals(None)
                .masks(Some(&gm), None),
            &LongformerOptions::new(2),
        )
        .unwrap();
        check("out", dtype, &r.out, &r32.out);
        let (lse, lse32) = (r.lse.to_f32_vec(), r32.lse.to_f32_vec());
        assert_eq!(lse.len(), lse32.len());
        for (i, (a, b)) in lse.iter().zip(&lse32).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "lse {dtype}[{i}]: {a} vs {b}"
            );
        }
        let dout = t(dtype);
        let g = longformer::backward(
            &longformer::Inputs::new(&q, &k, &v)
                .globals(None)
                .masks(Some(&gm), None)
                .backward(&r.out, &r.lse, &dout),
            &LongformerOptions::new(2),
        )
        .unwrap();
        assert_eq!(g.dq.dtype(), dtype);
        assert_eq!(g.dk.shape(), &dims);
        // The f32 backward from the same (half-valued) O, LSE and dO.
        let g32 = longformer::backward(
            &longformer::Inputs::new(&q32, &k32, &v32)
                .globals(None)
                .masks(Some(&gm), None)
                .backward(&wide(&r.out), &r.lse, &wide(&dout)),
            &LongformerOptions::new(2),
        )
        .unwrap();
        check("dq", dtype, &g.dq, &g32.dq);
        check("dk", dtype, &g.dk, &g32.dk);
        check("dv", dtype, &g.dv, &g32.dv);
    }
}

// ---- Hugging Face golden fixtures (scripts/make_longformer_fixtures.py) ----

#[test]
fn matches_hugging_face_fixtures() {
    for f in common::longformer_fixtures::load() {
        let ts: Vec<HostTensor> = ["q", "k", "v", "q_g", "k_g", "v_g"]
            .iter()
            .map(|n| {
                let (s, v) = f.get(n);
                tensor(&v, &s)
            })
            .collect();
        let mask = |name: &str| {
            let (s, v) = f.mask(name);
            TokenMask::new(v, &s)
        };
        let (gm, pm) = (mask("global_mask"), mask("padding_mask"));
        let opts = LongformerOptions {
            window: f.window,
            dilation: vec![f.dilation],
            causal: f.causal,
            scale: Some(f.scale),
        };
        let g = GlobalProjections {
            q: &ts[3],
            k: &ts[4],
            v: &ts[5],
        };
        let r = longformer::forward(
            &longformer::Inputs::new(&ts[0], &ts[1], &ts[2])
                .globals(Some(g))
                .masks(Some(&gm), Some(&pm)),
            &opts,
        )
        .unwrap();
        let (_, want) = f.get("out_hf");
        assert_close(
            &f.path.display().to_string(),
            &r.out.to_f32_vec(),
            &f64s(&want),
            2e-5,
        );
    }
}
