//! Tensor metadata and host tensors.
//!
//! A tensor is (storage, shape, strides in elements, dtype). Strides may be anything
//! as long as every element lies inside the storage; kernels additionally need a
//! unit-stride last dimension, checked where they are called.

use std::fmt;

use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::ops::common::try_with_capacity;

/// Element types of tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Scalar types a tensor can hold.
pub trait Element: Copy + Send + Sync + 'static {
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// Shape and strides (in elements) of a tensor, independent of where it lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub shape: Vec<usize>,
    pub strides: Vec<usize>,
}

impl Layout {
    /// Row-major contiguous layout. Strides that would overflow `usize` saturate at
    /// `usize::MAX`, so such a layout never passes [`Layout::check`] (nothing wraps);
    /// [`Layout::try_contiguous`] reports the overflow up front, and every constructor
    /// of this crate uses it.
    pub fn contiguous(shape: &[usize]) -> Self {
        let mut strides = vec![1usize; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1].saturating_mul(shape[i + 1]);
        }
        Layout {
            shape: shape.to_vec(),
            strides,
        }
    }

    /// Row-major contiguous layout, or `Error::TooLarge` when its element count does not
    /// fit `usize` (then neither do its strides; an empty tensor's strides, which reach
    /// no element, saturate).
    pub fn try_contiguous(shape: &[usize]) -> Result<Self> {
        let l = Layout::contiguous(shape);
        if l.checked_numel().is_none() {
            return Err(too_many_elements(shape));
        }
        Ok(l)
    }

    /// Number of elements; saturates at `usize::MAX` when the product overflows (see
    /// [`Layout::checked_numel`]).
    pub fn numel(&self) -> usize {
        self.checked_numel().unwrap_or(usize::MAX)
    }

    /// Number of elements, `None` when the product overflows `usize`.
    pub fn checked_numel(&self) -> Option<usize> {
        if self.shape.contains(&0) {
            return Some(0);
        }
        self.shape.iter().try_fold(1usize, |a, &n| a.checked_mul(n))
    }

    /// One past the largest element offset (0 for an empty tensor): the storage it needs.
    /// Saturates at `usize::MAX` when that overflows (such a layout fails
    /// [`Layout::check`]).
    pub fn span(&self) -> usize {
        if self.numel() == 0 {
            return 0;
        }
        self.checked_span().unwrap_or(usize::MAX)
    }

    fn checked_span(&self) -> Option<usize> {
        self.shape
            .iter()
            .zip(&self.strides)
            .try_fold(1usize, |acc, (&n, &s)| {
                n.checked_sub(1).map_or(Some(acc), |m| {
                    m.checked_mul(s).and_then(|x| x.checked_add(acc))
                })
            })
    }

    /// Checks that the strides fit the shape and that `storage_len` elements hold them.
    pub fn check(&self, name: &'static str, storage_len: usize) -> Result<()> {
        if self.shape.len() != self.strides.len() {
            return Err(Error::InvalidArgument(format!(
                "{name}: shape {:?} and strides {:?} have different ranks",
                self.shape, self.strides
            )));
        }
        if self.checked_numel().is_none() {
            return Err(too_many_elements(&self.shape));
        }
        if self.numel() == 0 {
            // No element is reached, whatever the strides.
            return Ok(());
        }
        match self.checked_span() {
            Some(span) if span <= storage_len => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "{name}: shape {:?} with strides {:?} reaches past its storage of {storage_len} elements",
                self.shape, self.strides
            ))),
        }
    }

    /// Offset in elements of a multi-index; `None` when the index has the wrong rank or
    /// lies outside the shape (or the offset overflows, which a checked layout rules out).
    pub fn offset(&self, index: &[usize]) -> Option<usize> {
        if index.len() != self.shape.len() || self.strides.len() != self.shape.len() {
            return None;
        }
        index
            .iter()
            .zip(&self.shape)
            .zip(&self.strides)
            .try_fold(0usize, |acc, ((&i, &n), &s)| {
                if i >= n {
                    return None;
                }
                i.checked_mul(s)?.checked_add(acc)
            })
    }

    /// Calls `f` with the offset of every element, in row-major logical order. The
    /// layout must have passed [`Layout::check`] (so no offset overflows).
    pub(crate) fn for_each_offset(&self, mut f: impl FnMut(usize)) {
        let n = self.numel();
        let rank = self.shape.len();
        if n == 0 || rank == 0 {
            return;
        }
        let mut index = vec![0usize; rank];
        let mut off = 0usize;
        for _ in 0..n {
            f(off);
            for d in (0..rank).rev() {
                index[d] += 1;
                // Wrapping: a size-1 dimension may have any stride, and the offsets
                // that are used are in range, so modular arithmetic gives them exactly.
                off = off.wrapping_add(self.strides[d]);
                if index[d] < self.shape[d] {
                    break;
                }
                off = off.wrapping_sub(self.strides[d].wrapping_mul(self.shape[d]));
                index[d] = 0;
            }
        }
    }
}

