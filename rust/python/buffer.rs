//! Device memory owned by flashkernels, exported through DLPack (CUDA builds).

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use pyo3::ffi;
use pyo3::prelude::*;

use pyo3::exceptions::PyBufferError;

use super::dlpack::{
    DLDataType, DLDevice, DLManagedTensor, DLTensor, DLTENSOR, KDL_BFLOAT, KDL_CUDA, KDL_FLOAT,
};
use super::{guarded, to_py_err};
use crate::device::{Device, DeviceTensor};
use crate::error::Error;
use crate::tensor::DType;

/// One `Device` per ordinal for the process: retaining the primary context once
/// avoids churn (and never releases it while buffers may still live).
static DEVICES: Mutex<Vec<Option<Device>>> = Mutex::new(Vec::new());

fn device(ordinal: usize) -> Result<Device, Error> {
    super::check_cuda_device(ordinal)?;
    let mut devices = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
    if devices.len() <= ordinal {
        devices.resize(ordinal + 1, None);
    }
    if devices[ordinal].is_none() {
        devices[ordinal] = Some(Device::new(ordinal)?);
    }
    Ok(devices[ordinal].clone().expect("set above"))
}

fn parse_dtype(name: &str) -> PyResult<DType> {
    match name {
        "float32" => Ok(DType::F32),
        "float16" => Ok(DType::F16),
        "bfloat16" => Ok(DType::BF16),
        other => Err(pyo3::exceptions::PyTypeError::new_err(format!(
            "dtype {other:?} is not supported (float32, float16 or bfloat16)"
        ))),
    }
}

/// A contiguous CUDA buffer allocated by flashkernels on the device's legacy default
/// stream and exported through DLPack (`__dlpack__`, `__dlpack_device__`); freed when
/// the last consumer lets go of it. Filled with NaN until written.
#[pyclass(module = "flashkernels._native", frozen)]
pub struct DeviceBuffer {
    inner: Arc<Owned>,
}

struct Owned {
    tensor: DeviceTensor,
    /// Objects whose memory the kernel that writes this buffer reads (jax inputs): the
    /// kernel runs asynchronously, and once their DLPack capsules are handed back only
    /// these references stop jax from reusing that memory. Anyone who waits for this
    /// buffer (jax's consumer stream does) waits for the kernel; a buffer dropped
    /// unread is freed stream-ordered after it, and its contents do not matter.
    _keep_alive: Vec<Py<PyAny>>,
}

/// What an exported capsule owns; `managed` first so the two pointers coincide.
#[repr(C)]
struct ExportCtx {
    managed: DLManagedTensor,
    shape: Vec<i64>,
    strides: Vec<i64>,
    _owner: Arc<Owned>,
}

unsafe extern "C" fn export_deleter(m: *mut DLManagedTensor) {
    // SAFETY: manager_ctx is the Box<ExportCtx> leaked in __dlpack__. Dropping frees
    // the buffer (stream-ordered) when it is the last reference; no Python involved, so
    // any thread may call this.
    let _ = catch_unwind(AssertUnwindSafe(|| unsafe {
        drop(Box::from_raw((*m).manager_ctx.cast::<ExportCtx>()))
    }));
}

/// Capsule destructor: a consumer that took the tensor renamed the capsule and owns
/// it now; only an unconsumed capsule still has to run the deleter.
unsafe extern "C" fn capsule_destructor(cap: *mut ffi::PyObject) {
    unsafe {
        if ffi::PyCapsule_IsValid(cap, DLTENSOR.as_ptr()) == 1 {
            let m = ffi::PyCapsule_GetPointer(cap, DLTENSOR.as_ptr()).cast::<DLManagedTensor>();
            if let Some(d) = (*m).deleter {
                d(m)
            }
        }
    }
}

#[pymethods]
impl DeviceBuffer {
    #[new]
    #[pyo3(signature = (device_id, shape, dtype, keep_alive=Vec::new()))]
    fn new(
        device_id: usize,
        shape: Vec<usize>,
        dtype: &str,
        keep_alive: Vec<Py<PyAny>>,
    ) -> PyResult<Self> {
        guarded(|| {
            let dtype = parse_dtype(dtype)?;
            let dev = device(device_id).map_err(to_py_err)?;
            let tensor =
                DeviceTensor::poisoned(&dev.default_stream(), dtype, &shape).map_err(to_py_err)?;
            Ok(DeviceBuffer {
                inner: Arc::new(Owned {
                    tensor,
                    _keep_alive: keep_alive,
                }),
            })
        })
    }

