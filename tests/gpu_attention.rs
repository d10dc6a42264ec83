//! The CUDA kernel against the CPU reference and the naive f64 definition. Every test
//! needs a GPU: they are ignored by default; run them with
//! `cargo test --test gpu_attention -- --ignored` on a machine with one. Without a GPU an
//! ignored run fails loudly instead of passing.
#![cfg(any(feature = "cuda", feature = "emulator"))]

mod common;

use common::{
    default_scale, gpu_stream, host_tensor, logical_values, max_rel_err, naive_row, out_tol,
    rel_l2, visible_keys, Dense4, Dist, Rng, Shape, Storage,
};
use flashkernels::attention::{self, AttentionOptions};
use flashkernels::{DType, DeviceTensor, Error, HostTensor, Stream, Tensor};

#[derive(Debug, Clone, Copy)]
struct Case {
    shape: Shape,
    dtype: DType,
    causal: bool,
    storage: Storage,
    scale: Option<f32>,
    seed: u64,
}

impl Case {
    fn new(b: usize, h: usize, nq: usize, nk: usize, d: usize, dtype: DType, causal: bool) -> Self {
        Case {
            shape: Shape {
                batch: b,
                heads: h,
                seqlen_q: nq,
                seqlen_k: nk,
                head_dim: d,
            },
            dtype,
            causal,
            storage: Storage::Contiguous,
            scale: None,
            seed: (b * 31 + h * 7 + nq * 131 + nk * 17 + d) as u64 ^ causal as u64,
        }
    }
}

struct Inputs {
    q: Dense4,
    k: Dense4,
    v: Dense4,
    hq: HostTensor,
    hk: HostTensor,
    hv: HostTensor,
}

fn inputs(c: &Case) -> Inputs {
    let mut rng = Rng::new(c.seed);
    let q = Dense4::random(&mut rng, c.shape.q_dims(), c.dtype, Dist::Normal);
    let k = Dense4::random(&mut rng, c.shape.kv_dims(), c.dtype, Dist::Normal);
    let v = Dense4::random(&mut rng, c.shape.kv_dims(), c.dtype, Dist::Normal);
    Inputs {
        hq: host_tensor(&q, c.dtype, c.storage),
        hk: host_tensor(&k, c.dtype, c.storage),
        hv: host_tensor(&v, c.dtype, c.storage),
        q,
        k,
        v,
    }
}

/// Runs the kernel through the generic `attention::forward`; returns O and LSE on the
/// host (values in logical order) after checking their metadata.
fn run_gpu(s: &Stream, c: &Case, x: &Inputs) -> (HostTensor, HostTensor) {
    let up = |t: &HostTensor| Tensor::Cuda(DeviceTensor::from_host(s, t).expect("upload"));
    let opts = AttentionOptions {
        scale: c.scale,
        causal: c.causal,
        ..Default::default()
    };
    let r = attention::forward(
        &attention::Inputs::new(&up(&x.hq), &up(&x.hk), &up(&x.hv)),
        &opts,
    )
    .expect("kernel launch");
    assert_eq!(r.out.device_name(), "cuda:0");
    let (o, lse) = (r.out.to_host().unwrap(), r.lse.to_host().unwrap());
    let Shape {
        batch: b,
        heads: h,
        seqlen_q: nq,
        head_dim: d,
        ..
    } = c.shape;
    assert_eq!(o.shape(), &[b, nq, h, d]);
    assert_eq!(o.dtype(), c.dtype);
    assert_eq!(lse.shape(), &[b, h, nq]);
    assert_eq!(lse.dtype(), DType::F32);
    (o, lse)
}

/// Query rows checked against the f64 definition: all of them for small problems, else
/// a sample with a stride prime to the kernel's 128-row blocks and 16-row warps, plus
/// the first and last rows.
fn checked_rows(c: &Case) -> Vec<usize> {
    let s = c.shape;
    let work = s.batch * s.heads * s.seqlen_q * s.seqlen_k * s.head_dim;
    let nq = s.seqlen_q;
    if work <= 40_000_000 {
        return (0..nq).collect();
    }
    let step = 37;
    let mut rows: Vec<usize> = (0..nq).step_by(step).collect();
    rows.extend((nq.saturating_sub(3))..nq);
    rows.extend(0..3.min(nq));
    rows.sort_unstable();
    rows.dedup();
    rows
}

