//! The one error type of the Rust layer. Every variant names the offending values.

use crate::tensor::DType;

/// Result alias used by every public function.
pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A tensor has the wrong number of dimensions.
    #[error("{name}: expected a rank-{expected} tensor {layout}, got shape {shape:?}")]
    Rank {
        name: &'static str,
        expected: usize,
        layout: &'static str,
        shape: Vec<usize>,
    },
    /// Two tensors disagree on a dimension that must match.
    #[error("shape mismatch: {detail}")]
    ShapeMismatch { detail: String },
    /// Tensors that must share a dtype do not.
    #[error("dtype mismatch: {detail}")]
    DTypeMismatch { detail: String },
    /// A dtype the operation does not support on this path.
    #[error("{name}: dtype {dtype} is not supported here ({supported})")]
    UnsupportedDType {
        name: &'static str,
        dtype: DType,
        supported: &'static str,
    },
    /// The innermost dimension must be contiguous.
    #[error("{name}: the last dimension must have unit stride, got strides {strides:?} for shape {shape:?}")]
    NonUnitStride {
        name: &'static str,
        shape: Vec<usize>,
        strides: Vec<usize>,
    },
    /// A tensor with a zero-sized dimension.
    #[error("{name} is empty (shape {shape:?})")]
    Empty {
        name: &'static str,
        shape: Vec<usize>,
    },
    /// A size or offset that the kernel's 32-bit indexing (or grid limits) cannot hold.
    #[error("{what} = {value} exceeds the limit {limit}")]
    TooLarge {
        what: String,
        value: u64,
        limit: u64,
    },
    /// Tensors on different devices, or on a device other than the stream's.
    #[error("device mismatch: {detail}")]
    DeviceMismatch { detail: String },
    /// A valid request this build or kernel does not implement (e.g. a head dim).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// An argument outside its domain (scale, strides that overrun storage, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// libcuda.so could not be loaded: no NVIDIA driver on this machine.
    #[error("no CUDA driver: {0}")]
    NoDriver(String),
    /// A driver is present but there is no (such) GPU.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// An error reported by the CUDA driver or runtime.
    #[error("CUDA error: {0}")]
    Cuda(String),
    /// A host buffer sized from the input could not be allocated (fallible allocation:
    /// the process keeps running). Python raises MemoryError.
    #[error("out of memory: could not allocate {bytes} bytes for {what}")]
    OutOfMemory { what: String, bytes: u64 },
    /// A long CPU call was stopped by the caller's interrupt check
    /// (see [`crate::ops::with_interrupt_check`]). Python raises KeyboardInterrupt.
    #[error("interrupted")]
    Interrupted,
    /// The crate was built without the `cuda` feature.
    #[error("CUDA support is not compiled in (build with the `cuda` feature)")]
    CudaNotBuilt,
}
