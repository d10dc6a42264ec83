//! Reformer LSH attention (issue 16) on DLPack capsules (the op of `crate::reformer`).
//!
//! qk, v (B, N, H, D), rotations (H, D, n_hashes, n_buckets / 2), any strides. The key
//! padding mask arrives as host data, `(bytes, shape)` with one byte per token, nonzero
//! = padded, as Linformer's and Longformer's masks do; buckets likewise as host data,
//! `(bytes, shape)` of native-endian int32 (B, H, n_hashes, N), and the forward returns
//! the buckets it used as such bytes (they live on the host in the op too). Device
//! tensors run the CUDA kernels, which read float32 contiguous rotations (the Python
//! layer converts them; anything else is a ValueError here).

use pyo3::prelude::*;
use pyo3::types::PyBytes;

#[cfg(feature = "cuda")]
use super::caller_stream;
use super::dlpack::Indices;
use super::{
    check_output_devices, check_output_size, conv_place, guarded, import, import_f32, run_detached,
    to_mask, to_py_err, DLDevice, Imported, MaskArg, Place,
};
use crate::error::Error;
use crate::reformer::{
    self, Buckets, ReformerBackwardLayouts, ReformerLayouts, ReformerOptions, ReformerProblem,
    TokenMask,
};
use crate::tensor::{DType, HostTensor, Layout};

type BucketsArg<'py> = Option<(Bound<'py, PyBytes>, Vec<usize>)>;

const BUCKETS_LAYOUT: &str = "(batch, heads, n_hashes, seqlen)";

fn options(
    chunk_length: usize,
    chunks_before: usize,
    chunks_after: usize,
    causal: bool,
    n_buckets: Option<usize>,
) -> ReformerOptions {
    ReformerOptions::new(chunk_length)
        .chunks(chunks_before, chunks_after)
        .causal(causal)
        .n_buckets(n_buckets)
}

