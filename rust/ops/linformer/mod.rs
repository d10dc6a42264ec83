//! Linformer self-attention (Wang et al. 2020; issue 15), forward and backward:
//!
//!   O = softmax(scale · Q (E K)ᵀ) (F V)
//!
//! validate -> (CPU reference | launch).
//!
//! Layout: Q is (B, N, H, D); K and V are (B, N, H_kv, D) with H % H_kv == 0 (GQA: query
//! head h reads K/V head h / (H / H_kv)); all three with any strides and a unit-stride
//! head dim, as dense attention takes them. E is (He, k, N_max) and F is (Hf, k, N_max),
//! with any strides (lucidrains' `proj_k.T` is a strided view), k >= 1, and He, Hf each
//! 1 (one projection shared by every head: "headwise" sharing, as lucidrains/linformer
//! stores `proj_k` (N_max, k)) or H_kv (one per K/V head). Without F, F = E (key-value
//! sharing; dE then holds both contributions). Layerwise sharing is the caller's: pass
//! the same E to every layer. D <= 256. One dtype (f32, f16, bf16).
//!
//! Sequence lengths: N <= N_max, and a call with N < N_max uses the first N columns of E
//! and F (lucidrains/linformer 0.2.3 slices `proj_k[:N]` the same way); columns >= N
//! neither enter the output nor receive gradient (dE, dF are 0 there). N > N_max is an
//! error.
//!
//! Key padding mask (optional, (B, N), true = padded, as torch's `key_padding_mask`):
//! padded keys are excluded from the projection (their rows of K and V count as zero),
//! get dK = dV = 0 and add nothing to dE, dF. Queries are never masked. A sequence whose
//! every key is padded has kp = vp = 0: the softmax is uniform over k zero keys, so its
//! O = 0, LSE = ln(k), and all its gradients are 0.
//!
//! The semantics the kernels follow, with their roundings (the CPU reference computes in
//! f64 and rounds exactly there):
//! - kp = round(E[:, :N] · K̃) per (b, K/V head), K̃ = K with padded rows zeroed; likewise
//!   vp = round(F[:, :N] · Ṽ). kp, vp (B, k, H_kv, D) are stored in the dtype between the
//!   projection and the attention, and returned (the backward takes them back).
//! - O, LSE: the dense non-causal attention of (Q, kp, vp) over k keys; O rounded once to
//!   the dtype; LSE (B, H, N) f32, the natural-log logsumexp of each scaled score row.
//! - Backward, from the given O, LSE, kp, vp (not recomputed): dQ, dkp, dvp are the dense
//!   attention backward of (Q, kp, vp) (as FlashAttention's: Delta = rowsum(dO ∘ O)),
//!   dkp and dvp rounded to the dtype; then dK = Eᵀ dkp, dV = Fᵀ dvp (0 on padded keys),
//!   dE = Σ_{b, K/V heads using that E head} dkp K̃ᵀ (+ Σ dvp Ṽᵀ when F = E), dF likewise
//!   with dvp and Ṽ; each gradient rounded once to the dtype. Deterministic on both paths.
//!
//! Outputs are contiguous: O in Q's dtype, LSE f32, kp / vp in the dtype, and each
//! gradient shaped like its input (dE like E, dF like F).

use crate::error::Result;
use crate::ops::common::{f64_data, host_out, place, refs, Placed};
use crate::tensor::HostTensor;
use crate::{OpTensor, Tensor};

#[cfg(any(feature = "cuda", feature = "emulator"))]
pub mod cuda;
pub mod problem;
pub mod reference;

pub use crate::ops::longformer::TokenMask;
pub use problem::{
    validate, validate_backward, Described, LinformerBackwardLayouts, LinformerLayouts,
    LinformerOptions, LinformerProblem, MAX_HEAD_DIM,
};

/// The inputs of a forward call (Copy whatever `T` is: it holds references).
#[derive(Debug)]
pub struct Inputs<'a, T> {
    pub q: &'a T,
    pub k: &'a T,
    pub v: &'a T,
    pub e: &'a T,
    /// `None`: F = E (key-value sharing).
    pub f: Option<&'a T>,
    /// (B, N), true = padded key (excluded from the projection).
    pub key_padding_mask: Option<&'a TokenMask>,
}

