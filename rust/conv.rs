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
use crate::reference;
use crate::tensor::{DType, HostTensor, Layout};
use crate::Tensor;

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

    /// Forward FLOPs: 2 per multiply-add, padding taps included (the usual convention).
    pub fn flops(&self) -> f64 {
        2.0 * (self.n * self.k * self.p * self.q) as f64
            * (self.c / self.groups * self.r * self.s) as f64
    }
}

const X_LAYOUT: &str = "(batch, channels, height, width)";
const W_LAYOUT: &str = "(out_channels, in_channels / groups, kernel_h, kernel_w)";

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
    Ok(())
}

fn check_positive(what: &str, v: [usize; 2]) -> Result<()> {
    if v.contains(&0) {
        return Err(Error::InvalidArgument(format!(
            "{what} must be positive, got {v:?}"
        )));
    }
    Ok(())
}

/// Output length of a convolution or pooling window sweep (floor, or ceil with
/// torch's rule that the last window must start inside the input or left padding);
/// `None` when the dilated window does not fit the padded input.
pub fn output_size(
    len: usize,
    kernel: usize,
    stride: usize,
    pad: usize,
    dilation: usize,
    ceil_mode: bool,
) -> Option<usize> {
    let span = dilation * (kernel - 1) + 1;
    let padded = len + 2 * pad;
    if span > padded {
        return None;
    }
    let room = padded - span;
    let mut out = if ceil_mode {
        room.div_ceil(stride) + 1
    } else {
        room / stride + 1
    };
    if ceil_mode && (out - 1) * stride >= len + pad {
        out -= 1;
    }
    Some(out)
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
             input's {dim} {len} + 2 * {}",
            opts.dilation[i],
            opts.dilation[i] * (kernel - 1) + 1,
            opts.padding[i]
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

fn mixed_devices(ts: &[(&str, &Tensor)]) -> Error {
    let where_: Vec<String> = ts
        .iter()
        .map(|(n, t)| format!("{n} on {}", t.device_name()))
        .collect();
    Error::DeviceMismatch {
        detail: format!("{}: all must be on one device", where_.join(", ")),
    }
}

fn f64_data(t: &HostTensor) -> Vec<f64> {
    t.to_f32_vec().into_iter().map(f64::from).collect()
}

fn host_out(v: Vec<f64>, shape: &[usize], dtype: DType) -> Result<HostTensor> {
    HostTensor::from_fn(dtype, shape, |i| v[i] as f32)
}

/// y = act(conv2d(x, weight) + bias) on host or device tensors: the CPU reference for
/// host tensors, the CUDA kernels (on x's stream) for device tensors.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    opts: &Conv2dOptions,
) -> Result<Tensor> {
    Ok(conv2d_forward(x, weight, bias, opts, false)?.y)
}

/// [`conv2d`], also returning y_pre (conv + bias) when `keep_pre`.
pub fn conv2d_forward(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    opts: &Conv2dOptions,
    keep_pre: bool,
) -> Result<Conv2dOutput<Tensor>> {
    match (x, weight, bias) {
        (Tensor::Host(x), Tensor::Host(w), None) => {
            let o = conv2d_cpu(x, w, None, opts, keep_pre)?;
            Ok(Conv2dOutput {
                y: Tensor::Host(o.y),
                y_pre: o.y_pre.map(Tensor::Host),
            })
        }
        (Tensor::Host(x), Tensor::Host(w), Some(Tensor::Host(b))) => {
            let o = conv2d_cpu(x, w, Some(b), opts, keep_pre)?;
            Ok(Conv2dOutput {
                y: Tensor::Host(o.y),
                y_pre: o.y_pre.map(Tensor::Host),
            })
        }
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        (Tensor::Cuda(x), Tensor::Cuda(w), b @ (None | Some(Tensor::Cuda(_)))) => {
            let b = match b {
                Some(Tensor::Cuda(b)) => Some(b),
                _ => None,
            };
            let o = cuda::conv2d_forward(x, w, b, opts, keep_pre)?;
            Ok(Conv2dOutput {
                y: Tensor::Cuda(o.y),
                y_pre: o.y_pre.map(Tensor::Cuda),
            })
        }
        #[allow(unreachable_patterns)]
        (x, w, b) => {
            let mut ts = vec![("x", x), ("weight", w)];
            ts.extend(b.map(|b| ("bias", b)));
            Err(mixed_devices(&ts))
        }
    }
}

/// The CPU reference forward on host tensors.
pub fn conv2d_cpu(
    x: &HostTensor,
    weight: &HostTensor,
    bias: Option<&HostTensor>,
    opts: &Conv2dOptions,
    keep_pre: bool,
) -> Result<Conv2dOutput<HostTensor>> {
    let p = validate(
        (x.dtype(), x.layout()),
        (weight.dtype(), weight.layout()),
        bias.map(|b| (b.dtype(), b.layout())),
        opts,
    )?;
    let b = bias.map(f64_data);
    let o = reference::conv2d(&p, &f64_data(x), &f64_data(weight), b.as_deref());
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

/// Convolution backward: the gradients `grads` asks for, from x, weight and dy (the
/// gradient of conv + bias, i.e. before the activation; apply the activation's
/// derivative at y_pre first, see [`reference::activation_backward`]).
pub fn conv2d_backward(
    x: &Tensor,
    weight: &Tensor,
    dy: &Tensor,
    opts: &Conv2dOptions,
    grads: ConvGrads,
) -> Result<Conv2dGradients<Tensor>> {
    match (x, weight, dy) {
        (Tensor::Host(x), Tensor::Host(w), Tensor::Host(dy)) => {
            let g = conv2d_backward_cpu(x, w, dy, opts, grads)?;
            Ok(Conv2dGradients {
                dx: g.dx.map(Tensor::Host),
                dweight: g.dweight.map(Tensor::Host),
                dbias: g.dbias.map(Tensor::Host),
            })
        }
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        (Tensor::Cuda(x), Tensor::Cuda(w), Tensor::Cuda(dy)) => {
            let g = cuda::conv2d_backward(x, w, dy, opts, grads)?;
            Ok(Conv2dGradients {
                dx: g.dx.map(Tensor::Cuda),
                dweight: g.dweight.map(Tensor::Cuda),
                dbias: g.dbias.map(Tensor::Cuda),
            })
        }
        #[allow(unreachable_patterns)]
        (x, w, dy) => Err(mixed_devices(&[("x", x), ("weight", w), ("dy", dy)])),
    }
}

/// The CPU reference backward on host tensors.
pub fn conv2d_backward_cpu(
    x: &HostTensor,
    weight: &HostTensor,
    dy: &HostTensor,
    opts: &Conv2dOptions,
    grads: ConvGrads,
) -> Result<Conv2dGradients<HostTensor>> {
    let p = validate(
        (x.dtype(), x.layout()),
        (weight.dtype(), weight.layout()),
        None,
        opts,
    )?;
    validate_backward(&p, (dy.dtype(), dy.layout()))?;
    let g = reference::conv2d_backward(&p, &f64_data(x), &f64_data(weight), &f64_data(dy));
    let out = |want: bool, v: Vec<f64>, shape: &[usize]| -> Result<Option<HostTensor>> {
        want.then(|| host_out(v, shape, p.dtype)).transpose()
    };
    Ok(Conv2dGradients {
        dx: out(grads.input, g.dx, &p.x_shape())?,
        dweight: out(grads.weight, g.dweight, &p.weight_shape())?,
        dbias: out(grads.bias, g.dbias, &[p.k])?,
    })
}

// ---------------------------------------------------------------------------------------
// Pooling.

/// Max or average pooling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoolKind {
    Max,
    Avg,
}