/// Host buckets from `(bytes, shape)`: rank 4, 4 bytes per value, as many values as
/// the shape holds (their range is the validator's: [`reformer::validate_buckets`]).
fn to_buckets(b: Option<(Bound<'_, PyBytes>, Vec<usize>)>) -> Result<Option<Buckets>, Error> {
    let Some((bytes, shape)) = b else {
        return Ok(None);
    };
    let shape: [usize; 4] = shape.clone().try_into().map_err(|_| Error::Rank {
        name: "buckets",
        expected: 4,
        layout: BUCKETS_LAYOUT,
        shape,
    })?;
    let bytes = bytes.as_bytes();
    let n = crate::ops::common::checked_elements("the buckets", &shape)?;
    if bytes.len() % 4 != 0 || bytes.len() / 4 != n {
        return Err(Error::InvalidArgument(format!(
            "buckets: shape {shape:?} needs {n} int32 values ({} bytes), got {} bytes",
            n.saturating_mul(4),
            bytes.len()
        )));
    }
    let values = bytes
        .chunks_exact(4)
        .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(Some(Buckets::new(values, shape)))
}

/// `buckets_out`: int32 (B, H, n_hashes, N), contiguous, writable, where the inputs are;
/// only for a call that hashes (N > C, no buckets given).
fn import_buckets_out(
    b: &Bound<'_, PyAny>,
    p: &ReformerProblem,
    given: bool,
    device: DLDevice,
) -> PyResult<Indices> {
    if !p.hashed() || given {
        return Err(to_py_err(Error::InvalidArgument(
            "buckets_out: only a call that hashes (N > chunk_length, no buckets given) \
             writes buckets"
                .into(),
        )));
    }
    let bo = Indices::import("buckets_out", b)?;
    if bo.device() != device {
        return Err(to_py_err(Error::DeviceMismatch {
            detail: "buckets_out must be where the inputs are".into(),
        }));
    }
    bo.check(&p.buckets_shape(), true).map_err(to_py_err)?;
    Ok(bo)
}

/// Buckets as the native-endian int32 bytes Python receives.
fn bucket_bytes(b: &Buckets) -> Vec<u8> {
    b.values.iter().flat_map(|x| x.to_ne_bytes()).collect()
}

/// Imports qk, v and the rotations (in this order).
fn import_inputs(
    qk: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    rotations: &Bound<'_, PyAny>,
) -> PyResult<Vec<Imported>> {
    Ok(vec![
        import("qk", qk)?,
        import("v", v)?,
        import("rotations", rotations)?,
    ])
}

/// Validates the imported inputs ([`import_inputs`]' order) and given buckets as one
/// forward call.
fn validate(
    t: &[Imported],
    mask: Option<&TokenMask>,
    buckets: Option<&Buckets>,
    opts: &ReformerOptions,
) -> PyResult<ReformerProblem> {
    let d = |i: usize| (t[i].dtype, &t[i].layout);
    let l = ReformerLayouts {
        qk: d(0),
        v: d(1),
        rotations: d(2),
    };
    let p = reformer::validate(&l, mask, opts).map_err(to_py_err)?;
    if let Some(b) = buckets {
        reformer::validate_buckets(&p, b).map_err(to_py_err)?;
    }
    Ok(p)
}

fn host(t: &Imported) -> PyResult<HostTensor> {
    t.to_host(t.layout.clone()).map_err(to_py_err)
}

#[cfg(feature = "cuda")]
fn views(t: &[Imported], ordinal: usize) -> Vec<crate::DeviceView> {
    t.iter()
        .map(|x| x.device_view(x.layout.clone(), ordinal))
        .collect()
}

/// Reformer LSH attention forward on DLPack capsules (Hugging Face's `LSHSelfAttention`
/// before its output dense): per round, shared-QK hashing, one stable sort of all rounds
/// by (bucket, position), chunks of `chunk_length` attending to `chunks_before` /
/// `chunks_after` neighbouring chunks circularly, masked scores replaced; rounds
/// combined by logsumexp. N <= C is full shared-QK attention (no hashing, no buckets).
///
/// `qk`, `v` (B, N, H, D) one dtype, `rotations` (H, D, n_hashes, n_buckets / 2) any
/// float dtype; `key_padding_mask`: `(bytes, shape)` (B, N), nonzero = padded;
/// `buckets`: `(bytes, shape)` int32 (B, H, n_hashes, N), offset per round, used instead
/// of hashing (N > C only). The caller allocates `out` (qk's dtype, (B, N, H, D)) and
/// `lse` (float32 (B, H, rounds, N)) where the inputs are, of the shapes
/// [`reformer_shapes`] gives. Returns the buckets used as int32 bytes (B, H, n_hashes, N),
/// or None when N <= C, or when `buckets_out` (int32 of that shape, contiguous, where the
/// inputs are; only for a call that hashes) received them: on CUDA that skips the copy to
/// the host and its wait for the stream.
#[pyfunction]
#[pyo3(signature = (
    qk, v, rotations, out, lse, key_padding_mask=None, buckets=None, buckets_out=None, *,
    chunk_length, chunks_before=1, chunks_after=0, causal=false, n_buckets=None, stream=0
))]
#[allow(clippy::too_many_arguments)]
pub(super) fn reformer_forward<'py>(
    py: Python<'py>,
    qk: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    rotations: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
    lse: &Bound<'py, PyAny>,
    key_padding_mask: MaskArg,
    buckets: BucketsArg<'py>,
    buckets_out: Option<&Bound<'py, PyAny>>,
    chunk_length: usize,
    chunks_before: usize,
    chunks_after: usize,
    causal: bool,
    n_buckets: Option<usize>,
    stream: usize,
) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let r = guarded(|| {
        let opts = options(chunk_length, chunks_before, chunks_after, causal, n_buckets);
        let t = import_inputs(qk, v, rotations)?;
        let outs = [import("out", out)?, import_f32("lse", lse)?];
        let mask = to_mask(key_padding_mask);
        let buckets = to_buckets(buckets).map_err(to_py_err)?;
        let given: Vec<&Imported> = t.iter().collect();
        let place = conv_place(&given)?;
        let p = validate(&t, mask.as_ref(), buckets.as_ref(), &opts)?;
        let out_refs: Vec<&Imported> = outs.iter().collect();
        check_output_devices(&out_refs, t[0].device)?;
        let [o, l] = &outs;
        o.check_output(p.dtype, &p.qkv_shape()).map_err(to_py_err)?;
        l.check_output(DType::F32, &p.lse_shape())
            .map_err(to_py_err)?;
        let bout = buckets_out
            .map(|b| import_buckets_out(b, &p, buckets.is_some(), t[0].device))
            .transpose()?;
        match place {
            Place::Host => {
                let h = t.iter().map(host).collect::<PyResult<Vec<_>>>()?;
                let refs: Vec<&HostTensor> = h.iter().collect();
                let r = run_detached(py, || reformer::forward_host(&p, &refs, buckets.as_ref()))?;
                o.write_host(&r.out).map_err(to_py_err)?;
                l.write_host(&r.lse).map_err(to_py_err)?;
                match (&bout, &r.buckets) {
                    (Some(bo), Some(b)) => {
                        bo.write_host(&p.buckets_shape(), &b.values)
                            .map_err(to_py_err)?;
                        Ok(None)
                    }
                    _ => Ok(r.buckets.as_ref().map(bucket_bytes)),
                }
            }
            #[cfg(feature = "cuda")]
            Place::Cuda(ordinal) => {
                let iv = views(&t, ordinal);
                let ov = views(&outs, ordinal);
                let s = caller_stream(ordinal, stream)().map_err(to_py_err)?;
                // SAFETY: the views describe live producer memory until the `Imported`s
                // drop after this call; the outputs are fresh allocations; the caller's
                // stream, for which the inputs were exported.
                let used = unsafe {
                    reformer::cuda::launch_forward(
                        &p,
                        [&iv[0], &iv[1], &iv[2]],
                        [&ov[0], &ov[1]],
                        buckets.as_ref(),
                        bout.as_ref().map(|b| b.ptr() as *mut i32),
                        ordinal,
                        &s,
                    )
                }
                .map_err(to_py_err)?;
                Ok(used.map(|b| bucket_bytes(&b)))
            }
            #[cfg(not(feature = "cuda"))]
            Place::Cuda(_) => {
                let _ = stream;
                Err(to_py_err(Error::CudaNotBuilt))
            }
        }
    })?;
    Ok(r.map(|bytes| PyBytes::new(py, &bytes)))
}

