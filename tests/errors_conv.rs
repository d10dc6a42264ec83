//! Every error path of the convolution and pooling API: the typed variant, and a message
//! that names the offending values. None of these needs a GPU: the CUDA-only checks are
//! reached through `conv::cuda::*_views` with fake device pointers, which are validated
//! before anything is launched (CUDA builds only).

use flashkernels::conv::{self, Activation, Conv2dOptions, ConvAlgo};
use flashkernels::pool::{self, Pool2dOptions};
use flashkernels::{DType, Error, HostTensor, Layout, Tensor};

fn t(shape: &[usize]) -> HostTensor {
    HostTensor::from_fn(DType::F32, shape, |i| (i as f32 * 0.37).sin()).unwrap()
}

fn t_dtype(dtype: DType, shape: &[usize]) -> HostTensor {
    HostTensor::from_fn(dtype, shape, |i| (i as f32 * 0.37).sin()).unwrap()
}

/// Runs the CPU path and the generic `conv2d` on host tensors; both must fail with the
/// same error, which is returned.
fn fail(x: &HostTensor, w: &HostTensor, b: Option<&HostTensor>, o: &Conv2dOptions) -> Error {
    let e = conv::forward(&conv::Inputs::new(x, w).bias(b), o)
        .expect_err("invalid inputs must be rejected");
    let bt = b.map(|b| Tensor::Host(b.clone()));
    let e2 = conv::forward(
        &conv::Inputs::new(&Tensor::Host(x.clone()), &Tensor::Host(w.clone())).bias(bt.as_ref()),
        o,
    )
    .map(|o| o.y)
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

fn opts() -> Conv2dOptions {
    Conv2dOptions::default()
}

#[test]
fn valid_inputs_pass() {
    let x = t(&[2, 4, 6, 5]);
    let w = t(&[6, 2, 3, 3]);
    let b = t(&[6]);
    let o = Conv2dOptions {
        groups: 2,
        padding: [1, 1],
        activation: Activation::Gelu,
        ..opts()
    };
    let y = conv::forward(&conv::Inputs::new(&x, &w).bias(Some(&b)).keep_pre(true), &o).unwrap();
    assert_eq!(y.y.shape(), &[2, 6, 6, 5]);
    pool::forward(&pool::Inputs::max(&x), &Pool2dOptions::new([2, 2])).unwrap();
    pool::forward(&pool::Inputs::avg(&x), &Pool2dOptions::new([2, 2]))
        .map(|o| o.y)
        .unwrap();
}

#[test]
fn wrong_rank() {
    let e = fail(&t(&[4, 6, 5]), &t(&[6, 4, 3, 3]), None, &opts());
    assert!(
        matches!(
            e,
            Error::Rank {
                name: "x",
                expected: 4,
                ..
            }
        ),
        "{e:?}"
    );
    assert_mentions(&e, &["x", "[4, 6, 5]", "(batch, channels, height, width)"]);
    let e = fail(&t(&[1, 4, 6, 5]), &t(&[6, 4, 3]), None, &opts());
    assert!(matches!(e, Error::Rank { name: "weight", .. }), "{e:?}");
    let e = pool::forward(
        &pool::Inputs::max(&t(&[4, 6, 5])),
        &Pool2dOptions::new([2, 2]),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Rank { name: "x", .. }), "{e:?}");
}

#[test]
fn empty_tensors() {
    let e = fail(&t(&[0, 4, 6, 5]), &t(&[6, 4, 3, 3]), None, &opts());
    assert!(matches!(e, Error::Empty { name: "x", .. }), "{e:?}");
    assert_mentions(&e, &["[0, 4, 6, 5]"]);
    let e = fail(&t(&[1, 4, 6, 5]), &t(&[0, 4, 3, 3]), None, &opts());
    assert!(matches!(e, Error::Empty { name: "weight", .. }), "{e:?}");
    let e = pool::forward(
        &pool::Inputs::avg(&t(&[1, 0, 6, 5])),
        &Pool2dOptions::new([2, 2]),
    )
    .map(|o| o.y)
    .unwrap_err();
    assert!(matches!(e, Error::Empty { name: "x", .. }), "{e:?}");
}

