//! Issue 13's reproducers on the Rust API (items 2, 3, 6, 7 and 8's Rust side): each
//! one gives a typed error or the right result, quickly, and never panics, aborts or
//! hangs. The property-based fuzz suites (tests/fuzz_ops.rs) throw arbitrary inputs at
//! the same entries; this file pins the cases the issue lists, plus what the fuzz suite
//! found.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use flashkernels::attention::{self, AttentionOptions};
use flashkernels::conv::{self, Conv2dOptions};
use flashkernels::longformer::{self, LongformerOptions, TokenMask};
use flashkernels::ops::{scale_to_f32, with_interrupt_check, with_interrupt_check_every};
use flashkernels::pool::{self, Pool2dOptions};
use flashkernels::{DType, Error, HostData, HostTensor, Layout};

/// Runs `f`, failing the test on a panic or when it takes longer than `limit`.
fn quick<R>(what: &str, limit: Duration, f: impl FnOnce() -> R) -> R {
    let start = Instant::now();
    let r = catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| panic!("{what}: panicked"));
    assert!(
        start.elapsed() < limit,
        "{what}: took {:?} (limit {limit:?})",
        start.elapsed()
    );
    r
}

fn filled(shape: &[usize], f: impl Fn(usize) -> f32) -> HostTensor {
    HostTensor::from_fn(DType::F32, shape, f).unwrap()
}

fn values(t: &HostTensor) -> Vec<f32> {
    t.to_f32_vec()
}

/// A tensor of `shape` over a single stored element (every stride 0): a broadcast view,
/// as numpy's `broadcast_to` gives, whose logical size can be anything.
fn broadcast(shape: &[usize]) -> HostTensor {
    let layout = Layout {
        shape: shape.to_vec(),
        strides: vec![0; shape.len()],
    };
    HostTensor::from_data(HostData::F32(vec![0.5]), layout).unwrap()
}

/// Like [`broadcast`], but over one stored row: the last dimension has unit stride, as
/// attention needs.
fn broadcast_rows(shape: &[usize]) -> HostTensor {
    let mut strides = vec![0; shape.len()];
    strides[shape.len() - 1] = 1;
    let row = shape[shape.len() - 1];
    let layout = Layout {
        shape: shape.to_vec(),
        strides,
    };
    HostTensor::from_data(HostData::F32(vec![0.5; row]), layout).unwrap()
}

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

fn conv_x() -> HostTensor {
    filled(&[1, 2, 5, 5], |i| (i % 7) as f32 - 3.0)
}

