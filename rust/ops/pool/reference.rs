//! 2-D max / average pooling (forward and backward), as direct loops over contiguous
//! NCHW buffers: x / dx (N, C, H, W), y / dy (N, C, P, Q). Generic over f32 and f64 as
//! the convolution reference.

use crate::ops::conv::reference::{input_pos, ConvReal};
use crate::ops::pool::Pool2dProblem;
/// Max pooling: y and the argmax of each window as `h * W + w` within its (n, c) plane.
/// As torch: padding never wins (it is skipped), the first maximum wins ties, and a NaN
/// wins over any number (the last NaN of a window). A window whose elements are all
/// -inf records its first element.
pub fn max_pool2d<T: ConvReal>(p: &Pool2dProblem, x: &[T]) -> (Vec<T>, Vec<i32>) {
    let planes = p.n * p.c;
    let mut y = Vec::with_capacity(planes * p.p * p.q);
    let mut idx = Vec::with_capacity(planes * p.p * p.q);
    for plane in 0..planes {
        let xp = &x[plane * p.h * p.w..(plane + 1) * p.h * p.w];
        for oh in 0..p.p {
            for ow in 0..p.q {
                let rows: Vec<usize> = (0..p.kernel[0])
                    .filter_map(|t| input_pos(oh, t, p.stride[0], p.padding[0], p.dilation[0], p.h))
                    .collect();
                let cols: Vec<usize> = (0..p.kernel[1])
                    .filter_map(|t| input_pos(ow, t, p.stride[1], p.padding[1], p.dilation[1], p.w))
                    .collect();
                let mut best = T::NEG_INFINITY;
                let mut best_i =
                    rows.first().copied().unwrap_or(0) * p.w + cols.first().copied().unwrap_or(0);
                for &ih in &rows {
                    for &iw in &cols {
                        let v = xp[ih * p.w + iw];
                        if v > best || v.is_nan() {
                            best = v;
                            best_i = ih * p.w + iw;
                        }
                    }
                }
                y.push(best);
                idx.push(best_i as i32);
            }
        }
    }
    (y, idx)
}

/// Max pooling backward: dy scattered to the recorded indices, summed where windows
/// share their maximum.
pub fn max_pool2d_backward<T: ConvReal>(p: &Pool2dProblem, dy: &[T], indices: &[i32]) -> Vec<T> {
    let plane_in = p.h * p.w;
    let plane_out = p.p * p.q;
    let mut dx = vec![T::ZERO; p.n * p.c * plane_in];
    for (o, (&g, &i)) in dy.iter().zip(indices).enumerate() {
        let plane = o / plane_out;
        dx[plane * plane_in + i as usize] += g;
    }
    dx
}

/// The input rows (or columns) of an average-pooling window, clipped to the input, and
/// the window's length clipped to the padded input (torch's `count_include_pad` size).
fn avg_window(
    o: usize,
    kernel: usize,
    stride: usize,
    pad: usize,
    len: usize,
) -> (std::ops::Range<usize>, usize) {
    let start = (o * stride) as i64 - pad as i64;
    let end = (start + kernel as i64).min((len + pad) as i64);
    let padded = (end - start) as usize;
    let (lo, hi) = (start.max(0) as usize, end.min(len as i64).max(0) as usize);
    (lo..hi.max(lo), padded)
}

/// The divisor of average-pooling window (oh, ow) and its input ranges.
fn avg_divisor(
    p: &Pool2dProblem,
    oh: usize,
    ow: usize,
) -> (std::ops::Range<usize>, std::ops::Range<usize>, usize) {
    let (rows, pr) = avg_window(oh, p.kernel[0], p.stride[0], p.padding[0], p.h);
    let (cols, pc) = avg_window(ow, p.kernel[1], p.stride[1], p.padding[1], p.w);
    let div = match p.divisor_override {
        Some(d) => d,
        None if p.count_include_pad => pr * pc,
        None => rows.len() * cols.len(),
    };
    (rows, cols, div)
}

/// Average pooling (no dilation, as torch): the window's sum divided by its size
/// clipped to the padded input (`count_include_pad`) or to the input, or by
/// `divisor_override`.
pub fn avg_pool2d<T: ConvReal>(p: &Pool2dProblem, x: &[T]) -> Vec<T> {
    let planes = p.n * p.c;
    let mut y = Vec::with_capacity(planes * p.p * p.q);
    for plane in 0..planes {
        let xp = &x[plane * p.h * p.w..(plane + 1) * p.h * p.w];
        for oh in 0..p.p {
            for ow in 0..p.q {
                let (rows, cols, div) = avg_divisor(p, oh, ow);
                let mut sum = T::ZERO;
                for ih in rows {
                    for iw in cols.clone() {
                        sum += xp[ih * p.w + iw];
                    }
                }
                y.push(sum / T::from_f64(div as f64));
            }
        }
    }
    y
}

/// Average pooling backward: each dy spread evenly (dy / divisor) over its window's
/// input elements.
pub fn avg_pool2d_backward<T: ConvReal>(p: &Pool2dProblem, dy: &[T]) -> Vec<T> {
    let planes = p.n * p.c;
    let mut dx = vec![T::ZERO; planes * p.h * p.w];
    for plane in 0..planes {
        for oh in 0..p.p {
            for ow in 0..p.q {
                let (rows, cols, div) = avg_divisor(p, oh, ow);
                let g = dy[(plane * p.p + oh) * p.q + ow] / T::from_f64(div as f64);
                for ih in rows {
                    for iw in cols.clone() {
                        dx[(plane * p.h + ih) * p.w + iw] += g;
                    }
                }
            }
        }
    }
    dx
}
