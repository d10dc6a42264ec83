//! 2-D max / average pooling (forward and backward): validate -> plan -> launch (or the
//! CPU reference, behind the same signature). Semantics are torch's `max_pool2d`
//! (indices h * W + w within a plane, first maximum on ties, padding never wins) and
//! `avg_pool2d` (`count_include_pad`, `divisor_override`). Layouts as conv's: x is
//! logical (N, C, H, W) with any strides; outputs are contiguous NCHW in x's dtype
//! (max-pool indices: contiguous i32). The CPU path computes in f64.

use crate::error::{Error, Result};
use crate::ops::common::{check_layout, checked_elements, f64_data, host_out, mixed_devices};
use crate::ops::conv::{check_positive, output_size, X_LAYOUT};
use crate::tensor::{DType, HostTensor, Layout};
use crate::{OpTensor, Tensor, TensorRef};

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
// Non-exhaustive: outside this crate only the validator builds one, so holding a
// problem is proof that the call was checked; the launch consumes it as it is.
#[non_exhaustive]
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

    /// The invariants the CPU reference relies on, checked again (the fields are public,
    /// so a validated problem can be changed): the output size is at most what the
    /// options give (so no position computation overflows), and the sizes fit.
    pub(crate) fn check_consistent(&self) -> Result<()> {
        let fits = |i: usize, len: usize, out: usize| {
            out > 0
                && [false, true].iter().any(|&ceil| {
                    output_size(
                        len,
                        self.kernel[i],
                        self.stride[i],
                        self.padding[i],
                        self.dilation[i],
                        ceil,
                    ) == Some(out)
                })
        };
        if !(fits(0, self.h, self.p) && fits(1, self.w, self.q)) || self.divisor_override == Some(0)
        {
            return Err(crate::ops::common::altered(format!("{self:?}")));
        }
        checked_elements("x", &self.x_shape())?;
        checked_elements("y", &self.y_shape())?;
        Ok(())
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
    checked_elements("the output y", &[n, c, p, q])?;
    // With dilation a window can hold padding only (torch then returns -inf and an
    // index outside the plane); the kernels assume it cannot, so refuse it. A window
    // starting inside the input hits it at its first tap; one starting in the left
    // padding first reaches the input at an offset that depends only on its start
    // modulo the dilation, so the first `dilation` such windows (at most the input's
    // length + 1 of them, since the window fits the padded input) and the last window
    // decide it, in closed form (no loop over a huge kernel).
    for (i, len, out) in [(0, h, p), (1, w, q)] {
        let (k, st, pad, dil) = (kernel[i], stride[i], opts.padding[i], opts.dilation[i]);
        let misses = |o: usize| reference::taps(o, k, st, pad, dil, len).is_empty();
        let left = (0..out)
            .take(dil.saturating_add(1))
            .take_while(|&o| (o as u128) * (st as u128) < pad as u128);
        if let Some(o) = left.chain([out - 1]).find(|&o| misses(o)) {
            return Err(Error::InvalidArgument(format!(
                "pooling window {o} along {} lies wholly in the padding (kernel {kernel:?}, \
                 stride {stride:?}, padding {:?}, dilation {:?}, input {:?})",
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
    /// "cpu" or "cuda:N".
    pub fn device_name(&self) -> String {
        match self {
            Indices::Host(_) => "cpu".into(),
            #[cfg(any(feature = "cuda", feature = "emulator"))]
            Indices::Cuda(d) => format!("cuda:{}", d.stream().ordinal()),
        }
    }

    /// A host copy (waits for the device when the indices live there).
    pub fn to_host(&self) -> Result<Vec<i32>> {
        match self {
            Indices::Host(v) => Ok(v.clone()),
            #[cfg(any(feature = "cuda", feature = "emulator"))]
            Indices::Cuda(d) => d.to_host(),
        }
    }
}

/// y, and for max pooling the argmax indices.
#[derive(Debug)]
pub struct Pool2dOutput<T> {
    pub y: T,
    /// `Some` exactly for max pooling.
    pub indices: Option<Indices>,
}

impl<T> Pool2dOutput<T> {
    /// The indices of a max pooling call (an error for average pooling, which has none).
    pub fn max_indices(&self) -> Result<&Indices> {
        self.indices.as_ref().ok_or_else(|| {
            Error::InvalidArgument("indices: average pooling records no indices".into())
        })
    }
}

/// The input of a forward call: x (N, C, H, W) and the pooling kind.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a, T> {
    pub x: &'a T,
    pub kind: PoolKind,
}

impl<'a, T> Inputs<'a, T> {
    pub fn max(x: &'a T) -> Self {
        Inputs {
            x,
            kind: PoolKind::Max,
        }
    }

    pub fn avg(x: &'a T) -> Self {
        Inputs {
            x,
            kind: PoolKind::Avg,
        }
    }
}

/// The inputs of a backward call: the forward's x (its geometry and dtype only), dy,
/// and for max pooling the forward's indices.
#[derive(Debug, Clone, Copy)]
pub struct BackwardInputs<'a, T> {
    pub x: &'a T,
    pub dy: &'a T,
    pub kind: PoolKind,
    /// Required for max pooling, absent for average pooling.
    pub indices: Option<&'a Indices>,
}

impl<'a, T> BackwardInputs<'a, T> {
    pub fn max(x: &'a T, dy: &'a T, indices: &'a Indices) -> Self {
        BackwardInputs {
            x,
            dy,
            kind: PoolKind::Max,
            indices: Some(indices),
        }
    }

    pub fn avg(x: &'a T, dy: &'a T) -> Self {
        BackwardInputs {
            x,
            dy,
            kind: PoolKind::Avg,
            indices: None,
        }
    }
}

/// Pooling forward: y (contiguous NCHW, x's dtype) and, for max pooling, the argmax
/// indices. Host tensors run the CPU reference, device tensors the CUDA kernels on x's
/// stream.
pub fn forward<T: OpTensor>(i: &Inputs<'_, T>, opts: &Pool2dOptions) -> Result<Pool2dOutput<T>> {
    let (y, indices) = match (i.x.tensor_ref(), i.kind) {
        (TensorRef::Host(x), kind) => {
            let p = validate_pool(kind, (x.dtype(), x.layout()), opts)?;
            let (y, idx) = forward_host(&p, x)?;
            (Tensor::Host(y), idx)
        }
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        (TensorRef::Cuda(x), PoolKind::Max) => {
            let o = cuda::max_pool2d(x, opts)?;
            (Tensor::Cuda(o.y), o.indices)
        }
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        (TensorRef::Cuda(x), PoolKind::Avg) => (Tensor::Cuda(cuda::avg_pool2d(x, opts)?), None),
    };
    Ok(Pool2dOutput {
        y: T::from_output(y)?,
        indices,
    })
}

/// Pooling backward: dx (x's shape and dtype) from dy and, for max pooling, the
/// forward's indices. Host tensors run the CPU reference, device tensors the CUDA
/// kernels on x's stream.
pub fn backward<T: OpTensor>(i: &BackwardInputs<'_, T>, opts: &Pool2dOptions) -> Result<T> {
    let (x, dy) = (i.x.tensor_ref(), i.dy.tensor_ref());
    let dx = match (i.kind, i.indices) {
        (PoolKind::Avg, None) => match (x, dy) {
            (TensorRef::Host(x), TensorRef::Host(dy)) => {
                let p = validate_pool(PoolKind::Avg, (x.dtype(), x.layout()), opts)?;
                validate_pool_backward(&p, (dy.dtype(), dy.layout()))?;
                Tensor::Host(backward_host(&p, dy, None)?)
            }
            #[cfg(any(feature = "cuda", feature = "emulator"))]
            (TensorRef::Cuda(x), TensorRef::Cuda(dy)) => {
                Tensor::Cuda(cuda::avg_pool2d_backward(x, dy, opts)?)
            }
            #[allow(unreachable_patterns)]
            (x, dy) => return Err(mixed_devices(&[("x", x), ("dy", dy)])),
        },
        (PoolKind::Max, Some(indices)) => match (x, dy, indices) {
            (TensorRef::Host(x), TensorRef::Host(dy), Indices::Host(idx)) => {
                let p = validate_pool(PoolKind::Max, (x.dtype(), x.layout()), opts)?;
                validate_pool_backward(&p, (dy.dtype(), dy.layout()))?;
                Tensor::Host(backward_host(&p, dy, Some(idx))?)
            }
            #[cfg(any(feature = "cuda", feature = "emulator"))]
            (TensorRef::Cuda(x), TensorRef::Cuda(dy), Indices::Cuda(idx)) => {
                Tensor::Cuda(cuda::max_pool2d_backward(x, dy, idx, opts)?)
            }
            #[allow(unreachable_patterns)]
            (x, dy, idx) => {
                return Err(Error::DeviceMismatch {
                    detail: format!(
                        "x on {}, dy on {}, indices on {}: all must be on one device",
                        x.device_name(),
                        dy.device_name(),
                        idx.device_name()
                    ),
                })
            }
        },
        (PoolKind::Max, None) => {
            return Err(Error::InvalidArgument(
                "indices: max pooling backward needs the forward's indices".into(),
            ))
        }
        (PoolKind::Avg, Some(_)) => {
            return Err(Error::InvalidArgument(
                "indices: average pooling takes no indices".into(),
            ))
        }
    };
    T::from_output(dx)
}

/// The CPU reference on a validated problem: y and, for max pooling, the indices (the
/// Python host path validates once and calls this).
pub(crate) fn forward_host(
    p: &Pool2dProblem,
    x: &HostTensor,
) -> Result<(HostTensor, Option<Indices>)> {
    let x = f64_data(x)?;
    match p.kind {
        PoolKind::Max => {
            let (y, idx) = reference::try_max_pool2d(p, &x)?;
            Ok((
                host_out(y, &p.y_shape(), p.dtype)?,
                Some(Indices::Host(idx)),
            ))
        }
        PoolKind::Avg => Ok((
            host_out(reference::try_avg_pool2d(p, &x)?, &p.y_shape(), p.dtype)?,
            None,
        )),
    }
}

fn check_indices_len(p: &Pool2dProblem, len: usize) -> Result<()> {
    let want = checked_elements("the output y", &p.y_shape())?;
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

/// The CPU reference backward on a validated problem (dy checked against it): dx from
/// dy and, for max pooling, the forward's indices (checked here: length and range).
pub(crate) fn backward_host(
    p: &Pool2dProblem,
    dy: &HostTensor,
    indices: Option<&[i32]>,
) -> Result<HostTensor> {
    let dx = match (p.kind, indices) {
        (PoolKind::Max, Some(indices)) => {
            check_indices_len(p, indices.len())?;
            reference::try_max_pool2d_backward(p, &f64_data(dy)?, indices)?
        }
        (PoolKind::Avg, None) => reference::try_avg_pool2d_backward(p, &f64_data(dy)?)?,
        (PoolKind::Max, None) => {
            return Err(Error::InvalidArgument(
                "indices: max pooling backward needs the forward's indices".into(),
            ))
        }
        (PoolKind::Avg, Some(_)) => {
            return Err(Error::InvalidArgument(
                "indices: average pooling takes no indices".into(),
            ))
        }
    };
    host_out(dx, &p.x_shape(), p.dtype)
}

#[cfg(any(feature = "cuda", feature = "emulator"))]
pub mod cuda;
pub mod reference;
