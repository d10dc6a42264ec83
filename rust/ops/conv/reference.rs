//! 2-D convolution (forward and backward) and the activations, as direct loops over
//! contiguous NCHW buffers.
//!
//! Buffers are row-major in the logical order: x / dx (N, C, H, W), weight / dweight
//! (K, C / groups, R, S), bias / dbias (K), y / dy (N, K, P, Q). Strided tensors are
//! made contiguous by the callers (crate::ops::conv). Generic over f32 (what the library
//! serves) and f64 (what the tests' finite differences need).

use std::ops::Neg;

use crate::error::Result;
use crate::ops::attention::reference::Real;
use crate::ops::common::{check_buffers, poll_interrupt, try_alloc_vec, try_with_capacity};
use crate::ops::conv::{Activation, Conv2dProblem};

/// The float types the convolution reference runs in: [`Real`] plus what the
/// activations need.
pub trait ConvReal: Real + Neg<Output = Self> {
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    /// The error function (see [`erf`] for its precision).
    fn erf(self) -> Self;
    fn is_nan(self) -> bool;
}

impl ConvReal for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn erf(self) -> Self {
        // Evaluated in f64 and rounded once: correctly rounded but for rare ties.
        erf(self as f64) as f32
    }
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
}

impl ConvReal for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn erf(self) -> Self {
        erf(self)
    }
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
}

