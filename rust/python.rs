//! The extension module `flashkernels._native` (built with the `python` feature).
//!
//! It is deliberately low level: the Python package (python/flashkernels) picks the
//! stream and allocates outputs with the caller's framework; this module consumes DLPack
//! capsules, validates, and runs the CPU reference or the CUDA kernels: the attention
//! forward ([`attention_forward`]) and backward ([`attention_backward`]), dense or
//! variable-length, with GQA and sliding windows (the options of `crate::attention`);
//! Longformer attention forward / backward (`longformer`, with global tokens, padding,
//! dilation); conv2d forward / backward and 2-D max / average pooling forward / backward
//! ([`conv2d_forward`], [`conv2d_backward`], [`pool2d_forward`], [`pool2d_backward`]).
//!
//! - DLPack is parsed here with our own `#[repr(C)]` mirror of dlpack.h (v1.x), both the
//!   classic "dltensor" and the versioned "dltensor_versioned" capsule. A capsule is
//!   consumed per the protocol: renamed to "used_dltensor[_versioned]" and its deleter
//!   called when this call is done with it (the producer object stays alive until then).
//! - Every Rust error becomes a Python exception in one place, [`to_py_err`]; every entry
//!   point runs under [`guarded`], so a panic becomes a RuntimeError, never a crash.
//! - `DeviceBuffer` (CUDA builds) is device memory allocated by flashkernels and
//!   exported through DLPack: the output buffer for callers whose framework has no
//!   mutable arrays (jax).

use std::ffi::{c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::{PyBufferError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyTuple};

mod longformer;

use crate::attention::{self, AttentionOptions, AttentionProblem, SeqLens};
use crate::conv;
use crate::error::Error;
use crate::tensor::{DType, HostData, HostTensor, Layout};

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

// ---------------------------------------------------------------------------------------
// DLPack ABI (dlpack.h, v1.x). Only the fields' layout matters here.

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    /// In elements; NULL means compact row-major.
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

#[repr(C)]
struct DLPackVersion {
    major: u32,
    minor: u32,
}

#[repr(C)]
struct DLManagedTensorVersioned {
    version: DLPackVersion,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    flags: u64,
    dl_tensor: DLTensor,
}

const DLTENSOR: &CStr = c"dltensor";
const USED_DLTENSOR: &CStr = c"used_dltensor";
const DLTENSOR_VERSIONED: &CStr = c"dltensor_versioned";
const USED_DLTENSOR_VERSIONED: &CStr = c"used_dltensor_versioned";
const DLPACK_FLAG_READ_ONLY: u64 = 1;

const KDL_CPU: i32 = 1;
const KDL_CUDA: i32 = 2;
const KDL_CUDA_HOST: i32 = 3;
const KDL_CUDA_MANAGED: i32 = 13;

const KDL_INT: u8 = 0;
const KDL_UINT: u8 = 1;
const KDL_FLOAT: u8 = 2;
const KDL_BFLOAT: u8 = 4;
const KDL_COMPLEX: u8 = 5;
const KDL_BOOL: u8 = 6;

/// Where a tensor's memory is, as far as the dispatch is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Host,
    Cuda(usize),
}

fn device_name(d: DLDevice) -> String {
    match d.device_type {
        KDL_CPU => "cpu".into(),
        KDL_CUDA => format!("cuda:{}", d.device_id),
        KDL_CUDA_HOST => "cuda_host".into(),
        KDL_CUDA_MANAGED => format!("cuda_managed:{}", d.device_id),
        t => format!("dlpack device type {t}:{}", d.device_id),
    }
}

fn dl_dtype_name(t: DLDataType) -> String {
    let base = match t.code {
        KDL_INT => format!("int{}", t.bits),
        KDL_UINT => format!("uint{}", t.bits),
        KDL_FLOAT => format!("float{}", t.bits),
        KDL_BFLOAT => format!("bfloat{}", t.bits),
        KDL_COMPLEX => format!("complex{}", t.bits),
        KDL_BOOL => "bool".into(),
        c => format!("dlpack type code {c} ({} bits)", t.bits),
    };
    if t.lanes == 1 {
        base
    } else {
        format!("{base}x{}", t.lanes)
    }
}

enum Managed {
    Classic(*mut DLManagedTensor),
    Versioned(*mut DLManagedTensorVersioned),
}

/// A consumed DLPack tensor: its metadata, and the producer's deleter, which runs on drop
/// (so every exit path, errors included, hands the tensor back exactly once).
struct Imported {
    name: &'static str,
    managed: Managed,
    device: DLDevice,
    dtype: DType,
    /// Shape and strides as the producer gave them (strides of size-1 dims normalised).
    layout: Layout,
    /// `data + byte_offset`.
    ptr: u64,
    readonly: bool,
}

impl Drop for Imported {
    fn drop(&mut self) {
        // SAFETY: the capsule was renamed "used_*" on import, so we own the tensor and
        // call its deleter exactly once, as the DLPack protocol asks of a consumer.
        unsafe {
            match self.managed {
                Managed::Classic(m) => {
                    if let Some(d) = (*m).deleter {
                        d(m)
                    }
                }
                Managed::Versioned(m) => {
                    if let Some(d) = (*m).deleter {
                        d(m)
                    }
                }
            }
        }
    }
}

impl Imported {
    fn place(&self) -> PyResult<Place> {
        match self.device.device_type {
            KDL_CPU | KDL_CUDA_HOST => Ok(Place::Host),
            KDL_CUDA | KDL_CUDA_MANAGED => Ok(Place::Cuda(self.device.device_id.max(0) as usize)),
            _ => Err(PyValueError::new_err(format!(
                "{}: tensors on {} are not supported (CPU or CUDA only)",
                self.name,
                device_name(self.device)
            ))),
        }
    }

    /// The tensor as the attention kernels see it: (B, N, H, D). With `heads_first` the
    /// caller's (B, H, N, D) is viewed through swapped strides, without a copy.
    fn logical_layout(&self, heads_first: bool) -> Result<Layout, Error> {
        let mut l = self.layout.clone();
        if heads_first {
            if l.shape.len() != 4 {
                return Err(Error::Rank {
                    name: self.name,
                    expected: 4,
                    layout: "(batch, heads, seqlen, head_dim)",
                    shape: l.shape,
                });
            }
            l.shape.swap(1, 2);
            l.strides.swap(1, 2);
        }
        Ok(l)
    }

