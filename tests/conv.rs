//! The CPU reference of conv2d and 2-D pooling, forward and backward.
//!
//! Independent definitions: the convolution forward is checked against an explicit
//! im2col matrix product over a zero-padded copy of the input (f64, written here, with
//! none of the reference's loop structure); the backward against central finite
//! differences of the f64 forward; the activations' derivatives likewise; pooling
//! against its defining properties (the argmax is a window element no smaller than the
//! window, padding never wins, ties go to the first, the backward is the adjoint of the
//! forward). Through the public API: NCHW and NHWC strides give identical results, and
//! the typed outputs have the documented shapes and dtypes.

mod common;

use common::Rng;
use flashkernels::conv::{self, Activation, Conv2dOptions, Conv2dProblem, ConvGrads};
use flashkernels::pool::{self, Indices, Pool2dOptions, PoolKind};
use flashkernels::reference;
use flashkernels::{DType, HostData, HostTensor, Layout, Tensor};
use proptest::prelude::*;

fn random(rng: &mut Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.normal() as f64).collect()
}

/// Sizes of a random convolution: (n, c, h, w, k, r, s, groups) plus options.
#[derive(Debug, Clone)]
struct Case {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    r: usize,
    s: usize,
    opts: Conv2dOptions,
}

impl Case {
    fn layouts(&self) -> (Layout, Layout) {
        (
            Layout::contiguous(&[self.n, self.c, self.h, self.w]),
            Layout::contiguous(&[self.k, self.c / self.opts.groups, self.r, self.s]),
        )
    }

    fn problem(&self, bias: bool) -> flashkernels::Result<Conv2dProblem> {
        let (xl, wl) = self.layouts();
        let bl = Layout::contiguous(&[self.k]);
        conv::validate(
            (DType::F32, &xl),
            (DType::F32, &wl),
            bias.then_some((DType::F32, &bl)),
            &self.opts,
        )
    }
}

/// `len` raised, if need be, so the padded input holds the dilated kernel: the smallest
/// input a convolution accepts.
fn valid_len(len: usize, kernel: usize, pad: usize, dil: usize) -> usize {
    len.max((dil * (kernel - 1) + 1).saturating_sub(2 * pad))
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        (1usize..3, 1usize..4, 1usize..4, 1usize..4),
        (1usize..8, 1usize..8, 1usize..4, 1usize..4),
        (
            1usize..4,
            1usize..4,
            0usize..3,
            0usize..3,
            1usize..3,
            1usize..3,
        ),
        0usize..4,
    )
        .prop_map(
            |((n, cg, kg, g), (h, w, r, s), (sh, sw, ph, pw, dh, dw), act)| Case {
                n,
                c: cg * g,
                // Only valid cases: the padded input at least as large as the dilated
                // kernel (every test checks every case; `valid_cases_only` keeps it so).
                h: valid_len(h, r, ph, dh),
                w: valid_len(w, s, pw, dw),
                k: kg * g,
                r,
                s,
                opts: Conv2dOptions {
                    stride: [sh, sw],
                    padding: [ph, pw],
                    dilation: [dh, dw],
                    groups: g,
                    activation: [
                        Activation::None,
                        Activation::Relu,
                        Activation::Gelu,
                        Activation::Silu,
                    ][act],
                    algo: None,
                },
            },
        )
}

