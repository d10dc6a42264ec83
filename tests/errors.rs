//! Every error path of the public Rust API: the typed variant, and a message that names
//! the offending values. None of these needs a GPU: the CUDA-only checks are reached
//! through `attention::cuda::{check_kernel_support, forward_views}` with fake device
//! pointers, which are validated before anything is launched.

use flashkernels::attention::{self, AttentionOptions};
use flashkernels::{DType, Error, HostData, HostTensor, Layout, Tensor};

fn opts() -> AttentionOptions {
    AttentionOptions::default()
}

fn t(shape: &[usize]) -> HostTensor {
    let n: usize = shape.iter().product();
    HostTensor::from_vec((0..n).map(|i| (i as f32 * 0.37).sin()).collect(), shape).unwrap()
}

fn t_dtype(dtype: DType, shape: &[usize]) -> HostTensor {
    HostTensor::from_fn(dtype, shape, |i| (i as f32 * 0.37).sin()).unwrap()
}

/// Runs the CPU path and the generic `forward` on host tensors; both must fail with the
/// same error, which is returned.
fn fail(q: &HostTensor, k: &HostTensor, v: &HostTensor, o: &AttentionOptions) -> Error {
    let e = attention::forward(&attention::Inputs::new(q, k, v), o)
        .expect_err("invalid inputs must be rejected");
    let e2 = attention::forward(
        &attention::Inputs::new(
            &Tensor::Host(q.clone()),
            &Tensor::Host(k.clone()),
            &Tensor::Host(v.clone()),
        ),
        o,
    )
    .expect_err("invalid inputs must be rejected");
    assert_eq!(e, e2, "forward on HostTensors and on Tensors disagree");
    e
}

fn assert_mentions(e: &Error, parts: &[&str]) {
    let msg = e.to_string();
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} does not mention {p:?}");
    }
}

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

/// Without the `cuda` feature, nothing reports a device.
#[cfg(not(any(feature = "cuda", feature = "emulator")))]
#[test]
fn no_cuda_without_the_feature() {
    assert!(!flashkernels::cuda_available());
}

#[cfg(any(feature = "cuda", feature = "emulator"))]
mod cuda {
    use super::*;
    use flashkernels::attention::cuda::{check_kernel_support, forward_views};
    use flashkernels::attention::validate;
    use flashkernels::device::{self, Device};
    use flashkernels::DeviceView;
    use std::ptr;

    /// `Device::new` never panics: without a driver or GPU it says which is missing.
    #[test]
    fn device_new_reports_missing_driver_or_device() {
        match Device::new(0) {
            Err(Error::NoDriver(m)) => {
                assert!(!flashkernels::cuda_available());
                assert!(m.contains("libcuda"), "{m}");
                assert!(matches!(device::device_count(), Err(Error::NoDriver(_))));
            }
            Err(Error::NoDevice(m)) => {
                assert!(!flashkernels::cuda_available());
                assert!(!m.is_empty());
            }
            Ok(d) => {
                // Only acceptable where a GPU is present.
                assert!(
                    flashkernels::cuda_available(),
                    "Device::new(0) succeeded: {d:?}"
                );
                assert_eq!(d.ordinal(), 0);
            }
            Err(e) => panic!("Device::new(0) must fail with NoDriver or NoDevice, got {e:?}"),
        }
        // An ordinal that exists nowhere.
        match Device::new(1 << 20) {
            Err(Error::NoDriver(_)) => {}
            Err(e @ Error::NoDevice(_)) => assert_mentions(&e, &["device 1048576 requested"]),
            other => panic!("Device::new(1 << 20) gave {other:?}"),
        }
    }

    const ALIGNED: u64 = 0x7f00_0000_0000;

    fn view(ptr: u64, dtype: DType, shape: &[usize], device: usize) -> DeviceView {
        DeviceView {
            ptr,
            dtype,
            layout: Layout::contiguous(shape),
            device,
        }
    }

    /// Q, K, V, O, LSE views of a valid problem at distinct fake (aligned) addresses.
    struct Views {
        q: DeviceView,
        k: DeviceView,
        v: DeviceView,
        o: DeviceView,
        lse: DeviceView,
    }

    fn views(dtype: DType, b: usize, nq: usize, nk: usize, h: usize, d: usize) -> Views {
        Views {
            q: view(ALIGNED, dtype, &[b, nq, h, d], 0),
            k: view(ALIGNED + 0x1000_0000, dtype, &[b, nk, h, d], 0),
            v: view(ALIGNED + 0x2000_0000, dtype, &[b, nk, h, d], 0),
            o: view(ALIGNED + 0x3000_0000, dtype, &[b, nq, h, d], 0),
            lse: view(ALIGNED + 0x4000_0000, DType::F32, &[b, h, nq], 0),
        }
    }

