//! Dense scaled-dot-product attention, forward and backward: validate -> plan ->
//! launch (or the CPU reference, behind the same signature).
//!
//! Layout: Q is (B, Nq, H, D), K and V are (B, Nk, H_kv, D), given by shape and strides
//! (in elements), so a (B, H, N, D) tensor is passed by swapping the strides of dims 1
//! and 2, with no copy. The head dim must have unit stride. Outputs: O (B, Nq, H, D)
//! contiguous in Q's dtype and LSE (B, H, Nq) f32, the natural-log logsumexp of each
//! scaled score row.
//!
//! Variable-length batches ([`forward_varlen`], [`backward_varlen`]) pack B sequences
//! along the row axis, as flash-attn's varlen API: Q is (total_q, H, D), K and V are
//! (total_k, H_kv, D), sequence b owns rows `cu_seqlens_q[b]..cu_seqlens_q[b+1]` (and
//! likewise for K), and LSE is (H, total_q). No work or memory goes to padding.
//!
//! Masking, per sequence (nq queries, nk keys), aligned bottom-right as
//! FlashAttention >= 2.1: query i sees key j iff
//! `i + nk - nq - left <= j <= i + nk - nq + right`, where `causal` caps right at 0 and
//! an absent window side is unbounded. A row with no visible key gives O = 0,
//! LSE = -inf and zero gradients.
//!
//! GQA / MQA: H is a multiple of H_kv; query head h reads K/V head h / (H / H_kv), and
//! dK, dV sum over each group's query heads.
//!
//! The backward is deterministic (bitwise-identical gradients from run to run) on both
//! paths: the CUDA kernels use no atomics; every gradient row is summed by one thread
//! block in a fixed order. There is no faster non-deterministic mode to opt into.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::reference;
use crate::tensor::{DType, HostTensor, Layout};
use crate::Tensor;

/// Options shared by every attention entry point.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AttentionOptions {
    /// Softmax scale; `None` means 1/sqrt(D).
    pub scale: Option<f32>,
    /// Causal mask, aligned bottom-right (the same as `window_right = Some(0)`).
    pub causal: bool,
    /// Sliding window: keys at most this many positions before the (aligned) diagonal;
    /// `None` is unbounded. Inclusive, as FlashAttention's `window_size[0]`.
    pub window_left: Option<usize>,
    /// Keys at most this many positions after the diagonal (`window_size[1]`).
    pub window_right: Option<usize>,
}

/// Sequence boundaries of a variable-length batch: B+1 offsets into the packed rows of
/// Q and of K/V (flash-attn's `cu_seqlens_q` / `cu_seqlens_k`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqLens {
    pub cu_seqlens_q: Vec<i32>,
    pub cu_seqlens_k: Vec<i32>,
}

/// O and LSE of one forward call.
#[derive(Debug)]
pub struct AttentionOutput<T> {
    pub out: T,
    pub lse: T,
}

/// dQ, dK, dV of one backward call, each laid out (and typed) like its input.
#[derive(Debug)]
pub struct AttentionGradients<T> {
    pub dq: T,
    pub dk: T,
    pub dv: T,
}

/// Sizes of a validated call (the "plan" of this op).
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionProblem {
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub heads_kv: usize,
    /// Query length; the longest sequence's for varlen.
    pub seqlen_q: usize,
    /// Key length; the longest sequence's for varlen.
    pub seqlen_k: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub causal: bool,
    pub window_left: Option<usize>,
    /// Right window with `causal` folded in (causal means `Some(0)` at most).
    pub window_right: Option<usize>,
    pub dtype: DType,
    /// `Some` for variable-length batches.
    pub seqlens: Option<SeqLens>,
}

impl AttentionProblem {
    /// Query heads per key/value head.
    pub fn group_size(&self) -> usize {
        self.heads / self.heads_kv
    }

    /// True when some keys are masked by causality or a window.
    pub fn has_mask(&self) -> bool {
        self.window_left.is_some() || self.window_right.is_some()
    }

    /// Rows of packed Q (B * Nq for dense batches).
    pub fn rows_q(&self) -> usize {
        match &self.seqlens {
            Some(s) => *s.cu_seqlens_q.last().expect("validated") as usize,
            None => self.batch * self.seqlen_q,
        }
    }

    /// Rows of packed K and V.
    pub fn rows_k(&self) -> usize {
        match &self.seqlens {
            Some(s) => *s.cu_seqlens_k.last().expect("validated") as usize,
            None => self.batch * self.seqlen_k,
        }
    }

