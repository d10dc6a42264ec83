//! Issue 13's reproducers on the Rust API (items 2, 3 and 7 here; items 6 and 8's Rust side
//! in tests/fuzz_reproducers_calls.rs): each one gives a typed error or the right result,
//! quickly, and never panics, aborts or hangs. The property-based fuzz suites
//! (tests/fuzz_{constructors,attention,conv}.rs) throw arbitrary inputs at the same
//! entries; these files pin the cases the issue lists, plus what the fuzz suites found.

mod fuzz_common;

use fuzz_common::repro::*;
use std::time::Duration;

use flashkernels::attention::{self, AttentionOptions};
use flashkernels::conv::{self, Conv2dOptions};
use flashkernels::longformer::{self, LongformerOptions, TokenMask};
use flashkernels::pool::{self, Pool2dOptions};
use flashkernels::{DType, Error, HostData, HostTensor, Layout};

// ---------------------------------------------------------------------------------------
// Item 7: constructors return Err, never panic, abort or wrap.

#[test]
fn layout_contiguous_never_wraps() {
    let e = Layout::try_contiguous(&[2, usize::MAX, 2]).unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e:?}");
    // The infallible form saturates, so the layout can never pass a storage check.
    let l = Layout::contiguous(&[2, usize::MAX, 2]);
    assert_eq!(l.strides, vec![usize::MAX, 2, 1]);
    assert_eq!(l.numel(), usize::MAX);
    assert_eq!(l.checked_numel(), None);
    assert!(l.check("x", usize::MAX).is_err());
    // An empty tensor reaches no element: its strides saturate, and any fit.
    let empty = Layout::try_contiguous(&[0, usize::MAX, 4]).unwrap();
    assert_eq!(empty.strides, vec![usize::MAX, 4, 1]);
    empty.check("x", 0).unwrap();
    assert_eq!(
        Layout::try_contiguous(&[3, 0, 4]).unwrap().strides,
        vec![0, 4, 1]
    );
    assert_eq!(
        Layout::try_contiguous(&[2, 3, 4]).unwrap().strides,
        vec![12, 4, 1]
    );
}

#[test]
fn host_tensor_constructors_refuse_huge_shapes() {
    let e = quick("from_fn [MAX, 2]", Duration::from_secs(5), || {
        HostTensor::from_fn(DType::F32, &[usize::MAX, 2], |_| 0.0)
    })
    .unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e:?}");
    // 4 TiB: an allocation failure is an error, not an abort.
    let e = quick("from_fn [1 << 40]", Duration::from_secs(5), || {
        HostTensor::from_fn(DType::F32, &[1 << 40], |_| 0.0)
    })
    .unwrap_err();
    assert!(
        matches!(e, Error::OutOfMemory { bytes, .. } if bytes == 4 << 40),
        "{e:?}"
    );
    assert!(e.to_string().contains("4398046511104 bytes"), "{e}");
    let e = HostTensor::from_vec(vec![0f32; 4], &[usize::MAX, 2]).unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e:?}");
    let e = HostTensor::from_vec(vec![0f32; 4], &[]).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    // Strides that overflow when multiplied out are refused, not wrapped.
    let bad = Layout {
        shape: vec![3, 3],
        strides: vec![usize::MAX / 2 + 1, 1],
    };
    assert!(HostTensor::from_data(HostData::F32(vec![0.0; 9]), bad).is_err());
    let e = HostTensor::from_data(
        HostData::F32(vec![0.0]),
        Layout {
            shape: vec![usize::MAX, 2],
            strides: vec![0, 0],
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e:?}");
}

