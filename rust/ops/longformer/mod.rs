//! Longformer self-attention (Beltagy et al. 2020), forward and backward: validate ->
//! problem -> work lists ([`schedule`]) -> the CUDA passes ([`cuda`]), or the CPU
//! reference for host tensors.
//!
//! Layout: Q, K, V (and the global projections Q_g, K_g, V_g) are (B, N, H, D), with a
//! unit-stride head dim; queries and keys share the sequence length N and the heads (no
//! GQA). Outputs: O (B, N, H, D) contiguous in Q's dtype and LSE (B, H, N) f32 (natural
//! log of each scaled score row's sum of exponentials).
//!
//! Per (sequence b, head h), with one-sided window w and dilation d_h:
//! - a padded query row outputs O = 0, LSE = -inf and gets zero gradients;
//! - a non-global, non-padded query i attends, with Q, K, V, to the keys
//!   j = i + d_h * t for t in [-w, w] (t in [-w, 0] when causal) that lie in [0, N) and
//!   are not padded, plus every global key (only those with j <= i when causal); a global
//!   key inside the window counts once;
//! - a global query i attends, with Q_g, K_g, V_g, to every non-padded key (only those
//!   with j <= i when causal: causality applies to global rows and columns too, so no
//!   position ever sees its future).
//!
//! When the global projections are not given, Q, K, V serve for global rows too, and the
//! backward folds the global rows' gradients into dQ, dK, dV.
//!
//! `window = 0` is accepted: a non-global query then sees itself and the global keys.
//! (Hugging Face requires an even two-sided `attention_window` >= 2, i.e. w >= 1; w = 0
//! is the natural limit of the definition and costs nothing to support.) A window or a
//! dilation larger than N is clipped to the sequence.
//!
//! Every non-padded row sees at least itself, so only padded rows are empty.

use crate::error::{Error, Result};
use crate::ops::common::mixed_devices;
use crate::ops::common::{checked_elements, f32_data, try_alloc_vec};
use crate::tensor::HostTensor;
use crate::{OpTensor, Tensor, TensorRef};

#[cfg(any(feature = "cuda", feature = "emulator"))]
pub mod cuda;
// The plan is used by the device paths; without one it is still built and unit-tested.
#[cfg_attr(not(any(feature = "cuda", feature = "emulator")), allow(dead_code))]
pub(crate) mod plan;
mod problem;
pub mod reference;
pub mod schedule;

pub use problem::*;

/// Options of a Longformer call.
#[derive(Debug, Clone, PartialEq)]
pub struct LongformerOptions {
    /// One-sided window w (Hugging Face's `attention_window // 2`); 0 allowed.
    pub window: usize,
    /// Dilation per head (length H), or one value for every head (length 1); each >= 1.
    pub dilation: Vec<usize>,
    /// Autoregressive: the window is t in [-w, 0] and no key after the query is seen.
    pub causal: bool,
    /// Softmax scale; `None` means 1/sqrt(D).
    pub scale: Option<f32>,
}

impl LongformerOptions {
    /// Window `w`, dilation 1 on every head, not causal, default scale.
    pub fn new(window: usize) -> Self {
        LongformerOptions {
            window,
            dilation: vec![1],
            causal: false,
            scale: None,
        }
    }
}

/// A per-token boolean mask of shape (B, N), row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenMask {
    pub shape: Vec<usize>,
    pub values: Vec<bool>,
}

impl TokenMask {
    /// A mask over `values` with the given shape (checked by [`validate`]).
    pub fn new(values: Vec<bool>, shape: &[usize]) -> Self {
        TokenMask {
            shape: shape.to_vec(),
            values,
        }
    }

    /// A (batch, seqlen) mask from each sequence's token indices (e.g. its global
    /// tokens); an index out of [0, seqlen) or listed twice is an error.
    pub fn from_indices(batch: usize, seqlen: usize, indices: &[Vec<i64>]) -> Result<Self> {
        if indices.len() != batch {
            return Err(Error::ShapeMismatch {
                detail: format!(
                    "global token indices are given for {} sequences, but the batch has {batch}",
                    indices.len()
                ),
            });
        }
        let len = checked_elements("a token mask", &[batch, seqlen])?;
        let mut values = try_alloc_vec(len, false, "a token mask")?;
        for (b, list) in indices.iter().enumerate() {
            for &i in list {
                let Some(i) = usize::try_from(i).ok().filter(|&i| i < seqlen) else {
                    return Err(Error::InvalidArgument(format!(
                        "global token index {i} of sequence {b} is out of range [0, {seqlen})"
                    )));
                };
                let slot = &mut values[b * seqlen + i];
                if *slot {
                    return Err(Error::InvalidArgument(format!(
                        "global token index {i} of sequence {b} is listed twice"
                    )));
                }
                *slot = true;
            }
        }
        Ok(TokenMask::new(values, &[batch, seqlen]))
    }

