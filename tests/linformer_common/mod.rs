//! What the Linformer tests share: random cases, an f64 definition of the op written
//! here independently of the library (explicit sums, its own softmax and attention
//! backward), rounding bounds, strided tensor builders, and the reader of the lucidrains
//! golden fixtures (tests/fixtures/linformer, written by scripts/make_linformer_fixtures.py).
#![allow(dead_code, clippy::needless_range_loop, clippy::too_many_arguments)]

use flashkernels::linformer::{Inputs, LinformerOptions, TokenMask};
use flashkernels::{DType, HostTensor, Layout};
use half::{bf16, f16};
use std::path::Path;

/// splitmix64.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x1234_5678_9ABC_DEF1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f64 {
        2.0 * ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) - 1.0
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// `x` rounded to `dtype`.
pub fn round(dtype: DType, x: f64) -> f64 {
    match dtype {
        DType::F32 => x as f32 as f64,
        DType::F16 => f16::from_f64(x).to_f64(),
        DType::BF16 => bf16::from_f64(x).to_f64(),
    }
}

/// The unit roundoff of `dtype` (half an ulp at 1).
pub fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 2f64.powi(-24),
        DType::F16 => 2f64.powi(-11),
        DType::BF16 => 2f64.powi(-8),
    }
}

/// Half the smallest subnormal of `dtype`: the absolute error of a rounding there.
pub fn subnormal_floor(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 2f64.powi(-25),
        DType::F32 => 2f64.powi(-150),
        DType::BF16 => 2f64.powi(-134),
    }
}

/// How E and F are shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// One E and one F per K/V head.
    PerHead,
    /// One E and one F for every head (lucidrains' layout).
    Headwise,
    /// F = E, one per K/V head.
    KvPerHead,
    /// F = E, one for every head.
    KvHeadwise,
    /// E shared by every head, one F per K/V head.
    Mixed,
}

pub const SHARINGS: [Sharing; 5] = [
    Sharing::PerHead,
    Sharing::Headwise,
    Sharing::KvPerHead,
    Sharing::KvHeadwise,
    Sharing::Mixed,
];

/// Sizes of one case.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub b: usize,
    pub n: usize,
    pub h: usize,
    pub hkv: usize,
    pub d: usize,
    pub k: usize,
    pub n_max: usize,
}

/// One call: every value already rounded to the dtype (the definition sees exactly what
/// the op reads).
#[derive(Debug, Clone)]
pub struct Case {
    pub dtype: DType,
    pub dims: Dims,
    pub e_heads: usize,
    pub f_heads: usize,
    pub shared: bool,
    pub scale: Option<f32>,
    pub q: Vec<f64>,
    pub k: Vec<f64>,
    pub v: Vec<f64>,
    pub e: Vec<f64>,
    /// F (None when F = E).
    pub f: Option<Vec<f64>>,
    /// (B, N), true = padded key.
    pub pad: Option<Vec<bool>>,
}

fn random_vec(rng: &mut Rng, len: usize, scale: f64, dtype: DType) -> Vec<f64> {
    (0..len)
        .map(|_| round(dtype, scale * rng.uniform()))
        .collect()
}

/// Which keys a case pads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    None,
    /// About a third of the keys, at random (never all of a sequence).
    Random,
    /// Sequence 0 entirely, the others at random.
    FirstSequenceFull,
}

impl Case {
    pub fn random(
        seed: u64,
        dtype: DType,
        dims: Dims,
        sharing: Sharing,
        padding: Padding,
        scale: Option<f32>,
    ) -> Case {
        let mut rng = Rng::new(seed);
        let Dims {
            b,
            n,
            h,
            hkv,
            d,
            k,
            n_max,
        } = dims;
        let (e_heads, f_heads, shared) = match sharing {
            Sharing::PerHead => (hkv, hkv, false),
            Sharing::Headwise => (1, 1, false),
            Sharing::KvPerHead => (hkv, hkv, true),
            Sharing::KvHeadwise => (1, 1, true),
            Sharing::Mixed => (1, hkv, false),
        };
        // Inputs of magnitude ~1 and projections of ~2/sqrt(N), so kp, vp are O(1) and
        // the scaled scores spread over a few units (a softmax far from uniform).
        let ps = 2.0 / (n as f64).sqrt();
        let q = random_vec(&mut rng, b * n * h * d, 1.5, dtype);
        let kk = random_vec(&mut rng, b * n * hkv * d, 1.5, dtype);
        let v = random_vec(&mut rng, b * n * hkv * d, 1.0, dtype);
        let e = random_vec(&mut rng, e_heads * k * n_max, ps, dtype);
        let f = (!shared).then(|| random_vec(&mut rng, f_heads * k * n_max, ps, dtype));
        let pad = match padding {
            Padding::None => None,
            _ => {
                let mut m: Vec<bool> = (0..b * n).map(|_| rng.below(3) == 0).collect();
                for s in 0..b {
                    if m[s * n..(s + 1) * n].iter().all(|&x| x) {
                        m[s * n] = false;
                    }
                }
                if padding == Padding::FirstSequenceFull {
                    m[..n].iter_mut().for_each(|x| *x = true);
                }
                Some(m)
            }
        };
        Case {
            dtype,
            dims,
            e_heads,
            f_heads,
            shared,
            scale,
            q,
            k: kk,
            v,
            e,
            f,
            pad,
        }
    }