/// Options of a pooling call ((height, width) pairs, as torch's max_pool2d /
/// avg_pool2d).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pool2dOptions {
    pub kernel_size: [usize; 2],
    /// `None`: the kernel size (torch's default).
    pub stride: Option<[usize; 2]>,
    /// Implicit padding on each side: -inf for max pooling, zeros for average pooling.
    /// At most half the kernel size.
    pub padding: [usize; 2],
    /// Max pooling only (average pooling takes 1).
    pub dilation: [usize; 2],
    pub ceil_mode: bool,
    /// Average pooling: count the padding in the divisor.
    pub count_include_pad: bool,
    /// Average pooling: divide by this instead of the window size.
    pub divisor_override: Option<usize>,
}

impl Pool2dOptions {
    /// Torch's defaults for a `kernel_size` window.
    pub fn new(kernel_size: [usize; 2]) -> Self {
        Pool2dOptions {
            kernel_size,
            stride: None,
            padding: [0, 0],
            dilation: [1, 1],
            ceil_mode: false,
            count_include_pad: true,
            divisor_override: None,
        }
    }
}

/// Sizes of a validated pooling call.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool2dProblem {
    pub kind: PoolKind,
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub p: usize,
    pub q: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
    pub count_include_pad: bool,
    pub divisor_override: Option<usize>,
    pub dtype: DType,
}

impl Pool2dProblem {
    pub fn x_shape(&self) -> Vec<usize> {
        vec![self.n, self.c, self.h, self.w]
    }

    pub fn y_shape(&self) -> Vec<usize> {
        vec![self.n, self.c, self.p, self.q]
    }
}

/// Checks x and the options of a pooling call; returns the problem sizes.
pub fn validate_pool(
    kind: PoolKind,
    x: (DType, &Layout),
    opts: &Pool2dOptions,
) -> Result<Pool2dProblem> {
    check_layout("x", x.1, 4, X_LAYOUT)?;
    let [n, c, h, w] = <[usize; 4]>::try_from(x.1.shape.as_slice()).expect("rank 4");
    let kernel = opts.kernel_size;
    check_positive("kernel_size", kernel)?;
    let stride = opts.stride.unwrap_or(kernel);
    check_positive("stride", stride)?;
    check_positive("dilation", opts.dilation)?;
    if kind == PoolKind::Avg && opts.dilation != [1, 1] {
        return Err(Error::InvalidArgument(format!(
            "average pooling takes no dilation, got {:?}",
            opts.dilation
        )));
    }
    if kind == PoolKind::Max && (opts.divisor_override.is_some() || !opts.count_include_pad) {
        return Err(Error::InvalidArgument(
            "count_include_pad and divisor_override are average-pooling options".into(),
        ));
    }
    if opts.divisor_override == Some(0) {
        return Err(Error::InvalidArgument(
            "divisor_override must be positive, got 0".into(),
        ));
    }
    if opts.padding[0] > kernel[0] / 2 || opts.padding[1] > kernel[1] / 2 {
        return Err(Error::InvalidArgument(format!(
            "padding {:?} must be at most half the kernel size {kernel:?}",
            opts.padding
        )));
    }
    let size = |i: usize, len: usize| {
        output_size(
            len,
            kernel[i],
            stride[i],
            opts.padding[i],
            opts.dilation[i],
            opts.ceil_mode,
        )
        .filter(|&o| o > 0)
        .ok_or_else(|| Error::ShapeMismatch {
            detail: format!(
                "the pooling window {kernel:?} (dilation {:?}) is larger than the padded \
                     input {:?} + 2 * {:?}",
                opts.dilation,
                [h, w],
                opts.padding
            ),
        })
    };
    let p = size(0, h)?;
    let q = size(1, w)?;
    // With dilation a window can hold padding only (torch then returns -inf and an
    // index outside the plane); the kernels assume it cannot, so refuse it.
    for (i, len, out) in [(0, h, p), (1, w, q)] {
        let hits_input = |o: usize| {
            (0..kernel[i]).any(|t| {
                let pos = o * stride[i] + t * opts.dilation[i];
                pos >= opts.padding[i] && pos - opts.padding[i] < len
            })
        };
        if let Some(o) = (0..out).find(|&o| !hits_input(o)) {
            return Err(Error::InvalidArgument(format!(
                "pooling window {o} along {} lies wholly in the padding (kernel {kernel:?},                  stride {stride:?}, padding {:?}, dilation {:?}, input {:?})",
                ["height", "width"][i],
                opts.padding,
                opts.dilation,
                [h, w]
            )));
        }
    }
    Ok(Pool2dProblem {
        kind,
        n,
        c,
        h,
        w,
        p,
        q,
        kernel,
        stride,
        padding: opts.padding,
        dilation: opts.dilation,
        count_include_pad: opts.count_include_pad,
        divisor_override: opts.divisor_override,
        dtype: x.0,
    })
}