    /// A (batch, seqlen) mask that is true exactly at the listed (b, i) positions; a
    /// position out of range is an error (as in [`TokenMask::from_indices`]).
    pub fn from_positions(
        batch: usize,
        seqlen: usize,
        positions: &[(usize, usize)],
    ) -> Result<Self> {
        let len = checked_elements("a token mask", &[batch, seqlen])?;
        let mut values = try_alloc_vec(len, false, "a token mask")?;
        for &(b, i) in positions {
            if b >= batch || i >= seqlen {
                return Err(Error::InvalidArgument(format!(
                    "token position ({b}, {i}) is out of range for (batch, seqlen) = \
                     ({batch}, {seqlen})"
                )));
            }
            values[b * seqlen + i] = true;
        }
        Ok(TokenMask::new(values, &[batch, seqlen]))
    }
}

/// The global projections Q_g, K_g, V_g, each shaped like Q.
#[derive(Debug)]
pub struct GlobalProjections<'a, T = HostTensor> {
    pub q: &'a T,
    pub k: &'a T,
    pub v: &'a T,
}

// Derived Clone/Copy would ask T: Clone; the references copy for any T.
impl<T> Clone for GlobalProjections<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for GlobalProjections<'_, T> {}

/// The inputs of a forward call: Q, K, V (B, N, H, D), optionally the global
/// projections (Hugging Face's query_global / key_global / value_global), and the
/// global-token and padding masks (B, N).
#[derive(Debug)]
pub struct Inputs<'a, T> {
    pub q: &'a T,
    pub k: &'a T,
    pub v: &'a T,
    pub globals: Option<GlobalProjections<'a, T>>,
    pub global_mask: Option<&'a TokenMask>,
    pub padding_mask: Option<&'a TokenMask>,
}

impl<T> Clone for Inputs<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Inputs<'_, T> {}

impl<'a, T> Inputs<'a, T> {
    /// Q, K, V with no global tokens, no padding.
    pub fn new(q: &'a T, k: &'a T, v: &'a T) -> Self {
        Inputs {
            q,
            k,
            v,
            globals: None,
            global_mask: None,
            padding_mask: None,
        }
    }

    pub fn globals(self, globals: Option<GlobalProjections<'a, T>>) -> Self {
        Inputs { globals, ..self }
    }

    pub fn masks(self, global: Option<&'a TokenMask>, padding: Option<&'a TokenMask>) -> Self {
        Inputs {
            global_mask: global,
            padding_mask: padding,
            ..self
        }
    }

    /// With the forward's O, LSE and the gradient dO: a backward call's inputs.
    pub fn backward(self, out: &'a T, lse: &'a T, dout: &'a T) -> BackwardInputs<'a, T> {
        BackwardInputs {
            forward: self,
            out,
            lse,
            dout,
        }
    }
}

/// The inputs of a backward call: the forward's inputs, its O and LSE, and dO.
#[derive(Debug)]
pub struct BackwardInputs<'a, T> {
    pub forward: Inputs<'a, T>,
    pub out: &'a T,
    pub lse: &'a T,
    pub dout: &'a T,
}

/// O and LSE of one forward call.
#[derive(Debug)]
pub struct LongformerOutput<T = HostTensor> {
    pub out: T,
    pub lse: T,
}

/// Gradients of one backward call, each laid out (and typed) like its input. `global`
/// holds dQ_g, dK_g, dV_g when the global projections were given; otherwise the global
/// rows' gradients are included in dq, dk, dv.
#[derive(Debug)]
pub struct LongformerGradients<T = HostTensor> {
    pub dq: T,
    pub dk: T,
    pub dv: T,
    pub global: Option<[T; 3]>,
}

fn problem_of(
    q: &HostTensor,
    k: &HostTensor,
    v: &HostTensor,
    globals: Option<GlobalProjections<'_>>,
    global_mask: Option<&TokenMask>,
    padding_mask: Option<&TokenMask>,
    opts: &LongformerOptions,
) -> Result<LongformerProblem> {
    let lay = |t: &HostTensor| (t.dtype(), t.layout().clone());
    let g = globals.map(|g| [lay(g.q), lay(g.k), lay(g.v)]);
    validate(
        (q.dtype(), q.layout()),
        (k.dtype(), k.layout()),
        (v.dtype(), v.layout()),
        g.as_ref()
            .map(|[a, b, c]| [(a.0, &a.1), (b.0, &b.1), (c.0, &c.1)]),
        global_mask,
        padding_mask,
        opts,
    )
}

