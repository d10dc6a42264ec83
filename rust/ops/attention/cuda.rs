//! The CUDA path: kernel-specific checks, then the C launchers.

use std::ffi::c_void;

use super::{
    validate_backward_call, validate_inputs, AttentionGradients, AttentionOptions, AttentionOutput,
    AttentionProblem, SeqLens,
};
use crate::device::{DeviceBuffer, DeviceTensor, DeviceView, Stream};
use crate::error::{Error, Result};
use crate::ffi;
use crate::ops::glue::{
    borrowed, bsh, check_grid_and_views, check_out_rows, check_same_device, dtype_arg, i32_arg,
    lse_strides, order_after,
};
use crate::tensor::{DType, Layout};

/// Longest sequence (and packed row count) the kernels' 32-bit row arithmetic
/// handles: they form differences and sums of two lengths plus a few tiles.
const MAX_SEQLEN: u64 = 1 << 30;

/// Checks what the kernels need beyond the op's semantics: dtype, head dim, 16-byte
/// aligned rows, sizes that fit their 32-bit indices and grids, every view on
/// `device`.
pub fn check_kernel_support(
    p: &AttentionProblem,
    device: usize,
    views: &[(&'static str, &DeviceView)],
) -> Result<()> {
    if !matches!(p.dtype, DType::F16 | DType::BF16) {
        return Err(Error::UnsupportedDType {
            name: "q",
            dtype: p.dtype,
            supported: "the CUDA kernel takes float16 or bfloat16",
        });
    }
    // A head dim beyond i32 is no multiple of 8 up to 256 either (and must not wrap).
    let head_dim = i32::try_from(p.head_dim).unwrap_or(0);
    // SAFETY: a pure function of its argument.
    if unsafe { ffi::fk_attention_supports_head_dim(head_dim) } == 0 {
        return Err(Error::Unsupported(format!(
            "head_dim {} (the CUDA kernels take multiples of 8 up to 256)",
            p.head_dim
        )));
    }
    for (what, value) in [
        ("seqlen_q", p.seqlen_q),
        ("seqlen_k", p.seqlen_k),
        ("total rows of q", p.rows_q()),
        ("total rows of k", p.rows_k()),
    ] {
        if value as u64 > MAX_SEQLEN {
            return Err(Error::TooLarge {
                what: what.into(),
                value: value as u64,
                limit: MAX_SEQLEN,
            });
        }
    }
    check_grid_and_views(p.batch, p.heads, device, views)
}

/// Allocates O and LSE and runs the forward kernel on Q's stream.
pub fn forward(
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    opts: &AttentionOptions,
) -> Result<AttentionOutput<DeviceTensor>> {
    forward_any(q, k, v, None, opts)
}

pub(super) fn forward_any(
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    seqlens: Option<&SeqLens>,
    opts: &AttentionOptions,
) -> Result<AttentionOutput<DeviceTensor>> {
    let p = validate_inputs(
        (q.dtype(), q.layout()),
        (k.dtype(), k.layout()),
        (v.dtype(), v.layout()),
        seqlens,
        opts,
    )?;
    let stream = q.stream();
    order_after(stream, "q", &[("k", k), ("v", v)])?;
    let out = DeviceTensor::poisoned(stream, p.dtype, &p.q_shape())?;
    let lse = DeviceTensor::poisoned(stream, DType::F32, &p.lse_shape())?;
    // SAFETY: all views come from live DeviceTensors whose layouts were checked
    // against their allocations; outputs are freshly allocated with matching shapes.
    unsafe {
        launch_forward(
            &p,
            [&q.view(), &k.view(), &v.view(), &out.view(), &lse.view()],
            || Ok(stream.clone()),
        )?
    };
    Ok(AttentionOutput { out, lse })
}

/// Runs the forward kernel on raw device memory (a dense batch), writing into `out`
/// and `lse`.
///
/// # Safety
/// Every view must describe live device memory on its device that its layout stays
/// inside; `out` and `lse` must not overlap the inputs or each other; `stream` must
/// be a live stream (or null) of the views' device, ordered after whatever produced
/// the inputs.
pub unsafe fn forward_views(
    q: &DeviceView,
    k: &DeviceView,
    v: &DeviceView,
    out: &DeviceView,
    lse: &DeviceView,
    opts: &AttentionOptions,
    stream: *mut c_void,
) -> Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe { forward_views_varlen(q, k, v, out, lse, None, opts, stream) }
}

/// [`forward_views`] with optional variable-length sequences (host offsets; they
/// are copied to the device on `stream`).
///
/// # Safety
/// As [`forward_views`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn forward_views_varlen(
    q: &DeviceView,
    k: &DeviceView,
    v: &DeviceView,
    out: &DeviceView,
    lse: &DeviceView,
    seqlens: Option<&SeqLens>,
    opts: &AttentionOptions,
    stream: *mut c_void,
) -> Result<()> {
    let p = validate_inputs(
        (q.dtype, &q.layout),
        (k.dtype, &k.layout),
        (v.dtype, &v.layout),
        seqlens,
        opts,
    )?;
    // SAFETY: forwarded from the caller.
    unsafe { launch_forward(&p, [q, k, v, out, lse], || borrowed(q.device, stream)) }
}

