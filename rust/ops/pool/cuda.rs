//! The CUDA path of pooling: checks, then the C launchers of kernels/include/fk_conv.h.

use std::ffi::c_void;

use super::{
    validate_pool, validate_pool_backward, Indices, Pool2dOptions, Pool2dOutput, Pool2dProblem,
    PoolKind,
};
use crate::device::{DeviceBuffer, DeviceTensor, DeviceView, Stream};
use crate::error::{Error, Result};
use crate::ffi;
use crate::ops::conv::cuda::{
    check_each, check_limits, check_padded_extents, check_views, padded_extent, product, strides4,
};
use crate::ops::glue::{borrowed, check_out, dtype_arg, i32_arg, order_after};
use crate::tensor::{DType, Layout};

/// Max-pooling indices in device memory (contiguous int32, y's logical shape),
/// freed in stream order when dropped.
pub struct DeviceIndices {
    buf: DeviceBuffer,
    shape: Vec<usize>,
    stream: Stream,
}

impl std::fmt::Debug for DeviceIndices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceIndices")
            .field("shape", &self.shape)
            .field("device", &self.stream.ordinal())
            .finish()
    }
}

impl DeviceIndices {
    /// Uninitialised indices of `shape` (the pooling kernel writes every element).
    fn new(stream: &Stream, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        // SAFETY: the forward kernel writes every index before any read.
        let buf = unsafe { DeviceBuffer::alloc_elems::<i32>(stream, n)? };
        Ok(DeviceIndices {
            buf,
            shape: shape.to_vec(),
            stream: stream.clone(),
        })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.buf.ptr()
    }

    /// Copies back to the host (waits for the stream).
    pub fn to_host(&self) -> Result<Vec<i32>> {
        self.buf.download_values()
    }
}

/// Max-pooling indices in memory the caller owns: contiguous int32 of `shape` (y's
/// logical shape) on `device`. The length travels with the pointer, so a short buffer
/// is refused instead of read or written past its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndicesView {
    pub ptr: u64,
    pub shape: Vec<usize>,
    pub device: usize,
}

impl DeviceIndices {
    /// The view the launch takes.
    pub fn view(&self) -> IndicesView {
        IndicesView {
            ptr: self.ptr(),
            shape: self.shape.clone(),
            device: self.stream.ordinal(),
        }
    }
}

fn pool_params(
    p: &Pool2dProblem,
    x: &DeviceView,
    y: &DeviceView,
    indices: u64,
) -> Result<ffi::fk_pool2d_params> {
    Ok(ffi::fk_pool2d_params {
        x: x.ptr as *const c_void,
        y: y.ptr as *mut c_void,
        indices: indices as *mut i32,
        x_strides: strides4(&x.layout),
        y_strides: strides4(&y.layout),
        n: i32_arg("batch", p.n)?,
        c: i32_arg("channels", p.c)?,
        h: i32_arg("height", p.h)?,
        w: i32_arg("width", p.w)?,
        p: i32_arg("out_height", p.p)?,
        q: i32_arg("out_width", p.q)?,
        kernel_h: i32_arg("kernel_size[0]", p.kernel[0])?,
        kernel_w: i32_arg("kernel_size[1]", p.kernel[1])?,
        stride_h: i32_arg("stride[0]", p.stride[0])?,
        stride_w: i32_arg("stride[1]", p.stride[1])?,
        pad_h: i32_arg("padding[0]", p.padding[0])?,
        pad_w: i32_arg("padding[1]", p.padding[1])?,
        dil_h: i32_arg("dilation[0]", p.dilation[0])?,
        dil_w: i32_arg("dilation[1]", p.dilation[1])?,
        count_include_pad: p.count_include_pad as i32,
        divisor: p
            .divisor_override
            .map_or(Ok(0), |d| i32_arg("divisor_override", d))?,
        kind: (match p.kind {
            PoolKind::Max => ffi::fk_pool_kind_FK_POOL_MAX,
            PoolKind::Avg => ffi::fk_pool_kind_FK_POOL_AVG,
        }) as i32,
        dtype: dtype_arg(p.dtype),
        device: i32_arg("device", x.device)?,
    })
}

