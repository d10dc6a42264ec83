//! Linformer's CPU reference and Rust API, forward and backward, against an f64
//! definition written in tests/linformer_common (independent of the library): with the
//! op's pinned roundings (kp, vp, dkp, dvp to the dtype) within one rounding of each
//! output, and as the exact formula within bounds derived from those roundings;
//! gradients against central finite differences; sharing, column and padding
//! properties; the lucidrains/linformer 0.2.3 golden fixtures. The error paths are in
//! tests/linformer_errors.rs.

#![allow(clippy::needless_range_loop)] // index-parallel numeric loops read best as such

mod linformer_common;

use flashkernels::linformer::{self, LinformerOutput};
use flashkernels::{DType, HostTensor};
use linformer_common::{
    assert_within, define, define_backward, dims, f64s, inputs, load_fixtures, loss, opts,
    random_dout, round, subnormal_floor, tensor, unit_roundoff, Case, Def, Dims, Padding, Rng,
    Sharing, Tensors, SHARINGS,
};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

fn run(c: &Case, t: &Tensors) -> LinformerOutput<HostTensor> {
    let m = c.mask();
    linformer::forward(&inputs(t, m.as_ref()), &opts(c)).unwrap()
}

/// Odd shapes: N not a multiple of anything, k from 1 to 70 (and k > N), batch 1, a
/// single head, GQA and MQA, N < N_max.
const SHAPES: [(usize, usize, usize, usize, usize, usize, usize); 7] = [
    (1, 1, 1, 1, 8, 1, 1),
    (1, 13, 1, 1, 16, 5, 13),
    (2, 37, 4, 2, 24, 16, 50),
    (1, 29, 3, 3, 12, 70, 40),
    (2, 61, 2, 1, 40, 33, 61),
    (1, 50, 6, 3, 8, 64, 77),
    (3, 7, 2, 2, 4, 9, 7),
];

/// Every shape x sharing level x padding kind, per dtype.
fn cases(dtype: DType) -> Vec<Case> {
    let mut out = Vec::new();
    let mut seed = 1000 * dtype.size() as u64;
    for (si, &(b, n, h, hkv, d, k, n_max)) in SHAPES.iter().enumerate() {
        for (shi, &sharing) in SHARINGS.iter().enumerate() {
            let padding = match (si + shi) % 3 {
                0 => Padding::None,
                1 => Padding::Random,
                _ => Padding::FirstSequenceFull,
            };
            let scale = (shi == 2).then_some(0.37);
            seed += 1;
            out.push(Case::random(
                seed,
                dtype,
                dims(b, n, h, hkv, d, k, n_max),
                sharing,
                padding,
                scale,
            ));
        }
    }
    out
}

fn describe(c: &Case) -> String {
    format!(
        "{:?} {:?} He {} Hf {} shared {} mask {}",
        c.dtype,
        c.dims,
        c.e_heads,
        c.f_heads_eff(),
        c.shared,
        c.pad.is_some()
    )
}

/// One rounding to the dtype of values that agree in f64 (up to summation order): two
/// units of roundoff of the value, the subnormal floor, and 1e-12 for f64 noise.
fn one_rounding(dtype: DType, v: &[f64]) -> Vec<f64> {
    let u = unit_roundoff(dtype);
    v.iter()
        .map(|x| 2.0 * u * x.abs() + subnormal_floor(dtype) + 1e-12)
        .collect()
}

