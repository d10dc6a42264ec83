//! Every error path of the public Rust API on the host: the typed variant, and a message
//! that names the offending values. The device-side checks (fake device pointers, rejected
//! before anything is launched) are in tests/errors_device.rs; the helpers are shared
//! (tests/errors_common).

mod errors_common;

use errors_common::{assert_mentions, fail, opts, t, t_dtype};
use flashkernels::attention::{self, AttentionOptions};
use flashkernels::{DType, Error, HostData, HostTensor, Layout};

#[test]
fn valid_inputs_pass() {
    // The control for every test below: these shapes are accepted.
    let q = t(&[2, 5, 3, 4]);
    let k = t(&[2, 7, 3, 4]);
    attention::forward(&attention::Inputs::new(&q, &k, &k), &opts()).unwrap();
}

#[test]
fn wrong_rank() {
    let ok = t(&[1, 4, 2, 8]);
    for (which, bad_shape) in [
        ("q", vec![4, 2, 8]),
        ("k", vec![1, 1, 4, 2, 8]),
        ("v", vec![32]),
    ] {
        let bad = t(&bad_shape);
        let (q, k, v) = match which {
            "q" => (&bad, &ok, &ok),
            "k" => (&ok, &bad, &ok),
            _ => (&ok, &ok, &bad),
        };
        let e = fail(q, k, v, &opts());
        assert!(
            matches!(&e, Error::Rank { name, expected: 4, shape, .. } if *name == which && *shape == bad_shape),
            "{e:?}"
        );
        assert_mentions(
            &e,
            &[
                which,
                "rank-4",
                &format!("{bad_shape:?}"),
                "(batch, seqlen, heads, head_dim)",
            ],
        );
    }
}

#[test]
fn empty_tensor() {
    let ok = t(&[1, 4, 2, 8]);
    for (which, shape) in [
        ("q", [1, 0, 2, 8]),
        ("k", [0, 4, 2, 8]),
        ("v", [1, 4, 2, 0]),
    ] {
        let bad = HostTensor::from_vec(Vec::<f32>::new(), &shape).unwrap();
        let (q, k, v) = match which {
            "q" => (&bad, &ok, &ok),
            "k" => (&ok, &bad, &ok),
            _ => (&ok, &ok, &bad),
        };
        let e = fail(q, k, v, &opts());
        assert!(
            matches!(&e, Error::Empty { name, shape: s } if *name == which && s == &shape),
            "{e:?}"
        );
        assert_mentions(&e, &[&format!("{which} is empty"), &format!("{shape:?}")]);
    }
}

#[test]
fn non_unit_last_stride() {
    let ok = t(&[1, 4, 2, 8]);
    // Every other element of a twice-as-long buffer: strides (128, 32, 16, 2).
    let layout = Layout {
        shape: vec![1, 4, 2, 8],
        strides: vec![128, 32, 16, 2],
    };
    let bad = HostTensor::from_data(HostData::F32(vec![0.5; 128]), layout).unwrap();
    for which in ["q", "k", "v"] {
        let (q, k, v) = match which {
            "q" => (&bad, &ok, &ok),
            "k" => (&ok, &bad, &ok),
            _ => (&ok, &ok, &bad),
        };
        let e = fail(q, k, v, &opts());
        assert!(
            matches!(&e, Error::NonUnitStride { name, strides, .. } if *name == which && *strides == [128, 32, 16, 2]),
            "{e:?}"
        );
        assert_mentions(
            &e,
            &[which, "[128, 32, 16, 2]", "[1, 4, 2, 8]", "unit stride"],
        );
    }
}

#[test]
fn dtype_mismatch() {
    let f = t(&[1, 4, 2, 8]);
    let b = t_dtype(DType::BF16, &[1, 4, 2, 8]);
    let h = t_dtype(DType::F16, &[1, 4, 2, 8]);
    for (q, k, v, names) in [
        (
            &f,
            &b,
            &f,
            ["q is float32", "k is bfloat16", "v is float32"],
        ),
        (
            &b,
            &b,
            &h,
            ["q is bfloat16", "k is bfloat16", "v is float16"],
        ),
        (&h, &f, &h, ["q is float16", "k is float32", "v is float16"]),
    ] {
        let e = fail(q, k, v, &opts());
        assert!(matches!(e, Error::DTypeMismatch { .. }), "{e:?}");
        assert_mentions(&e, &names);
    }
}

#[test]
fn k_v_shape_mismatch() {
    let q = t(&[2, 4, 3, 8]);
    let k = t(&[2, 6, 3, 8]);
    for v_shape in [[2, 5, 3, 8], [1, 6, 3, 8], [2, 6, 1, 8], [2, 6, 3, 4]] {
        let v = t(&v_shape);
        let e = fail(&q, &k, &v, &opts());
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
        assert_mentions(&e, &["[2, 6, 3, 8]", &format!("{v_shape:?}"), "k", "v"]);
    }
}

