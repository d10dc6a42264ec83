//! Sizes beyond the kernels' 32-bit indexing and grid limits (issue 13, item 5): each
//! is `Error::TooLarge` before anything is launched, never a wrapped value or a wrong
//! result. None of these needs a GPU or allocates the tensors they describe: the checks
//! are reached through the CUDA path's plan and check functions and its `*_views` entry
//! points with fake device pointers (CUDA and emulator builds). The limits and where
//! they are checked: docs/ARCHITECTURE.md, "Sizes and 32-bit indexing".

/// Without a device backend there is no CUDA path to check.
#[cfg(not(any(feature = "cuda", feature = "emulator")))]
#[test]
fn no_cuda_path_without_the_feature() {
    assert!(!flashkernels::cuda_available());
}

#[cfg(any(feature = "cuda", feature = "emulator"))]
mod cuda {
    use flashkernels::attention::{self, AttentionOptions};
    use flashkernels::conv::{self, Conv2dOptions};
    use flashkernels::pool::{self, Pool2dOptions, PoolKind};
    use flashkernels::{DType, DeviceView, Error, Layout};

    fn view(dtype: DType, shape: &[usize], ptr: u64) -> DeviceView {
        DeviceView {
            ptr,
            dtype,
            layout: Layout::contiguous(shape),
            device: 0,
        }
    }

    fn too_large(e: &Error, want: &str) -> (u64, u64) {
        match e {
            Error::TooLarge { what, value, limit } if what == want => (*value, *limit),
            other => panic!("expected TooLarge {{ what: {want:?}, .. }}, got {other:?}"),
        }
    }

    /// x, weight, y views of a valid conv problem (y's shape from the problem).
    fn conv_views(
        dtype: DType,
        x: &[usize],
        w: &[usize],
        o: &Conv2dOptions,
    ) -> (conv::Conv2dProblem, [DeviceView; 3]) {
        let (xv, wv) = (view(dtype, x, 0x10_0000), view(dtype, w, 0x20_0000));
        let p = conv::validate((dtype, &xv.layout), (dtype, &wv.layout), None, o)
            .expect("a valid problem (only the kernels' limits refuse it)");
        let y = view(dtype, &p.y_shape(), 0x30_0000);
        (p, [xv, wv, y])
    }

    fn conv_plan(p: &conv::Conv2dProblem, [x, w, y]: &[DeviceView; 3]) -> flashkernels::Result<()> {
        conv::cuda::plan(p, [x, w, y], None, None).map(|_| ())
    }

    #[test]
    fn conv_gemm_rows_past_the_last_tile_fit_32_bits() {
        // M = N*P*Q within 256 of 2^31: the last 128-row tile's indices would pass i32::MAX.
        let h = (1usize << 31) - 200;
        let (p, v) = conv_views(
            DType::F16,
            &[1, 8, h, 1],
            &[8, 8, 1, 1],
            &Conv2dOptions::default(),
        );
        let e = conv_plan(&p, &v).unwrap_err();
        assert_eq!(
            too_large(&e, "batch * out_height * out_width"),
            (h as u64, (1 << 31) - 256)
        );
    }

    #[test]
    fn conv_padded_extent_beyond_2_pow_30() {
        // p * stride - pad would pass 2^31 in the kernels' 32-bit window positions.
        let o = Conv2dOptions {
            stride: [1 << 30, 1],
            padding: [1 << 30, 0],
            ..Conv2dOptions::default()
        };
        for dtype in [DType::F16, DType::F32] {
            let (p, v) = conv_views(dtype, &[1, 8, 16, 16], &[8, 8, 1, 1], &o);
            assert_eq!(p.p, 3);
            let e = conv_plan(&p, &v).unwrap_err();
            assert_eq!(
                too_large(&e, "height + 2 * padding[0]"),
                (16 + (1 << 31), 1 << 30)
            );
        }
    }

    #[test]
    fn conv_strides_beyond_i32_are_refused_not_wrapped() {
        let o = Conv2dOptions {
            stride: [1 << 31, 1],
            ..Conv2dOptions::default()
        };
        let (p, v) = conv_views(DType::F16, &[1, 8, 16, 16], &[8, 8, 1, 1], &o);
        let e = conv_plan(&p, &v).unwrap_err();
        assert_eq!(too_large(&e, "stride[0]"), (1 << 31, i32::MAX as u64));
    }

