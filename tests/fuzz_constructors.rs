//! The Rust fuzz suites (issue 13, "must be true" 4; this file: the constructors; the
//! ops in tests/fuzz_attention.rs and tests/fuzz_conv.rs): proptest throws arbitrary
//! shapes (0, 1, small, and huge: 2^40, 2^62, usize::MAX / 3, ...), strides (contiguous, zero,
//! overlapping, huge), options (windows, scales NaN / inf / 0 / negative / 1e-45, conv
//! padding / stride / dilation / groups, pooling kernel / stride / padding / dilation /
//! ceil_mode / divisors), masks and global tokens at every public constructor and every
//! op, forward and backward, on host tensors. Every call must return Ok — and then, for
//! the small cases, agree with an independent f64 definition written here (it reads the
//! inputs through their strides itself and shares no code with the library) — or a
//! typed Err; never panic (each call runs under `catch_unwind`) and never hang (a
//! watchdog fails the run when one call takes over 20 s; the sizes are such that every
//! valid case is tiny and every huge one must be refused before it allocates).
//!
//! Inputs tried per run: see `CASES` (each case calls the forward and, where the
//! forward succeeded, the backward, plus error-path variants).

mod fuzz_common;

use fuzz_common::*;
use std::sync::atomic::Ordering;
use std::time::Duration;

use flashkernels::longformer::TokenMask;
use flashkernels::{DType, Error, HostTensor, Layout};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

// ---------------------------------------------------------------------------------------
// Constructors: HostTensor, Layout, TokenMask.

type CtorArgs = (
    TensorSpec,
    Vec<usize>,
    usize,
    Vec<usize>,
    (usize, usize),
    (usize, usize),
    Vec<(usize, usize)>,
    Vec<Vec<i64>>,
);

#[allow(clippy::type_complexity)]
fn ctor_strategy() -> impl Strategy<Value = CtorArgs> {
    (
        spec(prop::collection::vec(dim(6), 0..=4)),
        prop::collection::vec(dim(6), 0..=4),
        0usize..64,
        prop::collection::vec(prop_oneof![4 => 0usize..7, 1 => huge()], 0..=5),
        (0usize..6, 0usize..6),
        (dim(5), dim(9)),
        prop::collection::vec((0usize..7, 0usize..11), 0..6),
        prop::collection::vec(prop::collection::vec(-3i64..12, 0..5), 0..4),
    )
}

