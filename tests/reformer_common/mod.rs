//! Shared by tests/reformer*.rs: an f64 definition of Reformer LSH attention written
//! independently of the library (HF's formulation: sort keys L · bucket + p, chunks
//! gathered as "look adjacent" concatenations, per-round softmax, logsumexp
//! combination, undo-sort), random cases, and the golden-fixture reader.

#![allow(dead_code)] // each test binary uses a subset
#![allow(clippy::needless_range_loop)] // index-parallel numeric loops read best as such

use flashkernels::reformer::{Buckets, Inputs, ReformerOptions, TokenMask};
use flashkernels::{DType, HostTensor};
use std::collections::HashMap;
use std::path::PathBuf;

/// A deterministic xorshift generator.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in [-1, 1), on a 2^-20 grid (exact in f32 and f16 up to its range).
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 44) as f64 / (1u64 << 19) as f64) - 1.0
    }

    /// Multiples of 1/64 in [-1, 1] (exact in f16 and bf16 too).
    pub fn coarse(&mut self) -> f64 {
        ((self.next_u64() % 129) as f64 - 64.0) / 64.0
    }
}

/// One call: sizes, options and data (f64 values exactly representable in the dtype).
#[derive(Debug, Clone)]
pub struct Case {
    pub b: usize,
    pub n: usize,
    pub h: usize,
    pub d: usize,
    pub n_hashes: usize,
    pub n_buckets: usize,
    pub c: usize,
    pub before: usize,
    pub after: usize,
    pub causal: bool,
    /// (B, N), true = padded.
    pub pad: Option<Vec<bool>>,
    pub dtype: DType,
    pub qk: Vec<f64>,
    pub v: Vec<f64>,
    pub rot: Vec<f64>,
}

impl Case {
    #[allow(clippy::too_many_arguments)]
    pub fn random(
        seed: u64,
        dtype: DType,
        (b, n, h, d): (usize, usize, usize, usize),
        (n_hashes, n_buckets, c): (usize, usize, usize),
        (before, after): (usize, usize),
        causal: bool,
        padded: bool,
    ) -> Case {
        let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let coarse = dtype != DType::F32;
        let mut gen = |len: usize, scale: f64| -> Vec<f64> {
            (0..len)
                .map(|_| scale * if coarse { r.coarse() } else { r.unit() })
                .collect()
        };
        let qk = gen(b * n * h * d, 2.0);
        let v = gen(b * n * h * d, 1.0);
        let rot = gen(h * d * n_hashes * (n_buckets / 2), 1.0);
        let pad = padded.then(|| {
            (0..b * n)
                .map(|x| {
                    let (bb, i) = (x / n, x % n);
                    // The last few tokens of every other sequence, and one in the middle.
                    (bb % 2 == 0 && i + 3 >= n) || (bb == 0 && i == n / 2)
                })
                .collect()
        });
        Case {
            b,
            n,
            h,
            d,
            n_hashes,
            n_buckets,
            c,
            before,
            after,
            causal,
            pad,
            dtype,
            qk,
            v,
            rot,
        }
    }

    pub fn opts(&self) -> ReformerOptions {
        ReformerOptions::new(self.c)
            .chunks(self.before, self.after)
            .causal(self.causal)
    }

    pub fn mask(&self) -> Option<TokenMask> {
        self.pad
            .as_ref()
            .map(|p| TokenMask::new(p.clone(), &[self.b, self.n]))
    }

    pub fn padded(&self, b: usize, i: usize) -> bool {
        self.pad.as_ref().is_some_and(|p| p[b * self.n + i])
    }

    pub fn hashed(&self) -> bool {
        self.n > self.c
    }

    /// (qk, v, rotations) as host tensors of the case's dtype (rotations f32).
    pub fn tensors(&self) -> [HostTensor; 3] {
        let s = [self.b, self.n, self.h, self.d];
        let rs = [self.h, self.d, self.n_hashes, self.n_buckets / 2];
        [
            tensor(self.dtype, &self.qk, &s),
            tensor(self.dtype, &self.v, &s),
            tensor(DType::F32, &self.rot, &rs),
        ]
    }
}

pub fn tensor(dtype: DType, v: &[f64], shape: &[usize]) -> HostTensor {
    HostTensor::from_fn(dtype, shape, |i| v[i] as f32).unwrap()
}

