//! The CUDA backend of the device module (feature `cuda`), over `cudarc`.
//!
//! cudarc loads libcuda dynamically and panics when it is missing, so every entry point
//! here checks for the driver first and reports its absence as [`Error::NoDriver`].

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{self, CudaContext, CudaSlice, CudaStream, DevicePtr, DriverError};

use crate::error::{Error, Result};

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

/// Device memory owned by flashkernels, allocated on a stream and freed in its order when
/// dropped.
pub(crate) struct DeviceBuffer {
    buf: CudaSlice<u8>,
    stream: Arc<CudaStream>,
}

impl DeviceBuffer {
    /// `bytes` bytes whose contents are undefined.
    ///
    /// # Safety
    /// Nothing may read a byte before it is written.
    pub(crate) unsafe fn alloc(stream: &Stream, bytes: usize) -> Result<Self> {
        let s = stream.cuda();
        Ok(DeviceBuffer {
            // SAFETY: as the caller vouches.
            buf: unsafe { s.alloc::<u8>(bytes)? },
            stream: s.clone(),
        })
    }

    /// A device copy of `bytes`, queued on `stream`.
    pub(crate) fn upload(stream: &Stream, bytes: &[u8]) -> Result<Self> {
        let s = stream.cuda();
        Ok(DeviceBuffer {
            buf: s.clone_htod(bytes)?,
            stream: s.clone(),
        })
    }

    /// The device address.
    pub(crate) fn ptr(&self) -> u64 {
        let (ptr, _sync) = self.buf.device_ptr(&self.stream);
        ptr
    }

    /// A host copy (waits for the buffer's stream).
    pub(crate) fn download(&self) -> Result<Vec<u8>> {
        Ok(self.stream.clone_dtoh(&self.buf)?)
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