fn conv_w() -> HostTensor {
    filled(&[3, 2, 3, 3], |i| (i % 5) as f32 / 5.0 - 0.4)
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

fn pool_x(h: usize, w: usize) -> HostTensor {
    filled(&[1, 2, h, w], |i| ((i * 7) % 11) as f32 - 5.0)
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

// ---------------------------------------------------------------------------------------
// Item 6: long CPU calls check for interrupts.

/// A forward that takes a while on two cores (about a second unoptimised).
fn long_attention() -> (HostTensor, HostTensor) {
    let q = filled(&[1, 2048, 2, 64], |i| ((i * 7) % 11) as f32 / 11.0 - 0.5);
    let k = filled(&[1, 2048, 2, 64], |i| ((i * 5) % 13) as f32 / 13.0 - 0.5);
    (q, k)
}

#[test]
fn interrupt_check_runs_during_long_calls_and_stops_them() {
    let (q, k) = long_attention();
    let run = || {
        attention::forward(
            &attention::Inputs::new(&q, &k, &k),
            &AttentionOptions::default(),
        )
    };
    // A checker that never interrupts is called regularly while the call runs.
    let calls = AtomicUsize::new(0);
    let ok = || -> flashkernels::Result<()> {
        calls.fetch_add(1, Ordering::Relaxed);
        Ok(())
    };
    let start = Instant::now();
    let interval = Duration::from_millis(10);
    let r = with_interrupt_check_every(interval, &ok, run);
    let elapsed = start.elapsed();
    r.unwrap();
    let n = calls.load(Ordering::Relaxed);
    let expected = (elapsed.as_millis() / interval.as_millis()) as usize;
    assert!(
        n >= 1 && n * 4 >= expected,
        "{n} checks in {elapsed:?} (every {interval:?} would be {expected})"
    );
    // A checker that interrupts on its first call stops the call within an interval
    // or two, with its error.
    let calls = AtomicUsize::new(0);
    let stop = || -> flashkernels::Result<()> {
        calls.fetch_add(1, Ordering::Relaxed);
        Err(Error::Interrupted)
    };
    let start = Instant::now();
    let e = with_interrupt_check_every(interval, &stop, run).unwrap_err();
    assert_eq!(e, Error::Interrupted);
    assert!(
        start.elapsed() < elapsed / 2 + Duration::from_millis(200),
        "stopped after {:?} (the whole call takes {elapsed:?})",
        start.elapsed()
    );
    assert!(calls.load(Ordering::Relaxed) >= 1);
    // Outside the scope nothing is checked, and the call runs to the end.
    assert!(run().is_ok());
    // The default interval (50 ms) also interrupts.
    let e = with_interrupt_check(&stop, run).unwrap_err();
    assert_eq!(e, Error::Interrupted);
}

#[test]
fn every_reference_is_interruptible() {
    let stop = || -> flashkernels::Result<()> { Err(Error::Interrupted) };
    let every = Duration::ZERO;
    let interrupted = |what: &str, r: flashkernels::Result<()>| {
        assert_eq!(r, Err(Error::Interrupted), "{what}");
    };
    let (q, k) = long_attention();
    let f = attention::forward(
        &attention::Inputs::new(&q, &k, &k),
        &AttentionOptions::default(),
    )
    .unwrap();
    interrupted(
        "attention backward",
        with_interrupt_check_every(every, &stop, || {
            attention::backward(
                &attention::BackwardInputs::new([&q, &k, &k, &f.out, &f.lse, &f.out]),
                &AttentionOptions::default(),
            )
            .map(drop)
        }),
    );
    let lq = filled(&[1, 64, 2, 8], |i| (i % 5) as f32);
    let lo = LongformerOptions::new(4);
    interrupted(
        "longformer forward",
        with_interrupt_check_every(every, &stop, || {
            longformer::forward(&longformer::Inputs::new(&lq, &lq, &lq), &lo).map(drop)
        }),
    );
    let lf = longformer::forward(&longformer::Inputs::new(&lq, &lq, &lq), &lo).unwrap();
    interrupted(
        "longformer backward",
        with_interrupt_check_every(every, &stop, || {
            let i = longformer::Inputs::new(&lq, &lq, &lq).backward(&lf.out, &lf.lse, &lf.out);
            longformer::backward(&i, &lo).map(drop)
        }),
    );
    let (x, w) = (conv_x(), conv_w());
    interrupted(
        "conv forward",
        with_interrupt_check_every(every, &stop, || {
            conv::forward(&conv::Inputs::new(&x, &w), &Conv2dOptions::default()).map(drop)
        }),
    );
    let dy = filled(&[1, 3, 3, 3], |_| 1.0);
    interrupted(
        "conv backward",
        with_interrupt_check_every(every, &stop, || {
            conv::backward(
                &conv::BackwardInputs::new(&x, &w, &dy),
                &Conv2dOptions::default(),
            )
            .map(drop)
        }),
    );
    let px = pool_x(6, 6);
    let po = Pool2dOptions::new([2, 2]);
    let pf = pool::forward(&pool::Inputs::max(&px), &po).unwrap();
    let pdy = filled(&[1, 2, 3, 3], |_| 1.0);
    for (name, r) in [
        (
            "max pool",
            with_interrupt_check_every(every, &stop, || {
                pool::forward(&pool::Inputs::max(&px), &po).map(drop)
            }),
        ),
        (
            "avg pool",
            with_interrupt_check_every(every, &stop, || {
                pool::forward(&pool::Inputs::avg(&px), &po).map(drop)
            }),
        ),
        (
            "avg pool backward",
            with_interrupt_check_every(every, &stop, || {
                pool::backward(&pool::BackwardInputs::avg(&px, &pdy), &po).map(drop)
            }),
        ),
        (
            "max pool backward",
            with_interrupt_check_every(every, &stop, || {
                let idx = pf.indices.as_ref().unwrap();
                pool::backward(&pool::BackwardInputs::max(&px, &pdy, idx), &po).map(drop)
            }),
        ),
    ] {
        interrupted(name, r);
    }
    // The infallible public references never stop half-way, even inside a scope.
    let p = attention::validate(
        q.described(),
        k.described(),
        k.described(),
        &AttentionOptions::default(),
    )
    .unwrap();
    let small: Vec<f32> = vec![0.1; 2048 * 2 * 64];
    let (o, _) = with_interrupt_check_every(every, &stop, || {
        flashkernels::reference::attention(&p, &small, &small, &small)
    });
    assert_eq!(o.len(), small.len());
}

// ---------------------------------------------------------------------------------------
// Item 8 (Rust side): messages show the value given.

#[test]
fn scale_messages_show_the_value_given() {
    let e = scale_to_f32("softmax_scale", 1e-50).unwrap_err();
    assert!(e.to_string().contains("1e-50"), "{e}");
    assert!(e.to_string().contains("float32"), "{e}");
    let e = scale_to_f32("softmax_scale", 1e50).unwrap_err();
    assert!(e.to_string().contains("1e50"), "{e}");
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, -0.0] {
        let e = scale_to_f32("scale", bad).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{bad}: {e:?}");
    }
    assert_eq!(scale_to_f32("scale", 0.125).unwrap(), 0.125);
    // The Rust API takes f32: a tiny positive (subnormal) scale is a valid scale, and a
    // bad one is shown as given.
    let q = filled(&[1, 2, 1, 8], |i| i as f32);
    for (scale, shown) in [(0.0f32, "0.0"), (-1e-40, "-1e-40"), (f32::NAN, "NaN")] {
        let e = attention::forward(
            &attention::Inputs::new(&q, &q, &q),
            &AttentionOptions {
                scale: Some(scale),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains(shown), "{e}");
    }
    attention::forward(
        &attention::Inputs::new(&q, &q, &q),
        &AttentionOptions {
            scale: Some(1e-40),
            ..Default::default()
        },
    )
    .unwrap();
}

// ---------------------------------------------------------------------------------------
// Item 7: a problem changed after validation (its fields are public) is an error in the
// fallible references, never a division by zero or an out-of-bounds index.

#[test]
fn altered_problems_are_errors() {
    use flashkernels::reference as r;
    let q = filled(&[1, 4, 2, 8], |i| i as f32 / 64.0);
    let k = filled(&[1, 4, 1, 8], |i| i as f32 / 32.0);
    let p = attention::validate(
        q.described(),
        k.described(),
        k.described(),
        &AttentionOptions::default(),
    )
    .unwrap();
    let (qv, kv) = (values(&q), values(&k));
    assert!(r::try_attention(&p, &qv, &kv, &kv).is_ok());
    for alter in [
        (|p: &mut attention::AttentionProblem| p.heads_kv = 0) as fn(&mut _),
        |p| p.heads = 3,
        |p| p.seqlen_q = usize::MAX,
        |p| p.batch = 2,
    ] {
        let mut bad = p.clone();
        alter(&mut bad);
        let e = quick("try_attention", Duration::from_secs(1), || {
            r::try_attention(&bad, &qv, &kv, &kv)
        })
        .unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidArgument(_) | Error::ShapeMismatch { .. } | Error::TooLarge { .. }
            ),
            "{e:?}"
        );
    }
    // Buffers of the wrong length.
    assert!(r::try_attention(&p, &qv[1..], &kv, &kv).is_err());

    let (x, w) = (conv_x(), conv_w());
    let p = conv::validate(
        x.described(),
        w.described(),
        None,
        &Conv2dOptions::default(),
    )
    .unwrap();
    let (xv, wv) = (
        values(&x).into_iter().map(f64::from).collect::<Vec<_>>(),
        values(&w).into_iter().map(f64::from).collect::<Vec<_>>(),
    );
    assert!(r::try_conv2d(&p, &xv, &wv, None).is_ok());
    for alter in [
        (|p: &mut conv::Conv2dProblem| p.groups = 0) as fn(&mut _),
        |p| p.padding = [usize::MAX / 2 + 1, 0],
        |p| p.p = 1 << 40,
        |p| p.dilation = [1 << 63, 1],
    ] {
        let mut bad = p.clone();
        alter(&mut bad);
        assert!(r::try_conv2d(&bad, &xv, &wv, None).is_err(), "{bad:?}");
    }

    let px = pool_x(6, 6);
    let pv: Vec<f64> = values(&px).into_iter().map(f64::from).collect();
    let p = pool::validate_pool(
        pool::PoolKind::Max,
        px.described(),
        &Pool2dOptions::new([2, 2]),
    )
    .unwrap();
    assert!(r::try_max_pool2d(&p, &pv).is_ok());
    for alter in [
        (|p: &mut pool::Pool2dProblem| p.kernel = [(1 << 63) + 1, 1]) as fn(&mut _),
        |p| p.p = 1 << 40,
        |p| p.stride = [0, 1],
    ] {
        let mut bad = p.clone();
        alter(&mut bad);
        let e = quick("try_max_pool2d", Duration::from_secs(1), || {
            r::try_max_pool2d(&bad, &pv)
        });
        assert!(e.is_err(), "{bad:?}");
        assert!(r::try_avg_pool2d(&bad, &pv).is_err());
    }

    let lq = filled(&[1, 6, 2, 8], |i| (i % 5) as f32);
    let p = longformer::validate(
        lq.described(),
        lq.described(),
        lq.described(),
        None,
        None,
        None,
        &LongformerOptions::new(2),
    )
    .unwrap();
    let lv = values(&lq);
    let x = r::LongformerInputs {
        q: &lv,
        k: &lv,
        v: &lv,
        q_g: &lv,
        k_g: &lv,
        v_g: &lv,
    };
    assert!(r::try_longformer(&p, &x).is_ok());
    for alter in [
        (|p: &mut longformer::LongformerProblem| p.dilation = vec![]) as fn(&mut _),
        |p| p.dilation = vec![0, 1],
        |p| p.global_positions = vec![vec![9]],
        |p| p.seqlen = 7,
        |p| p.global.clear(),
    ] {
        let mut bad = p.clone();
        alter(&mut bad);
        assert!(r::try_longformer(&bad, &x).is_err(), "{bad:?}");
    }
}
