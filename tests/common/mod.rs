//! Helpers shared by the integration tests (and benches/attention.rs): a seeded random
//! generator, tensor builders in the layouts the attention API takes, and a naive f64
//! definition of attention to check every implementation against.
//!
//! The naive definition reads its inputs from plain (B, N, H, D) row-major f64 arrays
//! that the builders below fill themselves, so it shares no indexing code with the
//! library (no `HostTensor::get`, no `to_contiguous`).
#![allow(dead_code)]

pub mod longformer_fixtures;

use flashkernels::{DType, HostData, HostTensor, Layout};
use half::{bf16, f16};

/// A new stream on device 0, for the GPU suites (run with `--ignored` where a device
/// exists); fails loudly, naming the device count, where there is none.
#[cfg(any(feature = "cuda", feature = "emulator"))]
pub fn gpu_stream() -> flashkernels::Stream {
    assert!(
        flashkernels::cuda_available(),
        "no CUDA device: these tests need an NVIDIA GPU and driver (device_count: {:?})",
        flashkernels::device::device_count()
    );
    flashkernels::Device::new(0)
        .expect("open cuda:0")
        .new_stream()
        .expect("create a stream")
}

/// SplitMix64: tiny, seedable, good enough for test data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (2.0 * self.unit() - 1.0) as f32
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = 1.0 - self.unit(); // (0, 1]
        let u2 = self.unit();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.unit() * n as f64) as usize % n.max(1)
    }

    /// A uniformly random permutation of 0..n (Fisher-Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            p.swap(i, self.below(i + 1));
        }
        p
    }
}

/// How random values are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dist {
    Uniform,
    Normal,
}

/// `n` random values; never all zero.
pub fn random_values(rng: &mut Rng, n: usize, dist: Dist) -> Vec<f32> {
    (0..n)
        .map(|_| match dist {
            Dist::Uniform => rng.uniform(),
            Dist::Normal => rng.normal(),
        })
        .collect()
}

/// Rounds to `dtype` and back, so that a reference sees exactly what a kernel reads.
pub fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F32 => x,
        DType::F16 => f16::from_f32(x).to_f32(),
        DType::BF16 => bf16::from_f32(x).to_f32(),
    }
}

/// A logical (B, N, H, D) tensor: row-major values (already rounded to its dtype).
#[derive(Debug, Clone)]
pub struct Dense4 {
    pub dims: [usize; 4],
    pub data: Vec<f32>,
}

impl Dense4 {
    pub fn random(rng: &mut Rng, dims: [usize; 4], dtype: DType, dist: Dist) -> Self {
        let n = dims.iter().product();
        let data = random_values(rng, n, dist)
            .into_iter()
            .map(|x| round_to(dtype, x))
            .collect();
        Dense4 { dims, data }
    }

    /// Element (b, n, h, d).
    pub fn at(&self, b: usize, n: usize, h: usize, d: usize) -> f32 {
        let [_, nn, hh, dd] = self.dims;
        self.data[((b * nn + n) * hh + h) * dd + d]
    }

    pub fn at_mut(&mut self, b: usize, n: usize, h: usize, d: usize) -> &mut f32 {
        let [_, nn, hh, dd] = self.dims;
        &mut self.data[((b * nn + n) * hh + h) * dd + d]
    }

    /// Applies `f` to every element (b, n, h, d) to build a new tensor of the same dims.
    pub fn map(&self, mut f: impl FnMut(usize, usize, usize, usize) -> f32) -> Self {
        let [bb, nn, hh, dd] = self.dims;
        let mut data = Vec::with_capacity(self.data.len());
        for b in 0..bb {
            for n in 0..nn {
                for h in 0..hh {
                    for d in 0..dd {
                        data.push(f(b, n, h, d));
                    }
                }
            }
        }
        Dense4 {
            dims: self.dims,
            data,
        }
    }
}

/// How a (B, N, H, D) tensor is laid out in its storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// Row-major (B, N, H, D).
    Contiguous,
    /// A (B, H, N, D) buffer passed as (B, N, H, D) by swapping the strides of dims 1, 2.
    HeadsFirst,
    /// (B, H, N, D) storage whose rows are `pad` elements longer than D (the padding is
    /// filled with garbage that must never be read).
    HeadsFirstPadded { pad: usize },
}