/// conv2d by definition: zero-pad x into a new array, gather every window into one row
/// of an im2col matrix per group, multiply by the group's (Cg*R*S, Kg) filter matrix.
/// Returns y_pre, (N, K, P, Q) row-major.
fn naive_conv(case: &Case, x: &[f64], w: &[f64], bias: Option<&[f64]>) -> Vec<f64> {
    let (n, c, h, wd, k, r, s) = (case.n, case.c, case.h, case.w, case.k, case.r, case.s);
    let [sh, sw] = case.opts.stride;
    let [ph, pw] = case.opts.padding;
    let [dh, dw] = case.opts.dilation;
    let g = case.opts.groups;
    let (hp, wp) = (h + 2 * ph, wd + 2 * pw);
    let mut padded = vec![0.0; n * c * hp * wp];
    for (i, &v) in x.iter().enumerate() {
        let (col, row, ch, b) = (i % wd, (i / wd) % h, (i / (wd * h)) % c, i / (wd * h * c));
        padded[((b * c + ch) * hp + row + ph) * wp + col + pw] = v;
    }
    let p = (hp - dh * (r - 1) - 1) / sh + 1;
    let q = (wp - dw * (s - 1) - 1) / sw + 1;
    let (cg, kg) = (c / g, k / g);
    let depth = cg * r * s;
    let mut y = vec![0.0; n * k * p * q];
    for grp in 0..g {
        // im2col: one row per output pixel (b, oh, ow), one column per (ci, fr, fs).
        let rows = n * p * q;
        let mut a = vec![0.0; rows * depth];
        for row in 0..rows {
            let (ow, oh, b) = (row % q, (row / q) % p, row / (p * q));
            for col in 0..depth {
                let (fs, fr, ci) = (col % s, (col / s) % r, col / (r * s));
                let ch = grp * cg + ci;
                a[row * depth + col] =
                    padded[((b * c + ch) * hp + oh * sh + fr * dh) * wp + ow * sw + fs * dw];
            }
        }
        // The filter matrix: column j is output channel grp * kg + j, flattened (ci, r, s).
        for j in 0..kg {
            let ko = grp * kg + j;
            let filt = &w[ko * depth..(ko + 1) * depth];
            for row in 0..rows {
                let (ow, oh, b) = (row % q, (row / q) % p, row / (p * q));
                let dot: f64 = a[row * depth..(row + 1) * depth]
                    .iter()
                    .zip(filt)
                    .map(|(u, v)| u * v)
                    .sum();
                y[((b * k + ko) * p + oh) * q + ow] = dot + bias.map_or(0.0, |bb| bb[ko]);
            }
        }
    }
    y
}

fn naive_act(act: Activation, x: f64) -> f64 {
    match act {
        Activation::None => x,
        Activation::Relu => x.max(0.0),
        // std has no erf: GELU itself is checked independently against x * Phi(x) by
        // quadrature in `gelu_is_x_times_normal_cdf`.
        Activation::Gelu => reference::activate(Activation::Gelu, x),
        Activation::Silu => x / (1.0 + (-x).exp()),
    }
}

fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * scale,
            "{what}[{i}]: got {g}, want {w} (tol {tol} x {scale})"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Forward (groups, stride, padding, dilation, bias, activation) against im2col.
    #[test]
    fn conv_forward_matches_im2col(case in case_strategy(), seed in any::<u64>(), bias in any::<bool>()) {
        let p = case.problem(bias).expect("case_strategy generates valid cases only");
        let mut rng = Rng::new(seed);
        let x = random(&mut rng, case.n * case.c * case.h * case.w);
        let w = random(&mut rng, case.k * (case.c / case.opts.groups) * case.r * case.s);
        let b = random(&mut rng, case.k);
        let b = bias.then_some(b.as_slice());
        let got = reference::try_conv2d(&p, &x, &w, b).unwrap();
        let want = naive_conv(&case, &x, &w, b);
        assert_close("y_pre", &got.y_pre, &want, 1e-12);
        let want_y: Vec<f64> = want.iter().map(|&v| naive_act(case.opts.activation, v)).collect();
        assert_close("y", &got.y, &want_y, 1e-12);
        prop_assert_eq!(p.y_shape().iter().product::<usize>(), want.len());
    }

    /// Backward (dx, dweight, dbias) against central differences of the f64 forward.
    #[test]
    fn conv_backward_matches_finite_differences(case in case_strategy(), seed in any::<u64>()) {
        let p = case.problem(true).expect("case_strategy generates valid cases only");
        let mut rng = Rng::new(seed);
        let x = random(&mut rng, case.n * case.c * case.h * case.w);
        let w = random(&mut rng, case.k * (case.c / case.opts.groups) * case.r * case.s);
        let b = random(&mut rng, case.k);
        let dy = random(&mut rng, p.y_shape().iter().product());
        // L = sum(y_pre * dy); linear in each argument, so the central difference is
        // exact up to rounding.
        let loss = |x: &[f64], w: &[f64], b: &[f64]| -> f64 {
            reference::try_conv2d(&p, x, w, Some(b)).unwrap().y_pre.iter().zip(&dy).map(|(a, g)| a * g).sum()
        };
        let g = reference::try_conv2d_backward(&p, &x, &w, &dy).unwrap();
        let eps = 1e-3;
        // Up to 16 random elements of each argument (the forward is linear in each, so
        // any element's gradient is as informative as any other's).
        let picks = |len: usize, rng: &mut Rng| -> Vec<usize> {
            if len <= 16 { (0..len).collect() } else { (0..16).map(|_| rng.below(len)).collect() }
        };
        let (px, pw, pb) = (picks(x.len(), &mut rng), picks(w.len(), &mut rng), picks(b.len(), &mut rng));
        let pick = |v: &[f64], at: &[usize]| -> Vec<f64> { at.iter().map(|&i| v[i]).collect() };
        let fd = |v: &[f64], which: usize, at: &[usize]| -> Vec<f64> {
            at.iter()
                .map(|&i| {
                    let mut hi = v.to_vec();
                    let mut lo = v.to_vec();
                    hi[i] += eps;
                    lo[i] -= eps;
                    let f = |t: &[f64]| match which {
                        0 => loss(t, &w, &b),
                        1 => loss(&x, t, &b),
                        _ => loss(&x, &w, t),
                    };
                    (f(&hi) - f(&lo)) / (2.0 * eps)
                })
                .collect()
        };
        assert_close("dx", &pick(&g.dx, &px), &fd(&x, 0, &px), 1e-8);
        assert_close("dweight", &pick(&g.dweight, &pw), &fd(&w, 1, &pw), 1e-8);
        assert_close("dbias", &pick(&g.dbias, &pb), &fd(&b, 2, &pb), 1e-8);
    }

    /// NCHW and NHWC (channels_last) strides, and a transposed weight, give identical
    /// results through the public API, in every dtype.
    #[test]
    fn nchw_and_nhwc_agree(case in case_strategy(), seed in any::<u64>(), dt in 0usize..3) {
        let dtype = [DType::F32, DType::F16, DType::BF16][dt];
        case.problem(true).expect("case_strategy generates valid cases only");
        let mut rng = Rng::new(seed);
        let x = random(&mut rng, case.n * case.c * case.h * case.w);
        let w = random(&mut rng, case.k * (case.c / case.opts.groups) * case.r * case.s);
        let b = random(&mut rng, case.k);
        let xs = [case.n, case.c, case.h, case.w];
        let ws = [case.k, case.c / case.opts.groups, case.r, case.s];
        let (xn, xh) = (nchw(dtype, &x, xs), nhwc(dtype, &x, xs));
        let (wn, wh) = (nchw(dtype, &w, ws), nhwc(dtype, &w, ws));
        let bt = nchw(dtype, &b, [case.k, 1, 1, 1]);
        let bt = HostTensor::from_data(bt.data().clone(), Layout::contiguous(&[case.k])).unwrap();
        let a = conv::forward(&conv::Inputs::new(&xn, &wn).bias(Some(&bt)).keep_pre(true), &case.opts).unwrap();
        let c = conv::forward(&conv::Inputs::new(&xh, &wh).bias(Some(&bt)).keep_pre(true), &case.opts).unwrap();
        prop_assert_eq!(&a.y, &c.y);
        prop_assert_eq!(&a.y_pre, &c.y_pre);
        prop_assert_eq!(a.y.dtype(), dtype);
        let dy = HostTensor::from_fn(dtype, a.y.shape(), |i| ((i * 7 % 11) as f32 - 5.0) / 4.0).unwrap();
        let ga = conv::backward(&conv::BackwardInputs::new(&xn, &wn, &dy), &case.opts).unwrap();
        let gc = conv::backward(&conv::BackwardInputs::new(&xh, &wh, &dy), &case.opts).unwrap();
        prop_assert_eq!(&ga.dx, &gc.dx);
        prop_assert_eq!(&ga.dweight, &gc.dweight);
        prop_assert_eq!(&ga.dbias, &gc.dbias);
        prop_assert_eq!(ga.dx.as_ref().unwrap().shape(), &xs[..]);
        prop_assert_eq!(ga.dweight.as_ref().unwrap().shape(), &ws[..]);
        prop_assert_eq!(ga.dbias.as_ref().unwrap().shape(), &[case.k][..]);
        // Same for pooling.
        let opts = Pool2dOptions { padding: [0, 0], ..Pool2dOptions::new([2.min(case.h), 2.min(case.w)]) };
        let ma = pool::forward(&pool::Inputs::max(&xn), &opts).unwrap();
        let mc = pool::forward(&pool::Inputs::max(&xh), &opts).unwrap();
        prop_assert_eq!(&ma.y, &mc.y);
        prop_assert_eq!(ma.max_indices().unwrap().to_host().unwrap(), mc.max_indices().unwrap().to_host().unwrap());
        prop_assert_eq!(pool::forward(&pool::Inputs::avg(&xn), &opts).map(|o| o.y).unwrap(), pool::forward(&pool::Inputs::avg(&xh), &opts).map(|o| o.y).unwrap());
    }

    /// Max pooling: each output is the value at its index, the index lies in the window
    /// (never in padding), nothing in the window is larger, and the first maximum wins.
    #[test]
    fn max_pool_properties(
        seed in any::<u64>(), n in 1usize..3, c in 1usize..3, h in 1usize..9, w in 1usize..9,
        kh in 1usize..4, kw in 1usize..4, sh in 1usize..4, sw in 1usize..4,
        dh in 1usize..3, dw in 1usize..3, ceil in any::<bool>(), pad in any::<bool>(),
        ties in any::<bool>(),
    ) {
        let (opts, h, w) = pool_case(h, w, [kh, kw], [sh, sw], [dh, dw], ceil, pad);
        let xl = Layout::contiguous(&[n, c, h, w]);
        // A dilated window wholly in padding (undefined in torch) is skipped and redrawn;
        // `pool_rejections_are_rare` asserts that is about 2% of the draws.
        let p = pool::validate_pool(PoolKind::Max, (DType::F32, &xl), &opts);
        prop_assume!(p.is_ok(), "rejected: {:?}", p.err());
        let p = p.unwrap();
        let mut rng = Rng::new(seed);
        // With `ties`, values from a set of 3 so windows often hold repeated maxima.
        let x: Vec<f64> = (0..n * c * h * w)
            .map(|_| if ties { rng.below(3) as f64 - 1.0 } else { rng.normal() as f64 })
            .collect();
        let (y, idx) = reference::try_max_pool2d(&p, &x).unwrap();
        for plane in 0..n * c {
            for oh in 0..p.p {
                for ow in 0..p.q {
                    let o = (plane * p.p + oh) * p.q + ow;
                    // The window's input positions, in row-major scan order.
                    let mut window = vec![];
                    for i in 0..kh {
                        for j in 0..kw {
                            let r = (oh * sh + i * dh) as i64 - opts.padding[0] as i64;
                            let s = (ow * sw + j * dw) as i64 - opts.padding[1] as i64;
                            if r >= 0 && s >= 0 && (r as usize) < h && (s as usize) < w {
                                window.push(r as usize * w + s as usize);
                            }
                        }
                    }
                    prop_assert!(!window.is_empty(), "window {oh},{ow} lies in padding");
                    let xv = |i: usize| x[plane * h * w + i];
                    let max = window.iter().map(|&i| xv(i)).fold(f64::NEG_INFINITY, f64::max);
                    let first = *window.iter().find(|&&i| xv(i) == max).unwrap();
                    prop_assert_eq!(y[o], max);
                    prop_assert_eq!(idx[o] as usize, first);
                }
            }
        }
        // Adjoint: <y, dy> = <x, dx>.
        let dy = random(&mut rng, y.len());
        let dx = reference::try_max_pool2d_backward(&p, &dy, &idx).unwrap();
        let lhs: f64 = y.iter().zip(&dy).map(|(a, b)| a * b).sum();
        let rhs: f64 = x.iter().zip(&dx).map(|(a, b)| a * b).sum();
        prop_assert!((lhs - rhs).abs() <= 1e-9 * (1.0 + lhs.abs()));
    }

    /// Average pooling against a direct definition, and its backward as the adjoint.
    #[test]
    fn avg_pool_properties(
        seed in any::<u64>(), h in 1usize..9, w in 1usize..9, kh in 1usize..4, kw in 1usize..4,
        sh in 1usize..4, sw in 1usize..4, ceil in any::<bool>(), pad in any::<bool>(),
        include in any::<bool>(), div in proptest::option::of(1usize..7),
    ) {
        let (opts, h, w) = pool_case(h, w, [kh, kw], [sh, sw], [1, 1], ceil, pad);
        let opts = Pool2dOptions { count_include_pad: include, divisor_override: div, ..opts };
        let (n, c) = (2, 2);
        let xl = Layout::contiguous(&[n, c, h, w]);
        // Every undilated case is valid (`pool_rejections_are_rare` checks the whole grid).
        let p = pool::validate_pool(PoolKind::Avg, (DType::F32, &xl), &opts)
            .unwrap_or_else(|e| panic!("{opts:?} {h}x{w}: {e}"));
        let mut rng = Rng::new(seed);
        let x = random(&mut rng, n * c * h * w);
        let y = reference::try_avg_pool2d(&p, &x).unwrap();
        let [ph, pw] = opts.padding;
        for plane in 0..n * c {
            for oh in 0..p.p {
                for ow in 0..p.q {
                    // Torch's rule: the window clipped to the padded input for the
                    // divisor, to the input for the sum.
                    let (r0, s0) = ((oh * sh) as i64 - ph as i64, (ow * sw) as i64 - pw as i64);
                    let r1 = (r0 + kh as i64).min((h + ph) as i64);
                    let s1 = (s0 + kw as i64).min((w + pw) as i64);
                    let mut sum = 0.0;
                    let mut real = 0;
                    for r in r0.max(0)..r1.min(h as i64) {
                        for s in s0.max(0)..s1.min(w as i64) {
                            sum += x[plane * h * w + r as usize * w + s as usize];
                            real += 1;
                        }
                    }
                    let divisor = match div {
                        Some(d) => d as f64,
                        None if include => ((r1 - r0) * (s1 - s0)) as f64,
                        None => real as f64,
                    };
                    let got = y[(plane * p.p + oh) * p.q + ow];
                    prop_assert!((got - sum / divisor).abs() < 1e-12, "{got} vs {}", sum / divisor);
                }
            }
        }
        let dy = random(&mut rng, y.len());
        let dx = reference::try_avg_pool2d_backward(&p, &dy).unwrap();
        let lhs: f64 = y.iter().zip(&dy).map(|(a, b)| a * b).sum();
        let rhs: f64 = x.iter().zip(&dx).map(|(a, b)| a * b).sum();
        prop_assert!((lhs - rhs).abs() <= 1e-9 * (1.0 + lhs.abs()));
    }
}