    /// The softmax scale the op uses (f32, as the API computes it).
    pub fn scale_f64(&self) -> f64 {
        self.scale
            .unwrap_or(1.0 / (self.dims.d as f32).sqrt())
            .into()
    }

    pub fn padded(&self, b: usize, j: usize) -> bool {
        self.pad.as_ref().is_some_and(|p| p[b * self.dims.n + j])
    }

    pub fn f_values(&self) -> &[f64] {
        self.f.as_deref().unwrap_or(&self.e)
    }

    pub fn f_heads_eff(&self) -> usize {
        if self.shared {
            self.e_heads
        } else {
            self.f_heads
        }
    }

    pub fn mask(&self) -> Option<TokenMask> {
        self.pad
            .as_ref()
            .map(|p| TokenMask::new(p.clone(), &[self.dims.b, self.dims.n]))
    }

    pub fn q_shape(&self) -> [usize; 4] {
        let x = self.dims;
        [x.b, x.n, x.h, x.d]
    }

    pub fn kv_shape(&self) -> [usize; 4] {
        let x = self.dims;
        [x.b, x.n, x.hkv, x.d]
    }

    pub fn proj_shape(&self) -> [usize; 4] {
        let x = self.dims;
        [x.b, x.k, x.hkv, x.d]
    }

    pub fn e_shape(&self) -> [usize; 3] {
        [self.e_heads, self.dims.k, self.dims.n_max]
    }

    pub fn f_shape(&self) -> [usize; 3] {
        [self.f_heads_eff(), self.dims.k, self.dims.n_max]
    }

    /// Contiguous host tensors q, k, v, e and f (None when shared).
    pub fn tensors(&self) -> Tensors {
        let t = |v: &[f64], s: &[usize]| tensor(v, s, self.dtype);
        Tensors {
            q: t(&self.q, &self.q_shape()),
            k: t(&self.k, &self.kv_shape()),
            v: t(&self.v, &self.kv_shape()),
            e: t(&self.e, &self.e_shape()),
            f: self.f.as_ref().map(|f| t(f, &self.f_shape())),
        }
    }

    /// The same tensors in other memory: Q, K, V heads-first (B, H, N, D) with `pad`
    /// extra elements per row, E and F stored transposed (heads, N_max, k), as
    /// lucidrains' `proj_k.T` views them.
    pub fn strided_tensors(&self, pad: usize) -> Tensors {
        let dt = self.dtype;
        Tensors {
            q: heads_first(&self.q, self.q_shape(), pad, dt),
            k: heads_first(&self.k, self.kv_shape(), pad, dt),
            v: heads_first(&self.v, self.kv_shape(), pad, dt),
            e: transposed(&self.e, self.e_shape(), dt),
            f: self.f.as_ref().map(|f| transposed(f, self.f_shape(), dt)),
        }
    }
}

pub struct Tensors {
    pub q: HostTensor,
    pub k: HostTensor,
    pub v: HostTensor,
    pub e: HostTensor,
    pub f: Option<HostTensor>,
}

/// The options of a case (its scale).
pub fn opts(c: &Case) -> LinformerOptions {
    LinformerOptions::new().scale(c.scale)
}

/// The forward's inputs over host tensors, with a mask.
pub fn inputs<'a>(t: &'a Tensors, m: Option<&'a TokenMask>) -> Inputs<'a, HostTensor> {
    Inputs::new(&t.q, &t.k, &t.v, &t.e, t.f.as_ref()).key_padding_mask(m)
}

