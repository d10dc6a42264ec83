//! The CUDA path of the feed-forward block: the kernels' limits (checked by
//! [`check_kernel_limits`] before anything is allocated), the C params of
//! kernels/include/fk_ffn.h from a validated problem, and the launches on x's stream.

use std::ffi::c_void;

use super::{
    check_kernel_limits, validate, validate_backward, FfnActivation, FfnGradients, FfnLayouts,
    FfnOptions, FfnOutput,
};
use crate::device::{DeviceTensor, DeviceView};
use crate::error::{Error, Result};
use crate::ffi;
use crate::ops::glue::{check_same_device, dtype_arg, order_after, workspace};

/// The inputs' names, in [`super::Inputs`]' order.
const NAMES: [&str; 7] = ["x", "w1", "w2", "w3", "b1", "b2", "b3"];

/// The C ABI's activation code.
fn activation_arg(a: FfnActivation) -> i32 {
    (match a {
        FfnActivation::Relu => ffi::fk_ffn_activation_FK_FFN_RELU,
        FfnActivation::GeluTanh => ffi::fk_ffn_activation_FK_FFN_GELU_TANH,
        FfnActivation::GeluErf => ffi::fk_ffn_activation_FK_FFN_GELU_ERF,
        FfnActivation::Silu => ffi::fk_ffn_activation_FK_FFN_SILU,
    }) as i32
}

/// A size the kernel limits have bounded, as the ABI's int32_t.
fn i32_of(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::TooLarge {
        what: what.into(),
        value: v as u64,
        limit: i32::MAX as u64,
    })
}

fn layouts<'a>(t: &[Option<&'a DeviceTensor>]) -> FfnLayouts<'a> {
    let d = |i: usize| t[i].map(DeviceTensor::described);
    FfnLayouts {
        x: d(0).expect("x is always given"),
        w1: d(1).expect("w1 is always given"),
        w2: d(2).expect("w2 is always given"),
        w3: d(3),
        b1: d(4),
        b2: d(5),
        b3: d(6),
    }
}

/// The given inputs but x, named.
fn named_others<'a>(t: &[Option<&'a DeviceTensor>]) -> Vec<(&'static str, &'a DeviceTensor)> {
    NAMES
        .iter()
        .zip(t)
        .skip(1)
        .filter_map(|(n, t)| t.map(|t| (*n, t)))
        .collect()
}

fn named_views(v: &[Option<DeviceView>]) -> Vec<(&'static str, &DeviceView)> {
    NAMES
        .iter()
        .zip(v)
        .filter_map(|(n, v)| v.as_ref().map(|v| (*n, v)))
        .collect()
}

/// Every view on `device`, aligned to its elements.
fn check_views(device: usize, all: &[(&str, &DeviceView)]) -> Result<()> {
    check_same_device("x", device, all)?;
    for (name, v) in all {
        if v.ptr % v.dtype.size() as u64 != 0 {
            return Err(Error::InvalidArgument(format!(
                "{name}: pointer {:#x} is not aligned to its {}-byte elements",
                v.ptr,
                v.dtype.size()
            )));
        }
    }
    Ok(())
}

/// The forward on device tensors, in [`super::Inputs`]' order (x, w1, w2, w3, b1, b2,
/// b3): validates, checks the kernel limits, orders x's stream after the other inputs',
/// allocates h and y (contiguous) and launches.
pub(crate) fn forward(
    t: &[Option<&DeviceTensor>],
    opts: &FfnOptions,
    keep_hidden: bool,
) -> Result<FfnOutput<DeviceTensor>> {
    let p = validate(&layouts(t), opts)?;
    check_kernel_limits(&p)?;
    let x = t[0].expect("x is always given");
    let stream = x.stream();
    order_after(stream, "x", &named_others(t))?;
    let h = DeviceTensor::poisoned(stream, p.dtype, &p.hidden_shape())?;
    let y = DeviceTensor::poisoned(stream, p.dtype, &p.x_shape())?;
    let views: Vec<Option<DeviceView>> = t.iter().map(|t| t.map(DeviceTensor::view)).collect();
    let (hv, yv) = (h.view(), y.view());
    let mut all = named_views(&views);
    all.push(("h", &hv));
    all.push(("y", &yv));
    let device = stream.ordinal();
    check_views(device, &all)?;
    let ptr = |i: usize| {
        views[i]
            .as_ref()
            .map_or(std::ptr::null(), |v| v.ptr as *const c_void)
    };
    let ld = |i: usize| views[i].as_ref().map_or(0, |v| v.layout.strides[0] as i64);
    let params = ffi::fk_ffn_params {
        x: ptr(0),
        w1: ptr(1),
        w2: ptr(2),
        w3: ptr(3),
        b1: ptr(4),
        b2: ptr(5),
        b3: ptr(6),
        h: hv.ptr as *mut c_void,
        y: yv.ptr as *mut c_void,
        x_stride: ld(0),
        w1_stride: ld(1),
        w2_stride: ld(2),
        w3_stride: ld(3),
        h_stride: hv.layout.strides[0] as i64,
        y_stride: yv.layout.strides[0] as i64,
        tokens: i32_of("tokens", p.tokens)?,
        d_model: i32_of("d_model", p.d_model)?,
        d_hidden: i32_of("d_hidden", p.d_hidden)?,
        activation: activation_arg(p.activation),
        residual: i32::from(p.residual),
        dtype: dtype_arg(p.dtype),
        device: i32_of("device", device)?,
    };
    // SAFETY: views of live DeviceTensors whose layouts fit their allocations (checked
    // when they were made); h and y are fresh, so nothing overlaps them.
    let code = unsafe { ffi::fk_ffn_fwd(&params, stream.raw()) };
    ffi::check(code)?;
    Ok(FfnOutput {
        y,
        hidden: keep_hidden.then_some(h),
    })
}

