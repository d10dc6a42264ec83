//! flashkernels: hand-written CUDA kernels for deep-learning building blocks, each with
//! a CPU reference implementation behind the same Rust signature.
//!
//! Data flow: caller -> validation (typed [`Error`]s) -> plan (host-side sizes) -> C
//! launcher (kernels/) on the caller's stream. See docs/ARCHITECTURE.md.

pub mod attention;
pub mod conv;
mod error;
pub mod longformer;
pub mod reference;
pub mod tensor;

#[cfg(feature = "cuda")]
pub mod device;
#[cfg(feature = "cuda")]
mod ffi;

#[cfg(feature = "python")]
mod python;

pub use attention::{AttentionOptions, AttentionOutput};
pub use conv::{Activation, Conv2dOptions, ConvAlgo, Pool2dOptions};
pub use error::{Error, Result};
pub use tensor::{DType, Element, HostData, HostTensor, Layout};

#[cfg(feature = "cuda")]
pub use device::{Device, DeviceTensor, DeviceView, Stream};

/// True when this build has CUDA support and a driver with at least one GPU is present.
pub fn cuda_available() -> bool {
    #[cfg(feature = "cuda")]
    {
        device::cuda_available()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

/// A tensor on the host or on a CUDA device: ops take these and dispatch on where the
/// data lives.
#[derive(Debug)]
pub enum Tensor {
    Host(HostTensor),
    #[cfg(feature = "cuda")]
    Cuda(DeviceTensor),
}

impl Tensor {
    /// "cpu" or "cuda:N".
    pub fn device_name(&self) -> String {
        match self {
            Tensor::Host(_) => "cpu".into(),
            #[cfg(feature = "cuda")]
            Tensor::Cuda(t) => format!("cuda:{}", t.stream().ordinal()),
        }
    }

    /// A host copy (waits for the device when the tensor lives there).
    pub fn to_host(&self) -> Result<HostTensor> {
        match self {
            Tensor::Host(t) => Ok(t.clone()),
            #[cfg(feature = "cuda")]
            Tensor::Cuda(t) => t.to_host(),
        }
    }
}