/// Every (size, kernel, padding, dilation) `case_strategy` can draw, after `valid_len`,
/// is a valid convolution: the proptests check every case they generate.
#[test]
fn valid_cases_only() {
    let mut n = 0;
    for (len, kernel, pad, dil) in conv_dim_grid() {
        let case = Case {
            n: 1,
            c: 1,
            h: valid_len(len, kernel, pad, dil),
            w: valid_len(len, kernel, pad, dil),
            k: 1,
            r: kernel,
            s: kernel,
            opts: Conv2dOptions {
                padding: [pad; 2],
                dilation: [dil; 2],
                stride: [3, 3],
                ..Conv2dOptions::default()
            },
        };
        let p = case
            .problem(true)
            .unwrap_or_else(|e| panic!("{case:?}: {e}"));
        assert!(p.p >= 1 && p.q >= 1, "{case:?}");
        n += 1;
    }
    assert_eq!(n, 7 * 3 * 3 * 2);
}

/// The (size, kernel, padding, dilation) ranges of `case_strategy`.
fn conv_dim_grid() -> impl Iterator<Item = (usize, usize, usize, usize)> {
    (1usize..8).flat_map(|len| {
        (1usize..4).flat_map(move |k| {
            (0usize..3).flat_map(move |pad| (1usize..3).map(move |dil| (len, k, pad, dil)))
        })
    })
}

