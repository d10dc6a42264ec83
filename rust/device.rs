//! Devices, streams and device tensors: one API over two backends.
//!
//! - feature `cuda` (`device/cuda.rs`): CUDA through `cudarc`.
//!   cudarc loads libcuda dynamically and panics when it is missing, so every entry point
//!   checks for the driver first and reports its absence as [`Error::NoDriver`].
//! - feature `emulator` (`device/emulated.rs`): the CPU emulator of tests/emulator as the
//!   device. The kernels of kernels/ are compiled as host C++ against it (build.rs), device
//!   memory is host memory (one guarded, exactly-sized, poisoned allocation per buffer),
//!   and every operation completes before it returns, so streams run in order. The ops'
//!   CUDA paths (validation, plans, parameter structs, launches) are the same code.
//!
//! Everything the ops need of the device goes through this module: [`DeviceTensor`], and
//! for their scratch memory (offsets, work lists, workspaces) `DeviceBuffer` and
//! `memset_async`.

use crate::error::{Error, Result};
use crate::tensor::{DType, HostData, HostTensor, Layout};

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
use cuda as backend;

#[cfg(feature = "emulator")]
mod emulated;
#[cfg(feature = "emulator")]
use emulated as backend;
#[cfg(feature = "emulator")]
pub use emulated::{emulated_launches, EMULATOR_NAME};

pub use backend::{cuda_available, device_count, driver_present, Device, Stream};
pub(crate) use backend::{memset_async, DeviceBuffer};

/// A tensor in device memory that flashkernels allocated (and frees on drop).
pub struct DeviceTensor {
    buf: DeviceBuffer,
    dtype: DType,
    layout: Layout,
    stream: Stream,
}

impl std::fmt::Debug for DeviceTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceTensor")
            .field("dtype", &self.dtype)
            .field("shape", &self.layout.shape)
            .field("strides", &self.layout.strides)
            .field("device", &self.stream.ordinal())
            .finish()
    }
}

/// Byte pattern that makes every f32, f16 and bf16 element NaN: outputs are filled with
/// it before a launch so that an element the kernel forgot to write cannot pass a test.
pub const POISON_BYTE: u8 = 0xFF;

impl DeviceTensor {
    /// Copies a host tensor (its storage and strides as they are) to the device.
    pub fn from_host(stream: &Stream, host: &HostTensor) -> Result<Self> {
        let bytes = host.data().as_bytes();
        if bytes.is_empty() {
            return Err(Error::Empty {
                name: "tensor",
                shape: host.shape().to_vec(),
            });
        }
        Ok(DeviceTensor {
            buf: DeviceBuffer::upload(stream, bytes)?,
            dtype: host.dtype(),
            layout: host.layout().clone(),
            stream: stream.clone(),
        })
    }

    /// A contiguous tensor with every byte set to `POISON_BYTE` (NaN in every dtype).
    pub fn poisoned(stream: &Stream, dtype: DType, shape: &[usize]) -> Result<Self> {
        Self::filled(stream, dtype, shape, POISON_BYTE)
    }

    /// A contiguous tensor of zeros.
    pub fn zeros(stream: &Stream, dtype: DType, shape: &[usize]) -> Result<Self> {
        Self::filled(stream, dtype, shape, 0)
    }

    fn filled(stream: &Stream, dtype: DType, shape: &[usize], byte: u8) -> Result<Self> {
        let layout = Layout::contiguous(shape);
        let bytes = layout.numel() * dtype.size();
        if bytes == 0 {
            return Err(Error::Empty {
                name: "tensor",
                shape: shape.to_vec(),
            });
        }
        // SAFETY: the buffer is filled by the memset queued right after, on the same stream.
        let buf = unsafe { DeviceBuffer::alloc(stream, bytes)? };
        // SAFETY: `buf.ptr()` points at `bytes` bytes of this allocation.
        unsafe { memset_async(stream, buf.ptr(), byte, bytes)? };
        Ok(DeviceTensor {
            buf,
            dtype,
            layout,
            stream: stream.clone(),
        })
    }

    /// Copies back to the host (waits for the stream).
    pub fn to_host(&self) -> Result<HostTensor> {
        let bytes = self.buf.download()?;
        HostTensor::from_data(
            HostData::from_bytes(self.dtype, &bytes)?,
            self.layout.clone(),
        )
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.layout.shape
    }

    pub fn strides(&self) -> &[usize] {
        &self.layout.strides
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// (dtype, layout): what a validator reads of a tensor.
    pub fn described(&self) -> (DType, &Layout) {
        (self.dtype, &self.layout)
    }

    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// A borrowed view for launchers.
    pub fn view(&self) -> DeviceView {
        DeviceView {
            ptr: self.buf.ptr(),
            dtype: self.dtype,
            layout: self.layout.clone(),
            device: self.stream.ordinal(),
        }
    }
}

/// Device memory described by a raw pointer: what launchers consume, and what the Python
/// layer builds from DLPack tensors it does not own.
#[derive(Debug, Clone)]
pub struct DeviceView {
    pub ptr: u64,
    pub dtype: DType,
    pub layout: Layout,
    pub device: usize,
}

impl DeviceView {
    /// (dtype, layout): what a validator reads of a tensor.
    pub fn described(&self) -> (DType, &Layout) {
        (self.dtype, &self.layout)
    }
}

/// Plain values that go to the device as their bytes.
pub(crate) trait Plain: Copy {
    fn to_ne_bytes_vec(v: &[Self]) -> Vec<u8>;
    fn from_ne_bytes_vec(b: &[u8]) -> Vec<Self>;
}

impl Plain for i32 {
    fn to_ne_bytes_vec(v: &[Self]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_ne_bytes()).collect()
    }
    fn from_ne_bytes_vec(b: &[u8]) -> Vec<Self> {
        b.chunks_exact(4)
            .map(|c| i32::from_ne_bytes(c.try_into().unwrap()))
            .collect()
    }
}

impl DeviceBuffer {
    /// A device copy of `values` (freed in stream order when dropped).
    pub(crate) fn upload_values<T: Plain>(stream: &Stream, values: &[T]) -> Result<Self> {
        Self::upload(stream, &T::to_ne_bytes_vec(values))
    }

    /// Room for `n` elements of `T` whose contents are undefined until a kernel writes them.
    ///
    /// # Safety
    /// Nothing may read an element before it is written.
    pub(crate) unsafe fn alloc_elems<T>(stream: &Stream, n: usize) -> Result<Self> {
        // SAFETY: as the caller vouches.
        unsafe { Self::alloc(stream, n * std::mem::size_of::<T>()) }
    }

    /// The contents as `T`s (waits for the stream).
    pub(crate) fn download_values<T: Plain>(&self) -> Result<Vec<T>> {
        Ok(T::from_ne_bytes_vec(&self.download()?))
    }
}
