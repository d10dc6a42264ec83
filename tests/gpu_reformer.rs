//! Reformer LSH attention's forward on a CUDA device (or the emulated one): hashing, the
//! sort, chunked attention, the round combination and the unsort, against the CPU
//! reference on the same inputs (buckets exactly, O within the dtype's bound, the
//! per-round LSE to 1e-3 relative). Needs a device: run with `--ignored`
//! (scripts/gpu_check.sh, or scripts/emulate_rust_path.sh on the emulated device).

#![cfg(any(feature = "cuda", feature = "emulator"))]

mod common;
mod reformer_common;

use common::{assert_close_to_reference, gpu_stream, grad_tol, out_tol};
use flashkernels::reformer::{self, Buckets, Inputs};
use flashkernels::{DType, DeviceTensor, Error, HostTensor, Stream, Tensor};
use reformer_common::{inputs, Case};

/// (b, n, h, d), (n_hashes, n_buckets, c), (before, after), causal, padded.
type Shape = (
    (usize, usize, usize, usize),
    (usize, usize, usize),
    (usize, usize),
    bool,
    bool,
);

fn dev(s: &Stream, t: &HostTensor) -> Tensor {
    Tensor::Cuda(DeviceTensor::from_host(s, t).unwrap())
}

/// The device forward of one case against the CPU reference; then the device's own
/// buckets passed back give bitwise the same O.
fn check(s: &Stream, seed: u64, dtype: DType, shape: Shape) {
    let (dims, hash, chunks, causal, pad) = shape;
    let c = Case::random(seed, dtype, dims, hash, chunks, causal, pad);
    let t = c.tensors();
    let mask = c.mask();
    let want = reformer::forward(&inputs(&t, mask.as_ref(), None), &c.opts()).unwrap();
    let d = [&t[0], &t[1], &t[2]].map(|t| dev(s, t));
    let di = Inputs::new(&d[0], &d[1], &d[2]).key_padding_mask(mask.as_ref());
    let got = reformer::forward(&di, &c.opts()).expect("device forward");
    let case = format!("{dtype:?} {shape:?}");
    assert_eq!(got.buckets, want.buckets, "{case}: buckets");
    let out = got.out.to_host().unwrap();
    assert_close_to_reference(&case, "out", &out, &want.out, out_tol(dtype));
    let (gl, wl) = (got.lse.to_host().unwrap(), want.lse.to_f32_vec());
    assert_eq!(gl.shape(), want.lse.shape(), "{case}: lse shape");
    for (i, (&a, &b)) in gl.to_f32_vec().iter().zip(&wl).enumerate() {
        let (a, b) = (a as f64, b as f64);
        assert!(
            (a - b).abs() <= 1e-3 * (1.0 + b.abs()),
            "{case}: lse[{i}] = {a}, expected {b}"
        );
    }
    if let Some(b) = &got.buckets {
        let again = reformer::forward(&di.buckets(Some(b)), &c.opts()).unwrap();
        assert_eq!(
            again.out.to_host().unwrap(),
            out,
            "{case}: given buckets reproduce O"
        );
    }
    // The backward from the reference's forward outputs on both sides (buckets fixed: the
    // reference's), so a mismatch is the backward's own.
    let dout = reformer_common::tensor(
        dtype,
        &c.v.iter().map(|x| 0.5 - x).collect::<Vec<_>>(),
        &[c.b, c.n, c.h, c.d],
    );
    let hi = inputs(&t, mask.as_ref(), want.buckets.as_ref());
    let gw = reformer::backward(&hi.backward(&want.out, &want.lse, &dout), &c.opts()).unwrap();
    let up = [&want.out, &want.lse, &dout].map(|t| dev(s, t));
    let db = Inputs::new(&d[0], &d[1], &d[2])
        .key_padding_mask(mask.as_ref())
        .buckets(want.buckets.as_ref());
    let gg = reformer::backward(&db.backward(&up[0], &up[1], &up[2]), &c.opts())
        .expect("device backward");
    let tol = grad_tol(dtype);
    assert_close_to_reference(&case, "dqk", &gg.dqk.to_host().unwrap(), &gw.dqk, tol);
    assert_close_to_reference(&case, "dv", &gg.dv.to_host().unwrap(), &gw.dv, tol);
    // Without buckets the device backward hashes through its forward: the same gradients.
    let gh = reformer::backward(&di.backward(&up[0], &up[1], &up[2]), &c.opts()).unwrap();
    assert_eq!(
        gh.dv.to_host().unwrap(),
        gg.dv.to_host().unwrap(),
        "{case}: re-hashed backward"
    );
}

/// One small hashed case (3 rounds, causal) and the full-attention fallback.
#[test]
#[ignore = "needs a CUDA device"]
fn smoke() {
    let s = gpu_stream();
    check(
        &s,
        1,
        DType::BF16,
        ((1, 24, 2, 8), (3, 6, 4), (1, 0), true, false),
    );
    check(
        &s,
        2,
        DType::F16,
        ((2, 7, 2, 8), (2, 4, 16), (1, 0), false, true),
    );
}