fn check_lse_view(
    name: &str,
    view: &DeviceView,
    p: &AttentionProblem,
    device: usize,
) -> Result<()> {
    check_out_rows(name, view, DType::F32, &p.lse_shape())?;
    check_same_device("q", device, &[(name, view)])?;
    if view.ptr % 4 != 0 {
        return Err(Error::InvalidArgument(format!(
            "{name}: needs a 4-byte aligned pointer, got {:#x}",
            view.ptr
        )));
    }
    Ok(())
}

fn window_arg(w: Option<usize>) -> i32 {
    w.map_or(-1, |w| w.min(i32::MAX as usize) as i32)
}

/// Device copies of the varlen offsets (freed in stream order when dropped), and
/// their pointers (null for dense batches).
struct DeviceSeqLens {
    _bufs: Option<(DeviceBuffer, DeviceBuffer)>,
    q: *const i32,
    k: *const i32,
}

fn upload_seqlens(p: &AttentionProblem, stream: &Stream) -> Result<DeviceSeqLens> {
    let Some(s) = &p.seqlens else {
        return Ok(DeviceSeqLens {
            _bufs: None,
            q: std::ptr::null(),
            k: std::ptr::null(),
        });
    };
    let bq = DeviceBuffer::upload_values(stream, &s.cu_seqlens_q)?;
    let bk = DeviceBuffer::upload_values(stream, &s.cu_seqlens_k)?;
    Ok(DeviceSeqLens {
        q: bq.ptr() as *const i32,
        k: bk.ptr() as *const i32,
        _bufs: Some((bq, bk)),
    })
}

/// Varlen: the packed row counts of Q and K / V (the C ABI's total_q, total_k: cu_seqlens
/// are i32, so they fit); (0, 0) for dense batches, where they are ignored.
fn packed_rows(p: &AttentionProblem) -> (i32, i32) {
    p.seqlens.as_ref().map_or((0, 0), |s| {
        (s.cu_seqlens_q[p.batch], s.cu_seqlens_k[p.batch])
    })
}

/// The part of every attention kernel's parameters that Q, K, V, O and LSE give: the
/// Q, K, V pointers and the Q, K, V, O, LSE strides (dense and Longformer alike), and
/// the problem's shape (`attention_shape`).
pub(crate) fn attention_base(
    [q, k, v]: [&DeviceView; 3],
    out: &DeviceView,
    lse: &DeviceView,
    shape: ffi::fk_attention_shape,
) -> ffi::fk_attention_base {
    ffi::fk_attention_base {
        q: q.ptr as *const c_void,
        k: k.ptr as *const c_void,
        v: v.ptr as *const c_void,
        q_stride: bsh(&q.layout),
        k_stride: bsh(&k.layout),
        v_stride: bsh(&v.layout),
        o_stride: bsh(&out.layout),
        lse_stride: lse_strides(&lse.layout),
        shape,
    }
}