pub fn inputs<'a>(
    t: &'a [HostTensor; 3],
    mask: Option<&'a TokenMask>,
    buckets: Option<&'a Buckets>,
) -> Inputs<'a, HostTensor> {
    Inputs::new(&t[0], &t[1], &t[2])
        .key_padding_mask(mask)
        .buckets(buckets)
}

pub fn f64s(t: &HostTensor) -> Vec<f64> {
    t.to_f32_vec().into_iter().map(f64::from).collect()
}

/// The definition's buckets (B, H, n_hashes, N), offset per round.
pub fn define_buckets(c: &Case) -> Vec<i32> {
    let half = c.n_buckets / 2;
    let any_pad = c.pad.as_ref().is_some_and(|p| p.iter().any(|&x| x));
    let per_round = c.n_buckets + usize::from(any_pad);
    let mut out = vec![0i32; c.b * c.h * c.n_hashes * c.n];
    for b in 0..c.b {
        for h in 0..c.h {
            for r in 0..c.n_hashes {
                for i in 0..c.n {
                    let x = |dd: usize| c.qk[((b * c.n + i) * c.h + h) * c.d + dd];
                    let mut rotated = vec![0.0; 2 * half];
                    for k in 0..half {
                        let mut acc = 0.0;
                        for dd in 0..c.d {
                            acc += x(dd) * c.rot[((h * c.d + dd) * c.n_hashes + r) * half + k];
                        }
                        rotated[k] = acc;
                        rotated[k + half] = -acc;
                    }
                    let mut arg = 0;
                    for k in 1..2 * half {
                        if rotated[k] > rotated[arg] {
                            arg = k;
                        }
                    }
                    if any_pad && c.padded(b, i) {
                        arg = c.n_buckets;
                    }
                    out[((b * c.h + h) * c.n_hashes + r) * c.n + i] = (arg + r * per_round) as i32;
                }
            }
        }
    }
    out
}