/// Checks one case: every output element finite (or LSE exactly -inf on rows with no
/// key, where O must be exactly 0), O within relative L2 1e-2 and LSE within 1e-3 of the
/// f64 definition on the same rounded inputs, and O close to the CPU reference.
fn check_case(s: &Stream, c: Case) {
    let x = inputs(&c);
    let (o_t, lse_t) = run_gpu(s, &c, &x);
    let o = logical_values(&o_t);
    let lse = logical_values(&lse_t);
    let Shape {
        batch: b,
        heads: h,
        seqlen_q: nq,
        seqlen_k: nk,
        head_dim: d,
    } = c.shape;
    let scale = c.scale.map_or(default_scale(d), f64::from);

    // Every element written (outputs start as NaN) and rows with no key exactly 0/-inf.
    for bi in 0..b {
        for i in 0..nq {
            let empty = visible_keys(i, nq, nk, c.causal) == 0;
            for hi in 0..h {
                let row = &o[((bi * nq + i) * h + hi) * d..][..d];
                let l = lse[(bi * h + hi) * nq + i];
                if empty {
                    assert!(
                        row.iter().all(|&v| v == 0.0),
                        "{c:?}: row ({bi},{i},{hi}) has no visible key but O = {row:?}"
                    );
                    assert_eq!(
                        l,
                        f32::NEG_INFINITY,
                        "{c:?}: LSE of keyless row ({bi},{hi},{i})"
                    );
                } else {
                    assert!(
                        row.iter().all(|v| v.is_finite()),
                        "{c:?}: non-finite O in row ({bi},{i},{hi}): {row:?}"
                    );
                    assert!(l.is_finite(), "{c:?}: LSE ({bi},{hi},{i}) = {l}");
                }
            }
        }
    }

    // Against the f64 definition on the (sampled) rows.
    let rows = checked_rows(&c);
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for bi in 0..b {
        for hi in 0..h {
            for &i in &rows {
                let (row, l) = naive_row(&x.q, &x.k, &x.v, scale, c.causal, bi, hi, i);
                got.extend_from_slice(&o[((bi * nq + i) * h + hi) * d..][..d]);
                want.extend(row);
                let gl = lse[(bi * h + hi) * nq + i] as f64;
                if l.is_finite() {
                    let err = (gl - l).abs() / l.abs().max(1.0);
                    assert!(
                        err < 1e-3,
                        "{c:?}: LSE ({bi},{hi},{i}) = {gl}, expected {l}"
                    );
                } else {
                    assert_eq!(gl, l, "{c:?}: LSE ({bi},{hi},{i})");
                }
            }
        }
    }
    let err = rel_l2(&got, &want);
    assert!(err < 1e-2, "{c:?}: relative L2 error of O vs f64 = {err:e}");
    // And element-wise: one wrong element hides in an L2 norm over millions.
    let worst = max_rel_err(&got, &want);
    assert!(
        worst <= out_tol(c.dtype),
        "{c:?}: max error of O vs f64 = {worst:e} x max|O| > {:e}",
        out_tol(c.dtype)
    );

    // Against the crate's CPU reference (f32 accumulation, O rounded to the same dtype),
    // through the same `attention::forward` signature, when it is cheap enough.
    if b * h * nq * nk * d <= 200_000_000 {
        let opts = AttentionOptions {
            scale: c.scale,
            causal: c.causal,
            ..Default::default()
        };
        let r = attention::forward(
            &attention::Inputs::new(
                &Tensor::Host(x.hq.clone()),
                &Tensor::Host(x.hk.clone()),
                &Tensor::Host(x.hv.clone()),
            ),
            &opts,
        )
        .unwrap();
        let ref_o = logical_values(&r.out.to_host().unwrap());
        let ref_l = logical_values(&r.lse.to_host().unwrap());
        let ref_o64: Vec<f64> = ref_o.iter().map(|&v| v as f64).collect();
        let err_ref = rel_l2(&o, &ref_o64);
        assert!(
            err_ref < 1e-2,
            "{c:?}: relative L2 error of O vs CPU reference = {err_ref:e}"
        );
        let worst = max_rel_err(&o, &ref_o64);
        assert!(
            worst <= out_tol(c.dtype),
            "{c:?}: max error of O vs CPU reference = {worst:e} x max|O| > {:e}",
            out_tol(c.dtype)
        );
        for (j, (&a, &e)) in lse.iter().zip(&ref_l).enumerate() {
            assert!(
                a == e || (a - e).abs() <= 1e-3 * e.abs().max(1.0),
                "{c:?}: LSE[{j}] = {a}, CPU reference {e}"
            );
        }
    }
}

const DTYPES: [DType; 2] = [DType::BF16, DType::F16];

