//! 2-D convolution (forward with a fused bias + activation, and backward) and 2-D max /
//! average pooling (forward and backward): validate -> plan -> launch (or the CPU
//! reference, behind the same signature).
//!
//! Layouts are logical: x (N, C, H, W), weight (K, C / groups, R, S), bias (K),
//! y (N, K, P, Q), given by shape and strides (in elements), so NCHW and NHWC (torch's
//! channels_last) memory are the same call with different strides. Semantics are
//! torch's: `conv2d` is cross-correlation with zero padding, P = (H + 2 pad_h -
//! dil_h (R - 1) - 1) / stride_h + 1 (floor), GELU is the exact (erf) form; pooling
//! follows `max_pool2d` (indices h * W + w within a plane, first maximum on ties,
//! padding never wins) and `avg_pool2d` (`count_include_pad`, `divisor_override`).
//!
//! Outputs are contiguous NCHW in x's dtype (max-pool indices: contiguous i32). The CPU
//! path computes in f64 and rounds once to the dtype.

use crate::error::{Error, Result};
use crate::ops::common::{check_layout, checked_elements, f64_data, host_out, mixed_devices};
use crate::tensor::{DType, HostTensor, Layout};
use crate::{OpTensor, Tensor, TensorRef};

/// Activation fused after conv + bias.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Activation {
    #[default]
    None,
    Relu,
    /// Exact GELU, x * Phi(x) (torch's default `approximate="none"`).
    Gelu,
    /// x * sigmoid(x).
    Silu,
}

impl Activation {
    pub fn name(self) -> &'static str {
        match self {
            Activation::None => "none",
            Activation::Relu => "relu",
            Activation::Gelu => "gelu",
            Activation::Silu => "silu",
        }
    }

    /// Parses "none" / "relu" / "gelu" / "silu".
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "none" => Activation::None,
            "relu" => Activation::Relu,
            "gelu" => Activation::Gelu,
            "silu" => Activation::Silu,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "activation must be one of none, relu, gelu, silu, got {name:?}"
                )))
            }
        })
    }
}

/// How the CUDA path forms the convolution's GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConvAlgo {
    /// im2col into a workspace, then the GEMM.
    Im2col,
    /// im2col tiles built in shared memory only (no workspace).
    ImplicitGemm,
}

impl ConvAlgo {
    pub fn name(self) -> &'static str {
        match self {
            ConvAlgo::Im2col => "im2col",
            ConvAlgo::ImplicitGemm => "implicit_gemm",
        }
    }

    /// Parses "im2col" / "implicit_gemm".
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "im2col" => Ok(ConvAlgo::Im2col),
            "implicit_gemm" => Ok(ConvAlgo::ImplicitGemm),
            _ => Err(Error::InvalidArgument(format!(
                "algo must be \"im2col\" or \"implicit_gemm\", got {name:?}"
            ))),
        }
    }
}

/// Options of a convolution ((height, width) pairs, as torch's conv2d).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Conv2dOptions {
    pub stride: [usize; 2],
    /// Zero padding on each side.
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
    /// Divides C and K.
    pub groups: usize,
    pub activation: Activation,
    /// Force an algorithm on the CUDA path (`None`: the implicit GEMM where it applies,
    /// else im2col). Ignored by the CPU path.
    pub algo: Option<ConvAlgo>,
}

impl Default for Conv2dOptions {
    fn default() -> Self {
        Conv2dOptions {
            stride: [1, 1],
            padding: [0, 0],
            dilation: [1, 1],
            groups: 1,
            activation: Activation::None,
            algo: None,
        }
    }
}

/// Sizes of a validated convolution.
#[derive(Debug, Clone, PartialEq)]
// Non-exhaustive: outside this crate only the validator builds one, so holding a
// problem is proof that the call was checked; the launch consumes it as it is.
#[non_exhaustive]
pub struct Conv2dProblem {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    /// Output channels.
    pub k: usize,
    /// Filter height and width.
    pub r: usize,
    pub s: usize,
    /// Output height and width.
    pub p: usize,
    pub q: usize,
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
    pub groups: usize,
    pub activation: Activation,
    pub algo: Option<ConvAlgo>,
    pub dtype: DType,
    pub has_bias: bool,
}

