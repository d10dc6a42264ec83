//! Fuzz suite (issue 13) of conv2d and max / average pooling, forward and backward, on
//! host tensors: arbitrary shapes, strides, dtypes, padding, stride, dilation, groups,
//! kernels, ceil_mode and divisors; Ok-and-equal to an f64 definition written here, or a
//! typed Err, never a panic or a hang (harness: tests/fuzz_common).

mod fuzz_common;

use fuzz_common::*;
use std::sync::atomic::Ordering;

use flashkernels::conv::{self, Activation, Conv2dOptions, ConvGrads};
use flashkernels::pool::{self, Pool2dOptions, PoolKind};
use flashkernels::HostTensor;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

// ---------------------------------------------------------------------------------------
// Convolution.

#[derive(Debug, Clone)]
struct ConvCase {
    x: TensorSpec,
    w: TensorSpec,
    bias: Option<TensorSpec>,
    opts: Conv2dOptions,
    dy_seed: u64,
}

fn pair(max: usize) -> impl Strategy<Value = [usize; 2]> {
    (option_size(max), option_size(max)).prop_map(|(a, b)| [a, b])
}

fn pad_pair() -> impl Strategy<Value = [usize; 2]> {
    let p = || prop_oneof![16 => 0usize..3, 1 => huge()];
    (p(), p()).prop_map(|(a, b)| [a, b])
}

fn conv_case() -> impl Strategy<Value = ConvCase> {
    (
        (dim(2), 1usize..=3, 1usize..=2, dim(6), dim(6), prop_oneof![12 => 1usize..=3, 1 => Just(0usize), 1 => huge()]),
        (dim(3), dim(3)),
        prop::option::weighted(0.1, (0usize..2, 0usize..4, dim(6))),
        (pair(3), pad_pair(), pair(3)),
        (prop::sample::select(vec![Activation::None, Activation::Relu, Activation::Gelu, Activation::Silu]), any::<bool>(), any::<u64>()),
    )
        .prop_flat_map(|((n, cg, kg, h, w, groups), (r, s), mutate, (stride, padding, dilation), (act, with_bias, dy_seed))| {
            let g = groups.clamp(1, 3);
            let mut shapes = [vec![n, cg * g, h, w], vec![kg * g, cg, r, s]];
            if let Some((t, i, x)) = mutate {
                shapes[t][i] = x;
            }
            let kout = shapes[1][0];
            let [sx, sw] = shapes;
            (
                spec(Just(sx)),
                spec(Just(sw)),
                prop::option::weighted(if with_bias { 0.6 } else { 0.01 }, spec(prop_oneof![6 => Just(vec![kout]), 1 => prop::collection::vec(dim(5), 0..=2)])),
                Just(Conv2dOptions { stride, padding, dilation, groups, activation: act, algo: None }),
                Just(dy_seed),
            )
        })
        .prop_map(|(x, mut w, mut bias, opts, dy_seed)| {
            w.dtype = x.dtype;
            if let Some(b) = &mut bias {
                b.dtype = x.dtype;
            }
            ConvCase { x, w, bias, opts, dy_seed }
        })
}

/// y_pre (= conv + bias), dx, dw of a convolution in f64, from the definition (i128
/// positions).
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn naive_conv(
    x: &[f64],
    w: &[f64],
    bias: Option<&[f64]>,
    dy: &[f64],
    [n, c, h, wd]: [usize; 4],
    [k, cg, r, s]: [usize; 4],
    [p, q]: [usize; 2],
    o: &Conv2dOptions,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let kg = k / o.groups;
    let mut y = vec![0.0; n * k * p * q];
    let mut dx = vec![0.0; x.len()];
    let mut dw = vec![0.0; w.len()];
    for b in 0..n {
        for ko in 0..k {
            let g = ko / kg;
            for oh in 0..p {
                for ow in 0..q {
                    let yi = ((b * k + ko) * p + oh) * q + ow;
                    let mut acc = bias.map_or(0.0, |bb| bb[ko]);
                    for ci in 0..cg {
                        for fr in 0..r {
                            let ih = (oh * o.stride[0]) as i128 + (fr * o.dilation[0]) as i128
                                - o.padding[0] as i128;
                            if ih < 0 || ih >= h as i128 {
                                continue;
                            }
                            for fs in 0..s {
                                let iw = (ow * o.stride[1]) as i128 + (fs * o.dilation[1]) as i128
                                    - o.padding[1] as i128;
                                if iw < 0 || iw >= wd as i128 {
                                    continue;
                                }
                                let xi =
                                    ((b * c + g * cg + ci) * h + ih as usize) * wd + iw as usize;
                                let wi = ((ko * cg + ci) * r + fr) * s + fs;
                                acc += x[xi] * w[wi];
                                dx[xi] += dy[yi] * w[wi];
                                dw[wi] += dy[yi] * x[xi];
                            }
                        }
                    }
                    y[yi] = acc;
                }
            }
        }
    }
    (y, dx, dw)
}