fn data_of(dtype: DType, v: Vec<f32>) -> HostData {
    match dtype {
        DType::F32 => HostData::F32(v),
        DType::F16 => HostData::F16(v.into_iter().map(f16::from_f32).collect()),
        DType::BF16 => HostData::BF16(v.into_iter().map(bf16::from_f32).collect()),
    }
}

/// Builds a host tensor holding `t` in `dtype` with the given storage layout, writing
/// the storage by hand (independently of the library's stride logic).
pub fn host_tensor(t: &Dense4, dtype: DType, storage: Storage) -> HostTensor {
    let [bb, nn, hh, dd] = t.dims;
    let (buf, layout) = match storage {
        Storage::Contiguous => (t.data.clone(), Layout::contiguous(&t.dims)),
        Storage::HeadsFirst | Storage::HeadsFirstPadded { .. } => {
            let pad = match storage {
                Storage::HeadsFirstPadded { pad } => pad,
                _ => 0,
            };
            let row = dd + pad;
            // Garbage in the padding: huge values that would wreck any result they leak into.
            let mut buf = vec![1.0e4f32; bb * hh * nn * row];
            for b in 0..bb {
                for h in 0..hh {
                    for n in 0..nn {
                        for d in 0..dd {
                            buf[((b * hh + h) * nn + n) * row + d] = t.at(b, n, h, d);
                        }
                    }
                }
            }
            let layout = Layout {
                shape: vec![bb, nn, hh, dd],
                strides: vec![hh * nn * row, row, nn * row, 1],
            };
            (buf, layout)
        }
    };
    HostTensor::from_data(data_of(dtype, buf), layout).expect("valid test layout")
}

/// Sizes of one attention problem, for the naive definition.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub batch: usize,
    pub heads: usize,
    pub seqlen_q: usize,
    pub seqlen_k: usize,
    pub head_dim: usize,
}

impl Shape {
    pub fn q_dims(&self) -> [usize; 4] {
        [self.batch, self.seqlen_q, self.heads, self.head_dim]
    }
    pub fn kv_dims(&self) -> [usize; 4] {
        [self.batch, self.seqlen_k, self.heads, self.head_dim]
    }
}

/// Number of keys query row `i` may see: bottom-right causal keeps keys
/// j <= i + Nk - Nq, i.e. the first `i + Nk - Nq + 1` keys (none if that is <= 0).
pub fn visible_keys(i: usize, nq: usize, nk: usize, causal: bool) -> usize {
    if !causal {
        return nk;
    }
    let last = i as i64 + nk as i64 - nq as i64; // last visible key, may be negative
    (last + 1).clamp(0, nk as i64) as usize
}

/// The scaled scores of row (b, h, i) against its visible keys, in f64.
pub fn scores_f64(
    q: &Dense4,
    k: &Dense4,
    scale: f64,
    causal: bool,
    b: usize,
    h: usize,
    i: usize,
) -> Vec<f64> {
    let [_, nq, _, d] = q.dims;
    let nk = k.dims[1];
    (0..visible_keys(i, nq, nk, causal))
        .map(|j| {
            let dot: f64 = (0..d)
                .map(|x| q.at(b, i, h, x) as f64 * k.at(b, j, h, x) as f64)
                .sum();
            scale * dot
        })
        .collect()
}

/// One row of the naive definition: O[b, i, h, :] and LSE[b, h, i], in f64.
/// O = sum_j exp(s_j) v_j / sum_j exp(s_j) over visible keys j; LSE = ln sum_j exp(s_j).
/// A row with no visible key gives O = 0 and LSE = -inf.
#[allow(clippy::too_many_arguments)]
pub fn naive_row(
    q: &Dense4,
    k: &Dense4,
    v: &Dense4,
    scale: f64,
    causal: bool,
    b: usize,
    h: usize,
    i: usize,
) -> (Vec<f64>, f64) {
    let d = v.dims[3];
    let s = scores_f64(q, k, scale, causal, b, h, i);
    if s.is_empty() {
        return (vec![0.0; d], f64::NEG_INFINITY);
    }
    // Shifting by the max changes nothing mathematically and keeps exp in range.
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
    let sum: f64 = w.iter().sum();
    let o = (0..d)
        .map(|x| {
            w.iter()
                .enumerate()
                .map(|(j, wj)| wj * v.at(b, j, h, x) as f64)
                .sum::<f64>()
                / sum
        })
        .collect();
    (o, m + sum.ln())
}