pub fn dims(b: usize, n: usize, h: usize, hkv: usize, d: usize, k: usize, n_max: usize) -> Dims {
    Dims {
        b,
        n,
        h,
        hkv,
        d,
        k,
        n_max,
    }
}

/// dO (B, N, H, D), random in [-1, 1), rounded to the dtype.
pub fn random_dout(c: &Case, seed: u64) -> Vec<f64> {
    let mut rng = Rng::new(seed);
    (0..c.q.len())
        .map(|_| round(c.dtype, rng.uniform()))
        .collect()
}

/// A contiguous tensor of `dtype` holding `v` (already representable).
pub fn tensor(v: &[f64], shape: &[usize], dtype: DType) -> HostTensor {
    HostTensor::from_fn(dtype, shape, |i| v[i] as f32).unwrap()
}

/// `v` (B, N, H, D) stored as (B, H, N, D + pad), seen as (B, N, H, D).
pub fn heads_first(v: &[f64], [b, n, h, d]: [usize; 4], pad: usize, dtype: DType) -> HostTensor {
    let ld = d + pad;
    let mut flat = vec![f32::NAN; b * h * n * ld];
    for bb in 0..b {
        for i in 0..n {
            for hh in 0..h {
                for x in 0..d {
                    flat[((bb * h + hh) * n + i) * ld + x] =
                        v[((bb * n + i) * h + hh) * d + x] as f32;
                }
            }
        }
    }
    let storage = HostTensor::from_fn(dtype, &[flat.len()], |i| flat[i]).unwrap();
    HostTensor::from_data(
        storage.data().clone(),
        Layout {
            shape: vec![b, n, h, d],
            strides: vec![h * n * ld, ld, n * ld, 1],
        },
    )
    .unwrap()
}

/// `v` (He, k, N_max) stored as (He, N_max, k), seen as (He, k, N_max): unit stride on no
/// dimension but the middle one.
pub fn transposed(v: &[f64], [he, k, nm]: [usize; 3], dtype: DType) -> HostTensor {
    let mut flat = vec![0f32; he * k * nm];
    for h in 0..he {
        for r in 0..k {
            for j in 0..nm {
                flat[(h * nm + j) * k + r] = v[(h * k + r) * nm + j] as f32;
            }
        }
    }
    let storage = HostTensor::from_fn(dtype, &[flat.len()], |i| flat[i]).unwrap();
    HostTensor::from_data(
        storage.data().clone(),
        Layout {
            shape: vec![he, k, nm],
            strides: vec![nm * k, 1, k],
        },
    )
    .unwrap()
}

pub fn f64s(t: &HostTensor) -> Vec<f64> {
    t.to_f32_vec().into_iter().map(f64::from).collect()
}

/// The definition's forward: kp, vp (B, k, H_kv, D), O (B, N, H, D), LSE (B, H, N).
#[derive(Debug, Clone)]
pub struct Def {
    pub kp: Vec<f64>,
    pub vp: Vec<f64>,
    pub out: Vec<f64>,
    pub lse: Vec<f64>,
}

/// X̃ projected: Σ_{j < N, not padded} P[head, r, j] X[b, j, hk, :], rounded to `round`
/// when given.
fn project(c: &Case, p: &[f64], p_heads: usize, x: &[f64], rnd: Option<DType>) -> Vec<f64> {
    let Dims {
        b,
        n,
        hkv,
        d,
        k,
        n_max,
        ..
    } = c.dims;
    let mut out = vec![0.0; b * k * hkv * d];
    for bb in 0..b {
        for r in 0..k {
            for hk in 0..hkv {
                let ph = if p_heads == 1 { 0 } else { hk };
                for x_ in 0..d {
                    let mut s = 0.0;
                    for j in 0..n {
                        if !c.padded(bb, j) {
                            s +=
                                p[(ph * k + r) * n_max + j] * x[((bb * n + j) * hkv + hk) * d + x_];
                        }
                    }
                    out[((bb * k + r) * hkv + hk) * d + x_] = rnd.map_or(s, |dt| round(dt, s));
                }
            }
        }
    }
    out
}

