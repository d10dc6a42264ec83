//! `flashkernels`: the main job. Runs dense attention forward and backward over a fixed
//! set of shapes, on the GPU when there is one (each case checked against the CPU
//! reference, then timed) and otherwise on the CPU reference. The first line says which.

use std::process::ExitCode;
use std::time::Instant;

use flashkernels::attention::{self, AttentionOptions, AttentionProblem};
use flashkernels::{DType, HostTensor, Result};

/// One attention case: batch, seqlen (q = k), heads, head dim, causal.
#[derive(Clone, Copy)]
struct Case {
    batch: usize,
    seqlen: usize,
    heads: usize,
    head_dim: usize,
    causal: bool,
}

#[cfg(feature = "cuda")]
const GPU_CASES: &[Case] = &[
    Case {
        batch: 1,
        seqlen: 1000,
        heads: 4,
        head_dim: 64,
        causal: false,
    },
    Case {
        batch: 2,
        seqlen: 1537,
        heads: 8,
        head_dim: 128,
        causal: true,
    },
    Case {
        batch: 8,
        seqlen: 2048,
        heads: 16,
        head_dim: 128,
        causal: false,
    },
    Case {
        batch: 2,
        seqlen: 8192,
        heads: 16,
        head_dim: 128,
        causal: false,
    },
    Case {
        batch: 2,
        seqlen: 8192,
        heads: 16,
        head_dim: 128,
        causal: true,
    },
    Case {
        batch: 2,
        seqlen: 8192,
        heads: 32,
        head_dim: 64,
        causal: false,
    },
];

const CPU_CASES: &[Case] = &[
    Case {
        batch: 1,
        seqlen: 128,
        heads: 2,
        head_dim: 64,
        causal: false,
    },
    Case {
        batch: 2,
        seqlen: 200,
        heads: 4,
        head_dim: 64,
        causal: true,
    },
    Case {
        batch: 1,
        seqlen: 256,
        heads: 2,
        head_dim: 128,
        causal: false,
    },
];

/// Deterministic pseudo-random values in [-1, 1) (xorshift), so runs are comparable.
fn random_tensor(dtype: DType, shape: &[usize], seed: u64) -> Result<HostTensor> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    HostTensor::from_fn(dtype, shape, |_| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    })
}

fn inputs(c: &Case, dtype: DType) -> Result<[HostTensor; 3]> {
    let shape = [c.batch, c.seqlen, c.heads, c.head_dim];
    Ok([
        random_tensor(dtype, &shape, 1)?,
        random_tensor(dtype, &shape, 2)?,
        random_tensor(dtype, &shape, 3)?,
    ])
}

fn problem(c: &Case, dtype: DType) -> AttentionProblem {
    AttentionProblem {
        batch: c.batch,
        heads: c.heads,
        heads_kv: c.heads,
        seqlen_q: c.seqlen,
        seqlen_k: c.seqlen,
        head_dim: c.head_dim,
        scale: 1.0 / (c.head_dim as f32).sqrt(),
        causal: c.causal,
        window_left: None,
        window_right: c.causal.then_some(0),
        dtype,
        seqlens: None,
    }
}

fn describe(c: &Case) -> String {
    format!(
        "B{} N{} H{} D{}{}",
        c.batch,
        c.seqlen,
        c.heads,
        c.head_dim,
        if c.causal { " causal" } else { "" }
    )
}