impl Conv2dProblem {
    pub fn x_shape(&self) -> Vec<usize> {
        vec![self.n, self.c, self.h, self.w]
    }

    pub fn weight_shape(&self) -> Vec<usize> {
        vec![self.k, self.c / self.groups, self.r, self.s]
    }

    pub fn y_shape(&self) -> Vec<usize> {
        vec![self.n, self.k, self.p, self.q]
    }

    /// The invariants the CPU reference relies on, checked again (the fields are public,
    /// so a validated problem can be changed): groups divide the channels, and the
    /// output size is the one the options give (so no position computation overflows).
    pub(crate) fn check_consistent(&self) -> Result<()> {
        let g = self.groups;
        let sizes_ok = g != 0
            && self.c % g == 0
            && self.k % g == 0
            && output_size(
                self.h,
                self.r,
                self.stride[0],
                self.padding[0],
                self.dilation[0],
                false,
            ) == Some(self.p)
            && output_size(
                self.w,
                self.s,
                self.stride[1],
                self.padding[1],
                self.dilation[1],
                false,
            ) == Some(self.q);
        if !sizes_ok {
            return Err(crate::ops::common::altered(format!("{self:?}")));
        }
        checked_elements("x", &self.x_shape())?;
        checked_elements("the weight", &self.weight_shape())?;
        checked_elements("y", &self.y_shape())?;
        Ok(())
    }

    /// Forward FLOPs: 2 per multiply-add, padding taps included (the usual convention).
    pub fn flops(&self) -> f64 {
        2.0 * (self.n * self.k * self.p * self.q) as f64
            * (self.c / self.groups * self.r * self.s) as f64
    }
}

pub(crate) const X_LAYOUT: &str = "(batch, channels, height, width)";
const W_LAYOUT: &str = "(out_channels, in_channels / groups, kernel_h, kernel_w)";

pub(crate) fn check_positive(what: &str, v: [usize; 2]) -> Result<()> {
    if v.contains(&0) {
        return Err(Error::InvalidArgument(format!(
            "{what} must be positive, got {v:?}"
        )));
    }
    Ok(())
}

/// Output length of a convolution or pooling window sweep (floor, or ceil with
/// torch's rule that the last window must start inside the input or left padding);
/// `None` when the dilated window does not fit the padded input, or when any of the
/// sizes involved overflows `usize` (checked arithmetic throughout), or for a zero
/// kernel or stride.
pub fn output_size(
    len: usize,
    kernel: usize,
    stride: usize,
    pad: usize,
    dilation: usize,
    ceil_mode: bool,
) -> Option<usize> {
    let span = window_span(kernel, dilation)?;
    let padded = padded_len(len, pad)?;
    if span > padded || stride == 0 {
        return None;
    }
    let room = padded - span;
    // Both are at most room + 1 <= padded.
    let mut out = if ceil_mode {
        room.div_ceil(stride) + 1
    } else {
        room / stride + 1
    };
    if ceil_mode
        && (out - 1)
            .checked_mul(stride)
            .is_none_or(|start| start >= len + pad)
    {
        out -= 1;
    }
    Some(out)
}

/// `dilation * (kernel - 1) + 1`, the extent of a dilated window; `None` on overflow or
/// for a zero kernel.
pub(crate) fn window_span(kernel: usize, dilation: usize) -> Option<usize> {
    dilation.checked_mul(kernel.checked_sub(1)?)?.checked_add(1)
}

/// `len + 2 * pad`; `None` on overflow.
pub(crate) fn padded_len(len: usize, pad: usize) -> Option<usize> {
    pad.checked_mul(2)?.checked_add(len)
}

/// `dilation * (kernel - 1) + 1` for a message, exact even where `usize` overflows.
pub(crate) fn span_for_message(kernel: usize, dilation: usize) -> u128 {
    dilation as u128 * (kernel as u128).saturating_sub(1) + 1
}

