//! Linformer attention (issue 15) on DLPack capsules (the op of `crate::linformer`).
//!
//! q (B, N, H, D), k / v (B, N, H_kv, D), e (He, k, N_max) and f (Hf, k, N_max) or none
//! (F = E, key-value sharing), any strides. The key padding mask arrives as host data,
//! `(bytes, shape)` with one byte per token, nonzero = padded, as Longformer's masks do.

use pyo3::prelude::*;

#[cfg(feature = "cuda")]
use super::caller_stream;
use super::{
    check_output_devices, check_output_size, conv_place, guarded, import, import_f32, run_detached,
    scale_f32, to_mask, to_py_err, Imported, MaskArg, Place,
};
use crate::error::Error;
use crate::linformer::{
    self, LinformerBackwardLayouts, LinformerLayouts, LinformerOptions, LinformerProblem, TokenMask,
};
use crate::tensor::{DType, HostTensor, Layout};

fn options(scale: Option<f64>) -> PyResult<LinformerOptions> {
    Ok(LinformerOptions::new().scale(scale_f32(scale)?))
}

/// Imports q, k, v, e and, when given, f (in this order).
fn import_inputs(
    [q, k, v, e]: [&Bound<'_, PyAny>; 4],
    f: Option<&Bound<'_, PyAny>>,
) -> PyResult<Vec<Imported>> {
    let mut t = vec![
        import("q", q)?,
        import("k", k)?,
        import("v", v)?,
        import("e", e)?,
    ];
    if let Some(f) = f {
        t.push(import("f", f)?);
    }
    Ok(t)
}

/// Validates the imported inputs ([`import_inputs`]' order) as one forward call.
fn validate(
    t: &[Imported],
    mask: Option<&TokenMask>,
    opts: &LinformerOptions,
) -> PyResult<LinformerProblem> {
    let d = |i: usize| (t[i].dtype, &t[i].layout);
    let l = LinformerLayouts {
        q: d(0),
        k: d(1),
        v: d(2),
        e: d(3),
        f: (t.len() == 5).then(|| d(4)),
    };
    linformer::validate(&l, mask, opts).map_err(to_py_err)
}

fn host(t: &Imported) -> PyResult<HostTensor> {
    t.to_host(t.layout.clone()).map_err(to_py_err)
}

/// Host copies of the inputs, as [`linformer::forward_host`] takes them (q, k, v, e, f).
fn host_inputs(t: &[Imported]) -> PyResult<Vec<Option<HostTensor>>> {
    let mut h = t
        .iter()
        .map(|t| host(t).map(Some))
        .collect::<PyResult<Vec<_>>>()?;
    h.resize_with(5, || None);
    Ok(h)
}

#[cfg(feature = "cuda")]
fn view(t: &Imported, ordinal: usize) -> crate::DeviceView {
    t.device_view(t.layout.clone(), ordinal)
}

/// Linformer forward on DLPack capsules: O = softmax(scale · Q (E K̃)ᵀ) (F Ṽ), with the
/// projected keys and values kp = E K̃, vp = F Ṽ (K̃, Ṽ: K, V with padded rows zeroed).
///
/// `q` (B, N, H, D), `k`, `v` (B, N, H_kv, D), `e` (He, k, N_max), `f` (Hf, k, N_max) or
/// None (F = E), He and Hf each 1 or H_kv, N <= N_max (the first N columns are used); one
/// dtype. `key_padding_mask`: `(bytes, shape)` (B, N), nonzero = padded key. The caller
/// allocates the outputs on the inputs' device, of the shapes [`linformer_shapes`]
/// gives: `out` in q's dtype, `lse` float32, `kp`, `vp` in q's dtype. CUDA work is queued
/// on `stream` and not synchronized.
#[pyfunction]
#[pyo3(signature = (
    q, k, v, e, out, lse, kp, vp, f=None, key_padding_mask=None, *, scale=None, stream=0
))]
#[allow(clippy::too_many_arguments)]
pub(super) fn linformer_forward(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    e: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    kp: &Bound<'_, PyAny>,
    vp: &Bound<'_, PyAny>,
    f: Option<&Bound<'_, PyAny>>,
    key_padding_mask: MaskArg,
    scale: Option<f64>,
    stream: usize,
) -> PyResult<()> {
    guarded(|| {
        let opts = options(scale)?;
        let t = import_inputs([q, k, v, e], f)?;
        let outs = [
            import("out", out)?,
            import_f32("lse", lse)?,
            import("kp", kp)?,
            import("vp", vp)?,
        ];
        let mask = to_mask(key_padding_mask);
        let given: Vec<&Imported> = t.iter().collect();
        let place = conv_place(&given)?;
        let p = validate(&t, mask.as_ref(), &opts)?;
        let out_refs: Vec<&Imported> = outs.iter().collect();
        check_output_devices(&out_refs, t[0].device)?;
        let [o, l, kpo, vpo] = &outs;
        o.check_output(p.dtype, &p.q_shape()).map_err(to_py_err)?;
        l.check_output(DType::F32, &p.lse_shape())
            .map_err(to_py_err)?;
        kpo.check_output(p.dtype, &p.proj_shape())
            .map_err(to_py_err)?;
        vpo.check_output(p.dtype, &p.proj_shape())
            .map_err(to_py_err)?;
        match place {
            Place::Host => {
                let h = host_inputs(&t)?;
                let refs: Vec<Option<&HostTensor>> = h.iter().map(Option::as_ref).collect();
                let r = run_detached(py, || linformer::forward_host(&p, &refs))?;
                for (dst, src) in outs.iter().zip([&r.out, &r.lse, &r.kp, &r.vp]) {
                    dst.write_host(src).map_err(to_py_err)?;
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Place::Cuda(ordinal) => {
                let v: Vec<_> = t.iter().map(|x| view(x, ordinal)).collect();
                let ins = linformer::cuda::InputViews {
                    q: &v[0],
                    k: &v[1],
                    v: &v[2],
                    e: &v[3],
                    f: v.get(4),
                };
                let ov: Vec<_> = outs.iter().map(|x| view(x, ordinal)).collect();
                let s = caller_stream(ordinal, stream)().map_err(to_py_err)?;
                // SAFETY: the views describe live producer memory until the `Imported`s
                // drop after this call; the outputs are fresh allocations; the caller's
                // stream, for which the inputs were exported.
                unsafe {
                    linformer::cuda::launch_forward(
                        &p,
                        &ins,
                        [&ov[0], &ov[1], &ov[2], &ov[3]],
                        ordinal,
                        &s,
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

/// Linformer backward on DLPack capsules: from the forward's inputs, its `out`, `lse`,
/// `kp`, `vp` (as the forward wrote them; not recomputed) and `grad_output` (out's
/// gradient), the gradients dq, dk, dv, de and, exactly when `f` is given, df. The caller
/// allocates them on the inputs' device in q's dtype, each shaped like its input (de like
/// e, df like f). Without `f` (F = E), de holds both projections' contributions.
/// Options and mask as [`linformer_forward`]. Deterministic.
#[pyfunction]
#[pyo3(signature = (
    q, k, v, e, out, lse, kp, vp, grad_output, dq, dk, dv, de, f=None, df=None,
    key_padding_mask=None, *, scale=None, stream=0
))]
#[allow(clippy::too_many_arguments)]
pub(super) fn linformer_backward(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    e: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    kp: &Bound<'_, PyAny>,
    vp: &Bound<'_, PyAny>,
    grad_output: &Bound<'_, PyAny>,
    dq: &Bound<'_, PyAny>,
    dk: &Bound<'_, PyAny>,
    dv: &Bound<'_, PyAny>,
    de: &Bound<'_, PyAny>,
    f: Option<&Bound<'_, PyAny>>,
    df: Option<&Bound<'_, PyAny>>,
    key_padding_mask: MaskArg,
    scale: Option<f64>,
    stream: usize,
) -> PyResult<()> {
    guarded(|| {
        let opts = options(scale)?;
        let t = import_inputs([q, k, v, e], f)?;
        let extra = [
            import("out", out)?,
            import_f32("lse", lse)?,
            import("kp", kp)?,
            import("vp", vp)?,
            import("grad_output", grad_output)?,
        ];
        let mut grads = vec![
            import("dq", dq)?,
            import("dk", dk)?,
            import("dv", dv)?,
            import("de", de)?,
        ];
        if let Some(df) = df {
            grads.push(import("df", df)?);
        }
        if grads.len() != t.len() {
            return Err(to_py_err(Error::InvalidArgument(format!(
                "df: give it exactly when f is given (f {}, df {})",
                if f.is_some() {
                    "given"
                } else {
                    "not given (F = E)"
                },
                if df.is_some() { "given" } else { "not given" },
            ))));
        }
        let mask = to_mask(key_padding_mask);
        let given: Vec<&Imported> = t.iter().chain(&extra).collect();
        let place = conv_place(&given)?;
        let p = validate(&t, mask.as_ref(), &opts)?;
        let d = |i: usize| (extra[i].dtype, &extra[i].layout);
        linformer::validate_backward(
            &p,
            &LinformerBackwardLayouts {
                out: d(0),
                lse: d(1),
                kp: d(2),
                vp: d(3),
                dout: d(4),
            },
        )
        .map_err(to_py_err)?;
        let grad_refs: Vec<&Imported> = grads.iter().collect();
        check_output_devices(&grad_refs, t[0].device)?;
        let shapes = [
            p.q_shape(),
            p.kv_shape(),
            p.kv_shape(),
            p.e_shape(),
            p.f_shape(),
        ];
        for (g, shape) in grads.iter().zip(&shapes) {
            g.check_output(p.dtype, shape).map_err(to_py_err)?;
        }
        match place {
            Place::Host => {
                let h = host_inputs(&t)?;
                let refs: Vec<Option<&HostTensor>> = h.iter().map(Option::as_ref).collect();
                let he = extra.iter().map(host).collect::<PyResult<Vec<_>>>()?;
                let g = run_detached(py, || {
                    linformer::backward_host(&p, &refs, [&he[0], &he[1], &he[2], &he[3], &he[4]])
                })?;
                let srcs = [
                    Some(&g.dq),
                    Some(&g.dk),
                    Some(&g.dv),
                    Some(&g.de),
                    g.df.as_ref(),
                ];
                for (dst, src) in grads.iter().zip(srcs) {
                    let src = src.ok_or_else(|| {
                        to_py_err(Error::InvalidArgument(format!(
                            "{}: the op returned no gradient for it",
                            dst.name
                        )))
                    })?;
                    dst.write_host(src).map_err(to_py_err)?;
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Place::Cuda(ordinal) => {
                let v: Vec<_> = t.iter().map(|x| view(x, ordinal)).collect();
                let ins = linformer::cuda::InputViews {
                    q: &v[0],
                    k: &v[1],
                    v: &v[2],
                    e: &v[3],
                    f: v.get(4),
                };
                let ev: Vec<_> = extra.iter().map(|x| view(x, ordinal)).collect();
                let gv: Vec<_> = grads.iter().map(|x| view(x, ordinal)).collect();
                let s = caller_stream(ordinal, stream)().map_err(to_py_err)?;
                // SAFETY: as in `linformer_forward`; the gradient buffers are fresh.
                unsafe {
                    linformer::cuda::launch_backward(
                        &p,
                        &ins,
                        [&ev[0], &ev[1], &ev[2], &ev[3], &ev[4]],
                        [&gv[0], &gv[1], &gv[2], &gv[3]],
                        gv.get(4),
                        ordinal,
                        &s,
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

/// The shapes (out, lse, kp, vp) = ((B, N, H, D), (B, H, N), (B, k, H_kv, D),
/// (B, k, H_kv, D)) of a Linformer call on inputs of the given shapes, validated as the
/// call will be (mismatched E / F, k = 0, N > N_max, a key padding mask of another shape
/// than (B, N) are refused here, before the caller allocates anything). `mask_shape`:
/// the key padding mask's shape, when one is given.
#[pyfunction]
#[pyo3(signature = (q, k, v, e, f=None, mask_shape=None, *, scale=None))]
#[allow(clippy::type_complexity)]
pub(super) fn linformer_shapes(
    q: Vec<usize>,
    k: Vec<usize>,
    v: Vec<usize>,
    e: Vec<usize>,
    f: Option<Vec<usize>>,
    mask_shape: Option<Vec<usize>>,
    scale: Option<f64>,
) -> PyResult<(Vec<usize>, Vec<usize>, Vec<usize>, Vec<usize>)> {
    guarded(|| {
        let opts = options(scale)?;
        let c = |s: &Vec<usize>| Layout::contiguous(s);
        let (ql, kl, vl, el) = (c(&q), c(&k), c(&v), c(&e));
        let fl = f.as_ref().map(c);
        let d = |l| (DType::F32, l);
        // A mask of q's (B, N) is valid whatever it holds: only another shape is passed
        // on (without values), for the validator to refuse it by its shape.
        let mask = mask_shape
            .filter(|s| !(q.len() == 4 && s[..] == q[..2]))
            .map(|s| TokenMask::new(Vec::new(), &s));
        let p = linformer::validate(
            &LinformerLayouts {
                q: d(&ql),
                k: d(&kl),
                v: d(&vl),
                e: d(&el),
                f: fl.as_ref().map(d),
            },
            mask.as_ref(),
            &opts,
        )
        .map_err(to_py_err)?;
        let shapes = (p.q_shape(), p.lse_shape(), p.proj_shape(), p.proj_shape());
        check_output_size("the projected keys", &shapes.2).map_err(to_py_err)?;
        check_output_size("out", &shapes.0).map_err(to_py_err)?;
        Ok(shapes)
    })
}