fn constructors_case(a: &CtorArgs) -> Result<(), TestCaseError> {
    let (t, shape, data_len, index, (a, b), (batch, seqlen), positions, indices) = a.clone();
    // Layout::try_contiguous / contiguous: Ok exactly when nothing overflows.
    let fits = numel_u128(&shape) <= usize::MAX as u128;
    let r = call("Layout::try_contiguous", || Layout::try_contiguous(&shape))?;
    prop_assert_eq!(r.is_ok(), fits, "try_contiguous({:?})", shape);
    let l = call("Layout::contiguous", || Layout::contiguous(&shape))?;
    if !fits {
        prop_assert!(l.check("x", usize::MAX).is_err(), "{:?} passed check", l);
    }
    if fits {
        let n = l.numel();
        prop_assert!(
            l.check("x", n).is_ok(),
            "{:?} fails check over {} elements",
            l,
            n
        );
    }
    // HostTensor::from_fn: Ok with f's values, or TooLarge / OutOfMemory.
    let r = call("HostTensor::from_fn", || {
        HostTensor::from_fn(DType::F32, &shape, |i| i as f32)
    })?;
    match r {
        Ok(x) => {
            prop_assert!(!shape.is_empty() && small(&shape, 1 << 30));
            prop_assert_eq!(
                x.to_f32_vec(),
                (0..x.numel()).map(|i| i as f32).collect::<Vec<_>>()
            );
        }
        Err(e) => {
            typed("from_fn", &e)?;
            prop_assert!(
                shape.is_empty() || !small(&shape, 1 << 30),
                "from_fn({:?}): {}",
                shape,
                e
            );
        }
    }
    // HostTensor::from_vec: Ok exactly when the data fills the shape.
    let r = call("HostTensor::from_vec", || {
        HostTensor::from_vec(vec![1f32; data_len], &shape)
    })?;
    let want = !shape.is_empty() && fits && numel_u128(&shape) <= data_len as u128;
    prop_assert_eq!(
        r.is_ok(),
        want,
        "from_vec({} values, {:?}): {:?}",
        data_len,
        shape,
        r.as_ref().err()
    );
    // from_data with arbitrary strides, then get / transpose / conversions.
    if let Some(x) = build(&t)?.filter(|x| x.numel() <= 1 << 16) {
        let l = x.layout().clone();
        let vals = logical(&x);
        let got = call("to_f32_vec", || x.try_to_f32_vec())?;
        if let Ok(got) = got {
            let got: Vec<f64> = got.into_iter().map(f64::from).collect();
            prop_assert_eq!(&got, &vals);
            let c = call("to_contiguous", || x.try_to_contiguous(DType::F32))?
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(logical(&c), vals.clone());
        }
        let in_bounds =
            index.len() == l.shape.len() && index.iter().zip(&l.shape).all(|(i, n)| i < n);
        let g = call("get", || x.get(&index))?;
        prop_assert_eq!(g.is_ok(), in_bounds, "get({:?}) on {:?}", index, l.shape);
        if let Ok(v) = g {
            let flat = index
                .iter()
                .zip(&l.shape)
                .fold(0usize, |acc, (i, n)| acc * n + i);
            prop_assert_eq!(v as f64, vals[flat]);
        }
        let tr = call("transpose", || x.transpose(a, b))?;
        prop_assert_eq!(tr.is_ok(), a < l.shape.len() && b < l.shape.len());
    }
    // TokenMask::from_positions / from_indices: Ok exactly when every position is in
    // range (and, for from_indices, listed once, for each of `batch` sequences).
    let r = call("TokenMask::from_positions", || {
        TokenMask::from_positions(batch, seqlen, &positions)
    })?;
    let mask_fits = small(&[batch, seqlen], 1 << 40);
    let in_range = positions.iter().all(|&(b, i)| b < batch && i < seqlen);
    match r {
        Ok(m) => {
            prop_assert!(in_range && mask_fits);
            for &(b, i) in &positions {
                prop_assert!(m.values[b * seqlen + i]);
            }
            prop_assert_eq!(
                m.values.iter().filter(|&&v| v).count(),
                positions
                    .iter()
                    .collect::<std::collections::BTreeSet<_>>()
                    .len()
            );
        }
        Err(e) => {
            typed("from_positions", &e)?;
            let oom = matches!(e, Error::OutOfMemory { .. });
            prop_assert!(!in_range || !mask_fits || oom, "{}", e);
        }
    }
    let r = call("TokenMask::from_indices", || {
        TokenMask::from_indices(batch, seqlen, &indices)
    })?;
    let valid = indices.len() == batch
        && mask_fits
        && indices.iter().all(|l| {
            l.iter().all(|&i| i >= 0 && (i as u128) < seqlen as u128)
                && l.iter().collect::<std::collections::BTreeSet<_>>().len() == l.len()
        });
    let oom = matches!(r, Err(Error::OutOfMemory { .. }));
    prop_assert!(
        r.is_ok() == valid || oom,
        "from_indices({}, {}, {:?}): {:?}",
        batch,
        seqlen,
        indices,
        r.err()
    );
    tally(|t| t.checked.fetch_add(1, Ordering::Relaxed));
    Ok(())
}

#[test]
fn fuzz_constructors() {
    fuzz(
        "fuzz_constructors",
        CASES * 2,
        ctor_strategy(),
        constructors_case,
    );
}

/// The watchdog itself: run with `--ignored watchdog_fires`; the process must exit 101
/// after about 20 s, naming the call.
#[test]
#[ignore = "shows the watchdog firing: exits the process after a 20 s call"]
fn watchdog_fires() {
    let _ = call("a call that sleeps for a minute", || {
        std::thread::sleep(Duration::from_secs(60))
    });
}