/// Checks x, weight, the optional bias and the options; returns the problem sizes.
pub fn validate(
    x: (DType, &Layout),
    w: (DType, &Layout),
    bias: Option<(DType, &Layout)>,
    opts: &Conv2dOptions,
) -> Result<Conv2dProblem> {
    check_layout("x", x.1, 4, X_LAYOUT)?;
    check_layout("weight", w.1, 4, W_LAYOUT)?;
    if x.0 != w.0 {
        return Err(Error::DTypeMismatch {
            detail: format!("x is {} but weight is {}", x.0, w.0),
        });
    }
    let [n, c, h, wd] = <[usize; 4]>::try_from(x.1.shape.as_slice()).expect("rank 4");
    let [k, cg, r, s] = <[usize; 4]>::try_from(w.1.shape.as_slice()).expect("rank 4");
    if let Some((bd, bl)) = bias {
        if bl.shape != [k] || bl.strides.len() != 1 {
            return Err(Error::ShapeMismatch {
                detail: format!(
                    "bias has shape {:?}, expected [{k}] (one per output channel of weight {:?})",
                    bl.shape, w.1.shape
                ),
            });
        }
        if bd != x.0 {
            return Err(Error::DTypeMismatch {
                detail: format!("bias is {bd} but x is {}", x.0),
            });
        }
    }
    check_positive("stride", opts.stride)?;
    check_positive("dilation", opts.dilation)?;
    let g = opts.groups;
    if g == 0 {
        return Err(Error::InvalidArgument(
            "groups must be positive, got 0".into(),
        ));
    }
    if c % g != 0 || k % g != 0 {
        return Err(Error::ShapeMismatch {
            detail: format!(
                "groups = {g} must divide both the input channels ({c}) and the output channels ({k})"
            ),
        });
    }
    if cg != c / g {
        return Err(Error::ShapeMismatch {
            detail: format!(
                "weight {:?} has {cg} input channels per group, but x has {c} channels in {g} \
                 group(s): expected {}",
                w.1.shape,
                c / g
            ),
        });
    }
    let too_big = |dim: &str, len: usize, kernel: usize, i: usize| Error::ShapeMismatch {
        detail: format!(
            "the kernel's {dim} {kernel} (dilation {}, so {} wide) is larger than the padded \
             input's {dim} {len} + 2 * {} = {}",
            opts.dilation[i],
            span_for_message(kernel, opts.dilation[i]),
            opts.padding[i],
            len as u128 + 2 * opts.padding[i] as u128
        ),
    };
    let p = output_size(
        h,
        r,
        opts.stride[0],
        opts.padding[0],
        opts.dilation[0],
        false,
    )
    .ok_or_else(|| too_big("height", h, r, 0))?;
    let q = output_size(
        wd,
        s,
        opts.stride[1],
        opts.padding[1],
        opts.dilation[1],
        false,
    )
    .ok_or_else(|| too_big("width", wd, s, 1))?;
    // The output (and y_pre, and the reference's f64 copies) must fit in memory.
    checked_elements("the output y", &[n, k, p, q])?;
    Ok(Conv2dProblem {
        n,
        c,
        h,
        w: wd,
        k,
        r,
        s,
        p,
        q,
        stride: opts.stride,
        padding: opts.padding,
        dilation: opts.dilation,
        groups: g,
        activation: opts.activation,
        algo: opts.algo,
        dtype: x.0,
        has_bias: bias.is_some(),
    })
}

/// Checks the backward's `dy` (the gradient of conv + bias, before any activation)
/// against a validated forward problem: y's logical shape and x's dtype, any strides.
pub fn validate_backward(p: &Conv2dProblem, dy: (DType, &Layout)) -> Result<()> {
    check_layout(
        "dy",
        dy.1,
        4,
        "(batch, out_channels, out_height, out_width)",
    )?;
    if dy.1.shape != p.y_shape() {
        return Err(Error::ShapeMismatch {
            detail: format!(
                "dy has shape {:?}, expected the output's {:?}",
                dy.1.shape,
                p.y_shape()
            ),
        });
    }
    if dy.0 != p.dtype {
        return Err(Error::DTypeMismatch {
            detail: format!("dy is {} but x is {}", dy.0, p.dtype),
        });
    }
    Ok(())
}

