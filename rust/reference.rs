//! CPU reference implementations, one per op (each lives beside its op in
//! `rust/ops/<op>/reference.rs`; this module gathers them under one name): plain loops
//! with the same semantics as the kernels, written for clarity, checked against
//! independent definitions (tests/: a naive f64 forward, finite differences for the
//! backward) and against independent oracles (python/tests/).

pub use crate::ops::attention::reference::{
    try_attention, try_attention_backward, Gradients, Real,
};
pub use crate::ops::conv::reference::{
    activate, activation_backward, activation_derivative, erf, try_conv2d, try_conv2d_backward,
    ConvForward, ConvGradients, ConvReal,
};
pub use crate::ops::ffn::reference::{
    ffn_activate, ffn_activation_derivative, round_to_dtype, try_ffn, try_ffn_backward, FfnForward,
    FfnRefGradients, FfnWeights,
};
pub use crate::ops::linformer::reference::{
    try_linformer, try_linformer_backward, LinformerForward, LinformerInputs, LinformerRefGradients,
};
pub use crate::ops::longformer::reference::{
    try_longformer, try_longformer_backward, LongformerGrads, LongformerInputs,
};
pub use crate::ops::pool::reference::{
    try_avg_pool2d, try_avg_pool2d_backward, try_max_pool2d, try_max_pool2d_backward,
};
pub use crate::ops::reformer::reference::{
    try_reformer, try_reformer_backward, try_reformer_hash, ReformerForward, ReformerInputs,
    ReformerRefGradients,
};
