//! The CPU reference on GQA, sliding windows and variable-length batches (forward and
//! backward), and the reference backward against finite differences in f64.
//!
//! Independent definitions: the forward is checked against `common::naive_general`
//! (f64, its own mask predicate); the backward against central finite differences of
//! the f64 forward, and, in f32 through the public API, against per-sequence and
//! repeated-head (MHA) calls.

mod common;

use common::{allowed, naive_general, Rng};
use flashkernels::attention::{self, AttentionOptions, AttentionProblem, SeqLens};
use flashkernels::reference;
use flashkernels::{DType, HostTensor, Layout};
use proptest::prelude::*;

fn random(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal()).collect()
}

fn tensor(data: &[f32], shape: &[usize]) -> HostTensor {
    HostTensor::from_vec(data.to_vec(), shape).unwrap()
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_infinite() {
            g as f64 == w
        } else {
            (g as f64 - w).abs() <= tol * scale
        };
        assert!(
            ok,
            "{what}[{i}]: got {g}, want {w} (tol {tol} x max {scale})"
        );
    }
}

fn window_strategy() -> impl Strategy<Value = Option<usize>> {
    prop_oneof![Just(None), (0usize..6).prop_map(Some), Just(Some(1000))]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Dense batches with GQA (ratios 1..8), causal and windows, against naive f64.
    #[test]
    fn gqa_and_windows_match_naive(
        seed in any::<u64>(), batch in 1usize..3, hkv in 1usize..3, group in 1usize..9,
        nq in 1usize..19, nk in 1usize..19, d in 1usize..12, causal in any::<bool>(),
        left in window_strategy(), right in window_strategy(),
    ) {
        let mut rng = Rng::new(seed);
        let hq = hkv * group;
        let (q, k, v) = (
            random(&mut rng, batch * nq * hq * d),
            random(&mut rng, batch * nk * hkv * d),
            random(&mut rng, batch * nk * hkv * d),
        );
        let opts = AttentionOptions { causal, window_left: left, window_right: right, ..Default::default() };
        let r = attention::forward(&attention::Inputs::new(&tensor(&q, &[batch, nq, hq, d]), &tensor(&k, &[batch, nk, hkv, d]), &tensor(&v, &[batch, nk, hkv, d])), &opts).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let (mut want_o, mut want_lse) = (Vec::new(), Vec::new());
        for b in 0..batch {
            let qs = &q[b * nq * hq * d..(b + 1) * nq * hq * d];
            let ks = &k[b * nk * hkv * d..(b + 1) * nk * hkv * d];
            let vs = &v[b * nk * hkv * d..(b + 1) * nk * hkv * d];
            let (o, l) = naive_general(&f64s(qs), &f64s(ks), &f64s(vs), (nq, nk, hq, hkv, d), scale,
                |i, j| allowed(i, j, nq, nk, causal, (left, right)));
            want_o.extend(o);
            want_lse.extend(l);
        }
        assert_close("out", &r.out.to_f32_vec(), &want_o, 2e-5);
        assert_close("lse", &r.lse.to_f32_vec(), &want_lse, 2e-5);
    }

    /// A varlen batch (lengths 0 and 1 included) equals one dense call per sequence,
    /// forward and backward.
    #[test]
    fn varlen_is_per_sequence_dense(
        seed in any::<u64>(),
        lens in proptest::collection::vec((0usize..9, 0usize..9), 1..5),
        hkv in 1usize..3, group in 1usize..4, d in 1usize..9, causal in any::<bool>(),
        left in window_strategy(),
    ) {
        let mut rng = Rng::new(seed);
        let hq = hkv * group;
        let mut cu_q = vec![0i32];
        let mut cu_k = vec![0i32];
        for &(a, b) in &lens {
            cu_q.push(cu_q.last().unwrap() + a as i32);
            cu_k.push(cu_k.last().unwrap() + b as i32);
        }
        let (tq, tk) = (*cu_q.last().unwrap() as usize, *cu_k.last().unwrap() as usize);
        prop_assume!(tq > 0 && tk > 0);
        let q = random(&mut rng, tq * hq * d);
        let k = random(&mut rng, tk * hkv * d);
        let v = random(&mut rng, tk * hkv * d);
        let dout = random(&mut rng, tq * hq * d);
        let opts = AttentionOptions { causal, window_left: left, ..Default::default() };
        let seqs = SeqLens { cu_seqlens_q: cu_q.clone(), cu_seqlens_k: cu_k.clone() };
        let (tq_, tk_) = (tensor(&q, &[tq, hq, d]), tensor(&k, &[tk, hkv, d]));
        let tv = tensor(&v, &[tk, hkv, d]);
        let fwd = attention::forward(&attention::Inputs::new(&tq_, &tk_, &tv).varlen(&seqs), &opts).unwrap();
        let grads = attention::backward(&attention::BackwardInputs::new([&tq_, &tk_, &tv, &fwd.out, &fwd.lse, &tensor(&dout, &[tq, hq, d])]).varlen(&seqs), &opts).unwrap();
        let (o, lse) = (fwd.out.to_f32_vec(), fwd.lse.to_f32_vec());
        let (dq, dk, dv) = (grads.dq.to_f32_vec(), grads.dk.to_f32_vec(), grads.dv.to_f32_vec());
        let rq = |b: usize| cu_q[b] as usize * hq * d..cu_q[b + 1] as usize * hq * d;
        let rk = |b: usize| cu_k[b] as usize * hkv * d..cu_k[b + 1] as usize * hkv * d;
        for (b, &(nq, nk)) in lens.iter().enumerate() {
            if nq == 0 {
                continue; // nothing of this sequence in the outputs
            }
            if nk == 0 {
                // No keys: O = 0, LSE = -inf, dQ = 0.
                prop_assert!(o[rq(b)].iter().all(|&x| x == 0.0));
                prop_assert!(dq[rq(b)].iter().all(|&x| x == 0.0));
                for h in 0..hq {
                    for i in 0..nq {
                        prop_assert_eq!(lse[h * tq + cu_q[b] as usize + i], f32::NEG_INFINITY);
                    }
                }
                continue;
            }
            let sq = tensor(&q[rq(b)], &[1, nq, hq, d]);
            let sk = tensor(&k[rk(b)], &[1, nk, hkv, d]);
            let sv = tensor(&v[rk(b)], &[1, nk, hkv, d]);
            let one = attention::forward(&attention::Inputs::new(&sq, &sk, &sv), &opts).unwrap();
            let g = attention::backward(&attention::BackwardInputs::new([&sq, &sk, &sv, &one.out, &one.lse, &tensor(&dout[rq(b)], &[1, nq, hq, d])]), &opts).unwrap();
            prop_assert_eq!(&o[rq(b)], &one.out.to_f32_vec()[..]);
            let one_lse = one.lse.to_f32_vec();
            for h in 0..hq {
                let at = h * tq + cu_q[b] as usize;
                prop_assert_eq!(&lse[at..at + nq], &one_lse[h * nq..(h + 1) * nq]);
            }
            prop_assert_eq!(&dq[rq(b)], &g.dq.to_f32_vec()[..]);
            prop_assert_eq!(&dk[rk(b)], &g.dk.to_f32_vec()[..]);
            prop_assert_eq!(&dv[rk(b)], &g.dv.to_f32_vec()[..]);
        }
        // Keys of sequences without queries get zero gradients.
        for (b, &(nq, _)) in lens.iter().enumerate() {
            if nq == 0 {
                prop_assert!(dk[rk(b)].iter().chain(&dv[rk(b)]).all(|&x| x == 0.0));
            }
        }
    }

    /// GQA gradients equal those of MHA with each K/V head repeated over its group,
    /// summed over the group.
    #[test]
    fn gqa_backward_is_summed_mha(
        seed in any::<u64>(), hkv in 1usize..3, group in 2usize..5, nq in 1usize..9,
        nk in 1usize..9, causal in any::<bool>(),
    ) {
        let (d, hq) = (4, hkv * group);
        let mut rng = Rng::new(seed);
        let q = random(&mut rng, nq * hq * d);
        let k = random(&mut rng, nk * hkv * d);
        let v = random(&mut rng, nk * hkv * d);
        let dout = random(&mut rng, nq * hq * d);
        let repeat = |x: &[f32]| -> Vec<f32> {
            let mut r = Vec::new();
            for j in 0..nk {
                for h in 0..hq {
                    let hk = h / group;
                    r.extend_from_slice(&x[(j * hkv + hk) * d..(j * hkv + hk + 1) * d]);
                }
            }
            r
        };
        let opts = AttentionOptions { causal, ..Default::default() };
        let run = |kk: &[f32], vv: &[f32], h: usize| {
            let (tq, tk, tv) = (tensor(&q, &[1, nq, hq, d]), tensor(kk, &[1, nk, h, d]), tensor(vv, &[1, nk, h, d]));
            let f = attention::forward(&attention::Inputs::new(&tq, &tk, &tv), &opts).unwrap();
            let g = attention::backward(&attention::BackwardInputs::new([&tq, &tk, &tv, &f.out, &f.lse, &tensor(&dout, &[1, nq, hq, d])]), &opts).unwrap();
            (f.out.to_f32_vec(), g.dq.to_f32_vec(), g.dk.to_f32_vec(), g.dv.to_f32_vec())
        };
        let (o, dq, dk, dv) = run(&k, &v, hkv);
        let (o_m, dq_m, dk_m, dv_m) = run(&repeat(&k), &repeat(&v), hq);
        prop_assert_eq!(o, o_m);
        prop_assert_eq!(dq, dq_m);
        let sum = |x: &[f32]| -> Vec<f64> {
            let mut r = vec![0f64; nk * hkv * d];
            for j in 0..nk {
                for h in 0..hq {
                    for e in 0..d {
                        r[(j * hkv + h / group) * d + e] += x[(j * hq + h) * d + e] as f64;
                    }
                }
            }
            r
        };
        assert_close("dk", &dk, &sum(&dk_m), 1e-5);
        assert_close("dv", &dv, &sum(&dv_m), 1e-5);
    }
}

