//! 2-D max / average pooling (forward and backward): validate -> plan -> launch (or the
//! CPU reference, behind the same signature). Semantics are torch's `max_pool2d`
//! (indices h * W + w within a plane, first maximum on ties, padding never wins) and
//! `avg_pool2d` (`count_include_pad`, `divisor_override`). Layouts as conv's: x is
//! logical (N, C, H, W) with any strides; outputs are contiguous NCHW in x's dtype
//! (max-pool indices: contiguous i32). The CPU path computes in f64.

use crate::error::{Error, Result};
use crate::ops::common::{check_layout, f64_data, host_out, mixed_devices};
use crate::ops::conv::{check_positive, output_size, X_LAYOUT};
use crate::tensor::{DType, HostTensor, Layout};
use crate::Tensor;

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
pub mod cuda;
pub mod reference;
