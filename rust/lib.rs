//! flashkernels: hand-written CUDA kernels for deep-learning building blocks, each with
//! a CPU reference implementation behind the same Rust signature.
//!
//! Data flow: caller -> validation (typed [`Error`]s) -> plan (host-side sizes) -> C
//! launcher (kernels/) on the caller's stream. See docs/ARCHITECTURE.md.

mod error;
pub mod ops;
pub mod reference;
pub mod tensor;

pub use ops::reformer;
pub use ops::{attention, conv, ffn, linformer, longformer, pool};

#[cfg(all(feature = "cuda", feature = "emulator"))]
compile_error!(
    "the `cuda` and `emulator` features exclude each other: \
     `--no-default-features --features emulator`"
);

#[cfg(all(feature = "emulator", feature = "python"))]
compile_error!(
    "the Python module's device path is CUDA's (DLPack from real GPUs): build it with `cuda`, \
     not `emulator`"
);

#[cfg(any(feature = "cuda", feature = "emulator"))]
pub mod device;
#[cfg(any(feature = "cuda", feature = "emulator"))]
mod ffi;

#[cfg(feature = "python")]
mod python;

pub use attention::{AttentionOptions, AttentionOutput};
pub use conv::{Activation, Conv2dOptions, ConvAlgo};
pub use error::{Error, Result};
pub use pool::Pool2dOptions;
pub use tensor::{DType, Element, HostData, HostTensor, Layout};

#[cfg(any(feature = "cuda", feature = "emulator"))]
pub use device::{Device, DeviceTensor, DeviceView, Stream};

/// True when this build has CUDA support and a driver with at least one GPU is present
/// (always true in the `emulator` build, whose device is the CPU emulator).
pub fn cuda_available() -> bool {
    #[cfg(any(feature = "cuda", feature = "emulator"))]
    {
        device::cuda_available()
    }
    #[cfg(not(any(feature = "cuda", feature = "emulator")))]
    {
        false
    }
}

/// A tensor on the host or on a CUDA device: ops take these and dispatch on where the
/// data lives.
#[derive(Debug)]
pub enum Tensor {
    Host(HostTensor),
    #[cfg(any(feature = "cuda", feature = "emulator"))]
    Cuda(DeviceTensor),
}

impl Tensor {
    /// "cpu" or "cuda:N".
    pub fn device_name(&self) -> String {
        match self {
            Tensor::Host(_) => "cpu".into(),
            #[cfg(any(feature = "cuda", feature = "emulator"))]
            Tensor::Cuda(t) => format!("cuda:{}", t.stream().ordinal()),
        }
    }

    /// A host copy (waits for the device when the tensor lives there).
    pub fn to_host(&self) -> Result<HostTensor> {
        match self {
            Tensor::Host(t) => Ok(t.clone()),
            #[cfg(any(feature = "cuda", feature = "emulator"))]
            Tensor::Cuda(t) => t.to_host(),
        }
    }
}

/// A borrowed tensor on the host or on a device: what every op's entry dispatches on.
#[derive(Debug, Clone, Copy)]
pub enum TensorRef<'a> {
    Host(&'a HostTensor),
    #[cfg(any(feature = "cuda", feature = "emulator"))]
    Cuda(&'a DeviceTensor),
}

impl TensorRef<'_> {
    /// "cpu" or "cuda:N".
    pub fn device_name(&self) -> String {
        match self {
            TensorRef::Host(_) => "cpu".into(),
            #[cfg(any(feature = "cuda", feature = "emulator"))]
            TensorRef::Cuda(t) => format!("cuda:{}", t.stream().ordinal()),
        }
    }
}

/// What an op's entry takes and returns: [`HostTensor`]s (the CPU reference runs, and
/// the outputs are host tensors) or [`Tensor`]s (host or device; the outputs live where
/// the inputs do). Every op has one entry per direction, generic over this trait:
/// `attention::forward(&attention::Inputs::new(&q, &k, &v), &opts)` works for both.
pub trait OpTensor: Sized + private::Sealed {
    /// The tensor as an op reads it.
    fn tensor_ref(&self) -> TensorRef<'_>;
    /// An op's output, computed where the inputs live, as `Self`.
    fn from_output(t: Tensor) -> Result<Self>;
}

mod private {
    pub trait Sealed {}
    impl Sealed for crate::HostTensor {}
    impl Sealed for crate::Tensor {}
}

impl OpTensor for HostTensor {
    fn tensor_ref(&self) -> TensorRef<'_> {
        TensorRef::Host(self)
    }

    fn from_output(t: Tensor) -> Result<Self> {
        match t {
            Tensor::Host(h) => Ok(h),
            #[cfg(any(feature = "cuda", feature = "emulator"))]
            Tensor::Cuda(_) => Err(Error::DeviceMismatch {
                detail: "an op on host tensors produced a device tensor".into(),
            }),
        }
    }
}

impl OpTensor for Tensor {
    fn tensor_ref(&self) -> TensorRef<'_> {
        match self {
            Tensor::Host(h) => TensorRef::Host(h),
            #[cfg(any(feature = "cuda", feature = "emulator"))]
            Tensor::Cuda(d) => TensorRef::Cuda(d),
        }
    }

    fn from_output(t: Tensor) -> Result<Self> {
        Ok(t)
    }
}
