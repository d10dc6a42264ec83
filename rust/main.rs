//! `flashkernels`: the main job. Runs every op — dense attention, Longformer attention,
//! Linformer attention, Reformer LSH attention, conv2d, max/avg pooling, the fused
//! feed-forward block (FFN) — forward and backward over a fixed set of shapes: on the GPU
//! when there is one (each result checked against the CPU reference on a cheap slice,
//! then timed), otherwise the CPU reference itself on small shapes (timed). The first
//! line says which; then one table row per (op, case, direction), or with `--json` one
//! JSON document. Exits non-zero when a GPU result mismatches or an op fails.

use std::process::ExitCode;

use clap::{Parser, ValueEnum};

#[path = "main/attention.rs"]
mod attention;
#[path = "main/bench.rs"]
mod bench;
#[path = "main/conv.rs"]
mod conv;
#[path = "main/ffn.rs"]
mod ffn;
#[path = "main/linformer.rs"]
mod linformer;
#[path = "main/longformer.rs"]
mod longformer;
#[path = "main/pool.rs"]
mod pool;
#[path = "main/reformer.rs"]
mod reformer;
#[path = "main/report.rs"]
mod report;

use bench::Backend;
use report::Report;

/// Runs every flashkernels op forward and backward, timed; on a GPU each result is
/// checked against the CPU reference.
#[derive(Parser)]
#[command(name = "flashkernels", version)]
struct Args {
    /// Print one JSON document (device and rows) instead of the table.
    #[arg(long)]
    json: bool,
    /// Run only this op family; repeat for several (default: all).
    #[arg(long = "op", value_enum, value_name = "NAME")]
    ops: Vec<Family>,
    /// On a GPU, run the small shapes of the CPU run instead of the full-size ones.
    #[arg(long)]
    quick: bool,
    /// Run the CPU reference even when a GPU is present.
    #[arg(long)]
    cpu: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Family {
    /// Dense attention (incl. GQA, sliding window, varlen).
    Attention,
    /// Longformer attention (window + global tokens).
    Longformer,
    /// Linformer attention (keys and values projected along the sequence).
    Linformer,
    /// conv2d (implicit GEMM on NHWC, im2col on NCHW).
    Conv,
    /// max_pool2d and avg_pool2d.
    Pool,
    /// The fused feed-forward block (GELU, SwiGLU).
    Ffn,
    /// Reformer LSH attention (hashing, sort, chunked attention).
    Reformer,
}

impl Family {
    /// The family's runner: its cases (full-size or small) as rows of the report.
    fn runner(self) -> fn(&Backend, bool, &mut Report) {
        match self {
            Family::Attention => attention::run,
            Family::Longformer => longformer::run,
            Family::Linformer => linformer::run,
            Family::Conv => conv::run,
            Family::Pool => pool::run,
            Family::Ffn => ffn::run,
            Family::Reformer => reformer::run,
        }
    }
}

/// The GPU (device 0) and its description, or why there is none.
#[cfg(any(feature = "cuda", feature = "emulator"))]
fn open_gpu() -> Result<(Backend, String), String> {
    let device = flashkernels::Device::new(0).map_err(|e| format!("no GPU: {e}"))?;
    let describe = || -> flashkernels::Result<String> {
        let (major, minor) = device.compute_capability()?;
        Ok(format!(
            "GPU {} (cuda:{}, sm_{major}{minor}), bf16, every result checked against the CPU \
             reference",
            device.name()?,
            device.ordinal()
        ))
    };
    let description = describe().map_err(|e| format!("GPU unusable: {e}"))?;
    Ok((Backend::Gpu(device.default_stream()), description))
}

#[cfg(not(any(feature = "cuda", feature = "emulator")))]
fn open_gpu() -> Result<(Backend, String), String> {
    Err("built without CUDA support".into())
}

/// Where the ops run, and the device line that says so.
fn open(force_cpu: bool) -> (Backend, String) {
    let reason = if force_cpu {
        "--cpu".to_string()
    } else {
        match open_gpu() {
            Ok(gpu) => return gpu,
            Err(reason) => reason,
        }
    };
    (
        Backend::Cpu { check: false },
        format!("CPU reference ({reason})"),
    )
}

/// Runs the chosen families (all when `ops` is empty) into `report`.
fn run(dev: &Backend, ops: &[Family], full: bool, report: &mut Report) {
    for family in Family::value_variants() {
        if ops.is_empty() || ops.contains(family) {
            family.runner()(dev, full, report);
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (dev, device) = open(args.cpu);
    let full = dev.is_gpu() && !args.quick;
    let mut report = Report::new(device, dev.is_gpu(), args.json);
    run(&dev, &args.ops, full, &mut report);
    if args.json {
        println!("{}", report.json());
    }
    match report.failures() {
        0 => ExitCode::SUCCESS,
        n => {
            eprintln!(
                "flashkernels: {n} row(s) mismatched the CPU reference or failed (see status)"
            );
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GPU checks' slicing, run on the CPU: the reference compared with itself on
    /// the same slices must agree to bf16 rounding, in every family.
    #[test]
    fn checks_agree_on_the_cpu_reference() {
        let dev = Backend::Cpu { check: true };
        let mut report = Report::new("CPU reference (self-check)".into(), false, false);
        run(&dev, &[], false, &mut report);
        assert_eq!(report.failures(), 0, "{}", report.json());
    }
}
