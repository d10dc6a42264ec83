//! Helpers shared by the Longformer integration tests (tests/longformer.rs,
//! tests/longformer_schedule.rs, tests/longformer_errors.rs): an independent dense
//! definition of the rule and of the attention it defines, and random cases.
//!
//! Independent definition: `allowed` below states the rules as one predicate on (i, j)
//! (no key lists, no dilation loop), builds the full N x N mask, and `naive` runs a plain
//! f64 softmax over it with the row's projections.
#![allow(dead_code)]

use crate::common::Rng;
use flashkernels::longformer::{
    self, GlobalProjections, LongformerOptions, LongformerProblem, TokenMask,
};
use flashkernels::{DType, HostTensor, Layout};
use proptest::prelude::*;

pub fn random(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal()).collect()
}

pub fn tensor(data: &[f32], shape: &[usize]) -> HostTensor {
    HostTensor::from_vec(data.to_vec(), shape).unwrap()
}

pub fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want
        .iter()
        .filter(|x| x.is_finite())
        .fold(0f64, |m, x| m.max(x.abs()))
        .max(1.0);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_infinite() {
            g as f64 == w
        } else {
            (g as f64 - w).abs() <= tol * scale
        };
        assert!(ok, "{what}[{i}]: got {g}, want {w} (tol {tol} x {scale})");
    }
}

/// One sequence's masks and the rules' parameters.
#[derive(Debug, Clone)]
pub struct Rules {
    pub window: usize,
    pub dilation: usize,
    pub causal: bool,
}

/// The Longformer rule as one predicate: may query i see key j?
pub fn allowed(i: usize, j: usize, global: &[bool], padded: &[bool], r: &Rules) -> bool {
    if padded[i] || padded[j] || (r.causal && j > i) {
        return false;
    }
    if global[i] || global[j] {
        return true;
    }
    let dist = i.abs_diff(j);
    dist % r.dilation == 0 && dist / r.dilation <= r.window
}

