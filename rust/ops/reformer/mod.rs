//! Reformer LSH self-attention (Kitaev et al. 2020; issue 16), forward and backward, with
//! exactly Hugging Face's `LSHSelfAttention` semantics (transformers 5.x;
//! `modeling_reformer.py`), before its output dense:
//!
//! validate -> (CPU reference | launch).
//!
//! Inputs, with any strides and a unit-stride head dim (B batch, N tokens, H heads, D
//! head dim):
//! - `qk` (B, N, H, D): the shared query/key projection (HF's `query_key(x)` split into
//!   heads). Queries are qk as is; keys are qk normalised, k = qk · (mean(qk²) + 1e-6)^(−½)
//!   / sqrt(D) (HF's `_len_and_dim_norm`); no other softmax scale.
//! - `v` (B, N, H, D) in qk's dtype (f32, f16, bf16).
//! - `rotations` (H, D, n_hashes, n_buckets / 2), any dtype and strides: round r's
//!   bucket of token i is the first argmax of [x R[h, :, r, :] ; −x R[h, :, r, :]] for
//!   the unnormalised row x = qk[b, i, h]. n_buckets = 2 · the last dim (even by
//!   construction; `ReformerOptions::n_buckets`, if set, must agree). HF draws them as
//!   `torch.manual_seed(hash_seed); torch.randn((H, D, n_hashes, nb / 2))` in the model's
//!   dtype at every hashing call. The CPU reference hashes in f64 from the stored values;
//!   HF in fp32 hashes in fp32, so a near tie can pick another bucket: pass HF's buckets
//!   to compare outputs exactly.
//! - `key_padding_mask` (optional, (B, N), true = padded token). HF's `attention_mask`
//!   has 1 = token: pass `mask = attention_mask == 0`. As in HF, when any token of the
//!   batch is padded, padded tokens hash to the extra bucket n_buckets in every round and
//!   every round's offset becomes r · (n_buckets + 1), for every sequence of the batch;
//!   padded keys are masked; padded queries still produce output.
//! - `buckets` (optional, host [`Buckets`] (B, H, n_hashes, N), offset per round as HF
//!   returns them and as the forward returns them): the hashing is skipped and these are
//!   used (training holds them fixed between forward and backward; passing a forward's
//!   buckets back reproduces its O). Given buckets are checked: shape, and round r's
//!   values in [r · nb', (r + 1) · nb'), nb' = n_buckets (+ 1 with padding). An error
//!   for N <= C, where nothing is hashed.
//!
//! Options ([`ReformerOptions`]): chunk length C > 0, chunks_before (default 1),
//! chunks_after (default 0), causal. When N > C, N must be a multiple of C (HF cannot
//! split otherwise; an `InvalidArgument` error here); N <= C (N = C included) is full
//! shared-QK attention with the same masks, no hashing and no buckets, as in HF.
//!
//! Semantics (hashed, N > C), per (b, h): the n_hashes · N positions p = r · N + i of the
//! concatenated rounds are stably sorted by bucket (HF's key n_hashes · N · bucket + p);
//! the sorted sequence is cut into chunks of C; a query in chunk c attends to the keys of
//! chunks c − before ..= c + after CIRCULARLY over all n_hashes · N / C chunks (so the
//! first chunk of round r sees the last of round r − 1; a chunk reached twice counts
//! twice). Scores q_i · k_j are REPLACED (not added to): causal (key position > query
//! position) and padded keys by −1e9, then the query's own token (from any round) by
//! −1e5; f16 inputs use HF's fp16 values −1e4 and −1e3 (bf16 and f32 use the fp32
//! values, as HF picks its fp16 values for float16 only). Per round, lse_r = logsumexp of
//! the query's scores and o_r its softmax-weighted values; the rounds are combined as
//! out = Σ_r exp(lse_r − logsumexp_r lse_r) o_r (no duplicate-count correction, as HF
//! and trax), and written back in token order.
//!
//! Outputs: O (B, N, H, D) in qk's dtype, rounded once; LSE (B, H, rounds, N) f32, the
//! per-round logsumexp (rounds = n_hashes, or 1 when N <= C), which the backward needs
//! (the combined weights and P = exp(score − logsumexp_r lse_r)); the buckets used (host,
//! `None` when N <= C).
//!
//! Backward (buckets held fixed: the inputs' `buckets`, or hashed again from the
//! rotations, which gives the forward's): dqk and dv (shaped like qk, v; rounded once to
//! the dtype), deterministic, from the given O, LSE and dO (the CPU reference computes in
//! f64 from those, with no other rounding). The rounds form one softmax over the union
//! of their windows, so it is the attention backward (Delta = rowsum(dO ∘ O)) with dqk
//! receiving both the query's gradient and the keys' through the normalisation. Replaced
//! (masked) scores are constants: no gradient flows through them (the masked entries
//! still take their probability's share of dv). The rotations and buckets get none.

