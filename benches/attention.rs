//! Criterion benches of dense attention forward.
//!
//! - `attention_cpu`: the CPU reference at small sizes.
//! - `attention_gpu`: the CUDA kernel (bf16) at B*N = 16384 tokens and H*D = 2048, for
//!   D in {64, 128}, N in 512..8192, causal and not; skipped with a note when no GPU.
//!
//! Throughput is reported as `elements` = FLOPs of `AttentionProblem::flops()` (4 B H Nq
//! Nk D, halved when causal), so criterion's "Gelem/s" reads as GFLOP/s (criterion has
//! no larger prefix: 250000 Gelem/s is 250 TFLOP/s). GPU timings are taken with
//! `iter_custom`: a stream synchronize, a batch of launches, a synchronize; Q, K, V, O
//! and LSE are allocated once, so only the kernel is timed.
//!
//! Run: `cargo bench --bench attention` (add `-- --quick` for a fast pass, or a filter
//! such as `-- attention_gpu/d128`).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use flashkernels::attention::{self, AttentionOptions, AttentionProblem};
use flashkernels::{DType, HostTensor, Layout};

#[path = "../tests/common/mod.rs"]
mod common;

fn problem(b: usize, h: usize, n: usize, d: usize, causal: bool, dtype: DType) -> AttentionProblem {
    let l = Layout::contiguous(&[b, n, h, d]);
    attention::validate(
        (dtype, &l),
        (dtype, &l),
        (dtype, &l),
        &AttentionOptions {
            scale: None,
            causal,
            ..Default::default()
        },
    )
    .expect("valid bench problem")
}

fn label(causal: bool) -> &'static str {
    if causal {
        "causal"
    } else {
        "full"
    }
}

fn bench_cpu(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention_cpu");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let (b, h, d) = (1, 2, 64);
    let mut rng = common::Rng::new(42);
    for n in [128, 256] {
        let shape = [b, n, h, d];
        let mut rand = || {
            let v = common::random_values(&mut rng, b * n * h * d, common::Dist::Normal);
            HostTensor::from_vec(v, &shape).unwrap()
        };
        let (q, k, v) = (rand(), rand(), rand());
        for causal in [false, true] {
            let p = problem(b, h, n, d, causal, DType::F32);
            let opts = AttentionOptions {
                scale: None,
                causal,
                ..Default::default()
            };
            g.throughput(Throughput::Elements(p.flops() as u64));
            g.bench_function(
                BenchmarkId::new(format!("b{b}_h{h}_d{d}_{}", label(causal)), n),
                |bench| {
                    bench.iter(|| {
                        black_box(
                            attention::forward(&attention::Inputs::new(&q, &k, &v), &opts).unwrap(),
                        );
                    })
                },
            );
        }
    }
    g.finish();
}

#[cfg(any(feature = "cuda", feature = "emulator"))]
fn bench_gpu(c: &mut Criterion) {
    use flashkernels::attention::cuda::forward_views;
    use flashkernels::{Device, DeviceTensor, DeviceView};
    use std::time::Instant;

    if !flashkernels::cuda_available() {
        eprintln!(
            "attention_gpu: skipped, no CUDA device ({:?})",
            flashkernels::device::device_count()
        );
        return;
    }
    const TOKENS: usize = 16_384; // B * N
    const WIDTH: usize = 2_048; // H * D
    let dev = Device::new(0).expect("cuda:0");
    let stream = dev.new_stream().expect("stream");
    eprintln!(
        "attention_gpu on {} (sm_{}{})",
        dev.name().unwrap_or_default(),
        dev.compute_capability().map_or(0, |c| c.0),
        dev.compute_capability().map_or(0, |c| c.1)
    );

    // Every configuration has the same element counts (B N H D = 16384 * 2048), so one
    // upload of Q, K, V and one O / LSE allocation serve them all, seen through
    // per-configuration layouts. Outputs are allocated once: the timing is the kernel's.
    let mut rng = common::Rng::new(7);
    let mut upload = || {
        let v = common::random_values(&mut rng, TOKENS * WIDTH, common::Dist::Normal);
        let t = HostTensor::from_fn(DType::BF16, &[TOKENS * WIDTH], |i| v[i]).unwrap();
        DeviceTensor::from_host(&stream, &t).expect("upload")
    };
    let (q, k, v) = (upload(), upload(), upload());
    let o = DeviceTensor::poisoned(&stream, DType::BF16, &[TOKENS * WIDTH]).expect("alloc O");
    let lse =
        DeviceTensor::poisoned(&stream, DType::F32, &[TOKENS * (WIDTH / 64)]).expect("alloc LSE");
    let view = |t: &DeviceTensor, shape: &[usize]| DeviceView {
        layout: Layout::contiguous(shape),
        ..t.view()
    };

    let mut g = c.benchmark_group("attention_gpu");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for d in [64, 128] {
        let h = WIDTH / d;
        for n in [512, 1024, 2048, 4096, 8192] {
            let b = TOKENS / n;
            for causal in [false, true] {
                let p = problem(b, h, n, d, causal, DType::BF16);
                let opts = AttentionOptions {
                    scale: None,
                    causal,
                    ..Default::default()
                };
                let qkv_shape = [b, n, h, d];
                let (vq, vk, vv) = (
                    view(&q, &qkv_shape),
                    view(&k, &qkv_shape),
                    view(&v, &qkv_shape),
                );
                let vo = view(&o, &qkv_shape);
                let vl = view(&lse, &[b, h, n]);
                // SAFETY: the views lie inside live allocations of the right sizes (same
                // element counts; LSE is allocated for the largest H), outputs do not
                // overlap inputs, and the stream belongs to the views' device.
                let launch = || unsafe {
                    forward_views(&vq, &vk, &vv, &vo, &vl, &opts, stream.raw()).expect("launch")
                };
                // One checked run first: a configuration that fails must not be timed.
                launch();
                stream.synchronize().expect("kernel");
                g.throughput(Throughput::Elements(p.flops() as u64));
                g.bench_function(
                    BenchmarkId::new(format!("d{d}_{}", label(causal)), format!("b{b}_h{h}_n{n}")),
                    |bench| {
                        bench.iter_custom(|iters| {
                            stream.synchronize().unwrap();
                            let start = Instant::now();
                            for _ in 0..iters {
                                launch();
                            }
                            stream.synchronize().unwrap();
                            start.elapsed()
                        })
                    },
                );
            }
        }
    }
    g.finish();
    // The last configuration wrote every element of O (B N H D = all of it).
    let out = o.to_host().expect("O");
    assert!(
        common::logical_values(&out).iter().all(|x| x.is_finite()),
        "the kernel left non-finite values in O"
    );
}

#[cfg(not(any(feature = "cuda", feature = "emulator")))]
fn bench_gpu(_: &mut Criterion) {
    eprintln!("attention_gpu: skipped, built without the `cuda` feature");
}

criterion_group!(benches, bench_cpu, bench_gpu);
criterion_main!(benches);
