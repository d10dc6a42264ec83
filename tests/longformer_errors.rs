//! Longformer attention: the error paths of the public API (every rejected input, with its
//! typed variant and a message naming it), and inputs read by their layout.

mod common;
mod longformer_common;

use common::Rng;
use flashkernels::longformer::{self, GlobalProjections, LongformerOptions, TokenMask};
use flashkernels::{DType, Error, HostTensor};
use longformer_common::{random, tensor};

fn t(shape: &[usize]) -> HostTensor {
    let n: usize = shape.iter().product();
    HostTensor::from_vec((0..n).map(|i| (i as f32 * 0.37).sin()).collect(), shape).unwrap()
}

fn fail(
    q: &HostTensor,
    k: &HostTensor,
    v: &HostTensor,
    globals: Option<GlobalProjections<'_>>,
    gm: Option<&TokenMask>,
    pm: Option<&TokenMask>,
    opts: &LongformerOptions,
) -> Error {
    longformer::forward(
        &longformer::Inputs::new(q, k, v)
            .globals(globals)
            .masks(gm, pm),
        opts,
    )
    .expect_err("must be rejected")
}

fn assert_mentions(e: &Error, parts: &[&str]) {
    let msg = e.to_string();
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} does not mention {p:?}");
    }
}

#[test]
fn valid_inputs_pass() {
    let q = t(&[2, 7, 3, 4]);
    let gm = TokenMask::from_positions(2, 7, &[(0, 0), (1, 6)]).unwrap();
    let pm = TokenMask::from_positions(2, 7, &[(1, 5)]).unwrap();
    let opts = LongformerOptions {
        dilation: vec![1, 2, 3],
        ..LongformerOptions::new(2)
    };
    let g = GlobalProjections {
        q: &q,
        k: &q,
        v: &q,
    };
    longformer::forward(
        &longformer::Inputs::new(&q, &q, &q)
            .globals(Some(g))
            .masks(Some(&gm), Some(&pm)),
        &opts,
    )
    .unwrap();
}

#[test]
fn bad_dilation() {
    let q = t(&[1, 5, 3, 2]);
    for (dil, parts) in [
        (vec![0], vec!["dilation", ">= 1", "head 0"]),
        (vec![1, 0, 2], vec!["dilation", "head 1"]),
        (vec![1, 2], vec!["dilation", "2 values", "3"]),
        (vec![], vec!["dilation", "0 values"]),
    ] {
        let opts = LongformerOptions {
            dilation: dil,
            ..LongformerOptions::new(1)
        };
        let e = fail(&q, &q, &q, None, None, None, &opts);
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        assert_mentions(&e, &parts);
    }
}

#[test]
fn bad_scale() {
    let q = t(&[1, 5, 1, 2]);
    for s in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let opts = LongformerOptions {
            scale: Some(s),
            ..LongformerOptions::new(1)
        };
        let e = fail(&q, &q, &q, None, None, None, &opts);
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        assert_mentions(&e, &["scale"]);
    }
}

#[test]
fn mask_shapes() {
    let q = t(&[2, 5, 1, 2]);
    let opts = LongformerOptions::new(1);
    let rank = TokenMask::new(vec![false; 10], &[10]);
    let e = fail(&q, &q, &q, None, Some(&rank), None, &opts);
    assert!(
        matches!(
            e,
            Error::Rank {
                name: "global_mask",
                expected: 2,
                ..
            }
        ),
        "{e}"
    );
    let wrong = TokenMask::new(vec![false; 12], &[2, 6]);
    let e = fail(&q, &q, &q, None, None, Some(&wrong), &opts);
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    assert_mentions(&e, &["padding_mask", "[2, 6]", "[2, 5]"]);
    let short = TokenMask::new(vec![false; 9], &[2, 5]);
    let e = fail(&q, &q, &q, None, Some(&short), None, &opts);
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert_mentions(&e, &["global_mask", "10", "9"]);
}

#[test]
fn padded_token_cannot_be_global() {
    let q = t(&[2, 5, 1, 2]);
    let gm = TokenMask::from_positions(2, 5, &[(1, 3)]).unwrap();
    let pm = TokenMask::from_positions(2, 5, &[(1, 3), (0, 4)]).unwrap();
    let e = fail(
        &q,
        &q,
        &q,
        None,
        Some(&gm),
        Some(&pm),
        &LongformerOptions::new(1),
    );
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert_mentions(&e, &["token 3", "sequence 1", "global", "padded"]);
}