    #[cfg(feature = "cuda")]
    fn device_view(&self, layout: Layout, ordinal: usize) -> crate::DeviceView {
        crate::DeviceView {
            ptr: self.ptr,
            dtype: self.dtype,
            layout,
            device: ordinal,
        }
    }

    /// Copies the elements `layout` reaches (from the producer's memory) into a host tensor.
    fn to_host(&self, layout: Layout) -> Result<HostTensor, Error> {
        let bytes = layout.span() * self.dtype.size();
        let mut buf = vec![0u8; bytes];
        if bytes > 0 {
            // SAFETY: the producer vouches that data + byte_offset holds every element its
            // shape and strides reach; a byte copy has no alignment requirement.
            unsafe {
                std::ptr::copy_nonoverlapping(self.ptr as *const u8, buf.as_mut_ptr(), bytes)
            };
        }
        HostTensor::from_data(HostData::from_bytes(self.dtype, &buf)?, layout)
    }

    /// Writes a contiguous host tensor into this (host, writable) tensor, through its strides.
    fn write_host(&self, src: &HostTensor) -> Result<(), Error> {
        self.check_output(src.dtype(), src.shape())?;
        let elem = self.dtype.size();
        let bytes = src.data().as_bytes();
        let rank = src.shape().len();
        let mut index = vec![0usize; rank];
        for i in 0..src.numel() {
            let dst = self.ptr as usize + self.layout.offset(&index) * elem;
            // SAFETY: the output was allocated for exactly this shape and checked above.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr().add(i * elem), dst as *mut u8, elem)
            };
            for d in (0..rank).rev() {
                index[d] += 1;
                if index[d] < src.shape()[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        Ok(())
    }

    fn check_output(&self, dtype: DType, shape: &[usize]) -> Result<(), Error> {
        if self.readonly {
            return Err(Error::InvalidArgument(format!(
                "{} is read-only",
                self.name
            )));
        }
        if self.dtype != dtype || self.layout.shape != shape {
            return Err(Error::ShapeMismatch {
                detail: format!(
                    "{} must be {dtype} {shape:?}, got {} {:?}",
                    self.name, self.dtype, self.layout.shape
                ),
            });
        }
        Ok(())
    }
}

/// Consumes a DLPack capsule, or a `(capsule, "bfloat16")` pair that reinterprets a
/// 16-bit integer tensor as bfloat16 (numpy cannot export ml_dtypes' bfloat16).
fn import(name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Imported> {
    let (obj, as_bf16) = match obj.cast::<PyTuple>() {
        Ok(t) if t.len() == 2 => {
            let tag: String = t.get_item(1)?.extract()?;
            if tag != "bfloat16" {
                return Err(PyValueError::new_err(format!(
                    "{name}: unknown dtype tag {tag:?}"
                )));
            }
            (t.get_item(0)?, true)
        }
        _ => (obj.clone(), false),
    };
    let cap = obj.cast::<PyCapsule>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{name}: expected a DLPack capsule, got {}",
            obj.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    })?;
    let consume = |used: &CStr| -> PyResult<()> {
        // SAFETY: a live capsule; the name is a 'static C string, as the API requires.
        if unsafe { ffi::PyCapsule_SetName(cap.as_ptr(), used.as_ptr()) } != 0 {
            return Err(PyErr::fetch(cap.py()));
        }
        Ok(())
    };
    let managed = if cap.is_valid_checked(Some(DLTENSOR)) {
        let m = cap
            .pointer_checked(Some(DLTENSOR))?
            .cast::<DLManagedTensor>()
            .as_ptr();
        consume(USED_DLTENSOR)?;
        Managed::Classic(m)
    } else if cap.is_valid_checked(Some(DLTENSOR_VERSIONED)) {
        let m = cap
            .pointer_checked(Some(DLTENSOR_VERSIONED))?
            .cast::<DLManagedTensorVersioned>()
            .as_ptr();
        consume(USED_DLTENSOR_VERSIONED)?;
        Managed::Versioned(m)
    } else {
        return Err(PyValueError::new_err(format!(
            "{name}: the capsule is not an unconsumed DLPack tensor"
        )));
    };
    // From here `imported` owns the tensor: any error below still runs the deleter.
    let mut imported = Imported {
        name,
        managed,
        device: DLDevice {
            device_type: 0,
            device_id: 0,
        },
        dtype: DType::F32,
        layout: Layout {
            shape: vec![],
            strides: vec![],
        },
        ptr: 0,
        readonly: false,
    };
    // SAFETY: a DLPack producer hands out a valid, live managed tensor.
    let (t, readonly) = unsafe {
        match imported.managed {
            Managed::Classic(m) => (&(*m).dl_tensor, false),
            Managed::Versioned(m) => {
                // The protocol's answer to an unknown major version; the deleter (whose place
                // is stable across versions) still runs on drop.
                if (*m).version.major != 1 {
                    return Err(PyBufferError::new_err(format!(
                        "{name}: DLPack {}.{} is not supported (1.x is)",
                        (*m).version.major,
                        (*m).version.minor
                    )));
                }
                (&(*m).dl_tensor, (*m).flags & DLPACK_FLAG_READ_ONLY != 0)
            }
        }
    };
    imported.readonly = readonly;
    imported.device = t.device;
    imported.dtype = match (t.dtype.code, t.dtype.bits, t.dtype.lanes) {
        (KDL_FLOAT, 32, 1) => DType::F32,
        (KDL_FLOAT, 16, 1) => DType::F16,
        (KDL_BFLOAT, 16, 1) => DType::BF16,
        (KDL_UINT | KDL_INT, 16, 1) if as_bf16 => DType::BF16,
        _ => {
            return Err(PyTypeError::new_err(format!(
                "{name}: dtype {} is not supported (float32, float16 or bfloat16)",
                dl_dtype_name(t.dtype)
            )))
        }
    };
    let ndim = t.ndim.max(0) as usize;
    // SAFETY: shape (and strides, when not NULL) point at ndim values.
    let shape: &[i64] = if ndim == 0 {
        &[]
    } else {
        unsafe { std::slice::from_raw_parts(t.shape, ndim) }
    };
    let shape: Vec<usize> = shape
        .iter()
        .map(|&n| usize::try_from(n))
        .collect::<Result<_, _>>()
        .map_err(|_| {
            PyValueError::new_err(format!("{name}: negative extent in shape {shape:?}"))
        })?;
    let mut strides: Vec<usize> = if t.strides.is_null() || ndim == 0 {
        Layout::contiguous(&shape).strides
    } else {
        let s = unsafe { std::slice::from_raw_parts(t.strides, ndim) };
        s.iter()
            .map(|&x| usize::try_from(x))
            .collect::<Result<_, _>>()
            .map_err(|_| {
                PyValueError::new_err(format!(
                    "{name}: negative strides {s:?} are not supported; pass a copy \
                     (e.g. np.ascontiguousarray)"
                ))
            })?
    };
    // The stride of a size-1 dimension is meaningless and producers fill it in
    // differently; normalise it so stride checks judge only the dimensions that matter.
    for (i, (&n, s)) in shape.iter().zip(strides.iter_mut()).enumerate() {
        if n == 1 {
            *s = if i + 1 == ndim { 1 } else { 0 };
        }
    }
    imported.layout = Layout { shape, strides };
    imported.ptr = (t.data as u64).wrapping_add(t.byte_offset);
    Ok(imported)
}

// ---------------------------------------------------------------------------------------
// Functions.

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

/// Attention options from the Python arguments. Windows are non-negative ints or None
/// (unbounded); a window wider than `i32::MAX` is unbounded in practice and is clamped
/// there, which is also what the CUDA kernels do.
fn options(
    scale: Option<f64>,
    causal: bool,
    window_left: Option<i64>,
    window_right: Option<i64>,
) -> PyResult<AttentionOptions> {
    let window = |name: &str, w: Option<i64>| -> PyResult<Option<usize>> {
        match w {
            None => Ok(None),
            Some(w) if w < 0 => Err(to_py_err(Error::InvalidArgument(format!(
                "{name} must be a non-negative int, or None for unbounded, got {w}"
            )))),
            Some(w) => Ok(Some(w.min(i32::MAX as i64) as usize)),
        }
    };
    Ok(AttentionOptions {
        scale: scale.map(|s| s as f32),
        causal,
        window_left: window("window_left", window_left)?,
        window_right: window("window_right", window_right)?,
    })
}

/// The varlen offsets, when given (both or neither), as int32.
fn seqlens(
    cu_seqlens_q: Option<Vec<i64>>,
    cu_seqlens_k: Option<Vec<i64>>,
    heads_first: bool,
) -> PyResult<Option<SeqLens>> {
    let to_i32 = |name: &str, cu: Vec<i64>| -> PyResult<Vec<i32>> {
        cu.iter()
            .enumerate()
            .map(|(i, &x)| {
                i32::try_from(x).map_err(|_| {
                    to_py_err(Error::InvalidArgument(format!(
                        "{name}: offset {i} is {x}, outside the int32 range"
                    )))
                })
            })
            .collect()
    };
    match (cu_seqlens_q, cu_seqlens_k) {
        (None, None) => Ok(None),
        (Some(q), Some(k)) => {
            if heads_first {
                return Err(to_py_err(Error::InvalidArgument(
                    "cu_seqlens_q/cu_seqlens_k take packed (total_seqlen, heads, head_dim) \
                     tensors: heads_first must be False"
                        .into(),
                )));
            }
            Ok(Some(SeqLens {
                cu_seqlens_q: to_i32("cu_seqlens_q", q)?,
                cu_seqlens_k: to_i32("cu_seqlens_k", k)?,
            }))
        }
        _ => Err(to_py_err(Error::InvalidArgument(
            "cu_seqlens_q and cu_seqlens_k must be given together".into(),
        ))),
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

/// Validates Q, K, V (logical layouts) for a dense or varlen problem.
fn validate_problem(
    qkv: [(&Imported, &Layout); 3],
    seqlens: Option<&SeqLens>,
    opts: &AttentionOptions,
    heads_first: bool,
) -> PyResult<AttentionProblem> {
    let [(q, lq), (k, lk), (v, lv)] = qkv;
    let r = match seqlens {
        None => attention::validate((q.dtype, lq), (k.dtype, lk), (v.dtype, lv), opts),
        Some(s) => attention::validate_varlen((q.dtype, lq), (k.dtype, lk), (v.dtype, lv), s, opts),
    };
    r.map_err(|e| to_py_err(with_layout_note(e, heads_first)))
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

/// Attention forward on DLPack capsules.
///
/// `q`, `k`, `v`: capsules (or `(capsule, "bfloat16")`), logical layout (B, N, H, D), or
/// (B, H, N, D) with `heads_first`; K and V may have fewer heads than Q (GQA). With
/// `cu_seqlens_q` and `cu_seqlens_k` (B+1 offsets each), the batch is variable-length:
/// q, k, v are packed (total, heads, head_dim) and `heads_first` must be False.
/// `window_left` / `window_right`: sliding window (non-negative, None = unbounded).
/// After validation, calls `alloc(out_shape, lse_shape, dtype_name)`, which must return
/// capsules `(out, lse)` for a writable output of `out_shape` (q's shape in kernel order)
/// in q's dtype and a float32 LSE of `lse_shape` ((B, H, Nq), or (H, total_q) for varlen)
/// on the inputs' device. CUDA work is queued on `stream` (a CUstream as an integer, 0
/// for the legacy default stream) and not synchronized.
#[pyfunction]
#[pyo3(signature = (
    q, k, v, alloc, *, heads_first, causal, scale=None, window_left=None, window_right=None,
    cu_seqlens_q=None, cu_seqlens_k=None, stream=0
))]
#[allow(clippy::too_many_arguments)]
fn attention_forward(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    alloc: &Bound<'_, PyAny>,
    heads_first: bool,
    causal: bool,
    scale: Option<f64>,
    window_left: Option<i64>,
    window_right: Option<i64>,
    cu_seqlens_q: Option<Vec<i64>>,
    cu_seqlens_k: Option<Vec<i64>>,
    stream: usize,
) -> PyResult<()> {
    guarded(|| {
        let opts = options(scale, causal, window_left, window_right)?;
        let seqlens = seqlens(cu_seqlens_q, cu_seqlens_k, heads_first)?;
        let inputs = [import("q", q)?, import("k", k)?, import("v", v)?];
        let [q, k, v] = &inputs;
        let place = common_place(&[q, k, v])?;
        let layouts = inputs
            .iter()
            .map(|t| t.logical_layout(heads_first))
            .collect::<Result<Vec<_>, _>>()
            .map_err(to_py_err)?;
        let p = validate_problem(
            [(q, &layouts[0]), (k, &layouts[1]), (v, &layouts[2])],
            seqlens.as_ref(),
            &opts,
            heads_first,
        )?;

        // Fail before allocating when the GPU path cannot run this problem.
        #[cfg(feature = "cuda")]
        let views = match place {
            Place::Host => None,
            Place::Cuda(ordinal) => {
                check_cuda_device(ordinal).map_err(to_py_err)?;
                let views: Vec<_> = inputs
                    .iter()
                    .zip(&layouts)
                    .map(|(t, l)| t.device_view(l.clone(), ordinal))
                    .collect();
                attention::cuda::check_kernel_support(
                    &p,
                    ordinal,
                    &[("q", &views[0]), ("k", &views[1]), ("v", &views[2])],
                )
                .map_err(to_py_err)?;
                Some(views)
            }
        };
        #[cfg(not(feature = "cuda"))]
        if let Place::Cuda(_) = place {
            let _ = stream;
            return Err(to_py_err(Error::CudaNotBuilt));
        }

        let [out, lse] = allocate(
            py,
            alloc,
            ["out", "lse"],
            (p.q_shape(), p.lse_shape()),
            p.dtype,
        )?;
        check_output_devices(&[&out, &lse], q.device)?;

        match place {
            Place::Host => {
                let hq = q.to_host(layouts[0].clone()).map_err(to_py_err)?;
                let hk = k.to_host(layouts[1].clone()).map_err(to_py_err)?;
                let hv = v.to_host(layouts[2].clone()).map_err(to_py_err)?;
                // The reference can take a while: let other Python threads run.
                let result = run_detached(py, || match &seqlens {
                    None => attention::forward_cpu(&hq, &hk, &hv, &opts),
                    Some(s) => attention::forward_cpu_varlen(&hq, &hk, &hv, s, &opts),
                })?;
                out.write_host(&result.out).map_err(to_py_err)?;
                lse.write_host(&result.lse).map_err(to_py_err)?;
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Place::Cuda(ordinal) => {
                let views = views.expect("views are built for CUDA inputs");
                out.check_output(p.dtype, &p.q_shape()).map_err(to_py_err)?;
                lse.check_output(DType::F32, &p.lse_shape())
                    .map_err(to_py_err)?;
                let out_view = out.device_view(out.layout.clone(), ordinal);
                let lse_view = lse.device_view(lse.layout.clone(), ordinal);
                // SAFETY: the views describe live memory held by their producers until the
                // `Imported`s drop after this call; the outputs are fresh allocations, so
                // they overlap nothing; the caller passes its framework's current stream
                // of this device (or 0), and the inputs were exported for that stream.
                unsafe {
                    attention::cuda::forward_views_varlen(
                        &views[0],
                        &views[1],
                        &views[2],
                        &out_view,
                        &lse_view,
                        seqlens.as_ref(),
                        &opts,
                        stream as *mut c_void,
                    )
                }
                .map_err(to_py_err)
            }
            #[cfg(not(feature = "cuda"))]
            Place::Cuda(_) => Err(to_py_err(Error::CudaNotBuilt)),
        }
    })
}

/// Attention backward on DLPack capsules: dQ, dK, dV from the forward's q, k, v, its
/// `out` and `lse`, and `dout` (the gradient of `out`).
///
/// Layouts and options as [`attention_forward`]: `out` and `dout` are laid out like q,
/// `lse` as the forward returned it. After validation, calls
/// `alloc(q_shape, kv_shape, dtype_name)`, which must return capsules `(dq, dk, dv)`:
/// writable, dq of `q_shape`, dk and dv of `kv_shape` (kernel order), in q's dtype, on
/// the inputs' device. For GQA, dK and dV sum over each group's query heads. The result
/// is deterministic.
#[pyfunction]
#[pyo3(signature = (
    q, k, v, out, lse, dout, alloc, *, heads_first, causal, scale=None, window_left=None,
    window_right=None, cu_seqlens_q=None, cu_seqlens_k=None, stream=0
))]
#[allow(clippy::too_many_arguments)]
fn attention_backward(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    dout: &Bound<'_, PyAny>,
    alloc: &Bound<'_, PyAny>,
    heads_first: bool,
    causal: bool,
    scale: Option<f64>,
    window_left: Option<i64>,
    window_right: Option<i64>,
    cu_seqlens_q: Option<Vec<i64>>,
    cu_seqlens_k: Option<Vec<i64>>,
    stream: usize,
) -> PyResult<()> {
    guarded(|| {
        let opts = options(scale, causal, window_left, window_right)?;
        let seqlens = seqlens(cu_seqlens_q, cu_seqlens_k, heads_first)?;
        let inputs = [
            import("q", q)?,
            import("k", k)?,
            import("v", v)?,
            import("out", out)?,
            import("lse", lse)?,
            import("dout", dout)?,
        ];
        let [q, k, v, out, lse, dout] = &inputs;
        let place = common_place(&[q, k, v, out, lse, dout])?;
        // LSE is (B, H, Nq) (or (H, total_q)) in both layouts.
        let layouts = [q, k, v, out, dout]
            .iter()
            .map(|t| t.logical_layout(heads_first))
            .collect::<Result<Vec<_>, _>>()
            .map_err(to_py_err)?;
        let p = validate_problem(
            [(q, &layouts[0]), (k, &layouts[1]), (v, &layouts[2])],
            seqlens.as_ref(),
            &opts,
            heads_first,
        )?;
        attention::validate_backward(
            &p,
            (out.dtype, &layouts[3]),
            (lse.dtype, &lse.layout),
            (dout.dtype, &layouts[4]),
        )
        .map_err(|e| to_py_err(with_layout_note(e, heads_first)))?;

        #[cfg(feature = "cuda")]
        let views = match place {
            Place::Host => None,
            Place::Cuda(ordinal) => {
                check_cuda_device(ordinal).map_err(to_py_err)?;
                let views: Vec<_> = [q, k, v, out, dout]
                    .iter()
                    .zip(&layouts)
                    .map(|(t, l)| t.device_view(l.clone(), ordinal))
                    .collect();
                attention::cuda::check_kernel_support(
                    &p,
                    ordinal,
                    &[
                        ("q", &views[0]),
                        ("k", &views[1]),
                        ("v", &views[2]),
                        ("out", &views[3]),
                        ("dout", &views[4]),
                    ],
                )
                .map_err(to_py_err)?;
                Some(views)
            }
        };
        #[cfg(not(feature = "cuda"))]
        if let Place::Cuda(_) = place {
            let _ = stream;
            return Err(to_py_err(Error::CudaNotBuilt));
        }

        let [dq, dk, dv] = allocate(
            py,
            alloc,
            ["dq", "dk", "dv"],
            (p.q_shape(), p.kv_shape()),
            p.dtype,
        )?;
        check_output_devices(&[&dq, &dk, &dv], q.device)?;

        match place {
            Place::Host => {
                let host = |t: &Imported, l: &Layout| t.to_host(l.clone()).map_err(to_py_err);
                let hq = host(q, &layouts[0])?;
                let hk = host(k, &layouts[1])?;
                let hv = host(v, &layouts[2])?;
                let ho = host(out, &layouts[3])?;
                let hl = host(lse, &lse.layout)?;
                let hd = host(dout, &layouts[4])?;
                let g = run_detached(py, || match &seqlens {
                    None => attention::backward_cpu(&hq, &hk, &hv, &ho, &hl, &hd, &opts),
                    Some(s) => {
                        attention::backward_cpu_varlen(&hq, &hk, &hv, &ho, &hl, &hd, s, &opts)
                    }
                })?;
                dq.write_host(&g.dq).map_err(to_py_err)?;
                dk.write_host(&g.dk).map_err(to_py_err)?;
                dv.write_host(&g.dv).map_err(to_py_err)?;
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Place::Cuda(ordinal) => {
                let views = views.expect("views are built for CUDA inputs");
                dq.check_output(p.dtype, &p.q_shape()).map_err(to_py_err)?;
                dk.check_output(p.dtype, &p.kv_shape()).map_err(to_py_err)?;
                dv.check_output(p.dtype, &p.kv_shape()).map_err(to_py_err)?;
                let lse_view = lse.device_view(lse.layout.clone(), ordinal);
                let dq_view = dq.device_view(dq.layout.clone(), ordinal);
                let dk_view = dk.device_view(dk.layout.clone(), ordinal);
                let dv_view = dv.device_view(dv.layout.clone(), ordinal);
                // SAFETY: as in `attention_forward`: live producer memory until the
                // `Imported`s drop, fresh (non-overlapping) gradient buffers, and the
                // caller's stream, for which the inputs were exported.
                unsafe {
                    attention::cuda::backward_views(
                        [
                            &views[0], &views[1], &views[2], &views[3], &lse_view, &views[4],
                            &dq_view, &dk_view, &dv_view,
                        ],
                        seqlens.as_ref(),
                        &opts,
                        stream as *mut c_void,
                    )
                }
                .map_err(to_py_err)
            }
            #[cfg(not(feature = "cuda"))]
            Place::Cuda(_) => Err(to_py_err(Error::CudaNotBuilt)),
        }
    })
}

/// Shape errors name shapes in the kernel's (B, N, H, D) order: say so to callers who
/// passed (B, H, N, D).
fn with_layout_note(e: Error, heads_first: bool) -> Error {
    match e {
        Error::ShapeMismatch { detail } if heads_first => Error::ShapeMismatch {
            detail: format!(
                "{detail} [shapes shown as (batch, seqlen, heads, head_dim); \
                 yours are (batch, heads, seqlen, head_dim)]"
            ),
        },
        e => e,
    }
}

/// Calls `alloc(shape_a, shape_b, dtype_name)` and imports the N capsules it returns
/// (named `names`, in order).
fn allocate<const N: usize>(
    py: Python<'_>,
    alloc: &Bound<'_, PyAny>,
    names: [&'static str; N],
    shapes: (Vec<usize>, Vec<usize>),
    dtype: DType,
) -> PyResult<[Imported; N]> {
    let what = || PyTypeError::new_err(format!("alloc must return a tuple ({})", names.join(", ")));
    let result = alloc.call1((
        PyTuple::new(py, shapes.0)?,
        PyTuple::new(py, shapes.1)?,
        dtype.name(),
    ))?;
    let tuple = result.cast::<PyTuple>().map_err(|_| what())?;
    if tuple.len() != N {
        return Err(what());
    }
    let mut imported = Vec::with_capacity(N);
    for (i, name) in names.into_iter().enumerate() {
        imported.push(import(name, &tuple.get_item(i)?)?);
    }
    Ok(imported
        .try_into()
        .unwrap_or_else(|_| unreachable!("N capsules imported")))
}

// ---------------------------------------------------------------------------------------
// Device memory owned by flashkernels, exported through DLPack (CUDA builds).

#[cfg(feature = "cuda")]
mod buffer {
    use std::ffi::c_void;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::{Arc, Mutex};

    use pyo3::ffi;
    use pyo3::prelude::*;

    use super::{
        guarded, to_py_err, DLDataType, DLDevice, DLManagedTensor, DLTensor, PyBufferError,
        DLTENSOR, KDL_BFLOAT, KDL_CUDA, KDL_FLOAT,
    };
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
                let tensor = DeviceTensor::poisoned(&dev.default_stream(), dtype, &shape)
                    .map_err(to_py_err)?;
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
}

// ---------------------------------------------------------------------------------------
// Convolution and pooling.

/// Parses the options of a convolution from Python values.
#[allow(clippy::too_many_arguments)]
fn conv_options(
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
    activation: Option<&str>,
    algo: Option<&str>,
) -> Result<conv::Conv2dOptions, Error> {
    Ok(conv::Conv2dOptions {
        stride,
        padding,
        dilation,
        groups,
        activation: conv::Activation::from_name(activation.unwrap_or("none"))?,
        algo: algo.map(conv::ConvAlgo::from_name).transpose()?,
    })
}

/// Calls `alloc(shape, dtype_name)` and imports the one capsule it returns.
fn allocate_one(
    py: Python<'_>,
    alloc: &Bound<'_, PyAny>,
    name: &'static str,
    shape: &[usize],
    dtype: DType,
) -> PyResult<Imported> {
    let result = alloc.call1((PyTuple::new(py, shape)?, dtype.name()))?;
    import(name, &result)
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

/// Conv2d forward on DLPack capsules: y = act(conv(x, weight) + bias), torch's
/// semantics, x (N, C, H, W) and weight (K, C / groups, R, S) in any memory order.
///
/// After validation, calls `alloc(shape, dtype_name)` once for y and, with `keep_pre`,
/// once more for y_pre (conv + bias, what the backward of an activation needs); each call
/// must return a capsule of a writable (N, K, P, Q) tensor (any strides: channels-last
/// outputs are fine) on the inputs' device. `activation`: None, "relu", "gelu" (exact)
/// or "silu". `algo`: None (flashkernels chooses), "im2col" or "implicit_gemm" (CUDA
/// only). CUDA work is queued on `stream` and not synchronized.
#[pyfunction]
#[pyo3(signature = (
    x, weight, bias, alloc, *, stride, padding, dilation, groups, activation=None, algo=None,
    keep_pre=false, stream=0
))]
#[allow(clippy::too_many_arguments)]
fn conv2d_forward(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    weight: &Bound<'_, PyAny>,
    bias: Option<&Bound<'_, PyAny>>,
    alloc: &Bound<'_, PyAny>,
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
    activation: Option<&str>,
    algo: Option<&str>,
    keep_pre: bool,
    stream: usize,
) -> PyResult<()> {
    guarded(|| {
        let opts =
            conv_options(stride, padding, dilation, groups, activation, algo).map_err(to_py_err)?;
        let x = import("x", x)?;
        let w = import("weight", weight)?;
        let b = bias.map(|b| import("bias", b)).transpose()?;
        let mut ins = vec![&x, &w];
        ins.extend(b.as_ref());
        let place = conv_place(&ins)?;
        let p = conv::validate(
            (x.dtype, &x.layout),
            (w.dtype, &w.layout),
            b.as_ref().map(|b| (b.dtype, &b.layout)),
            &opts,
        )
        .map_err(to_py_err)?;
        #[cfg(feature = "cuda")]
        if let Place::Cuda(ordinal) = place {
            // Fail before allocating when the GPU path cannot run this problem.
            let xv = x.device_view(x.layout.clone(), ordinal);
            let wv = w.device_view(w.layout.clone(), ordinal);
            conv::cuda::check_kernel_support(&p, ordinal, &[("x", &xv), ("weight", &wv)])
                .map_err(to_py_err)?;
        }
        let y = allocate_one(py, alloc, "y", &p.y_shape(), p.dtype)?;
        let y_pre = keep_pre
            .then(|| allocate_one(py, alloc, "y_pre", &p.y_shape(), p.dtype))
            .transpose()?;
        let mut outs = vec![&y];
        outs.extend(y_pre.as_ref());
        check_output_devices(&outs, x.device)?;
        for o in &outs {
            o.check_output(p.dtype, &p.y_shape()).map_err(to_py_err)?;
        }
        match place {
            Place::Host => {
                let hx = x.to_host(x.layout.clone()).map_err(to_py_err)?;
                let hw = w.to_host(w.layout.clone()).map_err(to_py_err)?;
                let hb = b
                    .as_ref()
                    .map(|b| b.to_host(b.layout.clone()))
                    .transpose()
                    .map_err(to_py_err)?;
                let o = run_detached(py, || {
                    conv::conv2d_cpu(&hx, &hw, hb.as_ref(), &opts, keep_pre)
                })?;
                y.write_host(&o.y).map_err(to_py_err)?;
                if let (Some(dst), Some(src)) = (&y_pre, &o.y_pre) {
                    dst.write_host(src).map_err(to_py_err)?;
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Place::Cuda(ordinal) => {
                let v = |t: &Imported| t.device_view(t.layout.clone(), ordinal);
                let bv = b.as_ref().map(v);
                let pv = y_pre.as_ref().map(v);
                // SAFETY: live producer memory until the `Imported`s drop after this call;
                // fresh outputs; the caller's stream, for which the inputs were exported.
                unsafe {
                    conv::cuda::conv2d_forward_views(
                        &v(&x),
                        &v(&w),
                        bv.as_ref(),
                        &v(&y),
                        pv.as_ref(),
                        &opts,
                        stream as *mut c_void,
                    )
                }
                .map_err(to_py_err)
            }
            #[cfg(not(feature = "cuda"))]
            Place::Cuda(_) => {
                let _ = stream;
                Err(to_py_err(Error::CudaNotBuilt))
            }
        }
    })
}

/// Conv2d backward on DLPack capsules: from x, weight and dy (the gradient of conv + bias,
/// before any activation), the gradients asked for by `need` = (input, weight, bias).
/// Calls `alloc(shape, dtype_name)` for each, in that order: dx like x's logical shape,
/// dweight like weight's, dbias (K).
#[pyfunction]
#[pyo3(signature = (
    x, weight, dy, alloc, *, stride, padding, dilation, groups, need=(true, true, true),
    algo=None, stream=0
))]
#[allow(clippy::too_many_arguments)]
fn conv2d_backward(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    weight: &Bound<'_, PyAny>,
    dy: &Bound<'_, PyAny>,
    alloc: &Bound<'_, PyAny>,
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
    need: (bool, bool, bool),
    algo: Option<&str>,
    stream: usize,
) -> PyResult<()> {
    guarded(|| {
        let opts =
            conv_options(stride, padding, dilation, groups, None, algo).map_err(to_py_err)?;
        let x = import("x", x)?;
        let w = import("weight", weight)?;
        let dy = import("dy", dy)?;
        let place = conv_place(&[&x, &w, &dy])?;
        let p = conv::validate((x.dtype, &x.layout), (w.dtype, &w.layout), None, &opts)
            .map_err(to_py_err)?;
        conv::validate_backward(&p, (dy.dtype, &dy.layout)).map_err(to_py_err)?;
        let grads = conv::ConvGrads {
            input: need.0,
            weight: need.1,
            bias: need.2,
        };
        let shapes = [p.x_shape(), p.weight_shape(), vec![p.k]];
        let names = ["dx", "dweight", "dbias"];
        let mut outs: Vec<Option<Imported>> = Vec::new();
        for (i, want) in [need.0, need.1, need.2].into_iter().enumerate() {
            outs.push(
                want.then(|| allocate_one(py, alloc, names[i], &shapes[i], p.dtype))
                    .transpose()?,
            );
        }
        let present: Vec<&Imported> = outs.iter().flatten().collect();
        check_output_devices(&present, x.device)?;
        for (o, shape) in outs.iter().zip(&shapes) {
            if let Some(o) = o {
                o.check_output(p.dtype, shape).map_err(to_py_err)?;
            }
        }
        match place {
            Place::Host => {
                let h = |t: &Imported| t.to_host(t.layout.clone()).map_err(to_py_err);
                let (hx, hw, hdy) = (h(&x)?, h(&w)?, h(&dy)?);
                let g = run_detached(py, || {
                    conv::conv2d_backward_cpu(&hx, &hw, &hdy, &opts, grads)
                })?;
                for (dst, src) in outs.iter().zip([&g.dx, &g.dweight, &g.dbias]) {
                    if let (Some(dst), Some(src)) = (dst, src) {
                        dst.write_host(src).map_err(to_py_err)?;
                    }
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Place::Cuda(ordinal) => {
                let v = |t: &Imported| t.device_view(t.layout.clone(), ordinal);
                let ov: Vec<Option<crate::DeviceView>> =
                    outs.iter().map(|o| o.as_ref().map(v)).collect();
                // SAFETY: as in `conv2d_forward`.
                unsafe {
                    conv::cuda::conv2d_backward_views(
                        [&v(&x), &v(&w), &v(&dy)],
                        [ov[0].as_ref(), ov[1].as_ref(), ov[2].as_ref()],
                        &opts,
                        stream as *mut c_void,
                    )
                }
                .map_err(to_py_err)
            }
            #[cfg(not(feature = "cuda"))]
            Place::Cuda(_) => {
                let _ = stream;
                Err(to_py_err(Error::CudaNotBuilt))
            }
        }
    })
}

#[allow(clippy::too_many_arguments)]
fn pool_options(
    kernel_size: [usize; 2],
    stride: Option<[usize; 2]>,
    padding: [usize; 2],
    dilation: [usize; 2],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: Option<usize>,
) -> conv::Pool2dOptions {
    conv::Pool2dOptions {
        kernel_size,
        stride,
        padding,
        dilation,
        ceil_mode,
        count_include_pad,
        divisor_override,
    }
}

fn pool_kind(kind: &str) -> Result<conv::PoolKind, Error> {
    match kind {
        "max" => Ok(conv::PoolKind::Max),
        "avg" => Ok(conv::PoolKind::Avg),
        _ => Err(Error::InvalidArgument(format!(
            "pooling kind must be \"max\" or \"avg\", got {kind:?}"
        ))),
    }
}

/// Writes int32 indices to the caller's buffer at `ptr` (host memory).
///
/// # Safety
/// `ptr` must address `v.len()` writable, 4-byte aligned int32 values.
unsafe fn write_indices(ptr: usize, v: &[i32]) {
    // SAFETY: as the caller vouches.
    unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), ptr as *mut i32, v.len()) };
}