    #[test]
    fn conv_gemm_grid_limits() {
        // Groups index grid z of the f16 / bf16 GEMMs: at most 65535. The f32 direct
        // kernels have no such limit.
        let o = Conv2dOptions {
            groups: 65_536,
            ..Conv2dOptions::default()
        };
        let (p, v) = conv_views(DType::BF16, &[1, 65_536, 1, 1], &[65_536, 1, 1, 1], &o);
        assert_eq!(
            too_large(&conv_plan(&p, &v).unwrap_err(), "groups"),
            (65_536, 65_535)
        );
        let (p, v) = conv_views(DType::F32, &[1, 65_536, 1, 1], &[65_536, 1, 1, 1], &o);
        conv_plan(&p, &v).expect("the f32 direct kernel takes any number of groups");
        // 64-column tiles of out_channels / groups index grid y forward.
        let k = 65_535 * 64 + 8;
        let (p, v) = conv_views(
            DType::F16,
            &[1, 8, 1, 1],
            &[k, 8, 1, 1],
            &Conv2dOptions::default(),
        );
        let e = conv_plan(&p, &v).unwrap_err();
        assert_eq!(
            too_large(&e, "out_channels / groups"),
            (k as u64, 65_535 * 64)
        );
        // The backward's GEMMs have C/groups*R*S columns: refused there, fine forward.
        let c = 65_535 * 64 + 8;
        let (p, v) = conv_views(
            DType::F16,
            &[1, c, 1, 1],
            &[8, c, 1, 1],
            &Conv2dOptions::default(),
        );
        conv_plan(&p, &v).expect("a long reduction is fine forward");
        let dx = view(DType::F16, &p.x_shape(), 0x40_0000);
        // SAFETY: rejected before any pointer is used.
        let e = unsafe {
            conv::cuda::conv2d_backward_views(
                [&v[0], &v[1], &v[2]],
                [Some(&dx), None, None],
                &Conv2dOptions::default(),
                std::ptr::null_mut(),
            )
        }
        .unwrap_err();
        assert_eq!(
            too_large(&e, "in_channels / groups * kernel_h * kernel_w (backward)"),
            (c as u64, 65_535 * 64)
        );
    }

    fn pool_problem(kind: PoolKind, x: &[usize], o: &Pool2dOptions) -> pool::Pool2dProblem {
        pool::validate_pool(kind, (DType::F16, &Layout::contiguous(x)), o)
            .expect("a valid pooling problem (only the kernels' limits refuse it)")
    }

    #[test]
    fn average_pooling_window_area_fits_i32() {
        // A 65536 x 65536 window (half of it padding) over a 1 x 1 input: its area, the
        // divisor with count_include_pad, is 2^32 (0 in 32 bits).
        let o = Pool2dOptions {
            padding: [32_768, 32_768],
            ..Pool2dOptions::new([65_536, 65_536])
        };
        let p = pool_problem(PoolKind::Avg, &[1, 1, 1, 1], &o);
        let e = pool::cuda::check_pool_limits(&p).unwrap_err();
        assert_eq!(
            too_large(&e, "average pooling window area"),
            (1 << 32, i32::MAX as u64)
        );
        // Max pooling computes no area.
        pool::cuda::check_pool_limits(&pool_problem(PoolKind::Max, &[1, 1, 1, 1], &o)).unwrap();
        // Through the views entry point, before any launch.
        let x = view(DType::F16, &[1, 1, 1, 1], 0x1000);
        let y = view(DType::F16, &p.y_shape(), 0x2000);
        // SAFETY: rejected before any pointer is used.
        let e = unsafe {
            pool::cuda::pool2d_forward_views(PoolKind::Avg, &x, &y, None, &o, std::ptr::null_mut())
        }
        .unwrap_err();
        too_large(&e, "average pooling window area");
    }

    #[test]
    fn pooling_padded_extent_beyond_2_pow_30() {
        let o = Pool2dOptions {
            padding: [1 << 30, 0],
            ..Pool2dOptions::new([1 << 31, 1])
        };
        let p = pool_problem(PoolKind::Max, &[1, 1, 1, 1], &o);
        let e = pool::cuda::check_pool_limits(&p).unwrap_err();
        assert_eq!(
            too_large(&e, "height + 2 * padding[0]"),
            (1 + (1 << 31), 1 << 30)
        );
    }

    #[test]
    fn attention_head_dim_beyond_i32_is_not_wrapped() {
        // 2^32 + 64 would wrap to 64, a supported head dim.
        let d = (1usize << 32) + 64;
        let q = view(DType::F16, &[1, 1, 1, d], 0x7f00_0000_0000);
        let p = attention::validate(
            (DType::F16, &q.layout),
            (DType::F16, &q.layout),
            (DType::F16, &q.layout),
            &AttentionOptions::default(),
        )
        .expect("a valid problem");
        let e = attention::cuda::check_kernel_support(&p, 0, &[("q", &q)]).unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
        assert!(e.to_string().contains(&format!("head_dim {d}")), "{e}");
    }
}
