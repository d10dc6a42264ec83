//! Longformer attention on DLPack capsules (the op of `crate::longformer`).
//!
//! Tensors are (B, N, H, D). Masks arrive as host data (the work lists are built on the
//! host from them): `(bytes, shape)` with one byte per token, nonzero = set; global tokens
//! may instead be given as per-sequence index lists.

use pyo3::prelude::*;

#[cfg(feature = "cuda")]
use super::{caller_stream, check_cuda_device};
use super::{
    check_output_devices, common_place, guarded, import, import_f32, run_detached, scale_f32,
    to_mask, to_py_err, Imported, MaskArg, Place,
};
use crate::error::Error;
use crate::longformer::{self, GlobalProjections, LongformerOptions, LongformerProblem, TokenMask};
use crate::tensor::{DType, HostTensor};

fn options(
    window: i64,
    dilation: Vec<i64>,
    causal: bool,
    scale: Option<f64>,
) -> PyResult<LongformerOptions> {
    if window < 0 {
        return Err(to_py_err(Error::InvalidArgument(format!(
            "window must be >= 0 (one-sided), got {window}"
        ))));
    }
    if let Some(&d) = dilation.iter().find(|&&d| d < 1) {
        return Err(to_py_err(Error::InvalidArgument(format!(
            "dilation must be >= 1, got {d} in {dilation:?}"
        ))));
    }
    if dilation.is_empty() {
        return Err(to_py_err(Error::InvalidArgument(
            "dilation: give one value, or one per head".into(),
        )));
    }
    Ok(LongformerOptions {
        window: window as usize,
        dilation: dilation.into_iter().map(|d| d as usize).collect(),
        causal,
        scale: scale_f32(scale)?,
    })
}

/// The masks of a call: global tokens from a mask or from index lists (not both).
fn masks(
    q: &Imported,
    global_mask: MaskArg,
    global_indices: Option<Vec<Vec<i64>>>,
    padding_mask: MaskArg,
) -> PyResult<(Option<TokenMask>, Option<TokenMask>)> {
    let global = match (global_mask, global_indices) {
        (Some(_), Some(_)) => {
            return Err(to_py_err(Error::InvalidArgument(
                "give global tokens as a mask or as indices, not both".into(),
            )))
        }
        (Some(m), None) => to_mask(Some(m)),
        (None, Some(ix)) => {
            let shape = &q.layout.shape;
            if shape.len() != 4 {
                // validate() reports the rank error.
                None
            } else {
                Some(TokenMask::from_indices(shape[0], shape[1], &ix).map_err(to_py_err)?)
            }
        }
        (None, None) => None,
    };
    Ok((global, to_mask(padding_mask)))
}

fn validate(
    t: &[Imported],
    global: Option<&TokenMask>,
    padding: Option<&TokenMask>,
    opts: &LongformerOptions,
) -> PyResult<LongformerProblem> {
    let lay = |i: usize| (t[i].dtype, &t[i].layout);
    let globals = (t.len() == 6).then(|| [lay(3), lay(4), lay(5)]);
    longformer::validate(lay(0), lay(1), lay(2), globals, global, padding, opts).map_err(to_py_err)
}