/// A pooling case of the proptests: the options (padding half the kernel or none) and the
/// input height and width, raised like a convolution's (`valid_len`) so the padded input
/// holds the dilated window.
fn pool_case(
    h: usize,
    w: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
    ceil_mode: bool,
    pad: bool,
) -> (Pool2dOptions, usize, usize) {
    let padding = if pad {
        [kernel[0] / 2, kernel[1] / 2]
    } else {
        [0, 0]
    };
    let opts = Pool2dOptions {
        stride: Some(stride),
        padding,
        dilation,
        ceil_mode,
        ..Pool2dOptions::new(kernel)
    };
    (
        opts,
        valid_len(h, kernel[0], padding[0], dilation[0]),
        valid_len(w, kernel[1], padding[1], dilation[1]),
    )
}

/// Over the pooling proptests' whole parameter grids, average pooling is always valid and
/// max pooling rejects only a dilated window wholly in padding (torch leaves it undefined),
/// in 1710 of 82944 cases (2.1%): `max_pool_properties` redraws those (`prop_assume!`), so
/// nearly every draw is checked and none passes unchecked.
#[test]
fn pool_rejections_are_rare() {
    for kind in [PoolKind::Max, PoolKind::Avg] {
        let (mut total, mut rejected) = (0usize, 0usize);
        let dilations: &[[usize; 2]] = match kind {
            PoolKind::Max => &[[1, 1], [1, 2], [2, 1], [2, 2]],
            PoolKind::Avg => &[[1, 1]],
        };
        let pairs = |hi: usize| (1..hi).flat_map(move |a| (1..hi).map(move |b| [a, b]));
        for [h, w] in pairs(9) {
            for kernel in pairs(4) {
                for stride in pairs(4) {
                    for &dilation in dilations {
                        for (ceil, pad) in
                            [(false, false), (false, true), (true, false), (true, true)]
                        {
                            let (opts, h, w) = pool_case(h, w, kernel, stride, dilation, ceil, pad);
                            let xl = Layout::contiguous(&[2, 2, h, w]);
                            total += 1;
                            match pool::validate_pool(kind, (DType::F32, &xl), &opts) {
                                Ok(_) => {}
                                Err(e) => {
                                    // Only the wholly-in-padding window is refused.
                                    assert!(
                                        kind == PoolKind::Max
                                            && dilation != [1, 1]
                                            && e.to_string().contains("wholly in the padding"),
                                        "{kind:?} {opts:?} {h}x{w}: {e}"
                                    );
                                    rejected += 1;
                                }
                            }
                        }
                    }
                }
            }
        }
        let want = match kind {
            PoolKind::Max => (1710, 82944),
            PoolKind::Avg => (0, 20736),
        };
        assert_eq!((rejected, total), want, "{kind:?}");
    }
}