/// Checks a pooling backward's `dy` against the forward problem.
pub fn validate_pool_backward(p: &Pool2dProblem, dy: (DType, &Layout)) -> Result<()> {
    check_layout("dy", dy.1, 4, "(batch, channels, out_height, out_width)")?;
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

/// Argmax indices of a max pooling call: contiguous int32 (N, C, P, Q), each `h * W + w`
/// within its (n, c) plane.
#[derive(Debug)]
pub enum Indices {
    Host(Vec<i32>),
    #[cfg(any(feature = "cuda", feature = "emulator"))]
    Cuda(cuda::DeviceIndices),
}

impl Indices {
    /// A host copy (waits for the device when the indices live there).
    pub fn to_host(&self) -> Result<Vec<i32>> {
        match self {
            Indices::Host(v) => Ok(v.clone()),
            #[cfg(any(feature = "cuda", feature = "emulator"))]
            Indices::Cuda(d) => d.to_host(),
        }
    }
}

/// y and the argmax indices of a max pooling call.
#[derive(Debug)]
pub struct MaxPool2dOutput<T> {
    pub y: T,
    pub indices: Indices,
}

/// Max pooling on host or device tensors.
pub fn max_pool2d(x: &Tensor, opts: &Pool2dOptions) -> Result<MaxPool2dOutput<Tensor>> {
    match x {
        Tensor::Host(x) => {
            let o = max_pool2d_cpu(x, opts)?;
            Ok(MaxPool2dOutput {
                y: Tensor::Host(o.y),
                indices: o.indices,
            })
        }
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        Tensor::Cuda(x) => {
            let o = cuda::max_pool2d(x, opts)?;
            Ok(MaxPool2dOutput {
                y: Tensor::Cuda(o.y),
                indices: o.indices,
            })
        }
    }
}

/// The CPU reference max pooling.
pub fn max_pool2d_cpu(x: &HostTensor, opts: &Pool2dOptions) -> Result<MaxPool2dOutput<HostTensor>> {
    let p = validate_pool(PoolKind::Max, (x.dtype(), x.layout()), opts)?;
    let (y, idx) = reference::max_pool2d(&p, &f64_data(x));
    Ok(MaxPool2dOutput {
        y: host_out(y, &p.y_shape(), p.dtype)?,
        indices: Indices::Host(idx),
    })
}

fn check_indices_len(p: &Pool2dProblem, len: usize) -> Result<()> {
    let want: usize = p.y_shape().iter().product();
    if len != want {
        return Err(Error::ShapeMismatch {
            detail: format!(
                "indices has {len} elements, expected the output's {want} ({:?})",
                p.y_shape()
            ),
        });
    }
    Ok(())
}

/// Max pooling backward: dx (x's shape) from dy and the forward's indices. `x` gives
/// the geometry and dtype only.
pub fn max_pool2d_backward(
    x: &Tensor,
    dy: &Tensor,
    indices: &Indices,
    opts: &Pool2dOptions,
) -> Result<Tensor> {
    match (x, dy, indices) {
        (Tensor::Host(x), Tensor::Host(dy), Indices::Host(i)) => {
            Ok(Tensor::Host(max_pool2d_backward_cpu(x, dy, i, opts)?))
        }
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        (Tensor::Cuda(x), Tensor::Cuda(dy), Indices::Cuda(i)) => {
            Ok(Tensor::Cuda(cuda::max_pool2d_backward(x, dy, i, opts)?))
        }
        #[allow(unreachable_patterns)]
        (x, dy, i) => {
            let where_ = match i {
                Indices::Host(_) => "cpu".to_string(),
                #[cfg(any(feature = "cuda", feature = "emulator"))]
                Indices::Cuda(d) => format!("cuda:{}", d.stream().ordinal()),
            };
            Err(Error::DeviceMismatch {
                detail: format!(
                    "x on {}, dy on {}, indices on {where_}: all must be on one device",
                    x.device_name(),
                    dy.device_name()
                ),
            })
        }
    }
}

/// The CPU reference max pooling backward.
pub fn max_pool2d_backward_cpu(
    x: &HostTensor,
    dy: &HostTensor,
    indices: &[i32],
    opts: &Pool2dOptions,
) -> Result<HostTensor> {
    let p = validate_pool(PoolKind::Max, (x.dtype(), x.layout()), opts)?;
    validate_pool_backward(&p, (dy.dtype(), dy.layout()))?;
    check_indices_len(&p, indices.len())?;
    let plane = (p.h * p.w) as i64;
    if let Some(bad) = indices.iter().find(|&&i| i < 0 || i as i64 >= plane) {
        return Err(Error::InvalidArgument(format!(
            "indices: {bad} is outside the {}x{} input plane",
            p.h, p.w
        )));
    }
    let dx = reference::max_pool2d_backward(&p, &f64_data(dy), indices);
    host_out(dx, &p.x_shape(), p.dtype)
}

/// Average pooling on host or device tensors.
pub fn avg_pool2d(x: &Tensor, opts: &Pool2dOptions) -> Result<Tensor> {
    match x {
        Tensor::Host(x) => Ok(Tensor::Host(avg_pool2d_cpu(x, opts)?)),
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        Tensor::Cuda(x) => Ok(Tensor::Cuda(cuda::avg_pool2d(x, opts)?)),
    }
}

/// The CPU reference average pooling.
pub fn avg_pool2d_cpu(x: &HostTensor, opts: &Pool2dOptions) -> Result<HostTensor> {
    let p = validate_pool(PoolKind::Avg, (x.dtype(), x.layout()), opts)?;
    host_out(
        reference::avg_pool2d(&p, &f64_data(x)),
        &p.y_shape(),
        p.dtype,
    )
}

/// Average pooling backward: dx from dy (`x` gives the geometry and dtype only).
pub fn avg_pool2d_backward(x: &Tensor, dy: &Tensor, opts: &Pool2dOptions) -> Result<Tensor> {
    match (x, dy) {
        (Tensor::Host(x), Tensor::Host(dy)) => {
            Ok(Tensor::Host(avg_pool2d_backward_cpu(x, dy, opts)?))
        }
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        (Tensor::Cuda(x), Tensor::Cuda(dy)) => {
            Ok(Tensor::Cuda(cuda::avg_pool2d_backward(x, dy, opts)?))
        }
        #[allow(unreachable_patterns)]
        (x, dy) => Err(mixed_devices(&[("x", x), ("dy", dy)])),
    }
}

/// The CPU reference average pooling backward.
pub fn avg_pool2d_backward_cpu(
    x: &HostTensor,
    dy: &HostTensor,
    opts: &Pool2dOptions,
) -> Result<HostTensor> {
    let p = validate_pool(PoolKind::Avg, (x.dtype(), x.layout()), opts)?;
    validate_pool_backward(&p, (dy.dtype(), dy.layout()))?;
    host_out(
        reference::avg_pool2d_backward(&p, &f64_data(dy)),
        &p.x_shape(),
        p.dtype,
    )
}

#[cfg(any(feature = "cuda", feature = "emulator"))]
pub mod cuda {
    //! The CUDA path: kernel-specific checks, the plan (algorithm and workspace), then
    //! the C launchers of kernels/include/fk_conv.h.

    use std::ffi::c_void;

    use super::{
        validate, validate_backward, validate_pool, validate_pool_backward, Activation,
        Conv2dGradients, Conv2dOptions, Conv2dOutput, Conv2dProblem, ConvAlgo, ConvGrads, Indices,
        MaxPool2dOutput, Pool2dOptions, Pool2dProblem, PoolKind,
    };
    use crate::device::{Device, DeviceBuffer, DeviceTensor, DeviceView, Stream};
    use crate::error::{Error, Result};
    use crate::ffi;
    use crate::tensor::{DType, Layout};

    /// Largest size any one dimension (and the GEMM extents N*P*Q, C/groups*R*S) may
    /// have: the kernels index with 32-bit integers.
    const MAX_DIM: u64 = i32::MAX as u64;

    fn dtype_arg(d: DType) -> i32 {
        match d {
            DType::F16 => ffi::fk_dtype_FK_DTYPE_F16 as i32,
            DType::BF16 => ffi::fk_dtype_FK_DTYPE_BF16 as i32,
            // fk_conv.h's `#define FK_DTYPE_F32` (flashkernels.h's enum has no f32).
            DType::F32 => ffi::FK_DTYPE_F32 as i32,
        }
    }

    fn activation_arg(a: Activation) -> i32 {
        (match a {
            Activation::None => ffi::fk_activation_FK_ACT_NONE,
            Activation::Relu => ffi::fk_activation_FK_ACT_RELU,
            Activation::Gelu => ffi::fk_activation_FK_ACT_GELU,
            Activation::Silu => ffi::fk_activation_FK_ACT_SILU,
        }) as i32
    }

    fn algo_arg(a: ConvAlgo) -> i32 {
        (match a {
            ConvAlgo::Im2col => ffi::fk_conv_algo_FK_CONV_ALGO_IM2COL,
            ConvAlgo::ImplicitGemm => ffi::fk_conv_algo_FK_CONV_ALGO_IMPLICIT_GEMM,
        }) as i32
    }

    fn strides4(l: &Layout) -> [i64; 4] {
        [0, 1, 2, 3].map(|i| l.strides[i] as i64)
    }

    fn check_limits(what: &[(&str, usize)]) -> Result<()> {
        for &(name, value) in what {
            if value as u64 > MAX_DIM {
                return Err(Error::TooLarge {
                    what: name.into(),
                    value: value as u64,
                    limit: MAX_DIM,
                });
            }
        }
        Ok(())
    }

    fn check_views(device: usize, views: &[(&'static str, &DeviceView)]) -> Result<()> {
        for (name, view) in views {
            if view.device != device {
                return Err(Error::DeviceMismatch {
                    detail: format!(
                        "{name} is on cuda:{} but x is on cuda:{device}",
                        view.device
                    ),
                });
            }
            if view.ptr % view.dtype.size() as u64 != 0 {
                return Err(Error::InvalidArgument(format!(
                    "{name}: pointer {:#x} is not aligned to its {}-byte elements",
                    view.ptr,
                    view.dtype.size()
                )));
            }
        }
        Ok(())
    }

    /// Checks what the kernels need beyond the op's semantics: dtype, sizes that fit
    /// their 32-bit indices, every view on `device`.
    pub fn check_kernel_support(
        p: &Conv2dProblem,
        device: usize,
        views: &[(&'static str, &DeviceView)],
    ) -> Result<()> {
        check_limits(&[
            ("batch", p.n),
            ("channels", p.c),
            ("height", p.h),
            ("width", p.w),
            ("out_channels", p.k),
            ("batch * out_height * out_width", p.n * p.p * p.q),
            (
                "in_channels / groups * kernel_h * kernel_w",
                p.c / p.groups * p.r * p.s,
            ),
        ])?;
        check_views(device, views)
    }

    /// Checks an output view's dtype and logical shape (any strides).
    fn check_out(name: &str, view: &DeviceView, dtype: DType, shape: &[usize]) -> Result<()> {
        if view.layout.shape != shape
            || view.layout.strides.len() != shape.len()
            || view.dtype != dtype
        {
            return Err(Error::ShapeMismatch {
                detail: format!(
                    "{name} must be {dtype} {shape:?}, got {} {:?} strides {:?}",
                    view.dtype, view.layout.shape, view.layout.strides
                ),
            });
        }
        Ok(())
    }

    fn check_contiguous(name: &str, view: &DeviceView) -> Result<()> {
        if view.layout != Layout::contiguous(&view.layout.shape) {
            return Err(Error::InvalidArgument(format!(
                "{name}: must be contiguous, got shape {:?} strides {:?}",
                view.layout.shape, view.layout.strides
            )));
        }
        Ok(())
    }

    /// What the forward will run: the algorithm and its workspace.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Conv2dPlan {
        pub algo: ConvAlgo,
        pub workspace_bytes: usize,
    }

    fn shape_arg(p: &Conv2dProblem) -> ffi::fk_conv2d_shape {
        ffi::fk_conv2d_shape {
            n: p.n as i32,
            c: p.c as i32,
            h: p.h as i32,
            w: p.w as i32,
            k: p.k as i32,
            r: p.r as i32,
            s: p.s as i32,
            p: p.p as i32,
            q: p.q as i32,
            stride_h: p.stride[0] as i32,
            stride_w: p.stride[1] as i32,
            pad_h: p.padding[0] as i32,
            pad_w: p.padding[1] as i32,
            dil_h: p.dilation[0] as i32,
            dil_w: p.dilation[1] as i32,
            groups: p.groups as i32,
        }
    }

    /// Candidate algorithms: the forced one, or the implicit GEMM then im2col.
    fn candidates(p: &Conv2dProblem) -> Vec<ConvAlgo> {
        match p.algo {
            Some(a) => vec![a],
            None => vec![ConvAlgo::ImplicitGemm, ConvAlgo::Im2col],
        }
    }

    fn no_algo(p: &Conv2dProblem, what: &str) -> Error {
        Error::Unsupported(match p.algo {
            Some(a) => format!(
                "the {} algorithm cannot run this {what} ({} {:?} -> {:?}, groups {}): check the \
                 dtype, channel alignment and strides, or let flashkernels choose",
                a.name(),
                p.dtype,
                p.x_shape(),
                p.y_shape(),
                p.groups
            ),
            None => format!(
                "no CUDA algorithm runs this {what} ({} {:?} -> {:?}, groups {}); make the tensors \
                 contiguous (NCHW or NHWC)",
                p.dtype,
                p.x_shape(),
                p.y_shape(),
                p.groups
            ),
        })
    }

    /// The forward's parameters (pointers from the views, `algo` set by [`plan`]).
    fn fwd_params(
        p: &Conv2dProblem,
        [x, w, y]: [&DeviceView; 3],
        bias: Option<&DeviceView>,
        y_pre: Option<&DeviceView>,
    ) -> ffi::fk_conv2d_params {
        ffi::fk_conv2d_params {
            x: x.ptr as *const c_void,
            weight: w.ptr as *const c_void,
            bias: bias.map_or(std::ptr::null(), |b| b.ptr as *const c_void),
            y: y.ptr as *mut c_void,
            y_pre: y_pre.map_or(std::ptr::null_mut(), |v| v.ptr as *mut c_void),
            workspace: std::ptr::null_mut(),
            x_strides: strides4(&x.layout),
            w_strides: strides4(&w.layout),
            y_strides: strides4(&y.layout),
            shape: shape_arg(p),
            activation: activation_arg(p.activation),
            algo: 0,
            dtype: dtype_arg(p.dtype),
            device: x.device as i32,
        }
    }

    /// Chooses the forward's algorithm (the implicit GEMM when `fk_conv2d_supports`
    /// accepts it, else im2col; or the forced one) and sizes its workspace. Sets
    /// `params.algo`. Pure: reads no pointer.
    fn plan_params(p: &Conv2dProblem, params: &mut ffi::fk_conv2d_params) -> Result<Conv2dPlan> {
        for algo in candidates(p) {
            params.algo = algo_arg(algo);
            // SAFETY: a pure function of the parameters; no pointer is read.
            if unsafe { ffi::fk_conv2d_supports(params) } != 0 {
                // SAFETY: as above.
                let bytes = unsafe { ffi::fk_conv2d_workspace_bytes(params) };
                return Ok(Conv2dPlan {
                    algo,
                    workspace_bytes: bytes.max(0) as usize,
                });
            }
        }
        Err(no_algo(p, "convolution"))
    }

    /// The plan of a forward call on these views (x, weight, y; bias and y_pre
    /// optional), after the kernel checks.
    pub fn plan(
        p: &Conv2dProblem,
        [x, w, y]: [&DeviceView; 3],
        bias: Option<&DeviceView>,
        y_pre: Option<&DeviceView>,
    ) -> Result<Conv2dPlan> {
        let mut params = fwd_params(p, [x, w, y], bias, y_pre);
        plan_params(p, &mut params)
    }

    /// Makes `stream` wait for every other tensor's stream, all on one device.
    fn order_after(stream: &Stream, others: &[(&str, &DeviceTensor)]) -> Result<()> {
        for (name, t) in others {
            if t.stream().ordinal() != stream.ordinal() {
                return Err(Error::DeviceMismatch {
                    detail: format!(
                        "{name} is on cuda:{} but x is on cuda:{}",
                        t.stream().ordinal(),
                        stream.ordinal()
                    ),
                });
            }
            stream.wait_for(t.stream())?;
        }
        Ok(())
    }

    /// The caller's raw stream (torch's, cupy's, or null) as a [`Stream`].
    ///
    /// # Safety
    /// `raw` must be a live stream of `device`'s primary context (or null).
    unsafe fn borrowed(device: usize, raw: *mut c_void) -> Result<Stream> {
        // SAFETY: as the caller vouches.
        Ok(unsafe { Device::new(device)?.borrow_stream(raw) })
    }

    /// A 256-byte aligned device workspace, freed in stream order when dropped.
    struct Workspace {
        _buf: Option<DeviceBuffer>,
        ptr: *mut c_void,
    }

    fn workspace(stream: &Stream, bytes: usize) -> Result<Workspace> {
        if bytes == 0 {
            return Ok(Workspace {
                _buf: None,
                ptr: std::ptr::null_mut(),
            });
        }
        // SAFETY: the kernels write every workspace byte they read.
        let buf = unsafe { DeviceBuffer::alloc(stream, bytes)? };
        let ptr = buf.ptr();
        if ptr % 256 != 0 {
            return Err(Error::Cuda(format!(
                "workspace at {ptr:#x} is not 256-byte aligned"
            )));
        }
        Ok(Workspace {
            ptr: ptr as *mut c_void,
            _buf: Some(buf),
        })
    }

    /// Allocates y (and y_pre when `keep_pre`), contiguous NCHW, and runs the forward on
    /// x's stream.
    pub fn conv2d_forward(
        x: &DeviceTensor,
        w: &DeviceTensor,
        bias: Option<&DeviceTensor>,
        opts: &Conv2dOptions,
        keep_pre: bool,
    ) -> Result<Conv2dOutput<DeviceTensor>> {
        let p = validate(
            (x.dtype(), x.layout()),
            (w.dtype(), w.layout()),
            bias.map(|b| (b.dtype(), b.layout())),
            opts,
        )?;
        let stream = x.stream();
        let mut others = vec![("weight", w)];
        others.extend(bias.map(|b| ("bias", b)));
        order_after(stream, &others)?;
        let y = DeviceTensor::poisoned(stream, p.dtype, &p.y_shape())?;
        let y_pre = keep_pre
            .then(|| DeviceTensor::poisoned(stream, p.dtype, &p.y_shape()))
            .transpose()?;
        let bias_view = bias.map(|b| b.view());
        let pre_view = y_pre.as_ref().map(|t| t.view());
        // SAFETY: views of live DeviceTensors whose layouts fit their allocations; the
        // outputs are fresh.
        unsafe {
            launch_forward(
                &p,
                [&x.view(), &w.view(), &y.view()],
                bias_view.as_ref(),
                pre_view.as_ref(),
                || Ok(stream.clone()),
            )?
        };
        Ok(Conv2dOutput { y, y_pre })
    }

    /// Runs the forward on raw device memory, writing `y` (and `y_pre` when given).
    ///
    /// # Safety
    /// Every view must describe live device memory on its device that its layout stays
    /// inside; the outputs must not overlap the inputs or each other; `stream` must be a
    /// live stream (or null) of the views' device, ordered after whatever produced the
    /// inputs.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn conv2d_forward_views(
        x: &DeviceView,
        w: &DeviceView,
        bias: Option<&DeviceView>,
        y: &DeviceView,
        y_pre: Option<&DeviceView>,
        opts: &Conv2dOptions,
        stream: *mut c_void,
    ) -> Result<()> {
        let p = validate(
            (x.dtype, &x.layout),
            (w.dtype, &w.layout),
            bias.map(|b| (b.dtype, &b.layout)),
            opts,
        )?;
        // SAFETY: forwarded from the caller.
        unsafe { launch_forward(&p, [x, w, y], bias, y_pre, || borrowed(x.device, stream)) }
    }

    /// Checks the outputs and the kernel's needs, plans, then launches on the stream
    /// `stream` gives (asked for only once every check has passed).
    ///
    /// # Safety
    /// As [`conv2d_forward_views`].
    unsafe fn launch_forward(
        p: &Conv2dProblem,
        [x, w, y]: [&DeviceView; 3],
        bias: Option<&DeviceView>,
        y_pre: Option<&DeviceView>,
        stream: impl FnOnce() -> Result<Stream>,
    ) -> Result<()> {
        check_out("y", y, p.dtype, &p.y_shape())?;
        let mut views = vec![("x", x), ("weight", w), ("y", y)];
        if let Some(b) = bias {
            check_contiguous("bias", b)?;
            views.push(("bias", b));
        }
        if let Some(v) = y_pre {
            check_out("y_pre", v, p.dtype, &p.y_shape())?;
            if v.layout.strides != y.layout.strides {
                return Err(Error::InvalidArgument(format!(
                    "y_pre must have y's strides {:?}, got {:?}",
                    y.layout.strides, v.layout.strides
                )));
            }
            views.push(("y_pre", v));
        }
        check_kernel_support(p, x.device, &views)?;
        let mut params = fwd_params(p, [x, w, y], bias, y_pre);
        let plan = plan_params(p, &mut params)?;
        let stream = &stream()?;
        let ws = workspace(stream, plan.workspace_bytes)?;
        params.workspace = ws.ptr;
        // SAFETY: params were validated above; the caller vouches for the memory.
        let code = unsafe { ffi::fk_conv2d_fwd(&params, stream.raw()) };
        ffi::check(code)
    }

    /// Allocates the requested gradients (contiguous) and runs the backward on x's
    /// stream. `dy` is the gradient of conv + bias.
    pub fn conv2d_backward(
        x: &DeviceTensor,
        w: &DeviceTensor,
        dy: &DeviceTensor,
        opts: &Conv2dOptions,
        grads: ConvGrads,
    ) -> Result<Conv2dGradients<DeviceTensor>> {
        let p = validate((x.dtype(), x.layout()), (w.dtype(), w.layout()), None, opts)?;
        validate_backward(&p, (dy.dtype(), dy.layout()))?;
        let stream = x.stream();
        order_after(stream, &[("weight", w), ("dy", dy)])?;
        let alloc = |want: bool, shape: &[usize]| {
            want.then(|| DeviceTensor::poisoned(stream, p.dtype, shape))
                .transpose()
        };
        let dx = alloc(grads.input, &p.x_shape())?;
        let dw = alloc(grads.weight, &p.weight_shape())?;
        let db = alloc(grads.bias, &[p.k])?;
        let (vdx, vdw, vdb) = (
            dx.as_ref().map(|t| t.view()),
            dw.as_ref().map(|t| t.view()),
            db.as_ref().map(|t| t.view()),
        );
        // SAFETY: as in `conv2d_forward`.
        unsafe {
            launch_backward(
                &p,
                [&x.view(), &w.view(), &dy.view()],
                [vdx.as_ref(), vdw.as_ref(), vdb.as_ref()],
                || Ok(stream.clone()),
            )?
        };
        Ok(Conv2dGradients {
            dx,
            dweight: dw,
            dbias: db,
        })
    }

    /// Runs the backward on raw device memory: the outputs given (dx, dweight, dbias,
    /// each optional) are fully written.
    ///
    /// # Safety
    /// As [`conv2d_forward_views`].
    pub unsafe fn conv2d_backward_views(
        [x, w, dy]: [&DeviceView; 3],
        outputs: [Option<&DeviceView>; 3],
        opts: &Conv2dOptions,
        stream: *mut c_void,
    ) -> Result<()> {
        let p = validate((x.dtype, &x.layout), (w.dtype, &w.layout), None, opts)?;
        validate_backward(&p, (dy.dtype, &dy.layout))?;
        // SAFETY: forwarded from the caller.
        unsafe { launch_backward(&p, [x, w, dy], outputs, || borrowed(x.device, stream)) }
    }

    /// # Safety
    /// As [`conv2d_forward_views`].
    unsafe fn launch_backward(
        p: &Conv2dProblem,
        [x, w, dy]: [&DeviceView; 3],
        [dx, dw, db]: [Option<&DeviceView>; 3],
        stream: impl FnOnce() -> Result<Stream>,
    ) -> Result<()> {
        let mut views = vec![("x", x), ("weight", w), ("dy", dy)];
        if let Some(v) = dx {
            check_out("dx", v, p.dtype, &p.x_shape())?;
            views.push(("dx", v));
        }
        if let Some(v) = dw {
            check_out("dweight", v, p.dtype, &p.weight_shape())?;
            views.push(("dweight", v));
        }
        if let Some(v) = db {
            check_out("dbias", v, p.dtype, &[p.k])?;
            check_contiguous("dbias", v)?;
            views.push(("dbias", v));
        }
        check_kernel_support(p, x.device, &views)?;
        if dx.is_none() && dw.is_none() && db.is_none() {
            return Ok(());
        }
        let zero = [0i64; 4];
        let mut params = ffi::fk_conv2d_bwd_params {
            x: x.ptr as *const c_void,
            weight: w.ptr as *const c_void,
            dy: dy.ptr as *const c_void,
            dx: dx.map_or(std::ptr::null_mut(), |v| v.ptr as *mut c_void),
            dweight: dw.map_or(std::ptr::null_mut(), |v| v.ptr as *mut c_void),
            dbias: db.map_or(std::ptr::null_mut(), |v| v.ptr as *mut c_void),
            workspace: std::ptr::null_mut(),
            x_strides: strides4(&x.layout),
            w_strides: strides4(&w.layout),
            dy_strides: strides4(&dy.layout),
            dx_strides: dx.map_or(zero, |v| strides4(&v.layout)),
            dw_strides: dw.map_or(zero, |v| strides4(&v.layout)),
            shape: shape_arg(p),
            algo: 0,
            dtype: dtype_arg(p.dtype),
            device: x.device as i32,
        };
        let mut bytes = None;
        for algo in candidates(p) {
            params.algo = algo_arg(algo);
            // SAFETY: pure functions of the parameters; no pointer is read.
            if unsafe { ffi::fk_conv2d_bwd_supports(&params) } != 0 {
                bytes =
                    Some(unsafe { ffi::fk_conv2d_bwd_workspace_bytes(&params) }.max(0) as usize);
                break;
            }
        }
        let bytes = bytes.ok_or_else(|| no_algo(p, "convolution backward"))?;
        let stream = &stream()?;
        let ws = workspace(stream, bytes)?;
        params.workspace = ws.ptr;
        // SAFETY: params were validated above; the caller vouches for the memory.
        let code = unsafe { ffi::fk_conv2d_bwd(&params, stream.raw()) };
        ffi::check(code)
    }

    // -----------------------------------------------------------------------------------
    // Pooling.

    /// Max-pooling indices in device memory (contiguous int32, y's logical shape),
    /// freed in stream order when dropped.
    pub struct DeviceIndices {
        buf: DeviceBuffer,
        shape: Vec<usize>,
        stream: Stream,
    }

    impl std::fmt::Debug for DeviceIndices {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("DeviceIndices")
                .field("shape", &self.shape)
                .field("device", &self.stream.ordinal())
                .finish()
        }
    }

    impl DeviceIndices {
        /// Uninitialised indices of `shape` (the pooling kernel writes every element).
        fn new(stream: &Stream, shape: &[usize]) -> Result<Self> {
            let n: usize = shape.iter().product();
            // SAFETY: the forward kernel writes every index before any read.
            let buf = unsafe { DeviceBuffer::alloc_elems::<i32>(stream, n)? };
            Ok(DeviceIndices {
                buf,
                shape: shape.to_vec(),
                stream: stream.clone(),
            })
        }

        pub fn shape(&self) -> &[usize] {
            &self.shape
        }

        pub fn stream(&self) -> &Stream {
            &self.stream
        }

        /// The device address.
        pub fn ptr(&self) -> u64 {
            self.buf.ptr()
        }

        /// Copies back to the host (waits for the stream).
        pub fn to_host(&self) -> Result<Vec<i32>> {
            self.buf.download_values()
        }
    }

    fn pool_params(
        p: &Pool2dProblem,
        x: &DeviceView,
        y: &DeviceView,
        indices: u64,
    ) -> ffi::fk_pool2d_params {
        ffi::fk_pool2d_params {
            x: x.ptr as *const c_void,
            y: y.ptr as *mut c_void,
            indices: indices as *mut i32,
            x_strides: strides4(&x.layout),
            y_strides: strides4(&y.layout),
            n: p.n as i32,
            c: p.c as i32,
            h: p.h as i32,
            w: p.w as i32,
            p: p.p as i32,
            q: p.q as i32,
            kernel_h: p.kernel[0] as i32,
            kernel_w: p.kernel[1] as i32,
            stride_h: p.stride[0] as i32,
            stride_w: p.stride[1] as i32,
            pad_h: p.padding[0] as i32,
            pad_w: p.padding[1] as i32,
            dil_h: p.dilation[0] as i32,
            dil_w: p.dilation[1] as i32,
            count_include_pad: p.count_include_pad as i32,
            divisor: p
                .divisor_override
                .map_or(0, |d| d.min(i32::MAX as usize) as i32),
            kind: (match p.kind {
                PoolKind::Max => ffi::fk_pool_kind_FK_POOL_MAX,
                PoolKind::Avg => ffi::fk_pool_kind_FK_POOL_AVG,
            }) as i32,
            dtype: dtype_arg(p.dtype),
            device: x.device as i32,
        }
    }

    /// Checks a pooling call's views: y (or dy) of y's shape, x (or dx) of x's, sizes,
    /// devices, and an aligned, non-null indices pointer for max pooling.
    fn check_pool(
        p: &Pool2dProblem,
        (xname, x): (&'static str, &DeviceView),
        (yname, y): (&'static str, &DeviceView),
        indices: u64,
    ) -> Result<()> {
        check_out(xname, x, p.dtype, &p.x_shape())?;
        check_out(yname, y, p.dtype, &p.y_shape())?;
        check_limits(&[
            ("batch", p.n),
            ("channels", p.c),
            ("height * width", p.h * p.w),
            ("out_height * out_width", p.p * p.q),
        ])?;
        check_views(x.device, &[(xname, x), (yname, y)])?;
        if p.kind == PoolKind::Max && (indices == 0 || indices % 4 != 0) {
            return Err(Error::InvalidArgument(format!(
                "indices: max pooling needs a 4-byte aligned int32 buffer, got pointer {indices:#x}"
            )));
        }
        Ok(())
    }

    fn pool_forward(
        kind: PoolKind,
        x: &DeviceTensor,
        opts: &Pool2dOptions,
    ) -> Result<(DeviceTensor, Option<DeviceIndices>)> {
        let p = validate_pool(kind, (x.dtype(), x.layout()), opts)?;
        let stream = x.stream();
        let y = DeviceTensor::poisoned(stream, p.dtype, &p.y_shape())?;
        let idx = (kind == PoolKind::Max)
            .then(|| DeviceIndices::new(stream, &p.y_shape()))
            .transpose()?;
        let ptr = idx.as_ref().map_or(0, |i| i.ptr());
        // SAFETY: views of live tensors; the outputs are fresh.
        unsafe { launch_pool(&p, &x.view(), &y.view(), ptr, || Ok(stream.clone()))? };
        Ok((y, idx))
    }

    /// Allocates y and the indices and runs max pooling on x's stream.
    pub fn max_pool2d(
        x: &DeviceTensor,
        opts: &Pool2dOptions,
    ) -> Result<MaxPool2dOutput<DeviceTensor>> {
        let (y, idx) = pool_forward(PoolKind::Max, x, opts)?;
        Ok(MaxPool2dOutput {
            y,
            indices: Indices::Cuda(idx.expect("max pooling records indices")),
        })
    }

    /// Allocates y and runs average pooling on x's stream.
    pub fn avg_pool2d(x: &DeviceTensor, opts: &Pool2dOptions) -> Result<DeviceTensor> {
        Ok(pool_forward(PoolKind::Avg, x, opts)?.0)
    }

    /// Runs pooling on raw device memory: y, and for max pooling the int32 indices at
    /// `indices` (contiguous, y's logical shape; ignored for average pooling).
    ///
    /// # Safety
    /// As [`conv2d_forward_views`]; `indices` must hold y's element count of int32 on
    /// x's device.
    pub unsafe fn pool2d_forward_views(
        kind: PoolKind,
        x: &DeviceView,
        y: &DeviceView,
        indices: u64,
        opts: &Pool2dOptions,
        stream: *mut c_void,
    ) -> Result<()> {
        let p = validate_pool(kind, (x.dtype, &x.layout), opts)?;
        // SAFETY: forwarded from the caller.
        unsafe { launch_pool(&p, x, y, indices, || borrowed(x.device, stream)) }
    }

    /// # Safety
    /// As [`pool2d_forward_views`].
    unsafe fn launch_pool(
        p: &Pool2dProblem,
        x: &DeviceView,
        y: &DeviceView,
        indices: u64,
        stream: impl FnOnce() -> Result<Stream>,
    ) -> Result<()> {
        check_pool(p, ("x", x), ("y", y), indices)?;
        let params = pool_params(p, x, y, if p.kind == PoolKind::Max { indices } else { 0 });
        let stream = &stream()?;
        // SAFETY: params were validated above; the caller vouches for the memory.
        let code = unsafe { ffi::fk_pool2d_fwd(&params, stream.raw()) };
        ffi::check(code)
    }

    fn pool_backward(
        kind: PoolKind,
        x: &DeviceTensor,
        dy: &DeviceTensor,
        indices: Option<&DeviceIndices>,
        opts: &Pool2dOptions,
    ) -> Result<DeviceTensor> {
        let p = validate_pool(kind, (x.dtype(), x.layout()), opts)?;
        validate_pool_backward(&p, (dy.dtype(), dy.layout()))?;
        let stream = x.stream();
        order_after(stream, &[("dy", dy)])?;
        if let Some(i) = indices {
            if i.shape() != p.y_shape() {
                return Err(Error::ShapeMismatch {
                    detail: format!(
                        "indices has shape {:?}, expected {:?}",
                        i.shape(),
                        p.y_shape()
                    ),
                });
            }
            if i.stream().ordinal() != stream.ordinal() {
                return Err(Error::DeviceMismatch {
                    detail: format!(
                        "indices are on cuda:{} but x is on cuda:{}",
                        i.stream().ordinal(),
                        stream.ordinal()
                    ),
                });
            }
            stream.wait_for(i.stream())?;
        }
        let dx = DeviceTensor::poisoned(stream, p.dtype, &p.x_shape())?;
        let ptr = indices.map_or(0, |i| i.ptr());
        // SAFETY: views of live tensors; dx is fresh.
        unsafe { launch_pool_backward(&p, &dy.view(), ptr, &dx.view(), || Ok(stream.clone()))? };
        Ok(dx)
    }

    /// Max pooling backward on x's stream (`x` gives the geometry).
    pub fn max_pool2d_backward(
        x: &DeviceTensor,
        dy: &DeviceTensor,
        indices: &DeviceIndices,
        opts: &Pool2dOptions,
    ) -> Result<DeviceTensor> {
        pool_backward(PoolKind::Max, x, dy, Some(indices), opts)
    }

    /// Average pooling backward on x's stream (`x` gives the geometry).
    pub fn avg_pool2d_backward(
        x: &DeviceTensor,
        dy: &DeviceTensor,
        opts: &Pool2dOptions,
    ) -> Result<DeviceTensor> {
        pool_backward(PoolKind::Avg, x, dy, None, opts)
    }

    /// Pooling backward on raw device memory: dx (x's logical shape, `x` gives the
    /// geometry and dtype) from dy and, for max pooling, the forward's indices.
    ///
    /// # Safety
    /// As [`pool2d_forward_views`]; dx must not overlap dy or the indices.
    pub unsafe fn pool2d_backward_views(
        kind: PoolKind,
        x: (DType, &Layout),
        dy: &DeviceView,
        indices: u64,
        dx: &DeviceView,
        opts: &Pool2dOptions,
        stream: *mut c_void,
    ) -> Result<()> {
        let p = validate_pool(kind, x, opts)?;
        validate_pool_backward(&p, (dy.dtype, &dy.layout))?;
        // SAFETY: forwarded from the caller.
        unsafe { launch_pool_backward(&p, dy, indices, dx, || borrowed(dy.device, stream)) }
    }

    /// # Safety
    /// As [`pool2d_backward_views`].
    unsafe fn launch_pool_backward(
        p: &Pool2dProblem,
        dy: &DeviceView,
        indices: u64,
        dx: &DeviceView,
        stream: impl FnOnce() -> Result<Stream>,
    ) -> Result<()> {
        check_pool(p, ("dx", dx), ("dy", dy), indices)?;
        let indices = if p.kind == PoolKind::Max { indices } else { 0 };
        let params = ffi::fk_pool2d_bwd_params {
            dy: dy.ptr as *const c_void,
            indices: indices as *const i32,
            dx: dx.ptr as *mut c_void,
            fwd: pool_params(p, dx, dy, 0),
        };
        let stream = &stream()?;
        // SAFETY: params were validated above; the caller vouches for the memory.
        let code = unsafe { ffi::fk_pool2d_bwd(&params, stream.raw()) };
        ffi::check(code)
    }
}
