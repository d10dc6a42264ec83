//! The CUDA path of Linformer: the projection kernels of kernels/include/fk_linformer.h
//! (kp = E K̃, vp = F Ṽ as tensor-core GEMMs along N; their backward dK, dV, dE, dF) around
//! the dense attention kernels, unchanged, over the k projected keys.
//!
//! Why not one fused kernel: the projection reduces over all N keys for every (b, head),
//! so a query tile cannot start before it is complete; fusing it into the attention would
//! make every query block recompute E K (N·k·D work each). The projected kp / vp are k/N
//! the size of K / V, so writing and reading them back costs little next to Q and O.
//!
//! Entries on views the caller allocated (`launch_forward` / `launch_backward`, the Python
//! boundary's path) and on tensors allocated here (`forward` / `backward`, which call
//! them), as the other ops have them.

use std::ffi::c_void;

use super::{
    validate, validate_backward, LinformerBackwardLayouts, LinformerGradients, LinformerLayouts,
    LinformerOptions, LinformerOutput, LinformerProblem, TokenMask,
};
use crate::attention::{self, AttentionOptions};
use crate::device::{DeviceTensor, DeviceView, Stream};
use crate::error::{Error, Result};
use crate::ffi;
use crate::ops::glue::{
    bsh, check_out_rows, check_same_device, dtype_arg, i32_arg, order_after, ptr_or_null,
    too_large, upload_flags, workspace, MAX_GRID_YZ,
};
use crate::tensor::{DType, Layout};

/// The kernels' tile row and column indices are 32-bit with a tile of slack.
const MAX_INDEX: usize = (1 << 31) - 256;
/// Sequence positions per block of the projection's reduction (the GEMM's k-tile).
const POSITIONS_PER_TILE: usize = 64;
/// Blocks the forward projection aims for: two waves of an H100/H200's 132 SMs.
const TARGET_BLOCKS: usize = 264;
/// Fewest sequence positions one split of the forward reduction sums: shorter splits cost
/// more in f32 partials than they gain in parallelism.
const MIN_SPLIT_POSITIONS: usize = 512;

/// What the kernels need beyond the op's semantics (fk_linformer.h's refusals), checked
/// before anything is allocated: f16/bf16, head dims the attention kernels are compiled
/// for, the 32-bit grid and index limits.
pub fn check_kernel_limits(p: &LinformerProblem) -> Result<()> {
    if !matches!(p.dtype, DType::F16 | DType::BF16) {
        return Err(Error::UnsupportedDType {
            name: "q",
            dtype: p.dtype,
            supported: "the CUDA kernels take float16 or bfloat16",
        });
    }
    if p.head_dim % 8 != 0 || !(8..=256).contains(&p.head_dim) {
        return Err(Error::Unsupported(format!(
            "head_dim {} (the CUDA kernels take multiples of 8 up to 256)",
            p.head_dim
        )));
    }
    for (what, value) in [
        ("seqlen", p.seqlen),
        ("n_max", p.n_max),
        ("k (the projected length)", p.k_proj),
    ] {
        if value > MAX_INDEX {
            return Err(too_large(what, value, MAX_INDEX));
        }
    }
    let grid = p.batch.saturating_mul(p.heads_kv);
    if grid > MAX_GRID_YZ {
        return Err(too_large("batch * heads_kv", grid, MAX_GRID_YZ));
    }
    let de_cols = MAX_GRID_YZ * POSITIONS_PER_TILE;
    if p.n_max > de_cols {
        return Err(too_large("n_max", p.n_max, de_cols));
    }
    // The dE / dF reduction runs over (batch, heads sharing the projection, head_dim),
    // twice as long when F = E.
    let sums = if p.shared_kv { 2 } else { 1 };
    for heads in [p.e_heads, p.f_heads] {
        let cols = (p.heads_kv / heads)
            .saturating_mul(p.batch)
            .saturating_mul(p.head_dim)
            .saturating_mul(sums);
        if cols > MAX_INDEX {
            return Err(too_large(
                "the projection gradient's reduction (batch * heads per projection * head_dim)",
                cols,
                MAX_INDEX,
            ));
        }
    }
    Ok(())
}