impl<'a, T> Inputs<'a, T> {
    /// Q, K, V, E and F (`None`: F = E); no key padding mask.
    pub fn new(q: &'a T, k: &'a T, v: &'a T, e: &'a T, f: Option<&'a T>) -> Self {
        Inputs {
            q,
            k,
            v,
            e,
            f,
            key_padding_mask: None,
        }
    }

    pub fn key_padding_mask(self, key_padding_mask: Option<&'a TokenMask>) -> Self {
        Inputs {
            key_padding_mask,
            ..self
        }
    }

    /// The backward call on these inputs, with the forward's O, LSE, kp, vp and dO.
    pub fn backward(
        self,
        out: &'a T,
        lse: &'a T,
        kp: &'a T,
        vp: &'a T,
        dout: &'a T,
    ) -> BackwardInputs<'a, T> {
        BackwardInputs {
            fwd: self,
            out,
            lse,
            kp,
            vp,
            dout,
        }
    }

    fn named(&self) -> [(&'static str, Option<&'a T>); 5] {
        [
            ("q", Some(self.q)),
            ("k", Some(self.k)),
            ("v", Some(self.v)),
            ("e", Some(self.e)),
            ("f", self.f),
        ]
    }
}

/// The inputs of a backward call: the forward's inputs and mask, its O, LSE and
/// projected keys / values, and dO.
#[derive(Debug)]
pub struct BackwardInputs<'a, T> {
    pub fwd: Inputs<'a, T>,
    pub out: &'a T,
    pub lse: &'a T,
    pub kp: &'a T,
    pub vp: &'a T,
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

/// O (B, N, H, D) in Q's dtype, LSE (B, H, N) f32, and the projected keys and values
/// kp, vp (B, k, H_kv, D) in the dtype, as the backward takes them back.
#[derive(Debug)]
pub struct LinformerOutput<T> {
    pub out: T,
    pub lse: T,
    pub kp: T,
    pub vp: T,
}

/// The gradients of one backward call, each shaped like its input; `df` is `None` when
/// F = E (then `de` holds both contributions).
#[derive(Debug)]
pub struct LinformerGradients<T> {
    pub dq: T,
    pub dk: T,
    pub dv: T,
    pub de: T,
    pub df: Option<T>,
}

/// The layouts of host tensors in [`Inputs::named`]'s order.
fn layouts<'a>(h: &[Option<&'a HostTensor>]) -> LinformerLayouts<'a> {
    let d = |i: usize| h[i].map(HostTensor::described);
    LinformerLayouts {
        q: d(0).expect("q is always given"),
        k: d(1).expect("k is always given"),
        v: d(2).expect("v is always given"),
        e: d(3).expect("e is always given"),
        f: d(4),
    }
}

/// Linformer forward: O, LSE, kp, vp. Host tensors run the CPU reference (f64; kp, vp
/// and O each rounded once to the dtype); all inputs must live on the same side.
pub fn forward<T: OpTensor>(
    i: &Inputs<'_, T>,
    opts: &LinformerOptions,
) -> Result<LinformerOutput<T>> {
    let o = match place(&refs(&i.named()))? {
        Placed::Host(h) => {
            let p = validate(&layouts(&h), i.key_padding_mask, opts)?;
            map_output(forward_host(&p, &h)?, Tensor::Host)
        }
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        Placed::Device(d) => map_output(
            cuda::forward(&[d[0], d[1], d[2], d[3], d[4]], i.key_padding_mask, opts)?,
            Tensor::Cuda,
        ),
    };
    let f = T::from_output;
    Ok(LinformerOutput {
        out: f(o.out)?,
        lse: f(o.lse)?,
        kp: f(o.kp)?,
        vp: f(o.vp)?,
    })
}

fn map_output<A, B>(o: LinformerOutput<A>, f: impl Fn(A) -> B) -> LinformerOutput<B> {
    LinformerOutput {
        out: f(o.out),
        lse: f(o.lse),
        kp: f(o.kp),
        vp: f(o.vp),
    }
}

/// The f64 copies of the forward's inputs, in [`Inputs::named`]'s order.
fn f64_inputs(h: &[Option<&HostTensor>]) -> Result<Vec<Option<Vec<f64>>>> {
    h.iter().map(|t| t.map(f64_data).transpose()).collect()
}

