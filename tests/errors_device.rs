//! The device-side error paths of the attention API. None of these needs a GPU: the
//! CUDA-only checks are reached through `attention::cuda::{check_kernel_support,
//! forward_views}` with fake device pointers, which are validated before anything is
//! launched. The host-side error paths are in tests/errors.rs.

#[cfg(any(feature = "cuda", feature = "emulator"))]
mod errors_common;

/// Without the `cuda` feature, nothing reports a device.
#[cfg(not(any(feature = "cuda", feature = "emulator")))]
#[test]
fn no_cuda_without_the_feature() {
    assert!(!flashkernels::cuda_available());
}

#[cfg(any(feature = "cuda", feature = "emulator"))]
mod cuda {
    use crate::errors_common::{assert_mentions, opts};
    use flashkernels::attention::cuda::{check_kernel_support, forward_views};
    use flashkernels::attention::validate;
    use flashkernels::attention::AttentionOptions;
    use flashkernels::device::{self, Device};
    use flashkernels::DeviceView;
    use flashkernels::{DType, Error, Layout};
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