#[test]
fn dtype_mismatch() {
    let e = fail(
        &t(&[1, 4, 6, 5]),
        &t_dtype(DType::F16, &[6, 4, 3, 3]),
        None,
        &opts(),
    );
    assert!(matches!(e, Error::DTypeMismatch { .. }), "{e:?}");
    assert_mentions(&e, &["float32", "float16"]);
    let e = fail(
        &t(&[1, 4, 6, 5]),
        &t(&[6, 4, 3, 3]),
        Some(&t_dtype(DType::BF16, &[6])),
        &opts(),
    );
    assert!(matches!(e, Error::DTypeMismatch { .. }), "{e:?}");
    assert_mentions(&e, &["bias", "bfloat16"]);
}

#[test]
fn bad_bias_shape() {
    for shape in [vec![5], vec![6, 1], vec![1]] {
        let e = fail(
            &t(&[1, 4, 6, 5]),
            &t(&[6, 4, 3, 3]),
            Some(&t(&shape)),
            &opts(),
        );
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
        assert_mentions(&e, &["bias", &format!("{shape:?}"), "[6]"]);
    }
}

#[test]
fn groups_must_divide_channels() {
    let g = |groups| Conv2dOptions { groups, ..opts() };
    let e = fail(&t(&[1, 4, 6, 5]), &t(&[6, 1, 3, 3]), None, &g(3));
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
    assert_mentions(&e, &["groups = 3", "(4)", "(6)"]);
    let e = fail(&t(&[1, 4, 6, 5]), &t(&[5, 2, 3, 3]), None, &g(2));
    assert_mentions(&e, &["groups = 2", "(5)"]);
    let e = fail(&t(&[1, 4, 6, 5]), &t(&[6, 4, 3, 3]), None, &g(2));
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
    assert_mentions(&e, &["4 input channels per group", "expected 2"]);
    let e = fail(&t(&[1, 4, 6, 5]), &t(&[6, 4, 3, 3]), None, &g(0));
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    assert_mentions(&e, &["groups", "0"]);
}

#[test]
fn zero_stride_or_dilation() {
    let x = t(&[1, 4, 6, 5]);
    let w = t(&[6, 4, 3, 3]);
    let e = fail(
        &x,
        &w,
        None,
        &Conv2dOptions {
            stride: [0, 1],
            ..opts()
        },
    );
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    assert_mentions(&e, &["stride", "[0, 1]"]);
    let e = fail(
        &x,
        &w,
        None,
        &Conv2dOptions {
            dilation: [1, 0],
            ..opts()
        },
    );
    assert_mentions(&e, &["dilation", "[1, 0]"]);
    let pool = |f: fn(&mut Pool2dOptions)| {
        let mut o = Pool2dOptions::new([2, 2]);
        f(&mut o);
        pool::forward(&pool::Inputs::max(&x), &o).unwrap_err()
    };
    assert_mentions(&pool(|o| o.stride = Some([1, 0])), &["stride", "[1, 0]"]);
    assert_mentions(
        &pool(|o| o.kernel_size = [0, 2]),
        &["kernel_size", "[0, 2]"],
    );
    assert_mentions(&pool(|o| o.dilation = [0, 2]), &["dilation", "[0, 2]"]);
}

#[test]
fn kernel_larger_than_padded_input() {
    let e = fail(&t(&[1, 4, 3, 5]), &t(&[6, 4, 5, 3]), None, &opts());
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
    assert_mentions(&e, &["height", "5", "3 + 2 * 0"]);
    // Padding makes it fit; dilation makes it too wide again.
    let pad = Conv2dOptions {
        padding: [1, 0],
        ..opts()
    };
    conv::forward(
        &conv::Inputs::new(&t(&[1, 4, 3, 5]), &t(&[6, 4, 5, 3])),
        &pad,
    )
    .unwrap();
    let dil = Conv2dOptions {
        dilation: [1, 3],
        ..opts()
    };
    let e = fail(&t(&[1, 4, 6, 5]), &t(&[6, 4, 3, 3]), None, &dil);
    assert_mentions(&e, &["width", "7 wide", "5 + 2 * 0"]);
    let e = pool::forward(
        &pool::Inputs::max(&t(&[1, 1, 2, 2])),
        &Pool2dOptions::new([3, 3]),
    )
    .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
}

