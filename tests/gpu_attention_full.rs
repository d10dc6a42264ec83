//! The CUDA forward and backward on everything beyond the plain dense case (GQA,
//! sliding windows, variable-length batches, every head dim, the backward) against the
//! CPU reference on the same rounded inputs. The reference itself is checked against
//! naive f64 and finite differences (tests/attention_variants.rs). Every test needs a
//! GPU: run with `cargo test --test gpu_attention_full -- --ignored`.
#![cfg(any(feature = "cuda", feature = "emulator"))]

mod common;

use common::{gpu_stream, round_to, Rng};
use flashkernels::attention::{self, AttentionOptions, SeqLens};
use flashkernels::{DType, DeviceTensor, HostTensor, Stream, Tensor};

/// (batch, nq, nk, heads, heads_kv, head_dim).
type Dims = (usize, usize, usize, usize, usize, usize);

/// One problem: dense (`seqlens: None`, batch from `dims.0`) or varlen.
#[derive(Debug, Clone)]
struct Case {
    /// For varlen, batch/nq/nk are unused.
    dims: Dims,
    seqlens: Option<SeqLens>,
    dtype: DType,
    opts: AttentionOptions,
}

fn dense(
    dims: (usize, usize, usize, usize, usize, usize),
    dtype: DType,
    opts: AttentionOptions,
) -> Case {
    Case {
        dims,
        seqlens: None,
        dtype,
        opts,
    }
}

fn varlen(
    lens: &[(i32, i32)],
    hq: usize,
    hkv: usize,
    d: usize,
    dtype: DType,
    opts: AttentionOptions,
) -> Case {
    let mut s = SeqLens {
        cu_seqlens_q: vec![0],
        cu_seqlens_k: vec![0],
    };
    for &(a, b) in lens {
        s.cu_seqlens_q.push(s.cu_seqlens_q.last().unwrap() + a);
        s.cu_seqlens_k.push(s.cu_seqlens_k.last().unwrap() + b);
    }
    Case {
        dims: (lens.len(), 0, 0, hq, hkv, d),
        seqlens: Some(s),
        dtype,
        opts,
    }
}

impl Case {
    fn shapes(&self) -> (Vec<usize>, Vec<usize>) {
        let (b, nq, nk, hq, hkv, d) = self.dims;
        match &self.seqlens {
            None => (vec![b, nq, hq, d], vec![b, nk, hkv, d]),
            Some(s) => (
                vec![*s.cu_seqlens_q.last().unwrap() as usize, hq, d],
                vec![*s.cu_seqlens_k.last().unwrap() as usize, hkv, d],
            ),
        }
    }
}

fn random(rng: &mut Rng, dtype: DType, shape: &[usize]) -> HostTensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| round_to(dtype, rng.normal())).collect();
    HostTensor::from_vec(v, shape).unwrap().to_contiguous(dtype)
}

fn fwd(c: &Case, q: &Tensor, k: &Tensor, v: &Tensor) -> attention::AttentionOutput<Tensor> {
    match &c.seqlens {
        None => attention::forward(&attention::Inputs::new(q, k, v), &c.opts),
        Some(s) => attention::forward(&attention::Inputs::new(q, k, v).varlen(s), &c.opts),
    }
    .unwrap_or_else(|e| panic!("{c:?}: forward: {e}"))
}

fn bwd(c: &Case, t: [&Tensor; 6]) -> attention::AttentionGradients<Tensor> {
    let [q, k, v, o, l, d] = t;
    match &c.seqlens {
        None => attention::backward(&attention::BackwardInputs::new([q, k, v, o, l, d]), &c.opts),
        Some(s) => attention::backward(
            &attention::BackwardInputs::new([q, k, v, o, l, d]).varlen(s),
            &c.opts,
        ),
    }
    .unwrap_or_else(|e| panic!("{c:?}: backward: {e}"))
}

fn assert_close(c: &Case, what: &str, got: &HostTensor, want: &HostTensor, tol: f64) {
    common::assert_close_to_reference(c, what, got, want, tol);
}

/// Forward and backward on the GPU against the CPU reference; returns the GPU gradients
/// (for the determinism test).
fn check(s: &Stream, c: &Case, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = Rng::new(seed);
    let (qs, ks) = c.shapes();
    let (q, k, v) = (
        random(&mut rng, c.dtype, &qs),
        random(&mut rng, c.dtype, &ks),
        random(&mut rng, c.dtype, &ks),
    );
    let dout = random(&mut rng, c.dtype, &qs);
    let host = |t: &HostTensor| Tensor::Host(t.clone());
    let up = |t: &HostTensor| Tensor::Cuda(DeviceTensor::from_host(s, t).unwrap());
    let ref_f = fwd(c, &host(&q), &host(&k), &host(&v));
    let gpu_f = fwd(c, &up(&q), &up(&k), &up(&v));
    let tol = common::out_tol(c.dtype);
    assert_close(
        c,
        "out",
        &gpu_f.out.to_host().unwrap(),
        &ref_f.out.to_host().unwrap(),
        tol,
    );
    assert_close(
        c,
        "lse",
        &gpu_f.lse.to_host().unwrap(),
        &ref_f.lse.to_host().unwrap(),
        1e-3,
    );
    // Backward from each side's own forward, as training does.
    let ref_g = bwd(
        c,
        [
            &host(&q),
            &host(&k),
            &host(&v),
            &ref_f.out,
            &ref_f.lse,
            &host(&dout),
        ],
    );
    let gpu_g = bwd(
        c,
        [
            &up(&q),
            &up(&k),
            &up(&v),
            &gpu_f.out,
            &gpu_f.lse,
            &up(&dout),
        ],
    );
    let mut grads = Vec::new();
    for (name, g, r) in [
        ("dq", &gpu_g.dq, &ref_g.dq),
        ("dk", &gpu_g.dk, &ref_g.dk),
        ("dv", &gpu_g.dv, &ref_g.dv),
    ] {
        let g = g.to_host().unwrap();
        assert_close(
            c,
            name,
            &g,
            &r.to_host().unwrap(),
            common::grad_tol(c.dtype),
        );
        grads.push(g.to_f32_vec());
    }
    grads
}

