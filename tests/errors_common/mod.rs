//! Helpers shared by the error-path tests of attention (tests/errors.rs and
//! tests/errors_device.rs).
#![allow(dead_code)]

use flashkernels::attention::{self, AttentionOptions};
use flashkernels::{DType, Error, HostTensor, Tensor};

pub fn opts() -> AttentionOptions {
    AttentionOptions::default()
}

pub fn t(shape: &[usize]) -> HostTensor {
    let n: usize = shape.iter().product();
    HostTensor::from_vec((0..n).map(|i| (i as f32 * 0.37).sin()).collect(), shape).unwrap()
}

pub fn t_dtype(dtype: DType, shape: &[usize]) -> HostTensor {
    HostTensor::from_fn(dtype, shape, |i| (i as f32 * 0.37).sin()).unwrap()
}

/// Runs the CPU path and the generic `forward` on host tensors; both must fail with the
/// same error, which is returned.
pub fn fail(q: &HostTensor, k: &HostTensor, v: &HostTensor, o: &AttentionOptions) -> Error {
    let e = attention::forward(&attention::Inputs::new(q, k, v), o)
        .expect_err("invalid inputs must be rejected");
    let e2 = attention::forward(
        &attention::Inputs::new(
            &Tensor::Host(q.clone()),
            &Tensor::Host(k.clone()),
            &Tensor::Host(v.clone()),
        ),
        o,
    )
    .expect_err("invalid inputs must be rejected");
    assert_eq!(e, e2, "forward on HostTensors and on Tensors disagree");
    e
}

pub fn assert_mentions(e: &Error, parts: &[&str]) {
    let msg = e.to_string();
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} does not mention {p:?}");
    }
}
