//! What the feed-forward tests share (tests/ffn.rs on the CPU reference, tests/gpu_ffn.rs
//! on the device): random cases, and an f64 definition of the block written here,
//! independently of the library (matrix products as explicit sums over transposed
//! operands, the activations from their textbook formulas).
#![allow(dead_code, clippy::needless_range_loop)]

use flashkernels::ffn::FfnActivation;
use flashkernels::{DType, HostData, HostTensor, Layout};
use half::{bf16, f16};

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

pub const ACTIVATIONS: [FfnActivation; 4] = [
    FfnActivation::Relu,
    FfnActivation::GeluTanh,
    FfnActivation::GeluErf,
    FfnActivation::Silu,
];

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

/// The absolute error of rounding a value to `dtype` in its subnormal range (half the
/// smallest subnormal): f16's is 2^-25, the others' negligible here.
pub fn subnormal_floor(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 2f64.powi(-25),
        DType::F32 => 2f64.powi(-150),
        DType::BF16 => 2f64.powi(-134),
    }
}

/// erf by its Taylor series below 3, continued fraction of erfc above (f64 accuracy).
pub fn erf(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < 3.0 {
        let (mut term, mut sum) = (a, a);
        let mut n = 0.0;
        while term.abs() > 1e-18 * sum.abs() {
            n += 1.0;
            term *= -a * a / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        let mut f = a;
        for k in (1..80).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        1.0 - (-a * a).exp() / (std::f64::consts::PI.sqrt() * f)
    };
    r.copysign(x)
}

pub fn act(a: FfnActivation, x: f64) -> f64 {
    match a {
        FfnActivation::Relu => x.max(0.0),
        FfnActivation::GeluTanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * (x + 0.044715 * x.powi(3))).tanh())
        }
        FfnActivation::GeluErf => 0.5 * x * (1.0 + erf(x / 2f64.sqrt())),
        FfnActivation::Silu => x / (1.0 + (-x).exp()),
    }
}

/// A row-major matrix.
#[derive(Debug, Clone)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub v: Vec<f64>,
}

impl Mat {
    pub fn at(&self, r: usize, c: usize) -> f64 {
        self.v[r * self.cols + c]
    }

    /// Random entries in [-scale, scale), already rounded to `dtype`.
    pub fn random(rng: &mut Rng, rows: usize, cols: usize, scale: f64, dtype: DType) -> Mat {
        Mat {
            rows,
            cols,
            v: (0..rows * cols)
                .map(|_| round(dtype, scale * rng.uniform()))
                .collect(),
        }
    }

    pub fn t(&self) -> Mat {
        let mut v = vec![0.0; self.v.len()];
        for r in 0..self.rows {
            for c in 0..self.cols {
                v[c * self.rows + r] = self.at(r, c);
            }
        }
        Mat {
            rows: self.cols,
            cols: self.rows,
            v,
        }
    }

    /// self · other.
    pub fn mul(&self, o: &Mat) -> Mat {
        assert_eq!(self.cols, o.rows);
        let mut v = vec![0.0; self.rows * o.cols];
        for r in 0..self.rows {
            for c in 0..o.cols {
                let mut s = 0.0;
                for k in 0..self.cols {
                    s += self.at(r, k) * o.at(k, c);
                }
                v[r * o.cols + c] = s;
            }
        }
        Mat {
            rows: self.rows,
            cols: o.cols,
            v,
        }
    }

    /// |self| · |other|: the bound of a product's rounding errors.
    pub fn abs_mul(&self, o: &Mat) -> Mat {
        let a = Mat {
            v: self.v.iter().map(|x| x.abs()).collect(),
            ..self.clone()
        };
        let b = Mat {
            v: o.v.iter().map(|x| x.abs()).collect(),
            ..o.clone()
        };
        a.mul(&b)
    }

    pub fn add_row(&mut self, b: Option<&[f64]>) {
        if let Some(b) = b {
            for r in 0..self.rows {
                for c in 0..self.cols {
                    self.v[r * self.cols + c] += b[c];
                }
            }
        }
    }

