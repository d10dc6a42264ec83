//! The fused feed-forward block's CPU reference, forward and backward, as plain loops
//! over contiguous row-major f64 buffers (the callers in crate::ops::ffn make strided
//! inputs contiguous):
//!
//!   u = x W1ᵀ + b1,  g = x W3ᵀ + b3 (gated only),
//!   h = round(act(u) [∘ g]),  y = h W2ᵀ + b2 [+ x]
//!
//! x (tokens, d_model), W1 / W3 (d_hidden, d_model), W2 (d_model, d_hidden), as
//! nn.Linear stores them. Everything is computed in f64; h is rounded once to the
//! storage dtype, as the kernels store it between their two GEMMs, and the callers round
//! each output once. The backward recomputes u, g and the rounded h from x (nothing but
//! the inputs is kept between the directions).

use half::{bf16, f16};

use crate::error::Result;
use crate::ops::common::{poll_interrupt, try_alloc_vec};
use crate::ops::conv::reference::erf;
use crate::ops::ffn::{FfnActivation, FfnProblem};
use crate::tensor::DType;

/// sqrt(2 / pi), the tanh GELU's inner scale.
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
/// The tanh GELU's cubic coefficient.
const GELU_CUBIC: f64 = 0.044_715;

/// The activation at a pre-activation value.
pub fn ffn_activate(act: FfnActivation, x: f64) -> f64 {
    match act {
        FfnActivation::Relu => {
            if x > 0.0 || x.is_nan() {
                x
            } else {
                0.0
            }
        }
        FfnActivation::GeluTanh => {
            0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x)).tanh())
        }
        FfnActivation::GeluErf => 0.5 * x * (1.0 + erf(x * std::f64::consts::FRAC_1_SQRT_2)),
        FfnActivation::Silu => x / (1.0 + (-x).exp()),
    }
}

/// The activation's derivative (ReLU's is 0 at 0, as torch's).
pub fn ffn_activation_derivative(act: FfnActivation, x: f64) -> f64 {
    match act {
        FfnActivation::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        FfnActivation::GeluTanh => {
            let inner = SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x);
            let t = inner.tanh();
            let dinner = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x * x);
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dinner
        }
        FfnActivation::GeluErf => {
            let cdf = 0.5 * (1.0 + erf(x * std::f64::consts::FRAC_1_SQRT_2));
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            cdf + x * pdf
        }
        FfnActivation::Silu => {
            let s = 1.0 / (1.0 + (-x).exp());
            s + x * s * (1.0 - s)
        }
    }
}

/// `v` rounded to `dtype` (round to nearest even) and widened back.
pub fn round_to_dtype(dtype: DType, v: f64) -> f64 {
    match dtype {
        DType::F32 => v as f32 as f64,
        DType::F16 => f16::from_f64(v).to_f64(),
        DType::BF16 => bf16::from_f64(v).to_f64(),
    }
}

/// The weights and biases of one call, contiguous row-major f64.
#[derive(Debug, Clone, Copy)]
pub struct FfnWeights<'a> {
    pub w1: &'a [f64],
    pub w2: &'a [f64],
    pub w3: Option<&'a [f64]>,
    pub b1: Option<&'a [f64]>,
    pub b2: Option<&'a [f64]>,
    pub b3: Option<&'a [f64]>,
}

/// y (tokens, d_model) and the stored hidden activation h (tokens, d_hidden, already
/// rounded to the dtype) of one forward call.
#[derive(Debug, Clone, PartialEq)]
pub struct FfnForward {
    pub y: Vec<f64>,
    pub h: Vec<f64>,
}

