//! Issue 13's reproducers on the Rust API, continued (tests/fuzz_reproducers.rs has items
//! 2, 3 and 7): long CPU calls stop on an interrupt (item 6), scale messages show the value
//! given (item 8), and references refuse a problem altered after validation.

mod fuzz_common;

use fuzz_common::repro::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use flashkernels::attention::{self, AttentionOptions};
use flashkernels::conv::{self, Conv2dOptions};
use flashkernels::longformer::{self, LongformerOptions};
use flashkernels::ops::{scale_to_f32, with_interrupt_check, with_interrupt_check_every};
use flashkernels::pool::{self, Pool2dOptions};
use flashkernels::{Error, HostTensor};

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
