//! Dense attention forward and backward on DLPack capsules.

use pyo3::prelude::*;

#[cfg(feature = "cuda")]
use super::{caller_stream, check_cuda_device};
use super::{
    check_output_devices, common_place, guarded, import, import_f32, run_detached, scale_f32,
    to_py_err, Imported, Place,
};
use crate::attention::{self, AttentionOptions, AttentionProblem, SeqLens};
use crate::error::Error;
use crate::tensor::{DType, Layout};

/// Attention options from the Python arguments. Windows are non-negative ints or None
/// (unbounded); a window wider than `i32::MAX` is unbounded in practice and is clamped
/// there, which is also what the CUDA kernels do.
fn options(
    scale: Option<f64>,
    causal: bool,
    window_left: Option<i64>,
    window_right: Option<i64>,
) -> PyResult<AttentionOptions> {
    let window = |name: &str, w: Option<i64>| -> PyResult<Option<usize>> {
        match w {
            None => Ok(None),
            Some(w) if w < 0 => Err(to_py_err(Error::InvalidArgument(format!(
                "{name} must be a non-negative int, or None for unbounded, got {w}"
            )))),
            Some(w) => Ok(Some(w.min(i32::MAX as i64) as usize)),
        }
    };
    Ok(AttentionOptions {
        scale: scale_f32(scale)?,
        causal,
        window_left: window("window_left", window_left)?,
        window_right: window("window_right", window_right)?,
    })
}

/// The varlen offsets, when given (both or neither), as int32.
fn seqlens(
    cu_seqlens_q: Option<Vec<i64>>,
    cu_seqlens_k: Option<Vec<i64>>,
    heads_first: bool,
) -> PyResult<Option<SeqLens>> {
    let to_i32 = |name: &str, cu: Vec<i64>| -> PyResult<Vec<i32>> {
        cu.iter()
            .enumerate()
            .map(|(i, &x)| {
                i32::try_from(x).map_err(|_| {
                    to_py_err(Error::InvalidArgument(format!(
                        "{name}: offset {i} is {x}, outside the int32 range"
                    )))
                })
            })
            .collect()
    };
    match (cu_seqlens_q, cu_seqlens_k) {
        (None, None) => Ok(None),
        (Some(q), Some(k)) => {
            if heads_first {
                return Err(to_py_err(Error::InvalidArgument(
                    "cu_seqlens_q/cu_seqlens_k take packed (total_seqlen, heads, head_dim) \
                     tensors: heads_first must be False"
                        .into(),
                )));
            }
            Ok(Some(SeqLens {
                cu_seqlens_q: to_i32("cu_seqlens_q", q)?,
                cu_seqlens_k: to_i32("cu_seqlens_k", k)?,
            }))
        }
        _ => Err(to_py_err(Error::InvalidArgument(
            "cu_seqlens_q and cu_seqlens_k must be given together".into(),
        ))),
    }
}

/// Validates Q, K, V (logical layouts) for a dense or varlen problem.
fn validate_problem(
    qkv: [(&Imported, &Layout); 3],
    seqlens: Option<&SeqLens>,
    opts: &AttentionOptions,
    heads_first: bool,
) -> PyResult<AttentionProblem> {
    let [(q, lq), (k, lk), (v, lv)] = qkv;
    let r = match seqlens {
        None => attention::validate((q.dtype, lq), (k.dtype, lk), (v.dtype, lv), opts),
        Some(s) => attention::validate_varlen((q.dtype, lq), (k.dtype, lk), (v.dtype, lv), s, opts),
    };
    r.map_err(|e| to_py_err(with_layout_note(e, heads_first)))
}