/// The sizes the pooling kernels' 32-bit arithmetic needs: planes, padded extents
/// (window positions, [`check_padded_extents`]) and, for average pooling, the window's
/// area clipped to the padded input (its divisor).
pub fn check_pool_limits(p: &Pool2dProblem) -> Result<()> {
    check_limits(&[("batch", p.n), ("channels", p.c)])?;
    let max = i32::MAX as u64;
    check_each(&[
        ("height * width", product(&[p.h, p.w]), max),
        ("out_height * out_width", product(&[p.p, p.q]), max),
    ])?;
    check_padded_extents(p.h, p.w, p.padding)?;
    if p.kind == PoolKind::Avg {
        // Both padded extents are at most 2^30 here, so the product cannot overflow.
        let clipped = |k: usize, size: usize, pad: usize| (k as u64).min(padded_extent(size, pad));
        let area =
            clipped(p.kernel[0], p.h, p.padding[0]) * clipped(p.kernel[1], p.w, p.padding[1]);
        check_each(&[("average pooling window area", area, max)])?;
    }
    Ok(())
}

/// Checks a pooling call's views: y (or dy) of y's shape, x (or dx) of x's, sizes,
/// devices; for max pooling, indices of y's shape on x's device, 4-byte aligned.
/// Returns the indices pointer the kernel gets (null for average pooling).
fn check_pool(
    p: &Pool2dProblem,
    (xname, x): (&'static str, &DeviceView),
    (yname, y): (&'static str, &DeviceView),
    indices: Option<&IndicesView>,
) -> Result<u64> {
    check_out(xname, x, p.dtype, &p.x_shape())?;
    check_out(yname, y, p.dtype, &p.y_shape())?;
    check_pool_limits(p)?;
    check_views(x.device, &[(xname, x), (yname, y)])?;
    if p.kind == PoolKind::Avg {
        return Ok(0);
    }
    let Some(i) = indices else {
        return Err(Error::InvalidArgument(
            "indices: max pooling needs an int32 indices buffer".into(),
        ));
    };
    if i.shape != p.y_shape() {
        return Err(Error::ShapeMismatch {
            detail: format!(
                "indices has shape {:?}, expected {:?} (the pooled output's)",
                i.shape,
                p.y_shape()
            ),
        });
    }
    if i.device != x.device {
        return Err(Error::DeviceMismatch {
            detail: format!(
                "indices are on cuda:{} but {xname} is on cuda:{}",
                i.device, x.device
            ),
        });
    }
    if i.ptr == 0 || i.ptr % 4 != 0 {
        return Err(Error::InvalidArgument(format!(
            "indices: max pooling needs a 4-byte aligned int32 buffer, got pointer {:#x}",
            i.ptr
        )));
    }
    Ok(i.ptr)
}

fn pool_forward(
    kind: PoolKind,
    x: &DeviceTensor,
    opts: &Pool2dOptions,
) -> Result<(DeviceTensor, Option<DeviceIndices>)> {
    let p = validate_pool(kind, (x.dtype(), x.layout()), opts)?;
    let stream = x.stream();
    let y = DeviceTensor::poisoned(stream, p.dtype, &p.y_shape())?;
    let idx = (kind == PoolKind::Max)
        .then(|| DeviceIndices::new(stream, &p.y_shape()))
        .transpose()?;
    let iv = idx.as_ref().map(DeviceIndices::view);
    // SAFETY: views of live tensors; the outputs are fresh.
    unsafe { launch_pool(&p, &x.view(), &y.view(), iv.as_ref(), || Ok(stream.clone()))? };
    Ok((y, idx))
}

/// Allocates y and the indices and runs max pooling on x's stream.
pub fn max_pool2d(x: &DeviceTensor, opts: &Pool2dOptions) -> Result<Pool2dOutput<DeviceTensor>> {
    let (y, idx) = pool_forward(PoolKind::Max, x, opts)?;
    Ok(Pool2dOutput {
        y,
        indices: idx.map(Indices::Cuda),
    })
}

/// Allocates y and runs average pooling on x's stream.
pub fn avg_pool2d(x: &DeviceTensor, opts: &Pool2dOptions) -> Result<DeviceTensor> {
    Ok(pool_forward(PoolKind::Avg, x, opts)?.0)
}

/// Runs pooling on device memory the caller owns: y, and for max pooling the int32
/// `indices` (contiguous, y's logical shape; ignored for average pooling).
///
/// # Safety
/// As [`crate::conv::cuda::conv2d_forward_views`]; `indices` must describe live int32
/// memory of its shape on x's device.
pub unsafe fn pool2d_forward_views(
    kind: PoolKind,
    x: &DeviceView,
    y: &DeviceView,
    indices: Option<&IndicesView>,
    opts: &Pool2dOptions,
    stream: *mut c_void,
) -> Result<()> {
    let p = validate_pool(kind, (x.dtype, &x.layout), opts)?;
    // SAFETY: forwarded from the caller.
    unsafe { launch_pool(&p, x, y, indices, || borrowed(x.device, stream)) }
}

/// # Safety
/// As [`pool2d_forward_views`].
pub(crate) unsafe fn launch_pool(
    p: &Pool2dProblem,
    x: &DeviceView,
    y: &DeviceView,
    indices: Option<&IndicesView>,
    stream: impl FnOnce() -> Result<Stream>,
) -> Result<()> {
    let indices = check_pool(p, ("x", x), ("y", y), indices)?;
    let params = pool_params(p, x, y, indices)?;
    let stream = &stream()?;
    // SAFETY: params were validated above; the caller vouches for the memory.
    let code = unsafe { ffi::fk_pool2d_fwd(&params, stream.raw()) };
    ffi::check(code)
}

fn pool_backward(
    kind: PoolKind,
    x: &DeviceTensor,
    dy: &DeviceTensor,
    indices: Option<&DeviceIndices>,
    opts: &Pool2dOptions,
) -> Result<DeviceTensor> {
    let p = validate_pool(kind, (x.dtype(), x.layout()), opts)?;
    validate_pool_backward(&p, (dy.dtype(), dy.layout()))?;
    let stream = x.stream();
    order_after(stream, "x", &[("dy", dy)])?;
    if let Some(i) = indices {
        if i.shape() != p.y_shape() {
            return Err(Error::ShapeMismatch {
                detail: format!(
                    "indices has shape {:?}, expected {:?}",
                    i.shape(),
                    p.y_shape()
                ),
            });
        }
        if i.stream().ordinal() != stream.ordinal() {
            return Err(Error::DeviceMismatch {
                detail: format!(
                    "indices are on cuda:{} but x is on cuda:{}",
                    i.stream().ordinal(),
                    stream.ordinal()
                ),
            });
        }
        stream.wait_for(i.stream())?;
    }
    let dx = DeviceTensor::poisoned(stream, p.dtype, &p.x_shape())?;
    let iv = indices.map(DeviceIndices::view);
    // SAFETY: views of live tensors; dx is fresh.
    unsafe {
        launch_pool_backward(&p, &dy.view(), iv.as_ref(), &dx.view(), || {
            Ok(stream.clone())
        })?
    };
    Ok(dx)
}

/// Max pooling backward on x's stream (`x` gives the geometry).
pub fn max_pool2d_backward(
    x: &DeviceTensor,
    dy: &DeviceTensor,
    indices: &DeviceIndices,
    opts: &Pool2dOptions,
) -> Result<DeviceTensor> {
    pool_backward(PoolKind::Max, x, dy, Some(indices), opts)
}

/// Average pooling backward on x's stream (`x` gives the geometry).
pub fn avg_pool2d_backward(
    x: &DeviceTensor,
    dy: &DeviceTensor,
    opts: &Pool2dOptions,
) -> Result<DeviceTensor> {
    pool_backward(PoolKind::Avg, x, dy, None, opts)
}

/// Pooling backward on device memory the caller owns: dx (x's logical shape, `x` gives
/// the geometry and dtype) from dy and, for max pooling, the forward's indices.
///
/// # Safety
/// As [`pool2d_forward_views`]; dx must not overlap dy or the indices.
pub unsafe fn pool2d_backward_views(
    kind: PoolKind,
    x: (DType, &Layout),
    dy: &DeviceView,
    indices: Option<&IndicesView>,
    dx: &DeviceView,
    opts: &Pool2dOptions,
    stream: *mut c_void,
) -> Result<()> {
    let p = validate_pool(kind, x, opts)?;
    validate_pool_backward(&p, (dy.dtype, &dy.layout))?;
    // SAFETY: forwarded from the caller.
    unsafe { launch_pool_backward(&p, dy, indices, dx, || borrowed(dy.device, stream)) }
}

/// # Safety
/// As [`pool2d_backward_views`].
pub(crate) unsafe fn launch_pool_backward(
    p: &Pool2dProblem,
    dy: &DeviceView,
    indices: Option<&IndicesView>,
    dx: &DeviceView,
    stream: impl FnOnce() -> Result<Stream>,
) -> Result<()> {
    let indices = check_pool(p, ("dx", dx), ("dy", dy), indices)?;
    let params = ffi::fk_pool2d_bwd_params {
        dy: dy.ptr as *const c_void,
        indices: indices as *const i32,
        dx: dx.ptr as *mut c_void,
        fwd: pool_params(p, dx, dy, 0)?,
    };
    let stream = &stream()?;
    // SAFETY: params were validated above; the caller vouches for the memory.
    let code = unsafe { ffi::fk_pool2d_bwd(&params, stream.raw()) };
    ffi::check(code)
}
