//! CUDA devices, streams and device tensors over `cudarc`.
//!
//! cudarc loads libcuda dynamically and panics when it is missing, so every entry point
//! here checks for the driver first and reports its absence as [`Error::NoDriver`].

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{self, CudaContext, CudaSlice, CudaStream, DevicePtr, DriverError};

use crate::error::{Error, Result};
use crate::tensor::{DType, HostData, HostTensor, Layout};

impl From<DriverError> for Error {
    fn from(e: DriverError) -> Self {
        Error::Cuda(format!("{e:?}"))
    }
}

/// True when libcuda can be loaded (an NVIDIA driver is installed).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen libcuda; never panics.
    unsafe { driver::sys::is_culib_present() }
}

/// Number of CUDA devices; an error when there is no driver.
pub fn device_count() -> Result<usize> {
    if !driver_present() {
        return Err(Error::NoDriver(
            "libcuda.so could not be loaded; install the NVIDIA driver".into(),
        ));
    }
    match CudaContext::device_count() {
        Ok(n) => Ok(n.max(0) as usize),
        // CUDA_ERROR_NO_DEVICE from cuInit: a driver without a GPU.
        Err(e) => Err(Error::NoDevice(format!("{e:?}"))),
    }
}

/// True when a driver and at least one GPU are present.
pub fn cuda_available() -> bool {
    device_count().is_ok_and(|n| n > 0)
}

/// A CUDA device: its primary context.
#[derive(Clone)]
pub struct Device {
    ctx: Arc<CudaContext>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Device(cuda:{})", self.ordinal())
    }
}

impl Device {
    /// Opens device `ordinal`, or says why there is none.
    pub fn new(ordinal: usize) -> Result<Self> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(Error::NoDevice(format!(
                "device {ordinal} requested, {count} CUDA device(s) present"
            )));
        }
        Ok(Device {
            ctx: CudaContext::new(ordinal)?,
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    pub fn name(&self) -> Result<String> {
        Ok(self.ctx.name()?)
    }

    /// (major, minor) compute capability.
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        Ok(self.ctx.compute_capability()?)
    }

    /// The device's default stream.
    pub fn default_stream(&self) -> Stream {
        Stream {
            inner: self.ctx.default_stream(),
        }
    }

    /// A new non-blocking stream owned by flashkernels.
    pub fn new_stream(&self) -> Result<Stream> {
        Ok(Stream {
            inner: self.ctx.new_stream()?,
        })
    }

    /// Wraps a stream created by someone else (torch, cupy) without taking ownership.
    ///
    /// # Safety
    /// `raw` must be a live CUstream of this device's primary context, and must outlive
    /// the returned value.
    pub unsafe fn borrow_stream(&self, raw: *mut c_void) -> Stream {
        Stream {
            inner: self.ctx.wrap_borrowed_stream(raw as driver::sys::CUstream),
        }
    }
}

/// A CUDA stream. Work is queued on it and never synchronized implicitly.
#[derive(Clone)]
pub struct Stream {
    inner: Arc<CudaStream>,
}

impl Stream {
    pub fn device(&self) -> Device {
        Device {
            ctx: self.inner.context().clone(),
        }
    }

    pub fn ordinal(&self) -> usize {
        self.inner.context().ordinal()
    }

    /// The CUstream handle, for kernel launchers.
    pub fn raw(&self) -> *mut c_void {
        self.inner.cu_stream() as *mut c_void
    }

    /// Makes work queued on `self` from now on wait for what is queued on `other` so far
    /// (an event, no host synchronization). A no-op when both are the same stream.
    pub fn wait_for(&self, other: &Stream) -> Result<()> {
        if self.raw() != other.raw() {
            self.inner.join(&other.inner)?;
        }
        Ok(())
    }

    /// Blocks until all work queued so far has finished.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.inner.synchronize()?)
    }

    pub(crate) fn cuda(&self) -> &Arc<CudaStream> {
        &self.inner
    }
}

/// A tensor in device memory that flashkernels allocated (and frees on drop).
pub struct DeviceTensor {
    buf: CudaSlice<u8>,
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
        let buf = stream.cuda().clone_htod(bytes)?;
        Ok(DeviceTensor {
            buf,
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
        let s = stream.cuda();
        // SAFETY: the buffer is filled by the memset queued right after, on the same stream.
        let mut buf = unsafe { s.alloc::<u8>(bytes)? };
        {
            let (ptr, _sync) = driver::DevicePtrMut::device_ptr_mut(&mut buf, s);
            // SAFETY: ptr points at `bytes` bytes of this allocation.
            unsafe { driver::result::memset_d8_async(ptr, byte, bytes, s.cu_stream())? };
        }
        Ok(DeviceTensor {
            buf,
            dtype,
            layout,
            stream: stream.clone(),
        })
    }

    /// Copies back to the host (waits for the stream).
    pub fn to_host(&self) -> Result<HostTensor> {
        let bytes = self.stream.cuda().clone_dtoh(&self.buf)?;
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

    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// A borrowed view for launchers.
    pub fn view(&self) -> DeviceView {
        let (ptr, _sync) = self.buf.device_ptr(self.stream.cuda());
        DeviceView {
            ptr,
            dtype: self.dtype,
            layout: self.layout.clone(),
            device: self.stream.ordinal(),
        }
    }
}

/// Sets `bytes` bytes at device address `ptr` to `byte`, in `stream`'s order.
///
/// # Safety
/// `ptr .. ptr + bytes` must be live device memory of `stream`'s device.
pub(crate) unsafe fn memset_async(stream: &Stream, ptr: u64, byte: u8, bytes: usize) -> Result<()> {
    // SAFETY: as the caller vouches.
    unsafe { driver::result::memset_d8_async(ptr, byte, bytes, stream.cuda().cu_stream())? };
    Ok(())
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