#[test]
fn pooling_options() {
    let x = t(&[1, 2, 6, 6]);
    let pad = Pool2dOptions {
        padding: [2, 1],
        ..Pool2dOptions::new([3, 3])
    };
    let e = pool::forward(&pool::Inputs::max(&x), &pad).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    assert_mentions(&e, &["padding [2, 1]", "half", "[3, 3]"]);
    let dil = Pool2dOptions {
        dilation: [2, 2],
        ..Pool2dOptions::new([2, 2])
    };
    assert_mentions(
        &pool::forward(&pool::Inputs::avg(&x), &dil)
            .map(|o| o.y)
            .unwrap_err(),
        &["dilation", "[2, 2]"],
    );
    let div = Pool2dOptions {
        divisor_override: Some(0),
        ..Pool2dOptions::new([2, 2])
    };
    assert_mentions(
        &pool::forward(&pool::Inputs::avg(&x), &div)
            .map(|o| o.y)
            .unwrap_err(),
        &["divisor_override", "0"],
    );
    let div = Pool2dOptions {
        divisor_override: Some(3),
        ..Pool2dOptions::new([2, 2])
    };
    assert_mentions(
        &pool::forward(&pool::Inputs::max(&x), &div).unwrap_err(),
        &["average-pooling"],
    );
    // A dilated window wholly in the padding.
    let o = Pool2dOptions {
        stride: Some([1, 1]),
        padding: [0, 1],
        dilation: [1, 2],
        ..Pool2dOptions::new([1, 2])
    };
    let e = pool::forward(&pool::Inputs::max(&t(&[1, 1, 1, 1])), &o).unwrap_err();
    assert_mentions(&e, &["wholly in the padding", "width"]);
}