#[test]
fn q_k_batch_heads_head_dim_mismatch() {
    let q = t(&[2, 4, 3, 8]);
    // Batch and head_dim differ in turn (seqlen may differ: that is Nq != Nk).
    for kv_shape in [[1, 4, 3, 8], [2, 4, 3, 16], [3, 9, 1, 2]] {
        let kv = t(&kv_shape);
        let e = fail(&q, &kv, &kv, &opts());
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
        assert_mentions(
            &e,
            &[
                "[2, 4, 3, 8]",
                &format!("{kv_shape:?}"),
                "batch and head_dim",
            ],
        );
    }
}

#[test]
fn heads_not_a_multiple_of_kv_heads() {
    // GQA: 4 query heads over 2 or 1 kv heads is fine; over 3 it is not.
    let q = t(&[1, 5, 4, 8]);
    for ok in [2, 1, 4] {
        let kv = t(&[1, 6, ok, 8]);
        attention::forward(&attention::Inputs::new(&q, &kv, &kv), &opts()).unwrap();
    }
    let kv = t(&[1, 6, 3, 8]);
    let e = fail(&q, &kv, &kv, &opts());
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
    assert_mentions(&e, &["4 heads", "3 heads", "multiple"]);
    // More kv heads than query heads is not a grouping either.
    let e = fail(&t(&[1, 5, 2, 8]), &q, &q, &opts());
    assert_mentions(&e, &["2 heads", "4 heads"]);
}

#[test]
fn invalid_scale() {
    let x = t(&[1, 3, 2, 4]);
    for (scale, shown) in [
        (0.0f32, "got 0"),
        (-0.0, "got -0"),
        (-1.5, "got -1.5"),
        (f32::NAN, "got NaN"),
        (f32::INFINITY, "got inf"),
        (f32::NEG_INFINITY, "got -inf"),
    ] {
        for causal in [false, true] {
            let o = AttentionOptions {
                scale: Some(scale),
                causal,
                ..Default::default()
            };
            let e = fail(&x, &x, &x, &o);
            assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
            assert_mentions(&e, &["scale must be finite and positive", shown]);
        }
    }
    // Tiny but positive and finite is a valid scale.
    let o = AttentionOptions {
        scale: Some(f32::MIN_POSITIVE),
        causal: false,
        ..Default::default()
    };
    attention::forward(&attention::Inputs::new(&x, &x, &x), &o).unwrap();
}

#[test]
fn host_tensor_strides_overrun_storage() {
    // Needs 1 + 1*64 + 3*16 + 1*8 + 7*1 = 128 elements; 127 are given.
    let layout = Layout {
        shape: vec![2, 4, 2, 8],
        strides: vec![64, 16, 8, 1],
    };
    assert_eq!(layout.span(), 128);
    HostTensor::from_data(HostData::F32(vec![1.0; 128]), layout.clone()).unwrap();
    let e = HostTensor::from_data(HostData::F32(vec![1.0; 127]), layout).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    assert_mentions(
        &e,
        &[
            "[2, 4, 2, 8]",
            "[64, 16, 8, 1]",
            "127 elements",
            "past its storage",
        ],
    );

    // Strides whose span overflows usize: an error, not a panic or a wrap-around.
    let huge = Layout {
        shape: vec![3, 2],
        strides: vec![usize::MAX / 2, 1],
    };
    let e = HostTensor::from_data(HostData::BF16(vec![half::bf16::ONE; 8]), huge).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    assert_mentions(
        &e,
        &["[3, 2]", &format!("{}", usize::MAX / 2), "8 elements"],
    );
}