/// y = act(conv + bias), and (when asked for) y_pre = conv + bias, which the backward
/// of a fused activation needs.
#[derive(Debug)]
pub struct Conv2dOutput<T> {
    pub y: T,
    pub y_pre: Option<T>,
}

/// Which gradients a backward call computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGrads {
    pub input: bool,
    pub weight: bool,
    pub bias: bool,
}

impl ConvGrads {
    pub const ALL: ConvGrads = ConvGrads {
        input: true,
        weight: true,
        bias: true,
    };
}

/// dx (x's logical shape), dweight, dbias of one backward call, each `None` when not
/// asked for.
#[derive(Debug)]
pub struct Conv2dGradients<T> {
    pub dx: Option<T>,
    pub dweight: Option<T>,
    pub dbias: Option<T>,
}

/// The inputs of a forward call: x (N, C, H, W), weight (K, C / groups, R, S), an
/// optional bias (K), and whether to return y_pre (conv + bias) too.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a, T> {
    pub x: &'a T,
    pub weight: &'a T,
    pub bias: Option<&'a T>,
    /// Also return y_pre, what the backward of a fused activation needs.
    pub keep_pre: bool,
}

impl<'a, T> Inputs<'a, T> {
    /// x and weight, no bias, y only.
    pub fn new(x: &'a T, weight: &'a T) -> Self {
        Inputs {
            x,
            weight,
            bias: None,
            keep_pre: false,
        }
    }

    pub fn bias(self, bias: Option<&'a T>) -> Self {
        Inputs { bias, ..self }
    }

    pub fn keep_pre(self, keep_pre: bool) -> Self {
        Inputs { keep_pre, ..self }
    }
}

/// The inputs of a backward call: the forward's x and weight, dy (the gradient of conv +
/// bias, i.e. before the activation; apply the activation's derivative at y_pre first,
/// see [`reference::activation_backward`]), and which gradients to compute.
#[derive(Debug, Clone, Copy)]
pub struct BackwardInputs<'a, T> {
    pub x: &'a T,
    pub weight: &'a T,
    pub dy: &'a T,
    pub grads: ConvGrads,
}

impl<'a, T> BackwardInputs<'a, T> {
    /// Every gradient.
    pub fn new(x: &'a T, weight: &'a T, dy: &'a T) -> Self {
        BackwardInputs {
            x,
            weight,
            dy,
            grads: ConvGrads::ALL,
        }
    }

    pub fn grads(self, grads: ConvGrads) -> Self {
        BackwardInputs { grads, ..self }
    }
}

/// Convolution forward: y = act(conv2d(x, weight) + bias) (and y_pre when asked for).
/// Host tensors run the CPU reference (f64, rounded once to the dtype), device tensors
/// the CUDA kernels on x's stream; the outputs are contiguous NCHW where the inputs live.
pub fn forward<T: OpTensor>(i: &Inputs<'_, T>, opts: &Conv2dOptions) -> Result<Conv2dOutput<T>> {
    let bias = i.bias.map(OpTensor::tensor_ref);
    let o = match (i.x.tensor_ref(), i.weight.tensor_ref(), bias) {
        (TensorRef::Host(x), TensorRef::Host(w), b @ (None | Some(TensorRef::Host(_)))) => {
            let b = match b {
                Some(TensorRef::Host(b)) => Some(b),
                _ => None,
            };
            let p = validate(
                x.described(),
                w.described(),
                b.map(HostTensor::described),
                opts,
            )?;
            let o = forward_host(&p, x, w, b, i.keep_pre)?;
            Conv2dOutput {
                y: Tensor::Host(o.y),
                y_pre: o.y_pre.map(Tensor::Host),
            }
        }
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        (TensorRef::Cuda(x), TensorRef::Cuda(w), b @ (None | Some(TensorRef::Cuda(_)))) => {
            let b = match b {
                Some(TensorRef::Cuda(b)) => Some(b),
                _ => None,
            };
            let o = cuda::conv2d_forward(x, w, b, opts, i.keep_pre)?;
            Conv2dOutput {
                y: Tensor::Cuda(o.y),
                y_pre: o.y_pre.map(Tensor::Cuda),
            }
        }
        #[allow(unreachable_patterns)]
        (x, w, b) => {
            let mut ts = vec![("x", x), ("weight", w)];
            ts.extend(b.map(|b| ("bias", b)));
            return Err(mixed_devices(&ts));
        }
    };
    Ok(Conv2dOutput {
        y: T::from_output(o.y)?,
        y_pre: o.y_pre.map(T::from_output).transpose()?,
    })
}