fn nchw(dtype: DType, v: &[f64], shape: [usize; 4]) -> HostTensor {
    HostTensor::from_fn(dtype, &shape, |i| v[i] as f32).unwrap()
}

/// The same logical tensor stored channels-last: memory order (N, H, W, C).
fn nhwc(dtype: DType, v: &[f64], [n, c, h, w]: [usize; 4]) -> HostTensor {
    let mem = HostTensor::from_fn(dtype, &[n, h, w, c], |i| {
        let (ch, col, row, b) = (i % c, (i / c) % w, (i / (c * w)) % h, i / (c * w * h));
        v[((b * c + ch) * h + row) * w + col] as f32
    })
    .unwrap();
    let layout = Layout {
        shape: vec![n, c, h, w],
        strides: vec![h * w * c, 1, w * c, c],
    };
    HostTensor::from_data(mem.data().clone(), layout).unwrap()
}

#[test]
fn activation_derivatives_match_finite_differences() {
    for act in [
        Activation::None,
        Activation::Relu,
        Activation::Gelu,
        Activation::Silu,
    ] {
        for i in -40..=40 {
            let x = i as f64 * 0.137 + 0.01; // avoids ReLU's kink at 0
            let eps = 1e-6;
            let fd = (reference::activate(act, x + eps) - reference::activate(act, x - eps))
                / (2.0 * eps);
            let d = reference::activation_derivative(act, x);
            assert!(
                (fd - d).abs() < 1e-7,
                "{act:?}'({x}) = {d}, finite difference {fd}"
            );
        }
    }
}

