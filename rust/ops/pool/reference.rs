//! 2-D max / average pooling (forward and backward), as direct loops over contiguous
//! NCHW buffers: x / dx (N, C, H, W), y / dy (N, C, P, Q). Generic over f32 and f64 as
//! the convolution reference. Each window visits only its taps inside the input
//! ([`taps`], in closed form), so a huge kernel costs what the input holds.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::ops::common::{check_buffers, poll_interrupt, try_alloc_vec, try_with_capacity};
use crate::ops::conv::reference::ConvReal;
use crate::ops::pool::Pool2dProblem;

/// The taps `t` in `[0, kernel)` of window `o` that land inside an input of length
/// `len`, at input position `o * stride + t * dil - pad`: one range, computed in u128
/// (no overflow, no loop over the kernel).
pub(crate) fn taps(
    o: usize,
    kernel: usize,
    stride: usize,
    pad: usize,
    dil: usize,
    len: usize,
) -> Range<usize> {
    let (a, kernel, pad, dil, len) = (
        o as u128 * stride as u128,
        kernel as u128,
        pad as u128,
        dil.max(1) as u128,
        len as u128,
    );
    // The first tap at or past the input's start, and one past the last before its end.
    let lo = if a >= pad { 0 } else { (pad - a).div_ceil(dil) };
    let hi = if a >= pad + len {
        0
    } else {
        (pad + len - a).div_ceil(dil)
    }
    .min(kernel);
    // Both are at most `kernel`, a usize.
    lo.min(hi) as usize..hi as usize
}

/// The input positions of window `o`'s taps inside the input (see [`taps`]).
fn positions(
    o: usize,
    kernel: usize,
    stride: usize,
    pad: usize,
    dil: usize,
    len: usize,
) -> impl Iterator<Item = usize> + Clone {
    // In range: each position is inside [0, len).
    taps(o, kernel, stride, pad, dil, len).map(move |t| o * stride + t * dil - pad)
}

/// Max pooling: y and the argmax of each window as `h * W + w` within its (n, c) plane.
/// As torch: padding never wins (it is skipped), the first maximum wins ties, and a NaN
/// wins over any number (the last NaN of a window). A window whose elements are all
/// -inf records its first element.
///
/// Fallible: allocation failures and interruptions (see
/// [`crate::ops::with_interrupt_check`]) returned as errors.
pub fn try_max_pool2d<T: ConvReal>(p: &Pool2dProblem, x: &[T]) -> Result<(Vec<T>, Vec<i32>)> {
    p.check_consistent()?;
    check_buffers(&[("x", x.len(), &p.x_shape())])?;
    let planes = p.n * p.c;
    let mut y = try_with_capacity(planes * p.p * p.q, "the pooling output")?;
    let mut idx = try_with_capacity(planes * p.p * p.q, "the pooling indices")?;
    if p.h * p.w > i32::MAX as usize + 1 {
        return Err(Error::TooLarge {
            what: "the input plane h * w (max-pooling indices are int32)".into(),
            value: (p.h * p.w) as u64,
            limit: i32::MAX as u64 + 1,
        });
    }
    for plane in 0..planes {
        let xp = &x[plane * p.h * p.w..(plane + 1) * p.h * p.w];
        for oh in 0..p.p {
            poll_interrupt()?;
            let rows = positions(
                oh,
                p.kernel[0],
                p.stride[0],
                p.padding[0],
                p.dilation[0],
                p.h,
            );
            for ow in 0..p.q {
                let cols = positions(
                    ow,
                    p.kernel[1],
                    p.stride[1],
                    p.padding[1],
                    p.dilation[1],
                    p.w,
                );
                let mut best = T::NEG_INFINITY;
                let mut best_i =
                    rows.clone().next().unwrap_or(0) * p.w + cols.clone().next().unwrap_or(0);
                for ih in rows.clone() {
                    for iw in cols.clone() {
                        let v = xp[ih * p.w + iw];
                        if v > best || v.is_nan() {
                            best = v;
                            best_i = ih * p.w + iw;
                        }
                    }
                }
                y.push(best);
                // Below h * w <= 2^31, checked above.
                idx.push(best_i as i32);
            }
        }
    }
    Ok((y, idx))
}