/// The definition, forward: O = softmax(scale Q (E K̃)ᵀ)(F Ṽ) per head, GQA head
/// h -> h / (H / H_kv); with `rnd`, kp and vp rounded to it first (the op's pinned
/// semantics), else the exact formula. O and LSE are not rounded.
pub fn define(c: &Case, rnd: Option<DType>) -> Def {
    let kp = project(c, &c.e, c.e_heads, &c.k, rnd);
    let vp = project(c, c.f_values(), c.f_heads_eff(), &c.v, rnd);
    let (out, lse) = attend(c, &kp, &vp);
    Def { kp, vp, out, lse }
}

/// Dense attention of Q over the k projected keys.
pub fn attend(c: &Case, kp: &[f64], vp: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let Dims {
        b, n, h, hkv, d, k, ..
    } = c.dims;
    let scale = c.scale_f64();
    let mut out = vec![0.0; b * n * h * d];
    let mut lse = vec![0.0; b * h * n];
    for bb in 0..b {
        for hh in 0..h {
            let g = hh / (h / hkv);
            for i in 0..n {
                let qi = &c.q[((bb * n + i) * h + hh) * d..][..d];
                let s: Vec<f64> = (0..k)
                    .map(|r| {
                        let kr = &kp[((bb * k + r) * hkv + g) * d..][..d];
                        scale * (0..d).map(|x| qi[x] * kr[x]).sum::<f64>()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                lse[(bb * h + hh) * n + i] = m + z.ln();
                for r in 0..k {
                    let p = (s[r] - m).exp() / z;
                    for x in 0..d {
                        out[((bb * n + i) * h + hh) * d + x] +=
                            p * vp[((bb * k + r) * hkv + g) * d + x];
                    }
                }
            }
        }
    }
    (out, lse)
}

/// The definition's gradients (not rounded).
#[derive(Debug, Clone)]
pub struct DefGrads {
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
    pub de: Vec<f64>,
    /// dF (None when F = E: dE holds both).
    pub df: Option<Vec<f64>>,
}

/// The definition, backward, from given O, LSE, kp, vp and dO: the attention backward
/// (P = exp(s - LSE), Delta = dO·O, dS = P (dP - Delta)), dkp and dvp rounded to `rnd`
/// when given, then the projections' transposes.
pub fn define_backward(
    c: &Case,
    rnd: Option<DType>,
    [out, lse, kp, vp, dout]: [&[f64]; 5],
) -> DefGrads {
    let Dims {
        b,
        n,
        h,
        hkv,
        d,
        k,
        n_max,
    } = c.dims;
    let scale = c.scale_f64();
    let mut dq = vec![0.0; b * n * h * d];
    let mut dkp = vec![0.0; b * k * hkv * d];
    let mut dvp = vec![0.0; b * k * hkv * d];
    let kv = |bb: usize, r: usize, g: usize| ((bb * k + r) * hkv + g) * d;
    for bb in 0..b {
        for hh in 0..h {
            let g = hh / (h / hkv);
            for i in 0..n {
                let at = ((bb * n + i) * h + hh) * d;
                let (qi, doi, oi) = (&c.q[at..at + d], &dout[at..at + d], &out[at..at + d]);
                let delta: f64 = (0..d).map(|x| doi[x] * oi[x]).sum();
                let l = lse[(bb * h + hh) * n + i];
                for r in 0..k {
                    let kr = &kp[kv(bb, r, g)..][..d];
                    let vr = &vp[kv(bb, r, g)..][..d];
                    let s = scale * (0..d).map(|x| qi[x] * kr[x]).sum::<f64>();
                    let p = (s - l).exp();
                    let dp: f64 = (0..d).map(|x| doi[x] * vr[x]).sum();
                    let ds = p * (dp - delta);
                    for x in 0..d {
                        dq[at + x] += scale * ds * kr[x];
                        dkp[kv(bb, r, g) + x] += scale * ds * qi[x];
                        dvp[kv(bb, r, g) + x] += p * doi[x];
                    }
                }
            }
        }
    }
    if let Some(dt) = rnd {
        dkp.iter_mut().for_each(|x| *x = round(dt, *x));
        dvp.iter_mut().for_each(|x| *x = round(dt, *x));
    }
    // dX = Pᵀ dXp (unpadded keys), dP += dXp X̃ᵀ.
    let back = |p: &[f64], ph: usize, x: &[f64], dxp: &[f64], dx: &mut [f64], dp: &mut [f64]| {
        for bb in 0..b {
            for j in 0..n {
                if c.padded(bb, j) {
                    continue;
                }
                for hk in 0..hkv {
                    let hp = if ph == 1 { 0 } else { hk };
                    for r in 0..k {
                        let w = p[(hp * k + r) * n_max + j];
                        for y in 0..d {
                            let xi = ((bb * n + j) * hkv + hk) * d + y;
                            dx[xi] += w * dxp[kv(bb, r, hk) + y];
                            dp[(hp * k + r) * n_max + j] += dxp[kv(bb, r, hk) + y] * x[xi];
                        }
                    }
                }
            }
        }
    };
    let mut dk = vec![0.0; c.k.len()];
    let mut dv = vec![0.0; c.v.len()];
    let mut de = vec![0.0; c.e.len()];
    back(&c.e, c.e_heads, &c.k, &dkp, &mut dk, &mut de);
    let df = match &c.f {
        Some(f) => {
            let mut df = vec![0.0; f.len()];
            back(f, c.f_heads, &c.v, &dvp, &mut dv, &mut df);
            Some(df)
        }
        None => {
            back(&c.e, c.e_heads, &c.v, &dvp, &mut dv, &mut de);
            None
        }
    };
    DefGrads { dq, dk, dv, de, df }
}

/// L = Σ O ∘ dO of the exact definition (for finite differences).
pub fn loss(c: &Case, dout: &[f64]) -> f64 {
    define(c, None)
        .out
        .iter()
        .zip(dout)
        .map(|(o, g)| o * g)
        .sum()
}

/// Asserts |actual - expected| <= bound elementwise, naming the first offender.
pub fn assert_within(what: &str, actual: &[f64], expected: &[f64], bound: &[f64]) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for i in 0..actual.len() {
        let err = (actual[i] - expected[i]).abs();
        assert!(
            err <= bound[i],
            "{what}: element {i}: got {}, expected {} (error {err:e} > bound {:e})",
            actual[i],
            expected[i],
            bound[i]
        );
    }
}

/// One lucidrains golden fixture.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub name: String,
    pub config: Vec<(String, String)>,
    /// (name, shape, values).
    pub tensors: Vec<(String, Vec<usize>, Vec<f64>)>,
}