/// The whole naive attention: O as (B, Nq, H, D) and LSE as (B, H, Nq), row-major f64.
pub fn naive_attention(
    q: &Dense4,
    k: &Dense4,
    v: &Dense4,
    scale: f64,
    causal: bool,
) -> (Vec<f64>, Vec<f64>) {
    let [bb, nq, hh, d] = q.dims;
    let mut o = vec![0.0; bb * nq * hh * d];
    let mut lse = vec![0.0; bb * hh * nq];
    for b in 0..bb {
        for h in 0..hh {
            for i in 0..nq {
                let (row, l) = naive_row(q, k, v, scale, causal, b, h, i);
                let at = ((b * nq + i) * hh + h) * d;
                o[at..at + d].copy_from_slice(&row);
                lse[(b * hh + h) * nq + i] = l;
            }
        }
    }
    (o, lse)
}

/// Default softmax scale 1/sqrt(D).
pub fn default_scale(head_dim: usize) -> f64 {
    1.0 / (head_dim as f64).sqrt()
}

/// Asserts |actual - expected| <= atol + rtol |expected| elementwise, naming the first
/// offending index. Treats -inf == -inf as equal; any NaN fails.
pub fn assert_close(what: &str, actual: &[f32], expected: &[f64], rtol: f64, atol: f64) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "{what}: {} values, expected {}",
        actual.len(),
        expected.len()
    );
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let a = a as f64;
        let ok = if e.is_infinite() {
            a == e
        } else {
            (a - e).abs() <= atol + rtol * e.abs()
        };
        assert!(
            ok,
            "{what}[{i}]: got {a}, expected {e} (|diff| {} > atol {atol} + rtol {rtol} * |expected|)",
            (a - e).abs()
        );
    }
}

