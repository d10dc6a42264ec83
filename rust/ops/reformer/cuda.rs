//! The CUDA path of Reformer LSH attention (kernels/include/fk_reformer.h): the forward
//! (hashing, one stable sort of all rounds, chunked attention with circular look-back, the
//! round combination and the unsort, all on the device) and the backward with the buckets
//! held fixed.
//!
//! Entries on views the caller allocated (`launch_forward` / `launch_backward`, the Python
//! path's) and on device tensors (`forward` / `backward`, the Rust API's, through them).
//! The buckets come back as a host [`Buckets`] (as Hugging Face returns them), which
//! waits for the stream; a caller that does not need them still pays that wait today.

use std::ffi::c_void;

use super::{validate, validate_backward, validate_buckets, Buckets, ReformerLayouts};
use super::{ReformerBackwardLayouts, ReformerGradients, ReformerOptions};
use super::{ReformerOutput, ReformerProblem, TokenMask};
use crate::device::{DeviceBuffer, DeviceTensor, DeviceView, Stream};
use crate::error::{Error, Result};
use crate::ffi;
use crate::ops::glue::{
    bsh, check_contiguous, check_out, check_out_rows, check_same_device, too_large, MAX_GRID_YZ,
};
use crate::ops::glue::{dtype_arg, i32_arg, order_after, ptr_or_null, upload_flags, workspace};
use crate::tensor::DType;

/// The head dims and bucket counts the kernels take (fk_reformer.h).
const MAX_HEAD_DIM: usize = 128;
const MAX_BUCKETS: usize = 8192;

/// What the kernels need beyond the op's semantics (fk_reformer.h's refusals), checked
/// before anything is allocated.
pub fn check_kernel_limits(p: &ReformerProblem) -> Result<()> {
    if !matches!(p.dtype, DType::F16 | DType::BF16) {
        return Err(Error::UnsupportedDType {
            name: "qk",
            dtype: p.dtype,
            supported: "the CUDA kernels take float16 or bfloat16",
        });
    }
    if p.head_dim > MAX_HEAD_DIM {
        return Err(Error::Unsupported(format!(
            "head_dim {} (the Reformer CUDA kernels take head dims up to {MAX_HEAD_DIM})",
            p.head_dim
        )));
    }
    if p.n_buckets > MAX_BUCKETS {
        return Err(Error::Unsupported(format!(
            "{} buckets (the Reformer CUDA kernels take up to {MAX_BUCKETS})",
            p.n_buckets
        )));
    }
    for (what, value, limit) in [
        ("batch", p.batch, MAX_GRID_YZ),
        ("heads", p.heads, MAX_GRID_YZ),
        (
            "n_hashes * seqlen",
            p.n_hashes.saturating_mul(p.seqlen),
            i32::MAX as usize,
        ),
    ] {
        if value > limit {
            return Err(too_large(what, value, limit));
        }
    }
    Ok(())
}

/// Validates a device call's inputs (and given buckets) as one forward call.
fn validate_device(
    [qk, v, rotations]: [&DeviceTensor; 3],
    mask: Option<&TokenMask>,
    given: Option<&Buckets>,
    opts: &ReformerOptions,
) -> Result<ReformerProblem> {
    let p = validate(
        &ReformerLayouts {
            qk: qk.described(),
            v: v.described(),
            rotations: rotations.described(),
        },
        mask,
        opts,
    )?;
    if let Some(b) = given {
        validate_buckets(&p, b)?;
    }
    Ok(p)
}

/// What the launches need of the views beyond the validator's layouts: one device,
/// element-aligned pointers, contiguous float32 rotations.
fn check_views(device: usize, rotations: &DeviceView, views: &[(&str, &DeviceView)]) -> Result<()> {
    check_same_device("qk", device, views)?;
    for (name, v) in views {
        if v.ptr % v.dtype.size() as u64 != 0 {
            return Err(Error::InvalidArgument(format!(
                "{name}: pointer {:#x} is not aligned to its {}-byte elements",
                v.ptr,
                v.dtype.size()
            )));
        }
    }
    if rotations.dtype != DType::F32 {
        return Err(Error::InvalidArgument(format!(
            "rotations: the CUDA kernels read float32 rotations, got {} (convert them \
             first, e.g. rotations.float())",
            rotations.dtype
        )));
    }
    check_contiguous(
        "rotations",
        rotations,
        "the CUDA kernels read contiguous rotations (e.g. rotations.contiguous())",
    )
}