/// The error function in f64, to about 1e-15 relative error (tested against published
/// values to 1e-14): the Maclaurin series below |x| = 2.5 (terms peak near 1e2 there, so
/// cancellation costs under 3 digits), the continued fraction of erfc above (60 terms,
/// converged to f64 precision for |x| >= 2.5), and +-1 beyond |x| = 6 (erfc(6) < 2.2e-17).
pub fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let a = x.abs();
    let r = if a < 2.5 {
        // erf(a) = 2/sqrt(pi) * sum_n (-1)^n a^(2n+1) / (n! (2n+1))
        let a2 = a * a;
        let (mut term, mut sum, mut n) = (a, a, 0.0f64);
        loop {
            n += 1.0;
            term *= -a2 / n;
            let t = term / (2.0 * n + 1.0);
            sum += t;
            if t.abs() <= 1e-17 * sum.abs() || n > 100.0 {
                break;
            }
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else if a < 6.0 {
        // erfc(a) = exp(-a^2) / sqrt(pi) / (a + (1/2) / (a + 1 / (a + (3/2) / (a + ...))))
        let mut t = a;
        for k in (1..=60).rev() {
            t = a + (k as f64 / 2.0) / t;
        }
        let erfc = (-a * a).exp() / (std::f64::consts::PI.sqrt() * t);
        1.0 - erfc
    } else {
        1.0
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

fn sigmoid<T: ConvReal>(x: T) -> T {
    let one = T::from_f64(1.0);
    one / (one + (-x).exp())
}

/// The activation at a pre-activation value: ReLU, exact (erf) GELU, or SiLU.
pub fn activate<T: ConvReal>(act: Activation, x: T) -> T {
    match act {
        Activation::None => x,
        Activation::Relu => {
            if x > T::ZERO || x.is_nan() {
                x
            } else {
                T::ZERO
            }
        }
        Activation::Gelu => {
            let half = T::from_f64(0.5);
            half * x * (T::from_f64(1.0) + (x * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf())
        }
        Activation::Silu => x * sigmoid(x),
    }
}

/// The derivative of [`activate`] at a pre-activation value (ReLU's is 0 at 0, as
/// torch's).
pub fn activation_derivative<T: ConvReal>(act: Activation, x: T) -> T {
    let one = T::from_f64(1.0);
    match act {
        Activation::None => one,
        Activation::Relu => {
            if x > T::ZERO {
                one
            } else {
                T::ZERO
            }
        }
        Activation::Gelu => {
            // Phi(x) + x phi(x)
            let cdf =
                T::from_f64(0.5) * (one + (x * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf());
            let pdf = (-(x * x) * T::from_f64(0.5)).exp()
                * T::from_f64(
                    0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2,
                );
            cdf + x * pdf
        }
        Activation::Silu => {
            let s = sigmoid(x);
            s + x * s * (one - s)
        }
    }
}

/// Gradient with respect to the pre-activation: `dy * act'(y_pre)`, elementwise.
pub fn activation_backward<T: ConvReal>(act: Activation, y_pre: &[T], dy: &[T]) -> Vec<T> {
    y_pre
        .iter()
        .zip(dy)
        .map(|(&x, &g)| g * activation_derivative(act, x))
        .collect()
}

/// y_pre = conv(x, weight) + bias and y = act(y_pre) of one forward call.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvForward<T> {
    pub y: Vec<T>,
    pub y_pre: Vec<T>,
}

/// dx, dweight, dbias of one convolution backward call.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvGradients<T> {
    pub dx: Vec<T>,
    pub dweight: Vec<T>,
    pub dbias: Vec<T>,
}

/// Input row (or column) read by output position `o`, filter tap `t`, or None in the
/// padding. For a validated problem `o * stride + t * dil` is below the padded length,
/// so nothing overflows.
pub(crate) fn input_pos(
    o: usize,
    t: usize,
    stride: usize,
    pad: usize,
    dil: usize,
    len: usize,
) -> Option<usize> {
    let i = (o * stride + t * dil).checked_sub(pad)?;
    (i < len).then_some(i)
}

/// Convolution forward (cross-correlation, as torch's conv2d), grouped: output channel
/// `k` of group `g = k / (K / groups)` reads input channels `g * C/groups ..`.
///
/// Fallible: allocation failures and interruptions (see
/// [`crate::ops::with_interrupt_check`]) returned as errors.
pub fn try_conv2d<T: ConvReal>(
    p: &Conv2dProblem,
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
) -> Result<ConvForward<T>> {
    p.check_consistent()?;
    check_buffers(&[
        ("x", x.len(), &p.x_shape()),
        ("weight", w.len(), &p.weight_shape()),
        ("bias", bias.map_or(p.k, <[T]>::len), &[p.k]),
    ])?;
    let (n, c, h, wd, k, r, s, pp, q) = (p.n, p.c, p.h, p.w, p.k, p.r, p.s, p.p, p.q);
    let (cg, kg) = (c / p.groups, k / p.groups);
    let mut y_pre = try_alloc_vec(n * k * pp * q, T::ZERO, "the convolution output")?;
    for b in 0..n {
        for ko in 0..k {
            let g = ko / kg;
            for oh in 0..pp {
                poll_interrupt()?;
                for ow in 0..q {
                    let mut acc = bias.map_or(T::ZERO, |bias| bias[ko]);
                    for ci in 0..cg {
                        let cin = g * cg + ci;
                        for fr in 0..r {
                            let Some(ih) =
                                input_pos(oh, fr, p.stride[0], p.padding[0], p.dilation[0], h)
                            else {
                                continue;
                            };
                            for fs in 0..s {
                                let Some(iw) =
                                    input_pos(ow, fs, p.stride[1], p.padding[1], p.dilation[1], wd)
                                else {
                                    continue;
                                };
                                acc += x[((b * c + cin) * h + ih) * wd + iw]
                                    * w[((ko * cg + ci) * r + fr) * s + fs];
                            }
                        }
                    }
                    y_pre[((b * k + ko) * pp + oh) * q + ow] = acc;
                }
            }
        }
    }
    let mut y = try_with_capacity(y_pre.len(), "the convolution output")?;
    y.extend(y_pre.iter().map(|&v| activate(p.activation, v)));
    Ok(ConvForward { y, y_pre })
}

/// Convolution backward: `dy` is the gradient with respect to the pre-activation
/// (conv + bias), as in the C ABI. Each forward multiply-add `y += x * w` contributes
/// `dx += dy * w` and `dw += dy * x`; dbias sums dy over (n, p, q).
///
/// Fallible: allocation failures and interruptions returned as errors.
pub fn try_conv2d_backward<T: ConvReal>(
    p: &Conv2dProblem,
    x: &[T],
    w: &[T],
    dy: &[T],
) -> Result<ConvGradients<T>> {
    p.check_consistent()?;
    check_buffers(&[
        ("x", x.len(), &p.x_shape()),
        ("weight", w.len(), &p.weight_shape()),
        ("dy", dy.len(), &p.y_shape()),
    ])?;
    let (n, c, h, wd, k, r, s, pp, q) = (p.n, p.c, p.h, p.w, p.k, p.r, p.s, p.p, p.q);
    let (cg, kg) = (c / p.groups, k / p.groups);
    let mut dx = try_alloc_vec(x.len(), T::ZERO, "dx")?;
    let mut dw = try_alloc_vec(w.len(), T::ZERO, "dweight")?;
    let mut db = try_alloc_vec(k, T::ZERO, "dbias")?;
    for b in 0..n {
        for ko in 0..k {
            let g = ko / kg;
            for oh in 0..pp {
                poll_interrupt()?;
                for ow in 0..q {
                    let gy = dy[((b * k + ko) * pp + oh) * q + ow];
                    db[ko] += gy;
                    for ci in 0..cg {
                        let cin = g * cg + ci;
                        for fr in 0..r {
                            let Some(ih) =
                                input_pos(oh, fr, p.stride[0], p.padding[0], p.dilation[0], h)
                            else {
                                continue;
                            };
                            for fs in 0..s {
                                let Some(iw) =
                                    input_pos(ow, fs, p.stride[1], p.padding[1], p.dilation[1], wd)
                                else {
                                    continue;
                                };
                                let xi = ((b * c + cin) * h + ih) * wd + iw;
                                let wi = ((ko * cg + ci) * r + fr) * s + fs;
                                dx[xi] += gy * w[wi];
                                dw[wi] += gy * x[xi];
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(ConvGradients {
        dx,
        dweight: dw,
        dbias: db,
    })
}

#[cfg(test)]
mod tests {
    use super::erf;

    #[test]
    fn erf_matches_published_values() {
        // Values of Python's math.erf (correctly rounded to within 1 ulp).
        for (x, want) in [
            (0.0, 0.0),
            (1e-8, 1.1283791670955126e-8),
            (0.1, 0.1124629160182849),
            (0.5, 0.5204998778130465),
            (1.0, 0.8427007929497149),
            (1.5, 0.9661051464753108),
            (2.0, 0.9953222650189527),
            (2.4999, 0.9995928300996666),
            (2.5, 0.999593047982555),
            (3.0, 0.9999779095030014),
            (4.0, 0.9999999845827421),
            (5.9, 0.9999999999999999),
            (7.0, 1.0),
        ] {
            let got = erf(x);
            assert!(
                (got - want).abs() <= 1e-14 * want.abs().max(1e-300) + 1e-300,
                "erf({x}) = {got}, want {want}"
            );
            assert_eq!(erf(-x), -got);
        }
        assert!(erf(f64::NAN).is_nan());
        assert_eq!(erf(f64::INFINITY), 1.0);
    }
}
