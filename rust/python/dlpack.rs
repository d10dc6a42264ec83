//! DLPack at the boundary: our own `#[repr(C)]` mirror of dlpack.h (v1.x), both the
//! classic "dltensor" and the versioned "dltensor_versioned" capsule, and [`Imported`],
//! one consumed capsule (renamed to "used_dltensor[_versioned]" and its deleter called
//! when the call is done with it; the producer object stays alive until then).

use std::ffi::{c_void, CStr};

use pyo3::exceptions::{PyBufferError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyTuple};

use crate::error::Error;
use crate::tensor::{DType, HostData, HostTensor, Layout};

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DLDevice {
    pub(super) device_type: i32,
    pub(super) device_id: i32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(super) struct DLDataType {
    pub(super) code: u8,
    pub(super) bits: u8,
    pub(super) lanes: u16,
}

#[repr(C)]
pub(super) struct DLTensor {
    pub(super) data: *mut c_void,
    pub(super) device: DLDevice,
    pub(super) ndim: i32,
    pub(super) dtype: DLDataType,
    pub(super) shape: *mut i64,
    /// In elements; NULL means compact row-major.
    pub(super) strides: *mut i64,
    pub(super) byte_offset: u64,
}

#[repr(C)]
pub(super) struct DLManagedTensor {
    pub(super) dl_tensor: DLTensor,
    pub(super) manager_ctx: *mut c_void,
    pub(super) deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

#[repr(C)]
pub(super) struct DLPackVersion {
    pub(super) major: u32,
    pub(super) minor: u32,
}

#[repr(C)]
pub(super) struct DLManagedTensorVersioned {
    pub(super) version: DLPackVersion,
    pub(super) manager_ctx: *mut c_void,
    pub(super) deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    pub(super) flags: u64,
    pub(super) dl_tensor: DLTensor,
}

pub(super) const DLTENSOR: &CStr = c"dltensor";
pub(super) const USED_DLTENSOR: &CStr = c"used_dltensor";
pub(super) const DLTENSOR_VERSIONED: &CStr = c"dltensor_versioned";
pub(super) const USED_DLTENSOR_VERSIONED: &CStr = c"used_dltensor_versioned";
pub(super) const DLPACK_FLAG_READ_ONLY: u64 = 1;

pub(super) const KDL_CPU: i32 = 1;
pub(super) const KDL_CUDA: i32 = 2;
pub(super) const KDL_CUDA_HOST: i32 = 3;
pub(super) const KDL_CUDA_MANAGED: i32 = 13;

pub(super) const KDL_INT: u8 = 0;
pub(super) const KDL_UINT: u8 = 1;
pub(super) const KDL_FLOAT: u8 = 2;
pub(super) const KDL_BFLOAT: u8 = 4;
pub(super) const KDL_COMPLEX: u8 = 5;
pub(super) const KDL_BOOL: u8 = 6;

/// Where a tensor's memory is, as far as the dispatch is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Place {
    Host,
    Cuda(usize),
}

pub(super) fn device_name(d: DLDevice) -> String {
    match d.device_type {
        KDL_CPU => "cpu".into(),
        KDL_CUDA => format!("cuda:{}", d.device_id),
        KDL_CUDA_HOST => "cuda_host".into(),
        KDL_CUDA_MANAGED => format!("cuda_managed:{}", d.device_id),
        t => format!("dlpack device type {t}:{}", d.device_id),
    }
}

pub(super) fn dl_dtype_name(t: DLDataType) -> String {
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

pub(super) enum Managed {
    Classic(*mut DLManagedTensor),
    Versioned(*mut DLManagedTensorVersioned),
}

/// A consumed DLPack tensor: its metadata, and the producer's deleter, which runs on drop
/// (so every exit path, errors included, hands the tensor back exactly once).
pub(super) struct Imported {
    pub(super) name: &'static str,
    pub(super) managed: Managed,
    pub(super) device: DLDevice,
    pub(super) dtype: DType,
    /// Shape and strides as the producer gave them (strides of size-1 dims normalised).
    pub(super) layout: Layout,
    /// `data + byte_offset`.
    pub(super) ptr: u64,
    pub(super) readonly: bool,
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
    pub(super) fn place(&self) -> PyResult<Place> {
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
    pub(super) fn logical_layout(&self, heads_first: bool) -> Result<Layout, Error> {
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
    pub(super) fn device_view(&self, layout: Layout, ordinal: usize) -> crate::DeviceView {
        crate::DeviceView {
            ptr: self.ptr,
            dtype: self.dtype,
            layout,
            device: ordinal,
        }
    }

    /// The elements `layout` reaches (from the producer's memory), gathered element by
    /// element into a contiguous host tensor: O(numel) time and memory, whatever the
    /// view's span (a 4 KB view of a 1 GiB array copies 4 KB; a broadcast, zero-stride
    /// input is materialised). The buffer is allocated fallibly (`Error::OutOfMemory`).
    pub(super) fn to_host(&self, layout: Layout) -> Result<HostTensor, Error> {
        let numel = checked_numel(self.name, &layout.shape)?;
        let data = match self.dtype {
            DType::F32 => HostData::F32(self.gather::<f32>(&layout, numel)?),
            DType::F16 => HostData::F16(self.gather::<half::f16>(&layout, numel)?),
            DType::BF16 => HostData::BF16(self.gather::<half::bf16>(&layout, numel)?),
        };
        HostTensor::from_data(data, Layout::contiguous(&layout.shape))
    }

    /// The elements of `layout` in row-major order (see [`Imported::to_host`]).
    fn gather<T: Copy>(&self, layout: &Layout, numel: usize) -> Result<Vec<T>, Error> {
        debug_assert_eq!(std::mem::size_of::<T>(), self.dtype.size());
        let mut out: Vec<T> = Vec::new();
        out.try_reserve_exact(numel)
            .map_err(|_| Error::OutOfMemory {
                what: format!("a host copy of {}", self.name),
                bytes: (numel as u64).saturating_mul(std::mem::size_of::<T>() as u64),
            })?;
        if numel == 0 {
            return Ok(out);
        }
        let base = self.ptr as usize as *const T;
        for_each_offset(layout, |off| {
            // SAFETY: the producer vouches that data + byte_offset holds every element its
            // shape and strides reach (`off` is one of them); reads are unaligned-safe.
            out.push(unsafe { std::ptr::read_unaligned(base.wrapping_add(off)) });
        });
        Ok(out)
    }

    /// Writes a contiguous host tensor into this (host, writable) tensor, through its strides.
    pub(super) fn write_host(&self, src: &HostTensor) -> Result<(), Error> {
        self.check_output(src.dtype(), src.shape())?;
        let elem = self.dtype.size();
        let bytes = src.data().as_bytes();
        let mut i = 0usize;
        for_each_offset(&self.layout, |off| {
            let dst = (self.ptr as usize as *mut u8).wrapping_add(off * elem);
            // SAFETY: the output was allocated for exactly this shape and checked above;
            // `i` runs over the source's numel contiguous elements.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr().add(i * elem), dst, elem) };
            i += 1;
        });
        Ok(())
    }

    pub(super) fn check_output(&self, dtype: DType, shape: &[usize]) -> Result<(), Error> {
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

/// The element count of `shape`, or `Error::TooLarge` when it overflows.
fn checked_numel(name: &str, shape: &[usize]) -> Result<usize, Error> {
    shape
        .iter()
        .try_fold(1usize, |a, &n| a.checked_mul(n))
        .ok_or_else(|| Error::TooLarge {
            what: format!("the element count of {name} {shape:?}"),
            value: u64::MAX,
            limit: usize::MAX as u64,
        })
}

/// Calls `f` with the element offset of every index of `layout`, in row-major order
/// (nothing for an empty layout). Offsets are of a tensor whose memory exists (its
/// producer's), so they fit `usize`.
fn for_each_offset(layout: &Layout, mut f: impl FnMut(usize)) {
    let (shape, strides) = (&layout.shape, &layout.strides);
    if shape.contains(&0) {
        return;
    }
    let rank = shape.len();
    if rank == 0 {
        f(0);
        return;
    }
    let (inner, inner_stride) = (shape[rank - 1], strides[rank - 1]);
    let mut index = vec![0usize; rank - 1];
    let mut base = 0usize;
    loop {
        for j in 0..inner {
            f(base.wrapping_add(j.wrapping_mul(inner_stride)));
        }
        // Next row: odometer over the outer dimensions, keeping `base` in step.
        let mut d = rank - 1;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            index[d] += 1;
            base = base.wrapping_add(strides[d]);
            if index[d] < shape[d] {
                break;
            }
            base = base.wrapping_sub(strides[d].wrapping_mul(shape[d]));
            index[d] = 0;
        }
    }
}

/// Consumes a DLPack capsule, or a `(capsule, "bfloat16")` pair that reinterprets a
/// 16-bit integer tensor as bfloat16 (numpy cannot export ml_dtypes' bfloat16).
pub(super) fn import(name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Imported> {
    import_as(name, obj, Elements::Float)
}

/// Like [`import`], for an input that is float32 only (the forward's `lse`).
pub(super) fn import_f32(name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Imported> {
    import_as(name, obj, Elements::Float32)
}

/// What a capsule must hold: float data (f32, f16, bf16), or int32 indices.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Elements {
    Float,
    Float32,
    Int32,
}

fn import_as(name: &'static str, obj: &Bound<'_, PyAny>, elements: Elements) -> PyResult<Imported> {
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
        // Int32 indices: `Indices` wraps them and never reads `dtype` (F32 only records
        // the 4-byte element size the copies use).
        (KDL_INT, 32, 1) if elements == Elements::Int32 => DType::F32,
        _ if elements == Elements::Int32 => {
            return Err(PyTypeError::new_err(format!(
                "{name}: dtype {} is not supported (int32)",
                dl_dtype_name(t.dtype)
            )))
        }
        (KDL_FLOAT, 32, 1) => DType::F32,
        _ if elements == Elements::Float32 => {
            return Err(PyTypeError::new_err(format!(
                "{name}: dtype {} is not supported here ({name} is float32, as the forward \
                 returns it)",
                dl_dtype_name(t.dtype)
            )))
        }
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

/// Int32 indices (max pooling's argmax) from a DLPack capsule: contiguous, with their
/// shape, so a short buffer is refused rather than read or written past its end.
pub(super) struct Indices(Imported);

impl Indices {
    pub(super) fn import(name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Indices> {
        Ok(Indices(import_as(name, obj, Elements::Int32)?))
    }

    pub(super) fn device(&self) -> DLDevice {
        self.0.device
    }

    /// Checks the shape and contiguity (and, for an output, that it is writable).
    pub(super) fn check(&self, shape: &[usize], output: bool) -> Result<(), Error> {
        if output && self.0.readonly {
            return Err(Error::InvalidArgument(format!(
                "{} is read-only",
                self.0.name
            )));
        }
        if self.0.layout.shape != shape {
            return Err(Error::ShapeMismatch {
                detail: format!(
                    "{} must be int32 {shape:?}, got {:?}",
                    self.0.name, self.0.layout.shape
                ),
            });
        }
        let t = &self.0;
        // Size-1 dimensions' strides are normalised on import: compare the others.
        let dense = Layout::contiguous(&t.layout.shape);
        let contiguous = (0..t.layout.shape.len())
            .all(|d| t.layout.shape[d] == 1 || t.layout.strides[d] == dense.strides[d]);
        if !contiguous {
            return Err(Error::InvalidArgument(format!(
                "{}: int32 indices must be contiguous, got shape {:?} strides {:?}",
                t.name, t.layout.shape, t.layout.strides
            )));
        }
        Ok(())
    }

    /// A copy of host indices of `shape` (checked first).
    pub(super) fn read_host(&self, shape: &[usize]) -> Result<Vec<i32>, Error> {
        self.check(shape, false)?;
        let n = self.0.layout.numel();
        let mut v = vec![0i32; n];
        // SAFETY: the producer vouches for `n` contiguous int32 at ptr (checked above:
        // contiguous, of this shape); a byte copy has no alignment requirement.
        unsafe {
            std::ptr::copy_nonoverlapping(self.0.ptr as *const u8, v.as_mut_ptr().cast(), n * 4)
        };
        Ok(v)
    }

    /// Writes host indices of `shape` (checked first) into this writable buffer.
    pub(super) fn write_host(&self, shape: &[usize], v: &[i32]) -> Result<(), Error> {
        self.check(shape, true)?;
        if v.len() != self.0.layout.numel() {
            return Err(Error::ShapeMismatch {
                detail: format!("{}: {} indices for {shape:?}", self.0.name, v.len()),
            });
        }
        // SAFETY: as in `read_host`; the buffer is writable (checked).
        unsafe {
            std::ptr::copy_nonoverlapping(
                v.as_ptr().cast::<u8>(),
                self.0.ptr as *mut u8,
                v.len() * 4,
            )
        };
        Ok(())
    }

    /// The first index's address (device or host, as imported).
    #[cfg(feature = "cuda")]
    pub(super) fn ptr(&self) -> u64 {
        self.0.ptr
    }

    #[cfg(feature = "cuda")]
    pub(super) fn device_view(&self, ordinal: usize) -> crate::pool::cuda::IndicesView {
        crate::pool::cuda::IndicesView {
            ptr: self.0.ptr,
            shape: self.0.layout.shape.clone(),
            device: ordinal,
        }
    }
}