/// Splits of the forward's reduction over N: enough blocks for two waves, each split at
/// least MIN_SPLIT_POSITIONS long, within grid z.
fn forward_splits(p: &LinformerProblem) -> usize {
    let tiles = |n: usize| n.div_ceil(POSITIONS_PER_TILE);
    let blocks = p.batch * p.heads_kv * tiles(p.k_proj) * tiles(p.head_dim);
    let wanted = TARGET_BLOCKS.div_ceil(blocks.max(1));
    let by_length = p.seqlen.div_ceil(MIN_SPLIT_POSITIONS);
    let by_grid = MAX_GRID_YZ / (p.batch * p.heads_kv).max(1);
    wanted.min(by_length).min(by_grid).max(1)
}

/// (head, row, col) strides of an E / F view.
fn proj_strides(v: &DeviceView) -> ffi::fk_proj_strides {
    let s = |i: usize| v.layout.strides[i] as i64;
    ffi::fk_proj_strides {
        head: s(0),
        row: s(1),
        col: s(2),
    }
}

/// The inputs' views: q, k, v, e and f (`None`: F = E).
pub(crate) struct InputViews<'a> {
    pub q: &'a DeviceView,
    pub k: &'a DeviceView,
    pub v: &'a DeviceView,
    pub e: &'a DeviceView,
    pub f: Option<&'a DeviceView>,
}

impl InputViews<'_> {
    fn named(&self) -> Vec<(&'static str, &DeviceView)> {
        let mut v = vec![("q", self.q), ("k", self.k), ("v", self.v), ("e", self.e)];
        v.extend(self.f.map(|f| ("f", f)));
        v
    }

    /// F, or E when F = E.
    fn f_or_e(&self) -> &DeviceView {
        self.f.unwrap_or(self.e)
    }
}

/// Every view on `device`, aligned to its elements; K/V-like rows 16-byte aligned for
/// the projection's vector loads are the kernels' choice (they fall back to element
/// loads), so only element alignment is required here.
fn check_views(device: usize, views: &[(&str, &DeviceView)]) -> Result<()> {
    check_same_device("q", device, views)?;
    for (name, v) in views {
        if v.ptr % v.dtype.size() as u64 != 0 {
            return Err(Error::InvalidArgument(format!(
                "{name}: pointer {:#x} is not aligned to its {}-byte elements",
                v.ptr,
                v.dtype.size()
            )));
        }
    }
    Ok(())
}

fn attention_options(p: &LinformerProblem) -> AttentionOptions {
    AttentionOptions {
        scale: Some(p.scale),
        ..Default::default()
    }
}