/// Dense masked attention in f64 over (B, N, H, D) buffers: O and LSE (B, H, N).
#[allow(clippy::too_many_arguments)]
pub fn naive(
    x: [&[f64]; 6],
    [bs, n, hs, d]: [usize; 4],
    global: &[bool],
    padded: &[bool],
    window: usize,
    dilation: &[usize],
    causal: bool,
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let [q, k, v, qg, kg, vg] = x;
    let mut out = vec![0.0; bs * n * hs * d];
    let mut lse = vec![f64::NEG_INFINITY; bs * hs * n];
    let idx = |b: usize, i: usize, h: usize, c: usize| ((b * n + i) * hs + h) * d + c;
    for b in 0..bs {
        let (gl, pd) = (&global[b * n..(b + 1) * n], &padded[b * n..(b + 1) * n]);
        for h in 0..hs {
            let rules = Rules {
                window,
                dilation: dilation[h],
                causal,
            };
            let mask: Vec<Vec<bool>> = (0..n)
                .map(|i| (0..n).map(|j| allowed(i, j, gl, pd, &rules)).collect())
                .collect();
            for i in 0..n {
                let (qq, kk, vv) = if gl[i] { (qg, kg, vg) } else { (q, k, v) };
                let s: Vec<f64> = (0..n)
                    .map(|j| {
                        if mask[i][j] {
                            scale
                                * (0..d)
                                    .map(|c| qq[idx(b, i, h, c)] * kk[idx(b, j, h, c)])
                                    .sum::<f64>()
                        } else {
                            f64::NEG_INFINITY
                        }
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..d {
                    out[idx(b, i, h, c)] =
                        (0..n).map(|j| e[j] * vv[idx(b, j, h, c)]).sum::<f64>() / z;
                }
                lse[(b * hs + h) * n + i] = m + z.ln();
            }
        }
    }
    (out, lse)
}

/// A random Longformer case.
#[derive(Debug, Clone)]
pub struct Case {
    pub dims: [usize; 4],
    pub window: usize,
    pub dilation: Vec<usize>,
    pub causal: bool,
    pub separate: bool,
    pub global: Vec<bool>,
    pub padded: Vec<bool>,
}

impl Case {
    pub fn opts(&self) -> LongformerOptions {
        LongformerOptions {
            window: self.window,
            dilation: self.dilation.clone(),
            causal: self.causal,
            scale: None,
        }
    }

    pub fn per_head_dilation(&self) -> Vec<usize> {
        if self.dilation.len() == 1 {
            vec![self.dilation[0]; self.dims[2]]
        } else {
            self.dilation.clone()
        }
    }

    pub fn masks(&self) -> (TokenMask, TokenMask) {
        let [b, n, _, _] = self.dims;
        (
            TokenMask::new(self.global.clone(), &[b, n]),
            TokenMask::new(self.padded.clone(), &[b, n]),
        )
    }

    pub fn problem(&self) -> LongformerProblem {
        let l = Layout::contiguous(&self.dims);
        let g = [(DType::F32, &l); 3];
        let (gm, pm) = self.masks();
        longformer::validate(
            (DType::F32, &l),
            (DType::F32, &l),
            (DType::F32, &l),
            self.separate.then_some(g),
            Some(&gm),
            Some(&pm),
            &self.opts(),
        )
        .unwrap()
    }
}

/// Global tokens at the start, the end, the middle and random places (some inside each
/// other's windows); padding at random and at the end, never on a global token.
pub fn case_strategy(max_n: usize, max_d: usize) -> impl Strategy<Value = (u64, Case)> {
    (
        any::<u64>(),
        1usize..3,
        1usize..max_n,
        1usize..4,
        1usize..max_d,
        prop_oneof![0usize..4, 0usize..40, Just(usize::MAX / 2)],
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        0u32..4,
        0u32..3,
    )
        .prop_map(
            |(seed, b, n, h, d, window, per_head, causal, separate, gmode, pmode)| {
                let mut rng = Rng::new(seed);
                let dilation = if per_head {
                    (0..h).map(|_| 1 + rng.below(4)).collect()
                } else {
                    vec![1 + rng.below(4)]
                };
                let mut global = vec![false; b * n];
                let mut padded = vec![false; b * n];
                for s in 0..b {
                    let row = &mut global[s * n..(s + 1) * n];
                    match gmode {
                        0 => {}
                        1 => row[0] = true,
                        2 => {
                            row[n - 1] = true;
                            row[n / 2] = true;
                        }
                        _ => {
                            for x in row.iter_mut() {
                                *x = rng.below(4) == 0;
                            }
                        }
                    }
                    let prow = &mut padded[s * n..(s + 1) * n];
                    match pmode {
                        0 => {}
                        1 => {
                            let len = 1 + rng.below(n);
                            for x in prow[len..].iter_mut() {
                                *x = true;
                            }
                        }
                        _ => {
                            for x in prow.iter_mut() {
                                *x = rng.below(4) == 0;
                            }
                        }
                    }
                }
                for (p, &g) in padded.iter_mut().zip(&global) {
                    if g {
                        *p = false;
                    }
                }
                (
                    seed,
                    Case {
                        dims: [b, n, h, d],
                        window,
                        dilation,
                        causal,
                        separate,
                        global,
                        padded,
                    },
                )
            },
        )
}

pub fn six(rng: &mut Rng, c: &Case) -> [Vec<f32>; 6] {
    let len: usize = c.dims.iter().product();
    let [q, k, v] = std::array::from_fn(|_| random(rng, len));
    let [qg, kg, vg] = if c.separate {
        std::array::from_fn(|_| random(rng, len))
    } else {
        [q.clone(), k.clone(), v.clone()]
    };
    [q, k, v, qg, kg, vg]
}

pub fn forward_api(c: &Case, x: &[Vec<f32>; 6]) -> longformer::LongformerOutput {
    let t: Vec<HostTensor> = x.iter().map(|v| tensor(v, &c.dims)).collect();
    let (gm, pm) = c.masks();
    let globals = c.separate.then(|| GlobalProjections {
        q: &t[3],
        k: &t[4],
        v: &t[5],
    });
    longformer::forward(
        &longformer::Inputs::new(&t[0], &t[1], &t[2])
            .globals(globals)
            .masks(Some(&gm), Some(&pm)),
        &c.opts(),
    )
    .unwrap()
}

pub fn naive_of(c: &Case, x: &[Vec<f64>; 6]) -> (Vec<f64>, Vec<f64>) {
    naive(
        std::array::from_fn(|i| x[i].as_slice()),
        c.dims,
        &c.global,
        &c.padded,
        c.window,
        &c.per_head_dilation(),
        c.causal,
        1.0 / (c.dims[3] as f64).sqrt(),
    )
}