/// Imports q, k, v and, when all three are given, the global projections.
fn import_inputs(
    qkv: [&Bound<'_, PyAny>; 3],
    globals: [Option<&Bound<'_, PyAny>>; 3],
) -> PyResult<Vec<Imported>> {
    let mut t = vec![
        import("q", qkv[0])?,
        import("k", qkv[1])?,
        import("v", qkv[2])?,
    ];
    match globals {
        [Some(a), Some(b), Some(c)] => t.extend([
            import("q_global", a)?,
            import("k_global", b)?,
            import("v_global", c)?,
        ]),
        [None, None, None] => {}
        _ => {
            return Err(to_py_err(Error::InvalidArgument(
                "q_global, k_global and v_global must be given together".into(),
            )))
        }
    }
    Ok(t)
}

fn host(t: &Imported) -> PyResult<HostTensor> {
    t.to_host(t.layout.clone()).map_err(to_py_err)
}

#[cfg(feature = "cuda")]
fn view(t: &Imported, ordinal: usize) -> crate::DeviceView {
    t.device_view(t.layout.clone(), ordinal)
}

/// Longformer forward on DLPack capsules.
///
/// `q`, `k`, `v` (and optionally `q_global`, `k_global`, `v_global` for global rows):
/// (B, N, H, D) capsules (or `(capsule, "bfloat16")`). `window`: one-sided w >= 0;
/// `dilation`: one value or one per head; `global_mask` / `padding_mask`: `(bytes, shape)`
/// host masks (B, N); `global_indices`: per-sequence global token indices instead of
/// `global_mask`. The caller allocates the outputs on the inputs' device, of the shapes
/// [`longformer_shapes`] gives: `out` like q, `lse` float32 (B, H, N) contiguous. CUDA
/// work is queued on `stream` and not synchronized.
#[pyfunction]
#[pyo3(signature = (
    q, k, v, out, lse, *, window, dilation, causal=false, scale=None, global_mask=None,
    global_indices=None, padding_mask=None, q_global=None, k_global=None, v_global=None,
    stream=0
))]
#[allow(clippy::too_many_arguments)]
pub(super) fn longformer_forward(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    window: i64,
    dilation: Vec<i64>,
    causal: bool,
    scale: Option<f64>,
    global_mask: MaskArg,
    global_indices: Option<Vec<Vec<i64>>>,
    padding_mask: MaskArg,
    q_global: Option<&Bound<'_, PyAny>>,
    k_global: Option<&Bound<'_, PyAny>>,
    v_global: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    guarded(|| {
        let opts = options(window, dilation, causal, scale)?;
        let t = import_inputs([q, k, v], [q_global, k_global, v_global])?;
        let (out, lse) = (import("out", out)?, import_f32("lse", lse)?);
        let (gm, pm) = masks(&t[0], global_mask, global_indices, padding_mask)?;
        let refs: Vec<&Imported> = t.iter().collect();
        let place = common_place(&refs)?;
        let p = validate(&t, gm.as_ref(), pm.as_ref(), &opts)?;
        #[cfg(feature = "cuda")]
        if let Place::Cuda(ordinal) = place {
            check_cuda_device(ordinal).map_err(to_py_err)?;
        }
        #[cfg(not(feature = "cuda"))]
        if let Place::Cuda(_) = place {
            let _ = stream;
            return Err(to_py_err(Error::CudaNotBuilt));
        }
        check_output_devices(&[&out, &lse], t[0].device)?;
        out.check_output(p.dtype, &p.qkv_shape())
            .map_err(to_py_err)?;
        lse.check_output(DType::F32, &p.lse_shape())
            .map_err(to_py_err)?;
        match place {
            Place::Host => {
                let h = t.iter().map(host).collect::<PyResult<Vec<_>>>()?;
                let result = run_detached(py, || {
                    let globals = (h.len() == 6).then(|| GlobalProjections {
                        q: &h[3],
                        k: &h[4],
                        v: &h[5],
                    });
                    longformer::forward_host(&p, [&h[0], &h[1], &h[2]], globals)
                })?;
                out.write_host(&result.out).map_err(to_py_err)?;
                lse.write_host(&result.lse).map_err(to_py_err)?;
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Place::Cuda(ordinal) => {
                let v: Vec<_> = t.iter().map(|x| view(x, ordinal)).collect();
                let globals = (v.len() == 6).then(|| [&v[3], &v[4], &v[5]]);
                // SAFETY: the views describe live memory held by their producers until the
                // `Imported`s drop after this call; the outputs are fresh allocations; the
                // caller passes its framework's current stream of this device (or 0).
                unsafe {
                    longformer::cuda::launch_forward(
                        &p,
                        [&v[0], &v[1], &v[2]],
                        globals,
                        [&view(&out, ordinal), &view(&lse, ordinal)],
                        caller_stream(ordinal, stream),
                    )
                }
                .map_err(to_py_err)
            }
            #[cfg(not(feature = "cuda"))]
            Place::Cuda(_) => Err(to_py_err(Error::CudaNotBuilt)),
        }
    })
}

/// Longformer backward on DLPack capsules: the gradients of q, k, v (and of the global
/// projections when given) from the forward's inputs, `out`, `lse` and `dout`.
///
/// Options as [`longformer_forward`]. The caller allocates `dq`, `dk`, `dv` and, exactly
/// when the global projections are given, `dq_global`, `dk_global`, `dv_global`:
/// writable, contiguous, q's shape and dtype, on the inputs' device. Without the projections, the
/// global rows' gradients are folded into dq, dk, dv. Deterministic.
#[pyfunction]
#[pyo3(signature = (
    q, k, v, out, lse, dout, dq, dk, dv, *, window, dilation, causal=false, scale=None,
    global_mask=None, global_indices=None, padding_mask=None, q_global=None, k_global=None,
    v_global=None, dq_global=None, dk_global=None, dv_global=None, stream=0
))]
#[allow(clippy::too_many_arguments)]
pub(super) fn longformer_backward(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    dout: &Bound<'_, PyAny>,
    dq: &Bound<'_, PyAny>,
    dk: &Bound<'_, PyAny>,
    dv: &Bound<'_, PyAny>,
    window: i64,
    dilation: Vec<i64>,
    causal: bool,
    scale: Option<f64>,
    global_mask: MaskArg,
    global_indices: Option<Vec<Vec<i64>>>,
    padding_mask: MaskArg,
    q_global: Option<&Bound<'_, PyAny>>,
    k_global: Option<&Bound<'_, PyAny>>,
    v_global: Option<&Bound<'_, PyAny>>,
    dq_global: Option<&Bound<'_, PyAny>>,
    dk_global: Option<&Bound<'_, PyAny>>,
    dv_global: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    guarded(|| {
        let opts = options(window, dilation, causal, scale)?;
        let t = import_inputs([q, k, v], [q_global, k_global, v_global])?;
        let mut grads = vec![import("dq", dq)?, import("dk", dk)?, import("dv", dv)?];
        let global_grads = [
            ("dq_global", dq_global),
            ("dk_global", dk_global),
            ("dv_global", dv_global),
        ];
        for (name, g) in global_grads {
            grads.extend(g.map(|g| import(name, g)).transpose()?);
        }
        if grads.len() != t.len() {
            return Err(to_py_err(Error::InvalidArgument(format!(
                "dq_global, dk_global, dv_global: give all three exactly when q_global, \
                 k_global, v_global are given ({} gradient buffers for {} inputs)",
                grads.len(),
                t.len()
            ))));
        }
        let extra = [
            import("out", out)?,
            import_f32("lse", lse)?,
            import("dout", dout)?,
        ];
        let (gm, pm) = masks(&t[0], global_mask, global_indices, padding_mask)?;
        let refs: Vec<&Imported> = t.iter().chain(&extra).collect();
        let place = common_place(&refs)?;
        let p = validate(&t, gm.as_ref(), pm.as_ref(), &opts)?;
        let [o, l, d] = &extra;
        longformer::validate_backward(
            &p,
            (o.dtype, &o.layout),
            (l.dtype, &l.layout),
            (d.dtype, &d.layout),
        )
        .map_err(to_py_err)?;
        #[cfg(feature = "cuda")]
        if let Place::Cuda(ordinal) = place {
            check_cuda_device(ordinal).map_err(to_py_err)?;
        }
        #[cfg(not(feature = "cuda"))]
        if let Place::Cuda(_) = place {
            let _ = stream;
            return Err(to_py_err(Error::CudaNotBuilt));
        }
        let grad_refs: Vec<&Imported> = grads.iter().collect();
        check_output_devices(&grad_refs, t[0].device)?;
        for g in &grads {
            g.check_output(p.dtype, &p.qkv_shape()).map_err(to_py_err)?;
        }
        match place {
            Place::Host => {
                let h = t.iter().map(host).collect::<PyResult<Vec<_>>>()?;
                let (ho, hl, hd) = (host(o)?, host(l)?, host(d)?);
                let g = run_detached(py, || {
                    let globals = (h.len() == 6).then(|| GlobalProjections {
                        q: &h[3],
                        k: &h[4],
                        v: &h[5],
                    });
                    longformer::backward_host(&p, [&h[0], &h[1], &h[2]], globals, [&ho, &hl, &hd])
                })?;
                let mut results = vec![g.dq, g.dk, g.dv];
                results.extend(g.global.into_iter().flatten());
                for (dst, src) in grads.iter().zip(&results) {
                    dst.write_host(src).map_err(to_py_err)?;
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Place::Cuda(ordinal) => {
                let v: Vec<_> = t.iter().map(|x| view(x, ordinal)).collect();
                let (ov, lv, dv) = (view(o, ordinal), view(l, ordinal), view(d, ordinal));
                let gv: Vec<_> = grads.iter().map(|x| view(x, ordinal)).collect();
                let views = longformer::cuda::BackwardViews {
                    inputs: [&v[0], &v[1], &v[2]],
                    globals: (v.len() == 6).then(|| [&v[3], &v[4], &v[5]]),
                    out: &ov,
                    lse: &lv,
                    dout: &dv,
                    grads: [&gv[0], &gv[1], &gv[2]],
                    global_grads: (gv.len() == 6).then(|| [&gv[3], &gv[4], &gv[5]]),
                };
                // SAFETY: as in `longformer_forward`; the gradient buffers are fresh.
                unsafe {
                    longformer::cuda::launch_backward(&p, &views, caller_stream(ordinal, stream))
                }
                .map_err(to_py_err)
            }
            #[cfg(not(feature = "cuda"))]
            Place::Cuda(_) => Err(to_py_err(Error::CudaNotBuilt)),
        }
    })
}

/// The output shapes of a Longformer call on q of this shape (B, N, H, D): `out` (and
/// every gradient) like q, and `lse` (B, H, N), for the caller to allocate them.
#[pyfunction]
pub(super) fn longformer_shapes(q_shape: Vec<usize>) -> PyResult<(Vec<usize>, Vec<usize>)> {
    guarded(|| {
        let [b, n, h, _] = q_shape[..] else {
            return Err(to_py_err(Error::Rank {
                name: "q",
                expected: 4,
                layout: "(batch, seqlen, heads, head_dim)",
                shape: q_shape,
            }));
        };
        Ok((q_shape.clone(), vec![b, h, n]))
    })
}
