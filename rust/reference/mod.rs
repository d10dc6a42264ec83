//! CPU reference implementations, one per op: plain loops with the same semantics as
//! the kernels, written for clarity, checked against independent definitions (tests/:
//! a naive f64 forward, finite differences for the backward) and against independent
//! oracles (python/tests/).

mod attention;

pub use attention::{attention, attention_backward, Gradients, Real};