    /// Rows of packed Q that sequence `b` owns.
    pub fn q_rows(&self, b: usize) -> Range<usize> {
        match &self.seqlens {
            Some(s) => s.cu_seqlens_q[b] as usize..s.cu_seqlens_q[b + 1] as usize,
            None => b * self.seqlen_q..(b + 1) * self.seqlen_q,
        }
    }

    /// Rows of packed K / V that sequence `b` owns.
    pub fn k_rows(&self, b: usize) -> Range<usize> {
        match &self.seqlens {
            Some(s) => s.cu_seqlens_k[b] as usize..s.cu_seqlens_k[b + 1] as usize,
            None => b * self.seqlen_k..(b + 1) * self.seqlen_k,
        }
    }

    /// Index in the contiguous LSE of (sequence b, query head h, query i of b).
    pub fn lse_index(&self, b: usize, h: usize, i: usize) -> usize {
        match &self.seqlens {
            Some(s) => h * self.rows_q() + s.cu_seqlens_q[b] as usize + i,
            None => (b * self.heads + h) * self.seqlen_q + i,
        }
    }

    /// Keys that query `i` of a sequence with `nq` queries and `nk` keys sees.
    pub fn visible_keys(&self, i: usize, nq: usize, nk: usize) -> Range<usize> {
        let diag = i as i64 + nk as i64 - nq as i64; // the aligned diagonal's key
        let lo = self.window_left.map_or(0, |w| diag - w as i64).max(0);
        let hi = self
            .window_right
            .map_or(nk as i64, |w| diag.saturating_add(w as i64) + 1)
            .min(nk as i64);
        if lo >= hi {
            0..0
        } else {
            lo as usize..hi as usize
        }
    }

    /// Shape of Q, O, dO and dQ.
    pub fn q_shape(&self) -> Vec<usize> {
        match self.seqlens {
            Some(_) => vec![self.rows_q(), self.heads, self.head_dim],
            None => vec![self.batch, self.seqlen_q, self.heads, self.head_dim],
        }
    }

    /// Shape of K, V, dK and dV.
    pub fn kv_shape(&self) -> Vec<usize> {
        match self.seqlens {
            Some(_) => vec![self.rows_k(), self.heads_kv, self.head_dim],
            None => vec![self.batch, self.seqlen_k, self.heads_kv, self.head_dim],
        }
    }

    /// Shape of LSE: (B, H, Nq), or (H, total_q) for varlen.
    pub fn lse_shape(&self) -> Vec<usize> {
        match self.seqlens {
            Some(_) => vec![self.heads, self.rows_q()],
            None => vec![self.batch, self.heads, self.seqlen_q],
        }
    }

    /// Forward FLOPs: multiply-adds x2 of the two matmuls. Plain and causal dense
    /// problems use FlashAttention's benchmark convention (causal = half, as
    /// ../shared/ANCHORS.md); windows and varlen count the visible pairs exactly.
    pub fn flops(&self) -> f64 {
        let per_pair = 4.0 * self.heads as f64 * self.head_dim as f64;
        if self.seqlens.is_none() && self.window_left.is_none() {
            let f = per_pair * self.batch as f64 * self.seqlen_q as f64 * self.seqlen_k as f64;
            return if self.causal { f / 2.0 } else { f };
        }
        let pairs: usize = (0..self.batch)
            .map(|b| {
                let (nq, nk) = (self.q_rows(b).len(), self.k_rows(b).len());
                (0..nq)
                    .map(|i| self.visible_keys(i, nq, nk).len())
                    .sum::<usize>()
            })
            .sum();
        per_pair * pairs as f64
    }
}

const QKV_LAYOUT: &str = "(batch, seqlen, heads, head_dim)";
const VARLEN_LAYOUT: &str = "(total_seqlen, heads, head_dim)";

/// Checks Q, K, V (by dtype and layout) and the options for a dense batch; returns the
/// problem sizes.
pub fn validate(
    q: (DType, &Layout),
    k: (DType, &Layout),
    v: (DType, &Layout),
    opts: &AttentionOptions,
) -> Result<AttentionProblem> {
    validate_inputs(q, k, v, None, opts)
}

/// Like [`validate`], for a variable-length batch: Q, K, V are packed
/// (total, heads, head_dim) and `seqlens` must be B+1 non-decreasing offsets from 0 to
/// the total of each.
pub fn validate_varlen(
    q: (DType, &Layout),
    k: (DType, &Layout),
    v: (DType, &Layout),
    seqlens: &SeqLens,
    opts: &AttentionOptions,
) -> Result<AttentionProblem> {
    validate_inputs(q, k, v, Some(seqlens), opts)
}

