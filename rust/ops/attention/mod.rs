//! Dense scaled-dot-product attention, forward and backward: validate -> plan ->
//! launch (or the CPU reference, behind the same signature).
//!
//! Layout: Q is (B, Nq, H, D), K and V are (B, Nk, H_kv, D), given by shape and strides
//! (in elements), so a (B, H, N, D) tensor is passed by swapping the strides of dims 1
//! and 2, with no copy. The head dim must have unit stride. Outputs: O (B, Nq, H, D)
//! contiguous in Q's dtype and LSE (B, H, Nq) f32, the natural-log logsumexp of each
//! scaled score row.
//!
//! Variable-length batches ([`Inputs::varlen`], [`BackwardInputs::varlen`]) pack B sequences
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
use crate::{OpTensor, Tensor, TensorRef};

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

/// The inputs of a forward call: Q, K, V and, for a variable-length batch, the
/// sequence boundaries.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a, T> {
    pub q: &'a T,
    pub k: &'a T,
    pub v: &'a T,
    pub seqlens: Option<&'a SeqLens>,
}

impl<'a, T> Inputs<'a, T> {
    /// A dense batch.
    pub fn new(q: &'a T, k: &'a T, v: &'a T) -> Self {
        Inputs {
            q,
            k,
            v,
            seqlens: None,
        }
    }

    /// The same tensors as a variable-length batch (packed rows).
    pub fn varlen(self, seqlens: &'a SeqLens) -> Self {
        Inputs {
            seqlens: Some(seqlens),
            ..self
        }
    }
}

/// The inputs of a backward call: the forward's inputs, its O and LSE, and dO.
#[derive(Debug, Clone, Copy)]
pub struct BackwardInputs<'a, T> {
    pub q: &'a T,
    pub k: &'a T,
    pub v: &'a T,
    pub out: &'a T,
    pub lse: &'a T,
    pub dout: &'a T,
    pub seqlens: Option<&'a SeqLens>,
}

impl<'a, T> BackwardInputs<'a, T> {
    /// A dense batch: `[q, k, v, out, lse, dout]`.
    pub fn new([q, k, v, out, lse, dout]: [&'a T; 6]) -> Self {
        BackwardInputs {
            q,
            k,
            v,
            out,
            lse,
            dout,
            seqlens: None,
        }
    }

    /// The same tensors as a variable-length batch (packed rows).
    pub fn varlen(self, seqlens: &'a SeqLens) -> Self {
        BackwardInputs {
            seqlens: Some(seqlens),
            ..self
        }
    }
}

/// Attention forward: O and LSE. Host tensors run the CPU reference (f32 accumulation,
/// O in Q's dtype), device tensors the CUDA kernel on Q's stream; all inputs must live
/// on the same side, and the outputs live there too.
pub fn forward<T: OpTensor>(
    i: &Inputs<'_, T>,
    opts: &AttentionOptions,
) -> Result<AttentionOutput<T>> {
    let o = match (i.q.tensor_ref(), i.k.tensor_ref(), i.v.tensor_ref()) {
        (TensorRef::Host(q), TensorRef::Host(k), TensorRef::Host(v)) => {
            let p = validate_inputs(q.described(), k.described(), v.described(), i.seqlens, opts)?;
            let o = forward_host(&p, [q, k, v])?;
            AttentionOutput {
                out: Tensor::Host(o.out),
                lse: Tensor::Host(o.lse),
            }
        }
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        (TensorRef::Cuda(q), TensorRef::Cuda(k), TensorRef::Cuda(v)) => {
            let o = cuda::forward_any(q, k, v, i.seqlens, opts)?;
            AttentionOutput {
                out: Tensor::Cuda(o.out),
                lse: Tensor::Cuda(o.lse),
            }
        }
        #[allow(unreachable_patterns)]
        (q, k, v) => return Err(mixed_devices(&[("q", q), ("k", k), ("v", v)])),
    };
    Ok(AttentionOutput {
        out: T::from_output(o.out)?,
        lse: T::from_output(o.lse)?,
    })
}

/// The CPU reference on a validated problem (the Python host path validates once and
/// calls this).
pub(crate) fn forward_host(
    p: &AttentionProblem,
    [q, k, v]: [&HostTensor; 3],
) -> Result<AttentionOutput<HostTensor>> {
    let (o, lse) = reference::try_attention(p, &f32_data(q)?, &f32_data(k)?, &f32_data(v)?)?;
    let out = HostTensor::from_vec(o, &p.q_shape())?.try_to_contiguous(p.dtype)?;
    let lse = HostTensor::from_vec(lse, &p.lse_shape())?;
    Ok(AttentionOutput { out, lse })
}

/// Attention backward: dQ, dK, dV (each laid out and typed like its input) from the
/// forward's inputs, its O and LSE, and dO. Host tensors run the CPU reference, device
/// tensors the CUDA kernels on Q's stream.
pub fn backward<T: OpTensor>(
    i: &BackwardInputs<'_, T>,
    opts: &AttentionOptions,
) -> Result<AttentionGradients<T>> {
    let t = [i.q, i.k, i.v, i.out, i.lse, i.dout].map(OpTensor::tensor_ref);
    let g = match t {
        [TensorRef::Host(q), TensorRef::Host(k), TensorRef::Host(v), TensorRef::Host(o), TensorRef::Host(l), TensorRef::Host(d)] =>
        {
            let t = [q, k, v, o, l, d];
            let p = validate_backward_call(t.map(HostTensor::described), i.seqlens, opts)?;
            let g = backward_host(&p, t)?;
            AttentionGradients {
                dq: Tensor::Host(g.dq),
                dk: Tensor::Host(g.dk),
                dv: Tensor::Host(g.dv),
            }
        }
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        [TensorRef::Cuda(q), TensorRef::Cuda(k), TensorRef::Cuda(v), TensorRef::Cuda(o), TensorRef::Cuda(l), TensorRef::Cuda(d)] =>
        {
            let g = cuda::backward_any([q, k, v, o, l, d], i.seqlens, opts)?;
            AttentionGradients {
                dq: Tensor::Cuda(g.dq),
                dk: Tensor::Cuda(g.dk),
                dv: Tensor::Cuda(g.dv),
            }
        }
        #[allow(unreachable_patterns)]
        [q, k, v, o, l, d] => {
            return Err(mixed_devices(&[
                ("q", q),
                ("k", k),
                ("v", v),
                ("out", o),
                ("lse", l),
                ("dout", d),
            ]))
        }
    };
    Ok(AttentionGradients {
        dq: T::from_output(g.dq)?,
        dk: T::from_output(g.dk)?,
        dv: T::from_output(g.dv)?,
    })
}

/// The CPU reference backward on a validated problem (see [`forward_host`]).
pub(crate) fn backward_host(
    p: &AttentionProblem,
    [q, k, v, out, lse, dout]: [&HostTensor; 6],
) -> Result<AttentionGradients<HostTensor>> {
    let g = reference::try_attention_backward(
        p,
        &f32_data(q)?,
        &f32_data(k)?,
        &f32_data(v)?,
        &f32_data(out)?,
        &f32_data(lse)?,
        &f32_data(dout)?,
    )?;
    Ok(AttentionGradients {
        dq: HostTensor::from_vec(g.dq, &p.q_shape())?.try_to_contiguous(p.dtype)?,
        dk: HostTensor::from_vec(g.dk, &p.kv_shape())?.try_to_contiguous(p.dtype)?,
        dv: HostTensor::from_vec(g.dv, &p.kv_shape())?.try_to_contiguous(p.dtype)?,
    })
}
