//! The emulated backend of the device module (feature `emulator`): the CPU emulator of
//! tests/emulator as a CUDA device, so the ops' whole CUDA path — validation, plans,
//! parameter structs, uploads and launches — runs the real kernel sources without a GPU.
//!
//! - One device, `cuda:0`, named [`EMULATOR_NAME`], compute capability 8.0 (the
//!   emulator emulates the sm80 instructions: mma.sync, ldmatrix, cp.async, shuffles).
//! - Device memory is host memory: every buffer is its own allocation of the emulator
//!   (`emu::DeviceArray`, through tests/emulator/device/runtime.cpp) that ends where its
//!   data ends — at a PROT_NONE page, so a kernel reading past a tensor faults, with a
//!   canary in the (< 16 byte) rounding that reports a write past it when it is freed — and
//!   that starts out as 0xFF bytes (NaN in every float dtype, -1 in int32), like the garbage
//!   cudaMalloc returns: never zeros.
//! - Every operation — copy, memset, kernel launch — completes before it returns (a launch
//!   runs its whole grid on the calling thread), so each stream runs in order and
//!   `wait_for` / `synchronize` have nothing to wait for. Launches from several threads are
//!   serialized inside the emulator (tests/emulator/device/launch.cuh).

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, Result};

extern "C" {
    fn fk_emu_alloc(bytes: usize, ptr: *mut *mut c_void) -> *mut c_void;
    fn fk_emu_free(handle: *mut c_void);
    fn fk_emu_launch_count() -> i64;
}

/// What [`Device::name`] says under the emulator.
pub const EMULATOR_NAME: &str = "flashkernels CPU emulator";
/// Devices the emulator provides.
const DEVICE_COUNT: usize = 1;
/// The architecture whose instructions the emulator implements.
const COMPUTE_CAPABILITY: (i32, i32) = (8, 0);

/// Kernels the emulator has run in this process (all threads): lets a test see that an
/// op really went through the kernels.
pub fn emulated_launches() -> u64 {
    // SAFETY: reads a counter under the emulator's lock.
    unsafe { fk_emu_launch_count() as u64 }
}

/// Always true: the emulator needs no driver.
pub fn driver_present() -> bool {
    true
}

/// The emulator's one device.
pub fn device_count() -> Result<usize> {
    Ok(DEVICE_COUNT)
}

/// Always true: the emulated device is always there.
pub fn cuda_available() -> bool {
    true
}

/// The emulated device.
#[derive(Clone)]
pub struct Device {
    ordinal: usize,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Device(cuda:{}, emulated)", self.ordinal)
    }
}

/// Handles of the streams `new_stream` makes (never dereferenced; the default stream is
/// null, as in CUDA).
static NEXT_STREAM: AtomicUsize = AtomicUsize::new(1);

impl Device {
    /// Opens device `ordinal` (only 0 exists).
    pub fn new(ordinal: usize) -> Result<Self> {
        if ordinal >= DEVICE_COUNT {
            return Err(Error::NoDevice(format!(
                "device {ordinal} requested, {DEVICE_COUNT} CUDA device(s) present ({EMULATOR_NAME})"
            )));
        }
        Ok(Device { ordinal })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub fn name(&self) -> Result<String> {
        Ok(EMULATOR_NAME.into())
    }

    /// (major, minor) compute capability.
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        Ok(COMPUTE_CAPABILITY)
    }

    /// The device's default stream.
    pub fn default_stream(&self) -> Stream {
        Stream {
            ordinal: self.ordinal,
            handle: 0,
        }
    }

    /// A new stream.
    pub fn new_stream(&self) -> Result<Stream> {
        Ok(Stream {
            ordinal: self.ordinal,
            handle: NEXT_STREAM.fetch_add(1, Ordering::Relaxed) * 16,
        })
    }

    /// Wraps a stream handle created by someone else.
    ///
    /// # Safety
    /// None needed by the emulator (the handle is never used); kept `unsafe` as the CUDA
    /// backend's is.
    pub unsafe fn borrow_stream(&self, raw: *mut c_void) -> Stream {
        Stream {
            ordinal: self.ordinal,
            handle: raw as usize,
        }
    }
}

/// An emulated stream: work on it completes before the call that queues it returns.
#[derive(Clone)]
pub struct Stream {
    ordinal: usize,
    handle: usize,
}