fn validate_inputs(
    q: (DType, &Layout),
    k: (DType, &Layout),
    v: (DType, &Layout),
    seqlens: Option<&SeqLens>,
    opts: &AttentionOptions,
) -> Result<AttentionProblem> {
    let (rank, layout_name) = match seqlens {
        Some(_) => (3, VARLEN_LAYOUT),
        None => (4, QKV_LAYOUT),
    };
    for (name, (_, l)) in [("q", q), ("k", k), ("v", v)] {
        check_layout(name, l, rank, layout_name)?;
    }
    if q.0 != k.0 || q.0 != v.0 {
        return Err(Error::DTypeMismatch {
            detail: format!("q is {}, k is {}, v is {}", q.0, k.0, v.0),
        });
    }
    let (qs, ks, vs) = (&q.1.shape, &k.1.shape, &v.1.shape);
    if ks != vs {
        return Err(Error::ShapeMismatch {
            detail: format!("k has shape {ks:?} but v has shape {vs:?}"),
        });
    }
    // The last two dims are (heads, head_dim) in both layouts.
    let (hq, hkv, d) = (qs[rank - 2], ks[rank - 2], qs[rank - 1]);
    if qs[rank - 1] != ks[rank - 1] || (rank == 4 && qs[0] != ks[0]) {
        let what = if rank == 4 {
            "batch and head_dim"
        } else {
            "head_dim"
        };
        return Err(Error::ShapeMismatch {
            detail: format!("q {qs:?} and k {ks:?} must agree on {what} {layout_name}"),
        });
    }
    if hq % hkv != 0 {
        return Err(Error::ShapeMismatch {
            detail: format!(
                "q has {hq} heads, which is not a multiple of k/v's {hkv} heads \
                 (grouped-query attention needs heads_q % heads_kv == 0)"
            ),
        });
    }
    let scale = opts.scale.unwrap_or(1.0 / (d as f32).sqrt());
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::InvalidArgument(format!(
            "scale must be finite and positive, got {scale}"
        )));
    }
    let window_right = match (opts.causal, opts.window_right) {
        (true, _) => Some(0),
        (false, w) => w,
    };
    let (batch, seqlen_q, seqlen_k) = match seqlens {
        None => (qs[0], qs[1], ks[1]),
        Some(s) => {
            check_cu_seqlens("cu_seqlens_q", &s.cu_seqlens_q, qs[0])?;
            check_cu_seqlens("cu_seqlens_k", &s.cu_seqlens_k, ks[0])?;
            if s.cu_seqlens_q.len() != s.cu_seqlens_k.len() {
                return Err(Error::ShapeMismatch {
                    detail: format!(
                        "cu_seqlens_q has {} offsets but cu_seqlens_k has {}: both must be \
                         batch + 1",
                        s.cu_seqlens_q.len(),
                        s.cu_seqlens_k.len()
                    ),
                });
            }
            let longest = |cu: &[i32]| cu.windows(2).map(|w| (w[1] - w[0]) as usize).max();
            (
                s.cu_seqlens_q.len() - 1,
                longest(&s.cu_seqlens_q).unwrap_or(0),
                longest(&s.cu_seqlens_k).unwrap_or(0),
            )
        }
    };
    Ok(AttentionProblem {
        batch,
        heads: hq,
        heads_kv: hkv,
        seqlen_q,
        seqlen_k,
        head_dim: d,
        scale,
        causal: opts.causal,
        window_left: opts.window_left,
        window_right,
        dtype: q.0,
        seqlens: seqlens.cloned(),
    })
}

fn check_layout(name: &'static str, l: &Layout, rank: usize, layout: &'static str) -> Result<()> {
    if l.shape.len() != rank {
        return Err(Error::Rank {
            name,
            expected: rank,
            layout,
            shape: l.shape.clone(),
        });
    }
    if l.strides.len() != rank {
        return Err(Error::InvalidArgument(format!(
            "{name}: shape {:?} has {} strides {:?}",
            l.shape,
            l.strides.len(),
            l.strides
        )));
    }
    if l.numel() == 0 {
        return Err(Error::Empty {
            name,
            shape: l.shape.clone(),
        });
    }
    if l.strides[rank - 1] != 1 {
        return Err(Error::NonUnitStride {
            name,
            shape: l.shape.clone(),
            strides: l.strides.clone(),
        });
    }
    Ok(())
}