fn conv_case_run(c: &ConvCase) -> Result<(), TestCaseError> {
    let (Some(x), Some(w)) = (build(&c.x)?, build(&c.w)?) else {
        return Ok(());
    };
    let bias = match &c.bias {
        Some(b) => match build(b)? {
            Some(b) => Some(b),
            None => return Ok(()),
        },
        None => None,
    };
    let what = format!(
        "conv2d x {:?} w {:?} bias {:?} {:?}",
        x.layout(),
        w.layout(),
        bias.as_ref().map(|b| b.layout()),
        c.opts
    );
    if x.shape().len() == 4 && w.shape().len() == 4 {
        let o = &c.opts;
        let (xs, ws) = (x.shape(), w.shape());
        let p = sweep_len(
            xs[2],
            ws[2],
            o.stride[0],
            o.padding[0],
            o.dilation[0],
            false,
        );
        let q = sweep_len(
            xs[3],
            ws[3],
            o.stride[1],
            o.padding[1],
            o.dilation[1],
            false,
        );
        if let (Some(p), Some(q)) = (p, q) {
            let y = (xs[0] as u128)
                .saturating_mul(ws[0] as u128)
                .saturating_mul(p)
                .saturating_mul(q);
            if mid_size(y) {
                let v = call(&what, || {
                    conv::validate(x.described(), w.described(), None, o)
                })?;
                tally(|t| t.ok.fetch_add(1, Ordering::Relaxed));
                return v.map_or_else(|e| typed(&what, &e), |_| Ok(()));
            }
        }
    }
    let f = match call(&what, || {
        conv::forward(
            &conv::Inputs::new(&x, &w).bias(bias.as_ref()).keep_pre(true),
            &c.opts,
        )
    })? {
        Ok(f) => f,
        Err(e) => return typed(&what, &e),
    };
    let [n, ch, h, wd] = <[usize; 4]>::try_from(x.shape()).unwrap();
    let [k, cg, r, s] = <[usize; 4]>::try_from(w.shape()).unwrap();
    let yshape = f.y.shape().to_vec();
    prop_assert!(
        small(&yshape, 1 << 14) && small(x.shape(), 1 << 14),
        "accepted huge {}",
        what
    );
    prop_assert_eq!(&yshape[..2], &[n, k]);
    let (p, q) = (yshape[2], yshape[3]);
    let dy = HostTensor::from_vec(values(c.dy_seed, yshape.iter().product()), &yshape)
        .unwrap()
        .to_contiguous(c.x.dtype);
    let g = call(&what, || {
        conv::backward(
            &conv::BackwardInputs::new(&x, &w, &dy).grads(ConvGrads::ALL),
            &c.opts,
        )
    })?
    .map_err(|e| TestCaseError::fail(format!("{what}: backward: {e}")))?;
    // A dy of another shape is an error.
    let bad = HostTensor::from_vec(
        vec![0f32; yshape.iter().product::<usize>() + 1],
        &[yshape.iter().product::<usize>() + 1],
    )
    .unwrap();
    prop_assert!(call(&what, || conv::backward(
        &conv::BackwardInputs::new(&x, &w, &bad),
        &c.opts
    ))?
    .is_err());
    let (xv, wv, dyv) = (logical(&x), logical(&w), logical(&dy));
    let bv = bias.as_ref().map(logical);
    let (y, dx, dw) = naive_conv(
        &xv,
        &wv,
        bv.as_deref(),
        &dyv,
        [n, ch, h, wd],
        [k, cg, r, s],
        [p, q],
        &c.opts,
    );
    let tol = 4.0 * eps(c.x.dtype) + 1e-9;
    close(
        &format!("{what}: y_pre"),
        &logical(f.y_pre.as_ref().unwrap()),
        &y,
        tol,
    )?;
    let act: Vec<f64> = y
        .iter()
        .map(|&v| flashkernels::reference::activate(c.opts.activation, v))
        .collect();
    close(&format!("{what}: y"), &logical(&f.y), &act, tol)?;
    close(
        &format!("{what}: dx"),
        &logical(g.dx.as_ref().unwrap()),
        &dx,
        tol,
    )?;
    close(
        &format!("{what}: dw"),
        &logical(g.dweight.as_ref().unwrap()),
        &dw,
        tol,
    )?;
    let mut db = vec![0.0; k];
    for (i, v) in dyv.iter().enumerate() {
        db[(i / (p * q)) % k] += v;
    }
    close(
        &format!("{what}: db"),
        &logical(g.dbias.as_ref().unwrap()),
        &db,
        tol,
    )?;
    tally(|t| t.checked.fetch_add(1, Ordering::Relaxed));
    Ok(())
}