/// The forward of a validated call on views: O and the per-round LSE into `out` (qk's
/// dtype and shape, unit head-dim stride) and `lse` (contiguous float32), all on
/// `stream`. Returns the buckets used: given ones as given; hashed ones written to
/// `buckets_out` when given (then None: nothing waits for the stream), else downloaded
/// (a wait for the stream); None when N <= C.
///
/// # Safety
/// The views describe live device memory on `device` that their layouts stay inside,
/// ready on `stream`; the outputs overlap neither the inputs nor each other.
/// `buckets_out`, when given, points to B·H·n_hashes·N writable int32 on `device`.
pub(crate) unsafe fn launch_forward(
    p: &ReformerProblem,
    [qk, v, rotations]: [&DeviceView; 3],
    [out, lse]: [&DeviceView; 2],
    given: Option<&Buckets>,
    buckets_out: Option<*mut i32>,
    device: usize,
    stream: &Stream,
) -> Result<Option<Buckets>> {
    check_kernel_limits(p)?;
    check_out_rows("out", out, p.dtype, &p.qkv_shape())?;
    check_out("lse", lse, DType::F32, &p.lse_shape())?;
    check_contiguous("lse", lse, "the CUDA kernels write a contiguous lse")?;
    check_views(
        device,
        rotations,
        &[
            ("qk", qk),
            ("v", v),
            ("rotations", rotations),
            ("out", out),
            ("lse", lse),
        ],
    )?;
    let padding = upload_flags(&p.padding, stream)?;
    let given_dev = given
        .map(|b| DeviceBuffer::upload_values(stream, &b.values))
        .transpose()?;
    let hashed_here = p.hashed() && given.is_none();
    // SAFETY: the kernels write every bucket they hash before it is read back.
    let buckets_dev = if hashed_here && buckets_out.is_none() {
        let n = p.buckets_shape().iter().product();
        Some(unsafe { DeviceBuffer::alloc_elems::<i32>(stream, n)? })
    } else {
        None
    };
    let buckets_ptr = match (hashed_here, buckets_out) {
        (true, Some(ptr)) => ptr,
        _ => ptr_or_null::<i32>(&buckets_dev) as *mut i32,
    };
    let mut params = ffi::fk_reformer_fwd_params {
        qk: qk.ptr as *const c_void,
        v: v.ptr as *const c_void,
        rotations: rotations.ptr as *const f32,
        key_padding: ptr_or_null(&padding),
        given_buckets: ptr_or_null(&given_dev),
        out: out.ptr as *mut c_void,
        lse: lse.ptr as *mut f32,
        buckets: buckets_ptr,
        workspace: std::ptr::null_mut(),
        qk_stride: bsh(&qk.layout),
        v_stride: bsh(&v.layout),
        out_stride: bsh(&out.layout),
        batch: i32_arg("batch", p.batch)?,
        seqlen: i32_arg("seqlen", p.seqlen)?,
        heads: i32_arg("heads", p.heads)?,
        head_dim: i32_arg("head_dim", p.head_dim)?,
        n_hashes: i32_arg("n_hashes", p.n_hashes)?,
        n_buckets: i32_arg("n_buckets", p.n_buckets)?,
        chunk_length: i32_arg("chunk_length", p.chunk_length)?,
        chunks_before: i32_arg("chunks_before", p.chunks_before)?,
        chunks_after: i32_arg("chunks_after", p.chunks_after)?,
        causal: i32::from(p.causal),
        dtype: dtype_arg(p.dtype),
        device: i32_arg("device", device)?,
    };
    // SAFETY: reads the params only.
    let bytes = unsafe { ffi::fk_reformer_fwd_workspace_bytes(&params) };
    let ws = workspace(stream, bytes.max(0) as usize)?;
    params.workspace = ws.ptr;
    // SAFETY: the caller vouches for the views (checked against the problem here); the
    // uploaded mask / buckets and the workspace are fresh.
    ffi::check(unsafe { ffi::fk_reformer_fwd(&params, stream.raw()) })?;
    let buckets = match (given, buckets_dev) {
        (Some(b), _) => Some(b.clone()),
        (None, Some(d)) => Some(Buckets {
            shape: p.buckets_shape(),
            values: d.download_values::<i32>()?,
        }),
        (None, None) => None,
    };
    drop(ws);
    Ok(buckets)
}