/// B+1 offsets, starting at 0, non-decreasing, ending at `total` rows.
fn check_cu_seqlens(name: &str, cu: &[i32], total: usize) -> Result<()> {
    let bad = |why: String| Err(Error::InvalidArgument(format!("{name}: {why}")));
    if cu.len() < 2 {
        return bad(format!(
            "needs batch + 1 >= 2 offsets, got {} ({cu:?})",
            cu.len()
        ));
    }
    if cu[0] != 0 {
        return bad(format!("must start at 0, got {}", cu[0]));
    }
    if let Some(i) = cu.windows(2).position(|w| w[1] < w[0]) {
        return bad(format!(
            "must be non-decreasing, but offset {} is {} and offset {} is {}",
            i,
            cu[i],
            i + 1,
            cu[i + 1]
        ));
    }
    let last = *cu.last().expect("len >= 2");
    if last as usize != total {
        return bad(format!(
            "ends at {last} but the packed tensor has {total} rows (out of range or short)"
        ));
    }
    Ok(())
}

/// Checks the backward's extra inputs (O, dO like Q; LSE f32 of the problem's LSE
/// shape) against a validated forward problem.
pub fn validate_backward(
    p: &AttentionProblem,
    out: (DType, &Layout),
    lse: (DType, &Layout),
    dout: (DType, &Layout),
) -> Result<()> {
    let q_shape = p.q_shape();
    let layout_name = if p.seqlens.is_some() {
        VARLEN_LAYOUT
    } else {
        QKV_LAYOUT
    };
    for (name, (dtype, l)) in [("out", out), ("dout", dout)] {
        check_layout(name, l, q_shape.len(), layout_name)?;
        if l.shape != q_shape {
            return Err(Error::ShapeMismatch {
                detail: format!("{name} has shape {:?}, expected q's {q_shape:?}", l.shape),
            });
        }
        if dtype != p.dtype {
            return Err(Error::DTypeMismatch {
                detail: format!("{name} is {dtype} but q is {}", p.dtype),
            });
        }
    }
    let lse_shape = p.lse_shape();
    if lse.1.shape != lse_shape || lse.1.strides.len() != lse_shape.len() {
        return Err(Error::ShapeMismatch {
            detail: format!(
                "lse has shape {:?}, expected {lse_shape:?} (the forward's lse)",
                lse.1.shape
            ),
        });
    }
    if lse.0 != DType::F32 {
        return Err(Error::UnsupportedDType {
            name: "lse",
            dtype: lse.0,
            supported: "lse is float32, as the forward returns it",
        });
    }
    Ok(())
}

/// Attention forward on host or device tensors: the CPU reference for host tensors, the
/// CUDA kernel (on the tensors' stream) for device tensors. All three must live on the
/// same side.
pub fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &AttentionOptions,
) -> Result<AttentionOutput<Tensor>> {
    forward_any(q, k, v, None, opts)
}

/// [`forward`] for a variable-length batch.
pub fn forward_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqlens: &SeqLens,
    opts: &AttentionOptions,
) -> Result<AttentionOutput<Tensor>> {
    forward_any(q, k, v, Some(seqlens), opts)
}

fn forward_any(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqlens: Option<&SeqLens>,
    opts: &AttentionOptions,
) -> Result<AttentionOutput<Tensor>> {
    match (q, k, v) {
        (Tensor::Host(q), Tensor::Host(k), Tensor::Host(v)) => {
            let o = forward_cpu_any(q, k, v, seqlens, opts)?;
            Ok(AttentionOutput {
                out: Tensor::Host(o.out),
                lse: Tensor::Host(o.lse),
            })
        }
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        (Tensor::Cuda(q), Tensor::Cuda(k), Tensor::Cuda(v)) => {
            let o = cuda::forward_any(q, k, v, seqlens, opts)?;
            Ok(AttentionOutput {
                out: Tensor::Cuda(o.out),
                lse: Tensor::Cuda(o.lse),
            })
        }
        #[allow(unreachable_patterns)]
        _ => Err(mixed_devices(&[("q", q), ("k", k), ("v", v)])),
    }
}

fn mixed_devices(ts: &[(&str, &Tensor)]) -> Error {
    let where_: Vec<String> = ts
        .iter()
        .map(|(n, t)| format!("{n} on {}", t.device_name()))
        .collect();
    Error::DeviceMismatch {
        detail: format!("{}: all must be on one device", where_.join(", ")),
    }
}

