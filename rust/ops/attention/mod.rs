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

use crate::error::Result;
use crate::ops::common::{f32_data, mixed_devices};
use crate::tensor::HostTensor;
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

#[cfg(any(feature = "cuda", feature = "emulator"))]
pub mod cuda;
mod problem;
pub mod reference;

pub use problem::*;

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
