//! CPU reference implementations, one per op: plain loops with the same semantics as
//! the kernels, written for clarity, checked against independent definitions (tests/:
//! a naive f64 forward, finite differences for the backward) and against independent
//! oracles (python/tests/).

mod attention;
mod conv;
mod longformer;

pub use attention::{attention, attention_backward, Gradients, Real};
pub use conv::{
    activate, activation_backward, activation_derivative, avg_pool2d, avg_pool2d_backward, conv2d,
    conv2d_backward, erf, max_pool2d, max_pool2d_backward, ConvForward, ConvGradients, ConvReal,
};
pub use longformer::{longformer, longformer_backward, LongformerGrads, LongformerInputs};