#[test]
fn fuzz_conv2d() {
    fuzz("fuzz_conv2d", CASES, conv_case(), conv_case_run);
}

// ---------------------------------------------------------------------------------------
// Pooling.

#[derive(Debug, Clone)]
struct PoolCase {
    x: TensorSpec,
    kind: PoolKind,
    opts: Pool2dOptions,
    dy_seed: u64,
    bad_indices: Option<(usize, i32)>,
}

fn pool_case() -> impl Strategy<Value = PoolCase> {
    let kernel = || prop_oneof![16 => 1usize..=4, 1 => Just(0usize), 2 => huge()];
    let pad = || prop_oneof![16 => 0usize..=2, 1 => huge()];
    (
        spec(prop::collection::vec(dim(7), 4..=4)),
        prop_oneof![Just(PoolKind::Max), Just(PoolKind::Avg)],
        (
            (kernel(), kernel()),
            prop::option::weighted(0.5, pair(3)),
            (pad(), pad()),
        ),
        (
            prop_oneof![6 => Just([1usize, 1]), 1 => pair(3)],
            any::<bool>(),
            any::<bool>(),
            prop::option::weighted(0.1, option_size(5)),
        ),
        any::<u64>(),
        prop::option::weighted(0.2, (0usize..64, any::<i32>())),
    )
        .prop_map(
            |(
                x,
                kind,
                ((k0, k1), stride, (p0, p1)),
                (dilation, ceil_mode, cip, div),
                dy_seed,
                bad,
            )| {
                // Padding within half the kernel most of the time (else it is an error).
                let fit = |p: usize, k: usize| {
                    if p > k / 2 && p < 1 << 40 {
                        p % (k / 2 + 1)
                    } else {
                        p
                    }
                };
                PoolCase {
                    x,
                    kind,
                    opts: Pool2dOptions {
                        kernel_size: [k0, k1],
                        stride,
                        padding: [fit(p0, k0), fit(p1, k1)],
                        dilation,
                        ceil_mode,
                        count_include_pad: cip || kind == PoolKind::Max,
                        divisor_override: if kind == PoolKind::Avg { div } else { None },
                    },
                    dy_seed,
                    bad_indices: bad,
                }
            },
        )
}

/// The input positions of window o (i128 arithmetic from the definition), taps < 64.
fn naive_taps(o: usize, k: usize, st: usize, pad: usize, dil: usize, len: usize) -> Vec<usize> {
    (0..k)
        .map(|t| (o * st) as i128 + t as i128 * dil as i128 - pad as i128)
        .filter(|&i| i >= 0 && i < len as i128)
        .map(|i| i as usize)
        .collect()
}