/// Bounds of O and LSE against the exact formula from the op's roundings (unit roundoff
/// u): kp and vp each rounded once (|Δkp| <= u|kp| + floor) move a scaled score by at
/// most δ = scale Σ|q|(u|kp| + floor), the softmax weights by a factor e^{±2δ}, O by
/// vmax (2δ + u) plus its own rounding u|O|; LSE by δ plus its f32 rounding. Doubled for
/// the second-order terms and the f32 step of the output's conversion.
fn formula_bounds(c: &Case, d: &Def) -> (Vec<f64>, Vec<f64>) {
    let Dims {
        b,
        n,
        h,
        hkv,
        d: hd,
        k,
        ..
    } = c.dims;
    let (u, sub) = (unit_roundoff(c.dtype), subnormal_floor(c.dtype));
    let scale = c.scale_f64();
    let mut bo = vec![0.0; d.out.len()];
    let mut bl = vec![0.0; d.lse.len()];
    for bb in 0..b {
        for hh in 0..h {
            let g = hh / (h / hkv);
            let vmax = (0..k)
                .flat_map(|r| (0..hd).map(move |x| ((bb * k + r) * hkv + g) * hd + x))
                .fold(0f64, |m, i| m.max(d.vp[i].abs()));
            for i in 0..n {
                let qi = &c.q[((bb * n + i) * h + hh) * hd..][..hd];
                let delta = (0..k)
                    .map(|r| {
                        let kr = &d.kp[((bb * k + r) * hkv + g) * hd..][..hd];
                        scale
                            * (0..hd)
                                .map(|x| qi[x].abs() * (u * kr[x].abs() + sub))
                                .sum::<f64>()
                    })
                    .fold(0f64, f64::max);
                let l = (bb * h + hh) * n + i;
                bl[l] = 2.0 * (delta + 2f64.powi(-24) * d.lse[l].abs()) + 1e-12;
                for x in 0..hd {
                    let o = ((bb * n + i) * h + hh) * hd + x;
                    bo[o] =
                        2.0 * (vmax * (2.0 * delta + u) + u * d.out[o].abs()) + 2.0 * sub + 1e-12;
                }
            }
        }
    }
    (bo, bl)
}

#[test]
fn forward_matches_definition_every_dtype_shape_and_sharing() {
    for dtype in DTYPES {
        for c in cases(dtype) {
            let what = describe(&c);
            let o = run(&c, &c.tensors());
            assert_eq!(o.out.shape(), &c.q_shape());
            assert_eq!(o.out.dtype(), dtype);
            assert_eq!(o.lse.shape(), &[c.dims.b, c.dims.h, c.dims.n]);
            assert_eq!(o.lse.dtype(), DType::F32);
            assert_eq!(o.kp.shape(), &c.proj_shape());
            assert_eq!(o.vp.dtype(), dtype);
            // The pinned semantics: kp, vp rounded once; O from them rounded once.
            let r = define(&c, Some(dtype));
            let (kp, vp, out, lse) = (f64s(&o.kp), f64s(&o.vp), f64s(&o.out), f64s(&o.lse));
            assert_within(
                &format!("kp, {what}"),
                &kp,
                &r.kp,
                &one_rounding(dtype, &r.kp),
            );
            assert_within(
                &format!("vp, {what}"),
                &vp,
                &r.vp,
                &one_rounding(dtype, &r.vp),
            );
            assert_within(
                &format!("out, {what}"),
                &out,
                &r.out,
                &one_rounding(dtype, &r.out),
            );
            assert_within(
                &format!("lse, {what}"),
                &lse,
                &r.lse,
                &one_rounding(DType::F32, &r.lse),
            );
            // The exact formula, within the bounds those roundings allow.
            let x = define(&c, None);
            let (bo, bl) = formula_bounds(&c, &x);
            assert_within(&format!("out vs formula, {what}"), &out, &x.out, &bo);
            assert_within(&format!("lse vs formula, {what}"), &lse, &x.lse, &bl);
        }
    }
}