#[test]
fn gelu_is_x_times_normal_cdf() {
    // Phi(x) by Simpson's rule on the normal density, independent of erf.
    let phi = |x: f64| {
        let (a, steps) = (-12.0, 20_000);
        let hstep = (x - a) / steps as f64;
        let f = |t: f64| (-t * t / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let mut s = f(a) + f(x);
        for i in 1..steps {
            s += f(a + i as f64 * hstep) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        s * hstep / 3.0
    };
    for i in -30..=30 {
        let x = i as f64 * 0.2;
        let got = reference::activate(Activation::Gelu, x);
        assert!(
            (got - x * phi(x)).abs() < 1e-12,
            "gelu({x}) = {got}, want {}",
            x * phi(x)
        );
        let got32 = reference::activate(Activation::Gelu, x as f32);
        assert!((got32 as f64 - x * phi(x)).abs() < 1e-6);
    }
}

#[test]
fn activation_backward_is_dy_times_derivative() {
    let pre = [-1.5f64, 0.0, 0.3, 2.0];
    let dy = [1.0f64, 2.0, -1.0, 0.5];
    let g = reference::activation_backward(Activation::Relu, &pre, &dy);
    assert_eq!(g, vec![0.0, 0.0, -1.0, 0.5]);
}

#[test]
fn max_pool_padding_never_wins_and_neg_inf_input() {
    // All inputs -inf: the index is the window's first real element, not padding.
    let x = HostTensor::from_vec(vec![f32::NEG_INFINITY; 9], &[1, 1, 3, 3]).unwrap();
    let opts = Pool2dOptions {
        stride: Some([1, 1]),
        padding: [1, 1],
        ..Pool2dOptions::new([3, 3])
    };
    let o = pool::forward(&pool::Inputs::max(&x), &opts).unwrap();
    assert_eq!(o.y.shape(), &[1, 1, 3, 3]);
    assert_eq!(
        o.max_indices().unwrap().to_host().unwrap(),
        vec![0, 0, 1, 0, 0, 1, 3, 3, 4]
    );
    // Negative inputs with padding: the max is a real element, never the padding's 0.
    let x = HostTensor::from_vec((1..=9).map(|v| -(v as f32)).collect(), &[1, 1, 3, 3]).unwrap();
    let o = pool::forward(&pool::Inputs::max(&x), &opts).unwrap();
    assert_eq!(
        o.y.to_f32_vec(),
        vec![-1., -1., -2., -1., -1., -2., -4., -4., -5.]
    );
}

#[test]
fn ceil_mode_output_sizes_match_torch() {
    // torch.nn.functional.max_pool2d(torch.zeros(1,1,H,W), k, s, p, ceil_mode=True).shape
    for (len, k, s, pad, ceil, want) in [
        (5, 2, 2, 0, false, 2),
        (5, 2, 2, 0, true, 3),
        (6, 3, 2, 1, true, 4),
        (6, 3, 2, 1, false, 3),
        (4, 2, 3, 1, true, 2),
        (7, 3, 3, 1, true, 3),
        (1, 1, 2, 0, true, 1),
    ] {
        assert_eq!(
            conv::output_size(len, k, s, pad, 1, ceil),
            Some(want),
            "len {len} k {k} s {s} pad {pad} ceil {ceil}"
        );
    }
}

#[test]
fn public_api_dispatches_and_shapes() {
    let x = HostTensor::from_fn(DType::F32, &[2, 4, 9, 7], |i| (i as f32 * 0.37).sin()).unwrap();
    let w = HostTensor::from_fn(DType::F32, &[6, 2, 3, 3], |i| (i as f32 * 0.11).cos()).unwrap();
    let b = HostTensor::from_vec(vec![0.5f32; 6], &[6]).unwrap();
    let opts = Conv2dOptions {
        stride: [2, 1],
        padding: [1, 2],
        dilation: [1, 2],
        groups: 2,
        activation: Activation::Silu,
        algo: None,
    };
    let y = conv::forward(
        &conv::Inputs::new(&Tensor::Host(x.clone()), &Tensor::Host(w.clone()))
            .bias(Some(&Tensor::Host(b.clone()))),
        &opts,
    )
    .map(|o| o.y)
    .unwrap()
    .to_host()
    .unwrap();
    assert_eq!(y.shape(), &[2, 6, 5, 7]);
    let direct = conv::forward(&conv::Inputs::new(&x, &w).bias(Some(&b)), &opts).unwrap();
    assert_eq!(y, direct.y);
    assert!(direct.y_pre.is_none());
    let dy =
        Tensor::Host(HostTensor::from_fn(DType::F32, &[2, 6, 5, 7], |i| i as f32 * 0.01).unwrap());
    let g = conv::backward(
        &conv::BackwardInputs::new(&Tensor::Host(x.clone()), &Tensor::Host(w), &dy).grads(
            ConvGrads {
                input: false,
                weight: true,
                bias: true,
            },
        ),
        &opts,
    )
    .unwrap();
    assert!(g.dx.is_none());
    assert_eq!(g.dweight.unwrap().to_host().unwrap().shape(), &[6, 2, 3, 3]);
    let pool = Pool2dOptions::new([2, 2]);
    let xt = Tensor::Host(x);
    let m = pool::forward(&pool::Inputs::max(&xt), &pool).unwrap();
    assert_eq!(m.y.to_host().unwrap().shape(), &[2, 4, 4, 3]);
    #[allow(irrefutable_let_patterns)]
    let Indices::Host(idx) = m.max_indices().unwrap() else {
        panic!("host indices")
    };
    assert_eq!(idx.len(), 2 * 4 * 4 * 3);
    let dx = pool::backward(
        &pool::BackwardInputs::max(&xt, &m.y, m.max_indices().unwrap()),
        &pool,
    )
    .unwrap();
    assert_eq!(dx.to_host().unwrap().shape(), &[2, 4, 9, 7]);
    let a = pool::forward(&pool::Inputs::avg(&xt), &pool)
        .map(|o| o.y)
        .unwrap();
    let dxa = pool::backward(&pool::BackwardInputs::avg(&xt, &a), &pool).unwrap();
    assert_eq!(dxa.to_host().unwrap().shape(), &[2, 4, 9, 7]);
    // f16 in, f16 out.
    let h = HostTensor::from_data(
        HostData::F16(vec![half::f16::from_f32(1.0); 16]),
        Layout::contiguous(&[1, 1, 4, 4]),
    )
    .unwrap();
    assert_eq!(
        pool::forward(&pool::Inputs::avg(&h), &pool)
            .map(|o| o.y)
            .unwrap()
            .dtype(),
        DType::F16
    );
}