/// Every kind of case of the reference's own suite, both dtypes: several rounds, padding,
/// look-ahead, windows that wrap onto themselves, no look-back, N = C and N < C.
#[test]
#[ignore = "needs a CUDA device"]
fn matches_reference() {
    let s = gpu_stream();
    let shapes: [Shape; 8] = [
        ((2, 16, 2, 8), (1, 4, 4), (1, 0), false, false),
        ((2, 32, 2, 8), (3, 8, 8), (1, 0), false, true),
        ((2, 24, 1, 16), (2, 4, 6), (1, 1), true, true),
        ((1, 12, 2, 8), (2, 4, 12), (1, 0), false, false),
        ((1, 16, 2, 8), (4, 2, 4), (2, 1), false, false),
        ((3, 20, 2, 32), (2, 10, 5), (0, 0), false, true),
        ((1, 48, 2, 64), (3, 8, 16), (1, 0), true, false),
        ((1, 128, 1, 128), (2, 16, 32), (1, 0), true, true),
    ];
    for (k, shape) in shapes.into_iter().enumerate() {
        for dtype in [DType::F16, DType::BF16] {
            check(&s, 100 + k as u64, dtype, shape);
        }
    }
}

/// What the kernels do not take is a typed error before any launch: f32 inputs, head
/// dims past 128, rotations that are not contiguous f32.
#[test]
#[ignore = "needs a CUDA device"]
fn unsupported_calls_are_typed_errors() {
    let s = gpu_stream();
    let shape = ((1, 16, 1, 8), (1, 4, 4), (1, 0), false, false);
    let (dims, hash, chunks, causal, pad) = shape;
    let c = Case::random(3, DType::F32, dims, hash, chunks, causal, pad);
    let t = c.tensors();
    let d = [&t[0], &t[1], &t[2]].map(|t| dev(&s, t));
    let e = reformer::forward(&Inputs::new(&d[0], &d[1], &d[2]), &c.opts()).unwrap_err();
    assert!(matches!(e, Error::UnsupportedDType { .. }), "{e}");

    let c = Case::random(4, DType::BF16, dims, hash, chunks, causal, pad);
    let t = c.tensors();
    let rot16 = reformer_common::tensor(DType::BF16, &c.rot, t[2].shape());
    let d = [&t[0], &t[1], &rot16].map(|t| dev(&s, t));
    let e = reformer::forward(&Inputs::new(&d[0], &d[1], &d[2]), &c.opts()).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");

    let big = Case::random(5, DType::BF16, (1, 8, 1, 136), hash, chunks, causal, pad);
    let t = big.tensors();
    let d = [&t[0], &t[1], &t[2]].map(|t| dev(&s, t));
    let e = reformer::forward(&Inputs::new(&d[0], &d[1], &d[2]), &big.opts()).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
}

/// Hugging Face LSHSelfAttention's golden fixtures (tests/fixtures/reformer) on the device:
/// qk and v rounded to f16 / bf16, HF's buckets given (hashing is checked above), the
/// kernels against the CPU reference on those inputs, and against HF's float64 output
/// within what the rounding of the inputs moves it (1% of its largest value for f16, 5%
/// for bf16). The N <= C fallback fixtures run unhashed.
#[test]
#[ignore = "needs a CUDA device"]
fn hugging_face_golden_fixtures() {
    let s = gpu_stream();
    let fixtures = reformer_common::load_fixtures();
    assert!(fixtures.len() >= 6, "{} fixtures", fixtures.len());
    for f in &fixtures {
        let g = |k: &str| f.get(k);
        let (b, n, h, d) = (g("batch"), g("seqlen"), g("heads"), g("head_dim"));
        let pad = f
            .tensor("attention_mask")
            .map(|(_, m)| m.iter().map(|&x| x == 0.0).collect::<Vec<bool>>());
        let want = &f.tensor("out").unwrap().1;
        for (dtype, slack) in [(DType::F16, 1e-2), (DType::BF16, 5e-2)] {
            let c = Case {
                b,
                n,
                h,
                d,
                n_hashes: g("num_hashes"),
                n_buckets: g("num_buckets"),
                c: g("chunk_length"),
                before: g("chunks_before"),
                after: g("chunks_after"),
                causal: g("causal") == 1,
                pad: pad.clone(),
                dtype,
                qk: f.tensor("qk").unwrap().1.clone(),
                v: f.tensor("v").unwrap().1.clone(),
                rot: f.tensor("rotations").unwrap().1.clone(),
            };
            let hb = f.tensor("buckets").map(|(_, v)| {
                Buckets::new(v.iter().map(|&x| x as i32).collect(), [b, h, c.n_hashes, n])
            });
            let t = c.tensors();
            let m = c.mask();
            let host = reformer::forward(&inputs(&t, m.as_ref(), hb.as_ref()), &c.opts()).unwrap();
            let dt = [&t[0], &t[1], &t[2]].map(|t| dev(&s, t));
            let di = Inputs::new(&dt[0], &dt[1], &dt[2])
                .key_padding_mask(m.as_ref())
                .buckets(hb.as_ref());
            let got = reformer::forward(&di, &c.opts())
                .unwrap()
                .out
                .to_host()
                .unwrap();
            let case = format!("{} {dtype:?}", f.name);
            assert_close_to_reference(&case, "out vs reference", &got, &host.out, out_tol(dtype));
            let hf = reformer_common::tensor(DType::F32, want, got.shape());
            assert_close_to_reference(&case, "out vs Hugging Face", &got, &hf, slack);
        }
    }
}
