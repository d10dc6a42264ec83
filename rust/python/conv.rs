//! Conv2d forward and backward on DLPack capsules.

use pyo3::prelude::*;

#[cfg(feature = "cuda")]
use super::caller_stream;
use super::{
    check_output_devices, check_output_size, conv_place, guarded, import, run_detached, to_py_err,
    Imported, Place,
};
use crate::conv;
use crate::error::Error;
use crate::tensor::{DType, Layout};

/// Parses the options of a convolution from Python values.
#[allow(clippy::too_many_arguments)]
fn conv_options(
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
    activation: Option<&str>,
    algo: Option<&str>,
) -> Result<conv::Conv2dOptions, Error> {
    Ok(conv::Conv2dOptions {
        stride,
        padding,
        dilation,
        groups,
        activation: conv::Activation::from_name(activation.unwrap_or("none"))?,
        algo: algo.map(conv::ConvAlgo::from_name).transpose()?,
    })
}

/// Conv2d forward on DLPack capsules: y = act(conv(x, weight) + bias), torch's
/// semantics, x (N, C, H, W) and weight (K, C / groups, R, S) in any memory order.
///
/// The caller allocates the outputs on the inputs' device, in x's dtype, of the shape
/// [`conv2d_output_shape`] gives: `y` and, when given, `y_pre` (conv + bias, what the
/// backward of an activation needs); any strides (channels-last outputs are fine).
/// `activation`: None, "relu", "gelu" (exact) or "silu". `algo`: None (flashkernels
/// chooses), "im2col" or "implicit_gemm" (CUDA only). CUDA work is queued on `stream`
/// and not synchronized.
#[pyfunction]
#[pyo3(signature = (
    x, weight, bias, y, y_pre=None, *, stride, padding, dilation, groups, activation=None,
    algo=None, stream=0
))]
#[allow(clippy::too_many_arguments)]
pub(super) fn conv2d_forward(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    weight: &Bound<'_, PyAny>,
    bias: Option<&Bound<'_, PyAny>>,
    y: &Bound<'_, PyAny>,
    y_pre: Option<&Bound<'_, PyAny>>,
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
    activation: Option<&str>,
    algo: Option<&str>,
    stream: usize,
) -> PyResult<()> {
    guarded(|| {
        let opts =
            conv_options(stride, padding, dilation, groups, activation, algo).map_err(to_py_err)?;
        let x = import("x", x)?;
        let w = import("weight", weight)?;
        let b = bias.map(|b| import("bias", b)).transpose()?;
        let y = import("y", y)?;
        let y_pre = y_pre.map(|t| import("y_pre", t)).transpose()?;
        let keep_pre = y_pre.is_some();
        let mut ins = vec![&x, &w];
        ins.extend(b.as_ref());
        let place = conv_place(&ins)?;
        let p = conv::validate(
            (x.dtype, &x.layout),
            (w.dtype, &w.layout),
            b.as_ref().map(|b| (b.dtype, &b.layout)),
            &opts,
        )
        .map_err(to_py_err)?;
        let mut outs = vec![&y];
        outs.extend(y_pre.as_ref());
        check_output_devices(&outs, x.device)?;
        for o in &outs {
            o.check_output(p.dtype, &p.y_shape()).map_err(to_py_err)?;
        }
        match place {
            Place::Host => {
                let hx = x.to_host(x.layout.clone()).map_err(to_py_err)?;
                let hw = w.to_host(w.layout.clone()).map_err(to_py_err)?;
                let hb = b
                    .as_ref()
                    .map(|b| b.to_host(b.layout.clone()))
                    .transpose()
                    .map_err(to_py_err)?;
                let o = run_detached(py, || {
                    conv::forward_host(&p, &hx, &hw, hb.as_ref(), keep_pre)
                })?;
                y.write_host(&o.y).map_err(to_py_err)?;
                if let (Some(dst), Some(src)) = (&y_pre, &o.y_pre) {
                    dst.write_host(src).map_err(to_py_err)?;
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Place::Cuda(ordinal) => {
                let v = |t: &Imported| t.device_view(t.layout.clone(), ordinal);
                let bv = b.as_ref().map(v);
                let pv = y_pre.as_ref().map(v);
                // SAFETY: live producer memory until the `Imported`s drop after this call;
                // fresh outputs; the caller's stream, for which the inputs were exported.
                unsafe {
                    conv::cuda::launch_forward(
                        &p,
                        [&v(&x), &v(&w), &v(&y)],
                        bv.as_ref(),
                        pv.as_ref(),
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

/// Conv2d backward on DLPack capsules: from x, weight and dy (the gradient of conv + bias,
/// before any activation), the gradients whose outputs are given: `dx` like x's logical
/// shape, `dweight` like weight's, `dbias` (K), each allocated by the caller on the
/// inputs' device in x's dtype (any strides).
#[pyfunction]
#[pyo3(signature = (
    x, weight, dy, dx=None, dweight=None, dbias=None, *, stride, padding, dilation, groups,
    algo=None, stream=0
))]
#[allow(clippy::too_many_arguments)]
pub(super) fn conv2d_backward(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    weight: &Bound<'_, PyAny>,
    dy: &Bound<'_, PyAny>,
    dx: Option<&Bound<'_, PyAny>>,
    dweight: Option<&Bound<'_, PyAny>>,
    dbias: Option<&Bound<'_, PyAny>>,
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
    algo: Option<&str>,
    stream: usize,
) -> PyResult<()> {
    guarded(|| {
        let opts =
            conv_options(stride, padding, dilation, groups, None, algo).map_err(to_py_err)?;
        let x = import("x", x)?;
        let w = import("weight", weight)?;
        let dy = import("dy", dy)?;
        let outs = [
            dx.map(|t| import("dx", t)).transpose()?,
            dweight.map(|t| import("dweight", t)).transpose()?,
            dbias.map(|t| import("dbias", t)).transpose()?,
        ];
        let place = conv_place(&[&x, &w, &dy])?;
        let p = conv::validate((x.dtype, &x.layout), (w.dtype, &w.layout), None, &opts)
            .map_err(to_py_err)?;
        conv::validate_backward(&p, (dy.dtype, &dy.layout)).map_err(to_py_err)?;
        let grads = conv::ConvGrads {
            input: outs[0].is_some(),
            weight: outs[1].is_some(),
            bias: outs[2].is_some(),
        };
        let shapes = [p.x_shape(), p.weight_shape(), vec![p.k]];
        let present: Vec<&Imported> = outs.iter().flatten().collect();
        check_output_devices(&present, x.device)?;
        for (o, shape) in outs.iter().zip(&shapes) {
            if let Some(o) = o {
                o.check_output(p.dtype, shape).map_err(to_py_err)?;
            }
        }
        match place {
            Place::Host => {
                let h = |t: &Imported| t.to_host(t.layout.clone()).map_err(to_py_err);
                let (hx, hw, hdy) = (h(&x)?, h(&w)?, h(&dy)?);
                let g = run_detached(py, || conv::backward_host(&p, [&hx, &hw, &hdy], grads))?;
                for (dst, src) in outs.iter().zip([&g.dx, &g.dweight, &g.dbias]) {
                    if let (Some(dst), Some(src)) = (dst, src) {
                        dst.write_host(src).map_err(to_py_err)?;
                    }
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Place::Cuda(ordinal) => {
                let v = |t: &Imported| t.device_view(t.layout.clone(), ordinal);
                let ov: Vec<Option<crate::DeviceView>> =
                    outs.iter().map(|o| o.as_ref().map(v)).collect();
                // SAFETY: as in `conv2d_forward`.
                unsafe {
                    conv::cuda::launch_backward(
                        &p,
                        [&v(&x), &v(&w), &v(&dy)],
                        [ov[0].as_ref(), ov[1].as_ref(), ov[2].as_ref()],
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

/// The output shape (N, K, P, Q) of a convolution of x (N, C, H, W) by weight
/// (K, C / groups, R, S) (validated), for the caller to allocate y.
#[pyfunction]
#[pyo3(signature = (x_shape, weight_shape, *, stride, padding, dilation, groups))]
pub(super) fn conv2d_output_shape(
    x_shape: Vec<usize>,
    weight_shape: Vec<usize>,
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
) -> PyResult<Vec<usize>> {
    guarded(|| {
        let opts =
            conv_options(stride, padding, dilation, groups, None, None).map_err(to_py_err)?;
        let (x, w) = (
            Layout::contiguous(&x_shape),
            Layout::contiguous(&weight_shape),
        );
        let p =
            conv::validate((DType::F32, &x), (DType::F32, &w), None, &opts).map_err(to_py_err)?;
        let y = p.y_shape();
        check_output_size("conv2d's output", &y).map_err(to_py_err)?;
        Ok(y)
    })
}