#[test]
fn backward_arguments() {
    let x = t(&[1, 4, 6, 5]);
    let w = t(&[6, 4, 3, 3]);
    let dy = t(&[1, 6, 4, 3]);
    conv::backward(&conv::BackwardInputs::new(&x, &w, &dy), &opts()).unwrap();
    let e = conv::backward(
        &conv::BackwardInputs::new(&x, &w, &t(&[1, 6, 4, 4])),
        &opts(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
    assert_mentions(&e, &["dy", "[1, 6, 4, 4]", "[1, 6, 4, 3]"]);
    let dyh = t_dtype(DType::F16, &[1, 6, 4, 3]);
    let e = conv::backward(&conv::BackwardInputs::new(&x, &w, &dyh), &opts()).unwrap_err();
    assert!(matches!(e, Error::DTypeMismatch { .. }), "{e:?}");
    let p = Pool2dOptions::new([2, 2]);
    let m = pool::forward(&pool::Inputs::max(&x), &p).unwrap();
    let idx = m.max_indices().unwrap().to_host().unwrap();
    let e = pool::backward(
        &pool::BackwardInputs::max(&x, &t(&[1, 4, 3, 3]), &pool::Indices::Host(idx.to_vec())),
        &p,
    )
    .unwrap_err();
    assert_mentions(&e, &["dy", "[1, 4, 3, 3]", "[1, 4, 3, 2]"]);
    let e = pool::backward(
        &pool::BackwardInputs::max(&x, &m.y, &pool::Indices::Host(idx[1..].to_vec())),
        &p,
    )
    .unwrap_err();
    assert_mentions(&e, &["indices", "23", "24"]);
    let mut bad = idx.clone();
    bad[3] = 30;
    let e = pool::backward(
        &pool::BackwardInputs::max(&x, &m.y, &pool::Indices::Host(bad.to_vec())),
        &p,
    )
    .unwrap_err();
    assert_mentions(&e, &["indices", "30", "6x5"]);
    let e = pool::backward(&pool::BackwardInputs::avg(&x, &t(&[1, 4, 3, 3])), &p).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
}

#[test]
fn names_parse() {
    assert_eq!(Activation::from_name("gelu").unwrap(), Activation::Gelu);
    assert_mentions(
        &Activation::from_name("tanh").unwrap_err(),
        &["\"tanh\"", "relu"],
    );
    assert_eq!(ConvAlgo::from_name("im2col").unwrap(), ConvAlgo::Im2col);
    assert_mentions(&ConvAlgo::from_name("fft").unwrap_err(), &["\"fft\""]);
}

#[test]
fn any_strides_are_accepted_on_the_cpu() {
    // A (1, 4, 6, 5) view with a padded channel stride.
    let storage = t(&[1, 4 * 40]);
    let x = HostTensor::from_data(
        storage.data().clone(),
        Layout {
            shape: vec![1, 4, 6, 5],
            strides: vec![160, 40, 5, 1],
        },
    )
    .unwrap();
    conv::forward(&conv::Inputs::new(&x, &t(&[6, 4, 3, 3])), &opts()).unwrap();
}

#[cfg(any(feature = "cuda", feature = "emulator"))]
mod cuda {
    //! The CUDA-only checks, through the `*_views` entry points with fake pointers: all
    //! fail before the driver is touched.

    use super::*;
    use flashkernels::conv::cuda;
    use flashkernels::pool::{cuda as pool_cuda, PoolKind};
    use flashkernels::DeviceView;

    fn view(dtype: DType, shape: &[usize], ptr: u64, device: usize) -> DeviceView {
        DeviceView {
            ptr,
            dtype,
            layout: Layout::contiguous(shape),
            device,
        }
    }

    #[test]
    fn output_views_are_checked() {
        let x = view(DType::F16, &[1, 8, 6, 6], 0x1000, 0);
        let w = view(DType::F16, &[8, 8, 3, 3], 0x2000, 0);
        let bad_y = view(DType::F16, &[1, 8, 4, 5], 0x3000, 0);
        // SAFETY: fails validation before any pointer is used.
        let e = unsafe {
            cuda::conv2d_forward_views(&x, &w, None, &bad_y, None, &opts(), std::ptr::null_mut())
        }
        .unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
        assert_mentions(&e, &["y", "[1, 8, 4, 4]", "[1, 8, 4, 5]"]);
        let y = view(DType::F16, &[1, 8, 4, 4], 0x3000, 1);
        let e = unsafe {
            cuda::conv2d_forward_views(&x, &w, None, &y, None, &opts(), std::ptr::null_mut())
        }
        .unwrap_err();
        assert!(matches!(e, Error::DeviceMismatch { .. }), "{e:?}");
        let y = view(DType::F16, &[1, 8, 4, 4], 0x3001, 0);
        let e = unsafe {
            cuda::conv2d_forward_views(&x, &w, None, &y, None, &opts(), std::ptr::null_mut())
        }
        .unwrap_err();
        assert_mentions(&e, &["y", "0x3001", "aligned"]);
        let dy = view(DType::F16, &[1, 8, 4, 4], 0x3000, 0);
        let dx = view(DType::F16, &[1, 8, 6, 5], 0x4000, 0);
        let e = unsafe {
            cuda::conv2d_backward_views(
                [&x, &w, &dy],
                [Some(&dx), None, None],
                &opts(),
                std::ptr::null_mut(),
            )
        }
        .unwrap_err();
        assert_mentions(&e, &["dx", "[1, 8, 6, 6]"]);
        let y = view(DType::F16, &[1, 8, 3, 3], 0x3000, 0);
        let max_pool = |indices: Option<&pool_cuda::IndicesView>| {
            unsafe {
                pool_cuda::pool2d_forward_views(
                    PoolKind::Max,
                    &x,
                    &y,
                    indices,
                    &Pool2dOptions::new([2, 2]),
                    std::ptr::null_mut(),
                )
            }
            .unwrap_err()
        };
        assert_mentions(&max_pool(None), &["indices", "int32"]);
        // The indices carry their shape: a short buffer is refused, never written past.
        let short = pool_cuda::IndicesView {
            ptr: 0x4000,
            shape: vec![1, 8, 3, 2],
            device: 0,
        };
        assert_mentions(
            &max_pool(Some(&short)),
            &["indices", "[1, 8, 3, 2]", "[1, 8, 3, 3]"],
        );
        let elsewhere = pool_cuda::IndicesView {
            ptr: 0x4000,
            shape: vec![1, 8, 3, 3],
            device: 1,
        };
        assert_mentions(&max_pool(Some(&elsewhere)), &["indices", "cuda:1"]);
        let misaligned = pool_cuda::IndicesView {
            ptr: 0x4002,
            shape: vec![1, 8, 3, 3],
            device: 0,
        };
        assert_mentions(&max_pool(Some(&misaligned)), &["indices", "0x4002"]);
    }
    #[test]
    fn plan_follows_the_header_contract() {
        // fk_conv2d_supports / fk_conv2d_workspace_bytes are pure: no GPU needed.
        for nhwc in [false, true] {
            let mut x = view(DType::F16, &[2, 64, 16, 16], 0x10000, 0);
            let mut w = view(DType::F16, &[64, 64, 3, 3], 0x20000, 0);
            let mut y = view(DType::F16, &[2, 64, 16, 16], 0x30000, 0);
            if nhwc {
                x.layout.strides = vec![16 * 16 * 64, 1, 16 * 64, 64];
                w.layout.strides = vec![9 * 64, 1, 3 * 64, 64];
                y.layout.strides = x.layout.strides.clone();
            }
            let mut o = Conv2dOptions {
                padding: [1, 1],
                ..opts()
            };
            let p = conv::validate((x.dtype, &x.layout), (w.dtype, &w.layout), None, &o).unwrap();
            // im2col's workspace: groups * (N*P*Q) * (C/groups*R*S rounded up to 8) f16
            // elements, 256-byte rounded: 1 * 512 * 576 * 2 bytes.
            let im2col_bytes = 512 * 576 * 2;
            let plan =
                cuda::plan(&p, [&x, &w, &y], None, None).expect("some algorithm runs a plain 3x3");
            // The implicit GEMM gathers 16 bytes along C, so it needs NHWC (C/groups = 64 is
            // a multiple of 8); NCHW falls back to im2col.
            let want = if nhwc {
                ConvAlgo::ImplicitGemm
            } else {
                ConvAlgo::Im2col
            };
            assert_eq!(plan.algo, want, "nhwc={nhwc}");
            let bytes = if nhwc { 0 } else { im2col_bytes };
            assert_eq!(plan.workspace_bytes, bytes, "nhwc={nhwc}");
            o.algo = Some(ConvAlgo::Im2col);
            let p = conv::validate((x.dtype, &x.layout), (w.dtype, &w.layout), None, &o).unwrap();
            let plan = cuda::plan(&p, [&x, &w, &y], None, None)
                .unwrap_or_else(|e| panic!("forced im2col runs every layout (nhwc={nhwc}): {e}"));
            assert_eq!(plan.algo, ConvAlgo::Im2col);
            assert_eq!(plan.workspace_bytes, im2col_bytes, "nhwc={nhwc}");
            // A forced implicit GEMM runs NHWC and refuses NCHW with a typed error.
            o.algo = Some(ConvAlgo::ImplicitGemm);
            let p = conv::validate((x.dtype, &x.layout), (w.dtype, &w.layout), None, &o).unwrap();
            match cuda::plan(&p, [&x, &w, &y], None, None) {
                Ok(plan) => {
                    assert!(nhwc, "implicit GEMM accepted an NCHW input: {plan:?}");
                    assert_eq!(plan.algo, ConvAlgo::ImplicitGemm);
                    assert_eq!(plan.workspace_bytes, 0);
                }
                Err(e) => {
                    assert!(!nhwc, "implicit GEMM refused an NHWC input: {e}");
                    assert!(
                        matches!(e, Error::Unsupported(_)),
                        "want Unsupported, got {e:?}"
                    );
                    assert_mentions(&e, &["implicit_gemm"]);
                }
            }
        }
    }
}
