//! The fused feed-forward block (issue 14), forward and backward:
//!
//!   y = act(x W1ᵀ + b1) W2ᵀ + b2 (+ x),  or, gated (SwiGLU, GeGLU),
//!   y = (act(x W1ᵀ + b1) ∘ (x W3ᵀ + b3)) W2ᵀ + b2 (+ x)
//!
//! x (tokens, d_model) with any row stride, W1 / W3 (d_hidden, d_model), W2 (d_model,
//! d_hidden), as nn.Linear stores them; every bias and the residual optional; one dtype
//! (f32, f16, bf16). validate -> (CPU reference | launch). The CPU path computes in f64,
//! rounds the hidden activation once to the dtype (as the kernels store it between
//! their two GEMMs) and each output once. Outputs are contiguous, in x's dtype.

use crate::error::Result;
use crate::ops::common::{f64_data, host_out, place, refs, Placed};
use crate::tensor::HostTensor;
use crate::{OpTensor, Tensor};

#[cfg(any(feature = "cuda", feature = "emulator"))]
pub(crate) mod cuda;
pub mod problem;
pub mod reference;

pub use problem::{
    check_kernel_limits, validate, validate_backward, Described, FfnActivation, FfnLayouts,
    FfnOptions, FfnProblem,
};

/// The inputs of a forward call. Gated when `w3` is given.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a, T> {
    pub x: &'a T,
    pub w1: &'a T,
    pub w2: &'a T,
    pub w3: Option<&'a T>,
    pub b1: Option<&'a T>,
    pub b2: Option<&'a T>,
    pub b3: Option<&'a T>,
    /// Also return the hidden activation h (tokens, d_hidden) as stored between the
    /// GEMMs.
    pub keep_hidden: bool,
}

impl<'a, T> Inputs<'a, T> {
    /// x, W1 and W2; no gate, no biases, y only.
    pub fn new(x: &'a T, w1: &'a T, w2: &'a T) -> Self {
        Inputs {
            x,
            w1,
            w2,
            w3: None,
            b1: None,
            b2: None,
            b3: None,
            keep_hidden: false,
        }
    }

    /// The gate's weight W3 (SwiGLU / GeGLU).
    pub fn gate(self, w3: Option<&'a T>) -> Self {
        Inputs { w3, ..self }
    }

    pub fn biases(self, b1: Option<&'a T>, b2: Option<&'a T>, b3: Option<&'a T>) -> Self {
        Inputs { b1, b2, b3, ..self }
    }

    pub fn keep_hidden(self, keep_hidden: bool) -> Self {
        Inputs {
            keep_hidden,
            ..self
        }
    }

    fn named(&self) -> [(&'static str, Option<&'a T>); 7] {
        [
            ("x", Some(self.x)),
            ("w1", Some(self.w1)),
            ("w2", Some(self.w2)),
            ("w3", self.w3),
            ("b1", self.b1),
            ("b2", self.b2),
            ("b3", self.b3),
        ]
    }
}

/// The inputs of a backward call: the forward's inputs (biases included: b1 and b3
/// enter the recomputed hidden activation, and db_i is returned where b_i is given)
/// and dy (tokens, d_model).
#[derive(Debug, Clone, Copy)]
pub struct BackwardInputs<'a, T> {
    pub fwd: Inputs<'a, T>,
    pub dy: &'a T,
}

impl<'a, T> BackwardInputs<'a, T> {
    pub fn new(fwd: Inputs<'a, T>, dy: &'a T) -> Self {
        BackwardInputs { fwd, dy }
    }
}

/// y (tokens, d_model), and h (tokens, d_hidden) when asked for.
#[derive(Debug)]
pub struct FfnOutput<T> {
    pub y: T,
    pub hidden: Option<T>,
}

/// The gradients of one backward call: dx, dW1, dW2 always; dW3 when gated; db_i when
/// b_i was given.
#[derive(Debug)]
pub struct FfnGradients<T> {
    pub dx: T,
    pub dw1: T,
    pub db1: Option<T>,
    pub dw2: T,
    pub db2: Option<T>,
    pub dw3: Option<T>,
    pub db3: Option<T>,
}

/// The layouts of host tensors in [`Inputs::named`]'s order.
fn layouts<'a>(h: &[Option<&'a HostTensor>]) -> FfnLayouts<'a> {
    let d = |i: usize| h[i].map(HostTensor::described);
    FfnLayouts {
        x: d(0).expect("x is always given"),
        w1: d(1).expect("w1 is always given"),
        w2: d(2).expect("w2 is always given"),
        w3: d(3),
        b1: d(4),
        b2: d(5),
        b3: d(6),
    }
}

/// Feed-forward forward. Host tensors run the CPU reference (f64, the hidden
/// activation and y each rounded once to the dtype); device tensors the CUDA kernels
/// (f16 / bf16, widths multiples of 8: [`check_kernel_limits`]) on x's stream.
pub fn forward<T: OpTensor>(i: &Inputs<'_, T>, opts: &FfnOptions) -> Result<FfnOutput<T>> {
    let o = match place(&refs(&i.named()))? {
        Placed::Host(h) => {
            let p = validate(&layouts(&h), opts)?;
            let o = forward_host(&p, &h, i.keep_hidden)?;
            FfnOutput {
                y: Tensor::Host(o.y),
                hidden: o.hidden.map(Tensor::Host),
            }
        }
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        Placed::Device(d) => {
            let o = cuda::forward(&d, opts, i.keep_hidden)?;
            FfnOutput {
                y: Tensor::Cuda(o.y),
                hidden: o.hidden.map(Tensor::Cuda),
            }
        }
    };
    Ok(FfnOutput {
        y: T::from_output(o.y)?,
        hidden: o.hidden.map(T::from_output).transpose()?,
    })
}