/// Q, K, V, Q_g, K_g, V_g as f32 vectors (the global ones are Q, K, V when not given).
/// The f32 copies of Q, K, V and of the global projections (`None`: Q, K, V serve).
type F32Inputs = ([Vec<f32>; 3], Option<[Vec<f32>; 3]>);

fn inputs(
    q: &HostTensor,
    k: &HostTensor,
    v: &HostTensor,
    globals: Option<GlobalProjections<'_>>,
) -> Result<F32Inputs> {
    let g = match globals {
        Some(g) => Some([f32_data(g.q)?, f32_data(g.k)?, f32_data(g.v)?]),
        None => None,
    };
    Ok(([f32_data(q)?, f32_data(k)?, f32_data(v)?], g))
}

/// The reference's view of [`inputs`].
fn reference_inputs(x: &F32Inputs) -> reference::LongformerInputs<'_, f32> {
    let ([q, k, v], g) = x;
    let [q_g, k_g, v_g] = g.as_ref().unwrap_or(&x.0);
    reference::LongformerInputs {
        q,
        k,
        v,
        q_g,
        k_g,
        v_g,
    }
}

enum Side<'a> {
    Host(Vec<&'a HostTensor>),
    #[cfg(any(feature = "cuda", feature = "emulator"))]
    Cuda(Vec<&'a crate::DeviceTensor>),
}

/// Where `ts` (named) live: all on the host or all on the device, else a DeviceMismatch.
fn side<'a>(ts: &[(&str, TensorRef<'a>)]) -> Result<Side<'a>> {
    if let Some(h) = ts
        .iter()
        .map(|(_, t)| match t {
            TensorRef::Host(h) => Some(*h),
            #[cfg(any(feature = "cuda", feature = "emulator"))]
            TensorRef::Cuda(_) => None,
        })
        .collect::<Option<Vec<_>>>()
    {
        return Ok(Side::Host(h));
    }
    #[cfg(any(feature = "cuda", feature = "emulator"))]
    if let Some(d) = ts
        .iter()
        .map(|(_, t)| match t {
            TensorRef::Cuda(d) => Some(*d),
            TensorRef::Host(_) => None,
        })
        .collect::<Option<Vec<_>>>()
    {
        return Ok(Side::Cuda(d));
    }
    Err(mixed_devices(ts))
}

/// q, k, v and (when given) the global projections, named.
fn named_inputs<'a, T: OpTensor>(i: &Inputs<'a, T>) -> Vec<(&'static str, TensorRef<'a>)> {
    let mut ts = vec![
        ("q", i.q.tensor_ref()),
        ("k", i.k.tensor_ref()),
        ("v", i.v.tensor_ref()),
    ];
    if let Some(g) = i.globals {
        ts.extend([
            ("q_global", g.q.tensor_ref()),
            ("k_global", g.k.tensor_ref()),
            ("v_global", g.v.tensor_ref()),
        ]);
    }
    ts
}

/// Longformer forward: O (Q's dtype) and LSE (f32, (B, H, N)). Host tensors run the CPU
/// reference (f32 accumulation), device tensors the CUDA kernels on Q's stream.
pub fn forward<T: OpTensor>(
    i: &Inputs<'_, T>,
    opts: &LongformerOptions,
) -> Result<LongformerOutput<T>> {
    let (gm, pm) = (i.global_mask, i.padding_mask);
    let o = match side(&named_inputs(i))? {
        Side::Host(t) => {
            let g = (t.len() == 6).then(|| GlobalProjections {
                q: t[3],
                k: t[4],
                v: t[5],
            });
            let p = problem_of(t[0], t[1], t[2], g, gm, pm, opts)?;
            let o = forward_host(&p, [t[0], t[1], t[2]], g)?;
            LongformerOutput {
                out: Tensor::Host(o.out),
                lse: Tensor::Host(o.lse),
            }
        }
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        Side::Cuda(t) => {
            let g = (t.len() == 6).then(|| [t[3], t[4], t[5]]);
            let o = cuda::forward([t[0], t[1], t[2]], g, gm, pm, opts)?;
            LongformerOutput {
                out: Tensor::Cuda(o.out),
                lse: Tensor::Cuda(o.lse),
            }
        }
    };
    Ok(LongformerOutput {
        out: T::from_output(o.out)?,
        lse: T::from_output(o.lse)?,
    })
}