use crate::error::Result;
use crate::ops::common::{f64_data, host_out, place as common_place, refs, Placed as CommonPlaced};
use crate::tensor::HostTensor;
use crate::{OpTensor, Tensor, TensorRef};

#[cfg(any(feature = "cuda", feature = "emulator"))]
pub mod cuda;
pub mod problem;
pub mod reference;

pub use crate::ops::longformer::TokenMask;
pub use problem::{
    validate, validate_backward, validate_buckets, Described, ReformerBackwardLayouts,
    ReformerLayouts, ReformerOptions, ReformerProblem, MAX_CHUNKS_AROUND,
};

/// Buckets (B, H, n_hashes, N), row-major, offset per round (round r's values in
/// [r · nb', (r + 1) · nb'), nb' = n_buckets, + 1 when the batch has padding), as HF's
/// `LSHSelfAttention` returns them and takes them back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buckets {
    pub shape: [usize; 4],
    pub values: Vec<i32>,
}

impl Buckets {
    pub fn new(values: Vec<i32>, shape: [usize; 4]) -> Self {
        Buckets { shape, values }
    }
}

/// The inputs of a forward call (Copy whatever `T` is: it holds references).
#[derive(Debug)]
pub struct Inputs<'a, T> {
    pub qk: &'a T,
    pub v: &'a T,
    pub rotations: &'a T,
    /// (B, N), true = padded token.
    pub key_padding_mask: Option<&'a TokenMask>,
    /// Buckets to use instead of hashing (N > C only).
    pub buckets: Option<&'a Buckets>,
}

impl<'a, T> Inputs<'a, T> {
    /// qk, v and the rotations; no mask, hashed buckets.
    pub fn new(qk: &'a T, v: &'a T, rotations: &'a T) -> Self {
        Inputs {
            qk,
            v,
            rotations,
            key_padding_mask: None,
            buckets: None,
        }
    }

    pub fn key_padding_mask(self, key_padding_mask: Option<&'a TokenMask>) -> Self {
        Inputs {
            key_padding_mask,
            ..self
        }
    }

    pub fn buckets(self, buckets: Option<&'a Buckets>) -> Self {
        Inputs { buckets, ..self }
    }

    /// The backward call on these inputs, with the forward's O, LSE and dO.
    pub fn backward(self, out: &'a T, lse: &'a T, dout: &'a T) -> BackwardInputs<'a, T> {
        BackwardInputs {
            fwd: self,
            out,
            lse,
            dout,
        }
    }

    fn named(&self) -> [(&'static str, Option<&'a T>); 3] {
        [
            ("qk", Some(self.qk)),
            ("v", Some(self.v)),
            ("rotations", Some(self.rotations)),
        ]
    }
}

/// The inputs of a backward call: the forward's inputs (with the buckets to hold
/// fixed), its O and LSE, and dO.
#[derive(Debug)]
pub struct BackwardInputs<'a, T> {
    pub fwd: Inputs<'a, T>,
    pub out: &'a T,
    pub lse: &'a T,
    pub dout: &'a T,
}

impl<T> Clone for Inputs<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Inputs<'_, T> {}

impl<T> Clone for BackwardInputs<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for BackwardInputs<'_, T> {}

/// O (B, N, H, D) in qk's dtype, the per-round LSE (B, H, rounds, N) f32, and the
/// buckets used (`None` when N <= C).
#[derive(Debug)]
pub struct ReformerOutput<T> {
    pub out: T,
    pub lse: T,
    pub buckets: Option<Buckets>,
}

/// dqk and dv, shaped like qk and v, in their dtype.
#[derive(Debug)]
pub struct ReformerGradients<T> {
    pub dqk: T,
    pub dv: T,
}