fn opts(causal: bool, left: Option<usize>, right: Option<usize>) -> AttentionOptions {
    AttentionOptions {
        causal,
        window_left: left,
        window_right: right,
        ..Default::default()
    }
}

/// One small case of every forward and backward kernel instantiation (head dims 64, 128
/// and 256, f16 and bf16) and path (GQA, causal, window, varlen): what `gpu_check.sh quick`
/// runs first and under compute-sanitizer.
#[test]
#[ignore = "needs a CUDA device"]
fn smoke() {
    let s = gpu_stream();
    for (i, c) in [
        dense((1, 77, 93, 4, 2, 64), DType::BF16, opts(true, None, None)),
        dense(
            (2, 65, 65, 2, 2, 128),
            DType::F16,
            opts(false, Some(16), Some(5)),
        ),
        dense((1, 40, 33, 1, 1, 256), DType::BF16, opts(false, None, None)),
        varlen(
            &[(17, 40), (1, 1), (130, 64)],
            2,
            1,
            96,
            DType::F16,
            opts(true, None, None),
        ),
    ]
    .iter()
    .enumerate()
    {
        check(&s, c, i as u64);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn every_head_dim() {
    let s = gpu_stream();
    for d in [8, 16, 40, 64, 72, 96, 128, 136, 160, 192, 224, 256] {
        for dtype in [DType::F16, DType::BF16] {
            for causal in [false, true] {
                check(
                    &s,
                    &dense((1, 77, 93, 2, 2, d), dtype, opts(causal, None, None)),
                    d as u64,
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn backward_dense_odd_lengths() {
    let s = gpu_stream();
    for (b, nq, nk) in [
        (1, 1, 1),
        (2, 17, 17),
        (1, 129, 65),
        (3, 64, 200),
        (1, 300, 299),
    ] {
        for d in [64, 128] {
            for causal in [false, true] {
                check(
                    &s,
                    &dense((b, nq, nk, 3, 3, d), DType::BF16, opts(causal, None, None)),
                    nq as u64,
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gqa_ratios() {
    let s = gpu_stream();
    for (hq, hkv) in [(2, 1), (3, 1), (4, 2), (6, 2), (8, 1), (8, 4), (16, 2)] {
        for causal in [false, true] {
            check(
                &s,
                &dense(
                    (2, 111, 150, hq, hkv, 64),
                    DType::F16,
                    opts(causal, None, None),
                ),
                hq as u64,
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn sliding_windows() {
    let s = gpu_stream();
    let windows = [
        (Some(0), Some(0)),
        (Some(3), Some(0)),
        (Some(16), Some(5)),
        (Some(64), Some(64)),
        (None, Some(7)),
        (Some(100), None),
        (Some(5000), Some(5000)), // wider than the sequence
    ];
    for (left, right) in windows {
        for causal in [false, true] {
            for (nq, nk) in [(300, 300), (200, 333)] {
                let c = dense(
                    (1, nq, nk, 2, 1, 128),
                    DType::BF16,
                    opts(causal, left, right),
                );
                check(&s, &c, nq as u64);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn varlen_batches() {
    let s = gpu_stream();
    let lens = [
        (0, 5),
        (1, 1),
        (17, 40),
        (130, 64),
        (64, 0),
        (3, 200),
        (256, 256),
    ];
    for d in [64, 96, 128] {
        for o in [
            opts(false, None, None),
            opts(true, None, None),
            opts(false, Some(8), Some(8)),
        ] {
            check(&s, &varlen(&lens, 4, 2, d, DType::F16, o), d as u64);
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn causal_rows_without_keys() {
    // Nq > Nk, bottom-right causal: the first Nq - Nk rows see nothing (O = 0,
    // LSE = -inf, dQ = 0).
    let s = gpu_stream();
    check(
        &s,
        &dense((1, 200, 50, 2, 2, 64), DType::BF16, opts(true, None, None)),
        5,
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn backward_is_deterministic() {
    let s = gpu_stream();
    for c in [
        dense(
            (2, 513, 513, 8, 2, 128),
            DType::BF16,
            opts(true, None, None),
        ),
        varlen(
            &[(300, 400), (77, 77)],
            4,
            1,
            64,
            DType::F16,
            opts(false, Some(50), Some(0)),
        ),
    ] {
        let first = check(&s, &c, 9);
        for _ in 0..3 {
            assert_eq!(
                check(&s, &c, 9),
                first,
                "{c:?}: gradients differ between runs"
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn larger_problems() {
    let s = gpu_stream();
    check(
        &s,
        &dense(
            (1, 2048, 2048, 4, 4, 128),
            DType::BF16,
            opts(true, None, None),
        ),
        1,
    );
    check(
        &s,
        &dense(
            (1, 4096, 4096, 2, 1, 64),
            DType::BF16,
            opts(false, Some(256), Some(0)),
        ),
        2,
    );
}
