//! The CUDA path of the Longformer op: the kernels' own checks, one upload of the
//! schedule (masks, dilations, work lists), then the passes of fk_longformer.h in stream
//! order. The forward is two passes (local rows, global rows); the backward six (delta,
//! dQ local, dK/dV band, dK/dV global columns, dQ global rows, dK/dV global rows).

use std::ffi::c_void;

use super::plan::{backward_plan, cached_plan, forward_plan, Arena, Schedule, Shared, Slot};
use super::schedule::{BWD_BLOCK, FWD_BLOCK_M, FWD_BLOCK_N};
use super::{
    validate, validate_backward, LongformerGradients, LongformerOptions, LongformerOutput,
    LongformerProblem, TokenMask,
};
use crate::device::{memset_async, DeviceBuffer, DeviceTensor, DeviceView, Stream};
use crate::error::{Error, Result};
use crate::ffi;
use crate::ops::attention::cuda::{attention_base, attention_shape};
use crate::ops::glue::{
    borrowed, bsh, check_contiguous, check_grid_and_views, check_out_rows, order_after,
};
use crate::tensor::{DType, Layout};

const _: () = assert!(
    ffi::FK_LONGFORMER_BLOCK_M as usize == FWD_BLOCK_M
        && ffi::FK_LONGFORMER_BLOCK_N as usize == FWD_BLOCK_N
        && ffi::FK_LONGFORMER_BWD_BLOCK as usize == BWD_BLOCK,
    "the host's work lists assume the ABI's tile sizes"
);

/// Longest sequence the kernels' 32-bit token arithmetic handles.
const MAX_SEQLEN: usize = 1 << 30;
/// Largest head dim the Longformer kernels are instantiated for.
const MAX_HEAD_DIM: usize = 128;