fn too_many_elements(shape: &[usize]) -> Error {
    let value = shape
        .iter()
        .fold(1u128, |a, &n| a.saturating_mul(n as u128))
        .min(u64::MAX as u128) as u64;
    Error::TooLarge {
        what: format!("the element count of shape {shape:?}"),
        value,
        limit: usize::MAX as u64,
    }
}

/// Host storage of one of the supported dtypes.
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl HostData {
    pub fn dtype(&self) -> DType {
        match self {
            HostData::F32(_) => DType::F32,
            HostData::F16(_) => DType::F16,
            HostData::BF16(_) => DType::BF16,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len(),
            HostData::F16(v) => v.len(),
            HostData::BF16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get_f32(&self, i: usize) -> f32 {
        match self {
            HostData::F32(v) => v[i],
            HostData::F16(v) => v[i].to_f32(),
            HostData::BF16(v) => v[i].to_f32(),
        }
    }

    /// The raw bytes, for copies to a device.
    pub fn as_bytes(&self) -> &[u8] {
        fn bytes<T>(v: &[T]) -> &[u8] {
            // SAFETY: f32/f16/bf16 are plain old data with no padding.
            unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
        }
        match self {
            HostData::F32(v) => bytes(v),
            HostData::F16(v) => bytes(v),
            HostData::BF16(v) => bytes(v),
        }
    }

    /// Reinterprets little-endian bytes as `dtype` elements.
    pub fn from_bytes(dtype: DType, b: &[u8]) -> Result<Self> {
        if b.len() % dtype.size() != 0 {
            return Err(Error::InvalidArgument(format!(
                "{} bytes is not a whole number of {dtype} elements",
                b.len()
            )));
        }
        fn collect<T>(it: impl ExactSizeIterator<Item = T>) -> Result<Vec<T>> {
            let mut v = try_with_capacity(it.len(), "host tensor storage")?;
            v.extend(it);
            Ok(v)
        }
        Ok(match dtype {
            DType::F32 => HostData::F32(collect(
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            )?),
            DType::F16 => HostData::F16(collect(
                b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]])),
            )?),
            DType::BF16 => HostData::BF16(collect(
                b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]])),
            )?),
        })
    }

    /// `len` values of `it`, rounded to `dtype`, in a buffer allocated fallibly.
    fn try_from_f32_iter(
        dtype: DType,
        len: usize,
        it: impl Iterator<Item = f32>,
        what: &str,
    ) -> Result<Self> {
        fn fill<T>(len: usize, it: impl Iterator<Item = T>, what: &str) -> Result<Vec<T>> {
            let mut v = try_with_capacity(len, what)?;
            v.extend(it.take(len));
            Ok(v)
        }
        Ok(match dtype {
            DType::F32 => HostData::F32(fill(len, it, what)?),
            DType::F16 => HostData::F16(fill(len, it.map(f16::from_f32), what)?),
            DType::BF16 => HostData::BF16(fill(len, it.map(bf16::from_f32), what)?),
        })
    }
}

/// A tensor in host memory.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    data: HostData,
    layout: Layout,
}

impl HostTensor {
    /// A contiguous tensor over `data`.
    pub fn from_vec<T: Element>(data: Vec<T>, shape: &[usize]) -> Result<Self>
    where
        HostData: From<Vec<T>>,
    {
        Self::from_data(data.into(), Layout::try_contiguous(shape)?)
    }

    /// A tensor over `data` with explicit strides (in elements).
    pub fn from_data(data: HostData, layout: Layout) -> Result<Self> {
        if layout.shape.is_empty() {
            return Err(Error::InvalidArgument(
                "a tensor needs at least one dimension".into(),
            ));
        }
        layout.check("tensor", data.len())?;
        Ok(HostTensor { data, layout })
    }

