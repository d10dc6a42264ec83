//! The extension module `flashkernels._native` (built with the `python` feature), one
//! file per op plus the DLPack boundary:
//!
//! - `dlpack`: the DLPack mirror and [`dlpack::Imported`], a consumed capsule;
//! - `attention`, `longformer`, `conv`, `pool`: each op's forward / backward entries;
//! - `buffer` (CUDA builds): device memory allocated by flashkernels and exported
//!   through DLPack, the output buffer for callers whose framework has no mutable arrays
//!   (jax).
//!
//! It is deliberately low level: the Python package (python/flashkernels) picks the
//! stream and allocates outputs with the caller's framework; this module consumes DLPack
//! capsules, validates, and runs the CPU reference or the CUDA kernels. Every Rust error
//! becomes a Python exception in one place, [`to_py_err`]; every entry point runs under
//! [`guarded`], so a panic becomes a RuntimeError, never a crash.

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

mod attention;
#[cfg(feature = "cuda")]
mod buffer;
mod conv;
mod dlpack;
mod longformer;
mod pool;

use crate::error::Error;
use dlpack::{device_name, import, DLDevice, Imported, Place};

/// The one mapping from Rust errors to Python exception types.
fn to_py_err(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::Rank { .. }
        | Error::ShapeMismatch { .. }
        | Error::Empty { .. }
        | Error::NonUnitStride { .. }
        | Error::TooLarge { .. }
        | Error::InvalidArgument(_)
        | Error::Unsupported(_)
        | Error::DeviceMismatch { .. } => PyValueError::new_err(msg),
        Error::DTypeMismatch { .. } | Error::UnsupportedDType { .. } => PyTypeError::new_err(msg),
        Error::NoDriver(_) | Error::NoDevice(_) | Error::Cuda(_) | Error::CudaNotBuilt => {
            PyRuntimeError::new_err(msg)
        }
    }
}

/// Runs `f`, turning a panic into a RuntimeError (pyo3 would raise PanicException, a
/// BaseException that `except Exception` does not catch).
fn guarded<T>(f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| Err(panic_err(payload)))
}

fn panic_err(payload: Box<dyn std::any::Any + Send>) -> PyErr {
    let msg = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    PyRuntimeError::new_err(format!("flashkernels internal error: {msg}"))
}

/// True when this build has CUDA support and a driver with a GPU is present.
#[pyfunction]
fn cuda_available() -> PyResult<bool> {
    guarded(|| Ok(crate::cuda_available()))
}

/// Raises RuntimeError unless CUDA device `device` can be used.
#[pyfunction]
fn check_cuda(device: usize) -> PyResult<()> {
    guarded(|| check_cuda_device(device).map_err(to_py_err))
}

fn check_cuda_device(device: usize) -> Result<(), Error> {
    #[cfg(feature = "cuda")]
    {
        let count = crate::device::device_count()?;
        if device >= count {
            return Err(Error::NoDevice(format!(
                "cuda:{device} requested, {count} CUDA device(s) present"
            )));
        }
        Ok(())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        Err(Error::CudaNotBuilt)
    }
}

/// Where all the tensors live: one place, or a DeviceMismatch naming each.
fn common_place(ts: &[&Imported]) -> PyResult<Place> {
    if ts.iter().any(|t| t.device != ts[0].device) {
        let where_: Vec<String> = ts
            .iter()
            .map(|t| format!("{} on {}", t.name, device_name(t.device)))
            .collect();
        return Err(to_py_err(Error::DeviceMismatch {
            detail: format!("{}: all must be on one device", where_.join(", ")),
        }));
    }
    ts[0].place()
}

/// Outputs from `alloc` must be where the inputs are.
fn check_output_devices(outputs: &[&Imported], device: DLDevice) -> PyResult<()> {
    for o in outputs {
        if o.device != device {
            return Err(to_py_err(Error::DeviceMismatch {
                detail: format!(
                    "{} was allocated on {}, the inputs are on {}",
                    o.name,
                    device_name(o.device),
                    device_name(device)
                ),
            }));
        }
    }
    Ok(())
}

/// The caller's stream (its framework's current stream of `ordinal`, or 0), asked for
/// by a launch once its checks have passed.
#[cfg(feature = "cuda")]
fn caller_stream(
    ordinal: usize,
    stream: usize,
) -> impl FnOnce() -> Result<crate::device::Stream, Error> {
    // SAFETY: the Python package passes its framework's current stream of this device (or
    // 0, the legacy default stream), and exported the inputs for that stream.
    move || unsafe { crate::ops::glue::borrowed(ordinal, stream as *mut std::ffi::c_void) }
}

/// Runs `f` (the CPU reference) without the GIL, turning a panic into a RuntimeError.
fn run_detached<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> Result<T, Error> + Send,
) -> PyResult<T> {
    py.detach(|| catch_unwind(AssertUnwindSafe(f)))
        .map_err(panic_err)?
        .map_err(to_py_err)
}

/// The place of the inputs; CUDA inputs need a usable device and a CUDA build.
fn conv_place(ts: &[&Imported]) -> PyResult<Place> {
    let place = common_place(ts)?;
    if let Place::Cuda(ordinal) = place {
        check_cuda_device(ordinal).map_err(to_py_err)?;
        #[cfg(not(feature = "cuda"))]
        return Err(to_py_err(Error::CudaNotBuilt));
    }
    Ok(place)
}

#[pymodule]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(check_cuda, m)?)?;
    m.add_function(wrap_pyfunction!(attention::attention_forward, m)?)?;
    m.add_function(wrap_pyfunction!(attention::attention_backward, m)?)?;
    m.add_function(wrap_pyfunction!(attention::attention_shapes, m)?)?;
    m.add_function(wrap_pyfunction!(longformer::longformer_forward, m)?)?;
    m.add_function(wrap_pyfunction!(longformer::longformer_backward, m)?)?;
    m.add_function(wrap_pyfunction!(longformer::longformer_shapes, m)?)?;
    m.add_function(wrap_pyfunction!(conv::conv2d_forward, m)?)?;
    m.add_function(wrap_pyfunction!(conv::conv2d_backward, m)?)?;
    m.add_function(wrap_pyfunction!(conv::conv2d_output_shape, m)?)?;
    m.add_function(wrap_pyfunction!(pool::pool2d_forward, m)?)?;
    m.add_function(wrap_pyfunction!(pool::pool2d_backward, m)?)?;
    m.add_function(wrap_pyfunction!(pool::pool2d_output_shape, m)?)?;
    #[cfg(feature = "cuda")]
    m.add_class::<buffer::DeviceBuffer>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