/// The buckets a backward holds fixed: the given ones, or (hashed calls) those of a
/// device forward into scratch outputs, as the CPU path hashes again.
///
/// # Safety
/// As [`launch_forward`]'s for the inputs.
unsafe fn backward_buckets(
    p: &ReformerProblem,
    inputs: [&DeviceView; 3],
    given: Option<&Buckets>,
    device: usize,
    stream: &Stream,
) -> Result<Option<Buckets>> {
    if given.is_some() || !p.hashed() {
        return Ok(given.cloned());
    }
    let out = DeviceTensor::poisoned(stream, p.dtype, &p.qkv_shape())?;
    let lse = DeviceTensor::poisoned(stream, DType::F32, &p.lse_shape())?;
    // SAFETY: the caller vouches for the inputs; the outputs are fresh.
    unsafe {
        launch_forward(
            p,
            inputs,
            [&out.view(), &lse.view()],
            None,
            None,
            device,
            stream,
        )
    }
}

/// The backward of a validated call (`validate_backward` checked out / lse / dout) on
/// views: dqk and dv (qk's dtype and shape, unit head-dim stride) with the buckets held
/// fixed (given, or hashed again by a device forward), all on `stream`.
///
/// # Safety
/// As [`launch_forward`]'s; the gradients overlap nothing else.
pub(crate) unsafe fn launch_backward(
    p: &ReformerProblem,
    [qk, v, rotations]: [&DeviceView; 3],
    [out, lse, dout]: [&DeviceView; 3],
    [dqk, dv]: [&DeviceView; 2],
    given: Option<&Buckets>,
    device: usize,
    stream: &Stream,
) -> Result<()> {
    check_kernel_limits(p)?;
    check_contiguous("lse", lse, "the CUDA backward reads a contiguous lse")?;
    for (name, g) in [("dqk", dqk), ("dv", dv)] {
        check_out_rows(name, g, p.dtype, &p.qkv_shape())?;
    }
    check_views(
        device,
        rotations,
        &[
            ("qk", qk),
            ("v", v),
            ("rotations", rotations),
            ("out", out),
            ("lse", lse),
            ("grad_output", dout),
            ("dqk", dqk),
            ("dv", dv),
        ],
    )?;
    // SAFETY: as the caller vouches.
    let buckets = unsafe { backward_buckets(p, [qk, v, rotations], given, device, stream)? };
    let padding = upload_flags(&p.padding, stream)?;
    let buckets_dev = buckets
        .map(|b| DeviceBuffer::upload_values(stream, &b.values))
        .transpose()?;
    let mut params = ffi::fk_reformer_bwd_params {
        qk: qk.ptr as *const c_void,
        v: v.ptr as *const c_void,
        out: out.ptr as *const c_void,
        dout: dout.ptr as *const c_void,
        lse: lse.ptr as *const f32,
        key_padding: ptr_or_null(&padding),
        buckets: ptr_or_null(&buckets_dev),
        dqk: dqk.ptr as *mut c_void,
        dv: dv.ptr as *mut c_void,
        workspace: std::ptr::null_mut(),
        qk_stride: bsh(&qk.layout),
        v_stride: bsh(&v.layout),
        out_stride: bsh(&out.layout),
        dout_stride: bsh(&dout.layout),
        dqk_stride: bsh(&dqk.layout),
        dv_stride: bsh(&dv.layout),
        batch: i32_arg("batch", p.batch)?,
        seqlen: i32_arg("seqlen", p.seqlen)?,
        heads: i32_arg("heads", p.heads)?,
        head_dim: i32_arg("head_dim", p.head_dim)?,
        n_hashes: i32_arg("n_hashes", p.n_hashes)?,
        n_buckets: i32_arg("n_buckets", p.n_buckets)?,
        chunk_length: i32_arg("chunk_length", p.chunk_length)?,
        chunks_before: i32_arg("chunks_before", p.chunks_before)?,
        chunks_after: i32_arg("chunks_after", p.chunks_after)?,
        causal: i32::from(p.causal),
        dtype: dtype_arg(p.dtype),
        device: i32_arg("device", device)?,
    };
    // SAFETY: reads the params only.
    let bytes = unsafe { ffi::fk_reformer_bwd_workspace_bytes(&params) };
    if bytes <= 0 {
        return Err(Error::InvalidArgument(format!(
            "the Reformer backward kernels refused {p:?}"
        )));
    }
    let ws = workspace(stream, bytes as usize)?;
    params.workspace = ws.ptr;
    // SAFETY: the caller vouches for the views (checked against the problem here); the
    // uploaded mask / buckets and the workspace are fresh.
    ffi::check(unsafe { ffi::fk_reformer_bwd(&params, stream.raw()) })
}