/// The gradients of one backward call; dW3 / db3 only when gated. db1 / db2 / db3 are
/// the sums over tokens whether or not the forward had those biases.
#[derive(Debug, Clone, PartialEq)]
pub struct FfnRefGradients {
    pub dx: Vec<f64>,
    pub dw1: Vec<f64>,
    pub db1: Vec<f64>,
    pub dw2: Vec<f64>,
    pub db2: Vec<f64>,
    pub dw3: Option<Vec<f64>>,
    pub db3: Option<Vec<f64>>,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Per token: u, g (or empty) and the rounded h.
struct Hidden {
    u: Vec<f64>,
    g: Vec<f64>,
    h: Vec<f64>,
}

fn hidden(p: &FfnProblem, x: &[f64], w: &FfnWeights<'_>) -> Result<Hidden> {
    let (dm, dh) = (p.d_model, p.d_hidden);
    let n = p.tokens * dh;
    let mut u = try_alloc_vec(n, 0.0, "the reference's pre-activation")?;
    let mut g = try_alloc_vec(if p.gated { n } else { 0 }, 0.0, "the reference's gate")?;
    let mut h = try_alloc_vec(n, 0.0, "the reference's hidden activation")?;
    for t in 0..p.tokens {
        poll_interrupt()?;
        let xr = &x[t * dm..(t + 1) * dm];
        for j in 0..dh {
            let i = t * dh + j;
            u[i] = dot(xr, &w.w1[j * dm..(j + 1) * dm]) + w.b1.map_or(0.0, |b| b[j]);
            let mut v = ffn_activate(p.activation, u[i]);
            if let Some(w3) = w.w3 {
                g[i] = dot(xr, &w3[j * dm..(j + 1) * dm]) + w.b3.map_or(0.0, |b| b[j]);
                v *= g[i];
            }
            h[i] = round_to_dtype(p.dtype, v);
        }
    }
    Ok(Hidden { u, g, h })
}

/// The forward: y = round(act(x W1ᵀ + b1) [∘ (x W3ᵀ + b3)]) W2ᵀ + b2 [+ x], in f64 (y
/// not rounded; the caller rounds it once).
pub fn try_ffn(p: &FfnProblem, x: &[f64], w: &FfnWeights<'_>) -> Result<FfnForward> {
    let (dm, dh) = (p.d_model, p.d_hidden);
    let hid = hidden(p, x, w)?;
    let mut y = try_alloc_vec(p.tokens * dm, 0.0, "the reference's output")?;
    for t in 0..p.tokens {
        poll_interrupt()?;
        let hr = &hid.h[t * dh..(t + 1) * dh];
        for i in 0..dm {
            let mut v = dot(hr, &w.w2[i * dh..(i + 1) * dh]) + w.b2.map_or(0.0, |b| b[i]);
            if p.residual {
                v += x[t * dm + i];
            }
            y[t * dm + i] = v;
        }
    }
    Ok(FfnForward { y, h: hid.h })
}

/// The backward: every gradient of the forward's inputs, given dy (tokens, d_model), in
/// f64 (not rounded). With dh = dy W2, du = dh [∘ g] ∘ act'(u), dg = dh ∘ act(u):
/// dx = du W1 [+ dg W3] [+ dy], dW1 = duᵀ x, db1 = Σ du, dW2 = dyᵀ h, db2 = Σ dy,
/// dW3 = dgᵀ x, db3 = Σ dg; h is the forward's rounded hidden activation.
pub fn try_ffn_backward(
    p: &FfnProblem,
    x: &[f64],
    w: &FfnWeights<'_>,
    dy: &[f64],
) -> Result<FfnRefGradients> {
    let (dm, dh_n) = (p.d_model, p.d_hidden);
    let hid = hidden(p, x, w)?;
    let n = p.tokens * dh_n;
    // du and dg per (token, hidden unit).
    let mut du = try_alloc_vec(n, 0.0, "the reference's du")?;
    let mut dg = try_alloc_vec(if p.gated { n } else { 0 }, 0.0, "the reference's dg")?;
    for t in 0..p.tokens {
        poll_interrupt()?;
        let dyr = &dy[t * dm..(t + 1) * dm];
        for j in 0..dh_n {
            let i = t * dh_n + j;
            // dh[t, j] = sum_i dy[t, i] W2[i, j]
            let dhv: f64 = (0..dm).map(|c| dyr[c] * w.w2[c * dh_n + j]).sum();
            let d = ffn_activation_derivative(p.activation, hid.u[i]);
            if p.gated {
                du[i] = dhv * hid.g[i] * d;
                dg[i] = dhv * ffn_activate(p.activation, hid.u[i]);
            } else {
                du[i] = dhv * d;
            }
        }
    }
    let mut dx = try_alloc_vec(p.tokens * dm, 0.0, "the reference's dx")?;
    for t in 0..p.tokens {
        poll_interrupt()?;
        for c in 0..dm {
            let mut v: f64 = (0..dh_n).map(|j| du[t * dh_n + j] * w.w1[j * dm + c]).sum();
            if let Some(w3) = w.w3 {
                v += (0..dh_n)
                    .map(|j| dg[t * dh_n + j] * w3[j * dm + c])
                    .sum::<f64>();
            }
            if p.residual {
                v += dy[t * dm + c];
            }
            dx[t * dm + c] = v;
        }
    }
    // (rows, cols) = aᵀ b over tokens: a (tokens, rows), b (tokens, cols).
    let outer = |a: &[f64], rows: usize, b: &[f64], cols: usize| -> Result<Vec<f64>> {
        let mut out = try_alloc_vec(rows * cols, 0.0, "a weight gradient of the reference")?;
        for t in 0..p.tokens {
            poll_interrupt()?;
            for r in 0..rows {
                let av = a[t * rows + r];
                let o = &mut out[r * cols..(r + 1) * cols];
                for (oc, bv) in o.iter_mut().zip(&b[t * cols..(t + 1) * cols]) {
                    *oc += av * bv;
                }
            }
        }
        Ok(out)
    };
    let colsum = |a: &[f64], cols: usize| -> Vec<f64> {
        let mut s = vec![0.0; cols];
        for row in a.chunks_exact(cols) {
            for (sv, v) in s.iter_mut().zip(row) {
                *sv += v;
            }
        }
        s
    };
    let dw1 = outer(&du, dh_n, x, dm)?;
    let dw2 = outer(dy, dm, &hid.h, dh_n)?;
    let (dw3, db3) = if p.gated {
        (Some(outer(&dg, dh_n, x, dm)?), Some(colsum(&dg, dh_n)))
    } else {
        (None, None)
    };
    Ok(FfnRefGradients {
        dx,
        dw1,
        db1: colsum(&du, dh_n),
        dw2,
        db2: colsum(dy, dm),
        dw3,
        db3,
    })
}