fn run_cpu(reason: &str) -> Result<()> {
    println!("flashkernels: running the CPU reference ({reason})");
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>10}",
        "case", "fwd ms", "GFLOP/s", "bwd ms", "GFLOP/s"
    );
    for c in CPU_CASES {
        let [q, k, v] = inputs(c, DType::BF16)?;
        let opts = AttentionOptions {
            scale: None,
            causal: c.causal,
            ..Default::default()
        };
        let t0 = Instant::now();
        let f = attention::forward_cpu(&q, &k, &v, &opts)?;
        let fwd = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        attention::backward_cpu(&q, &k, &v, &f.out, &f.lse, &q, &opts)?;
        let bwd = t0.elapsed().as_secs_f64();
        let flops = problem(c, DType::BF16).flops();
        println!(
            "{:<28} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
            describe(c),
            fwd * 1e3,
            flops / fwd / 1e9,
            bwd * 1e3,
            // The backward does 2.5x the forward's matmul work (FlashAttention's count).
            2.5 * flops / bwd / 1e9
        );
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn run_gpu(device: flashkernels::Device) -> Result<bool> {
    use flashkernels::{DeviceTensor, Tensor};

    let (major, minor) = device.compute_capability()?;
    println!(
        "flashkernels: running on the GPU: {} (cuda:{}, sm_{major}{minor}), bf16, checked against the CPU reference",
        device.name()?,
        device.ordinal()
    );
    let stream = device.default_stream();
    println!(
        "{:<28} {:>10} {:>10} {:>12} {:>10} {:>10} {:>12}",
        "case", "fwd ms", "TFLOP/s", "rel. error", "bwd ms", "TFLOP/s", "grad error"
    );
    let mut all_ok = true;
    for c in GPU_CASES {
        let dtype = DType::BF16;
        let [q, k, v] = inputs(c, dtype)?;
        let opts = AttentionOptions {
            scale: None,
            causal: c.causal,
            ..Default::default()
        };
        let dq = DeviceTensor::from_host(&stream, &q)?;
        let dk = DeviceTensor::from_host(&stream, &k)?;
        let dv = DeviceTensor::from_host(&stream, &v)?;
        let (tq, tk, tv) = (Tensor::Cuda(dq), Tensor::Cuda(dk), Tensor::Cuda(dv));
        let out = attention::forward(&tq, &tk, &tv, &opts)?;
        let gpu_o = out.out.to_host()?;

        let err = check_suffix_rows(c, &q, &k, &v, &gpu_o, &opts)?;
        let ok = err < 1e-2 && err.is_finite();
        all_ok &= ok;

        // Time launches into preallocated outputs; synchronize before reading the clock.
        let (Tensor::Cuda(dq), Tensor::Cuda(dk), Tensor::Cuda(dv)) = (&tq, &tk, &tv) else {
            unreachable!("constructed as device tensors above")
        };
        let (Tensor::Cuda(o), Tensor::Cuda(lse)) = (&out.out, &out.lse) else {
            unreachable!("device inputs give device outputs")
        };
        let launch = || {
            // SAFETY: every view comes from a live DeviceTensor of this device.
            unsafe {
                attention::cuda::forward_views(
                    &dq.view(),
                    &dk.view(),
                    &dv.view(),
                    &o.view(),
                    &lse.view(),
                    &opts,
                    stream.raw(),
                )
            }
        };
        for _ in 0..3 {
            launch()?;
        }
        stream.synchronize()?;
        let iters = 20;
        let t0 = Instant::now();
        for _ in 0..iters {
            launch()?;
        }
        stream.synchronize()?;
        let secs = t0.elapsed().as_secs_f64() / iters as f64;
        let flops = problem(c, dtype).flops();

        // Backward from the kernel's own O and LSE, with dO = Q (any non-zero tensor).
        let dout = Tensor::Cuda(DeviceTensor::from_host(&stream, &q)?);
        let backward = || attention::backward(&tq, &tk, &tv, &out.out, &out.lse, &dout, &opts);
        let grads = backward()?;
        // The CPU reference backward costs seconds per GFLOP: check the small cases only.
        let mut grads_ok = true;
        let grad_err = if c.batch * c.heads * c.seqlen * c.seqlen <= 8 << 20 {
            let f = attention::forward_cpu(&q, &k, &v, &opts)?;
            let r = attention::backward_cpu(&q, &k, &v, &f.out, &f.lse, &q, &opts)?;
            let e = [(&grads.dq, &r.dq), (&grads.dk, &r.dk), (&grads.dv, &r.dv)]
                .into_iter()
                .map(|(g, r)| Ok(rel_l2(&g.to_host()?.to_f32_vec(), &r.to_f32_vec())))
                .collect::<Result<Vec<f64>>>()?
                .into_iter()
                .fold(0f64, f64::max);
            grads_ok = e < 2e-2 && e.is_finite();
            Some(e)
        } else {
            None
        };
        for _ in 0..2 {
            backward()?;
        }
        stream.synchronize()?;
        let t0 = Instant::now();
        for _ in 0..iters / 2 {
            backward()?;
        }
        stream.synchronize()?;
        let bwd_secs = t0.elapsed().as_secs_f64() / (iters / 2) as f64;
        println!(
            "{:<28} {:>10.3} {:>10.1} {:>12.2e} {:>10.3} {:>10.1} {:>12}{}",
            describe(c),
            secs * 1e3,
            flops / secs / 1e12,
            err,
            bwd_secs * 1e3,
            // The backward does 2.5x the forward's matmul work (FlashAttention's count).
            2.5 * flops / bwd_secs / 1e12,
            grad_err.map_or("not checked".into(), |e| format!("{e:.2e}")),
            if ok && grads_ok { "" } else { "  MISMATCH" }
        );
        all_ok &= grads_ok;
    }
    Ok(all_ok)
}

/// ||got - want|| / ||want||.
#[cfg(feature = "cuda")]
fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        num += ((g - w) as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Relative L2 error of the GPU output against the CPU reference on the last (up to 128)
/// query rows of batch 0: a suffix keeps the bottom-right causal alignment, and keeps the
/// reference cheap at long sequence lengths.
#[cfg(feature = "cuda")]
fn check_suffix_rows(
    c: &Case,
    q: &HostTensor,
    k: &HostTensor,
    v: &HostTensor,
    gpu_o: &HostTensor,
    opts: &AttentionOptions,
) -> Result<f64> {
    let rows = c.seqlen.min(128);
    let first = c.seqlen - rows;
    let (h, d) = (c.heads, c.head_dim);
    let slice = |t: &HostTensor, from: usize, n: usize| -> Result<HostTensor> {
        HostTensor::from_fn(DType::F32, &[1, n, h, d], |i| {
            let (r, rest) = (i / (h * d), i % (h * d));
            t.get(&[0, from + r, rest / d, rest % d])
        })
    };
    let reference = attention::forward_cpu(
        &slice(q, first, rows)?,
        &slice(k, 0, c.seqlen)?,
        &slice(v, 0, c.seqlen)?,
        opts,
    )?;
    Ok(rel_l2(
        &slice(gpu_o, first, rows)?.to_f32_vec(),
        &reference.out.to_f32_vec(),
    ))
}

fn main() -> ExitCode {
    let result = (|| -> Result<bool> {
        #[cfg(feature = "cuda")]
        {
            match flashkernels::Device::new(0) {
                Ok(device) => return run_gpu(device),
                Err(e) => run_cpu(&format!("no GPU: {e}"))?,
            }
        }
        #[cfg(not(feature = "cuda"))]
        run_cpu("built without CUDA support")?;
        Ok(true)
    })();
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("flashkernels: the GPU output did not match the CPU reference");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("flashkernels: {e}");
            ExitCode::FAILURE
        }
    }
}