/// The CPU reference on host tensors (f32 accumulation; O in Q's dtype).
pub fn forward_cpu(
    q: &HostTensor,
    k: &HostTensor,
    v: &HostTensor,
    opts: &AttentionOptions,
) -> Result<AttentionOutput<HostTensor>> {
    forward_cpu_any(q, k, v, None, opts)
}

/// [`forward_cpu`] for a variable-length batch.
pub fn forward_cpu_varlen(
    q: &HostTensor,
    k: &HostTensor,
    v: &HostTensor,
    seqlens: &SeqLens,
    opts: &AttentionOptions,
) -> Result<AttentionOutput<HostTensor>> {
    forward_cpu_any(q, k, v, Some(seqlens), opts)
}

fn f32_data(t: &HostTensor) -> Vec<f32> {
    t.to_contiguous(DType::F32).to_f32_vec()
}

fn forward_cpu_any(
    q: &HostTensor,
    k: &HostTensor,
    v: &HostTensor,
    seqlens: Option<&SeqLens>,
    opts: &AttentionOptions,
) -> Result<AttentionOutput<HostTensor>> {
    let p = validate_inputs(
        (q.dtype(), q.layout()),
        (k.dtype(), k.layout()),
        (v.dtype(), v.layout()),
        seqlens,
        opts,
    )?;
    let (o, lse) = reference::attention(&p, &f32_data(q), &f32_data(k), &f32_data(v));
    let out = HostTensor::from_vec(o, &p.q_shape())?.to_contiguous(p.dtype);
    let lse = HostTensor::from_vec(lse, &p.lse_shape())?;
    Ok(AttentionOutput { out, lse })
}

/// Attention backward: dQ, dK, dV from the forward's inputs, its O and LSE, and dO.
/// Host tensors run the CPU reference, device tensors the CUDA kernels.
pub fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    opts: &AttentionOptions,
) -> Result<AttentionGradients<Tensor>> {
    backward_any([q, k, v, out, lse, dout], None, opts)
}

/// [`backward`] for a variable-length batch.
#[allow(clippy::too_many_arguments)]
pub fn backward_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    seqlens: &SeqLens,
    opts: &AttentionOptions,
) -> Result<AttentionGradients<Tensor>> {
    backward_any([q, k, v, out, lse, dout], Some(seqlens), opts)
}

fn backward_any(
    t: [&Tensor; 6],
    seqlens: Option<&SeqLens>,
    opts: &AttentionOptions,
) -> Result<AttentionGradients<Tensor>> {
    match t {
        [Tensor::Host(q), Tensor::Host(k), Tensor::Host(v), Tensor::Host(o), Tensor::Host(l), Tensor::Host(d)] =>
        {
            let g = backward_cpu_any([q, k, v, o, l, d], seqlens, opts)?;
            Ok(AttentionGradients {
                dq: Tensor::Host(g.dq),
                dk: Tensor::Host(g.dk),
                dv: Tensor::Host(g.dv),
            })
        }
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        [Tensor::Cuda(q), Tensor::Cuda(k), Tensor::Cuda(v), Tensor::Cuda(o), Tensor::Cuda(l), Tensor::Cuda(d)] =>
        {
            let g = cuda::backward_any([q, k, v, o, l, d], seqlens, opts)?;
            Ok(AttentionGradients {
                dq: Tensor::Cuda(g.dq),
                dk: Tensor::Cuda(g.dk),
                dv: Tensor::Cuda(g.dv),
            })
        }
        #[allow(unreachable_patterns)]
        [q, k, v, o, l, d] => Err(mixed_devices(&[
            ("q", q),
            ("k", k),
            ("v", v),
            ("out", o),
            ("lse", l),
            ("dout", d),
        ])),
    }
}

/// The CPU reference backward on host tensors (f32; gradients in Q's dtype).
pub fn backward_cpu(
    q: &HostTensor,
    k: &HostTensor,
    v: &HostTensor,
    out: &HostTensor,
    lse: &HostTensor,
    dout: &HostTensor,
    opts: &AttentionOptions,
) -> Result<AttentionGradients<HostTensor>> {
    backward_cpu_any([q, k, v, out, lse, dout], None, opts)
}

/// [`backward_cpu`] for a variable-length batch.
#[allow(clippy::too_many_arguments)]
pub fn backward_cpu_varlen(
    q: &HostTensor,
    k: &HostTensor,
    v: &HostTensor,
    out: &HostTensor,
    lse: &HostTensor,
    dout: &HostTensor,
    seqlens: &SeqLens,
    opts: &AttentionOptions,
) -> Result<AttentionGradients<HostTensor>> {
    backward_cpu_any([q, k, v, out, lse, dout], Some(seqlens), opts)
}