/// Longformer backward: dQ, dK, dV (and dQ_g, dK_g, dV_g when the global projections
/// were given; otherwise the global rows' gradients are folded into dq, dk, dv), each
/// like Q. Host tensors run the CPU reference, device tensors the CUDA kernels on Q's
/// stream. Deterministic.
pub fn backward<T: OpTensor>(
    i: &BackwardInputs<'_, T>,
    opts: &LongformerOptions,
) -> Result<LongformerGradients<T>> {
    let f = &i.forward;
    let (gm, pm) = (f.global_mask, f.padding_mask);
    let mut ts = named_inputs(f);
    let n = ts.len();
    ts.extend([
        ("out", i.out.tensor_ref()),
        ("lse", i.lse.tensor_ref()),
        ("dout", i.dout.tensor_ref()),
    ]);
    let g = match side(&ts)? {
        Side::Host(t) => {
            let globals = (n == 6).then(|| GlobalProjections {
                q: t[3],
                k: t[4],
                v: t[5],
            });
            let [o, l, d] = [t[n], t[n + 1], t[n + 2]];
            let p = problem_of(t[0], t[1], t[2], globals, gm, pm, opts)?;
            validate_backward(
                &p,
                (o.dtype(), o.layout()),
                (l.dtype(), l.layout()),
                (d.dtype(), d.layout()),
            )?;
            let g = backward_host(&p, [t[0], t[1], t[2]], globals, [o, l, d])?;
            LongformerGradients {
                dq: Tensor::Host(g.dq),
                dk: Tensor::Host(g.dk),
                dv: Tensor::Host(g.dv),
                global: g.global.map(|g| g.map(Tensor::Host)),
            }
        }
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        Side::Cuda(t) => {
            let globals = (n == 6).then(|| [t[3], t[4], t[5]]);
            let [o, l, d] = [t[n], t[n + 1], t[n + 2]];
            let g = cuda::backward([t[0], t[1], t[2]], globals, o, l, d, gm, pm, opts)?;
            LongformerGradients {
                dq: Tensor::Cuda(g.dq),
                dk: Tensor::Cuda(g.dk),
                dv: Tensor::Cuda(g.dv),
                global: g.global.map(|g| g.map(Tensor::Cuda)),
            }
        }
    };
    Ok(LongformerGradients {
        dq: T::from_output(g.dq)?,
        dk: T::from_output(g.dk)?,
        dv: T::from_output(g.dv)?,
        global: g
            .global
            .map(|g| -> Result<[T; 3]> {
                let [a, b, c] = g;
                Ok([T::from_output(a)?, T::from_output(b)?, T::from_output(c)?])
            })
            .transpose()?,
    })
}

/// The CPU reference on a validated problem (the Python host path validates once and
/// calls this).
pub(crate) fn forward_host(
    p: &LongformerProblem,
    [q, k, v]: [&HostTensor; 3],
    globals: Option<GlobalProjections<'_>>,
) -> Result<LongformerOutput> {
    let x = inputs(q, k, v, globals)?;
    let (o, lse) = reference::try_longformer(p, &reference_inputs(&x))?;
    drop(x);
    Ok(LongformerOutput {
        out: HostTensor::from_vec(o, &p.qkv_shape())?.try_to_contiguous(p.dtype)?,
        lse: HostTensor::from_vec(lse, &p.lse_shape())?,
    })
}

/// The CPU reference backward on a validated problem (see [`forward_host`]).
pub(crate) fn backward_host(
    p: &LongformerProblem,
    [q, k, v]: [&HostTensor; 3],
    globals: Option<GlobalProjections<'_>>,
    [out, lse, dout]: [&HostTensor; 3],
) -> Result<LongformerGradients> {
    let x = inputs(q, k, v, globals)?;
    let g = reference::try_longformer_backward(
        p,
        &reference_inputs(&x),
        &f32_data(out)?,
        &f32_data(lse)?,
        &f32_data(dout)?,
    )?;
    drop(x);
    let shape = p.qkv_shape();
    let t = |x: Vec<f32>| -> Result<HostTensor> {
        HostTensor::from_vec(x, &shape)?.try_to_contiguous(p.dtype)
    };
    if globals.is_some() {
        Ok(LongformerGradients {
            dq: t(g.dq)?,
            dk: t(g.dk)?,
            dv: t(g.dv)?,
            global: Some([t(g.dq_g)?, t(g.dk_g)?, t(g.dv_g)?]),
        })
    } else {
        let sum = |mut a: Vec<f32>, b: Vec<f32>| {
            a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
            a
        };
        Ok(LongformerGradients {
            dq: t(sum(g.dq, g.dq_g))?,
            dk: t(sum(g.dk, g.dk_g))?,
            dv: t(sum(g.dv, g.dv_g))?,
            global: None,
        })
    }
}