fn pool_case_run(c: &PoolCase) -> Result<(), TestCaseError> {
    let Some(x) = build(&c.x)? else {
        return Ok(());
    };
    let what = format!("{:?} pool x {:?} {:?}", c.kind, x.layout(), c.opts);
    if x.shape().len() == 4 {
        let o = &c.opts;
        let xs = x.shape();
        let st = o.stride.unwrap_or(o.kernel_size);
        let len = |i: usize| {
            sweep_len(
                xs[2 + i],
                o.kernel_size[i],
                st[i],
                o.padding[i],
                o.dilation[i],
                o.ceil_mode,
            )
        };
        if let (Some(p), Some(q)) = (len(0), len(1)) {
            let y = (xs[0] as u128)
                .saturating_mul(xs[1] as u128)
                .saturating_mul(p)
                .saturating_mul(q);
            if mid_size(y) {
                let v = call(&what, || pool::validate_pool(c.kind, x.described(), o))?;
                tally(|t| t.ok.fetch_add(1, Ordering::Relaxed));
                return v.map_or_else(|e| typed(&what, &e), |_| Ok(()));
            }
        }
    }
    let inputs = match c.kind {
        PoolKind::Max => pool::Inputs::max(&x),
        PoolKind::Avg => pool::Inputs::avg(&x),
    };
    let f = match call(&what, || pool::forward(&inputs, &c.opts))? {
        Ok(f) => f,
        Err(e) => return typed(&what, &e),
    };
    let [n, ch, h, w] = <[usize; 4]>::try_from(x.shape()).unwrap();
    let ys = f.y.shape().to_vec();
    prop_assert!(
        small(&ys, 1 << 14) && small(x.shape(), 1 << 14),
        "accepted huge {}",
        what
    );
    prop_assert_eq!(&ys[..2], &[n, ch]);
    let (p, q) = (ys[2], ys[3]);
    let dy = HostTensor::from_vec(values(c.dy_seed, ys.iter().product()), &ys)
        .unwrap()
        .to_contiguous(c.x.dtype);
    let dx = match c.kind {
        PoolKind::Max => {
            let idx = f.indices.as_ref().unwrap();
            if let Some((at, v)) = c.bad_indices {
                let mut bad = idx.to_host().unwrap();
                let at = at % bad.len();
                let bad_value = if (v as i64) < 0 || v as i64 >= (h * w) as i64 {
                    v
                } else {
                    -1
                };
                bad[at] = bad_value;
                let bad = pool::Indices::Host(bad);
                let r = call(&what, || {
                    pool::backward(&pool::BackwardInputs::max(&x, &dy, &bad), &c.opts)
                })?;
                prop_assert!(r.is_err(), "{}: index {} accepted", what, bad_value);
                let short = pool::Indices::Host(vec![0; at]);
                let r = call(&what, || {
                    pool::backward(&pool::BackwardInputs::max(&x, &dy, &short), &c.opts)
                })?;
                prop_assert!(r.is_err(), "{}: {} indices accepted", what, at);
            }
            call(&what, || {
                pool::backward(&pool::BackwardInputs::max(&x, &dy, idx), &c.opts)
            })?
        }
        PoolKind::Avg => call(&what, || {
            pool::backward(&pool::BackwardInputs::avg(&x, &dy), &c.opts)
        })?,
    }
    .map_err(|e| TestCaseError::fail(format!("{what}: backward: {e}")))?;
    prop_assert_eq!(dx.shape(), x.shape());
    let o = &c.opts;
    if o.kernel_size[0] > 64 || o.kernel_size[1] > 64 {
        tally(|t| t.ok.fetch_add(1, Ordering::Relaxed));
        return Ok(());
    }
    let stride = o.stride.unwrap_or(o.kernel_size);
    let (xv, dyv) = (logical(&x), logical(&dy));
    let mut y = vec![0.0; n * ch * p * q];
    let mut want_dx = vec![0.0; n * ch * h * w];
    let mut want_idx = vec![0i32; n * ch * p * q];
    for plane in 0..n * ch {
        for oh in 0..p {
            let rows = naive_taps(
                oh,
                o.kernel_size[0],
                stride[0],
                o.padding[0],
                o.dilation[0],
                h,
            );
            for ow in 0..q {
                let cols = naive_taps(
                    ow,
                    o.kernel_size[1],
                    stride[1],
                    o.padding[1],
                    o.dilation[1],
                    w,
                );
                let yi = (plane * p + oh) * q + ow;
                match c.kind {
                    PoolKind::Max => {
                        let (mut best, mut bi) = (f64::NEG_INFINITY, rows[0] * w + cols[0]);
                        for &r in &rows {
                            for &cc in &cols {
                                let v = xv[plane * h * w + r * w + cc];
                                if v > best {
                                    (best, bi) = (v, r * w + cc);
                                }
                            }
                        }
                        y[yi] = best;
                        want_idx[yi] = bi as i32;
                        want_dx[plane * h * w + bi] += dyv[yi];
                    }
                    PoolKind::Avg => {
                        // torch: the window clipped to [-pad, len + pad), then to the input.
                        let size = |oo: usize, k: usize, st: usize, pad: usize, len: usize| {
                            let start = (oo * st) as i128 - pad as i128;
                            let end = (start + k as i128).min((len + pad) as i128);
                            (end - start) as f64
                        };
                        let div = match o.divisor_override {
                            Some(dv) => dv as f64,
                            None if o.count_include_pad => {
                                size(oh, o.kernel_size[0], stride[0], o.padding[0], h)
                                    * size(ow, o.kernel_size[1], stride[1], o.padding[1], w)
                            }
                            None => (rows.len() * cols.len()) as f64,
                        };
                        let mut sum = 0.0;
                        for &r in &rows {
                            for &cc in &cols {
                                sum += xv[plane * h * w + r * w + cc];
                                want_dx[plane * h * w + r * w + cc] += dyv[yi] / div;
                            }
                        }
                        y[yi] = sum / div;
                    }
                }
            }
        }
    }
    let tol = 4.0 * eps(c.x.dtype) + 1e-9;
    close(&format!("{what}: y"), &logical(&f.y), &y, tol)?;
    close(&format!("{what}: dx"), &logical(&dx), &want_dx, tol)?;
    if c.kind == PoolKind::Max {
        prop_assert_eq!(
            f.indices.as_ref().unwrap().to_host().unwrap(),
            want_idx,
            "{}: indices",
            what
        );
    }
    tally(|t| t.checked.fetch_add(1, Ordering::Relaxed));
    Ok(())
}

#[test]
fn fuzz_pool2d() {
    fuzz("fuzz_pool2d", CASES * 2, pool_case(), pool_case_run);
}