/// The forward: the projection into `kp`, `vp`, then the dense attention of (q, kp, vp)
/// into `out`, `lse`, all on `stream`.
///
/// # Safety
/// The views describe live device memory on `device` that their layouts stay inside,
/// ready on `stream`; the outputs overlap neither the inputs nor each other.
pub(crate) unsafe fn launch_forward(
    p: &LinformerProblem,
    ins: &InputViews<'_>,
    [out, lse, kp, vp]: [&DeviceView; 4],
    device: usize,
    stream: &Stream,
) -> Result<()> {
    check_kernel_limits(p)?;
    for (name, view) in [("kp", kp), ("vp", vp)] {
        check_out_rows(name, view, p.dtype, &p.proj_shape())?;
    }
    let mut views = ins.named();
    views.extend([("out", out), ("kp", kp), ("vp", vp)]);
    check_views(device, &views)?;
    let padding = upload_flags(&p.padding, stream)?;
    let f = ins.f_or_e();
    let mut params = ffi::fk_linformer_proj_params {
        k: ins.k.ptr as *const c_void,
        v: ins.v.ptr as *const c_void,
        e: ins.e.ptr as *const c_void,
        f: f.ptr as *const c_void,
        key_padding: ptr_or_null(&padding),
        kp: kp.ptr as *mut c_void,
        vp: vp.ptr as *mut c_void,
        workspace: std::ptr::null_mut(),
        k_stride: bsh(&ins.k.layout),
        v_stride: bsh(&ins.v.layout),
        kp_stride: bsh(&kp.layout),
        vp_stride: bsh(&vp.layout),
        e_stride: proj_strides(ins.e),
        f_stride: proj_strides(f),
        batch: i32_arg("batch", p.batch)?,
        seqlen: i32_arg("seqlen", p.seqlen)?,
        heads_kv: i32_arg("heads_kv", p.heads_kv)?,
        head_dim: i32_arg("head_dim", p.head_dim)?,
        k_proj: i32_arg("k", p.k_proj)?,
        n_max: i32_arg("n_max", p.n_max)?,
        e_heads: i32_arg("e's heads", p.e_heads)?,
        f_heads: i32_arg("f's heads", p.f_heads)?,
        splits: i32_arg("splits", forward_splits(p))?,
        dtype: dtype_arg(p.dtype),
        device: i32_arg("device", device)?,
    };
    // SAFETY: reads the params only.
    let bytes = unsafe { ffi::fk_linformer_proj_workspace_bytes(&params) };
    if params.splits > 1 && bytes <= 0 {
        return Err(Error::InvalidArgument(format!(
            "the Linformer projection kernels refused {p:?}"
        )));
    }
    let ws = workspace(stream, bytes.max(0) as usize)?;
    params.workspace = ws.ptr;
    // SAFETY: the caller vouches for the views; kp / vp were checked against the
    // problem, the workspace is fresh.
    ffi::check(unsafe { ffi::fk_linformer_proj_fwd(&params, stream.raw()) })?;
    // SAFETY: q, out, lse as the caller vouches; kp / vp were just written on `stream`.
    unsafe {
        attention::cuda::forward_views(ins.q, kp, vp, out, lse, &attention_options(p), stream.raw())
    }
}

/// A contiguous (B, k, H_kv, D) view of `ws` at byte `offset`.
fn proj_view(
    p: &LinformerProblem,
    ws: &crate::ops::glue::Workspace,
    offset: usize,
    device: usize,
) -> DeviceView {
    DeviceView {
        ptr: ws.ptr as u64 + offset as u64,
        dtype: p.dtype,
        layout: Layout::contiguous(&p.proj_shape()),
        device,
    }
}