fn ref_inputs(v: &[Option<Vec<f64>>]) -> reference::LinformerInputs<'_> {
    reference::LinformerInputs {
        q: v[0].as_deref().expect("q"),
        k: v[1].as_deref().expect("k"),
        v: v[2].as_deref().expect("v"),
        e: v[3].as_deref().expect("e"),
        f: v[4].as_deref(),
    }
}

/// The CPU reference forward on a validated problem; `h` in [`Inputs::named`]'s order.
pub(crate) fn forward_host(
    p: &LinformerProblem,
    h: &[Option<&HostTensor>],
) -> Result<LinformerOutput<HostTensor>> {
    let v = f64_inputs(h)?;
    let o = reference::try_linformer(p, &ref_inputs(&v))?;
    Ok(LinformerOutput {
        out: host_out(o.out, &p.q_shape(), p.dtype)?,
        lse: host_out(o.lse, &p.lse_shape(), crate::DType::F32)?,
        kp: host_out(o.kp, &p.proj_shape(), p.dtype)?,
        vp: host_out(o.vp, &p.proj_shape(), p.dtype)?,
    })
}

/// Linformer backward: dQ, dK, dV, dE and dF (`None` when F = E), deterministic. Host
/// tensors run the CPU reference (f64; dkp, dvp and each gradient rounded once to the
/// dtype).
pub fn backward<T: OpTensor>(
    i: &BackwardInputs<'_, T>,
    opts: &LinformerOptions,
) -> Result<LinformerGradients<T>> {
    let mut named = refs(&i.fwd.named());
    for (n, t) in [
        ("out", i.out),
        ("lse", i.lse),
        ("kp", i.kp),
        ("vp", i.vp),
        ("dout", i.dout),
    ] {
        named.push((n, Some(t.tensor_ref())));
    }
    let g = match place(&named)? {
        Placed::Host(h) => {
            let p = validate(&layouts(&h), i.fwd.key_padding_mask, opts)?;
            let d = |i: usize| h[i].expect("always given");
            let [out, lse, kp, vp, dout] = [5, 6, 7, 8, 9].map(d);
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
            map_grads(
                backward_host(&p, &h[..5], [out, lse, kp, vp, dout])?,
                Tensor::Host,
            )
        }
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        Placed::Device(d) => {
            let given = |i: usize| d[i].expect("always given");
            map_grads(
                cuda::backward(
                    &[d[0], d[1], d[2], d[3], d[4]],
                    [5, 6, 7, 8, 9].map(given),
                    i.fwd.key_padding_mask,
                    opts,
                )?,
                Tensor::Cuda,
            )
        }
    };
    let f = T::from_output;
    Ok(LinformerGradients {
        dq: f(g.dq)?,
        dk: f(g.dk)?,
        dv: f(g.dv)?,
        de: f(g.de)?,
        df: g.df.map(f).transpose()?,
    })
}

fn map_grads<A, B>(g: LinformerGradients<A>, f: impl Fn(A) -> B) -> LinformerGradients<B> {
    LinformerGradients {
        dq: f(g.dq),
        dk: f(g.dk),
        dv: f(g.dv),
        de: f(g.de),
        df: g.df.map(&f),
    }
}

/// The CPU reference backward on a validated problem (`h` in [`Inputs::named`]'s order;
/// out, lse, kp, vp, dout checked by [`validate_backward`]).
pub(crate) fn backward_host(
    p: &LinformerProblem,
    h: &[Option<&HostTensor>],
    [out, lse, kp, vp, dout]: [&HostTensor; 5],
) -> Result<LinformerGradients<HostTensor>> {
    let v = f64_inputs(h)?;
    let g = reference::try_linformer_backward(
        p,
        &ref_inputs(&v),
        &f64_data(out)?,
        &f64_data(lse)?,
        &f64_data(kp)?,
        &f64_data(vp)?,
        &f64_data(dout)?,
    )?;
    let o = |v: Vec<f64>, shape: &[usize]| host_out(v, shape, p.dtype);
    Ok(LinformerGradients {
        dq: o(g.dq, &p.q_shape())?,
        dk: o(g.dk, &p.kv_shape())?,
        dv: o(g.dv, &p.kv_shape())?,
        de: o(g.de, &p.e_shape())?,
        df: g.df.map(|df| o(df, &p.f_shape())).transpose()?,
    })
}