/// The backward through the API on the forward's own outputs; (gradients, the f64 copies
/// of out, lse, kp, vp, dout).
fn run_backward(
    c: &Case,
    t: &Tensors,
    dout: &[f64],
) -> (linformer::LinformerGradients<HostTensor>, [Vec<f64>; 5]) {
    let m = c.mask();
    let i = inputs(t, m.as_ref());
    let o = linformer::forward(&i, &opts(c)).unwrap();
    let dt = tensor(dout, &c.q_shape(), c.dtype);
    let g = linformer::backward(&i.backward(&o.out, &o.lse, &o.kp, &o.vp, &dt), &opts(c)).unwrap();
    let saved = [
        f64s(&o.out),
        f64s(&o.lse),
        f64s(&o.kp),
        f64s(&o.vp),
        dout.to_vec(),
    ];
    (g, saved)
}

#[test]
fn backward_matches_definition_every_dtype_shape_and_sharing() {
    for dtype in DTYPES {
        for (ci, c) in cases(dtype).into_iter().enumerate() {
            let what = describe(&c);
            let dout = random_dout(&c, 77 + ci as u64);
            let (g, s) = run_backward(&c, &c.tensors(), &dout);
            let r = define_backward(&c, Some(dtype), [&s[0], &s[1], &s[2], &s[3], &s[4]]);
            assert_eq!(g.dq.shape(), &c.q_shape());
            assert_eq!(g.dk.shape(), &c.kv_shape());
            assert_eq!(g.de.shape(), &c.e_shape());
            assert_eq!(g.df.is_none(), c.shared, "{what}");
            let check = |name: &str, t: &HostTensor, want: &[f64]| {
                assert_eq!(t.dtype(), dtype);
                assert_within(
                    &format!("{name}, {what}"),
                    &f64s(t),
                    want,
                    &one_rounding(dtype, want),
                );
            };
            check("dq", &g.dq, &r.dq);
            check("dk", &g.dk, &r.dk);
            check("dv", &g.dv, &r.dv);
            check("de", &g.de, &r.de);
            if let (Some(df), Some(want)) = (&g.df, &r.df) {
                assert_eq!(df.shape(), &c.f_shape());
                check("df", df, want);
            }
        }
    }
}

#[test]
fn backward_matches_finite_differences() {
    let shapes = [
        (1, 5, 2, 1, 4, 3, 7),
        (2, 6, 2, 2, 3, 4, 6),
        (1, 4, 3, 3, 2, 7, 5),
    ];
    for (si, &(b, n, h, hkv, d, k, n_max)) in shapes.iter().enumerate() {
        for (shi, &sharing) in SHARINGS.iter().enumerate() {
            let padding = if (si + shi) % 2 == 0 {
                Padding::Random
            } else {
                Padding::None
            };
            let seed = 500 + (si * 10 + shi) as u64;
            let c = Case::random(
                seed,
                DType::F32,
                dims(b, n, h, hkv, d, k, n_max),
                sharing,
                padding,
                None,
            );
            let what = describe(&c);
            let dout = random_dout(&c, seed + 1);
            let (g, _) = run_backward(&c, &c.tensors(), &dout);
            // The definition's own exact backward, checked by the same differences.
            let x = define(&c, None);
            let exact = define_backward(&c, None, [&x.out, &x.lse, &x.kp, &x.vp, &dout]);
            type Field = fn(&mut Case) -> &mut Vec<f64>;
            let mut fields: Vec<(&str, Field, Vec<f64>, Vec<f64>)> = vec![
                ("q", |c| &mut c.q, f64s(&g.dq), exact.dq.clone()),
                ("k", |c| &mut c.k, f64s(&g.dk), exact.dk.clone()),
                ("v", |c| &mut c.v, f64s(&g.dv), exact.dv.clone()),
                ("e", |c| &mut c.e, f64s(&g.de), exact.de.clone()),
            ];
            if let (Some(df), Some(edf)) = (&g.df, &exact.df) {
                fields.push(("f", |c| c.f.as_mut().unwrap(), f64s(df), edf.clone()));
            }
            for (name, field, got, ex) in fields {
                let len = field(&mut c.clone()).len();
                let fd: Vec<f64> = (0..len)
                    .map(|i| {
                        let eps = 1e-6;
                        let (mut p, mut m) = (c.clone(), c.clone());
                        field(&mut p)[i] += eps;
                        field(&mut m)[i] -= eps;
                        (loss(&p, &dout) - loss(&m, &dout)) / (2.0 * eps)
                    })
                    .collect();
                let big = fd.iter().fold(0f64, |a, x| a.max(x.abs())).max(1e-3);
                for i in 0..len {
                    assert!(
                        (ex[i] - fd[i]).abs() <= 1e-7 * big + 1e-7 * fd[i].abs(),
                        "d{name}[{i}], {what}: definition {} vs finite difference {}",
                        ex[i],
                        fd[i]
                    );
                    assert!(
                        (got[i] - fd[i]).abs() <= 2e-5 * big + 1e-5 * fd[i].abs(),
                        "d{name}[{i}], {what}: op {} vs finite difference {}",
                        got[i],
                        fd[i]
                    );
                }
            }
        }
    }
}