    /// Calls forward_views, which must fail validation (these pointers are fake: a
    /// launch would be a bug in the test or in the checks).
    fn fail_views(w: &Views, o: &AttentionOptions) -> Error {
        // SAFETY: every call here is rejected before the launcher; nothing is dereferenced.
        unsafe { forward_views(&w.q, &w.k, &w.v, &w.o, &w.lse, o, ptr::null_mut()) }
            .expect_err("must be rejected before launch")
    }

    fn support(w: &Views) -> flashkernels::Result<()> {
        let p = validate(
            (w.q.dtype, &w.q.layout),
            (w.k.dtype, &w.k.layout),
            (w.v.dtype, &w.v.layout),
            &opts(),
        )?;
        check_kernel_support(
            &p,
            w.q.device,
            &[("q", &w.q), ("k", &w.k), ("v", &w.v), ("out", &w.o)],
        )
    }

    #[test]
    fn kernel_support_accepts_the_supported_configurations() {
        for dtype in [DType::F16, DType::BF16] {
            for d in [64, 128] {
                support(&views(dtype, 2, 100, 37, 3, d)).unwrap();
            }
        }
        // Strided (B, H, N, D) storage seen through swapped strides is fine too.
        let mut w = views(DType::BF16, 2, 100, 100, 3, 64);
        w.q.layout = Layout {
            shape: vec![2, 100, 3, 64],
            strides: vec![3 * 100 * 64, 64, 100 * 64, 1],
        };
        support(&w).unwrap();
    }

    #[test]
    fn f32_on_the_cuda_path() {
        let w = views(DType::F32, 1, 16, 16, 2, 64);
        for e in [support(&w).unwrap_err(), fail_views(&w, &opts())] {
            assert!(
                matches!(
                    e,
                    Error::UnsupportedDType {
                        dtype: DType::F32,
                        name: "q",
                        ..
                    }
                ),
                "{e:?}"
            );
            assert_mentions(&e, &["float32", "float16 or bfloat16"]);
        }
    }

    #[test]
    fn unsupported_head_dims() {
        // Every multiple of 8 up to 256 is compiled (padded to 64, 128 or 256).
        for d in [8, 40, 64, 96, 136, 256] {
            support(&views(DType::F16, 1, 16, 16, 2, d)).unwrap();
        }
        for d in [1, 4, 12, 127, 264, 512] {
            let w = views(DType::F16, 1, 16, 16, 2, d);
            for e in [support(&w).unwrap_err(), fail_views(&w, &opts())] {
                assert!(matches!(e, Error::Unsupported(_)), "d={d}: {e:?}");
                assert_mentions(&e, &[&format!("head_dim {d}"), "multiples of 8 up to 256"]);
            }
        }
    }

    #[test]
    fn grid_limits() {
        // batch and heads index grid z and y: at most 65535.
        support(&views(DType::BF16, 65_535, 1, 1, 1, 64)).unwrap();
        let e = fail_views(&views(DType::BF16, 65_536, 1, 1, 1, 64), &opts());
        assert!(
            matches!(&e, Error::TooLarge { what, value: 65_536, limit: 65_535 } if what == "batch"),
            "{e:?}"
        );
        assert_mentions(&e, &["batch = 65536", "65535"]);
        support(&views(DType::BF16, 1, 1, 1, 65_535, 64)).unwrap();
        let e = fail_views(&views(DType::BF16, 1, 1, 1, 70_000, 64), &opts());
        assert!(
            matches!(&e, Error::TooLarge { what, value: 70_000, .. } if what == "heads"),
            "{e:?}"
        );
        assert_mentions(&e, &["heads = 70000", "65535"]);
    }

    #[test]
    fn sequence_lengths_beyond_i32() {
        let big = i32::MAX as usize + 1;
        let e = fail_views(&views(DType::F16, 1, big, 4, 1, 64), &opts());
        assert!(
            matches!(&e, Error::TooLarge { what, limit, .. } if what == "seqlen_q" && *limit < i32::MAX as u64),
            "{e:?}"
        );
        assert_mentions(&e, &["seqlen_q = 2147483648", &(1u64 << 30).to_string()]);
        let e = fail_views(&views(DType::F16, 1, 4, big, 1, 64), &opts());
        assert!(
            matches!(&e, Error::TooLarge { what, .. } if what == "seqlen_k"),
            "{e:?}"
        );
        assert_mentions(&e, &["seqlen_k = 2147483648"]);
    }