    /// A contiguous tensor whose element at flat index i is f(i), rounded to `dtype`.
    /// A shape whose element count overflows is `Error::TooLarge`; one whose storage
    /// cannot be allocated is `Error::OutOfMemory` (nothing aborts).
    pub fn from_fn(dtype: DType, shape: &[usize], f: impl FnMut(usize) -> f32) -> Result<Self> {
        let layout = Layout::try_contiguous(shape)?;
        if layout.shape.is_empty() {
            return Err(Error::InvalidArgument(
                "a tensor needs at least one dimension".into(),
            ));
        }
        let n = layout.numel();
        let data = HostData::try_from_f32_iter(dtype, n, (0..n).map(f), "a host tensor")?;
        Self::from_data(data, layout)
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
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
        (self.dtype(), &self.layout)
    }

    pub fn data(&self) -> &HostData {
        &self.data
    }

    pub fn numel(&self) -> usize {
        self.layout.numel()
    }

    /// Element at a multi-index, widened to f32; an index of the wrong rank or outside
    /// the shape is an error (never another element).
    pub fn get(&self, index: &[usize]) -> Result<f32> {
        match self.layout.offset(index) {
            Some(off) => Ok(self.data.get_f32(off)),
            None => Err(Error::InvalidArgument(format!(
                "index {index:?} is outside a tensor of shape {:?}",
                self.layout.shape
            ))),
        }
    }

    /// All elements in row-major logical order, widened to f32 (panics if the copy
    /// cannot be allocated; see [`HostTensor::try_to_f32_vec`]).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        self.try_to_f32_vec().unwrap_or_else(|e| panic!("{e}"))
    }

    /// All elements in row-major logical order, widened to f32, read element by element
    /// through the strides (O(numel), whatever the storage's size);
    /// `Error::OutOfMemory` when the copy cannot be allocated.
    pub fn try_to_f32_vec(&self) -> Result<Vec<f32>> {
        let mut out = try_with_capacity(self.numel(), "an f32 copy of a host tensor")?;
        self.layout
            .for_each_offset(|off| out.push(self.data.get_f32(off)));
        Ok(out)
    }

    /// The same values, contiguous and converted to `dtype` (panics if the copy cannot
    /// be allocated; see [`HostTensor::try_to_contiguous`]).
    pub fn to_contiguous(&self, dtype: DType) -> HostTensor {
        self.try_to_contiguous(dtype)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The same values, contiguous and converted to `dtype`; `Error::OutOfMemory` when
    /// the copy cannot be allocated.
    pub fn try_to_contiguous(&self, dtype: DType) -> Result<HostTensor> {
        fn convert<T>(t: &HostTensor, f: impl Fn(f32) -> T) -> Result<Vec<T>> {
            let mut v = try_with_capacity(t.numel(), "a contiguous copy of a host tensor")?;
            t.layout.for_each_offset(|o| v.push(f(t.data.get_f32(o))));
            Ok(v)
        }
        let layout = Layout::try_contiguous(&self.layout.shape)?;
        let data = match dtype {
            DType::F32 => HostData::F32(convert(self, |x| x)?),
            DType::F16 => HostData::F16(convert(self, f16::from_f32)?),
            DType::BF16 => HostData::BF16(convert(self, bf16::from_f32)?),
        };
        Ok(HostTensor { data, layout })
    }

    /// The same storage seen with dimensions `a` and `b` swapped: a strided tensor, as
    /// torch's `transpose` gives (the storage is cloned, since host tensors own it). A
    /// dimension outside the rank is an error.
    pub fn transpose(&self, a: usize, b: usize) -> Result<HostTensor> {
        let rank = self.layout.shape.len();
        if a >= rank || b >= rank {
            return Err(Error::InvalidArgument(format!(
                "transpose({a}, {b}) of a rank-{rank} tensor"
            )));
        }
        let mut layout = self.layout.clone();
        layout.shape.swap(a, b);
        layout.strides.swap(a, b);
        Ok(HostTensor {
            data: self.data.clone(),
            layout,
        })
    }
}

impl From<Vec<f32>> for HostData {
    fn from(v: Vec<f32>) -> Self {
        HostData::F32(v)
    }
}
impl From<Vec<f16>> for HostData {
    fn from(v: Vec<f16>) -> Self {
        HostData::F16(v)
    }
}
impl From<Vec<bf16>> for HostData {
    fn from(v: Vec<bf16>) -> Self {
        HostData::BF16(v)
    }
}