#[test]
fn key_value_sharing_gives_de_both_contributions() {
    for dtype in DTYPES {
        for sharing in [Sharing::KvPerHead, Sharing::KvHeadwise] {
            let c = Case::random(
                9,
                dtype,
                dims(2, 19, 4, 2, 8, 6, 23),
                sharing,
                Padding::Random,
                None,
            );
            let mut sep = c.clone();
            sep.f = Some(c.e.clone());
            sep.shared = false;
            sep.f_heads = c.e_heads;
            let dout = random_dout(&c, 10);
            let (gs, ss) = run_backward(&c, &c.tensors(), &dout);
            let (gp, sp) = run_backward(&sep, &sep.tensors(), &dout);
            // Same forward, bit for bit, and the same dQ, dK, dV.
            assert_eq!(ss, sp, "{dtype:?} {sharing:?}: forward");
            assert_eq!(gs.dq, gp.dq);
            assert_eq!(gs.dk, gp.dk);
            assert_eq!(gs.dv, gp.dv);
            assert!(gs.df.is_none());
            // dE(shared) = dE + dF of the separate call, up to one rounding of each.
            let (de, dfs) = (f64s(&gp.de), f64s(gp.df.as_ref().unwrap()));
            let sum: Vec<f64> = de.iter().zip(&dfs).map(|(a, b)| a + b).collect();
            let u = unit_roundoff(dtype);
            let bound: Vec<f64> = de
                .iter()
                .zip(&dfs)
                .map(|(a, b)| {
                    2.0 * u * (2.0 * a.abs() + 2.0 * b.abs()) + subnormal_floor(dtype) * 3.0
                })
                .collect();
            assert_within(
                &format!("{dtype:?} {sharing:?} de"),
                &f64s(&gs.de),
                &sum,
                &bound,
            );
            assert!(sum.iter().any(|&x| x != 0.0));
        }
    }
}

#[test]
fn only_the_first_n_columns_of_e_and_f_are_used() {
    for sharing in SHARINGS {
        let c = Case::random(
            21,
            DType::BF16,
            dims(2, 11, 2, 2, 8, 5, 30),
            sharing,
            Padding::Random,
            None,
        );
        let dout = random_dout(&c, 22);
        let (g, s) = run_backward(&c, &c.tensors(), &dout);
        let mut other = c.clone();
        let mut rng = Rng::new(23);
        let nm = c.dims.n_max;
        let scramble = |v: &mut Vec<f64>, rng: &mut Rng| {
            for (i, x) in v.iter_mut().enumerate() {
                if i % nm >= c.dims.n {
                    *x = round(DType::BF16, 5.0 * rng.uniform());
                }
            }
        };
        scramble(&mut other.e, &mut rng);
        if let Some(f) = other.f.as_mut() {
            scramble(f, &mut rng);
        }
        let (g2, s2) = run_backward(&other, &other.tensors(), &dout);
        assert_eq!(
            s, s2,
            "{sharing:?}: the forward changed with the unused columns"
        );
        assert_eq!(
            (&g.dq, &g.dk, &g.dv, &g.de, &g.df),
            (&g2.dq, &g2.dk, &g2.dv, &g2.de, &g2.df)
        );
        for t in std::iter::once(&g.de).chain(g.df.as_ref()) {
            let v = t.to_f32_vec();
            assert!(v
                .iter()
                .enumerate()
                .all(|(i, &x)| i % nm < c.dims.n || x == 0.0));
            assert!(v.iter().any(|&x| x != 0.0));
        }
    }
}