fn f64_opt(t: Option<&HostTensor>) -> Result<Option<Vec<f64>>> {
    t.map(f64_data).transpose()
}

/// The CPU reference forward on a validated problem; `h` in [`Inputs::named`]'s order.
pub(crate) fn forward_host(
    p: &FfnProblem,
    h: &[Option<&HostTensor>],
    keep_hidden: bool,
) -> Result<FfnOutput<HostTensor>> {
    let v: Vec<Option<Vec<f64>>> = h.iter().map(|t| f64_opt(*t)).collect::<Result<_>>()?;
    let w = weights(&v);
    let o = reference::try_ffn(p, v[0].as_deref().expect("x"), &w)?;
    Ok(FfnOutput {
        y: host_out(o.y, &p.x_shape(), p.dtype)?,
        hidden: if keep_hidden {
            Some(host_out(o.h, &p.hidden_shape(), p.dtype)?)
        } else {
            None
        },
    })
}

fn weights(v: &[Option<Vec<f64>>]) -> reference::FfnWeights<'_> {
    reference::FfnWeights {
        w1: v[1].as_deref().expect("w1"),
        w2: v[2].as_deref().expect("w2"),
        w3: v[3].as_deref(),
        b1: v[4].as_deref(),
        b2: v[5].as_deref(),
        b3: v[6].as_deref(),
    }
}

/// Feed-forward backward: dx, dW1, dW2 (dW3 when gated; db_i where b_i is given). Host
/// tensors run the CPU reference (f64, each gradient rounded once to the dtype).
/// Device tensors run the CUDA kernels (deterministic: no atomics) on x's stream.
pub fn backward<T: OpTensor>(
    i: &BackwardInputs<'_, T>,
    opts: &FfnOptions,
) -> Result<FfnGradients<T>> {
    let mut named = refs(&i.fwd.named());
    named.push(("dy", Some(i.dy.tensor_ref())));
    let g = match place(&named)? {
        Placed::Host(h) => {
            let p = validate(&layouts(&h), opts)?;
            let dy = h[7].expect("dy is always given");
            validate_backward(&p, dy.described())?;
            let g = backward_host(&p, &h[..7], dy)?;
            map_grads(g, Tensor::Host)
        }
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        Placed::Device(d) => {
            let dy = d[7].expect("dy is always given");
            map_grads(cuda::backward(&d[..7], dy, opts)?, Tensor::Cuda)
        }
    };
    let f = T::from_output;
    Ok(FfnGradients {
        dx: f(g.dx)?,
        dw1: f(g.dw1)?,
        db1: g.db1.map(f).transpose()?,
        dw2: f(g.dw2)?,
        db2: g.db2.map(f).transpose()?,
        dw3: g.dw3.map(f).transpose()?,
        db3: g.db3.map(f).transpose()?,
    })
}

fn map_grads<A, B>(g: FfnGradients<A>, f: impl Fn(A) -> B) -> FfnGradients<B> {
    FfnGradients {
        dx: f(g.dx),
        dw1: f(g.dw1),
        db1: g.db1.map(&f),
        dw2: f(g.dw2),
        db2: g.db2.map(&f),
        dw3: g.dw3.map(&f),
        db3: g.db3.map(&f),
    }
}

/// The CPU reference backward on a validated problem (`h` in [`Inputs::named`]'s
/// order, dy checked by [`validate_backward`]).
pub(crate) fn backward_host(
    p: &FfnProblem,
    h: &[Option<&HostTensor>],
    dy: &HostTensor,
) -> Result<FfnGradients<HostTensor>> {
    let v: Vec<Option<Vec<f64>>> = h.iter().map(|t| f64_opt(*t)).collect::<Result<_>>()?;
    let g =
        reference::try_ffn_backward(p, v[0].as_deref().expect("x"), &weights(&v), &f64_data(dy)?)?;
    let out = |v: Vec<f64>, shape: &[usize]| host_out(v, shape, p.dtype);
    let opt = |want: bool, v: Option<Vec<f64>>, shape: &[usize]| -> Result<Option<HostTensor>> {
        match (want, v) {
            (true, Some(v)) => Some(out(v, shape)).transpose(),
            _ => Ok(None),
        }
    };
    Ok(FfnGradients {
        dx: out(g.dx, &p.x_shape())?,
        dw1: out(g.dw1, &p.w1_shape())?,
        db1: opt(p.has_b1, Some(g.db1), &[p.d_hidden])?,
        dw2: out(g.dw2, &p.w2_shape())?,
        db2: opt(p.has_b2, Some(g.db2), &[p.d_model])?,
        dw3: opt(p.gated, g.dw3, &p.w1_shape())?,
        db3: opt(p.has_b3, g.db3, &[p.d_hidden])?,
    })
}
