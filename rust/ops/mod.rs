//! Every op, one folder each, with the same parts:
//!
//! - `mod.rs`: options, outputs, the public entries (one per direction, taking host or
//!   device [`crate::Tensor`]s, plus `*_cpu` on host tensors) that validate once and
//!   dispatch on where the data lives;
//! - `problem.rs` (or the top of `mod.rs`): the problem type and its validator, pure
//!   Rust, which turns shapes, dtypes and options into checked sizes;
//! - `cuda.rs` (features `cuda` / `emulator`): the kernel's own limits, the plan of
//!   the launch (C params from a checked problem) and the launch on a stream;
//! - `reference.rs`: the CPU reference the tests hold the kernels to.
//!
//! What more than one op needs lives here once: [`common`] (host-side validation and
//! tensor helpers) and [`glue`] (the CUDA glue: stream ordering, borrowed streams,
//! output checks, dtype mapping, workspaces).

pub mod attention;
pub(crate) mod common;
pub mod conv;
pub mod ffn;
#[cfg(any(feature = "cuda", feature = "emulator"))]
pub(crate) mod glue;
pub mod linformer;
pub mod longformer;
pub mod pool;
pub mod reformer;

pub use common::{
    scale_to_f32, with_interrupt_check, with_interrupt_check_every, DEFAULT_INTERRUPT_INTERVAL,
};