#[test]
fn host_tensor_malformed_layouts() {
    let e = HostTensor::from_data(
        HostData::F32(vec![1.0; 8]),
        Layout {
            shape: vec![2, 4],
            strides: vec![4],
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    assert_mentions(&e, &["[2, 4]", "[4]", "different ranks"]);

    let e = HostTensor::from_data(
        HostData::F32(vec![1.0]),
        Layout {
            shape: vec![],
            strides: vec![],
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    assert_mentions(&e, &["at least one dimension"]);

    // from_vec with a shape that needs more data than given.
    let e = HostTensor::from_vec(vec![1.0f32; 5], &[2, 3]).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    assert_mentions(&e, &["[2, 3]", "5 elements"]);
}

#[test]
fn host_data_from_bytes_partial_element() {
    let e = HostData::from_bytes(DType::F32, &[0u8; 6]).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    assert_mentions(&e, &["6 bytes", "float32"]);
    let e = HostData::from_bytes(DType::BF16, &[0u8; 3]).unwrap_err();
    assert_mentions(&e, &["3 bytes", "bfloat16"]);
    assert_eq!(
        HostData::from_bytes(DType::F16, &[0u8; 4]).unwrap().len(),
        2
    );
}

#[test]
fn first_error_names_the_first_bad_tensor() {
    // q is fine, k has the wrong rank and v is empty: k is reported.
    let q = t(&[1, 4, 2, 8]);
    let k = t(&[4, 2, 8]);
    let v = HostTensor::from_vec(Vec::<f32>::new(), &[1, 0, 2, 8]).unwrap();
    let e = fail(&q, &k, &v, &opts());
    assert!(matches!(e, Error::Rank { name: "k", .. }), "{e:?}");
}

mod varlen {
    use super::*;
    use flashkernels::attention::SeqLens;

    fn seqs(q: &[i32], k: &[i32]) -> SeqLens {
        SeqLens {
            cu_seqlens_q: q.to_vec(),
            cu_seqlens_k: k.to_vec(),
        }
    }

    /// Packed q (total 6 rows) and k/v (total 9 rows), 2 heads, head_dim 4.
    fn fail_varlen(s: &SeqLens) -> Error {
        let (q, k) = (t(&[6, 2, 4]), t(&[9, 2, 4]));
        attention::forward(&attention::Inputs::new(&q, &k, &k).varlen(s), &opts())
            .expect_err("must be rejected")
    }

    #[test]
    fn valid_offsets_pass() {
        let (q, k) = (t(&[6, 2, 4]), t(&[9, 2, 4]));
        let s = seqs(&[0, 0, 1, 6], &[0, 3, 3, 9]);
        let r =
            attention::forward(&attention::Inputs::new(&q, &k, &k).varlen(&s), &opts()).unwrap();
        assert_eq!(r.out.shape(), &[6, 2, 4]);
        assert_eq!(r.lse.shape(), &[2, 6]);
    }

    #[test]
    fn unsorted_offsets() {
        let e = fail_varlen(&seqs(&[0, 4, 2, 6], &[0, 3, 6, 9]));
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        assert_mentions(
            &e,
            &[
                "cu_seqlens_q",
                "non-decreasing",
                "offset 1 is 4",
                "offset 2 is 2",
            ],
        );
        let e = fail_varlen(&seqs(&[0, 2, 4, 6], &[0, 7, 3, 9]));
        assert_mentions(&e, &["cu_seqlens_k", "non-decreasing"]);
    }

    #[test]
    fn out_of_range_offsets() {
        let e = fail_varlen(&seqs(&[0, 2, 4, 7], &[0, 3, 6, 9]));
        assert_mentions(&e, &["cu_seqlens_q", "ends at 7", "6 rows"]);
        let e = fail_varlen(&seqs(&[0, 2, 4, 6], &[0, 3, 6, 8]));
        assert_mentions(&e, &["cu_seqlens_k", "ends at 8", "9 rows"]);
        let e = fail_varlen(&seqs(&[1, 2, 4, 6], &[0, 3, 6, 9]));
        assert_mentions(&e, &["cu_seqlens_q", "must start at 0, got 1"]);
        let e = fail_varlen(&seqs(&[0, -2, 4, 6], &[0, 3, 6, 9]));
        assert_mentions(&e, &["cu_seqlens_q", "non-decreasing"]);
    }

    #[test]
    fn wrong_number_of_offsets() {
        let e = fail_varlen(&seqs(&[0, 2, 6], &[0, 3, 6, 9]));
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
        assert_mentions(
            &e,
            &["cu_seqlens_q has 3", "cu_seqlens_k has 4", "batch + 1"],
        );
        let e = fail_varlen(&seqs(&[6], &[9]));
        assert_mentions(&e, &["batch + 1 >= 2", "got 1"]);
        let e = fail_varlen(&seqs(&[], &[]));
        assert_mentions(&e, &["batch + 1 >= 2", "got 0"]);
    }

    #[test]
    fn varlen_needs_packed_rank_3() {
        let (q, k) = (t(&[1, 6, 2, 4]), t(&[1, 9, 2, 4]));
        let s = seqs(&[0, 6], &[0, 9]);
        let e = attention::forward(&attention::Inputs::new(&q, &k, &k).varlen(&s), &opts())
            .unwrap_err();
        assert!(matches!(e, Error::Rank { expected: 3, .. }), "{e:?}");
        assert_mentions(&e, &["(total_seqlen, heads, head_dim)"]);
    }

    #[test]
    fn gqa_heads_checked_for_varlen() {
        let (q, k) = (t(&[6, 3, 4]), t(&[9, 2, 4]));
        let s = seqs(&[0, 6], &[0, 9]);
        let e = attention::forward(&attention::Inputs::new(&q, &k, &k).varlen(&s), &opts())
            .unwrap_err();
        assert_mentions(&e, &["3 heads", "2 heads", "multiple"]);
    }
}