    /// A host tensor of `dtype` holding these values; with `row_pad` extra elements
    /// after each row (a row stride of cols + row_pad).
    pub fn tensor(&self, dtype: DType, row_pad: usize) -> HostTensor {
        let ld = self.cols + row_pad;
        let mut flat = vec![f32::NAN; self.rows * ld];
        for r in 0..self.rows {
            for c in 0..self.cols {
                flat[r * ld + c] = self.at(r, c) as f32;
            }
        }
        let data = match dtype {
            DType::F32 => HostData::F32(flat),
            DType::F16 => HostData::F16(flat.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::BF16 => HostData::BF16(flat.iter().map(|&x| bf16::from_f32(x)).collect()),
        };
        HostTensor::from_data(
            data,
            Layout {
                shape: vec![self.rows, self.cols],
                strides: vec![ld, 1],
            },
        )
        .unwrap()
    }
}

pub fn vec_tensor(v: &[f64], dtype: DType) -> HostTensor {
    HostTensor::from_fn(dtype, &[v.len()], |i| v[i] as f32).unwrap()
}

/// One random feed-forward call: values rounded to the dtype, so the definition sees
/// exactly what the op reads.
#[derive(Debug, Clone)]
pub struct Case {
    pub dtype: DType,
    pub act: FfnActivation,
    pub residual: bool,
    pub x: Mat,
    pub w1: Mat,
    pub w2: Mat,
    pub w3: Option<Mat>,
    pub b1: Option<Vec<f64>>,
    pub b2: Option<Vec<f64>>,
    pub b3: Option<Vec<f64>>,
}

#[derive(Debug, Clone, Copy)]
pub struct Flags {
    pub gated: bool,
    pub biases: bool,
    pub residual: bool,
}

impl Case {
    #[allow(clippy::too_many_arguments)]
    pub fn random(
        seed: u64,
        dtype: DType,
        tokens: usize,
        d_model: usize,
        d_hidden: usize,
        act: FfnActivation,
        f: Flags,
    ) -> Case {
        let mut rng = Rng::new(seed);
        // Weights scaled by 1/sqrt(fan-in), as nn.Linear initializes them, so the
        // pre-activations are O(1) and every activation's curved part is exercised.
        let s1 = 2.0 / (d_model as f64).sqrt();
        let s2 = 2.0 / (d_hidden as f64).sqrt();
        let x = Mat::random(&mut rng, tokens, d_model, 1.0, dtype);
        let w1 = Mat::random(&mut rng, d_hidden, d_model, s1, dtype);
        let w2 = Mat::random(&mut rng, d_model, d_hidden, s2, dtype);
        let w3 = f
            .gated
            .then(|| Mat::random(&mut rng, d_hidden, d_model, s1, dtype));
        let mut bias = |n: usize, on: bool| {
            on.then(|| (0..n).map(|_| round(dtype, 0.5 * rng.uniform())).collect())
        };
        let b1 = bias(d_hidden, f.biases);
        let b2 = bias(d_model, f.biases);
        let b3 = bias(d_hidden, f.biases && f.gated);
        Case {
            dtype,
            act,
            residual: f.residual,
            x,
            w1,
            w2,
            w3,
            b1,
            b2,
            b3,
        }
    }

    /// The definition: (pre-activation u, gate g, exact hidden h, y), all f64, nothing
    /// rounded.
    pub fn define(&self) -> Defined {
        let mut u = self.x.mul(&self.w1.t());
        u.add_row(self.b1.as_deref());
        let g = self.w3.as_ref().map(|w3| {
            let mut g = self.x.mul(&w3.t());
            g.add_row(self.b3.as_deref());
            g
        });
        let mut h = u.clone();
        for i in 0..h.v.len() {
            h.v[i] = act(self.act, u.v[i]) * g.as_ref().map_or(1.0, |g| g.v[i]);
        }
        let mut y = h.mul(&self.w2.t());
        y.add_row(self.b2.as_deref());
        if self.residual {
            for i in 0..y.v.len() {
                y.v[i] += self.x.v[i];
            }
        }
        Defined { u, g, h, y }
    }

    /// Every input as host tensors of the case's dtype; x with `x_pad` extra elements
    /// per row.
    pub fn tensors(&self, x_pad: usize) -> Tensors {
        let d = self.dtype;
        Tensors {
            x: self.x.tensor(d, x_pad),
            w1: self.w1.tensor(d, 0),
            w2: self.w2.tensor(d, 0),
            w3: self.w3.as_ref().map(|w| w.tensor(d, 0)),
            b1: self.b1.as_ref().map(|b| vec_tensor(b, d)),
            b2: self.b2.as_ref().map(|b| vec_tensor(b, d)),
            b3: self.b3.as_ref().map(|b| vec_tensor(b, d)),
        }
    }
}

pub struct Defined {
    pub u: Mat,
    pub g: Option<Mat>,
    pub h: Mat,
    pub y: Mat,
}

pub struct Tensors {
    pub x: HostTensor,
    pub w1: HostTensor,
    pub w2: HostTensor,
    pub w3: Option<HostTensor>,
    pub b1: Option<HostTensor>,
    pub b2: Option<HostTensor>,
    pub b3: Option<HostTensor>,
}

/// The bound on y from rounding the hidden activation once and y once (unit roundoff
/// u of the dtype): |Δy| <= u (|W2| |h|)ᵀ + u |y| (plus the subnormal floor of each
/// rounding), doubled for the f32 accumulation's
/// own error and the inputs' f32 products, plus a floor for f32.
pub fn y_bounds(c: &Case, d: &Defined) -> Vec<f64> {
    let u = unit_roundoff(c.dtype);
    let prop = d.h.abs_mul(&c.w2.t());
    let floor = if c.dtype == DType::F32 { 1e-6 } else { 0.0 };
    let sub = subnormal_floor(c.dtype);
    (0..d.y.v.len())
        .map(|i| {
            let w2_row: f64 = (0..c.w2.cols)
                .map(|j| c.w2.at(i % c.w2.rows, j).abs())
                .sum();
            2.0 * u * (prop.v[i] + d.y.v[i].abs()) + sub * (w2_row + 1.0) + floor
        })
        .collect()
}

/// Asserts |actual - expected| <= bound elementwise, naming the first offender.
pub fn assert_within(what: &str, actual: &[f32], expected: &[f64], bound: &[f64]) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    let mut worst = (0usize, 0.0f64);
    for i in 0..actual.len() {
        let err = (actual[i] as f64 - expected[i]).abs();
        assert!(
            err <= bound[i],
            "{what}: element {i}: got {}, expected {} (error {err:e} > bound {:e})",
            actual[i],
            expected[i],
            bound[i]
        );
        if err / bound[i] > worst.1 {
            worst = (i, err / bound[i]);
        }
    }
}
