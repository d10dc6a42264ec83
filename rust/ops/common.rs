//! Host-side helpers every op's validation and CPU path share.

use crate::error::{Error, Result};
use crate::tensor::{DType, HostTensor, Layout};
use crate::TensorRef;

/// Rank, stride count and non-emptiness of one input's layout; `layout` names the
/// logical dimensions for the error message.
pub(crate) fn check_layout(
    name: &'static str,
    l: &Layout,
    rank: usize,
    layout: &'static str,
) -> Result<()> {
    if l.shape.len() != rank {
        return Err(Error::Rank {
            name,
            expected: rank,
            layout,
            shape: l.shape.clone(),
        });
    }
    if l.strides.len() != rank {
        return Err(Error::InvalidArgument(format!(
            "{name}: shape {:?} has {} strides {:?}",
            l.shape,
            l.strides.len(),
            l.strides
        )));
    }
    if l.numel() == 0 {
        return Err(Error::Empty {
            name,
            shape: l.shape.clone(),
        });
    }
    Ok(())
}

/// [`check_layout`], plus the unit-stride last (head) dim that attention kernels and
/// references read rows through.
pub(crate) fn check_row_layout(
    name: &'static str,
    l: &Layout,
    rank: usize,
    layout: &'static str,
) -> Result<()> {
    check_layout(name, l, rank, layout)?;
    if l.strides[rank - 1] != 1 {
        return Err(Error::NonUnitStride {
            name,
            shape: l.shape.clone(),
            strides: l.strides.clone(),
        });
    }
    Ok(())
}

/// The error for an op's tensors split between the host and a device.
pub(crate) fn mixed_devices(ts: &[(&str, TensorRef<'_>)]) -> Error {
    let where_: Vec<String> = ts
        .iter()
        .map(|(n, t)| format!("{n} on {}", t.device_name()))
        .collect();
    Error::DeviceMismatch {
        detail: format!("{}: all must be on one device", where_.join(", ")),
    }
}

/// A host tensor's values as f32 (the attention references' input).
pub(crate) fn f32_data(t: &HostTensor) -> Vec<f32> {
    t.to_contiguous(DType::F32).to_f32_vec()
}

/// A host tensor's values as f64 (the conv and pool references' input).
pub(crate) fn f64_data(t: &HostTensor) -> Vec<f64> {
    t.to_f32_vec().into_iter().map(f64::from).collect()
}

/// An f64 reference result as a contiguous host tensor of `dtype`, rounded once.
pub(crate) fn host_out(v: Vec<f64>, shape: &[usize], dtype: DType) -> Result<HostTensor> {
    HostTensor::from_fn(dtype, shape, |i| v[i] as f32)
}