/// Sizes of an attention call as the kernels take them (`fk_attention_shape`):
/// `[batch, heads, heads_kv, seqlen_q, seqlen_k, head_dim]` (Longformer: heads_kv =
/// heads, seqlen_k = seqlen_q = N). The ops check their kernels' limits before; a size
/// that does not fit an i32 is still `Error::TooLarge` here, never a wrapped value.
pub(crate) fn attention_shape(
    sizes: [usize; 6],
    softmax_scale: f32,
    dtype: DType,
    device: usize,
) -> Result<ffi::fk_attention_shape> {
    let names = [
        "batch", "heads", "heads_kv", "seqlen_q", "seqlen_k", "head_dim",
    ];
    let mut v = [0i32; 6];
    for ((out, value), what) in v.iter_mut().zip(sizes).zip(names) {
        *out = i32_arg(what, value)?;
    }
    Ok(ffi::fk_attention_shape {
        batch: v[0],
        heads: v[1],
        heads_kv: v[2],
        seqlen_q: v[3],
        seqlen_k: v[4],
        head_dim: v[5],
        softmax_scale,
        dtype: dtype_arg(dtype),
        device: i32_arg("device", device)?,
    })
}

/// The shape of a dense problem on `device`.
fn dense_shape(p: &AttentionProblem, device: usize) -> Result<ffi::fk_attention_shape> {
    attention_shape(
        [
            p.batch, p.heads, p.heads_kv, p.seqlen_q, p.seqlen_k, p.head_dim,
        ],
        p.scale,
        p.dtype,
        device,
    )
}

/// Checks the output views against the problem, then launches the forward on the
/// stream `stream` gives (asked for only once every check has passed, so bad input
/// is reported as such even where there is no driver).
///
/// # Safety
/// As [`forward_views`].
pub(crate) unsafe fn launch_forward(
    p: &AttentionProblem,
    [q, k, v, out, lse]: [&DeviceView; 5],
    stream: impl FnOnce() -> Result<Stream>,
) -> Result<()> {
    check_out_rows("out", out, p.dtype, &p.q_shape())?;
    check_kernel_support(p, q.device, &[("q", q), ("k", k), ("v", v), ("out", out)])?;
    check_lse_view("lse", lse, p, q.device)?;
    let stream = &stream()?;
    let seqs = upload_seqlens(p, stream)?;
    let params = ffi::fk_attention_fwd_params {
        base: attention_base([q, k, v], out, lse, dense_shape(p, q.device)?),
        o: out.ptr as *mut c_void,
        lse: lse.ptr as *mut f32,
        cu_seqlens_q: seqs.q,
        cu_seqlens_k: seqs.k,
        window_left: window_arg(p.window_left),
        window_right: window_arg(p.window_right),
        total_q: packed_rows(p).0,
        total_k: packed_rows(p).1,
    };
    // SAFETY: params were validated above; the caller vouches for the memory.
    let code = unsafe { ffi::fk_attention_fwd(&params, stream.raw()) };
    ffi::check(code)
}

/// Allocates dQ, dK, dV and runs the backward kernels on Q's stream.
pub fn backward(
    t: [&DeviceTensor; 6],
    opts: &AttentionOptions,
) -> Result<AttentionGradients<DeviceTensor>> {
    backward_any(t, None, opts)
}

pub(super) fn backward_any(
    [q, k, v, out, lse, dout]: [&DeviceTensor; 6],
    seqlens: Option<&SeqLens>,
    opts: &AttentionOptions,
) -> Result<AttentionGradients<DeviceTensor>> {
    let t = [q, k, v, out, lse, dout];
    let p = validate_backward_call(t.map(DeviceTensor::described), seqlens, opts)?;
    let stream = q.stream();
    order_after(
        stream,
        "q",
        &[
            ("k", k),
            ("v", v),
            ("out", out),
            ("lse", lse),
            ("dout", dout),
        ],
    )?;
    let dq = DeviceTensor::poisoned(stream, p.dtype, &p.q_shape())?;
    let dk = DeviceTensor::poisoned(stream, p.dtype, &p.kv_shape())?;
    let dv = DeviceTensor::poisoned(stream, p.dtype, &p.kv_shape())?;
    // SAFETY: as in `forward_any`; the gradients are fresh allocations.
    unsafe {
        launch_backward(
            &p,
            [
                &q.view(),
                &k.view(),
                &v.view(),
                &out.view(),
                &lse.view(),
                &dout.view(),
                &dq.view(),
                &dk.view(),
                &dv.view(),
            ],
            || Ok(stream.clone()),
        )?
    };
    Ok(AttentionGradients { dq, dk, dv })
}