/// The backward: the dense attention backward of (q, kp, vp) into dq and two workspace
/// tensors dkp, dvp, then the projection's backward into dk, dv, de (and df unless
/// F = E), all on `stream`. `fwd` are the forward's out, lse, kp, vp and dout.
///
/// # Safety
/// As [`launch_forward`]; the gradients overlap nothing else.
pub(crate) unsafe fn launch_backward(
    p: &LinformerProblem,
    ins: &InputViews<'_>,
    [out, lse, kp, vp, dout]: [&DeviceView; 5],
    [dq, dk, dv, de]: [&DeviceView; 4],
    df: Option<&DeviceView>,
    device: usize,
    stream: &Stream,
) -> Result<()> {
    check_kernel_limits(p)?;
    check_out_rows("dk", dk, p.dtype, &p.kv_shape())?;
    check_out_rows("dv", dv, p.dtype, &p.kv_shape())?;
    crate::ops::glue::check_out("de", de, p.dtype, &p.e_shape())?;
    match (df, p.shared_kv) {
        (Some(df), false) => crate::ops::glue::check_out("df", df, p.dtype, &p.f_shape())?,
        (None, true) => {}
        _ => {
            return Err(Error::InvalidArgument(
                "df is given exactly when F is (without F, dE holds both contributions)".into(),
            ))
        }
    }
    let mut views = ins.named();
    views.extend([("kp", kp), ("vp", vp), ("dk", dk), ("dv", dv), ("de", de)]);
    views.extend(df.map(|d| ("df", d)));
    check_views(device, &views)?;
    // dkp, dvp: the attention backward's dK, dV of the projected problem, in the dtype.
    let proj_bytes = p
        .batch
        .checked_mul(p.k_proj)
        .and_then(|n| n.checked_mul(p.heads_kv))
        .and_then(|n| n.checked_mul(p.head_dim))
        .and_then(|n| n.checked_mul(p.dtype.size()))
        .ok_or_else(|| too_large("the projected gradients' bytes", usize::MAX, usize::MAX))?;
    let half = proj_bytes.div_ceil(256) * 256;
    let scratch = workspace(stream, half * 2)?;
    let (dkp, dvp) = (
        proj_view(p, &scratch, 0, device),
        proj_view(p, &scratch, half, device),
    );
    // SAFETY: the caller vouches for the inputs, dq and the forward's tensors; dkp / dvp
    // are fresh.
    unsafe {
        attention::cuda::backward_views(
            [ins.q, kp, vp, out, lse, dout, dq, &dkp, &dvp],
            None,
            &attention_options(p),
            stream.raw(),
        )
    }?;
    let padding = upload_flags(&p.padding, stream)?;
    let f = ins.f_or_e();
    let mut params = ffi::fk_linformer_proj_bwd_params {
        k: ins.k.ptr as *const c_void,
        v: ins.v.ptr as *const c_void,
        e: ins.e.ptr as *const c_void,
        f: f.ptr as *const c_void,
        key_padding: ptr_or_null(&padding),
        dkp: dkp.ptr as *const c_void,
        dvp: dvp.ptr as *const c_void,
        dk: dk.ptr as *mut c_void,
        dv: dv.ptr as *mut c_void,
        de: de.ptr as *mut c_void,
        df: df.map_or(std::ptr::null_mut(), |d| d.ptr as *mut c_void),
        workspace: std::ptr::null_mut(),
        k_stride: bsh(&ins.k.layout),
        v_stride: bsh(&ins.v.layout),
        dkp_stride: bsh(&dkp.layout),
        dvp_stride: bsh(&dvp.layout),
        dk_stride: bsh(&dk.layout),
        dv_stride: bsh(&dv.layout),
        e_stride: proj_strides(ins.e),
        f_stride: proj_strides(f),
        de_stride: proj_strides(de),
        df_stride: df.map_or(proj_strides(de), proj_strides),
        shared_kv: i32::from(p.shared_kv),
        batch: i32_arg("batch", p.batch)?,
        seqlen: i32_arg("seqlen", p.seqlen)?,
        heads_kv: i32_arg("heads_kv", p.heads_kv)?,
        head_dim: i32_arg("head_dim", p.head_dim)?,
        k_proj: i32_arg("k", p.k_proj)?,
        n_max: i32_arg("n_max", p.n_max)?,
        e_heads: i32_arg("e's heads", p.e_heads)?,
        f_heads: i32_arg("f's heads", p.f_heads)?,
        dtype: dtype_arg(p.dtype),
        device: i32_arg("device", device)?,
    };
    // SAFETY: reads the params only.
    let bytes = unsafe { ffi::fk_linformer_proj_bwd_workspace_bytes(&params) };
    let ws = workspace(stream, bytes.max(0) as usize)?;
    params.workspace = ws.ptr;
    // SAFETY: the caller vouches for the views; dkp / dvp were written on `stream`.
    let code = unsafe { ffi::fk_linformer_proj_bwd(&params, stream.raw()) };
    drop(scratch); // freed in stream order, after the launch
    ffi::check(code)
}

/// The input tensors as views, in [`super::Inputs::named`]'s order.
fn input_views(t: &[Option<&DeviceTensor>; 5]) -> [Option<DeviceView>; 5] {
    t.map(|t| t.map(DeviceTensor::view))
}

fn input_refs(v: &[Option<DeviceView>; 5]) -> InputViews<'_> {
    InputViews {
        q: v[0].as_ref().expect("q is always given"),
        k: v[1].as_ref().expect("k is always given"),
        v: v[2].as_ref().expect("v is always given"),
        e: v[3].as_ref().expect("e is always given"),
        f: v[4].as_ref(),
    }
}

fn layouts<'a>(t: &[Option<&'a DeviceTensor>; 5]) -> LinformerLayouts<'a> {
    let d = |i: usize| t[i].map(DeviceTensor::described);
    LinformerLayouts {
        q: d(0).expect("q is always given"),
        k: d(1).expect("k is always given"),
        v: d(2).expect("v is always given"),
        e: d(3).expect("e is always given"),
        f: d(4),
    }
}

