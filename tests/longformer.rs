//! Longformer attention: the CPU reference against an independent dense definition, the
//! backward against finite differences, the tile plan's properties, and the error paths.
//!
//! Independent definition: `allowed` below states the rules as one predicate on (i, j)
//! (no key lists, no dilation loop), builds the full N x N mask, and `naive` runs a plain
//! f64 softmax over it with the row's projections.

mod common;

use common::Rng;
use flashkernels::attention::{self, AttentionOptions};
use flashkernels::longformer::schedule::{self, Pass, WorkList};
use flashkernels::longformer::{
    self, GlobalProjections, LongformerOptions, LongformerProblem, TokenMask,
};
use flashkernels::reference::{self, LongformerInputs};
use flashkernels::{DType, Error, HostTensor, Layout};
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
struct Rules {
    window: usize,
    dilation: usize,
    causal: bool,
}

/// The Longformer rule as one predicate: may query i see key j?
fn allowed(i: usize, j: usize, global: &[bool], padded: &[bool], r: &Rules) -> bool {
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
fn naive(
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
struct Case {
    dims: [usize; 4],
    window: usize,
    dilation: Vec<usize>,
    causal: bool,
    separate: bool,
    global: Vec<bool>,
    padded: Vec<bool>,
}

impl Case {
    fn opts(&self) -> LongformerOptions {
        LongformerOptions {
            window: self.window,
            dilation: self.dilation.clone(),
            causal: self.causal,
            scale: None,
        }
    }

    fn per_head_dilation(&self) -> Vec<usize> {
        if self.dilation.len() == 1 {
            vec![self.dilation[0]; self.dims[2]]
        } else {
            self.dilation.clone()
        }
    }

    fn masks(&self) -> (TokenMask, TokenMask) {
        let [b, n, _, _] = self.dims;
        (
            TokenMask::new(self.global.clone(), &[b, n]),
            TokenMask::new(self.padded.clone(), &[b, n]),
        )
    }

    fn problem(&self) -> LongformerProblem {
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
fn case_strategy(max_n: usize, max_d: usize) -> impl Strategy<Value = (u64, Case)> {
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

fn six(rng: &mut Rng, c: &Case) -> [Vec<f32>; 6] {
    let len: usize = c.dims.iter().product();
    let [q, k, v] = std::array::from_fn(|_| random(rng, len));
    let [qg, kg, vg] = if c.separate {
        std::array::from_fn(|_| random(rng, len))
    } else {
        [q.clone(), k.clone(), v.clone()]
    };
    [q, k, v, qg, kg, vg]
}

fn forward_api(c: &Case, x: &[Vec<f32>; 6]) -> longformer::LongformerOutput {
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

fn naive_of(c: &Case, x: &[Vec<f64>; 6]) -> (Vec<f64>, Vec<f64>) {
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
    let (o, _) = reference::longformer(p, &inputs);
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
        let (o, l) = reference::longformer(&p, &inputs);
        let g = reference::longformer_backward(&p, &inputs, &o, &l, &dout);
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

    /// Every work list names every inner tile that holds a pair of its pass (and, with
    /// all tokens local, exactly those), in increasing order.
    #[test]
    fn work_lists_cover_their_pass((_seed, c) in case_strategy(70, 2), bo in 1usize..20, bi in 1usize..20) {
        let p = c.problem();
        check_work_lists(&p, bo, bi).map_err(TestCaseError::fail)?;
    }

    /// The kernels' passes split the rule: LOCAL + GLOBAL_ROWS is the independent
    /// definition, LOCAL_BAND + GLOBAL_COLS is LOCAL, each disjointly.
    #[test]
    fn passes_partition_the_rule((_seed, c) in case_strategy(40, 2)) {
        let p = c.problem();
        let [bs, n, _, _] = c.dims;
        for b in 0..bs {
            let (gl, pd) = (&c.global[b * n..(b + 1) * n], &c.padded[b * n..(b + 1) * n]);
            for (h, &dilation) in c.per_head_dilation().iter().enumerate() {
                let r = Rules { window: c.window, dilation, causal: c.causal };
                for i in 0..n {
                    for j in 0..n {
                        let at = |pass| p.pass_allows(pass, b, h, i, j);
                        let (l, g) = (at(Pass::Local), at(Pass::GlobalRows));
                        prop_assert!(!(l && g));
                        prop_assert_eq!(l || g, allowed(i, j, gl, pd, &r), "({}, {})", i, j);
                        let (band, cols) = (at(Pass::LocalBand), at(Pass::GlobalCols));
                        prop_assert!(!(band && cols));
                        prop_assert_eq!(band || cols, l);
                    }
                }
            }
        }
    }
}

/// The inner tiles (of `bi`) the brute-force rule needs for each outer tile (of `bo`), per
/// pass, compared with the work lists.
fn check_work_lists(p: &LongformerProblem, bo: usize, bi: usize) -> Result<(), String> {
    let n = p.seqlen;
    let (class, dilations) = p.head_classes();
    let nc = dilations.len();
    let all_local = p.global.iter().chain(&p.padding).all(|&x| !x);
    let check = |name: &str, list: &WorkList, r: usize, mut want: Vec<usize>, exact: bool| {
        want.sort_unstable();
        want.dedup();
        let got: Vec<usize> = list.row(r).iter().map(|&t| t as usize).collect();
        if got.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!("{name} row {r}: not increasing: {got:?}"));
        }
        if let Some(t) = want.iter().find(|t| !got.contains(t)) {
            return Err(format!(
                "{name} row {r}: misses tile {t}: got {got:?}, need {want:?}"
            ));
        }
        if exact && got != want {
            return Err(format!(
                "{name} row {r}: got {got:?}, exactly {want:?} expected"
            ));
        }
        Ok(())
    };
    let local = p.local_rows_work(bo, bi);
    let band = p.band_keys_work(bo, bi);
    if local.rows() != p.batch * nc * n.div_ceil(bo) || band.rows() != local.rows() {
        return Err(format!("row counts {} {}", local.rows(), band.rows()));
    }
    for b in 0..p.batch {
        for (h, &cl) in class.iter().enumerate() {
            for m in 0..n.div_ceil(bo) {
                let r = (b * nc + cl as usize) * n.div_ceil(bo) + m;
                let outer = m * bo..((m + 1) * bo).min(n);
                let pairs = |pass: Pass, q_outer: bool| {
                    outer
                        .clone()
                        .flat_map(|x| (0..n).map(move |y| (x, y)))
                        .filter(move |&(x, y)| {
                            let (i, j) = if q_outer { (x, y) } else { (y, x) };
                            p.pass_allows(pass, b, h, i, j)
                        })
                        .map(|(_, y)| y / bi)
                        .collect::<Vec<_>>()
                };
                check("local", &local, r, pairs(Pass::Local, true), all_local)?;
                check("band", &band, r, pairs(Pass::LocalBand, false), all_local)?;
            }
        }
    }
    let Some(g) = p.gathered_globals() else {
        return Ok(());
    };
    let rows = |b: usize| -> Vec<usize> {
        g.rows[b * g.per_seq..(b + 1) * g.per_seq]
            .iter()
            .filter(|&&x| x >= 0)
            .map(|&x| x as usize)
            .collect()
    };
    // LOCAL with packed global keys: contiguous tiles for band pairs, then gathered tiles.
    let packed = p.local_rows_packed_work(&g, bo, bi);
    let key_tiles = n.div_ceil(bi);
    for b in 0..p.batch {
        let listed = rows(b);
        for (h, &cl) in class.iter().enumerate() {
            for m in 0..n.div_ceil(bo) {
                let r = (b * nc + cl as usize) * n.div_ceil(bo) + m;
                let outer = m * bo..((m + 1) * bo).min(n);
                let mut want: Vec<usize> = outer
                    .clone()
                    .flat_map(|i| (0..n).map(move |j| (i, j)))
                    .filter(|&(i, j)| p.pass_allows(Pass::LocalBand, b, h, i, j))
                    .map(|(_, j)| j / bi)
                    .collect();
                want.extend(
                    listed
                        .iter()
                        .enumerate()
                        .filter(|&(_, &j)| {
                            outer
                                .clone()
                                .any(|i| p.pass_allows(Pass::GlobalCols, b, h, i, j))
                        })
                        .map(|(x, _)| key_tiles + x / bi),
                );
                check("packed local", &packed, r, want, false)?;
            }
        }
    }
    let cols = p.global_cols_work(&g, bo, bi);
    let grows = p.global_rows_work(&g, bo, bi);
    let by_key = p.global_rows_by_key_work(&g, bo, bi);
    for b in 0..p.batch {
        let listed = rows(b);
        for h in 0..p.heads {
            for m in 0..g.per_seq.div_ceil(bo) {
                let r = b * g.per_seq.div_ceil(bo) + m;
                let tile = listed.iter().skip(m * bo).take(bo);
                let want_cols = tile
                    .clone()
                    .flat_map(|&j| {
                        (0..n).filter(move |&i| p.pass_allows(Pass::GlobalCols, b, h, i, j))
                    })
                    .map(|i| i / bi)
                    .collect();
                check("global cols", &cols, r, want_cols, false)?;
                let want_rows = tile
                    .flat_map(|&i| {
                        (0..n).filter(move |&j| p.pass_allows(Pass::GlobalRows, b, h, i, j))
                    })
                    .map(|j| j / bi)
                    .collect();
                check("global rows", &grows, r, want_rows, false)?;
            }
            for kt in 0..n.div_ceil(bo) {
                let r = b * n.div_ceil(bo) + kt;
                let want = listed
                    .iter()
                    .enumerate()
                    .filter(|&(_, &i)| {
                        (kt * bo..((kt + 1) * bo).min(n))
                            .any(|j| p.pass_allows(Pass::GlobalRows, b, h, i, j))
                    })
                    .map(|(x, _)| x / bi)
                    .collect();
                check("global rows by key", &by_key, r, want, false)?;
            }
        }
    }
    Ok(())
}

#[test]
fn work_lists_at_the_kernel_tile_sizes() {
    // Long windows, dilation beyond a tile, a global run longer than a tile.
    for (n, w, dil, globals) in [
        (300, 40, 1, vec![0, 5, 299]),
        (500, 3, 150, vec![250]),
        (700, 2, 70, (100..240).collect::<Vec<_>>()),
    ] {
        let p = plain_case(n, w, dil, &globals).problem();
        check_work_lists(&p, schedule::FWD_BLOCK_M, schedule::FWD_BLOCK_N).unwrap();
        check_work_lists(&p, schedule::BWD_BLOCK, schedule::BWD_BLOCK).unwrap();
    }
}

fn plain_case(n: usize, window: usize, dilation: usize, globals: &[usize]) -> Case {
    let mut global = vec![false; n];
    for &g in globals {
        global[g] = true;
    }
    Case {
        dims: [1, n, 1, 1],
        window,
        dilation: vec![dilation],
        causal: false,
        separate: false,
        global,
        padded: vec![false; n],
    }
}

#[test]
fn work_lists_grow_linearly_in_seqlen() {
    let (bm, bn): (usize, usize) = (16, 16);
    for (w, dil) in [(0, 1), (3, 1), (8, 2), (32, 1), (5, 4), (2, 40)] {
        for globals in [vec![], vec![0], vec![0, 7]] {
            let count = |n: usize| {
                let p = plain_case(n, w, dil, &globals).problem();
                let mut c = p.local_rows_work(bm, bn).len() + p.band_keys_work(bn, bm).len();
                if let Some(g) = p.gathered_globals() {
                    c += p.global_cols_work(&g, bn, bm).len()
                        + p.global_rows_work(&g, bm, bn).len()
                        + p.global_rows_by_key_work(&g, bn, bm).len();
                }
                c
            };
            let (c1, c2, c4) = (count(256), count(512), count(1024));
            // Linear: doubling N doubles the increment (a quadratic schedule would
            // quadruple it), up to the constant overlaps at the ends and globals.
            assert!(
                c1 < c2 && c2 < c4 && c4 - c2 <= 2 * (c2 - c1) + 8,
                "w {w} d {dil} g {globals:?}: {c1} {c2} {c4}"
            );
            // A band of half-width w*d covers at most (bm + 2wd)/bn + 2 key tiles per query
            // tile (both directions), plus a row and a column of tiles per global token
            // (each counted by two passes).
            let n: usize = 1024;
            let band = 2 * n.div_ceil(bm) * ((bm + 2 * w * dil) / bn + 2);
            let glob = 2 * globals.len() * (n.div_ceil(bm) + n.div_ceil(bn));
            assert!(
                c4 <= band + glob,
                "w {w} d {dil} g {globals:?}: {c4} > {band} + {glob}"
            );
            // And much fewer than the dense grid.
            assert!(c4 < n.div_ceil(bm) * n.div_ceil(bn));
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
        let gm = TokenMask::from_positions(1, 9, &[(0, 4)]);
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

// ---- error paths ----

fn t(shape: &[usize]) -> HostTensor {
    let n: usize = shape.iter().product();
    HostTensor::from_vec((0..n).map(|i| (i as f32 * 0.37).sin()).collect(), shape).unwrap()
}

fn fail(
    q: &HostTensor,
    k: &HostTensor,
    v: &HostTensor,
    globals: Option<GlobalProjections<'_>>,
    gm: Option<&TokenMask>,
    pm: Option<&TokenMask>,
    opts: &LongformerOptions,
) -> Error {
    longformer::forward(
        &longformer::Inputs::new(q, k, v)
            .globals(globals)
            .masks(gm, pm),
        opts,
    )
    .expect_err("must be rejected")
}

fn assert_mentions(e: &Error, parts: &[&str]) {
    let msg = e.to_string();
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} does not mention {p:?}");
    }
}

#[test]
fn valid_inputs_pass() {
    let q = t(&[2, 7, 3, 4]);
    let gm = TokenMask::from_positions(2, 7, &[(0, 0), (1, 6)]);
    let pm = TokenMask::from_positions(2, 7, &[(1, 5)]);
    let opts = LongformerOptions {
        dilation: vec![1, 2, 3],
        ..LongformerOptions::new(2)
    };
    let g = GlobalProjections {
        q: &q,
        k: &q,
        v: &q,
    };
    longformer::forward(
        &longformer::Inputs::new(&q, &q, &q)
            .globals(Some(g))
            .masks(Some(&gm), Some(&pm)),
        &opts,
    )
    .unwrap();
}

#[test]
fn bad_dilation() {
    let q = t(&[1, 5, 3, 2]);
    for (dil, parts) in [
        (vec![0], vec!["dilation", ">= 1", "head 0"]),
        (vec![1, 0, 2], vec!["dilation", "head 1"]),
        (vec![1, 2], vec!["dilation", "2 values", "3"]),
        (vec![], vec!["dilation", "0 values"]),
    ] {
        let opts = LongformerOptions {
            dilation: dil,
            ..LongformerOptions::new(1)
        };
        let e = fail(&q, &q, &q, None, None, None, &opts);
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        assert_mentions(&e, &parts);
    }
}

#[test]
fn bad_scale() {
    let q = t(&[1, 5, 1, 2]);
    for s in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let opts = LongformerOptions {
            scale: Some(s),
            ..LongformerOptions::new(1)
        };
        let e = fail(&q, &q, &q, None, None, None, &opts);
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        assert_mentions(&e, &["scale"]);
    }
}

#[test]
fn mask_shapes() {
    let q = t(&[2, 5, 1, 2]);
    let opts = LongformerOptions::new(1);
    let rank = TokenMask::new(vec![false; 10], &[10]);
    let e = fail(&q, &q, &q, None, Some(&rank), None, &opts);
    assert!(
        matches!(
            e,
            Error::Rank {
                name: "global_mask",
                expected: 2,
                ..
            }
        ),
        "{e}"
    );
    let wrong = TokenMask::new(vec![false; 12], &[2, 6]);
    let e = fail(&q, &q, &q, None, None, Some(&wrong), &opts);
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    assert_mentions(&e, &["padding_mask", "[2, 6]", "[2, 5]"]);
    let short = TokenMask::new(vec![false; 9], &[2, 5]);
    let e = fail(&q, &q, &q, None, Some(&short), None, &opts);
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert_mentions(&e, &["global_mask", "10", "9"]);
}

#[test]
fn padded_token_cannot_be_global() {
    let q = t(&[2, 5, 1, 2]);
    let gm = TokenMask::from_positions(2, 5, &[(1, 3)]);
    let pm = TokenMask::from_positions(2, 5, &[(1, 3), (0, 4)]);
    let e = fail(
        &q,
        &q,
        &q,
        None,
        Some(&gm),
        Some(&pm),
        &LongformerOptions::new(1),
    );
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert_mentions(&e, &["token 3", "sequence 1", "global", "padded"]);
}

#[test]
fn shape_and_dtype_mismatches() {
    let opts = LongformerOptions::new(1);
    let q = t(&[1, 5, 2, 4]);
    let e = fail(&q, &t(&[1, 6, 2, 4]), &q, None, None, None, &opts);
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    assert_mentions(&e, &["k", "[1, 6, 2, 4]", "[1, 5, 2, 4]"]);
    let e = fail(&q, &q, &t(&[1, 5, 1, 4]), None, None, None, &opts);
    assert_mentions(&e, &["v", "[1, 5, 1, 4]"]);
    let bad = t(&[1, 5, 2, 3]);
    let g = GlobalProjections {
        q: &q,
        k: &bad,
        v: &q,
    };
    let e = fail(&q, &q, &q, Some(g), None, None, &opts);
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    assert_mentions(&e, &["k_global"]);
    let half = HostTensor::from_fn(DType::F16, &[1, 5, 2, 4], |_| 0.5).unwrap();
    let g = GlobalProjections {
        q: &q,
        k: &q,
        v: &half,
    };
    let e = fail(&q, &q, &q, Some(g), None, None, &opts);
    assert!(matches!(e, Error::DTypeMismatch { .. }), "{e}");
    assert_mentions(&e, &["v_global", "float16", "float32"]);
    let e = fail(&q, &half, &q, None, None, None, &opts);
    assert!(matches!(e, Error::DTypeMismatch { .. }), "{e}");
}

#[test]
fn rank_empty_and_stride() {
    let opts = LongformerOptions::new(1);
    let q = t(&[1, 5, 2, 4]);
    let e = fail(&t(&[5, 2, 4]), &q, &q, None, None, None, &opts);
    assert!(
        matches!(
            e,
            Error::Rank {
                name: "q",
                expected: 4,
                ..
            }
        ),
        "{e}"
    );
    let g = GlobalProjections {
        q: &t(&[1, 5, 8]),
        k: &q,
        v: &q,
    };
    let e = fail(&q, &q, &q, Some(g), None, None, &opts);
    assert!(
        matches!(
            e,
            Error::Rank {
                name: "q_global",
                ..
            }
        ),
        "{e}"
    );
    let empty = t(&[1, 0, 2, 4]);
    let e = fail(&empty, &empty, &empty, None, None, None, &opts);
    assert!(matches!(e, Error::Empty { name: "q", .. }), "{e}");
    // (B, N, D, H) seen as (B, N, H, D): the head dim is strided.
    let e = fail(
        &t(&[1, 5, 4, 2]).transpose(2, 3),
        &q,
        &q,
        None,
        None,
        None,
        &opts,
    );
    assert!(matches!(e, Error::NonUnitStride { name: "q", .. }), "{e}");
}

#[test]
fn strided_inputs_are_read_by_layout() {
    // A (B, H, N, D) tensor passed as (B, N, H, D) by swapping strides gives the same
    // result as its contiguous copy.
    let mut rng = Rng::new(5);
    let bhnd = tensor(&random(&mut rng, 2 * 3 * 7 * 4), &[2, 3, 7, 4]);
    let strided = bhnd.transpose(1, 2);
    let contiguous = strided.to_contiguous(DType::F32);
    let gm = TokenMask::from_positions(2, 7, &[(0, 3), (1, 0)]);
    let opts = LongformerOptions::new(1);
    let a = longformer::forward(
        &longformer::Inputs::new(&strided, &strided, &strided)
            .globals(None)
            .masks(Some(&gm), None),
        &opts,
    )
    .unwrap();
    let b = longformer::forward(
        &longformer::Inputs::new(&contiguous, &contiguous, &contiguous)
            .globals(None)
            .masks(Some(&gm), None),
        &opts,
    )
    .unwrap();
    assert_eq!(a.out.to_f32_vec(), b.out.to_f32_vec());
}

#[test]
fn backward_input_checks() {
    let opts = LongformerOptions::new(1);
    let q = t(&[1, 5, 2, 4]);
    let r = longformer::forward(
        &longformer::Inputs::new(&q, &q, &q)
            .globals(None)
            .masks(None, None),
        &opts,
    )
    .unwrap();
    let bw = |out: &HostTensor, lse: &HostTensor, dout: &HostTensor| {
        longformer::backward(
            &longformer::Inputs::new(&q, &q, &q)
                .globals(None)
                .masks(None, None)
                .backward(out, lse, dout),
            &opts,
        )
        .expect_err("must be rejected")
    };
    let e = bw(&t(&[1, 5, 2, 3]), &r.lse, &q);
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    assert_mentions(&e, &["out"]);
    let e = bw(&r.out, &t(&[1, 5, 2]), &q);
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    assert_mentions(&e, &["lse", "[1, 2, 5]"]);
    let half_lse = HostTensor::from_fn(DType::F16, &[1, 2, 5], |_| 0.0).unwrap();
    let e = bw(&r.out, &half_lse, &q);
    assert!(
        matches!(e, Error::UnsupportedDType { name: "lse", .. }),
        "{e}"
    );
    let half = HostTensor::from_fn(DType::BF16, &[1, 5, 2, 4], |_| 0.0).unwrap();
    let e = bw(&r.out, &r.lse, &half);
    assert!(matches!(e, Error::DTypeMismatch { .. }), "{e}");
    assert_mentions(&e, &["dout", "bfloat16"]);
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