    #[test]
    fn misaligned_pointers() {
        for which in ["q", "k", "v", "out"] {
            let mut w = views(DType::BF16, 1, 16, 16, 2, 64);
            let bad = match which {
                "q" => &mut w.q,
                "k" => &mut w.k,
                "v" => &mut w.v,
                _ => &mut w.o,
            };
            bad.ptr += 2; // element-aligned, not 16-byte aligned
            let ptr = bad.ptr;
            let e = fail_views(&w, &opts());
            assert!(matches!(e, Error::InvalidArgument(_)), "{which}: {e:?}");
            assert_mentions(
                &e,
                &[
                    &format!("{which}:"),
                    &format!("{ptr:#x}"),
                    "16-byte aligned",
                ],
            );
        }
    }

    #[test]
    fn misaligned_strides() {
        // Rows of 68 bf16 elements (136 bytes) for D = 64: not a multiple of 16 bytes.
        let mut w = views(DType::BF16, 1, 16, 16, 2, 64);
        w.k.layout.strides = vec![16 * 2 * 68, 2 * 68, 68, 1];
        let e = fail_views(&w, &opts());
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        assert_mentions(&e, &["k:", "[2176, 136, 68, 1]", "2-byte elements"]);
        // A batch stride that is odd in elements.
        let mut w = views(DType::F16, 2, 16, 16, 2, 128);
        w.v.layout.strides = vec![16 * 2 * 128 + 1, 2 * 128, 128, 1];
        let e = fail_views(&w, &opts());
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        assert_mentions(&e, &["v:", "4097"]);
    }

    #[test]
    fn views_on_different_devices() {
        let mut w = views(DType::F16, 1, 16, 16, 2, 64);
        w.v.device = 1;
        let e = fail_views(&w, &opts());
        assert!(matches!(e, Error::DeviceMismatch { .. }), "{e:?}");
        assert_mentions(&e, &["v is on cuda:1", "q is on cuda:0"]);

        let mut w = views(DType::F16, 1, 16, 16, 2, 64);
        w.lse.device = 3;
        let e = fail_views(&w, &opts());
        assert!(matches!(e, Error::DeviceMismatch { .. }), "{e:?}");
        assert_mentions(&e, &["lse is on cuda:3", "q is on cuda:0"]);
    }

    #[test]
    fn wrong_output_views() {
        let base = || views(DType::BF16, 2, 16, 24, 2, 64);
        // O of the wrong shape, dtype, or with a non-unit last stride.
        let mut w = base();
        w.o.layout = Layout::contiguous(&[2, 24, 2, 64]);
        let e = fail_views(&w, &opts());
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
        assert_mentions(
            &e,
            &["out must be bfloat16 [2, 16, 2, 64]", "[2, 24, 2, 64]"],
        );

        let mut w = base();
        w.o.dtype = DType::F16;
        let e = fail_views(&w, &opts());
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
        assert_mentions(&e, &["out must be bfloat16", "got float16"]);

        let mut w = base();
        w.o.layout.strides = vec![4096, 256, 128, 2];
        let e = fail_views(&w, &opts());
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
        assert_mentions(&e, &["unit last stride", "[4096, 256, 128, 2]"]);

        // LSE of the wrong shape or dtype.
        let mut w = base();
        w.lse.layout = Layout::contiguous(&[2, 16, 2]);
        let e = fail_views(&w, &opts());
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
        assert_mentions(&e, &["lse must be float32 [2, 2, 16]", "[2, 16, 2]"]);

        let mut w = base();
        w.lse.dtype = DType::BF16;
        let e = fail_views(&w, &opts());
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
        assert_mentions(&e, &["lse must be float32", "got bfloat16"]);
    }

    #[test]
    fn forward_views_validates_the_op_first() {
        // The op's own checks come before the kernel's, on the CUDA path too.
        let mut w = views(DType::BF16, 1, 16, 16, 2, 64);
        w.q.layout = Layout::contiguous(&[16, 2, 64]);
        let e = fail_views(&w, &opts());
        assert!(matches!(e, Error::Rank { name: "q", .. }), "{e:?}");

        let w = views(DType::BF16, 1, 16, 16, 2, 64);
        for scale in [0.0, -2.0, f32::NAN, f32::INFINITY] {
            let o = AttentionOptions {
                scale: Some(scale),
                causal: true,
                ..Default::default()
            };
            let e = fail_views(&w, &o);
            assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
            assert_mentions(&e, &["scale"]);
        }

        let mut w = views(DType::BF16, 1, 16, 16, 2, 64);
        w.k.dtype = DType::F16;
        let e = fail_views(&w, &opts());
        assert!(matches!(e, Error::DTypeMismatch { .. }), "{e:?}");
        assert_mentions(&e, &["k is float16"]);
    }
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
