//! The CUDA path of the feed-forward block: the kernels' limits (checked by
//! [`check_kernel_limits`] before anything is allocated), the C params of
//! kernels/include/fk_ffn.h from a validated problem, and the launches: on views the caller
//! allocated (`launch_forward` / `launch_backward`, the Python boundary's path) and on
//! tensors allocated here (`forward` / `backward`, which call them).

use std::ffi::c_void;

use super::{
    check_kernel_limits, validate, validate_backward, FfnActivation, FfnGradients, FfnLayouts,
    FfnOptions, FfnOutput, FfnProblem,
};
use crate::device::{DeviceTensor, DeviceView, Stream};
use crate::error::{Error, Result};
use crate::ffi;
use crate::ops::glue::{
    check_contiguous, check_same_device, dtype_arg, i32_arg, order_after, workspace,
};

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

/// Every view on `device`, aligned to its elements; outputs contiguous.
fn check_views(
    device: usize,
    inputs: &[(&str, &DeviceView)],
    outputs: &[(&str, &DeviceView)],
) -> Result<()> {
    let all: Vec<(&str, &DeviceView)> = inputs.iter().chain(outputs).copied().collect();
    check_same_device("x", device, &all)?;
    for (name, v) in &all {
        if v.ptr % v.dtype.size() as u64 != 0 {
            return Err(Error::InvalidArgument(format!(
                "{name}: pointer {:#x} is not aligned to its {}-byte elements",
                v.ptr,
                v.dtype.size()
            )));
        }
    }
    for (name, v) in outputs {
        check_contiguous(name, v, "the feed-forward kernels write contiguous outputs")?;
    }
    Ok(())
}

fn named<'a>(
    names: &[&'static str; 7],
    v: &'a [Option<DeviceView>; 7],
) -> Vec<(&'static str, &'a DeviceView)> {
    names
        .iter()
        .zip(v)
        .filter_map(|(n, v)| v.as_ref().map(|v| (*n, v)))
        .collect()
}

fn ptr(v: &Option<DeviceView>) -> *const c_void {
    v.as_ref()
        .map_or(std::ptr::null(), |v| v.ptr as *const c_void)
}

fn ptr_mut(v: &Option<DeviceView>) -> *mut c_void {
    v.as_ref()
        .map_or(std::ptr::null_mut(), |v| v.ptr as *mut c_void)
}

fn ld(v: &Option<DeviceView>) -> i64 {
    v.as_ref().map_or(0, |v| v.layout.strides[0] as i64)
}

/// The forward: `ins` in [`NAMES`]' order, y (and hidden, else a workspace
/// for h) as the caller allocated them.
///
/// # Safety
/// The views describe live device memory of the caller's framework, exported for
/// `stream`; the outputs do not overlap the inputs.
pub(crate) unsafe fn launch_forward(
    p: &FfnProblem,
    ins: &[Option<DeviceView>; 7],
    y: &DeviceView,
    hidden: Option<&DeviceView>,
    device: usize,
    stream: impl FnOnce() -> Result<Stream>,
) -> Result<()> {
    check_kernel_limits(p)?;
    let mut outs = vec![("y", y)];
    outs.extend(hidden.map(|h| ("hidden", h)));
    check_views(device, &named(&NAMES, ins), &outs)?;
    let stream = &stream()?;
    let h_bytes = p
        .tokens
        .checked_mul(p.d_hidden)
        .and_then(|n| n.checked_mul(p.dtype.size()))
        .ok_or_else(|| Error::TooLarge {
            what: "the hidden activation's bytes".into(),
            value: u64::MAX,
            limit: usize::MAX as u64,
        })?;
    let scratch = workspace(stream, if hidden.is_some() { 0 } else { h_bytes })?;
    let h_ptr = hidden.map_or(scratch.ptr, |h| h.ptr as *mut c_void);
    let params = ffi::fk_ffn_params {
        x: ptr(&ins[0]),
        w1: ptr(&ins[1]),
        w2: ptr(&ins[2]),
        w3: ptr(&ins[3]),
        b1: ptr(&ins[4]),
        b2: ptr(&ins[5]),
        b3: ptr(&ins[6]),
        h: h_ptr,
        y: y.ptr as *mut c_void,
        x_stride: ld(&ins[0]),
        w1_stride: ld(&ins[1]),
        w2_stride: ld(&ins[2]),
        w3_stride: ld(&ins[3]),
        h_stride: p.d_hidden as i64,
        y_stride: p.d_model as i64,
        tokens: i32_arg("tokens", p.tokens)?,
        d_model: i32_arg("d_model", p.d_model)?,
        d_hidden: i32_arg("d_hidden", p.d_hidden)?,
        activation: activation_arg(p.activation),
        residual: i32::from(p.residual),
        dtype: dtype_arg(p.dtype),
        device: i32_arg("device", device)?,
    };
    // SAFETY: the caller vouches for the views; h is theirs or a fresh workspace.
    let code = unsafe { ffi::fk_ffn_fwd(&params, stream.raw()) };
    ffi::check(code)
}