/// Checks what the kernels need beyond the op's semantics: dtype, head dim, sizes that
/// fit their indices and grids, 16-byte aligned rows, every view on one device.
fn check_kernel_support(
    p: &LongformerProblem,
    device: usize,
    views: &[(&'static str, &DeviceView)],
) -> Result<()> {
    if !matches!(p.dtype, DType::F16 | DType::BF16) {
        return Err(Error::UnsupportedDType {
            name: "q",
            dtype: p.dtype,
            supported: "the CUDA kernels take float16 or bfloat16",
        });
    }
    if p.head_dim % 8 != 0 || p.head_dim > MAX_HEAD_DIM {
        return Err(Error::Unsupported(format!(
            "head_dim {} (the Longformer CUDA kernels take multiples of 8 up to {MAX_HEAD_DIM})",
            p.head_dim
        )));
    }
    if p.seqlen > MAX_SEQLEN {
        return Err(Error::TooLarge {
            what: "seqlen".into(),
            value: p.seqlen as u64,
            limit: MAX_SEQLEN as u64,
        });
    }
    check_grid_and_views(p.batch, p.heads, device, views)
}

fn check_lse(name: &str, view: &DeviceView, p: &LongformerProblem, device: usize) -> Result<()> {
    check_out_rows(name, view, DType::F32, &p.lse_shape())?;
    if view.layout != Layout::contiguous(&p.lse_shape()) {
        return Err(Error::InvalidArgument(format!(
            "{name}: must be a contiguous (batch, heads, seqlen) float32 tensor, got strides {:?}",
            view.layout.strides
        )));
    }
    if view.device != device {
        return Err(Error::DeviceMismatch {
            detail: format!(
                "{name} is on cuda:{} but q is on cuda:{device}",
                view.device
            ),
        });
    }
    if view.ptr % 4 != 0 {
        return Err(Error::InvalidArgument(format!(
            "{name}: needs a 4-byte aligned pointer, got {:#x}",
            view.ptr
        )));
    }
    Ok(())
}

/// The arena on the device: one copy, freed in stream order when dropped.
fn upload(arena: &Arena, stream: &Stream) -> Result<Uploaded> {
    let buf = DeviceBuffer::upload(stream, &arena.bytes)?;
    Ok(Uploaded {
        base: buf.ptr(),
        _buf: buf,
    })
}

struct Uploaded {
    _buf: DeviceBuffer,
    base: u64,
}

impl Uploaded {
    fn i32(&self, s: Slot) -> *const i32 {
        (self.base + s.0 as u64) as *const i32
    }
    fn u8(&self, s: Slot) -> *const u8 {
        (self.base + s.0 as u64) as *const u8
    }
}

/// One pass's schedule: pass, gathered rows, classes, work list.
struct PassArgs {
    pass: u32,
    q_rows: bool,
    k_rows: bool,
    per_class: bool,
    list: (Slot, Slot),
}

/// The shape of a Longformer problem on `device` (no GQA; N queries and N keys).
fn longformer_shape(p: &LongformerProblem, device: usize) -> Result<ffi::fk_attention_shape> {
    attention_shape(
        [p.batch, p.heads, p.heads, p.seqlen, p.seqlen, p.head_dim],
        p.scale,
        p.dtype,
        device,
    )
}

fn common(
    p: &LongformerProblem,
    s: &Schedule,
    sh: &Shared,
    up: &Uploaded,
    a: &PassArgs,
) -> ffi::fk_longformer_common {
    let per_seq = s.globals.as_ref().map_or(0, |g| g.per_seq) as i32;
    let rows = sh.global_rows.map_or(std::ptr::null(), |r| up.i32(r));
    ffi::fk_longformer_common {
        window: p.window.min(i32::MAX as usize) as i32,
        causal: p.causal as i32,
        dilation: up.i32(sh.dilation),
        global_mask: up.u8(sh.global_mask),
        padding_mask: up.u8(sh.padding_mask),
        pass: a.pass as i32,
        q_rows: if a.q_rows { rows } else { std::ptr::null() },
        q_rows_per_seq: if a.q_rows { per_seq } else { 0 },
        k_rows: if a.k_rows { rows } else { std::ptr::null() },
        k_rows_per_seq: if a.k_rows { per_seq } else { 0 },
        head_class: up.i32(if a.per_class {
            sh.head_class
        } else {
            sh.one_class
        }),
        num_classes: if a.per_class { s.num_classes as i32 } else { 1 },
        tile_offsets: up.i32(a.list.0),
        tile_ids: up.i32(a.list.1),
    }
}

/// Allocates O and LSE and runs the forward on Q's stream. `globals` are Q_g, K_g, V_g
/// (when absent, Q, K, V serve for global rows too).
pub fn forward(
    [q, k, v]: [&DeviceTensor; 3],
    globals: Option<[&DeviceTensor; 3]>,
    global_mask: Option<&TokenMask>,
    padding_mask: Option<&TokenMask>,
    opts: &LongformerOptions,
) -> Result<LongformerOutput<DeviceTensor>> {
    let p = problem_of_views(
        [&q.view(), &k.view(), &v.view()],
        globals.map(|g| g.map(DeviceTensor::view)).as_ref(),
        global_mask,
        padding_mask,
        opts,
    )?;
    let stream = q.stream();
    let mut inputs = vec![("k", k), ("v", v)];
    if let Some([qg, kg, vg]) = globals {
        inputs.extend([("q_global", qg), ("k_global", kg), ("v_global", vg)]);
    }
    order_after(stream, "q", &inputs)?;
    let out = DeviceTensor::poisoned(stream, p.dtype, &p.qkv_shape())?;
    let lse = DeviceTensor::poisoned(stream, DType::F32, &p.lse_shape())?;
    let g = globals.map(|g| g.map(DeviceTensor::view));
    // SAFETY: every view comes from a live DeviceTensor; the outputs are fresh.
    unsafe {
        launch_forward(
            &p,
            [&q.view(), &k.view(), &v.view()],
            g.as_ref().map(|[a, b, c]| [a, b, c]),
            [&out.view(), &lse.view()],
            || Ok(stream.clone()),
        )?
    };
    Ok(LongformerOutput { out, lse })
}

fn problem_of_views(
    [q, k, v]: [&DeviceView; 3],
    globals: Option<&[DeviceView; 3]>,
    global_mask: Option<&TokenMask>,
    padding_mask: Option<&TokenMask>,
    opts: &LongformerOptions,
) -> Result<LongformerProblem> {
    validate(
        (q.dtype, &q.layout),
        (k.dtype, &k.layout),
        (v.dtype, &v.layout),
        globals.map(|[a, b, c]| {
            [
                (a.dtype, &a.layout),
                (b.dtype, &b.layout),
                (c.dtype, &c.layout),
            ]
        }),
        global_mask,
        padding_mask,
        opts,
    )
}

/// Runs the forward on raw device memory, writing `out` (B, N, H, D) and `lse`
/// (B, H, N) f32 contiguous.
///
/// # Safety
/// Every view must describe live device memory on its device that its layout stays
/// inside; `out` and `lse` must not overlap the inputs or each other; `stream` must be a
/// live stream (or null) of the views' device, ordered after whatever produced the inputs.
#[allow(clippy::too_many_arguments)]
pub unsafe fn forward_views(
    [q, k, v]: [&DeviceView; 3],
    globals: Option<[&DeviceView; 3]>,
    out: &DeviceView,
    lse: &DeviceView,
    global_mask: Option<&TokenMask>,
    padding_mask: Option<&TokenMask>,
    opts: &LongformerOptions,
    stream: *mut c_void,
) -> Result<()> {
    let owned = globals.map(|g| g.map(Clone::clone));
    let p = problem_of_views([q, k, v], owned.as_ref(), global_mask, padding_mask, opts)?;
    // SAFETY: forwarded from the caller.
    unsafe {
        launch_forward(&p, [q, k, v], globals, [out, lse], || {
            borrowed(q.device, stream)
        })
    }
}

/// # Safety
/// As [`forward_views`].
pub(crate) unsafe fn launch_forward(
    p: &LongformerProblem,
    [q, k, v]: [&DeviceView; 3],
    globals: Option<[&DeviceView; 3]>,
    [out, lse]: [&DeviceView; 2],
    stream: impl FnOnce() -> Result<Stream>,
) -> Result<()> {
    check_out_rows("out", out, p.dtype, &p.qkv_shape())?;
    let mut views = vec![("q", q), ("k", k), ("v", v), ("out", out)];
    if let Some([qg, kg, vg]) = globals {
        views.extend([("q_global", qg), ("k_global", kg), ("v_global", vg)]);
    }
    check_kernel_support(p, q.device, &views)?;
    check_lse("lse", lse, p, q.device)?;

    let plan = cached_plan(p, false, forward_plan)?;
    let stream = &stream()?;
    let up = upload(&plan.arena, stream)?;
    let (s, sh) = (&plan.s, &plan.sh);
    let local = plan.lists[0];
    let global = s
        .globals
        .as_ref()
        .map(|g| (plan.lists[1], plan.splits[1], g.per_seq));

    let shape = longformer_shape(p, q.device)?;
    let params = |a: PassArgs, [q, k, v]: [&DeviceView; 3], split: (i32, u64, u64)| {
        ffi::fk_longformer_fwd_params {
            base: attention_base([q, k, v], out, lse, shape),
            c: common(p, s, sh, &up, &a),
            o: out.ptr as *mut c_void,
            lse: lse.ptr as *mut f32,
            num_splits: split.0,
            partial_o: split.1 as *mut f32,
            partial_lse: split.2 as *mut f32,
        }
    };
    let local_params = params(
        PassArgs {
            pass: ffi::FK_LONGFORMER_LOCAL,
            q_rows: false,
            k_rows: s.globals.is_some(),
            per_class: true,
            list: local,
        },
        [q, k, v],
        (1, 0, 0),
    );
    // SAFETY: params were validated above; the caller vouches for the memory.
    ffi::check(unsafe { ffi::fk_longformer_fwd(&local_params, stream.raw()) })?;
    if let Some((list, splits, per_seq)) = global {
        // Workspace of the split pass: partial O (f32) and LSE per split; freed in stream
        // order after the combine.
        let rows = splits * p.batch * p.heads * per_seq;
        let workspace = if splits > 1 {
            // SAFETY: the split pass writes every element the combine reads.
            Some(unsafe { DeviceBuffer::alloc_elems::<f32>(stream, rows * (p.head_dim + 1))? })
        } else {
            None
        };
        let (po, pl) = match &workspace {
            Some(w) => (w.ptr(), w.ptr() + (rows * p.head_dim * 4) as u64),
            None => (0, 0),
        };
        let global_params = params(
            PassArgs {
                pass: ffi::FK_LONGFORMER_GLOBAL_ROWS,
                q_rows: true,
                k_rows: false,
                per_class: false,
                list,
            },
            globals.unwrap_or([q, k, v]),
            (splits as i32, po, pl),
        );
        // SAFETY: as above.
        ffi::check(unsafe { ffi::fk_longformer_fwd(&global_params, stream.raw()) })?;
    }
    Ok(())
}

/// The backward's tensors: inputs (and their global projections) and outputs.
pub struct BackwardViews<'a> {
    /// Q, K, V.
    pub inputs: [&'a DeviceView; 3],
    /// Q_g, K_g, V_g when given.
    pub globals: Option<[&'a DeviceView; 3]>,
    /// The forward's O and LSE, and dO.
    pub out: &'a DeviceView,
    pub lse: &'a DeviceView,
    pub dout: &'a DeviceView,
    /// dQ, dK, dV (contiguous).
    pub grads: [&'a DeviceView; 3],
    /// dQ_g, dK_g, dV_g (contiguous): required exactly when `globals` is given.
    pub global_grads: Option<[&'a DeviceView; 3]>,
}

/// Allocates the gradients and runs the backward on Q's stream.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    [q, k, v]: [&DeviceTensor; 3],
    globals: Option<[&DeviceTensor; 3]>,
    out: &DeviceTensor,
    lse: &DeviceTensor,
    dout: &DeviceTensor,
    global_mask: Option<&TokenMask>,
    padding_mask: Option<&TokenMask>,
    opts: &LongformerOptions,
) -> Result<LongformerGradients<DeviceTensor>> {
    let gviews = globals.map(|g| g.map(DeviceTensor::view));
    let p = problem_of_views(
        [&q.view(), &k.view(), &v.view()],
        gviews.as_ref(),
        global_mask,
        padding_mask,
        opts,
    )?;
    validate_backward(
        &p,
        (out.dtype(), out.layout()),
        (lse.dtype(), lse.layout()),
        (dout.dtype(), dout.layout()),
    )?;
    let stream = q.stream();
    let mut inputs = vec![
        ("k", k),
        ("v", v),
        ("out", out),
        ("lse", lse),
        ("dout", dout),
    ];
    if let Some([qg, kg, vg]) = globals {
        inputs.extend([("q_global", qg), ("k_global", kg), ("v_global", vg)]);
    }
    order_after(stream, "q", &inputs)?;
    let alloc = || DeviceTensor::poisoned(stream, p.dtype, &p.qkv_shape());
    let grads = [alloc()?, alloc()?, alloc()?];
    let global_grads = match globals {
        Some(_) => Some([alloc()?, alloc()?, alloc()?]),
        None => None,
    };
    let (qv, kv, vv) = (q.view(), k.view(), v.view());
    let (ov, lv, dov) = (out.view(), lse.view(), dout.view());
    let gv = grads.each_ref().map(DeviceTensor::view);
    let ggv = global_grads
        .as_ref()
        .map(|g| g.each_ref().map(DeviceTensor::view));
    let views = BackwardViews {
        inputs: [&qv, &kv, &vv],
        globals: gviews.as_ref().map(|[a, b, c]| [a, b, c]),
        out: &ov,
        lse: &lv,
        dout: &dov,
        grads: [&gv[0], &gv[1], &gv[2]],
        global_grads: ggv.as_ref().map(|[a, b, c]| [a, b, c]),
    };
    // SAFETY: every view comes from a live DeviceTensor; the gradients are fresh.
    unsafe { launch_backward(&p, &views, || Ok(stream.clone()))? };
    let [dq, dk, dv] = grads;
    Ok(LongformerGradients {
        dq,
        dk,
        dv,
        global: global_grads,
    })
}

/// Runs the backward on raw device memory, writing the gradients in `views`.
///
/// # Safety
/// As [`forward_views`]; the gradient views must not overlap any other view.
pub unsafe fn backward_views(
    views: &BackwardViews<'_>,
    global_mask: Option<&TokenMask>,
    padding_mask: Option<&TokenMask>,
    opts: &LongformerOptions,
    stream: *mut c_void,
) -> Result<()> {
    let owned = views.globals.map(|g| g.map(Clone::clone));
    let p = problem_of_views(
        views.inputs,
        owned.as_ref(),
        global_mask,
        padding_mask,
        opts,
    )?;
    validate_backward(
        &p,
        (views.out.dtype, &views.out.layout),
        (views.lse.dtype, &views.lse.layout),
        (views.dout.dtype, &views.dout.layout),
    )?;
    let device = views.inputs[0].device;
    // SAFETY: forwarded from the caller.
    unsafe { launch_backward(&p, views, || borrowed(device, stream)) }
}

/// # Safety
/// As [`backward_views`].
pub(crate) unsafe fn launch_backward(
    p: &LongformerProblem,
    vw: &BackwardViews<'_>,
    stream: impl FnOnce() -> Result<Stream>,
) -> Result<()> {
    let [q, k, v] = vw.inputs;
    if vw.globals.is_some() != vw.global_grads.is_some() {
        return Err(Error::InvalidArgument(
            "the global projections' gradients are needed exactly when the projections are given"
                .into(),
        ));
    }
    let mut views = vec![
        ("q", q),
        ("k", k),
        ("v", v),
        ("out", vw.out),
        ("dout", vw.dout),
    ];
    let mut outputs = vec![
        ("dq", vw.grads[0]),
        ("dk", vw.grads[1]),
        ("dv", vw.grads[2]),
    ];
    if let Some([qg, kg, vg]) = vw.globals {
        views.extend([("q_global", qg), ("k_global", kg), ("v_global", vg)]);
    }
    if let Some([a, b, c]) = vw.global_grads {
        outputs.extend([("dq_global", a), ("dk_global", b), ("dv_global", c)]);
    }
    for &(name, view) in &outputs {
        check_out_rows(name, view, p.dtype, &p.qkv_shape())?;
        check_contiguous(
            name,
            view,
            "the Longformer backward writes contiguous gradients",
        )?;
    }
    views.extend(outputs.iter().copied());
    check_kernel_support(p, q.device, &views)?;
    check_lse("lse", vw.lse, p, q.device)?;

    let plan = cached_plan(p, true, backward_plan)?;
    let (s, sh) = (&plan.s, &plan.sh);
    let global_lists = s.globals.as_ref().map(|g| {
        let l = &plan.lists;
        (
            (l[2], plan.splits[2]),
            (l[3], plan.splits[3]),
            l[4],
            g.per_seq,
        )
    });
    let (dq_local, band) = (plan.lists[0], plan.lists[1]);
    let stream = &stream()?;
    let up = upload(&plan.arena, stream)?;
    // One workspace for the split passes' f32 partial sums (dK and dV of GLOBAL_COLS, or dQ
    // of GLOBAL_ROWS; the passes run one after the other in stream order).
    let partial_len = global_lists.map_or(0, |((_, cs), (_, rs), _, per_seq)| {
        let rows = p.batch * p.heads * per_seq * p.head_dim;
        let cols = if cs > 1 { 2 * cs * rows } else { 0 };
        let dq = if rs > 1 { rs * rows } else { 0 };
        cols.max(dq)
    });
    let partial = if partial_len > 0 {
        // SAFETY: each split pass writes every partial element its reduce reads.
        Some(unsafe { DeviceBuffer::alloc_elems::<f32>(stream, partial_len)? })
    } else {
        None
    };
    let partial_ptr = partial.as_ref().map_or(0, DeviceBuffer::ptr);
    let lse_len: usize = p.lse_shape().iter().product();
    // SAFETY: the delta pass writes every element before any pass reads it.
    let delta = unsafe { DeviceBuffer::alloc_elems::<f32>(stream, lse_len)? };
    let delta_ptr = delta.ptr();

    let bytes = p.batch * p.seqlen * p.heads * p.head_dim * p.dtype.size();
    if let Some([dqg, dkg, dvg]) = vw.global_grads {
        // Rows the global passes do not write are zero: dQ_g off the global rows always,
        // all of dK_g, dV_g when no sequence has a global token.
        let zero: &[&DeviceView] = if s.globals.is_some() {
            &[dqg]
        } else {
            &[dqg, dkg, dvg]
        };
        for z in zero {
            // SAFETY: a checked contiguous view of `bytes` bytes on this device.
            unsafe { memset_async(stream, z.ptr, 0, bytes)? };
        }
    }

    let shape = longformer_shape(p, q.device)?;
    let params = |a: PassArgs,
                  [q, k, v]: [&DeviceView; 3],
                  [dq, dk, dv]: [&DeviceView; 3],
                  accumulate: bool,
                  splits: usize| {
        ffi::fk_longformer_bwd_params {
            base: attention_base([q, k, v], vw.out, vw.lse, shape),
            c: common(p, s, sh, &up, &a),
            o: vw.out.ptr as *const c_void,
            dout: vw.dout.ptr as *const c_void,
            lse: vw.lse.ptr as *const f32,
            delta: delta_ptr as *mut f32,
            dq: dq.ptr as *mut c_void,
            dk: dk.ptr as *mut c_void,
            dv: dv.ptr as *mut c_void,
            do_stride: bsh(&vw.dout.layout),
            dq_stride: bsh(&dq.layout),
            dk_stride: bsh(&dk.layout),
            dv_stride: bsh(&dv.layout),
            accumulate: accumulate as i32,
            num_splits: splits as i32,
            partial: if splits > 1 {
                partial_ptr as *mut f32
            } else {
                std::ptr::null_mut()
            },
        }
    };
    let pass = |pass: u32, q_rows: bool, k_rows: bool, per_class: bool, list| PassArgs {
        pass,
        q_rows,
        k_rows,
        per_class,
        list,
    };
    let local_in = [q, k, v];
    let grads = vw.grads;
    let run =
        |f: unsafe extern "C" fn(*const ffi::fk_longformer_bwd_params, *mut c_void) -> i32,
         params: ffi::fk_longformer_bwd_params| {
            // SAFETY: params were validated above; the caller vouches for the memory.
            ffi::check(unsafe { f(&params, stream.raw()) })
        };

    // 1-3: delta, the local rows' dQ, the band's dK / dV.
    let band_pass = pass(ffi::FK_LONGFORMER_LOCAL_BAND, false, false, true, band);
    let delta_params = params(band_pass, local_in, grads, false, 1);
    run(ffi::fk_longformer_bwd_delta, delta_params)?;
    let packed = s.globals.is_some();
    let dq_pass = pass(ffi::FK_LONGFORMER_LOCAL, false, packed, true, dq_local);
    run(
        ffi::fk_longformer_bwd_dq,
        params(dq_pass, local_in, grads, false, 1),
    )?;
    let band_pass = pass(ffi::FK_LONGFORMER_LOCAL_BAND, false, false, true, band);
    run(
        ffi::fk_longformer_bwd_dkdv,
        params(band_pass, local_in, grads, false, 1),
    )?;

    if let Some(((cols, cols_splits), (rows, rows_splits), rows_by_key, _)) = global_lists {
        // 4: the local rows' dK / dV of global keys (rows the band pass left at zero).
        let cols_pass = pass(ffi::FK_LONGFORMER_GLOBAL_COLS, false, true, false, cols);
        let cols_params = params(cols_pass, local_in, grads, false, cols_splits);
        run(ffi::fk_longformer_bwd_dkdv, cols_params)?;
        // 5-6: global rows, on their projections; into the local gradients (dQ rows the
        // local pass set to zero, dK / dV accumulated) when there are none.
        let (global_in, global_out, accumulate) = match (vw.globals, vw.global_grads) {
            (Some(g), Some(gg)) => (g, gg, false),
            _ => (local_in, grads, true),
        };
        let rows_pass = pass(ffi::FK_LONGFORMER_GLOBAL_ROWS, true, false, false, rows);
        let rows_params = params(rows_pass, global_in, global_out, false, rows_splits);
        run(ffi::fk_longformer_bwd_dq, rows_params)?;
        let by_key = pass(
            ffi::FK_LONGFORMER_GLOBAL_ROWS,
            true,
            false,
            false,
            rows_by_key,
        );
        let by_key_params = params(by_key, global_in, global_out, accumulate, 1);
        run(ffi::fk_longformer_bwd_dkdv, by_key_params)?;
    }
    Ok(())
}
