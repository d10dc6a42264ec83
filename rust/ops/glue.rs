//! The CUDA glue every op's launch uses: ordering a launch after its inputs' streams,
//! the caller's raw stream as a [`Stream`], output view checks, the C dtype codes, and
//! stream-ordered workspaces.

use std::ffi::c_void;

use crate::device::{Device, DeviceBuffer, DeviceTensor, DeviceView, Stream};
use crate::error::{Error, Result};
use crate::ffi;
use crate::tensor::{DType, Layout};

/// Makes `stream` (the lead input's, named `lead`) wait for every other tensor's
/// stream, all on one device, without blocking the host.
pub(crate) fn order_after(
    stream: &Stream,
    lead: &str,
    others: &[(&str, &DeviceTensor)],
) -> Result<()> {
    for (name, t) in others {
        if t.stream().ordinal() != stream.ordinal() {
            return Err(Error::DeviceMismatch {
                detail: format!(
                    "{name} is on cuda:{} but {lead} is on cuda:{}",
                    t.stream().ordinal(),
                    stream.ordinal()
                ),
            });
        }
        stream.wait_for(t.stream())?;
    }
    Ok(())
}

/// The caller's raw stream (torch's, cupy's, or null) as a [`Stream`].
///
/// # Safety
/// `raw` must be a live stream of `device`'s primary context (or null).
pub(crate) unsafe fn borrowed(device: usize, raw: *mut c_void) -> Result<Stream> {
    // SAFETY: as the caller vouches.
    Ok(unsafe { Device::new(device)?.borrow_stream(raw) })
}

/// The C ABI's dtype code (`fk_dtype`; f32 is fk_conv.h's `FK_DTYPE_F32`).
pub(crate) fn dtype_arg(d: DType) -> i32 {
    match d {
        DType::F16 => ffi::fk_dtype_FK_DTYPE_F16 as i32,
        DType::BF16 => ffi::fk_dtype_FK_DTYPE_BF16 as i32,
        DType::F32 => ffi::FK_DTYPE_F32 as i32,
    }
}

/// A size as a kernel's `int32_t` parameter, or `Error::TooLarge` naming it: never a
/// wrapped value (the ops check their kernels' tighter limits first; this is the last
/// guard against an `as` cast that would wrap).
pub(crate) fn i32_arg(what: &str, value: usize) -> Result<i32> {
    i32::try_from(value).map_err(|_| Error::TooLarge {
        what: what.into(),
        value: u64::try_from(value).unwrap_or(u64::MAX),
        limit: i32::MAX as u64,
    })
}

/// Checks an output view's dtype and logical shape (any strides).
pub(crate) fn check_out(
    name: &str,
    view: &DeviceView,
    dtype: DType,
    shape: &[usize],
) -> Result<()> {
    if view.layout.shape != shape || view.layout.strides.len() != shape.len() || view.dtype != dtype
    {
        return Err(Error::ShapeMismatch {
            detail: format!(
                "{name} must be {dtype} {shape:?}, got {} {:?} strides {:?}",
                view.dtype, view.layout.shape, view.layout.strides
            ),
        });
    }
    Ok(())
}

/// Checks an output view's dtype, shape and unit last stride (rows the kernels store
/// with vector writes).
pub(crate) fn check_out_rows(
    name: &str,
    view: &DeviceView,
    dtype: DType,
    shape: &[usize],
) -> Result<()> {
    let unit_last = view.layout.strides.len() == view.layout.shape.len()
        && view.layout.strides.last() == Some(&1);
    if view.layout.shape != shape || view.dtype != dtype || !unit_last {
        return Err(Error::ShapeMismatch {
            detail: format!(
                "{name} must be {dtype} {shape:?} with unit last stride, got {} {:?} strides {:?}",
                view.dtype, view.layout.shape, view.layout.strides
            ),
        });
    }
    Ok(())
}

/// Checks that a view is contiguous (row-major in its logical order); `why` says who
/// needs it.
pub(crate) fn check_contiguous(name: &str, view: &DeviceView, why: &str) -> Result<()> {
    if view.layout != Layout::contiguous(&view.layout.shape) {
        return Err(Error::InvalidArgument(format!(
            "{name}: {why}, got shape {:?} strides {:?}",
            view.layout.shape, view.layout.strides
        )));
    }
    Ok(())
}

/// Each view on `device` (where the lead input, named `lead`, lives).
pub(crate) fn check_same_device(
    lead: &str,
    device: usize,
    views: &[(&str, &DeviceView)],
) -> Result<()> {
    for (name, view) in views {
        if view.device != device {
            return Err(Error::DeviceMismatch {
                detail: format!(
                    "{name} is on cuda:{} but {lead} is on cuda:{device}",
                    view.device
                ),
            });
        }
    }
    Ok(())
}