/// The CPU reference on a validated problem (the Python host path validates once and
/// calls this).
pub(crate) fn forward_host(
    p: &Conv2dProblem,
    x: &HostTensor,
    weight: &HostTensor,
    bias: Option<&HostTensor>,
    keep_pre: bool,
) -> Result<Conv2dOutput<HostTensor>> {
    let b = bias.map(f64_data).transpose()?;
    let o = reference::try_conv2d(p, &f64_data(x)?, &f64_data(weight)?, b.as_deref())?;
    let shape = p.y_shape();
    Ok(Conv2dOutput {
        y: host_out(o.y, &shape, p.dtype)?,
        y_pre: if keep_pre {
            Some(host_out(o.y_pre, &shape, p.dtype)?)
        } else {
            None
        },
    })
}

/// Convolution backward: the gradients `i.grads` asks for. Host tensors run the CPU
/// reference, device tensors the CUDA kernels on x's stream.
pub fn backward<T: OpTensor>(
    i: &BackwardInputs<'_, T>,
    opts: &Conv2dOptions,
) -> Result<Conv2dGradients<T>> {
    let g = match (i.x.tensor_ref(), i.weight.tensor_ref(), i.dy.tensor_ref()) {
        (TensorRef::Host(x), TensorRef::Host(w), TensorRef::Host(dy)) => {
            let p = validate(x.described(), w.described(), None, opts)?;
            validate_backward(&p, dy.described())?;
            let g = backward_host(&p, [x, w, dy], i.grads)?;
            Conv2dGradients {
                dx: g.dx.map(Tensor::Host),
                dweight: g.dweight.map(Tensor::Host),
                dbias: g.dbias.map(Tensor::Host),
            }
        }
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        (TensorRef::Cuda(x), TensorRef::Cuda(w), TensorRef::Cuda(dy)) => {
            let g = cuda::conv2d_backward(x, w, dy, opts, i.grads)?;
            Conv2dGradients {
                dx: g.dx.map(Tensor::Cuda),
                dweight: g.dweight.map(Tensor::Cuda),
                dbias: g.dbias.map(Tensor::Cuda),
            }
        }
        #[allow(unreachable_patterns)]
        (x, w, dy) => return Err(mixed_devices(&[("x", x), ("weight", w), ("dy", dy)])),
    };
    Ok(Conv2dGradients {
        dx: g.dx.map(T::from_output).transpose()?,
        dweight: g.dweight.map(T::from_output).transpose()?,
        dbias: g.dbias.map(T::from_output).transpose()?,
    })
}

/// The CPU reference backward on a validated problem (see [`forward_host`]).
pub(crate) fn backward_host(
    p: &Conv2dProblem,
    [x, weight, dy]: [&HostTensor; 3],
    grads: ConvGrads,
) -> Result<Conv2dGradients<HostTensor>> {
    let g = reference::try_conv2d_backward(p, &f64_data(x)?, &f64_data(weight)?, &f64_data(dy)?)?;
    let out = |want: bool, v: Vec<f64>, shape: &[usize]| -> Result<Option<HostTensor>> {
        want.then(|| host_out(v, shape, p.dtype)).transpose()
    };
    Ok(Conv2dGradients {
        dx: out(grads.input, g.dx, &p.x_shape())?,
        dweight: out(grads.weight, g.dweight, &p.weight_shape())?,
        dbias: out(grads.bias, g.dbias, &[p.k])?,
    })
}

#[cfg(any(feature = "cuda", feature = "emulator"))]
pub mod cuda;
pub mod reference;