#[test]
fn get_and_transpose_check_their_index() {
    let t = filled(&[2, 3], |i| i as f32);
    assert_eq!(t.get(&[1, 2]).unwrap(), 5.0);
    for bad in [&[1][..], &[1, 3], &[2, 0], &[0, 0, 0], &[]] {
        let e = t.get(bad).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{bad:?}: {e:?}");
    }
    let tt = t.transpose(0, 1).unwrap();
    assert_eq!(tt.shape(), &[3, 2]);
    assert_eq!(tt.get(&[2, 1]).unwrap(), 5.0);
    assert_eq!(values(&tt), vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    assert!(t.transpose(0, 2).is_err());
}

#[test]
fn token_masks_check_their_positions() {
    let e = quick("from_positions", Duration::from_secs(1), || {
        TokenMask::from_positions(1, 4, &[(0, 9)])
    })
    .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    assert!(e.to_string().contains("(0, 9)"), "{e}");
    assert!(TokenMask::from_positions(1, 4, &[(1, 0)]).is_err());
    let m = TokenMask::from_positions(2, 3, &[(1, 2), (0, 0)]).unwrap();
    assert_eq!(m.values, vec![true, false, false, false, false, true]);
    for (b, n) in [(1, usize::MAX), (usize::MAX, 2), (1 << 62, 1 << 2)] {
        let e = quick("from_indices", Duration::from_secs(1), || {
            TokenMask::from_indices(b, n, &vec![vec![]; b.min(1)])
        })
        .unwrap_err();
        assert!(
            matches!(e, Error::TooLarge { .. } | Error::ShapeMismatch { .. }),
            "{e:?}"
        );
        let e = TokenMask::from_positions(b, n, &[]).unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{e:?}");
    }
    let e = TokenMask::from_indices(1, 4, &[vec![i64::MIN]]).unwrap_err();
    assert!(e.to_string().contains(&i64::MIN.to_string()), "{e}");
}

// ---------------------------------------------------------------------------------------
// Item 2: attention windows, conv and pooling options in checked arithmetic.

fn attn(q: &HostTensor, k: &HostTensor, o: &AttentionOptions) -> (Vec<f32>, Vec<f32>) {
    let r = attention::forward(&attention::Inputs::new(q, k, k), o).unwrap();
    (values(&r.out), values(&r.lse))
}

#[test]
fn huge_windows_mean_unbounded() {
    let q = filled(&[1, 5, 2, 8], |i| ((i * 7) % 11) as f32 / 11.0 - 0.5);
    let k = filled(&[1, 7, 2, 8], |i| ((i * 5) % 13) as f32 / 13.0 - 0.5);
    let none = attn(&q, &k, &AttentionOptions::default());
    for w in [usize::MAX, usize::MAX / 2 + 1, 1 << 40, 7] {
        let right = AttentionOptions {
            window_right: Some(w),
            ..Default::default()
        };
        assert_eq!(attn(&q, &k, &right), none, "window_right {w}");
        let left = AttentionOptions {
            window_left: Some(w),
            ..Default::default()
        };
        assert_eq!(attn(&q, &k, &left), none, "window_left {w}");
        let both = AttentionOptions {
            window_left: Some(w),
            window_right: Some(w),
            ..Default::default()
        };
        assert_eq!(attn(&q, &k, &both), none, "both {w}");
        // Causal with a huge left window is causal.
        let causal = AttentionOptions {
            causal: true,
            window_left: Some(w),
            ..Default::default()
        };
        let plain_causal = AttentionOptions {
            causal: true,
            ..Default::default()
        };
        assert_eq!(attn(&q, &k, &causal), attn(&q, &k, &plain_causal));
    }
    // Clamped consistently: the validated problem holds windows no wider than the
    // sequence.
    let p = attention::validate(
        q.described(),
        k.described(),
        k.described(),
        &AttentionOptions {
            window_left: Some(usize::MAX),
            window_right: Some(1 << 40),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!((p.window_left, p.window_right), (Some(7), Some(5)));
    assert_eq!(p.visible_keys(0, 5, 7), 0..7);
    // A window of 1 still masks.
    let narrow = AttentionOptions {
        window_left: Some(1),
        window_right: Some(0),
        ..Default::default()
    };
    assert_ne!(attn(&q, &k, &narrow), none);
}

#[test]
fn longformer_huge_window_and_dilation_are_clipped() {
    let q = filled(&[1, 6, 2, 8], |i| ((i * 7) % 11) as f32 / 11.0 - 0.5);
    let run = |window: usize, dilation: usize| {
        let mut o = LongformerOptions::new(window);
        o.dilation = vec![dilation];
        let r = quick("longformer", Duration::from_secs(5), || {
            longformer::forward(&longformer::Inputs::new(&q, &q, &q), &o)
        })
        .unwrap();
        (values(&r.out), values(&r.lse))
    };
    let full = run(6, 1);
    assert_eq!(run(usize::MAX, 1), full);
    assert_eq!(run(1 << 40, usize::MAX), run(6, 6));
}

fn conv_err(opts: &Conv2dOptions) -> Error {
    let (x, w) = (conv_x(), conv_w());
    quick("conv2d", Duration::from_secs(2), || {
        conv::forward(&conv::Inputs::new(&x, &w), opts)
    })
    .unwrap_err()
}

#[test]
fn conv_options_in_checked_arithmetic() {
    for (padding, dilation) in [
        ([usize::MAX / 2 + 1, 0], [1, 1]),
        ([0, usize::MAX / 2 + 1], [1, 1]),
        ([1 << 63, 0], [1, 1]),
        ([usize::MAX, usize::MAX], [1, 1]),
        ([0, 0], [1 << 63, 1]),
        ([0, 0], [1, usize::MAX]),
        ([1 << 62, 0], [1, 1]), // valid sizes, but an output of 2^63 rows
    ] {
        let e = conv_err(&Conv2dOptions {
            padding,
            dilation,
            ..Default::default()
        });
        assert!(
            matches!(e, Error::ShapeMismatch { .. } | Error::TooLarge { .. }),
            "padding {padding:?} dilation {dilation:?}: {e:?}"
        );
        // The message reports the real (unwrapped) sizes.
        assert!(!e.to_string().contains("so 1 wide"), "{e}");
    }
    // Huge strides are fine: one output row.
    let (x, w) = (conv_x(), conv_w());
    let y = conv::forward(
        &conv::Inputs::new(&x, &w),
        &Conv2dOptions {
            stride: [usize::MAX, usize::MAX],
            ..Default::default()
        },
    )
    .unwrap()
    .y;
    assert_eq!(y.shape(), &[1, 3, 1, 1]);
    // A huge dilation with a 1-wide kernel is valid and changes nothing.
    let w1 = filled(&[3, 2, 1, 1], |i| i as f32);
    let base = conv::forward(&conv::Inputs::new(&x, &w1), &Conv2dOptions::default())
        .unwrap()
        .y;
    let dil = conv::forward(
        &conv::Inputs::new(&x, &w1),
        &Conv2dOptions {
            dilation: [usize::MAX, usize::MAX],
            ..Default::default()
        },
    )
    .unwrap()
    .y;
    assert_eq!(values(&base), values(&dil));
    assert!(conv::output_size(5, 3, 1, usize::MAX, 1, false).is_none());
    assert!(conv::output_size(5, 3, 1, 0, usize::MAX, false).is_none());
    assert!(conv::output_size(5, 0, 1, 0, 1, false).is_none());
    assert!(conv::output_size(5, 2, 0, 0, 1, false).is_none());
    assert_eq!(conv::output_size(5, 3, usize::MAX, 1, 1, true), Some(1));
}

#[test]
fn conv_reference_padding_half_max_is_an_error() {
    let (x, w) = (conv_x(), conv_w());
    let e = conv::validate(
        x.described(),
        w.described(),
        None,
        &Conv2dOptions {
            padding: [usize::MAX / 2 + 1, 0],
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
}

#[test]
fn pooling_with_huge_kernels_errs_or_is_fast() {
    let x = pool_x(6, 6);
    // The hang: 2^63 + 1 taps, dilation 2, wraps to a 1-wide window.
    let mut o = Pool2dOptions::new([(1 << 63) + 1, 1]);
    o.dilation = [2, 1];
    let e = quick("max_pool2d 2^63+1", Duration::from_secs(2), || {
        pool::forward(&pool::Inputs::max(&x), &o)
    })
    .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
    assert!(e.to_string().contains("9223372036854775809"), "{e}");
    // A valid window of 2^40 taps over a 1x1 input (padding 2^39): one output, which
    // is the input (max) or the input over the window's area (avg); no loop over taps.
    let one = filled(&[1, 1, 1, 1], |_| 3.0);
    let mut o = Pool2dOptions::new([1 << 40, 1]);
    o.padding = [1 << 39, 0];
    let (y, idx) = quick("max_pool2d 2^40", Duration::from_secs(2), || {
        let r = pool::forward(&pool::Inputs::max(&one), &o).unwrap();
        (values(&r.y), r.indices.unwrap().to_host().unwrap())
    });
    assert_eq!((y, idx), (vec![3.0], vec![0]));
    let y = quick("avg_pool2d 2^40", Duration::from_secs(2), || {
        values(&pool::forward(&pool::Inputs::avg(&one), &o).unwrap().y)
    });
    assert_eq!(y, vec![3.0 / (1u64 << 40) as f32]);
    let dy = filled(&[1, 1, 1, 1], |_| 1.0);
    let dx = quick("avg_pool2d_backward 2^40", Duration::from_secs(2), || {
        pool::backward(&pool::BackwardInputs::avg(&one, &dy), &o).unwrap()
    });
    assert_eq!(values(&dx), vec![1.0 / (1u64 << 40) as f32]);
    // A 2^40 x 2^40 window with padding: its divisor (2^80) does not fit a usize.
    let mut o = Pool2dOptions::new([1 << 40, 1 << 40]);
    o.padding = [1 << 39, 1 << 39];
    let y = values(&pool::forward(&pool::Inputs::avg(&one), &o).unwrap().y);
    assert_eq!(y, vec![3.0 / 2f32.powi(80)]);
    // Every other huge option is an error.
    for (kernel, stride, padding, dilation) in [
        ([usize::MAX, 1], None, [0, 0], [1, 1]),
        ([2, 2], Some([usize::MAX, 1]), [0, 0], [1, 1]),
        ([2, 2], None, [0, 0], [usize::MAX, 1]),
        ([usize::MAX, 1], None, [usize::MAX / 2, 0], [1, 1]),
        ([usize::MAX, 1], None, [usize::MAX / 2, 0], [2, 1]),
    ] {
        let o = Pool2dOptions {
            kernel_size: kernel,
            stride,
            padding,
            dilation,
            ..Pool2dOptions::new(kernel)
        };
        let r = quick("pool", Duration::from_secs(2), || {
            pool::forward(&pool::Inputs::max(&x), &o)
        });
        match r {
            Err(e) => assert!(
                matches!(
                    e,
                    Error::ShapeMismatch { .. }
                        | Error::InvalidArgument(_)
                        | Error::TooLarge { .. }
                ),
                "{o:?}: {e:?}"
            ),
            Ok(r) => assert_eq!(r.y.shape()[2], 1, "{o:?}"),
        }
    }
}

#[test]
fn max_pool_backward_checks_indices() {
    let x = pool_x(6, 6);
    let o = Pool2dOptions::new([2, 2]);
    let f = pool::forward(&pool::Inputs::max(&x), &o).unwrap();
    let dy = filled(&[1, 2, 3, 3], |_| 1.0);
    for bad in [vec![0; 1], vec![0; 100], vec![36; 18], vec![-1; 18]] {
        let idx = pool::Indices::Host(bad.clone());
        let e = pool::backward(&pool::BackwardInputs::max(&x, &dy, &idx), &o).unwrap_err();
        assert!(
            matches!(e, Error::ShapeMismatch { .. } | Error::InvalidArgument(_)),
            "{bad:?}: {e:?}"
        );
    }
    let idx = f.indices.unwrap();
    pool::backward(&pool::BackwardInputs::max(&x, &dy, &idx), &o).unwrap();
}

// ---------------------------------------------------------------------------------------
// Item 3: allocation failures are errors; strided views cost their own elements.

#[test]
fn allocation_failures_are_errors() {
    // K and V broadcast over 2^40 keys (one stored element): the validator accepts
    // the sizes, the reference cannot allocate their f32 copies and says so.
    let q = filled(&[1, 1, 1, 8], |_| 1.0);
    let kv = broadcast_rows(&[1, 1 << 40, 1, 8]);
    let e = quick("attention OOM", Duration::from_secs(5), || {
        attention::forward(
            &attention::Inputs::new(&q, &kv, &kv),
            &AttentionOptions::default(),
        )
    })
    .unwrap_err();
    assert!(matches!(e, Error::OutOfMemory { .. }), "{e:?}");
    assert!(e.to_string().contains("bytes"), "{e}");
    // Past MAX_ELEMENTS the validator refuses the size itself.
    let kv = broadcast_rows(&[1 << 20, 1 << 40, 1, 8]);
    let q = broadcast_rows(&[1 << 20, 1, 1, 8]);
    let e = attention::forward(
        &attention::Inputs::new(&q, &kv, &kv),
        &AttentionOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e:?}");
    // The same for conv and pooling inputs.
    let x = broadcast(&[1, 1, 1 << 20, 1 << 20]);
    let w = filled(&[1, 1, 1, 1], |_| 1.0);
    let e = quick("conv OOM", Duration::from_secs(5), || {
        conv::forward(&conv::Inputs::new(&x, &w), &Conv2dOptions::default())
    })
    .unwrap_err();
    assert!(matches!(e, Error::OutOfMemory { .. }), "{e:?}");
    let e = quick("pool OOM", Duration::from_secs(5), || {
        pool::forward(&pool::Inputs::max(&x), &Pool2dOptions::new([1, 1]))
    })
    .unwrap_err();
    assert!(matches!(e, Error::OutOfMemory { .. }), "{e:?}");
}

#[test]
fn strided_views_read_only_their_elements() {
    // A (1, 4, 1, 8) view of every 1000th row of a 4000-row buffer, and its contiguous
    // copy, give the same attention.
    let base = filled(&[1, 4000, 1, 8], |i| ((i * 13) % 17) as f32 / 17.0 - 0.5);
    let HostData::F32(data) = base.data().clone() else {
        unreachable!()
    };
    let view = HostTensor::from_data(
        HostData::F32(data),
        Layout {
            shape: vec![1, 4, 1, 8],
            strides: vec![32000, 8000, 8, 1],
        },
    )
    .unwrap();
    assert_eq!(view.to_f32_vec().len(), 32);
    let dense = view.to_contiguous(DType::F32);
    assert_eq!(dense.data().len(), 32);
    let o = AttentionOptions::default();
    assert_eq!(attn(&view, &view, &o), attn(&dense, &dense, &o));
    // Overlapping and zero strides are read element by element too.
    let overlapping = HostTensor::from_data(
        HostData::F32((0..10).map(|i| i as f32).collect()),
        Layout {
            shape: vec![3, 4],
            strides: vec![2, 1],
        },
    )
    .unwrap();
    assert_eq!(
        values(&overlapping),
        vec![0., 1., 2., 3., 2., 3., 4., 5., 4., 5., 6., 7.]
    );
    let size_one_dim = HostTensor::from_data(
        HostData::F32(vec![1.0, 2.0]),
        Layout {
            shape: vec![1, 2],
            strides: vec![usize::MAX, 1],
        },
    )
    .unwrap();
    assert_eq!(values(&size_one_dim), vec![1.0, 2.0]);
}
