//! The CUDA path of the feed-forward block: the kernels' limits (checked by
//! [`check_kernel_limits`] before anything is allocated), the C params of
//! kernels/include/fk_ffn.h from a validated problem, and the launch on x's stream.

use super::FfnProblem;
use super::{check_kernel_limits, validate, FfnActivation, FfnLayouts, FfnOptions, FfnOutput};
use crate::device::{DeviceTensor, DeviceView, Stream};
use crate::error::{Error, Result};
use crate::ffi;
use crate::ops::glue::{check_same_device, dtype_arg, order_after};

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

/// The forward on device tensors, in [`super::Inputs`]' order (x, w1, w2, w3, b1, b2,
/// b3): validates, checks the kernel limits, orders x's stream after the other inputs',
/// allocates h and y (contiguous) and launches.
pub(crate) fn forward(
    t: &[Option<&DeviceTensor>],
    opts: &FfnOptions,
    keep_hidden: bool,
) -> Result<FfnOutput<DeviceTensor>> {
    let d = |i: usize| t[i].map(DeviceTensor::described);
    let p = validate(
        &FfnLayouts {
            x: d(0).expect("x is always given"),
            w1: d(1).expect("w1 is always given"),
            w2: d(2).expect("w2 is always given"),
            w3: d(3),
            b1: d(4),
            b2: d(5),
            b3: d(6),
        },
        opts,
    )?;
    check_kernel_limits(&p)?;
    let x = t[0].expect("x is always given");
    let stream = x.stream();
    let names = ["x", "w1", "w2", "w3", "b1", "b2", "b3"];
    let others: Vec<(&str, &DeviceTensor)> = names
        .iter()
        .zip(t)
        .skip(1)
        .filter_map(|(n, t)| t.map(|t| (*n, t)))
        .collect();
    order_after(stream, "x", &others)?;
    let h = DeviceTensor::poisoned(stream, p.dtype, &p.hidden_shape())?;
    let y = DeviceTensor::poisoned(stream, p.dtype, &p.x_shape())?;
    let views: Vec<Option<DeviceView>> = t.iter().map(|t| t.map(DeviceTensor::view)).collect();
    let refs: Vec<Option<&DeviceView>> = views.iter().map(Option::as_ref).collect();
    // SAFETY: views of live DeviceTensors whose layouts fit their allocations (checked
    // when they were made); h and y are fresh, so nothing overlaps them.
    unsafe { launch_forward(&p, &refs, &h.view(), &y.view(), stream)? };
    Ok(FfnOutput {
        y,
        hidden: keep_hidden.then_some(h),
    })
}

/// Fills the C params and launches.
///
/// # Safety
/// Every view must describe live device memory its layout stays inside; h and y must not
/// overlap the inputs or each other; `stream` must be ordered after the inputs' writers.
unsafe fn launch_forward(
    p: &FfnProblem,
    t: &[Option<&DeviceView>],
    h: &DeviceView,
    y: &DeviceView,
    stream: &Stream,
) -> Result<()> {
    let names = ["x", "w1", "w2", "w3", "b1", "b2", "b3"];
    let mut all: Vec<(&str, &DeviceView)> = names
        .iter()
        .zip(t)
        .filter_map(|(n, v)| v.map(|v| (*n, v)))
        .collect();
    all.push(("h", h));
    all.push(("y", y));
    let device = t[0].expect("x").device;
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
    let ptr = |i: usize| t[i].map_or(std::ptr::null(), |v| v.ptr as *const std::ffi::c_void);
    let ld = |i: usize| t[i].map_or(0, |v| v.layout.strides[0] as i64);
    let params = ffi::fk_ffn_params {
        x: ptr(0),
        w1: ptr(1),
        w2: ptr(2),
        w3: ptr(3),
        b1: ptr(4),
        b2: ptr(5),
        b3: ptr(6),
        h: h.ptr as *mut std::ffi::c_void,
        y: y.ptr as *mut std::ffi::c_void,
        x_stride: ld(0),
        w1_stride: ld(1),
        w2_stride: ld(2),
        w3_stride: ld(3),
        h_stride: h.layout.strides[0] as i64,
        y_stride: y.layout.strides[0] as i64,
        tokens: i32_of("tokens", p.tokens)?,
        d_model: i32_of("d_model", p.d_model)?,
        d_hidden: i32_of("d_hidden", p.d_hidden)?,
        activation: activation_arg(p.activation),
        residual: i32::from(p.residual),
        dtype: dtype_arg(p.dtype),
        device: i32_of("device", device)?,
    };
    // SAFETY: the params describe memory the caller vouches for, checked above.
    let code = unsafe { ffi::fk_ffn_fwd(&params, stream.raw()) };
    ffi::check(code)
}