/// ||a - b||_2 / ||b||_2.
pub fn rel_l2(actual: &[f32], expected: &[f64]) -> f64 {
    let num: f64 = actual
        .iter()
        .zip(expected)
        .map(|(&a, &e)| (a as f64 - e).powi(2))
        .sum();
    let den: f64 = expected.iter().map(|e| e * e).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// A HostTensor's values in row-major logical order as f32, read through its strides
/// by hand (not through the library's `to_f32_vec`), for a rank-4 or rank-3 tensor.
pub fn logical_values(t: &HostTensor) -> Vec<f32> {
    let shape = t.shape().to_vec();
    let strides = t.strides().to_vec();
    let raw: Vec<f32> = match t.data() {
        HostData::F32(v) => v.clone(),
        HostData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        HostData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
    };
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(n);
    for flat in 0..n {
        let mut rem = flat;
        let mut off = 0;
        for d in (0..shape.len()).rev() {
            off += (rem % shape[d]) * strides[d];
            rem /= shape[d];
        }
        out.push(raw[off]);
    }
    out
}

/// The mask of the general definition, as a predicate (written independently of the
/// library's range arithmetic): query i of nq sees key j of nk iff
/// -left <= j - i - (nk - nq) <= right, with causal capping right at 0.
pub fn allowed(
    i: usize,
    j: usize,
    nq: usize,
    nk: usize,
    causal: bool,
    window: (Option<usize>, Option<usize>),
) -> bool {
    let rel = j as i64 - i as i64 - (nk as i64 - nq as i64);
    let right = if causal { Some(0) } else { window.1 };
    window.0.is_none_or(|l| rel >= -(l as i64)) && right.is_none_or(|r| rel <= r as i64)
}

/// Naive f64 attention over one sequence with GQA and any mask: q is (nq, hq, d),
/// k and v are (nk, hkv, d), row-major. Returns O (nq, hq, d) and LSE (hq, nq).
pub fn naive_general(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dims: (usize, usize, usize, usize, usize), // (nq, nk, hq, hkv, d)
    scale: f64,
    mask: impl Fn(usize, usize) -> bool,
) -> (Vec<f64>, Vec<f64>) {
    let (nq, nk, hq, hkv, d) = dims;
    let group = hq / hkv;
    let mut o = vec![0.0; nq * hq * d];
    let mut lse = vec![f64::NEG_INFINITY; hq * nq];
    for h in 0..hq {
        let hk = h / group;
        for i in 0..nq {
            let keys: Vec<usize> = (0..nk).filter(|&j| mask(i, j)).collect();
            if keys.is_empty() {
                continue;
            }
            let s: Vec<f64> = keys
                .iter()
                .map(|&j| {
                    scale
                        * (0..d)
                            .map(|x| q[(i * hq + h) * d + x] * k[(j * hkv + hk) * d + x])
                            .sum::<f64>()
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let sum: f64 = w.iter().sum();
            for x in 0..d {
                o[(i * hq + h) * d + x] = keys
                    .iter()
                    .zip(&w)
                    .map(|(&j, wj)| wj * v[(j * hkv + hk) * d + x])
                    .sum::<f64>()
                    / sum;
            }
            lse[h * nq + i] = m + sum.ln();
        }
    }
    (o, lse)
}

/// Bounds on max |got - want| / max |want| of a GPU attention output (O) against the CPU
/// reference or the f64 definition, per storage dtype. Each side rounds O once to the
/// dtype, and the kernel also rounds P to it before the P·V product: a few unit roundoffs u
/// (bf16 u = 2^-8, f16 u = 2^-11, so f16's bound is 8x tighter), here 5u; f32 (only a
/// reference-vs-reference dtype here) is accumulation order alone.
pub fn out_tol(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 2e-2,
        DType::F16 => 2.5e-3,
        DType::F32 => 1e-5,
    }
}

/// As [`out_tol`] for gradients (dQ, dK, dV), which sum many more rounded terms: 10u.
pub fn grad_tol(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 4e-2,
        DType::F16 => 5e-3,
        DType::F32 => 2e-5,
    }
}

/// max |got - want| / max(max |want|, 1e-3) over two equally long slices (NaN if any
/// element of `got` is not finite, so comparisons with it fail).
pub fn max_rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-3);
    got.iter().zip(want).fold(0f64, |m, (&g, &w)| {
        if g.is_finite() {
            m.max((g as f64 - w).abs())
        } else {
            f64::NAN
        }
    }) / scale
}

/// For GPU results against the CPU reference: max |got - want| <= tol * max(max |want|,
/// 1e-3) — the floor because a reference that is exactly zero (every query sees one key,
/// so dQ = 0) leaves the kernel's f32 rounding noise (~1e-7) nothing to be relative to —
/// every value finite (a poisoned element a kernel forgot to write fails), and exact -inf
/// where the reference has -inf (rows without keys). `case` names the problem in messages.
pub fn assert_close_to_reference(
    case: &dyn std::fmt::Debug,
    what: &str,
    got: &HostTensor,
    want: &HostTensor,
    tol: f64,
) {
    assert_eq!(got.shape(), want.shape(), "{case:?}: {what} shape");
    let (g, w) = (got.to_f32_vec(), want.to_f32_vec());
    let scale = w
        .iter()
        .filter(|x| x.is_finite())
        .fold(0f64, |m, &x| m.max(x.abs() as f64));
    let mut worst = (0f64, 0usize);
    for (i, (&a, &b)) in g.iter().zip(&w).enumerate() {
        if b == f32::NEG_INFINITY {
            assert_eq!(
                a, b,
                "{case:?}: {what}[{i}] must be -inf (row without keys)"
            );
            continue;
        }
        assert!(
            a.is_finite(),
            "{case:?}: {what}[{i}] = {a} (unwritten or overflow)"
        );
        let err = (a as f64 - b as f64).abs();
        if err > worst.0 {
            worst = (err, i);
        }
    }
    assert!(
        worst.0 <= tol * scale.max(1e-3),
        "{case:?}: {what}: max error {} at {} (got {}, want {}) > {tol} x max|want| {scale}",
        worst.0,
        worst.1,
        g[worst.1],
        w[worst.1]
    );
}