fn backward_cpu_any(
    [q, k, v, out, lse, dout]: [&HostTensor; 6],
    seqlens: Option<&SeqLens>,
    opts: &AttentionOptions,
) -> Result<AttentionGradients<HostTensor>> {
    let p = validate_inputs(
        (q.dtype(), q.layout()),
        (k.dtype(), k.layout()),
        (v.dtype(), v.layout()),
        seqlens,
        opts,
    )?;
    validate_backward(
        &p,
        (out.dtype(), out.layout()),
        (lse.dtype(), lse.layout()),
        (dout.dtype(), dout.layout()),
    )?;
    let g = reference::attention_backward(
        &p,
        &f32_data(q),
        &f32_data(k),
        &f32_data(v),
        &f32_data(out),
        &f32_data(lse),
        &f32_data(dout),
    );
    Ok(AttentionGradients {
        dq: HostTensor::from_vec(g.dq, &p.q_shape())?.to_contiguous(p.dtype),
        dk: HostTensor::from_vec(g.dk, &p.kv_shape())?.to_contiguous(p.dtype),
        dv: HostTensor::from_vec(g.dv, &p.kv_shape())?.to_contiguous(p.dtype),
    })
}

#[cfg(any(feature = "cuda", feature = "emulator"))]
pub mod cuda {
    //! The CUDA path: kernel-specific checks, then the C launchers.

    use std::ffi::c_void;

    use super::{
        validate_backward, validate_inputs, AttentionGradients, AttentionOptions, AttentionOutput,
        AttentionProblem, SeqLens,
    };
    use crate::device::{Device, DeviceBuffer, DeviceTensor, DeviceView, Stream};
    use crate::error::{Error, Result};
    use crate::ffi;
    use crate::tensor::{DType, Layout};

