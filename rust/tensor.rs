//! Tensor metadata and host tensors.
//!
//! A tensor is (storage, shape, strides in elements, dtype). Strides may be anything
//! as long as every element lies inside the storage; kernels additionally need a
//! unit-stride last dimension, checked where they are called.

use std::fmt;

use half::{bf16, f16};

use crate::error::{Error, Result};

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
    /// Row-major contiguous layout.
    pub fn contiguous(shape: &[usize]) -> Self {
        let mut strides = vec![1; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * shape[i + 1];
        }
        Layout {
            shape: shape.to_vec(),
            strides,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// One past the largest element offset (0 for an empty tensor): the storage it needs.
    pub fn span(&self) -> usize {
        if self.numel() == 0 {
            return 0;
        }
        1 + self
            .shape
            .iter()
            .zip(&self.strides)
            .map(|(&n, &s)| (n - 1) * s)
            .sum::<usize>()
    }

    /// Checks that the strides fit the shape and that `storage_len` elements hold them.
    pub fn check(&self, name: &'static str, storage_len: usize) -> Result<()> {
        if self.shape.len() != self.strides.len() {
            return Err(Error::InvalidArgument(format!(
                "{name}: shape {:?} and strides {:?} have different ranks",
                self.shape, self.strides
            )));
        }
        let span = self
            .shape
            .iter()
            .zip(&self.strides)
            .try_fold(1usize, |acc, (&n, &s)| {
                n.checked_sub(1).map_or(Some(acc), |m| {
                    m.checked_mul(s).and_then(|x| x.checked_add(acc))
                })
            });
        match span {
            Some(span) if self.numel() == 0 || span <= storage_len => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "{name}: shape {:?} with strides {:?} reaches past its storage of {storage_len} elements",
                self.shape, self.strides
            ))),
        }
    }

    /// Offset in elements of a multi-index.
    pub fn offset(&self, index: &[usize]) -> usize {
        index.iter().zip(&self.strides).map(|(i, s)| i * s).sum()
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
        Ok(match dtype {
            DType::F32 => HostData::F32(
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            DType::F16 => HostData::F16(
                b.chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            DType::BF16 => HostData::BF16(
                b.chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
        })
    }

    fn from_f32_iter(dtype: DType, it: impl Iterator<Item = f32>) -> Self {
        match dtype {
            DType::F32 => HostData::F32(it.collect()),
            DType::F16 => HostData::F16(it.map(f16::from_f32).collect()),
            DType::BF16 => HostData::BF16(it.map(bf16::from_f32).collect()),
        }
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
        Self::from_data(data.into(), Layout::contiguous(shape))
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
    pub fn from_fn(dtype: DType, shape: &[usize], f: impl FnMut(usize) -> f32) -> Result<Self> {
        let layout = Layout::contiguous(shape);
        let data = HostData::from_f32_iter(dtype, (0..layout.numel()).map(f));
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

    /// Element at a multi-index, widened to f32.
    pub fn get(&self, index: &[usize]) -> f32 {
        self.data.get_f32(self.layout.offset(index))
    }

    /// All elements in row-major logical order, widened to f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let n = self.numel();
        let mut out = Vec::with_capacity(n);
        let rank = self.layout.shape.len();
        let mut index = vec![0usize; rank];
        for _ in 0..n {
            out.push(self.get(&index));
            for d in (0..rank).rev() {
                index[d] += 1;
                if index[d] < self.layout.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        out
    }

    /// The same values, contiguous and converted to `dtype`.
    pub fn to_contiguous(&self, dtype: DType) -> HostTensor {
        let layout = Layout::contiguous(&self.layout.shape);
        let data = HostData::from_f32_iter(dtype, self.to_f32_vec().into_iter());
        HostTensor { data, layout }
    }

    /// The same storage seen with dimensions `a` and `b` swapped: a strided tensor, as
    /// torch's `transpose` gives (the storage is cloned, since host tensors own it).
    pub fn transpose(&self, a: usize, b: usize) -> HostTensor {
        let mut layout = self.layout.clone();
        layout.shape.swap(a, b);
        layout.strides.swap(a, b);
        HostTensor {
            data: self.data.clone(),
            layout,
        }
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