/// Max pooling backward: dy scattered to the recorded indices, summed where windows
/// share their maximum.
///
/// Fallible: out-of-range indices, allocation failures and interruptions returned as
/// errors.
pub fn try_max_pool2d_backward<T: ConvReal>(
    p: &Pool2dProblem,
    dy: &[T],
    indices: &[i32],
) -> Result<Vec<T>> {
    p.check_consistent()?;
    check_buffers(&[
        ("dy", dy.len(), &p.y_shape()),
        ("indices", indices.len(), &p.y_shape()),
    ])?;
    let plane_in = p.h * p.w;
    let plane_out = p.p * p.q;
    if let Some(bad) = indices
        .iter()
        .find(|&&i| usize::try_from(i).map_or(true, |i| i >= plane_in))
    {
        return Err(Error::InvalidArgument(format!(
            "indices: {bad} is outside the {}x{} input plane",
            p.h, p.w
        )));
    }
    let mut dx = try_alloc_vec(p.n * p.c * plane_in, T::ZERO, "dx")?;
    for (o, (&g, &i)) in dy.iter().zip(indices).enumerate() {
        if o % 4096 == 0 {
            poll_interrupt()?;
        }
        let plane = o / plane_out;
        // Checked above: 0 <= i < plane_in.
        dx[plane * plane_in + i as usize] += g;
    }
    Ok(dx)
}

/// The input rows (or columns) of an average-pooling window, clipped to the input, and
/// the window's length clipped to the padded input (torch's `count_include_pad` size).
fn avg_window(
    o: usize,
    kernel: usize,
    stride: usize,
    pad: usize,
    len: usize,
) -> (Range<usize>, usize) {
    // In padded coordinates the window is [a, a + kernel), clipped to the padded input
    // [0, len + 2 pad); a validated window starts before len + pad.
    let a = o * stride;
    let end = a.saturating_add(kernel).min(len + 2 * pad);
    let padded = end.saturating_sub(a);
    let lo = a.saturating_sub(pad).min(len);
    let hi = end.saturating_sub(pad).min(len);
    (lo..hi.max(lo), padded)
}

/// The divisor of average-pooling window (oh, ow) and its input ranges (the divisor in
/// f64: the product of two huge window lengths does not fit a usize).
fn avg_divisor(p: &Pool2dProblem, oh: usize, ow: usize) -> (Range<usize>, Range<usize>, f64) {
    let (rows, pr) = avg_window(oh, p.kernel[0], p.stride[0], p.padding[0], p.h);
    let (cols, pc) = avg_window(ow, p.kernel[1], p.stride[1], p.padding[1], p.w);
    let div = match p.divisor_override {
        Some(d) => d as f64,
        None if p.count_include_pad => pr as f64 * pc as f64,
        None => rows.len() as f64 * cols.len() as f64,
    };
    (rows, cols, div)
}

/// Average pooling (no dilation, as torch): the window's sum divided by its size
/// clipped to the padded input (`count_include_pad`) or to the input, or by
/// `divisor_override`.
///
/// Fallible: allocation failures and interruptions returned as errors.
pub fn try_avg_pool2d<T: ConvReal>(p: &Pool2dProblem, x: &[T]) -> Result<Vec<T>> {
    p.check_consistent()?;
    check_buffers(&[("x", x.len(), &p.x_shape())])?;
    let planes = p.n * p.c;
    let mut y = try_with_capacity(planes * p.p * p.q, "the pooling output")?;
    for plane in 0..planes {
        let xp = &x[plane * p.h * p.w..(plane + 1) * p.h * p.w];
        for oh in 0..p.p {
            poll_interrupt()?;
            for ow in 0..p.q {
                let (rows, cols, div) = avg_divisor(p, oh, ow);
                let mut sum = T::ZERO;
                for ih in rows {
                    for iw in cols.clone() {
                        sum += xp[ih * p.w + iw];
                    }
                }
                y.push(sum / T::from_f64(div));
            }
        }
    }
    Ok(y)
}

/// Average pooling backward: each dy spread evenly (dy / divisor) over its window's
/// input elements.
///
/// Fallible: allocation failures and interruptions returned as errors.
pub fn try_avg_pool2d_backward<T: ConvReal>(p: &Pool2dProblem, dy: &[T]) -> Result<Vec<T>> {
    p.check_consistent()?;
    check_buffers(&[("dy", dy.len(), &p.y_shape())])?;
    let planes = p.n * p.c;
    let mut dx = try_alloc_vec(planes * p.h * p.w, T::ZERO, "dx")?;
    for plane in 0..planes {
        for oh in 0..p.p {
            poll_interrupt()?;
            for ow in 0..p.q {
                let (rows, cols, div) = avg_divisor(p, oh, ow);
                let g = dy[(plane * p.p + oh) * p.q + ow] / T::from_f64(div);
                for ih in rows {
                    for iw in cols.clone() {
                        dx[(plane * p.h + ih) * p.w + iw] += g;
                    }
                }
            }
        }
    }
    Ok(dx)
}