#[test]
#[ignore = "needs a CUDA device"]
fn odd_lengths() {
    let s = gpu_stream();
    let mut k = 0;
    for n in [1, 17, 63, 65, 127, 129, 255, 1000] {
        for causal in [false, true] {
            // Alternate dtype and head dim so every combination shows up across lengths.
            let dtype = DTYPES[k % 2];
            let d = if (k / 2) % 2 == 0 { 64 } else { 128 };
            k += 1;
            check_case(&s, Case::new(1, 2, n, n, d, dtype, causal));
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn all_dtype_head_dim_combinations() {
    let s = gpu_stream();
    for dtype in DTYPES {
        for d in [64, 128] {
            for causal in [false, true] {
                check_case(&s, Case::new(2, 3, 200, 200, d, dtype, causal));
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn seqlen_q_differs_from_seqlen_k() {
    let s = gpu_stream();
    let pairs = [
        (1, 300),
        (300, 1),
        (17, 129),
        (129, 17),
        (64, 1000),
        (1000, 64),
        (200, 65),
        (65, 200),
        (128, 256),
        (256, 128),
    ];
    for (i, &(nq, nk)) in pairs.iter().enumerate() {
        for causal in [false, true] {
            let dtype = DTYPES[i % 2];
            let d = if i % 4 < 2 { 64 } else { 128 };
            // Nq > Nk causal: the first Nq - Nk rows see no key (O = 0, LSE = -inf);
            // check_case verifies exactly that.
            check_case(&s, Case::new(1, 2, nq, nk, d, dtype, causal));
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn batch_and_heads() {
    let s = gpu_stream();
    for (i, &(b, h)) in [(1, 1), (3, 1), (1, 5), (2, 3), (4, 8)].iter().enumerate() {
        for causal in [false, true] {
            let dtype = DTYPES[i % 2];
            let d = if i % 2 == 0 { 128 } else { 64 };
            check_case(&s, Case::new(b, h, 130, 190, d, dtype, causal));
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn strided_heads_first_inputs() {
    let s = gpu_stream();
    let mut i = 0;
    for storage in [
        Storage::HeadsFirst,
        // Row stride 72 (bf16/f16: 144 bytes), still 16-byte aligned rows.
        Storage::HeadsFirstPadded { pad: 8 },
    ] {
        for d in [64, 128] {
            for causal in [false, true] {
                let mut c = Case::new(2, 3, 150, 97, d, DTYPES[i % 2], causal);
                c.storage = storage;
                i += 1;
                check_case(&s, c);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn explicit_scales() {
    let s = gpu_stream();
    for (i, scale) in [0.05f32, 0.3, 1.0].into_iter().enumerate() {
        for causal in [false, true] {
            let mut c = Case::new(1, 2, 100, 140, 64 * (1 + i % 2), DTYPES[i % 2], causal);
            c.scale = Some(scale);
            check_case(&s, c);
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn deterministic() {
    let s = gpu_stream();
    for (dtype, d, causal) in [(DType::BF16, 128, true), (DType::F16, 64, false)] {
        let c = Case::new(2, 4, 333, 517, d, dtype, causal);
        let x = inputs(&c);
        let (o1, l1) = run_gpu(&s, &c, &x);
        let (o2, l2) = run_gpu(&s, &c, &x);
        assert!(logical_values(&o1).iter().all(|v| v.is_finite()));
        assert_eq!(
            o1.data().as_bytes(),
            o2.data().as_bytes(),
            "{c:?}: O differs between runs"
        );
        assert_eq!(
            l1.data().as_bytes(),
            l2.data().as_bytes(),
            "{c:?}: LSE differs between runs"
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn large_causal() {
    let s = gpu_stream();
    check_case(&s, Case::new(2, 4, 2048, 2048, 128, DType::BF16, true));
    check_case(&s, Case::new(1, 4, 2048, 3000, 64, DType::F16, false));
}

#[test]
#[ignore = "needs a CUDA device"]
fn device_errors() {
    let s = gpu_stream();
    let host = HostTensor::from_fn(DType::BF16, &[1, 16, 2, 64], |i| (i as f32).sin()).unwrap();
    let dev = || Tensor::Cuda(DeviceTensor::from_host(&s, &host).unwrap());
    let opts = AttentionOptions::default();

    // Host and device tensors mixed.
    let e = attention::forward(
        &attention::Inputs::new(&dev(), &Tensor::Host(host.clone()), &dev()),
        &opts,
    )
    .unwrap_err();
    assert!(matches!(e, Error::DeviceMismatch { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("q on cuda:0") && msg.contains("k on cpu"),
        "{msg}"
    );

    // f32 on the device.
    let f = HostTensor::from_fn(DType::F32, &[1, 16, 2, 64], |i| (i as f32).cos()).unwrap();
    let df = || Tensor::Cuda(DeviceTensor::from_host(&s, &f).unwrap());
    let e = attention::forward(&attention::Inputs::new(&df(), &df(), &df()), &opts).unwrap_err();
    assert!(
        matches!(
            e,
            Error::UnsupportedDType {
                dtype: DType::F32,
                ..
            }
        ),
        "{e:?}"
    );

    // A head dim the kernels do not take (not a multiple of 8).
    let h100 = HostTensor::from_fn(DType::F16, &[1, 16, 2, 100], |i| (i as f32).cos()).unwrap();
    let d100 = || Tensor::Cuda(DeviceTensor::from_host(&s, &h100).unwrap());
    let e =
        attention::forward(&attention::Inputs::new(&d100(), &d100(), &d100()), &opts).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
    assert!(e.to_string().contains("head_dim 100"), "{e}");

    // After the rejected calls the stream still works.
    check_case(&s, Case::new(1, 2, 16, 16, 64, DType::BF16, false));
}