#[test]
fn padded_keys_change_nothing_and_get_zero_gradients() {
    for sharing in SHARINGS {
        let c = Case::random(
            31,
            DType::F16,
            dims(2, 17, 4, 2, 8, 7, 20),
            sharing,
            Padding::Random,
            None,
        );
        let dout = random_dout(&c, 32);
        let (g, s) = run_backward(&c, &c.tensors(), &dout);
        let mut other = c.clone();
        let [_, n, hkv, d] = c.kv_shape();
        for i in 0..other.k.len() {
            let (bb, j) = (i / (n * hkv * d), i / (hkv * d) % n);
            if c.padded(bb, j) {
                other.k[i] = 3.0;
                other.v[i] = -7.0;
            }
        }
        let (g2, s2) = run_backward(&other, &other.tensors(), &dout);
        assert_eq!(s, s2, "{sharing:?}: padded keys changed the forward");
        assert_eq!((&g.dq, &g.de, &g.df), (&g2.dq, &g2.de, &g2.df));
        for t in [&g.dk, &g.dv] {
            let v = t.to_f32_vec();
            for i in 0..v.len() {
                let (bb, j) = (i / (n * hkv * d), i / (hkv * d) % n);
                if c.padded(bb, j) {
                    assert_eq!(v[i], 0.0, "{sharing:?}: gradient of padded key ({bb}, {j})");
                }
            }
        }
    }
}

/// A sequence whose every key is padded: kp = vp = 0, the softmax is uniform over k zero
/// keys, so O = 0, LSE = ln(k), and every gradient of that sequence is 0.
#[test]
fn fully_padded_sequence_gives_zero_output_and_lse_ln_k() {
    for dtype in DTYPES {
        let c = Case::random(
            41,
            dtype,
            dims(2, 9, 2, 1, 8, 6, 12),
            Sharing::PerHead,
            Padding::FirstSequenceFull,
            None,
        );
        let dout = random_dout(&c, 42);
        let (g, s) = run_backward(&c, &c.tensors(), &dout);
        let [_, n, h, d] = c.q_shape();
        assert!(s[0][..n * h * d].iter().all(|&x| x == 0.0), "{dtype:?}: O");
        assert!(s[0][n * h * d..].iter().any(|&x| x != 0.0));
        let ln_k = (c.dims.k as f64).ln();
        assert!(
            s[1][..h * n].iter().all(|&l| (l - ln_k).abs() <= 1e-6),
            "{dtype:?}: LSE"
        );
        assert!(
            s[2][..c.dims.k * d].iter().all(|&x| x == 0.0),
            "{dtype:?}: kp"
        );
        assert!(f64s(&g.dq)[..n * h * d].iter().all(|&x| x == 0.0));
        let kvn = n * c.dims.hkv * d;
        assert!(f64s(&g.dk)[..kvn].iter().all(|&x| x == 0.0));
        assert!(f64s(&g.dv)[..kvn].iter().all(|&x| x == 0.0));
        // dE, dF come from sequence 1 alone: the call on it alone gives the same.
        let mut one = c.clone();
        one.dims.b = 1;
        one.q = c.q[n * h * d..].to_vec();
        one.k = c.k[kvn..].to_vec();
        one.v = c.v[kvn..].to_vec();
        one.pad = c.pad.as_ref().map(|p| p[n..].to_vec());
        let (g1, _) = run_backward(&one, &one.tensors(), &dout[n * h * d..]);
        assert_eq!(g.de, g1.de);
        assert_eq!(g.df, g1.df);
    }
}