#[test]
fn shape_and_dtype_mismatches() {
    let opts = LongformerOptions::new(1);
    let q = t(&[1, 5, 2, 4]);
    let e = fail(&q, &t(&[1, 6, 2, 4]), &q, None, None, None, &opts);
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    assert_mentions(&e, &["k", "[1, 6, 2, 4]", "[1, 5, 2, 4]"]);
    let e = fail(&q, &q, &t(&[1, 5, 1, 4]), None, None, None, &opts);
    assert_mentions(&e, &["v", "[1, 5, 1, 4]"]);
    let bad = t(&[1, 5, 2, 3]);
    let g = GlobalProjections {
        q: &q,
        k: &bad,
        v: &q,
    };
    let e = fail(&q, &q, &q, Some(g), None, None, &opts);
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    assert_mentions(&e, &["k_global"]);
    let half = HostTensor::from_fn(DType::F16, &[1, 5, 2, 4], |_| 0.5).unwrap();
    let g = GlobalProjections {
        q: &q,
        k: &q,
        v: &half,
    };
    let e = fail(&q, &q, &q, Some(g), None, None, &opts);
    assert!(matches!(e, Error::DTypeMismatch { .. }), "{e}");
    assert_mentions(&e, &["v_global", "float16", "float32"]);
    let e = fail(&q, &half, &q, None, None, None, &opts);
    assert!(matches!(e, Error::DTypeMismatch { .. }), "{e}");
}

#[test]
fn rank_empty_and_stride() {
    let opts = LongformerOptions::new(1);
    let q = t(&[1, 5, 2, 4]);
    let e = fail(&t(&[5, 2, 4]), &q, &q, None, None, None, &opts);
    assert!(
        matches!(
            e,
            Error::Rank {
                name: "q",
                expected: 4,
                ..
            }
        ),
        "{e}"
    );
    let g = GlobalProjections {
        q: &t(&[1, 5, 8]),
        k: &q,
        v: &q,
    };
    let e = fail(&q, &q, &q, Some(g), None, None, &opts);
    assert!(
        matches!(
            e,
            Error::Rank {
                name: "q_global",
                ..
            }
        ),
        "{e}"
    );
    let empty = t(&[1, 0, 2, 4]);
    let e = fail(&empty, &empty, &empty, None, None, None, &opts);
    assert!(matches!(e, Error::Empty { name: "q", .. }), "{e}");
    // (B, N, D, H) seen as (B, N, H, D): the head dim is strided.
    let e = fail(
        &t(&[1, 5, 4, 2]).transpose(2, 3).unwrap(),
        &q,
        &q,
        None,
        None,
        None,
        &opts,
    );
    assert!(matches!(e, Error::NonUnitStride { name: "q", .. }), "{e}");
}

#[test]
fn strided_inputs_are_read_by_layout() {
    // A (B, H, N, D) tensor passed as (B, N, H, D) by swapping strides gives the same
    // result as its contiguous copy.
    let mut rng = Rng::new(5);
    let bhnd = tensor(&random(&mut rng, 2 * 3 * 7 * 4), &[2, 3, 7, 4]);
    let strided = bhnd.transpose(1, 2).unwrap();
    let contiguous = strided.to_contiguous(DType::F32);
    let gm = TokenMask::from_positions(2, 7, &[(0, 3), (1, 0)]).unwrap();
    let opts = LongformerOptions::new(1);
    let a = longformer::forward(
        &longformer::Inputs::new(&strided, &strided, &strided)
            .globals(None)
            .masks(Some(&gm), None),
        &opts,
    )
    .unwrap();
    let b = longformer::forward(
        &longformer::Inputs::new(&contiguous, &contiguous, &contiguous)
            .globals(None)
            .masks(Some(&gm), None),
        &opts,
    )
    .unwrap();
    assert_eq!(a.out.to_f32_vec(), b.out.to_f32_vec());
}

#[test]
fn backward_input_checks() {
    let opts = LongformerOptions::new(1);
    let q = t(&[1, 5, 2, 4]);
    let r = longformer::forward(
        &longformer::Inputs::new(&q, &q, &q)
            .globals(None)
            .masks(None, None),
        &opts,
    )
    .unwrap();
    let bw = |out: &HostTensor, lse: &HostTensor, dout: &HostTensor| {
        longformer::backward(
            &longformer::Inputs::new(&q, &q, &q)
                .globals(None)
                .masks(None, None)
                .backward(out, lse, dout),
            &opts,
        )
        .expect_err("must be rejected")
    };
    let e = bw(&t(&[1, 5, 2, 3]), &r.lse, &q);
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    assert_mentions(&e, &["out"]);
    let e = bw(&r.out, &t(&[1, 5, 2]), &q);
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    assert_mentions(&e, &["lse", "[1, 2, 5]"]);
    let half_lse = HostTensor::from_fn(DType::F16, &[1, 2, 5], |_| 0.0).unwrap();
    let e = bw(&r.out, &half_lse, &q);
    assert!(
        matches!(e, Error::UnsupportedDType { name: "lse", .. }),
        "{e}"
    );
    let half = HostTensor::from_fn(DType::BF16, &[1, 5, 2, 4], |_| 0.0).unwrap();
    let e = bw(&r.out, &r.lse, &half);
    assert!(matches!(e, Error::DTypeMismatch { .. }), "{e}");
    assert_mentions(&e, &["dout", "bfloat16"]);
}
