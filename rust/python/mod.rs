//! The extension module `flashkernels._native` (built with the `python` feature), one
//! file per op plus the DLPack boundary:
//!
//! - `dlpack`: the DLPack mirror and [`dlpack::Imported`], a consumed capsule;
//! - `attention`, `longformer`, `conv`, `pool`, `ffn`, `linformer`, `reformer`: each op's
//!   forward / backward entries;
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

use pyo3::exceptions::{
    PyKeyboardInterrupt, PyMemoryError, PyRuntimeError, PyTypeError, PyValueError,
};
use pyo3::prelude::*;

mod attention;
#[cfg(feature = "cuda")]
mod buffer;
mod conv;
mod dlpack;
mod ffn;
mod linformer;
mod longformer;
mod pool;
mod reformer;

use crate::error::Error;
use dlpack::{device_name, import, import_f32, DLDevice, Imported, Place};

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
        Error::OutOfMemory { .. } => PyMemoryError::new_err(msg),
        Error::Interrupted => PyKeyboardInterrupt::new_err(msg),
    }
}

/// A per-token mask from Python: host `(bytes, shape)`, one byte per token, nonzero = set.
type MaskArg = Option<(Vec<u8>, Vec<usize>)>;

fn to_mask(m: MaskArg) -> Option<crate::longformer::TokenMask> {
    m.map(|(bytes, shape)| {
        crate::longformer::TokenMask::new(bytes.into_iter().map(|x| x != 0).collect(), &shape)
    })
}

/// A softmax scale from Python (f64) as the ops take it (f32): finite, positive, and
/// still so in float32, else an error reporting the value given (1e-50 is not "0").
fn scale_f32(scale: Option<f64>) -> PyResult<Option<f32>> {
    scale
        .map(|s| crate::ops::scale_to_f32("scale", s))
        .transpose()
        .map_err(to_py_err)
}

/// Checks that an output of `shape` (elements of at most 8 bytes) can be allocated at
/// all: its element count and byte size fit `isize`, so the caller's framework gets a
/// clear ValueError instead of its own overflow message (numpy: "Maximum allowed
/// dimension exceeded") or a wrapped size.
fn check_output_size(what: &str, shape: &[usize]) -> Result<(), Error> {
    const LIMIT: u128 = (isize::MAX as u128) / 8;
    let n = shape
        .iter()
        .try_fold(1u128, |a, &d| a.checked_mul(d as u128))
        .unwrap_or(u128::MAX);
    if n > LIMIT && !shape.contains(&0) {
        return Err(Error::InvalidArgument(format!(
            "{what} would have shape {shape:?}: more than {LIMIT} elements, which no buffer \
             can hold (check the sizes and options)"
        )));
    }
    Ok(())
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

/// How often, at most, a detached CPU call takes the GIL back to run Python's signal
/// handlers (Ctrl-C).
const SIGNAL_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Runs `f` (the CPU reference) without the GIL, turning a panic into a RuntimeError.
/// While it runs, the references poll an interrupt check (`ops::with_interrupt_check`):
/// at most every [`SIGNAL_CHECK_INTERVAL`] it reacquires the GIL and runs
/// `py.check_signals()`; an exception from a signal handler (KeyboardInterrupt for
/// Ctrl-C) stops the call and is raised as it is.
fn run_detached<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> Result<T, Error> + Send,
) -> PyResult<T> {
    let pending: std::sync::Mutex<Option<PyErr>> = std::sync::Mutex::new(None);
    let result = py.detach(|| {
        let check = || -> Result<(), Error> {
            match Python::attach(|py| py.check_signals()) {
                Ok(()) => Ok(()),
                Err(e) => {
                    if let Ok(mut slot) = pending.lock() {
                        slot.get_or_insert(e);
                    }
                    Err(Error::Interrupted)
                }
            }
        };
        catch_unwind(AssertUnwindSafe(|| {
            crate::ops::with_interrupt_check_every(SIGNAL_CHECK_INTERVAL, &check, f)
        }))
    });
    let result = result.map_err(panic_err)?;
    match result {
        Ok(v) => Ok(v),
        Err(e) => {
            let raised = pending.into_inner().ok().flatten();
            Err(match (e, raised) {
                (Error::Interrupted, Some(err)) => err,
                (e, _) => to_py_err(e),
            })
        }
    }
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
    m.add_function(wrap_pyfunction!(ffn::ffn_forward, m)?)?;
    m.add_function(wrap_pyfunction!(ffn::ffn_backward, m)?)?;
    m.add_function(wrap_pyfunction!(ffn::ffn_shapes, m)?)?;
    m.add_function(wrap_pyfunction!(linformer::linformer_forward, m)?)?;
    m.add_function(wrap_pyfunction!(linformer::linformer_backward, m)?)?;
    m.add_function(wrap_pyfunction!(linformer::linformer_shapes, m)?)?;
    m.add_function(wrap_pyfunction!(reformer::reformer_forward, m)?)?;
    m.add_function(wrap_pyfunction!(reformer::reformer_backward, m)?)?;
    m.add_function(wrap_pyfunction!(reformer::reformer_shapes, m)?)?;
    #[cfg(feature = "cuda")]
    m.add_class::<buffer::DeviceBuffer>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
