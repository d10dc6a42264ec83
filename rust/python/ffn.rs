//! The fused feed-forward block (issue 14) forward and backward on DLPack capsules.

use pyo3::prelude::*;

#[cfg(feature = "cuda")]
use super::caller_stream;
use super::{
    check_output_devices, check_output_size, conv_place, guarded, import, run_detached, to_py_err,
    Imported, Place,
};
use crate::error::Error;
use crate::ffn::{self, FfnActivation, FfnLayouts, FfnOptions, FfnProblem};
use crate::tensor::{DType, HostTensor, Layout};

/// The input names, in [`ffn::Inputs`]' order.
const NAMES: [&str; 7] = ["x", "w1", "w2", "w3", "b1", "b2", "b3"];

fn options(activation: &str, residual: bool) -> Result<FfnOptions, Error> {
    Ok(FfnOptions::new(FfnActivation::from_name(activation)?).residual(residual))
}

/// Validates the imported inputs (in [`NAMES`]' order) as one forward call.
fn validate(t: &[Option<Imported>; 7], opts: &FfnOptions) -> PyResult<FfnProblem> {
    let d = |i: usize| t[i].as_ref().map(|t| (t.dtype, &t.layout));
    let l = FfnLayouts {
        x: d(0).expect("x is always given"),
        w1: d(1).expect("w1 is always given"),
        w2: d(2).expect("w2 is always given"),
        w3: d(3),
        b1: d(4),
        b2: d(5),
        b3: d(6),
    };
    ffn::validate(&l, opts).map_err(to_py_err)
}

/// Imports the forward's inputs, in [`NAMES`]' order.
#[allow(clippy::too_many_arguments)]
fn import_inputs(
    x: &Bound<'_, PyAny>,
    w1: &Bound<'_, PyAny>,
    w2: &Bound<'_, PyAny>,
    w3: Option<&Bound<'_, PyAny>>,
    b1: Option<&Bound<'_, PyAny>>,
    b2: Option<&Bound<'_, PyAny>>,
    b3: Option<&Bound<'_, PyAny>>,
) -> PyResult<[Option<Imported>; 7]> {
    let opt =
        |name: &'static str, t: Option<&Bound<'_, PyAny>>| t.map(|t| import(name, t)).transpose();
    Ok([
        Some(import("x", x)?),
        Some(import("w1", w1)?),
        Some(import("w2", w2)?),
        opt("w3", w3)?,
        opt("b1", b1)?,
        opt("b2", b2)?,
        opt("b3", b3)?,
    ])
}

/// Host copies of the given inputs (strided views read element by element).
fn host_inputs(t: &[Option<Imported>]) -> PyResult<Vec<Option<HostTensor>>> {
    t.iter()
        .map(|t| {
            t.as_ref()
                .map(|t| t.to_host(t.layout.clone()))
                .transpose()
                .map_err(to_py_err)
        })
        .collect()
}

/// Device views of the given tensors (as the producer laid them out).
#[cfg(feature = "cuda")]
fn device_views(t: &[Option<Imported>; 7], ordinal: usize) -> [Option<crate::DeviceView>; 7] {
    std::array::from_fn(|i| {
        t[i].as_ref()
            .map(|t| t.device_view(t.layout.clone(), ordinal))
    })
}