/// A size past a kernel's limit.
pub(crate) fn too_large(what: &str, value: usize, limit: usize) -> Error {
    Error::TooLarge {
        what: what.into(),
        value: value as u64,
        limit: limit as u64,
    }
}

/// Per-token flags (a key padding mask, (B, N) row-major) as the kernels read them: one
/// byte each, 1 = set; none when `flags` is empty (no mask). Freed in stream order when
/// dropped.
pub(crate) fn upload_flags(flags: &[bool], stream: &Stream) -> Result<Option<DeviceBuffer>> {
    if flags.is_empty() {
        return Ok(None);
    }
    let bytes: Vec<u8> = flags.iter().map(|&b| u8::from(b)).collect();
    DeviceBuffer::upload(stream, &bytes).map(Some)
}

/// An optional buffer's device pointer, null when absent (the C ABI's "not given").
pub(crate) fn ptr_or_null<T>(b: &Option<DeviceBuffer>) -> *const T {
    b.as_ref().map_or(std::ptr::null(), |b| b.ptr() as *const T)
}

/// A 256-byte aligned device workspace (or none), freed in stream order when dropped.
pub(crate) struct Workspace {
    _buf: Option<DeviceBuffer>,
    pub(crate) ptr: *mut c_void,
}

/// A workspace of `bytes` on `stream` (none for 0 bytes).
pub(crate) fn workspace(stream: &Stream, bytes: usize) -> Result<Workspace> {
    if bytes == 0 {
        return Ok(Workspace {
            _buf: None,
            ptr: std::ptr::null_mut(),
        });
    }
    // SAFETY: the kernels write every workspace byte they read.
    let buf = unsafe { DeviceBuffer::alloc(stream, bytes)? };
    let ptr = buf.ptr();
    if ptr % 256 != 0 {
        return Err(Error::Cuda(format!(
            "workspace at {ptr:#x} is not 256-byte aligned"
        )));
    }
    Ok(Workspace {
        ptr: ptr as *mut c_void,
        _buf: Some(buf),
    })
}

// ---------------------------------------------------------------------------------------
// Attention-family layouts (dense attention, Longformer): rows of (B, N, H, D) or packed
// (total, H, D) tensors, LSE of (B, H, N) or (H, total).

/// Largest grid y/z extent (heads, batch).
pub(crate) const MAX_GRID_YZ: usize = 65_535;

/// Batch and heads within the grid's y / z extents; every view on `device` with
/// 16-byte aligned rows (the kernels' cp.async and vector stores).
pub(crate) fn check_grid_and_views(
    batch: usize,
    heads: usize,
    device: usize,
    views: &[(&'static str, &DeviceView)],
) -> Result<()> {
    for (what, value) in [("batch", batch), ("heads", heads)] {
        if value > MAX_GRID_YZ {
            return Err(Error::TooLarge {
                what: what.into(),
                value: value as u64,
                limit: MAX_GRID_YZ as u64,
            });
        }
    }
    for &(name, view) in views {
        check_same_device("q", device, &[(name, view)])?;
        let elem = view.dtype.size() as u64;
        let misaligned_stride = view.layout.strides[..view.layout.strides.len() - 1]
            .iter()
            .any(|&s| (s as u64 * elem) % 16 != 0);
        if view.ptr % 16 != 0 || misaligned_stride {
            return Err(Error::InvalidArgument(format!(
                "{name}: the CUDA kernel needs 16-byte aligned rows (pointer {:#x}, strides {:?} \
                 in {}-byte elements); make the tensor contiguous",
                view.ptr, view.layout.strides, elem
            )));
        }
    }
    Ok(())
}

/// (batch, row, head) strides of a Q/K/V-like view: a packed varlen view has no
/// batch stride (its rows are located through cu_seqlens).
pub(crate) fn bsh(l: &Layout) -> ffi::fk_strides {
    let s = |i: usize| l.strides[i] as i64;
    let (batch, row, head) = if l.strides.len() == 3 {
        (0, s(0), s(1))
    } else {
        (s(0), s(1), s(2))
    };
    ffi::fk_strides { batch, row, head }
}

/// (batch, head) strides of an LSE-like view: (B, H, N) or varlen (H, total).
pub(crate) fn lse_strides(l: &Layout) -> ffi::fk_strides {
    let (batch, head) = if l.strides.len() == 2 {
        (0, l.strides[0] as i64)
    } else {
        (l.strides[0] as i64, l.strides[1] as i64)
    };
    // The kernels use only batch and head: LSE rows are contiguous.
    ffi::fk_strides {
        batch,
        row: 1,
        head,
    }
}
