//! Helpers of the reproducer tests (tests/fuzz_reproducers*.rs): tiny inputs, broadcast
//! views, and a guard that fails on a panic or a slow call.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use flashkernels::{DType, HostData, HostTensor, Layout};

/// Runs `f`, failing the test on a panic or when it takes longer than `limit`.
pub fn quick<R>(what: &str, limit: Duration, f: impl FnOnce() -> R) -> R {
    let start = Instant::now();
    let r = catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| panic!("{what}: panicked"));
    assert!(
        start.elapsed() < limit,
        "{what}: took {:?} (limit {limit:?})",
        start.elapsed()
    );
    r
}

pub fn filled(shape: &[usize], f: impl Fn(usize) -> f32) -> HostTensor {
    HostTensor::from_fn(DType::F32, shape, f).unwrap()
}

pub fn values(t: &HostTensor) -> Vec<f32> {
    t.to_f32_vec()
}

/// A tensor of `shape` over a single stored element (every stride 0): a broadcast view,
/// as numpy's `broadcast_to` gives, whose logical size can be anything.
pub fn broadcast(shape: &[usize]) -> HostTensor {
    let layout = Layout {
        shape: shape.to_vec(),
        strides: vec![0; shape.len()],
    };
    HostTensor::from_data(HostData::F32(vec![0.5]), layout).unwrap()
}

/// Like [`broadcast`], but over one stored row: the last dimension has unit stride, as
/// attention needs.
pub fn broadcast_rows(shape: &[usize]) -> HostTensor {
    let mut strides = vec![0; shape.len()];
    strides[shape.len() - 1] = 1;
    let row = shape[shape.len() - 1];
    let layout = Layout {
        shape: shape.to_vec(),
        strides,
    };
    HostTensor::from_data(HostData::F32(vec![0.5; row]), layout).unwrap()
}

pub fn conv_x() -> HostTensor {
    filled(&[1, 2, 5, 5], |i| (i % 7) as f32 - 3.0)
}

pub fn conv_w() -> HostTensor {
    filled(&[3, 2, 3, 3], |i| (i % 5) as f32 / 5.0 - 0.4)
}

pub fn pool_x(h: usize, w: usize) -> HostTensor {
    filled(&[1, 2, h, w], |i| ((i * 7) % 11) as f32 - 5.0)
}