impl Stream {
    pub fn device(&self) -> Device {
        Device {
            ordinal: self.ordinal,
        }
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The handle kernel launchers get (the emulator ignores it).
    pub fn raw(&self) -> *mut c_void {
        self.handle as *mut c_void
    }

    /// Nothing to order: what was queued on `other` has already run.
    pub fn wait_for(&self, _other: &Stream) -> Result<()> {
        Ok(())
    }

    /// Nothing to wait for: what was queued has already run.
    pub fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

/// An emulated device allocation (see the module's documentation), freed when dropped.
pub(crate) struct DeviceBuffer {
    handle: NonNull<c_void>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer owns its allocation; nothing in it is tied to a thread.
unsafe impl Send for DeviceBuffer {}
// SAFETY: shared access only reads the pointer and length.
unsafe impl Sync for DeviceBuffer {}

impl DeviceBuffer {
    /// `bytes` bytes of poison (0xFF).
    ///
    /// # Safety
    /// None needed here (the contents are defined); kept `unsafe` as the CUDA backend's is.
    pub(crate) unsafe fn alloc(_stream: &Stream, bytes: usize) -> Result<Self> {
        let mut ptr = std::ptr::null_mut();
        // SAFETY: fk_emu_alloc writes the data pointer and returns the handle (or null).
        let handle = unsafe { fk_emu_alloc(bytes, &mut ptr) };
        match NonNull::new(handle) {
            Some(handle) => Ok(DeviceBuffer {
                handle,
                ptr: ptr as *mut u8,
                len: bytes,
            }),
            None => Err(Error::Cuda(format!(
                "out of memory: the emulator could not allocate {bytes} bytes"
            ))),
        }
    }

    /// A device copy of `bytes`.
    pub(crate) fn upload(stream: &Stream, bytes: &[u8]) -> Result<Self> {
        // SAFETY: every byte is written right below.
        let buf = unsafe { Self::alloc(stream, bytes.len())? };
        // SAFETY: the allocation holds exactly `bytes.len()` bytes and overlaps nothing.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.ptr, bytes.len()) };
        Ok(buf)
    }

    /// The device (here: host) address.
    pub(crate) fn ptr(&self) -> u64 {
        self.ptr as u64
    }

    /// A host copy.
    pub(crate) fn download(&self) -> Result<Vec<u8>> {
        // SAFETY: the allocation holds `len` initialised bytes while `self` lives.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr, self.len) }.to_vec())
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: the handle came from fk_emu_alloc and is freed once.
        unsafe { fk_emu_free(self.handle.as_ptr()) };
    }
}

/// Sets `bytes` bytes at device address `ptr` to `byte` (at once: streams are in order).
///
/// # Safety
/// `ptr .. ptr + bytes` must be live emulated device memory.
pub(crate) unsafe fn memset_async(
    _stream: &Stream,
    ptr: u64,
    byte: u8,
    bytes: usize,
) -> Result<()> {
    // SAFETY: as the caller vouches.
    unsafe { std::ptr::write_bytes(ptr as *mut u8, byte, bytes) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceTensor;
    use crate::tensor::{DType, HostTensor};

    #[test]
    fn one_device_named_as_the_emulator() {
        let d = Device::new(0).unwrap();
        assert_eq!(d.name().unwrap(), EMULATOR_NAME);
        assert_eq!(d.compute_capability().unwrap(), COMPUTE_CAPABILITY);
        assert!(matches!(Device::new(1), Err(Error::NoDevice(_))));
        assert!(crate::cuda_available());
    }

    /// Fresh memory is poison, not zeros; uploads and downloads round-trip exactly.
    #[test]
    fn memory_is_poisoned_and_round_trips() {
        let s = Device::new(0).unwrap().new_stream().unwrap();
        for bytes in [0, 1, 15, 16, 100, 256, 4096] {
            // SAFETY: read only after the poison fill, which `alloc` does.
            let b = unsafe { DeviceBuffer::alloc(&s, bytes).unwrap() };
            assert_eq!(b.download().unwrap(), vec![0xFF; bytes]);
            let align = if bytes % 256 == 0 { 256 } else { 16 };
            assert_eq!(b.ptr() % align, 0, "{bytes} bytes");
        }
        let h = HostTensor::from_fn(DType::BF16, &[3, 5], |i| i as f32).unwrap();
        let t = DeviceTensor::from_host(&s, &h).unwrap();
        assert_eq!(t.to_host().unwrap().to_f32_vec(), h.to_f32_vec());
        let p = DeviceTensor::poisoned(&s, DType::F32, &[7]).unwrap();
        assert!(p.to_host().unwrap().to_f32_vec().iter().all(|x| x.is_nan()));
    }

    /// An op on device tensors really runs the kernels on the emulator.
    #[test]
    fn ops_launch_emulated_kernels() {
        let s = Device::new(0).unwrap().default_stream();
        let h =
            HostTensor::from_fn(DType::F16, &[1, 20, 2, 64], |i| (i as f32 * 0.1).sin()).unwrap();
        let up = || DeviceTensor::from_host(&s, &h).unwrap();
        let before = emulated_launches();
        let o = crate::attention::cuda::forward(&up(), &up(), &up(), &Default::default()).unwrap();
        assert!(emulated_launches() > before);
        let out = o.out.to_host().unwrap().to_f32_vec();
        assert!(out.iter().all(|x| x.is_finite()));
    }
}