/// Feed-forward forward on DLPack capsules: y = act(x W1ᵀ + b1) W2ᵀ + b2 (+ x), or,
/// gated (w3 given), y = (act(x W1ᵀ + b1) ∘ (x W3ᵀ + b3)) W2ᵀ + b2 (+ x).
///
/// x (tokens, d_model), w1 / w3 (d_hidden, d_model), w2 (d_model, d_hidden) as
/// nn.Linear stores them, biases (features,); one dtype. The caller allocates `y` (and,
/// when given, `hidden`, the hidden activation as stored between the GEMMs) on the
/// inputs' device, in x's dtype, of the shapes [`ffn_shapes`] gives; any strides.
/// `activation`: "relu", "gelu" (erf), "gelu_tanh" or "silu".
#[pyfunction]
#[pyo3(signature = (
    x, w1, w2, y, w3=None, b1=None, b2=None, b3=None, hidden=None, *, activation, residual,
    stream=0
))]
#[allow(clippy::too_many_arguments)]
pub(super) fn ffn_forward(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    w1: &Bound<'_, PyAny>,
    w2: &Bound<'_, PyAny>,
    y: &Bound<'_, PyAny>,
    w3: Option<&Bound<'_, PyAny>>,
    b1: Option<&Bound<'_, PyAny>>,
    b2: Option<&Bound<'_, PyAny>>,
    b3: Option<&Bound<'_, PyAny>>,
    hidden: Option<&Bound<'_, PyAny>>,
    activation: &str,
    residual: bool,
    stream: usize,
) -> PyResult<()> {
    guarded(|| {
        let opts = options(activation, residual).map_err(to_py_err)?;
        let ins = import_inputs(x, w1, w2, w3, b1, b2, b3)?;
        let y = import("y", y)?;
        let hidden = hidden.map(|t| import("hidden", t)).transpose()?;
        let given: Vec<&Imported> = ins.iter().flatten().collect();
        let place = conv_place(&given)?;
        let p = validate(&ins, &opts)?;
        let mut outs = vec![&y];
        outs.extend(hidden.as_ref());
        check_output_devices(&outs, given[0].device)?;
        y.check_output(p.dtype, &p.x_shape()).map_err(to_py_err)?;
        if let Some(h) = &hidden {
            h.check_output(p.dtype, &p.hidden_shape())
                .map_err(to_py_err)?;
        }
        match place {
            Place::Host => {
                let h = host_inputs(&ins)?;
                let refs: Vec<Option<&HostTensor>> = h.iter().map(Option::as_ref).collect();
                let keep = hidden.is_some();
                let o = run_detached(py, || ffn::forward_host(&p, &refs, keep))?;
                y.write_host(&o.y).map_err(to_py_err)?;
                if let (Some(dst), Some(src)) = (&hidden, &o.hidden) {
                    dst.write_host(src).map_err(to_py_err)?;
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Place::Cuda(ordinal) => {
                let views = device_views(&ins, ordinal);
                let hv = hidden
                    .as_ref()
                    .map(|t| t.device_view(t.layout.clone(), ordinal));
                let yv = y.device_view(y.layout.clone(), ordinal);
                // SAFETY: live producer memory until the `Imported`s drop after this call;
                // fresh outputs; the caller's stream, for which the inputs were exported.
                unsafe {
                    crate::ffn::cuda::launch_forward(
                        &p,
                        &views,
                        &yv,
                        hv.as_ref(),
                        ordinal,
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

/// Feed-forward backward on DLPack capsules: from the forward's inputs and dy (tokens,
/// d_model), the gradients whose outputs are given, each allocated by the caller on the
/// inputs' device in x's dtype (any strides): `dx` like x, `dw1` / `dw3` like w1, `dw2`
/// like w2, `db1` / `db3` (d_hidden), `db2` (d_model). `dw3` needs w3 and `db_i` needs
/// b_i (the gradient of an input that was not given does not exist).
#[pyfunction]
#[pyo3(signature = (
    x, w1, w2, dy, w3=None, b1=None, b2=None, b3=None, *, dx=None, dw1=None, dw2=None,
    dw3=None, db1=None, db2=None, db3=None, activation, residual, stream=0
))]
#[allow(clippy::too_many_arguments)]
pub(super) fn ffn_backward(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    w1: &Bound<'_, PyAny>,
    w2: &Bound<'_, PyAny>,
    dy: &Bound<'_, PyAny>,
    w3: Option<&Bound<'_, PyAny>>,
    b1: Option<&Bound<'_, PyAny>>,
    b2: Option<&Bound<'_, PyAny>>,
    b3: Option<&Bound<'_, PyAny>>,
    dx: Option<&Bound<'_, PyAny>>,
    dw1: Option<&Bound<'_, PyAny>>,
    dw2: Option<&Bound<'_, PyAny>>,
    dw3: Option<&Bound<'_, PyAny>>,
    db1: Option<&Bound<'_, PyAny>>,
    db2: Option<&Bound<'_, PyAny>>,
    db3: Option<&Bound<'_, PyAny>>,
    activation: &str,
    residual: bool,
    stream: usize,
) -> PyResult<()> {
    guarded(|| {
        let opts = options(activation, residual).map_err(to_py_err)?;
        let ins = import_inputs(x, w1, w2, w3, b1, b2, b3)?;
        let dy = import("dy", dy)?;
        // The gradients, in the order of the inputs they belong to (x, w1, w2, w3, b1,
        // b2, b3).
        let out_names = ["dx", "dw1", "dw2", "dw3", "db1", "db2", "db3"];
        let mut outs: Vec<Option<Imported>> = Vec::with_capacity(7);
        for (name, t) in out_names.iter().zip([dx, dw1, dw2, dw3, db1, db2, db3]) {
            outs.push(t.map(|t| import(name, t)).transpose()?);
        }
        let mut given: Vec<&Imported> = ins.iter().flatten().collect();
        given.push(&dy);
        let place = conv_place(&given)?;
        let p = validate(&ins, &opts)?;
        ffn::validate_backward(&p, (dy.dtype, &dy.layout)).map_err(to_py_err)?;
        let present: Vec<&Imported> = outs.iter().flatten().collect();
        check_output_devices(&present, given[0].device)?;
        let shapes = [
            p.x_shape(),
            p.w1_shape(),
            p.w2_shape(),
            p.w1_shape(),
            vec![p.d_hidden],
            vec![p.d_model],
            vec![p.d_hidden],
        ];
        for (i, (o, shape)) in outs.iter().zip(&shapes).enumerate() {
            if let Some(o) = o {
                if ins[i].is_none() {
                    return Err(to_py_err(Error::InvalidArgument(format!(
                        "{} is given but {} is not: there is no gradient to write",
                        out_names[i], NAMES[i]
                    ))));
                }
                o.check_output(p.dtype, shape).map_err(to_py_err)?;
            }
        }
        match place {
            Place::Host => {
                let h = host_inputs(&ins)?;
                let refs: Vec<Option<&HostTensor>> = h.iter().map(Option::as_ref).collect();
                let hdy = dy.to_host(dy.layout.clone()).map_err(to_py_err)?;
                let g = run_detached(py, || ffn::backward_host(&p, &refs, &hdy))?;
                let srcs = [
                    Some(&g.dx),
                    Some(&g.dw1),
                    Some(&g.dw2),
                    g.dw3.as_ref(),
                    g.db1.as_ref(),
                    g.db2.as_ref(),
                    g.db3.as_ref(),
                ];
                for (dst, src) in outs.iter().zip(srcs) {
                    if let (Some(dst), Some(src)) = (dst, src) {
                        dst.write_host(src).map_err(to_py_err)?;
                    }
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Place::Cuda(ordinal) => {
                let views = device_views(&ins, ordinal);
                let ov = device_views(outs.as_slice().try_into().expect("seven"), ordinal);
                let dyv = dy.device_view(dy.layout.clone(), ordinal);
                // SAFETY: as in `ffn_forward`.
                unsafe {
                    crate::ffn::cuda::launch_backward(
                        &p,
                        &views,
                        &dyv,
                        &ov,
                        ordinal,
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

/// The shapes (y, hidden) = ((tokens, d_model), (tokens, d_hidden)) of a feed-forward
/// call on inputs of the given shapes (validated: mismatched weights are refused here,
/// before the caller allocates anything).
#[pyfunction]
#[pyo3(signature = (
    x_shape, w1_shape, w2_shape, w3_shape=None, b1_shape=None, b2_shape=None, b3_shape=None,
    *, activation, residual
))]
#[allow(clippy::too_many_arguments)]
pub(super) fn ffn_shapes(
    x_shape: Vec<usize>,
    w1_shape: Vec<usize>,
    w2_shape: Vec<usize>,
    w3_shape: Option<Vec<usize>>,
    b1_shape: Option<Vec<usize>>,
    b2_shape: Option<Vec<usize>>,
    b3_shape: Option<Vec<usize>>,
    activation: &str,
    residual: bool,
) -> PyResult<(Vec<usize>, Vec<usize>)> {
    guarded(|| {
        let opts = options(activation, residual).map_err(to_py_err)?;
        let c = |s: &Vec<usize>| Layout::contiguous(s);
        let (x, w1, w2) = (c(&x_shape), c(&w1_shape), c(&w2_shape));
        let [w3, b1, b2, b3] =
            [&w3_shape, &b1_shape, &b2_shape, &b3_shape].map(|s| s.as_ref().map(c));
        fn d(l: &Option<Layout>) -> Option<(DType, &Layout)> {
            l.as_ref().map(|l| (DType::F32, l))
        }
        let p = ffn::validate(
            &FfnLayouts {
                x: (DType::F32, &x),
                w1: (DType::F32, &w1),
                w2: (DType::F32, &w2),
                w3: d(&w3),
                b1: d(&b1),
                b2: d(&b2),
                b3: d(&b3),
            },
            &opts,
        )
        .map_err(to_py_err)?;
        let (y, h) = (p.x_shape(), p.hidden_shape());
        check_output_size("the feed-forward block's hidden activation", &h).map_err(to_py_err)?;
        Ok((y, h))
    })
}