/// The backward on device tensors: `t` in [`super::Inputs`]' order, then dy. Validates,
/// checks the kernel limits, orders x's stream after the others', allocates the
/// gradients (contiguous; db_i where b_i is given, dW3 when gated) and the workspace,
/// and launches.
pub(crate) fn backward(
    t: &[Option<&DeviceTensor>],
    dy: &DeviceTensor,
    opts: &FfnOptions,
) -> Result<FfnGradients<DeviceTensor>> {
    let p = validate(&layouts(t), opts)?;
    validate_backward(&p, dy.described())?;
    check_kernel_limits(&p)?;
    let x = t[0].expect("x is always given");
    let stream = x.stream();
    let mut others = named_others(t);
    others.push(("dy", dy));
    order_after(stream, "x", &others)?;
    let new = |shape: &[usize]| DeviceTensor::poisoned(stream, p.dtype, shape);
    let want = |on: bool, shape: &[usize]| on.then(|| new(shape)).transpose();
    let g = FfnGradients {
        dx: new(&p.x_shape())?,
        dw1: new(&p.w1_shape())?,
        db1: want(p.has_b1, &[p.d_hidden])?,
        dw2: new(&p.w2_shape())?,
        db2: want(p.has_b2, &[p.d_model])?,
        dw3: want(p.gated, &p.w1_shape())?,
        db3: want(p.has_b3, &[p.d_hidden])?,
    };
    let views: Vec<Option<DeviceView>> = t.iter().map(|t| t.map(DeviceTensor::view)).collect();
    let view = |o: &Option<DeviceTensor>| o.as_ref().map(DeviceTensor::view);
    let outs = [
        Some(g.dx.view()),
        Some(g.dw1.view()),
        Some(g.dw2.view()),
        view(&g.dw3),
        view(&g.db1),
        view(&g.db2),
        view(&g.db3),
    ];
    let mut all = named_views(&views);
    let dyv = dy.view();
    all.push(("dy", &dyv));
    let out_names = ["dx", "dw1", "dw2", "dw3", "db1", "db2", "db3"];
    all.extend(
        out_names
            .iter()
            .zip(&outs)
            .filter_map(|(n, v)| v.as_ref().map(|v| (*n, v))),
    );
    let device = x.stream().ordinal();
    check_views(device, &all)?;
    let ptr = |i: usize| {
        views[i]
            .as_ref()
            .map_or(std::ptr::null(), |v| v.ptr as *const c_void)
    };
    let ld = |i: usize| views[i].as_ref().map_or(0, |v| v.layout.strides[0] as i64);
    let out = |i: usize| {
        outs[i]
            .as_ref()
            .map_or(std::ptr::null_mut(), |v| v.ptr as *mut c_void)
    };
    let out_ld = |i: usize| outs[i].as_ref().map_or(0, |v| v.layout.strides[0] as i64);
    let mut params = ffi::fk_ffn_bwd_params {
        x: ptr(0),
        w1: ptr(1),
        w2: ptr(2),
        w3: ptr(3),
        b1: ptr(4),
        b3: ptr(6),
        dy: dyv.ptr as *const c_void,
        dx: out(0),
        dw1: out(1),
        dw2: out(2),
        dw3: out(3),
        db1: out(4),
        db2: out(5),
        db3: out(6),
        workspace: std::ptr::null_mut(),
        x_stride: ld(0),
        w1_stride: ld(1),
        w2_stride: ld(2),
        w3_stride: ld(3),
        dy_stride: dyv.layout.strides[0] as i64,
        dx_stride: out_ld(0),
        dw1_stride: out_ld(1),
        dw2_stride: out_ld(2),
        dw3_stride: out_ld(3),
        tokens: i32_of("tokens", p.tokens)?,
        d_model: i32_of("d_model", p.d_model)?,
        d_hidden: i32_of("d_hidden", p.d_hidden)?,
        activation: activation_arg(p.activation),
        residual: i32::from(p.residual),
        dtype: dtype_arg(p.dtype),
        device: i32_of("device", device)?,
    };
    // SAFETY: reads the params only.
    let bytes = unsafe { ffi::fk_ffn_bwd_workspace_bytes(&params) };
    if bytes <= 0 {
        return Err(Error::InvalidArgument(format!(
            "the feed-forward backward kernels refused {p:?}"
        )));
    }
    let ws = workspace(stream, bytes as usize)?;
    params.workspace = ws.ptr;
    // SAFETY: views of live DeviceTensors whose layouts fit their allocations, checked
    // above; the gradients and the workspace are fresh, so nothing overlaps them.
    let code = unsafe { ffi::fk_ffn_bwd(&params, stream.raw()) };
    ffi::check(code)?;
    Ok(g)
}
