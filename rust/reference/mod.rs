//! CPU reference implementations, one per op: plain loops in f32 with the same
//! semantics as the kernels, written for clarity, checked against an f64 definition
//! (tests/) and against independent oracles (python/tests/).

mod attention;

pub use attention::attention;