#[test]
fn windows_wider_than_the_sequence_are_unbounded() {
    let mut rng = Rng::new(7);
    let (nq, nk, h, d) = (5, 9, 2, 8);
    let q = tensor(&random(&mut rng, nq * h * d), &[1, nq, h, d]);
    let k = tensor(&random(&mut rng, nk * h * d), &[1, nk, h, d]);
    let v = tensor(&random(&mut rng, nk * h * d), &[1, nk, h, d]);
    let run = |o: AttentionOptions| {
        attention::forward(&attention::Inputs::new(&q, &k, &v), &o)
            .unwrap()
            .out
            .to_f32_vec()
    };
    let wide = Some(nq + nk + 100);
    let plain = run(AttentionOptions::default());
    let causal = run(AttentionOptions {
        causal: true,
        ..Default::default()
    });
    assert_ne!(plain, causal, "the control: causal masks something here");
    assert_eq!(
        run(AttentionOptions {
            window_left: wide,
            window_right: wide,
            ..Default::default()
        }),
        plain
    );
    assert_eq!(
        run(AttentionOptions {
            window_left: wide,
            window_right: Some(0),
            ..Default::default()
        }),
        causal
    );
    assert_eq!(
        run(AttentionOptions {
            window_left: wide,
            causal: true,
            ..Default::default()
        }),
        causal
    );
    // window (0, 0) with nq == nk is attention to oneself: O = V.
    let qs = tensor(&random(&mut rng, nk * h * d), &[1, nk, h, d]);
    let diag = attention::forward(
        &attention::Inputs::new(&qs, &k, &v),
        &AttentionOptions {
            window_left: Some(0),
            window_right: Some(0),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(diag.out.to_f32_vec(), v.to_f32_vec());
}

/// (batch, nq, nk, heads, heads_kv, head_dim).
type Dims = (usize, usize, usize, usize, usize, usize);

/// Builds the problem of a dense call through the public validator.
fn problem(
    dims: (usize, usize, usize, usize, usize, usize),
    opts: &AttentionOptions,
) -> AttentionProblem {
    let (b, nq, nk, hq, hkv, d) = dims;
    let (lq, lk) = (
        Layout::contiguous(&[b, nq, hq, d]),
        Layout::contiguous(&[b, nk, hkv, d]),
    );
    attention::validate(
        (DType::F32, &lq),
        (DType::F32, &lk),
        (DType::F32, &lk),
        opts,
    )
    .unwrap()
}

/// Central finite differences of L = sum(dO * O) against the reference backward, in f64.
fn check_gradients(p: &AttentionProblem, seed: u64) {
    let mut rng = Rng::new(seed);
    let nq_el = p.rows_q() * p.heads * p.head_dim;
    let nk_el = p.rows_k() * p.heads_kv * p.head_dim;
    let mut x: Vec<Vec<f64>> = [nq_el, nk_el, nk_el]
        .iter()
        .map(|&n| (0..n).map(|_| rng.normal() as f64).collect())
        .collect();
    let dout: Vec<f64> = (0..nq_el).map(|_| rng.normal() as f64).collect();
    let (out, lse) = reference::try_attention(p, &x[0], &x[1], &x[2]).unwrap();
    let g = reference::try_attention_backward(p, &x[0], &x[1], &x[2], &out, &lse, &dout).unwrap();
    let loss = |x: &[Vec<f64>]| -> f64 {
        let (o, _) = reference::try_attention(p, &x[0], &x[1], &x[2]).unwrap();
        o.iter().zip(&dout).map(|(a, b)| a * b).sum()
    };
    let h = 1e-5;
    for (t, (name, grad)) in [("dq", &g.dq), ("dk", &g.dk), ("dv", &g.dv)]
        .into_iter()
        .enumerate()
    {
        let max = grad.iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(
            max > 1e-3,
            "{name}: gradients must not be all zero in this case"
        );
        for i in 0..x[t].len() {
            let orig = x[t][i];
            x[t][i] = orig + h;
            let up = loss(&x);
            x[t][i] = orig - h;
            let down = loss(&x);
            x[t][i] = orig;
            let fd = (up - down) / (2.0 * h);
            assert!(
                (fd - grad[i]).abs() <= 1e-7 + 1e-6 * fd.abs().max(max),
                "{name}[{i}]: backward {} vs finite difference {fd}",
                grad[i]
            );
        }
    }
}

#[test]
fn backward_matches_finite_differences_dense() {
    let cases: &[(Dims, AttentionOptions)] = &[
        ((1, 5, 7, 2, 2, 4), AttentionOptions::default()),
        (
            (2, 6, 4, 2, 1, 3),
            AttentionOptions {
                causal: true,
                ..Default::default()
            },
        ),
        // Nq > Nk causal: the first rows see no key (zero gradients there).
        (
            (1, 7, 3, 1, 1, 4),
            AttentionOptions {
                causal: true,
                ..Default::default()
            },
        ),
        (
            (1, 8, 8, 4, 2, 4),
            AttentionOptions {
                window_left: Some(2),
                window_right: Some(1),
                ..Default::default()
            },
        ),
        (
            (1, 5, 9, 3, 1, 5),
            AttentionOptions {
                scale: Some(0.7),
                window_left: Some(3),
                causal: true,
                ..Default::default()
            },
        ),
    ];
    for (i, (dims, opts)) in cases.iter().enumerate() {
        check_gradients(&problem(*dims, opts), 100 + i as u64);
    }
}

#[test]
fn backward_matches_finite_differences_varlen() {
    let seqs = SeqLens {
        cu_seqlens_q: vec![0, 0, 1, 5, 8],
        cu_seqlens_k: vec![0, 2, 2, 7, 10],
    };
    for (i, opts) in [
        AttentionOptions::default(),
        AttentionOptions {
            causal: true,
            ..Default::default()
        },
        AttentionOptions {
            window_left: Some(1),
            window_right: Some(1),
            ..Default::default()
        },
    ]
    .iter()
    .enumerate()
    {
        let (lq, lk) = (
            Layout::contiguous(&[8, 4, 3]),
            Layout::contiguous(&[10, 2, 3]),
        );
        let p = attention::validate_varlen(
            (DType::F32, &lq),
            (DType::F32, &lk),
            (DType::F32, &lk),
            &seqs,
            opts,
        )
        .unwrap();
        assert_eq!((p.batch, p.seqlen_q, p.seqlen_k), (4, 4, 5));
        check_gradients(&p, 200 + i as u64);
    }
}

#[test]
fn backward_checks_its_inputs() {
    let mut rng = Rng::new(3);
    let q = tensor(&random(&mut rng, 2 * 4 * 8), &[1, 2, 4, 8]);
    let k = tensor(&random(&mut rng, 3 * 2 * 8), &[1, 3, 2, 8]);
    let f = attention::forward(
        &attention::Inputs::new(&q, &k, &k),
        &AttentionOptions::default(),
    )
    .unwrap();
    let opts = AttentionOptions::default();
    let ok = attention::backward(
        &attention::BackwardInputs::new([&q, &k, &k, &f.out, &f.lse, &q]),
        &opts,
    );
    assert!(ok.is_ok());
    let e = attention::backward(
        &attention::BackwardInputs::new([&q, &k, &k, &f.out, &f.lse, &k]),
        &opts,
    )
    .unwrap_err();
    assert!(e.to_string().contains("dout"), "{e}");
    let e = attention::backward(
        &attention::BackwardInputs::new([&q, &k, &k, &f.out, &q, &q]),
        &opts,
    )
    .unwrap_err();
    assert!(e.to_string().contains("lse"), "{e}");
    let lse16 = f.lse.to_contiguous(DType::F16);
    let e = attention::backward(
        &attention::BackwardInputs::new([&q, &k, &k, &f.out, &lse16, &q]),
        &opts,
    )
    .unwrap_err();
    assert!(e.to_string().contains("float32"), "{e}");
    let e = attention::backward(
        &attention::BackwardInputs::new([
            &q,
            &k,
            &k,
            &f.out,
            &f.lse,
            &q.to_contiguous(DType::BF16),
        ]),
        &opts,
    )
    .unwrap_err();
    assert!(e.to_string().contains("dout is bfloat16"), "{e}");
}