    #[getter]
    fn shape(&self) -> Vec<usize> {
        self.inner.tensor.shape().to_vec()
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        self.inner.tensor.dtype().name()
    }

    fn __dlpack_device__(&self) -> (i32, i32) {
        (KDL_CUDA, self.inner.tensor.stream().ordinal() as i32)
    }

    /// Exports a classic "dltensor" capsule. `stream` is the consumer's stream:
    /// it is made to wait (with an event, not the host) for the work queued on the
    /// legacy default stream, where flashkernels writes this buffer.
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__(
        &self,
        py: Python<'_>,
        stream: Option<isize>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        // The classic capsule is acceptable to every max_version per the protocol.
        let _ = max_version;
        guarded(|| {
            let ordinal = self.inner.tensor.stream().ordinal();
            if let Some(d) = dl_device {
                if d != (KDL_CUDA, ordinal as i32) {
                    return Err(PyBufferError::new_err(format!(
                        "DeviceBuffer lives on cuda:{ordinal} and cannot be exported to {d:?}"
                    )));
                }
            }
            if copy == Some(true) {
                return Err(PyBufferError::new_err("DeviceBuffer cannot export a copy"));
            }
            // None, 0 and 1 all mean the legacy default stream: already ordered.
            // -1 means "do not synchronize".
            if let Some(s) = stream.filter(|&s| s > 1) {
                let dev = self.inner.tensor.stream().device();
                // SAFETY: the consumer passes a live stream of this device.
                let consumer = unsafe { dev.borrow_stream(s as *mut c_void) };
                consumer
                    .cuda()
                    .join(self.inner.tensor.stream().cuda())
                    .map_err(|e| to_py_err(e.into()))?;
            }
            let view = self.inner.tensor.view();
            let dtype = match view.dtype {
                DType::F32 => DLDataType {
                    code: KDL_FLOAT,
                    bits: 32,
                    lanes: 1,
                },
                DType::F16 => DLDataType {
                    code: KDL_FLOAT,
                    bits: 16,
                    lanes: 1,
                },
                DType::BF16 => DLDataType {
                    code: KDL_BFLOAT,
                    bits: 16,
                    lanes: 1,
                },
            };
            let mut ctx = Box::new(ExportCtx {
                managed: DLManagedTensor {
                    dl_tensor: DLTensor {
                        data: view.ptr as *mut c_void,
                        device: DLDevice {
                            device_type: KDL_CUDA,
                            device_id: ordinal as i32,
                        },
                        ndim: view.layout.shape.len() as i32,
                        dtype,
                        shape: std::ptr::null_mut(),
                        strides: std::ptr::null_mut(),
                        byte_offset: 0,
                    },
                    manager_ctx: std::ptr::null_mut(),
                    deleter: Some(export_deleter),
                },
                shape: view.layout.shape.iter().map(|&n| n as i64).collect(),
                strides: view.layout.strides.iter().map(|&s| s as i64).collect(),
                _owner: self.inner.clone(),
            });
            ctx.managed.dl_tensor.shape = ctx.shape.as_mut_ptr();
            ctx.managed.dl_tensor.strides = ctx.strides.as_mut_ptr();
            let raw = Box::into_raw(ctx);
            // SAFETY: raw is a valid ExportCtx; the manager points back at it.
            unsafe { (*raw).managed.manager_ctx = raw.cast() };
            // SAFETY: a valid pointer, a 'static name and an extern "C" destructor.
            let cap = unsafe {
                ffi::PyCapsule_New(raw.cast(), DLTENSOR.as_ptr(), Some(capsule_destructor))
            };
            if cap.is_null() {
                // SAFETY: the capsule does not exist, so we still own raw.
                unsafe { export_deleter(raw.cast()) };
                return Err(PyErr::fetch(py));
            }
            // SAFETY: PyCapsule_New returned a new reference.
            Ok(unsafe { Py::from_owned_ptr(py, cap) })
        })
    }
}