/// The definition's output (B, N, H, D) with the given buckets (hashed calls; `None`:
/// [`define_buckets`]); `qk`, `v` override the case's (for finite differences).
pub fn define(c: &Case, qk: &[f64], v: &[f64], buckets: Option<&[i32]>) -> Vec<f64> {
    let (n, h_, d) = (c.n, c.h, c.d);
    let (mask, self_mask) = if c.dtype == DType::F16 {
        (-1e4, -1e3)
    } else {
        (-1e9, -1e5)
    };
    let own;
    let bk = match buckets {
        Some(b) => b,
        None => {
            own = define_buckets(c);
            &own
        }
    };
    let mut out = vec![0.0; qk.len()];
    for b in 0..c.b {
        for h in 0..h_ {
            let q = |i: usize| -> Vec<f64> { qk[((b * n + i) * h_ + h) * d..][..d].to_vec() };
            let vv = |i: usize| -> Vec<f64> { v[((b * n + i) * h_ + h) * d..][..d].to_vec() };
            let key = |i: usize| -> Vec<f64> {
                let x = q(i);
                let var = x.iter().map(|a| a * a).sum::<f64>() / d as f64;
                let inv = 1.0 / (var + 1e-6).sqrt();
                x.iter().map(|a| a * inv / (d as f64).sqrt()).collect()
            };
            // (query token, key tokens) per row of the (sorted) sequence.
            let (rows, total): (Vec<(usize, Vec<usize>)>, usize) = if c.hashed() {
                let l = c.n_hashes * n;
                let bkt = &bk[(b * h_ + h) * l..][..l];
                let mut idx: Vec<usize> = (0..l).collect();
                idx.sort_by_key(|&p| (l as u64) * bkt[p] as u64 + p as u64);
                let tokens: Vec<usize> = idx.iter().map(|&p| p % n).collect();
                let chunks: Vec<&[usize]> = tokens.chunks(c.c).collect();
                let nc = chunks.len() as i64;
                let mut rows = vec![(0, vec![]); l];
                for (ci, ch) in chunks.iter().enumerate() {
                    let mut ks = Vec::new();
                    for off in -(c.before as i64)..=(c.after as i64) {
                        ks.extend_from_slice(chunks[(ci as i64 + off).rem_euclid(nc) as usize]);
                    }
                    for (t, &tok) in ch.iter().enumerate() {
                        // Stored at the concatenated position (undo sort).
                        rows[idx[ci * c.c + t]] = (tok, ks.clone());
                    }
                }
                (rows, c.n_hashes)
            } else {
                ((0..n).map(|i| (i, (0..n).collect())).collect(), 1)
            };
            let mut lse = vec![0.0; rows.len()];
            let mut o = vec![vec![0.0; d]; rows.len()];
            for (p, (i, ks)) in rows.iter().enumerate() {
                let qi = q(*i);
                let s: Vec<f64> = ks
                    .iter()
                    .map(|&j| {
                        let mut sc: f64 = qi.iter().zip(key(j)).map(|(a, b)| a * b).sum();
                        if (c.causal && j > *i) || c.padded(b, j) {
                            sc = mask;
                        }
                        if j == *i {
                            sc = self_mask;
                        }
                        sc
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                lse[p] = m + s.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                for (&j, &sc) in ks.iter().zip(&s) {
                    let w = (sc - lse[p]).exp();
                    for (od, vd) in o[p].iter_mut().zip(vv(j)) {
                        *od += w * vd;
                    }
                }
            }
            for i in 0..n {
                let ls: Vec<f64> = (0..total).map(|r| lse[r * n + i]).collect();
                let m = ls.iter().cloned().fold(f64::MIN, f64::max);
                let all = m + ls.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                for r in 0..total {
                    let w = (ls[r] - all).exp();
                    for k in 0..d {
                        out[((b * n + i) * h_ + h) * d + k] += w * o[r * n + i][k];
                    }
                }
            }
        }
    }
    out
}

pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

pub fn max_abs(a: &[f64]) -> f64 {
    a.iter().map(|x| x.abs()).fold(0.0, f64::max)
}

/// One golden fixture: its `config` keys and tensors (shape, values as f64).
#[derive(Debug)]
pub struct Fixture {
    pub name: String,
    pub config: HashMap<String, String>,
    pub tensors: HashMap<String, (Vec<usize>, Vec<f64>)>,
}

impl Fixture {
    pub fn get(&self, key: &str) -> usize {
        self.config[key]
            .parse()
            .unwrap_or_else(|_| panic!("{}: config {key}", self.name))
    }

    pub fn tensor(&self, name: &str) -> Option<&(Vec<usize>, Vec<f64>)> {
        self.tensors.get(name)
    }
}

/// Every tests/fixtures/reformer/*.txt (see scripts/make_reformer_fixtures.py).
pub fn load_fixtures() -> Vec<Fixture> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reformer");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    paths.sort();
    paths.iter().map(|p| parse_fixture(p)).collect()
}

fn parse_fixture(path: &std::path::Path) -> Fixture {
    let text = std::fs::read_to_string(path).unwrap();
    let name = path.file_stem().unwrap().to_string_lossy().into_owned();
    let mut config = HashMap::new();
    let mut tensors = HashMap::new();
    let mut lines = text.lines().filter(|l| !l.starts_with('#'));
    while let Some(line) = lines.next() {
        let mut w = line.split_whitespace();
        match w.next() {
            Some("config") => {
                for kv in w {
                    let (k, v) = kv.split_once('=').expect("key=value");
                    config.insert(k.to_string(), v.to_string());
                }
            }
            Some("tensor") => {
                let tname = w.next().expect("name").to_string();
                let kind = w.next().expect("kind");
                let shape: Vec<usize> = w
                    .next()
                    .expect("shape")
                    .split(',')
                    .map(|s| s.parse().unwrap())
                    .collect();
                let body = lines.next().expect("values line");
                let vals: Vec<f64> = body
                    .split_whitespace()
                    .map(|s| match kind {
                        "f32" => f64::from(s.parse::<f32>().unwrap()),
                        _ => s.parse::<f64>().unwrap(),
                    })
                    .collect();
                assert_eq!(
                    vals.len(),
                    shape.iter().product::<usize>(),
                    "{name}: {tname}"
                );
                tensors.insert(tname, (shape, vals));
            }
            Some(other) => panic!("{name}: unexpected line {other:?}"),
            None => {}
        }
    }
    Fixture {
        name,
        config,
        tensors,
    }
}