/// 2-D pooling forward on DLPack capsules, torch's max_pool2d / avg_pool2d semantics.
/// `kind`: "max" or "avg". Calls `alloc(shape, dtype_name)` once for y (N, C, P, Q).
/// For max pooling, `indices` is the address of a contiguous int32 buffer of y's element
/// count on the inputs' device (host or CUDA), written with each window's argmax as
/// h * W + w; allocate it with y's shape, which `pool2d_output_shape` gives.
#[pyfunction]
#[pyo3(signature = (
    x, alloc, *, kind, kernel_size, stride, padding, dilation, ceil_mode, count_include_pad=true,
    divisor_override=None, indices=0, stream=0
))]
#[allow(clippy::too_many_arguments)]
fn pool2d_forward(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    alloc: &Bound<'_, PyAny>,
    kind: &str,
    kernel_size: [usize; 2],
    stride: Option<[usize; 2]>,
    padding: [usize; 2],
    dilation: [usize; 2],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: Option<usize>,
    indices: usize,
    stream: usize,
) -> PyResult<()> {
    guarded(|| {
        let kind = pool_kind(kind).map_err(to_py_err)?;
        let opts = pool_options(
            kernel_size,
            stride,
            padding,
            dilation,
            ceil_mode,
            count_include_pad,
            divisor_override,
        );
        let x = import("x", x)?;
        let place = conv_place(&[&x])?;
        let p = conv::validate_pool(kind, (x.dtype, &x.layout), &opts).map_err(to_py_err)?;
        if kind == conv::PoolKind::Max && (indices == 0 || indices % 4 != 0) {
            return Err(to_py_err(Error::InvalidArgument(format!(
                "indices: max pooling needs a 4-byte aligned int32 buffer, got address {indices:#x}"
            ))));
        }
        let y = allocate_one(py, alloc, "y", &p.y_shape(), p.dtype)?;
        check_output_devices(&[&y], x.device)?;
        y.check_output(p.dtype, &p.y_shape()).map_err(to_py_err)?;
        match place {
            Place::Host => {
                let hx = x.to_host(x.layout.clone()).map_err(to_py_err)?;
                match kind {
                    conv::PoolKind::Max => {
                        let o = run_detached(py, || conv::max_pool2d_cpu(&hx, &opts))?;
                        y.write_host(&o.y).map_err(to_py_err)?;
                        let idx = o.indices.to_host().map_err(to_py_err)?;
                        // SAFETY: the caller passes an int32 buffer of y's element count.
                        unsafe { write_indices(indices, &idx) };
                    }
                    conv::PoolKind::Avg => {
                        let o = run_detached(py, || conv::avg_pool2d_cpu(&hx, &opts))?;
                        y.write_host(&o).map_err(to_py_err)?;
                    }
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Place::Cuda(ordinal) => {
                let v = |t: &Imported| t.device_view(t.layout.clone(), ordinal);
                // SAFETY: as in `conv2d_forward`; the caller vouches for `indices`.
                unsafe {
                    conv::cuda::pool2d_forward_views(
                        kind,
                        &v(&x),
                        &v(&y),
                        indices as u64,
                        &opts,
                        stream as *mut c_void,
                    )
                }
                .map_err(to_py_err)
            }
            #[cfg(not(feature = "cuda"))]
            Place::Cuda(_) => {
                let _ = stream;
                Err(to_py_err(Error::CudaNotBuilt))
            }
        }
    })
}

/// 2-D pooling backward on DLPack capsules: dx of `input_shape` (the forward's x, in dy's
/// dtype) from dy and, for max pooling, the forward's int32 indices at address `indices`
/// (same device). Calls `alloc(shape, dtype_name)` once for dx.
#[pyfunction]
#[pyo3(signature = (
    dy, input_shape, alloc, *, kind, kernel_size, stride, padding, dilation, ceil_mode,
    count_include_pad=true, divisor_override=None, indices=0, stream=0
))]
#[allow(clippy::too_many_arguments)]
fn pool2d_backward(
    py: Python<'_>,
    dy: &Bound<'_, PyAny>,
    input_shape: Vec<usize>,
    alloc: &Bound<'_, PyAny>,
    kind: &str,
    kernel_size: [usize; 2],
    stride: Option<[usize; 2]>,
    padding: [usize; 2],
    dilation: [usize; 2],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: Option<usize>,
    indices: usize,
    stream: usize,
) -> PyResult<()> {
    guarded(|| {
        let kind = pool_kind(kind).map_err(to_py_err)?;
        let opts = pool_options(
            kernel_size,
            stride,
            padding,
            dilation,
            ceil_mode,
            count_include_pad,
            divisor_override,
        );
        let dy = import("dy", dy)?;
        let place = conv_place(&[&dy])?;
        let x_layout = Layout::contiguous(&input_shape);
        let p = conv::validate_pool(kind, (dy.dtype, &x_layout), &opts).map_err(to_py_err)?;
        conv::validate_pool_backward(&p, (dy.dtype, &dy.layout)).map_err(to_py_err)?;
        if kind == conv::PoolKind::Max && (indices == 0 || indices % 4 != 0) {
            return Err(to_py_err(Error::InvalidArgument(format!(
                "indices: max pooling needs a 4-byte aligned int32 buffer, got address {indices:#x}"
            ))));
        }
        let dx = allocate_one(py, alloc, "dx", &p.x_shape(), p.dtype)?;
        check_output_devices(&[&dx], dy.device)?;
        dx.check_output(p.dtype, &p.x_shape()).map_err(to_py_err)?;
        match place {
            Place::Host => {
                let hdy = dy.to_host(dy.layout.clone()).map_err(to_py_err)?;
                // Only the geometry and dtype of x are read.
                let hx = HostTensor::from_fn(p.dtype, &input_shape, |_| 0.0).map_err(to_py_err)?;
                let g = match kind {
                    conv::PoolKind::Max => {
                        let n: usize = p.y_shape().iter().product();
                        // SAFETY: the caller passes the forward's int32 indices of y's count.
                        let idx = unsafe { std::slice::from_raw_parts(indices as *const i32, n) }
                            .to_vec();
                        run_detached(py, || conv::max_pool2d_backward_cpu(&hx, &hdy, &idx, &opts))?
                    }
                    conv::PoolKind::Avg => {
                        run_detached(py, || conv::avg_pool2d_backward_cpu(&hx, &hdy, &opts))?
                    }
                };
                dx.write_host(&g).map_err(to_py_err)
            }
            #[cfg(feature = "cuda")]
            Place::Cuda(ordinal) => {
                let v = |t: &Imported| t.device_view(t.layout.clone(), ordinal);
                // SAFETY: as in `conv2d_forward`; the caller vouches for `indices`.
                unsafe {
                    conv::cuda::pool2d_backward_views(
                        kind,
                        (p.dtype, &x_layout),
                        &v(&dy),
                        indices as u64,
                        &v(&dx),
                        &opts,
                        stream as *mut c_void,
                    )
                }
                .map_err(to_py_err)
            }
            #[cfg(not(feature = "cuda"))]
            Place::Cuda(_) => {
                let _ = stream;
                Err(to_py_err(Error::CudaNotBuilt))
            }
        }
    })
}