/// Attention forward on DLPack capsules.
///
/// `q`, `k`, `v`: capsules (or `(capsule, "bfloat16")`), logical layout (B, N, H, D), or
/// (B, H, N, D) with `heads_first`; K and V may have fewer heads than Q (GQA). With
/// `cu_seqlens_q` and `cu_seqlens_k` (B+1 offsets each), the batch is variable-length:
/// q, k, v are packed (total, heads, head_dim) and `heads_first` must be False.
/// `window_left` / `window_right`: sliding window (non-negative, None = unbounded).
/// The caller allocates the outputs on the inputs' device, of the shapes
/// [`attention_shapes`] gives: `out` (q's shape in kernel order, q's dtype) and a float32
/// `lse` ((B, H, Nq), or (H, total_q) for varlen). CUDA work is queued on `stream` (a CUstream as an integer, 0
/// for the legacy default stream) and not synchronized.
#[pyfunction]
#[pyo3(signature = (
    q, k, v, out, lse, *, heads_first, causal, scale=None, window_left=None, window_right=None,
    cu_seqlens_q=None, cu_seqlens_k=None, stream=0
))]
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_forward(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    heads_first: bool,
    causal: bool,
    scale: Option<f64>,
    window_left: Option<i64>,
    window_right: Option<i64>,
    cu_seqlens_q: Option<Vec<i64>>,
    cu_seqlens_k: Option<Vec<i64>>,
    stream: usize,
) -> PyResult<()> {
    guarded(|| {
        let opts = options(scale, causal, window_left, window_right)?;
        let seqlens = seqlens(cu_seqlens_q, cu_seqlens_k, heads_first)?;
        let inputs = [import("q", q)?, import("k", k)?, import("v", v)?];
        let [q, k, v] = &inputs;
        let (out, lse) = (import("out", out)?, import_f32("lse", lse)?);
        let place = common_place(&[q, k, v])?;
        let layouts = inputs
            .iter()
            .map(|t| t.logical_layout(heads_first))
            .collect::<Result<Vec<_>, _>>()
            .map_err(to_py_err)?;
        let p = validate_problem(
            [(q, &layouts[0]), (k, &layouts[1]), (v, &layouts[2])],
            seqlens.as_ref(),
            &opts,
            heads_first,
        )?;

        #[cfg(not(feature = "cuda"))]
        if let Place::Cuda(_) = place {
            let _ = stream;
            return Err(to_py_err(Error::CudaNotBuilt));
        }

        check_output_devices(&[&out, &lse], q.device)?;

        match place {
            Place::Host => {
                let hq = q.to_host(layouts[0].clone()).map_err(to_py_err)?;
                let hk = k.to_host(layouts[1].clone()).map_err(to_py_err)?;
                let hv = v.to_host(layouts[2].clone()).map_err(to_py_err)?;
                // The reference can take a while: let other Python threads run.
                let result = run_detached(py, || attention::forward_host(&p, [&hq, &hk, &hv]))?;
                out.write_host(&result.out).map_err(to_py_err)?;
                lse.write_host(&result.lse).map_err(to_py_err)?;
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Place::Cuda(ordinal) => {
                check_cuda_device(ordinal).map_err(to_py_err)?;
                let views: Vec<_> = inputs
                    .iter()
                    .zip(&layouts)
                    .map(|(t, l)| t.device_view(l.clone(), ordinal))
                    .collect();
                out.check_output(p.dtype, &p.q_shape()).map_err(to_py_err)?;
                lse.check_output(DType::F32, &p.lse_shape())
                    .map_err(to_py_err)?;
                let out_view = out.device_view(out.layout.clone(), ordinal);
                let lse_view = lse.device_view(lse.layout.clone(), ordinal);
                // SAFETY: the views describe live memory held by their producers until the
                // `Imported`s drop after this call; the outputs are fresh allocations, so
                // they overlap nothing; the caller passes its framework's current stream
                // of this device (or 0), and the inputs were exported for that stream.
                unsafe {
                    attention::cuda::launch_forward(
                        &p,
                        [&views[0], &views[1], &views[2], &out_view, &lse_view],
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

/// Attention backward on DLPack capsules: dQ, dK, dV from the forward's q, k, v, its
/// `out` and `lse`, and `dout` (the gradient of `out`).
///
/// Layouts and options as [`attention_forward`]: `out` and `dout` are laid out like q,
/// `lse` as the forward returned it. The caller allocates `dq`, `dk`, `dv` on the inputs'
/// device in q's dtype, of the shapes [`attention_shapes`] gives (kernel order). For GQA, dK and dV sum over each group's query heads. The result
/// is deterministic.
#[pyfunction]
#[pyo3(signature = (
    q, k, v, out, lse, dout, dq, dk, dv, *, heads_first, causal, scale=None, window_left=None,
    window_right=None, cu_seqlens_q=None, cu_seqlens_k=None, stream=0
))]
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_backward(
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
    heads_first: bool,
    causal: bool,
    scale: Option<f64>,
    window_left: Option<i64>,
    window_right: Option<i64>,
    cu_seqlens_q: Option<Vec<i64>>,
    cu_seqlens_k: Option<Vec<i64>>,
    stream: usize,
) -> PyResult<()> {
    guarded(|| {
        let opts = options(scale, causal, window_left, window_right)?;
        let seqlens = seqlens(cu_seqlens_q, cu_seqlens_k, heads_first)?;
        let inputs = [
            import("q", q)?,
            import("k", k)?,
            import("v", v)?,
            import("out", out)?,
            import_f32("lse", lse)?,
            import("dout", dout)?,
        ];
        let [q, k, v, out, lse, dout] = &inputs;
        let [dq, dk, dv] = [import("dq", dq)?, import("dk", dk)?, import("dv", dv)?];
        let place = common_place(&[q, k, v, out, lse, dout])?;
        // LSE is (B, H, Nq) (or (H, total_q)) in both layouts.
        let layouts = [q, k, v, out, dout]
            .iter()
            .map(|t| t.logical_layout(heads_first))
            .collect::<Result<Vec<_>, _>>()
            .map_err(to_py_err)?;
        let p = validate_problem(
            [(q, &layouts[0]), (k, &layouts[1]), (v, &layouts[2])],
            seqlens.as_ref(),
            &opts,
            heads_first,
        )?;
        attention::validate_backward(
            &p,
            (out.dtype, &layouts[3]),
            (lse.dtype, &lse.layout),
            (dout.dtype, &layouts[4]),
        )
        .map_err(|e| to_py_err(with_layout_note(e, heads_first)))?;

        #[cfg(not(feature = "cuda"))]
        if let Place::Cuda(_) = place {
            let _ = stream;
            return Err(to_py_err(Error::CudaNotBuilt));
        }

        check_output_devices(&[&dq, &dk, &dv], q.device)?;

        match place {
            Place::Host => {
                let host = |t: &Imported, l: &Layout| t.to_host(l.clone()).map_err(to_py_err);
                let hq = host(q, &layouts[0])?;
                let hk = host(k, &layouts[1])?;
                let hv = host(v, &layouts[2])?;
                let ho = host(out, &layouts[3])?;
                let hl = host(lse, &lse.layout)?;
                let hd = host(dout, &layouts[4])?;
                let t = [&hq, &hk, &hv, &ho, &hl, &hd];
                let g = run_detached(py, || attention::backward_host(&p, t))?;
                dq.write_host(&g.dq).map_err(to_py_err)?;
                dk.write_host(&g.dk).map_err(to_py_err)?;
                dv.write_host(&g.dv).map_err(to_py_err)?;
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Place::Cuda(ordinal) => {
                check_cuda_device(ordinal).map_err(to_py_err)?;
                let views: Vec<_> = [q, k, v, out, dout]
                    .iter()
                    .zip(&layouts)
                    .map(|(t, l)| t.device_view(l.clone(), ordinal))
                    .collect();
                dq.check_output(p.dtype, &p.q_shape()).map_err(to_py_err)?;
                dk.check_output(p.dtype, &p.kv_shape()).map_err(to_py_err)?;
                dv.check_output(p.dtype, &p.kv_shape()).map_err(to_py_err)?;
                let lse_view = lse.device_view(lse.layout.clone(), ordinal);
                let dq_view = dq.device_view(dq.layout.clone(), ordinal);
                let dk_view = dk.device_view(dk.layout.clone(), ordinal);
                let dv_view = dv.device_view(dv.layout.clone(), ordinal);
                // SAFETY: as in `attention_forward`: live producer memory until the
                // `Imported`s drop, fresh (non-overlapping) gradient buffers, and the
                // caller's stream, for which the inputs were exported.
                unsafe {
                    attention::cuda::launch_backward(
                        &p,
                        [
                            &views[0], &views[1], &views[2], &views[3], &lse_view, &views[4],
                            &dq_view, &dk_view, &dv_view,
                        ],
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

/// Shape errors name shapes in the kernel's (B, N, H, D) order: say so to callers who
/// passed (B, H, N, D).
fn with_layout_note(e: Error, heads_first: bool) -> Error {
    match e {
        Error::ShapeMismatch { detail } if heads_first => Error::ShapeMismatch {
            detail: format!(
                "{detail} [shapes shown as (batch, seqlen, heads, head_dim); \
                 yours are (batch, heads, seqlen, head_dim)]"
            ),
        },
        e => e,
    }
}

/// The output shapes of an attention call on q, k, v of these shapes (validated, with
/// the same options as the call): `out` and `dq` (q's shape in kernel order), `lse`,
/// and `kv` (dk and dv), for the caller to allocate them.
#[pyfunction]
#[pyo3(signature = (
    q_shape, k_shape, v_shape, *, heads_first, causal, scale=None, window_left=None,
    window_right=None, cu_seqlens_q=None, cu_seqlens_k=None
))]
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_shapes(
    q_shape: Vec<usize>,
    k_shape: Vec<usize>,
    v_shape: Vec<usize>,
    heads_first: bool,
    causal: bool,
    scale: Option<f64>,
    window_left: Option<i64>,
    window_right: Option<i64>,
    cu_seqlens_q: Option<Vec<i64>>,
    cu_seqlens_k: Option<Vec<i64>>,
) -> PyResult<AttentionShapes> {
    guarded(|| {
        let opts = options(scale, causal, window_left, window_right)?;
        let seqlens = seqlens(cu_seqlens_q, cu_seqlens_k, heads_first)?;
        let layout = |name: &'static str, shape: Vec<usize>| {
            let mut l = Layout::contiguous(&shape);
            if heads_first {
                if l.shape.len() != 4 {
                    return Err(to_py_err(Error::Rank {
                        name,
                        expected: 4,
                        layout: "(batch, heads, seqlen, head_dim)",
                        shape: l.shape,
                    }));
                }
                l.shape.swap(1, 2);
                l.strides.swap(1, 2);
            }
            Ok(l)
        };
        let (lq, lk, lv) = (
            layout("q", q_shape)?,
            layout("k", k_shape)?,
            layout("v", v_shape)?,
        );
        let d = DType::F16;
        let r = match &seqlens {
            None => attention::validate((d, &lq), (d, &lk), (d, &lv), &opts),
            Some(s) => attention::validate_varlen((d, &lq), (d, &lk), (d, &lv), s, &opts),
        };
        let p = r.map_err(|e| to_py_err(with_layout_note(e, heads_first)))?;
        Ok((p.q_shape(), p.lse_shape(), p.kv_shape()))
    })
}

/// (out and dq, lse, dk and dv) shapes.
type AttentionShapes = (Vec<usize>, Vec<usize>, Vec<usize>);
