//! The CUDA path of Reformer LSH attention (kernels/include/fk_reformer.h): the forward
//! (hashing, one stable sort of all rounds, chunked attention with circular look-back, the
//! round combination and the unsort, all on the device) and the backward with the buckets
//! held fixed.
//!
//! The buckets come back as a host [`Buckets`] (as Hugging Face returns them), which
//! waits for the stream; a caller that does not need them still pays that wait today.

use std::ffi::c_void;

use super::{validate, validate_backward, validate_buckets, Buckets, ReformerLayouts};
use super::{ReformerBackwardLayouts, ReformerGradients, ReformerOptions};
use super::{ReformerOutput, ReformerProblem, TokenMask};
use crate::device::{DeviceBuffer, DeviceTensor};
use crate::error::{Error, Result};
use crate::ffi;
use crate::ops::glue::{bsh, dtype_arg, i32_arg, order_after, workspace};
use crate::tensor::{DType, Layout};

/// Grid y / z extents (heads, batch).
const MAX_GRID_YZ: usize = 65_535;
/// The head dims, bucket counts and look-back the kernels take (fk_reformer.h).
const MAX_HEAD_DIM: usize = 128;
const MAX_BUCKETS: usize = 8192;
const MAX_CHUNKS_AROUND: usize = 65_535;

fn too_large(what: &str, value: usize, limit: usize) -> Error {
    Error::TooLarge {
        what: what.into(),
        value: value as u64,
        limit: limit as u64,
    }
}

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
        ("chunks_before", p.chunks_before, MAX_CHUNKS_AROUND),
        ("chunks_after", p.chunks_after, MAX_CHUNKS_AROUND),
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

/// Validates a device call's inputs (and given buckets) and the kernels' limits.
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
    check_kernel_limits(&p)?;
    Ok(p)
}

/// The key padding mask as the kernels read it ((B, N) bytes, 1 = padded), when given.
fn upload_padding(
    p: &ReformerProblem,
    mask: Option<&TokenMask>,
    stream: &crate::Stream,
) -> Result<Option<DeviceBuffer>> {
    mask.map(|_| {
        let bytes: Vec<u8> = p.padding.iter().map(|&b| u8::from(b)).collect();
        DeviceBuffer::upload(stream, &bytes)
    })
    .transpose()
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
    if rotations.dtype() != DType::F32
        || rotations.layout() != &Layout::contiguous(rotations.shape())
    {
        return Err(Error::InvalidArgument(format!(
            "rotations: the CUDA kernels read contiguous float32 rotations, got {} strides {:?} \
             (convert them first, e.g. rotations.float().contiguous())",
            rotations.dtype(),
            rotations.strides()
        )));
    }
    let stream = qk.stream();
    order_after(stream, "qk", &[("v", v), ("rotations", rotations)])?;
    let out = DeviceTensor::poisoned(stream, p.dtype, &p.qkv_shape())?;
    let lse = DeviceTensor::poisoned(stream, DType::F32, &p.lse_shape())?;
    let padding = upload_padding(&p, mask, stream)?;
    let given_dev = given
        .map(|b| DeviceBuffer::upload_values(stream, &b.values))
        .transpose()?;
    let hashed_here = p.hashed() && given.is_none();
    let bucket_count = if hashed_here {
        p.buckets_shape().iter().product()
    } else {
        0
    };
    // SAFETY: the kernels write every bucket they hash before it is read back.
    let buckets_dev = if hashed_here {
        Some(unsafe { DeviceBuffer::alloc_elems::<i32>(stream, bucket_count)? })
    } else {
        None
    };
    let mut params = ffi::fk_reformer_fwd_params {
        qk: qk.view().ptr as *const c_void,
        v: v.view().ptr as *const c_void,
        rotations: rotations.view().ptr as *const f32,
        key_padding: padding
            .as_ref()
            .map_or(std::ptr::null(), |b| b.ptr() as *const u8),
        given_buckets: given_dev
            .as_ref()
            .map_or(std::ptr::null(), |b| b.ptr() as *const i32),
        out: out.view().ptr as *mut c_void,
        lse: lse.view().ptr as *mut f32,
        buckets: buckets_dev
            .as_ref()
            .map_or(std::ptr::null_mut(), |b| b.ptr() as *mut i32),
        workspace: std::ptr::null_mut(),
        qk_stride: bsh(qk.layout()),
        v_stride: bsh(v.layout()),
        out_stride: bsh(out.layout()),
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
        device: i32_arg("device", stream.ordinal())?,
    };
    // SAFETY: reads the params only.
    let bytes = unsafe { ffi::fk_reformer_fwd_workspace_bytes(&params) };
    let ws = workspace(stream, bytes.max(0) as usize)?;
    params.workspace = ws.ptr;
    // SAFETY: views of live DeviceTensors checked by the validator; the outputs, the
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
    if lse.layout() != &Layout::contiguous(lse.shape()) {
        return Err(Error::InvalidArgument(format!(
            "lse: the CUDA backward reads a contiguous lse, got strides {:?}",
            lse.strides()
        )));
    }
    let hashed;
    let buckets = match given {
        Some(b) => Some(b),
        None if p.hashed() => {
            hashed = forward([qk, v, rotations], mask, None, opts)?.buckets;
            hashed.as_ref()
        }
        None => None,
    };
    let stream = qk.stream();
    order_after(
        stream,
        "qk",
        &[("v", v), ("out", out), ("lse", lse), ("dout", dout)],
    )?;
    let dqk = DeviceTensor::poisoned(stream, p.dtype, &p.qkv_shape())?;
    let dv = DeviceTensor::poisoned(stream, p.dtype, &p.qkv_shape())?;
    let padding = upload_padding(&p, mask, stream)?;
    let buckets_dev = buckets
        .map(|b| DeviceBuffer::upload_values(stream, &b.values))
        .transpose()?;
    let mut params = ffi::fk_reformer_bwd_params {
        qk: qk.view().ptr as *const c_void,
        v: v.view().ptr as *const c_void,
        out: out.view().ptr as *const c_void,
        dout: dout.view().ptr as *const c_void,
        lse: lse.view().ptr as *const f32,
        key_padding: padding
            .as_ref()
            .map_or(std::ptr::null(), |b| b.ptr() as *const u8),
        buckets: buckets_dev
            .as_ref()
            .map_or(std::ptr::null(), |b| b.ptr() as *const i32),
        dqk: dqk.view().ptr as *mut c_void,
        dv: dv.view().ptr as *mut c_void,
        workspace: std::ptr::null_mut(),
        qk_stride: bsh(qk.layout()),
        v_stride: bsh(v.layout()),
        out_stride: bsh(out.layout()),
        dout_stride: bsh(dout.layout()),
        dqk_stride: bsh(dqk.layout()),
        dv_stride: bsh(dv.layout()),
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
        device: i32_arg("device", stream.ordinal())?,
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
    // SAFETY: views of live DeviceTensors checked by the validators; the gradients, the
    // uploaded mask / buckets and the workspace are fresh.
    ffi::check(unsafe { ffi::fk_reformer_bwd(&params, stream.raw()) })?;
    Ok(ReformerGradients { dqk, dv })
}