/// The forward on device tensors [qk, v, rotations]: validates, orders qk's stream after
/// the others', allocates O and the per-round LSE (contiguous) and launches; the buckets
/// come back on the host (given ones as given).
pub(crate) fn forward(
    [qk, v, rotations]: [&DeviceTensor; 3],
    mask: Option<&TokenMask>,
    given: Option<&Buckets>,
    opts: &ReformerOptions,
) -> Result<ReformerOutput<DeviceTensor>> {
    let p = validate_device([qk, v, rotations], mask, given, opts)?;
    check_kernel_limits(&p)?;
    let stream = qk.stream();
    order_after(stream, "qk", &[("v", v), ("rotations", rotations)])?;
    let out = DeviceTensor::poisoned(stream, p.dtype, &p.qkv_shape())?;
    let lse = DeviceTensor::poisoned(stream, DType::F32, &p.lse_shape())?;
    // SAFETY: views of live DeviceTensors whose layouts fit their allocations; the
    // outputs are fresh.
    let buckets = unsafe {
        launch_forward(
            &p,
            [&qk.view(), &v.view(), &rotations.view()],
            [&out.view(), &lse.view()],
            given,
            None,
            stream.ordinal(),
            stream,
        )
    }?;
    Ok(ReformerOutput { out, lse, buckets })
}

/// The backward on device tensors [qk, v, rotations], [out, lse, dout] (the forward's O and
/// per-round LSE): dqk and dv (contiguous) with the buckets held fixed. Without given
/// buckets a hashed call runs the device forward first to get them (as the CPU path
/// hashes again); pass the forward's buckets to skip that.
pub(crate) fn backward(
    [qk, v, rotations]: [&DeviceTensor; 3],
    [out, lse, dout]: [&DeviceTensor; 3],
    mask: Option<&TokenMask>,
    given: Option<&Buckets>,
    opts: &ReformerOptions,
) -> Result<ReformerGradients<DeviceTensor>> {
    let p = validate_device([qk, v, rotations], mask, given, opts)?;
    validate_backward(
        &p,
        &ReformerBackwardLayouts {
            out: out.described(),
            lse: lse.described(),
            dout: dout.described(),
        },
    )?;
    check_kernel_limits(&p)?;
    let stream = qk.stream();
    order_after(
        stream,
        "qk",
        &[
            ("v", v),
            ("rotations", rotations),
            ("out", out),
            ("lse", lse),
            ("dout", dout),
        ],
    )?;
    let dqk = DeviceTensor::poisoned(stream, p.dtype, &p.qkv_shape())?;
    let dv = DeviceTensor::poisoned(stream, p.dtype, &p.qkv_shape())?;
    // SAFETY: views of live DeviceTensors whose layouts fit their allocations; the
    // gradients are fresh.
    unsafe {
        launch_backward(
            &p,
            [&qk.view(), &v.view(), &rotations.view()],
            [&out.view(), &lse.view(), &dout.view()],
            [&dqk.view(), &dv.view()],
            given,
            stream.ordinal(),
            stream,
        )
    }?;
    Ok(ReformerGradients { dqk, dv })
}