/// The backward: `ins` in [`NAMES`]' order, dy, and the gradients in the
/// same order (dx, dw1, dw2, dw3, db1, db2, db3), each given or not.
///
/// # Safety
/// As [`launch_forward`].
pub(crate) unsafe fn launch_backward(
    p: &FfnProblem,
    ins: &[Option<DeviceView>; 7],
    dy: &DeviceView,
    outs: &[Option<DeviceView>; 7],
    device: usize,
    stream: impl FnOnce() -> Result<Stream>,
) -> Result<()> {
    check_kernel_limits(p)?;
    let mut inputs = named(&NAMES, ins);
    inputs.push(("dy", dy));
    let out_names = ["dx", "dw1", "dw2", "dw3", "db1", "db2", "db3"];
    check_views(device, &inputs, &named(&out_names, outs))?;
    let stream = &stream()?;
    // dx, dW1, dW2 (and dW3 when gated) are the kernels' required outputs: a
    // workspace stands in for one the caller does not want.
    let shapes = [
        (p.tokens, p.d_model),
        (p.d_hidden, p.d_model),
        (p.d_model, p.d_hidden),
        (p.d_hidden, p.d_model),
    ];
    let mut scratch = Vec::new();
    let mut req: [(*mut c_void, i64); 4] = [(std::ptr::null_mut(), 0); 4];
    for (i, (rows, cols)) in shapes.into_iter().enumerate() {
        req[i] = match &outs[i] {
            Some(v) => (v.ptr as *mut c_void, v.layout.strides[0] as i64),
            None if i < 3 || p.gated => {
                let bytes = rows
                    .checked_mul(cols)
                    .and_then(|n| n.checked_mul(p.dtype.size()))
                    .ok_or_else(|| Error::TooLarge {
                        what: format!("{}'s bytes", out_names[i]),
                        value: u64::MAX,
                        limit: usize::MAX as u64,
                    })?;
                let ws = workspace(stream, bytes)?;
                let ptr = ws.ptr;
                scratch.push(ws);
                (ptr, cols as i64)
            }
            None => (std::ptr::null_mut(), 0),
        };
    }
    let mut params = ffi::fk_ffn_bwd_params {
        x: ptr(&ins[0]),
        w1: ptr(&ins[1]),
        w2: ptr(&ins[2]),
        w3: ptr(&ins[3]),
        b1: ptr(&ins[4]),
        b3: ptr(&ins[6]),
        dy: dy.ptr as *const c_void,
        dx: req[0].0,
        dw1: req[1].0,
        dw2: req[2].0,
        dw3: req[3].0,
        db1: ptr_mut(&outs[4]),
        db2: ptr_mut(&outs[5]),
        db3: ptr_mut(&outs[6]),
        workspace: std::ptr::null_mut(),
        x_stride: ld(&ins[0]),
        w1_stride: ld(&ins[1]),
        w2_stride: ld(&ins[2]),
        w3_stride: ld(&ins[3]),
        dy_stride: dy.layout.strides[0] as i64,
        dx_stride: req[0].1,
        dw1_stride: req[1].1,
        dw2_stride: req[2].1,
        dw3_stride: req[3].1,
        tokens: i32_arg("tokens", p.tokens)?,
        d_model: i32_arg("d_model", p.d_model)?,
        d_hidden: i32_arg("d_hidden", p.d_hidden)?,
        activation: activation_arg(p.activation),
        residual: i32::from(p.residual),
        dtype: dtype_arg(p.dtype),
        device: i32_arg("device", device)?,
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
    // SAFETY: the caller vouches for the views; the workspace is fresh.
    let code = unsafe { ffi::fk_ffn_bwd(&params, stream.raw()) };
    drop(scratch); // freed in stream order, after the launch
    ffi::check(code)
}

/// The forward on device tensors, in [`super::Inputs`]' order (x, w1, w2, w3, b1, b2,
/// b3): validates, orders x's stream after the other inputs', allocates h and y
/// (contiguous) and launches through [`launch_forward`].
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
    let views: [Option<DeviceView>; 7] = std::array::from_fn(|i| t[i].map(DeviceTensor::view));
    // SAFETY: views of live DeviceTensors whose layouts fit their allocations (checked
    // when they were made); h and y are fresh, so nothing overlaps them.
    unsafe {
        launch_forward(
            &p,
            &views,
            &y.view(),
            Some(&h.view()),
            stream.ordinal(),
            || Ok(stream.clone()),
        )
    }?;
    Ok(FfnOutput {
        y,
        hidden: keep_hidden.then_some(h),
    })
}

/// The backward on device tensors: `t` in [`super::Inputs`]' order, then dy. Validates,
/// orders x's stream after the others', allocates the gradients (contiguous; db_i where
/// b_i is given, dW3 when gated) and launches through [`launch_backward`].
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
    let views: [Option<DeviceView>; 7] = std::array::from_fn(|i| t[i].map(DeviceTensor::view));
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
    // SAFETY: views of live DeviceTensors whose layouts fit their allocations; the
    // gradients are fresh, so nothing overlaps them.
    unsafe {
        launch_backward(&p, &views, &dy.view(), &outs, stream.ordinal(), || {
            Ok(stream.clone())
        })
    }?;
    Ok(g)
}
