//! Longformer's tile plan (flashkernels::longformer::schedule): the work lists against the
//! brute-force rule, the passes against the independent definition
//! (tests/longformer_common), and linear growth in the sequence length.

mod common;
mod longformer_common;

use flashkernels::longformer::schedule::{self, Pass, WorkList};
use flashkernels::longformer::LongformerProblem;
use longformer_common::{allowed, case_strategy, Case, Rules};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

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