impl Fixture {
    pub fn cfg(&self, key: &str) -> String {
        self.config
            .iter()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("{}: no {key}", self.name))
            .1
            .clone()
    }

    pub fn usize(&self, key: &str) -> usize {
        self.cfg(key).parse().unwrap()
    }

    pub fn get(&self, name: &str) -> Option<(Vec<usize>, Vec<f64>)> {
        self.tensors
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, s, v)| (s.clone(), v.clone()))
    }
}

/// Every committed fixture, sorted by name. Same text format as the Longformer ones
/// (`config k=v ...`, then `tensor <name> <f32|f64> <shape>` and one line of values),
/// `f32` values parsed as f32 (their shortest digits are exact only so), `f64` as f64.
pub fn load_fixtures() -> Vec<Fixture> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/linformer");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("fixtures at {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).unwrap();
            let mut lines = text
                .lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty());
            let mut fx = Fixture {
                name: path.file_stem().unwrap().to_string_lossy().into(),
                config: Vec::new(),
                tensors: Vec::new(),
            };
            while let Some(line) = lines.next() {
                let mut w = line.split_whitespace();
                match w.next() {
                    Some("config") => {
                        for kv in w {
                            let (k, v) = kv.split_once('=').expect("key=value");
                            fx.config.push((k.into(), v.into()));
                        }
                    }
                    Some("tensor") => {
                        let name = w.next().expect("name").to_string();
                        let kind = w.next().expect("kind");
                        let shape: Vec<usize> = w
                            .next()
                            .expect("shape")
                            .split(',')
                            .map(|x| x.parse().unwrap())
                            .collect();
                        let values: Vec<f64> = lines
                            .next()
                            .expect("values")
                            .split_whitespace()
                            .map(|x| match kind {
                                // Shortest round-trip float32 digits: exact only as f32.
                                "f32" => f64::from(x.parse::<f32>().unwrap()),
                                "f64" => x.parse::<f64>().unwrap(),
                                _ => panic!("{name}: kind {kind:?}"),
                            })
                            .collect();
                        assert_eq!(values.len(), shape.iter().product::<usize>(), "{name}");
                        fx.tensors.push((name, shape, values));
                    }
                    other => panic!("{}: unexpected line start {other:?}", path.display()),
                }
            }
            fx
        })
        .collect()
}