    /// Largest grid y/z extent (heads, batch).
    const MAX_GRID_YZ: usize = 65_535;
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
        // SAFETY: a pure function of its argument.
        if unsafe { ffi::fk_attention_supports_head_dim(p.head_dim as i32) } == 0 {
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

    /// Batch and heads within the grid's y / z extents; every view on `device` with
    /// 16-byte aligned rows (the kernels' cp.async and vector stores).
    pub(crate) fn check_grid_and_views(
        batch: usize,
        heads: usize,
        device: usize,
        views: &[(&'static str, &DeviceView)],
    ) -> Result<()> {
        for (what, value) in [("batch", batch), ("heads", heads)] {
            if value > MAX_GRID_YZ {
                return Err(Error::TooLarge {
                    what: what.into(),
                    value: value as u64,
                    limit: MAX_GRID_YZ as u64,
                });
            }
        }
        for (name, view) in views {
            if view.device != device {
                return Err(Error::DeviceMismatch {
                    detail: format!(
                        "{name} is on cuda:{} but q is on cuda:{device}",
                        view.device
                    ),
                });
            }
            let elem = view.dtype.size() as u64;
            let misaligned_stride = view.layout.strides[..view.layout.strides.len() - 1]
                .iter()
                .any(|&s| (s as u64 * elem) % 16 != 0);
            if view.ptr % 16 != 0 || misaligned_stride {
                return Err(Error::InvalidArgument(format!(
                    "{name}: the CUDA kernel needs 16-byte aligned rows (pointer {:#x}, strides {:?} \
                     in {}-byte elements); make the tensor contiguous",
                    view.ptr, view.layout.strides, elem
                )));
            }
        }
        Ok(())
    }

    /// Makes `stream` wait for every other tensor's stream, all on one device.
    pub(crate) fn order_after(stream: &Stream, others: &[(&str, &DeviceTensor)]) -> Result<()> {
        for (name, t) in others {
            if t.stream().ordinal() != stream.ordinal() {
                return Err(Error::DeviceMismatch {
                    detail: format!(
                        "{name} is on cuda:{} but q is on cuda:{}",
                        t.stream().ordinal(),
                        stream.ordinal()
                    ),
                });
            }
            // Inputs written on another stream: order the launch after them without
            // blocking the host.
            stream.wait_for(t.stream())?;
        }
        Ok(())
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
        order_after(stream, &[("k", k), ("v", v)])?;
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

    /// Checks an output view's dtype, shape and unit last stride.
    pub(crate) fn check_out(
        name: &str,
        view: &DeviceView,
        dtype: DType,
        shape: &[usize],
    ) -> Result<()> {
        let unit_last = view.layout.strides.len() == view.layout.shape.len()
            && view.layout.strides.last() == Some(&1);
        if view.layout.shape != shape || view.dtype != dtype || !unit_last {
            return Err(Error::ShapeMismatch {
                detail: format!(
                    "{name} must be {dtype} {shape:?} with unit last stride, got {} {:?} strides {:?}",
                    view.dtype, view.layout.shape, view.layout.strides
                ),
            });
        }
        Ok(())
    }

    fn check_lse_view(
        name: &str,
        view: &DeviceView,
        p: &AttentionProblem,
        device: usize,
    ) -> Result<()> {
        check_out(name, view, DType::F32, &p.lse_shape())?;
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

    /// (batch, row, head) strides of a Q/K/V-like view: a packed varlen view has no
    /// batch stride (its rows are located through cu_seqlens).
    pub(crate) fn bsh(l: &Layout) -> (i64, i64, i64) {
        let s = |i: usize| l.strides[i] as i64;
        if l.strides.len() == 3 {
            (0, s(0), s(1))
        } else {
            (s(0), s(1), s(2))
        }
    }

    /// (batch, head) strides of an LSE-like view: (B, H, N) or varlen (H, total).
    pub(crate) fn lse_strides(l: &Layout) -> (i64, i64) {
        if l.strides.len() == 2 {
            (0, l.strides[0] as i64)
        } else {
            (l.strides[0] as i64, l.strides[1] as i64)
        }
    }

    fn window_arg(w: Option<usize>) -> i32 {
        w.map_or(-1, |w| w.min(i32::MAX as usize) as i32)
    }

    pub(crate) fn dtype_arg(d: DType) -> i32 {
        match d {
            DType::F16 => ffi::fk_dtype_FK_DTYPE_F16 as i32,
            _ => ffi::fk_dtype_FK_DTYPE_BF16 as i32,
        }
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

    /// The caller's raw stream (torch's, cupy's, or null) as a [`Stream`].
    ///
    /// # Safety
    /// `raw` must be a live stream of `device`'s primary context (or null).
    pub(crate) unsafe fn borrowed(device: usize, raw: *mut c_void) -> Result<Stream> {
        // SAFETY: as the caller vouches.
        Ok(unsafe { Device::new(device)?.borrow_stream(raw) })
    }

    /// Checks the output views against the problem, then launches the forward on the
    /// stream `stream` gives (asked for only once every check has passed, so bad input
    /// is reported as such even where there is no driver).
    ///
    /// # Safety
    /// As [`forward_views`].
    unsafe fn launch_forward(
        p: &AttentionProblem,
        [q, k, v, out, lse]: [&DeviceView; 5],
        stream: impl FnOnce() -> Result<Stream>,
    ) -> Result<()> {
        check_out("out", out, p.dtype, &p.q_shape())?;
        check_kernel_support(p, q.device, &[("q", q), ("k", k), ("v", v), ("out", out)])?;
        check_lse_view("lse", lse, p, q.device)?;
        let stream = &stream()?;
        let seqs = upload_seqlens(p, stream)?;
        let (q_b, q_r, q_h) = bsh(&q.layout);
        let (k_b, k_r, k_h) = bsh(&k.layout);
        let (v_b, v_r, v_h) = bsh(&v.layout);
        let (o_b, o_r, o_h) = bsh(&out.layout);
        let (l_b, l_h) = lse_strides(&lse.layout);
        let params = ffi::fk_attention_fwd_params {
            q: q.ptr as *const c_void,
            k: k.ptr as *const c_void,
            v: v.ptr as *const c_void,
            o: out.ptr as *mut c_void,
            lse: lse.ptr as *mut f32,
            cu_seqlens_q: seqs.q,
            cu_seqlens_k: seqs.k,
            q_batch_stride: q_b,
            q_row_stride: q_r,
            q_head_stride: q_h,
            k_batch_stride: k_b,
            k_row_stride: k_r,
            k_head_stride: k_h,
            v_batch_stride: v_b,
            v_row_stride: v_r,
            v_head_stride: v_h,
            o_batch_stride: o_b,
            o_row_stride: o_r,
            o_head_stride: o_h,
            lse_batch_stride: l_b,
            lse_head_stride: l_h,
            batch: p.batch as i32,
            heads: p.heads as i32,
            heads_kv: p.heads_kv as i32,
            seqlen_q: p.seqlen_q as i32,
            seqlen_k: p.seqlen_k as i32,
            head_dim: p.head_dim as i32,
            softmax_scale: p.scale,
            window_left: window_arg(p.window_left),
            window_right: window_arg(p.window_right),
            dtype: dtype_arg(p.dtype),
            device: q.device as i32,
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
        let p = validate_inputs(
            (q.dtype(), q.layout()),
            (k.dtype(), k.layout()),
            (v.dtype(), v.layout()),
            seqlens,
            opts,
        )?;
        validate_backward(
            &p,
            (out.dtype(), out.layout()),
            (lse.dtype(), lse.layout()),
            (dout.dtype(), dout.layout()),
        )?;
        let stream = q.stream();
        order_after(
            stream,
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
        let p = validate_inputs(
            (q.dtype, &q.layout),
            (k.dtype, &k.layout),
            (v.dtype, &v.layout),
            seqlens,
            opts,
        )?;
        validate_backward(
            &p,
            (out.dtype, &out.layout),
            (lse.dtype, &lse.layout),
            (dout.dtype, &dout.layout),
        )?;
        // SAFETY: forwarded from the caller.
        unsafe { launch_backward(&p, views, || borrowed(q.device, stream)) }
    }

    /// # Safety
    /// As [`backward_views`].
    unsafe fn launch_backward(
        p: &AttentionProblem,
        [q, k, v, out, lse, dout, dq, dk, dv]: [&DeviceView; 9],
        stream: impl FnOnce() -> Result<Stream>,
    ) -> Result<()> {
        check_out("dq", dq, p.dtype, &p.q_shape())?;
        check_out("dk", dk, p.dtype, &p.kv_shape())?;
        check_out("dv", dv, p.dtype, &p.kv_shape())?;
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
        let (q_b, q_r, q_h) = bsh(&q.layout);
        let (k_b, k_r, k_h) = bsh(&k.layout);
        let (v_b, v_r, v_h) = bsh(&v.layout);
        let (o_b, o_r, o_h) = bsh(&out.layout);
        let (do_b, do_r, do_h) = bsh(&dout.layout);
        let (dq_b, dq_r, dq_h) = bsh(&dq.layout);
        let (dk_b, dk_r, dk_h) = bsh(&dk.layout);
        let (dv_b, dv_r, dv_h) = bsh(&dv.layout);
        let (l_b, l_h) = lse_strides(&lse.layout);
        let params = ffi::fk_attention_bwd_params {
            q: q.ptr as *const c_void,
            k: k.ptr as *const c_void,
            v: v.ptr as *const c_void,
            o: out.ptr as *const c_void,
            dout: dout.ptr as *const c_void,
            lse: lse.ptr as *const f32,
            dq: dq.ptr as *mut c_void,
            dk: dk.ptr as *mut c_void,
            dv: dv.ptr as *mut c_void,
            delta: delta_ptr as *mut f32,
            cu_seqlens_q: seqs.q,
            cu_seqlens_k: seqs.k,
            q_batch_stride: q_b,
            q_row_stride: q_r,
            q_head_stride: q_h,
            k_batch_stride: k_b,
            k_row_stride: k_r,
            k_head_stride: k_h,
            v_batch_stride: v_b,
            v_row_stride: v_r,
            v_head_stride: v_h,
            o_batch_stride: o_b,
            o_row_stride: o_r,
            o_head_stride: o_h,
            do_batch_stride: do_b,
            do_row_stride: do_r,
            do_head_stride: do_h,
            dq_batch_stride: dq_b,
            dq_row_stride: dq_r,
            dq_head_stride: dq_h,
            dk_batch_stride: dk_b,
            dk_row_stride: dk_r,
            dk_head_stride: dk_h,
            dv_batch_stride: dv_b,
            dv_row_stride: dv_r,
            dv_head_stride: dv_h,
            lse_batch_stride: l_b,
            lse_head_stride: l_h,
            batch: p.batch as i32,
            heads: p.heads as i32,
            heads_kv: p.heads_kv as i32,
            seqlen_q: p.seqlen_q as i32,
            seqlen_k: p.seqlen_k as i32,
            head_dim: p.head_dim as i32,
            softmax_scale: p.scale,
            window_left: window_arg(p.window_left),
            window_right: window_arg(p.window_right),
            dtype: dtype_arg(p.dtype),
            device: q.device as i32,
        };
        // SAFETY: params were validated above; the caller vouches for the memory.
        let code = unsafe { ffi::fk_attention_bwd(&params, stream.raw()) };
        ffi::check(code)
    }
}