/// The output shape (N, C, P, Q) of a pooling call (validated), to size the indices.
#[pyfunction]
#[pyo3(signature = (
    input_shape, *, kind, kernel_size, stride, padding, dilation, ceil_mode,
    count_include_pad=true, divisor_override=None
))]
#[allow(clippy::too_many_arguments)]
fn pool2d_output_shape(
    input_shape: Vec<usize>,
    kind: &str,
    kernel_size: [usize; 2],
    stride: Option<[usize; 2]>,
    padding: [usize; 2],
    dilation: [usize; 2],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: Option<usize>,
) -> PyResult<Vec<usize>> {
    guarded(|| {
        let kind = pool_kind(kind).map_err(to_py_err)?;
        let opts = pool_options(
            kernel_size,
            stride,
            padding,
            dilation,
            ceil_mode,
            count_include_pad,
            divisor_override,
        );
        let l = Layout::contiguous(&input_shape);
        let p = conv::validate_pool(kind, (DType::F32, &l), &opts).map_err(to_py_err)?;
        Ok(p.y_shape())
    })
}

#[pymodule]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(check_cuda, m)?)?;
    m.add_function(wrap_pyfunction!(attention_forward, m)?)?;
    m.add_function(wrap_pyfunction!(attention_backward, m)?)?;
    m.add_function(wrap_pyfunction!(longformer::longformer_forward, m)?)?;
    m.add_function(wrap_pyfunction!(longformer::longformer_backward, m)?)?;
    m.add_function(wrap_pyfunction!(conv2d_forward, m)?)?;
    m.add_function(wrap_pyfunction!(conv2d_backward, m)?)?;
    m.add_function(wrap_pyfunction!(pool2d_forward, m)?)?;
    m.add_function(wrap_pyfunction!(pool2d_backward, m)?)?;
    m.add_function(wrap_pyfunction!(pool2d_output_shape, m)?)?;
    #[cfg(feature = "cuda")]
    m.add_class::<buffer::DeviceBuffer>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