/// Reformer LSH attention backward on DLPack capsules, the buckets held fixed (the given
/// `buckets`, as the forward returned them, or hashed again from the rotations, which
/// gives the forward's): from the forward's inputs, its `out` and `lse` (as it wrote
/// them) and `grad_output` (out's gradient), writes `dqk` and `dv` (caller-allocated,
/// shaped like qk, in its dtype). The rotations and buckets get no gradient.
/// Deterministic. Options and host arguments as [`reformer_forward`].
#[pyfunction]
#[pyo3(signature = (
    qk, v, rotations, out, lse, grad_output, dqk, dv, key_padding_mask=None, buckets=None,
    *, chunk_length, chunks_before=1, chunks_after=0, causal=false, n_buckets=None, stream=0
))]
#[allow(clippy::too_many_arguments)]
pub(super) fn reformer_backward<'py>(
    py: Python<'py>,
    qk: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    rotations: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
    lse: &Bound<'py, PyAny>,
    grad_output: &Bound<'py, PyAny>,
    dqk: &Bound<'py, PyAny>,
    dv: &Bound<'py, PyAny>,
    key_padding_mask: MaskArg,
    buckets: BucketsArg<'py>,
    chunk_length: usize,
    chunks_before: usize,
    chunks_after: usize,
    causal: bool,
    n_buckets: Option<usize>,
    stream: usize,
) -> PyResult<()> {
    guarded(|| {
        let opts = options(chunk_length, chunks_before, chunks_after, causal, n_buckets);
        let t = import_inputs(qk, v, rotations)?;
        let extra = [
            import("out", out)?,
            import_f32("lse", lse)?,
            import("grad_output", grad_output)?,
        ];
        let grads = [import("dqk", dqk)?, import("dv", dv)?];
        let mask = to_mask(key_padding_mask);
        let buckets = to_buckets(buckets).map_err(to_py_err)?;
        let given: Vec<&Imported> = t.iter().chain(&extra).collect();
        let place = conv_place(&given)?;
        let p = validate(&t, mask.as_ref(), buckets.as_ref(), &opts)?;
        let d = |i: usize| (extra[i].dtype, &extra[i].layout);
        reformer::validate_backward(
            &p,
            &ReformerBackwardLayouts {
                out: d(0),
                lse: d(1),
                dout: d(2),
            },
        )
        .map_err(to_py_err)?;
        let grad_refs: Vec<&Imported> = grads.iter().collect();
        check_output_devices(&grad_refs, t[0].device)?;
        for g in &grads {
            g.check_output(p.dtype, &p.qkv_shape()).map_err(to_py_err)?;
        }
        match place {
            Place::Host => {
                let h = t.iter().map(host).collect::<PyResult<Vec<_>>>()?;
                let refs: Vec<&HostTensor> = h.iter().collect();
                let he = extra.iter().map(host).collect::<PyResult<Vec<_>>>()?;
                let g = run_detached(py, || {
                    reformer::backward_host(&p, &refs, buckets.as_ref(), [&he[0], &he[1], &he[2]])
                })?;
                grads[0].write_host(&g.dqk).map_err(to_py_err)?;
                grads[1].write_host(&g.dv).map_err(to_py_err)?;
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Place::Cuda(ordinal) => {
                let iv = views(&t, ordinal);
                let ev = views(&extra, ordinal);
                let gv = views(&grads, ordinal);
                let s = caller_stream(ordinal, stream)().map_err(to_py_err)?;
                // SAFETY: as in `reformer_forward`; the gradient buffers are fresh.
                unsafe {
                    reformer::cuda::launch_backward(
                        &p,
                        [&iv[0], &iv[1], &iv[2]],
                        [&ev[0], &ev[1], &ev[2]],
                        [&gv[0], &gv[1]],
                        buckets.as_ref(),
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

/// The shapes (out, lse, buckets) = ((B, N, H, D), (B, H, rounds, N),
/// (B, H, n_hashes, N) or None when N <= C) of a Reformer call on inputs of the given
/// shapes, validated as the call will be (odd `n_buckets`, rotations of another shape
/// than (H, D, n_hashes, n_buckets / 2), C = 0, N > C not a multiple of C, a key padding
/// mask not (B, N), buckets given for N <= C or of another shape are refused here,
/// before the caller allocates anything). `mask_shape`, `buckets_shape`: those of the
/// key padding mask and the given buckets, when given.
#[pyfunction]
#[pyo3(signature = (
    qk, v, rotations, mask_shape=None, buckets_shape=None, *, chunk_length,
    chunks_before=1, chunks_after=0, causal=false, n_buckets=None
))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub(super) fn reformer_shapes(
    qk: Vec<usize>,
    v: Vec<usize>,
    rotations: Vec<usize>,
    mask_shape: Option<Vec<usize>>,
    buckets_shape: Option<Vec<usize>>,
    chunk_length: usize,
    chunks_before: usize,
    chunks_after: usize,
    causal: bool,
    n_buckets: Option<usize>,
) -> PyResult<(Vec<usize>, Vec<usize>, Option<Vec<usize>>)> {
    guarded(|| {
        let opts = options(chunk_length, chunks_before, chunks_after, causal, n_buckets);
        let c = |s: &Vec<usize>| Layout::contiguous(s);
        let (ql, vl, rl) = (c(&qk), c(&v), c(&rotations));
        let d = |l| (DType::F32, l);
        // A mask of qk's (B, N) is valid whatever it holds: only another shape is passed
        // on (without values), for the validator to refuse it by its shape.
        let mask = mask_shape
            .filter(|s| !(qk.len() == 4 && s[..] == qk[..2]))
            .map(|s| TokenMask::new(Vec::new(), &s));
        let p = reformer::validate(
            &ReformerLayouts {
                qk: d(&ql),
                v: d(&vl),
                rotations: d(&rl),
            },
            mask.as_ref(),
            &opts,
        )
        .map_err(to_py_err)?;
        if let Some(s) = buckets_shape {
            if !p.hashed() {
                // The validator's message for buckets of an unhashed call.
                let b = Buckets::new(Vec::new(), p.buckets_shape());
                reformer::validate_buckets(&p, &b).map_err(to_py_err)?;
            }
            if s[..] != p.buckets_shape()[..] {
                return Err(to_py_err(Error::ShapeMismatch {
                    detail: format!(
                        "buckets have shape {s:?}, expected {BUCKETS_LAYOUT} = {:?}",
                        p.buckets_shape()
                    ),
                }));
            }
        }
        let out = p.qkv_shape();
        check_output_size("out", &out).map_err(to_py_err)?;
        check_output_size("lse", &p.lse_shape()).map_err(to_py_err)?;
        let buckets = p.hashed().then(|| p.buckets_shape().to_vec());
        if let Some(b) = &buckets {
            check_output_size("the buckets", b).map_err(to_py_err)?;
        }
        Ok((out, p.lse_shape(), buckets))
    })
}