/// The tensors of a call (all given), host or device.
enum Placed<'a> {
    Host(Vec<&'a HostTensor>),
    #[cfg(any(feature = "cuda", feature = "emulator"))]
    Device(Vec<&'a crate::DeviceTensor>),
}

fn place_all<'a>(ts: &[(&'static str, Option<TensorRef<'a>>)]) -> Result<Placed<'a>> {
    Ok(match common_place(ts)? {
        CommonPlaced::Host(h) => Placed::Host(h.into_iter().flatten().collect()),
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        CommonPlaced::Device(d) => Placed::Device(d.into_iter().flatten().collect()),
    })
}

/// Validates a call's host inputs (and given buckets).
fn validate_host(
    h: &[&HostTensor],
    i: &Inputs<'_, impl OpTensor>,
    opts: &ReformerOptions,
) -> Result<ReformerProblem> {
    let p = validate(
        &ReformerLayouts {
            qk: h[0].described(),
            v: h[1].described(),
            rotations: h[2].described(),
        },
        i.key_padding_mask,
        opts,
    )?;
    if let Some(b) = i.buckets {
        validate_buckets(&p, b)?;
    }
    Ok(p)
}

/// Reformer LSH attention forward: O, the per-round LSE and the buckets used. Host
/// tensors run the CPU reference (f64; O rounded once to the dtype, LSE to f32); device
/// tensors are `Error::Unsupported` until issue 16's kernels land; all tensors must live
/// on the same side.
pub fn forward<T: OpTensor>(
    i: &Inputs<'_, T>,
    opts: &ReformerOptions,
) -> Result<ReformerOutput<T>> {
    let o = match place_all(&refs(&i.named()))? {
        Placed::Host(h) => {
            let p = validate_host(&h, i, opts)?;
            let o = forward_host(&p, &h, i.buckets)?;
            (Tensor::Host(o.out), Tensor::Host(o.lse), o.buckets)
        }
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        Placed::Device(d) => {
            let o = cuda::forward([d[0], d[1], d[2]], i.key_padding_mask, i.buckets, opts)?;
            (Tensor::Cuda(o.out), Tensor::Cuda(o.lse), o.buckets)
        }
    };
    Ok(ReformerOutput {
        out: T::from_output(o.0)?,
        lse: T::from_output(o.1)?,
        buckets: o.2,
    })
}

/// The CPU reference forward on a validated problem; `h` = [qk, v, rotations].
pub(crate) fn forward_host(
    p: &ReformerProblem,
    h: &[&HostTensor],
    buckets: Option<&Buckets>,
) -> Result<ReformerOutput<HostTensor>> {
    let (qk, v, rot) = (f64_data(h[0])?, f64_data(h[1])?, f64_data(h[2])?);
    let x = reference::ReformerInputs {
        qk: &qk,
        v: &v,
        rotations: &rot,
    };
    let o = reference::try_reformer(p, &x, buckets.map(|b| b.values.as_slice()))?;
    Ok(ReformerOutput {
        out: host_out(o.out, &p.qkv_shape(), p.dtype)?,
        lse: host_out(o.lse, &p.lse_shape(), crate::DType::F32)?,
        buckets: o.buckets.map(|values| Buckets {
            shape: p.buckets_shape(),
            values,
        }),
    })
}

/// Reformer LSH attention backward with the buckets held fixed: dqk and dv,
/// deterministic. Host tensors run the CPU reference (f64 from the given O, LSE, dO;
/// each gradient rounded once to the dtype); device tensors the CUDA kernels (without
/// given buckets a hashed call first runs the device forward for them).
pub fn backward<T: OpTensor>(
    i: &BackwardInputs<'_, T>,
    opts: &ReformerOptions,
) -> Result<ReformerGradients<T>> {
    let mut named = refs(&i.fwd.named());
    for (n, t) in [("out", i.out), ("lse", i.lse), ("dout", i.dout)] {
        named.push((n, Some(t.tensor_ref())));
    }
    let (dqk, dv) = match place_all(&named)? {
        Placed::Host(h) => {
            let p = validate_host(&h, &i.fwd, opts)?;
            let [out, lse, dout] = [h[3], h[4], h[5]];
            validate_backward(
                &p,
                &ReformerBackwardLayouts {
                    out: out.described(),
                    lse: lse.described(),
                    dout: dout.described(),
                },
            )?;
            let g = backward_host(&p, &h[..3], i.fwd.buckets, [out, lse, dout])?;
            (Tensor::Host(g.dqk), Tensor::Host(g.dv))
        }
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        Placed::Device(d) => {
            let g = cuda::backward(
                [d[0], d[1], d[2]],
                [d[3], d[4], d[5]],
                i.fwd.key_padding_mask,
                i.fwd.buckets,
                opts,
            )?;
            (Tensor::Cuda(g.dqk), Tensor::Cuda(g.dv))
        }
    };
    Ok(ReformerGradients {
        dqk: T::from_output(dqk)?,
        dv: T::from_output(dv)?,
    })
}

/// The CPU reference backward on a validated problem (`h` = [qk, v, rotations]; out,
/// lse, dout checked by [`validate_backward`]).
pub(crate) fn backward_host(
    p: &ReformerProblem,
    h: &[&HostTensor],
    buckets: Option<&Buckets>,
    [out, lse, dout]: [&HostTensor; 3],
) -> Result<ReformerGradients<HostTensor>> {
    let (qk, v, rot) = (f64_data(h[0])?, f64_data(h[1])?, f64_data(h[2])?);
    let x = reference::ReformerInputs {
        qk: &qk,
        v: &v,
        rotations: &rot,
    };
    let g = reference::try_reformer_backward(
        p,
        &x,
        buckets.map(|b| b.values.as_slice()),
        &f64_data(out)?,
        &f64_data(lse)?,
        &f64_data(dout)?,
    )?;
    Ok(ReformerGradients {
        dqk: host_out(g.dqk, &p.qkv_shape(), p.dtype)?,
        dv: host_out(g.dv, &p.qkv_shape(), p.dtype)?,
    })
}