/// The inputs but q, named, for stream ordering.
fn others<'a>(t: &[Option<&'a DeviceTensor>; 5]) -> Vec<(&'static str, &'a DeviceTensor)> {
    ["q", "k", "v", "e", "f"]
        .into_iter()
        .zip(t)
        .skip(1)
        .filter_map(|(n, t)| t.map(|t| (n, t)))
        .collect()
}

/// The forward on device tensors (q, k, v, e, f in that order): validates, orders q's
/// stream after the others', allocates O, LSE, kp, vp (contiguous) and launches.
pub(crate) fn forward(
    t: &[Option<&DeviceTensor>; 5],
    mask: Option<&TokenMask>,
    opts: &LinformerOptions,
) -> Result<LinformerOutput<DeviceTensor>> {
    let p = validate(&layouts(t), mask, opts)?;
    check_kernel_limits(&p)?;
    let q = t[0].expect("q is always given");
    let stream = q.stream();
    order_after(stream, "q", &others(t))?;
    let out = DeviceTensor::poisoned(stream, p.dtype, &p.q_shape())?;
    let lse = DeviceTensor::poisoned(stream, DType::F32, &p.lse_shape())?;
    let kp = DeviceTensor::poisoned(stream, p.dtype, &p.proj_shape())?;
    let vp = DeviceTensor::poisoned(stream, p.dtype, &p.proj_shape())?;
    let views = input_views(t);
    // SAFETY: views of live DeviceTensors whose layouts fit their allocations; the
    // outputs are fresh.
    unsafe {
        launch_forward(
            &p,
            &input_refs(&views),
            [&out.view(), &lse.view(), &kp.view(), &vp.view()],
            stream.ordinal(),
            stream,
        )
    }?;
    Ok(LinformerOutput { out, lse, kp, vp })
}

/// The backward on device tensors: the inputs (q, k, v, e, f), then the forward's out,
/// lse, kp, vp and dout. Allocates the gradients (contiguous) and launches.
pub(crate) fn backward(
    t: &[Option<&DeviceTensor>; 5],
    [out, lse, kp, vp, dout]: [&DeviceTensor; 5],
    mask: Option<&TokenMask>,
    opts: &LinformerOptions,
) -> Result<LinformerGradients<DeviceTensor>> {
    let p = validate(&layouts(t), mask, opts)?;
    validate_backward(
        &p,
        &LinformerBackwardLayouts {
            out: out.described(),
            lse: lse.described(),
            kp: kp.described(),
            vp: vp.described(),
            dout: dout.described(),
        },
    )?;
    check_kernel_limits(&p)?;
    let q = t[0].expect("q is always given");
    let stream = q.stream();
    let mut before = others(t);
    before.extend([
        ("out", out),
        ("lse", lse),
        ("kp", kp),
        ("vp", vp),
        ("dout", dout),
    ]);
    order_after(stream, "q", &before)?;
    let new = |dtype: DType, shape: &[usize]| DeviceTensor::poisoned(stream, dtype, shape);
    let g = LinformerGradients {
        dq: new(p.dtype, &p.q_shape())?,
        dk: new(p.dtype, &p.kv_shape())?,
        dv: new(p.dtype, &p.kv_shape())?,
        de: new(p.dtype, &p.e_shape())?,
        df: (!p.shared_kv)
            .then(|| new(p.dtype, &p.f_shape()))
            .transpose()?,
    };
    let views = input_views(t);
    let df = g.df.as_ref().map(DeviceTensor::view);
    // SAFETY: views of live DeviceTensors; the gradients are fresh.
    unsafe {
        launch_backward(
            &p,
            &input_refs(&views),
            [
                &out.view(),
                &lse.view(),
                &kp.view(),
                &vp.view(),
                &dout.view(),
            ],
            [&g.dq.view(), &g.dk.view(), &g.dv.view(), &g.de.view()],
            df.as_ref(),
            stream.ordinal(),
            stream,
        )
    }?;
    Ok(g)
}