#[test]
fn strided_inputs_give_the_contiguous_result() {
    for sharing in SHARINGS {
        let c = Case::random(
            51,
            DType::F32,
            dims(2, 13, 4, 2, 8, 6, 17),
            sharing,
            Padding::Random,
            Some(0.5),
        );
        let dout = random_dout(&c, 52);
        let (g, s) = run_backward(&c, &c.tensors(), &dout);
        let (g2, s2) = run_backward(&c, &c.strided_tensors(3), &dout);
        assert_eq!(s, s2, "{sharing:?}");
        assert_eq!(
            (&g.dq, &g.dk, &g.dv, &g.de, &g.df),
            (&g2.dq, &g2.dk, &g2.dv, &g2.de, &g2.df)
        );
    }
}

#[test]
fn backward_is_deterministic() {
    let c = Case::random(
        61,
        DType::BF16,
        dims(3, 33, 4, 2, 16, 12, 40),
        Sharing::Headwise,
        Padding::Random,
        None,
    );
    let dout = random_dout(&c, 62);
    let (a, _) = run_backward(&c, &c.tensors(), &dout);
    let (b, _) = run_backward(&c, &c.tensors(), &dout);
    assert_eq!(
        (&a.dq, &a.dk, &a.dv, &a.de, &a.df),
        (&b.dq, &b.dk, &b.dv, &b.de, &b.df)
    );
}

#[test]
fn lucidrains_golden_fixtures() {
    let fixtures = load_fixtures();
    assert!(fixtures.len() >= 6, "expected the 6 committed fixtures");
    for fx in &fixtures {
        let (b, n, n_max) = (fx.usize("batch"), fx.usize("seqlen"), fx.usize("n_max"));
        let (h, hkv, d, k) = (
            fx.usize("heads"),
            fx.usize("heads_kv"),
            fx.usize("head_dim"),
            fx.usize("k"),
        );
        let shared = fx.cfg("share_kv") == "1";
        let scale: f64 = fx.cfg("scale").parse().unwrap();
        assert_eq!(scale, (d as f64).powf(-0.5));
        let (qs, q) = fx.get("q").unwrap();
        let (ks, kk) = fx.get("k").unwrap();
        let v = fx.get("v").map_or(kk.clone(), |t| t.1);
        let (es, e) = fx.get("e").unwrap();
        let f = fx.get("f").map(|t| t.1);
        let (os, want) = fx.get("out").unwrap();
        assert_eq!(
            (qs, ks, es.clone(), os),
            (
                vec![b, n, h, d],
                vec![b, n, hkv, d],
                vec![1, k, n_max],
                vec![b, n, h, d]
            )
        );
        assert_eq!(shared, f.is_none(), "{}", fx.name);
        let c = Case {
            dtype: DType::F32,
            dims: dims(b, n, h, hkv, d, k, n_max),
            e_heads: 1,
            f_heads: 1,
            shared,
            scale: None,
            q,
            k: kk,
            v,
            e,
            f,
            pad: None,
        };
        // The test's definition is lucidrains' formula...
        let x = define(&c, None);
        let err = x
            .out
            .iter()
            .zip(&want)
            .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            err <= 1e-12,
            "{}: definition vs lucidrains {err:e}",
            fx.name
        );
        // ...and the op on the float32 inputs matches it within one f32 rounding of kp,
        // vp and O.
        let o = run(&c, &c.tensors());
        let (bo, _) = formula_bounds(&c, &x);
        assert_within(&format!("{} out", fx.name), &f64s(&o.out), &want, &bo);
        // The lucidrains layout itself: E = proj_k.T, a strided view of (n_max, k).
        let o2 = run(&c, &c.strided_tensors(0));
        assert_eq!(o.out, o2.out);
    }
}
