//! 2-D max / average pooling forward and backward on DLPack capsules.

use pyo3::prelude::*;

use super::dlpack::Indices;
#[cfg(feature = "cuda")]
use super::{caller_stream, Imported};
use super::{
    check_output_devices, check_output_size, conv_place, device_name, guarded, import,
    run_detached, to_py_err, DLDevice, Place,
};
use crate::error::Error;
use crate::pool;
use crate::tensor::{DType, Layout};

#[allow(clippy::too_many_arguments)]
fn pool_options(
    kernel_size: [usize; 2],
    stride: Option<[usize; 2]>,
    padding: [usize; 2],
    dilation: [usize; 2],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: Option<usize>,
) -> pool::Pool2dOptions {
    pool::Pool2dOptions {
        kernel_size,
        stride,
        padding,
        dilation,
        ceil_mode,
        count_include_pad,
        divisor_override,
    }
}

fn pool_kind(kind: &str) -> Result<pool::PoolKind, Error> {
    match kind {
        "max" => Ok(pool::PoolKind::Max),
        "avg" => Ok(pool::PoolKind::Avg),
        _ => Err(Error::InvalidArgument(format!(
            "pooling kind must be \"max\" or \"avg\", got {kind:?}"
        ))),
    }
}

/// 2-D pooling forward on DLPack capsules, torch's max_pool2d / avg_pool2d semantics.
/// `kind`: "max" or "avg". The caller allocates every output on the inputs' device
/// (shapes from [`pool2d_output_shape`]): `y` (N, C, P, Q) in x's dtype, any strides,
/// and for max pooling `indices`, contiguous int32 of y's shape, written with each
/// window's argmax as h * W + w.
#[pyfunction]
#[pyo3(signature = (
    x, y, indices=None, *, kind, kernel_size, stride, padding, dilation, ceil_mode,
    count_include_pad=true, divisor_override=None, stream=0
))]
#[allow(clippy::too_many_arguments)]
pub(super) fn pool2d_forward(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    y: &Bound<'_, PyAny>,
    indices: Option<&Bound<'_, PyAny>>,
    kind: &str,
    kernel_size: [usize; 2],
    stride: Option<[usize; 2]>,
    padding: [usize; 2],
    dilation: [usize; 2],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: Option<usize>,
    stream: usize,
) -> PyResult<()> {
    guarded(|| {
        let kind = pool_kind(kind).map_err(to_py_err)?;
        let opts = pool_options(
            kernel_size,
            stride,
            padding,
            dilation,
            ceil_mode,
            count_include_pad,
            divisor_override,
        );
        let x = import("x", x)?;
        let y = import("y", y)?;
        let indices = indices.map(|i| Indices::import("indices", i)).transpose()?;
        let place = conv_place(&[&x])?;
        let p = pool::validate_pool(kind, (x.dtype, &x.layout), &opts).map_err(to_py_err)?;
        check_output_devices(&[&y], x.device)?;
        y.check_output(p.dtype, &p.y_shape()).map_err(to_py_err)?;
        let indices = check_indices(kind, indices, x.device, &p.y_shape(), true)?;
        match place {
            Place::Host => {
                let hx = x.to_host(x.layout.clone()).map_err(to_py_err)?;
                let (hy, idx) = run_detached(py, || pool::forward_host(&p, &hx))?;
                y.write_host(&hy).map_err(to_py_err)?;
                // check_indices: indices are given exactly for max pooling, which has them.
                if let (Some(out), Some(idx)) = (&indices, &idx) {
                    let idx = idx.to_host().map_err(to_py_err)?;
                    out.write_host(&p.y_shape(), &idx).map_err(to_py_err)?;
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Place::Cuda(ordinal) => {
                let v = |t: &Imported| t.device_view(t.layout.clone(), ordinal);
                let iv = indices.as_ref().map(|i| i.device_view(ordinal));
                // SAFETY: as in `conv2d_forward`; the indices describe their own extent.
                unsafe {
                    pool::cuda::launch_pool(
                        &p,
                        &v(&x),
                        &v(&y),
                        iv.as_ref(),
                        caller_stream(ordinal, stream),
                    )
                }
                .map_err(to_py_err)
            }
            #[cfg(not(feature = "cuda"))]
            Place::Cuda(_) => {
                let _ = stream;
                Err(to_py_err(Error::CudaNotBuilt))
            }
        }
    })
}

/// Max pooling needs int32 indices of y's shape where the tensors are; average pooling
/// takes none.
fn check_indices(
    kind: pool::PoolKind,
    indices: Option<Indices>,
    device: DLDevice,
    y_shape: &[usize],
    output: bool,
) -> PyResult<Option<Indices>> {
    match (kind, indices) {
        (pool::PoolKind::Avg, None) => Ok(None),
        (pool::PoolKind::Avg, Some(_)) => Err(to_py_err(Error::InvalidArgument(
            "indices: average pooling takes no indices".into(),
        ))),
        (pool::PoolKind::Max, None) => Err(to_py_err(Error::InvalidArgument(
            "indices: max pooling needs an int32 indices tensor of the output's shape".into(),
        ))),
        (pool::PoolKind::Max, Some(i)) => {
            if i.device() != device {
                return Err(to_py_err(Error::DeviceMismatch {
                    detail: format!(
                        "indices are on {}, the inputs are on {}",
                        device_name(i.device()),
                        device_name(device)
                    ),
                }));
            }
            i.check(y_shape, output).map_err(to_py_err)?;
            Ok(Some(i))
        }
    }
}

/// 2-D pooling backward on DLPack capsules: `dx` (the caller's allocation, of the
/// forward's x shape, in dy's dtype, any strides) from `dy` and, for max pooling, the
/// forward's int32 `indices` (y's shape, same device).
#[pyfunction]
#[pyo3(signature = (
    dy, dx, indices=None, *, kind, kernel_size, stride, padding, dilation, ceil_mode,
    count_include_pad=true, divisor_override=None, stream=0
))]
#[allow(clippy::too_many_arguments)]
pub(super) fn pool2d_backward(
    py: Python<'_>,
    dy: &Bound<'_, PyAny>,
    dx: &Bound<'_, PyAny>,
    indices: Option<&Bound<'_, PyAny>>,
    kind: &str,
    kernel_size: [usize; 2],
    stride: Option<[usize; 2]>,
    padding: [usize; 2],
    dilation: [usize; 2],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: Option<usize>,
    stream: usize,
) -> PyResult<()> {
    guarded(|| {
        let kind = pool_kind(kind).map_err(to_py_err)?;
        let opts = pool_options(
            kernel_size,
            stride,
            padding,
            dilation,
            ceil_mode,
            count_include_pad,
            divisor_override,
        );
        let dy = import("dy", dy)?;
        let dx = import("dx", dx)?;
        let indices = indices.map(|i| Indices::import("indices", i)).transpose()?;
        let place = conv_place(&[&dy])?;
        // dx has the forward's x geometry.
        let x_layout = Layout::contiguous(&dx.layout.shape);
        let p = pool::validate_pool(kind, (dy.dtype, &x_layout), &opts).map_err(to_py_err)?;
        pool::validate_pool_backward(&p, (dy.dtype, &dy.layout)).map_err(to_py_err)?;
        check_output_devices(&[&dx], dy.device)?;
        dx.check_output(p.dtype, &p.x_shape()).map_err(to_py_err)?;
        let indices = check_indices(kind, indices, dy.device, &p.y_shape(), false)?;
        match place {
            Place::Host => {
                let hdy = dy.to_host(dy.layout.clone()).map_err(to_py_err)?;
                let idx = indices
                    .map(|i| i.read_host(&p.y_shape()))
                    .transpose()
                    .map_err(to_py_err)?;
                let g = run_detached(py, || pool::backward_host(&p, &hdy, idx.as_deref()))?;
                dx.write_host(&g).map_err(to_py_err)
            }
            #[cfg(feature = "cuda")]
            Place::Cuda(ordinal) => {
                let v = |t: &Imported| t.device_view(t.layout.clone(), ordinal);
                let iv = indices.as_ref().map(|i| i.device_view(ordinal));
                // SAFETY: as in `conv2d_forward`; the indices describe their own extent.
                unsafe {
                    pool::cuda::launch_pool_backward(
                        &p,
                        &v(&dy),
                        iv.as_ref(),
                        &v(&dx),
                        caller_stream(ordinal, stream),
                    )
                }
                .map_err(to_py_err)
            }
            #[cfg(not(feature = "cuda"))]
            Place::Cuda(_) => {
                let _ = stream;
                Err(to_py_err(Error::CudaNotBuilt))
            }
        }
    })
}

/// The output shape (N, C, P, Q) of a pooling call (validated), to size the indices.
#[pyfunction]
#[pyo3(signature = (
    input_shape, *, kind, kernel_size, stride, padding, dilation, ceil_mode,
    count_include_pad=true, divisor_override=None
))]
#[allow(clippy::too_many_arguments)]
pub(super) fn pool2d_output_shape(
    input_shape: Vec<usize>,
    kind: &str,
    kernel_size: [usize; 2],
    stride: Option<[usize; 2]>,
    padding: [usize; 2],
    dilation: [usize; 2],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: Option<usize>,
) -> PyResult<Vec<usize>> {
    guarded(|| {
        let kind = pool_kind(kind).map_err(to_py_err)?;
        let opts = pool_options(
            kernel_size,
            stride,
            padding,
            dilation,
            ceil_mode,
            count_include_pad,
            divisor_override,
        );
        let l = Layout::contiguous(&input_shape);
        let p = pool::validate_pool(kind, (DType::F32, &l), &opts).map_err(to_py_err)?;
        let y = p.y_shape();
        check_output_size("the pooling output", &y).map_err(to_py_err)?;
        Ok(y)
    })
}