/// Runs the backward kernels on raw device memory, writing dQ, dK, dV.
/// `views` are q, k, v, out, lse, dout (inputs) then dq, dk, dv (outputs).
///
/// # Safety
/// As [`forward_views`]; dq, dk, dv must not overlap any other view.
pub unsafe fn backward_views(
    views: [&DeviceView; 9],
    seqlens: Option<&SeqLens>,
    opts: &AttentionOptions,
    stream: *mut c_void,
) -> Result<()> {
    let [q, k, v, out, lse, dout, ..] = views;
    let t = [q, k, v, out, lse, dout];
    let p = validate_backward_call(t.map(DeviceView::described), seqlens, opts)?;
    // SAFETY: forwarded from the caller.
    unsafe { launch_backward(&p, views, || borrowed(q.device, stream)) }
}

/// # Safety
/// As [`backward_views`].
pub(crate) unsafe fn launch_backward(
    p: &AttentionProblem,
    [q, k, v, out, lse, dout, dq, dk, dv]: [&DeviceView; 9],
    stream: impl FnOnce() -> Result<Stream>,
) -> Result<()> {
    check_out_rows("dq", dq, p.dtype, &p.q_shape())?;
    check_out_rows("dk", dk, p.dtype, &p.kv_shape())?;
    check_out_rows("dv", dv, p.dtype, &p.kv_shape())?;
    check_kernel_support(
        p,
        q.device,
        &[
            ("q", q),
            ("k", k),
            ("v", v),
            ("out", out),
            ("dout", dout),
            ("dq", dq),
            ("dk", dk),
            ("dv", dv),
        ],
    )?;
    check_lse_view("lse", lse, p, q.device)?;
    if lse.layout != Layout::contiguous(&p.lse_shape()) {
        return Err(Error::InvalidArgument(format!(
            "lse: the backward needs a contiguous lse {:?}, got strides {:?}",
            lse.layout.shape, lse.layout.strides
        )));
    }
    let stream = &stream()?;
    let seqs = upload_seqlens(p, stream)?;
    // Delta = rowsum(dO * O), laid out like the (contiguous) LSE; freed in stream
    // order after the kernels.
    let lse_len: usize = p.lse_shape().iter().product();
    // SAFETY: the kernels write every element they later read.
    let delta = unsafe { DeviceBuffer::alloc_elems::<f32>(stream, lse_len)? };
    let delta_ptr = delta.ptr();
    let params = ffi::fk_attention_bwd_params {
        base: attention_base([q, k, v], out, lse, dense_shape(p, q.device)?),
        o: out.ptr as *const c_void,
        dout: dout.ptr as *const c_void,
        lse: lse.ptr as *const f32,
        dq: dq.ptr as *mut c_void,
        dk: dk.ptr as *mut c_void,
        dv: dv.ptr as *mut c_void,
        delta: delta_ptr as *mut f32,
        cu_seqlens_q: seqs.q,
        cu_seqlens_k: seqs.k,
        do_stride: bsh(&dout.layout),
        dq_stride: bsh(&dq.layout),
        dk_stride: bsh(&dk.layout),
        dv_stride: bsh(&dv.layout),
        window_left: window_arg(p.window_left),
        window_right: window_arg(p.window_right),
        total_q: packed_rows(p).0,
        total_k: packed_rows(p).1,
    };
    // SAFETY: params were validated above; the caller vouches for the memory.
    let code = unsafe { ffi::fk_attention_bwd(&params, stream.raw()) };
    ffi::check(code)
}
