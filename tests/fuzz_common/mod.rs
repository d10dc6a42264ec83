//! The harness and input strategies of the Rust fuzz suites (tests/fuzz_*.rs other than
//! fuzz_reproducers): what every family shares. See tests/fuzz_constructors.rs for what
//! the suites require of every call.
#![allow(dead_code)]

pub mod repro;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use flashkernels::{DType, Error, HostData, HostTensor, Layout};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// Cases per property (each property below is one op family).
pub const CASES: u32 = 4096;

// ---------------------------------------------------------------------------------------
// Harness: panics fail the case, a watchdog fails the run on a hang.

/// The calls in flight, per test thread (the families run in parallel): when each
/// started and what it is.
pub static WATCH: Mutex<Vec<(std::thread::ThreadId, Instant, String)>> = Mutex::new(Vec::new());
pub static WATCHDOG: Once = Once::new();
pub const HANG: Duration = Duration::from_secs(20);

/// Runs `f` under `catch_unwind` and the watchdog: a panic is a failed case, a call that
/// runs past [`HANG`] ends the process with the case's description.
pub fn call<R>(what: &str, f: impl FnOnce() -> R) -> Result<R, TestCaseError> {
    WATCHDOG.call_once(|| {
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_millis(250));
            if let Ok(w) = WATCH.lock() {
                if let Some((_, start, what)) = w.iter().find(|(_, s, _)| s.elapsed() > HANG) {
                    eprintln!("fuzz: a call hung for {:?}: {what}", start.elapsed());
                    std::process::exit(101);
                }
            }
        });
    });
    let me = std::thread::current().id();
    if let Ok(mut w) = WATCH.lock() {
        w.push((me, Instant::now(), what.to_string()));
    }
    let r = catch_unwind(AssertUnwindSafe(f));
    if let Ok(mut w) = WATCH.lock() {
        if let Some(i) = w.iter().rposition(|(t, _, _)| *t == me) {
            w.remove(i);
        }
    }
    r.map_err(|p| {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        TestCaseError::fail(format!("{what}: panicked: {msg}"))
    })
}

/// Every error must be one of the typed, user-facing variants (no Cuda / driver error
/// on the host path) with a message.
pub fn typed(what: &str, e: &Error) -> Result<(), TestCaseError> {
    tally(|t| t.err.fetch_add(1, Ordering::Relaxed));
    let ok = matches!(
        e,
        Error::Rank { .. }
            | Error::ShapeMismatch { .. }
            | Error::DTypeMismatch { .. }
            | Error::UnsupportedDType { .. }
            | Error::NonUnitStride { .. }
            | Error::Empty { .. }
            | Error::TooLarge { .. }
            | Error::InvalidArgument(_)
            | Error::Unsupported(_)
            | Error::OutOfMemory { .. }
    );
    prop_assert!(
        ok && !e.to_string().is_empty(),
        "{what}: unexpected error {e:?}"
    );
    Ok(())
}

/// What the cases of one family ended in.
#[derive(Default)]
pub struct Tally {
    /// Ok, and checked against the definitions here.
    pub checked: AtomicU64,
    /// Ok (outputs' shapes and the backward checked), values not compared (extreme
    /// scales, huge kernels).
    pub ok: AtomicU64,
    /// A typed error from the op.
    pub err: AtomicU64,
    /// A tensor constructor refused an input (as it must).
    pub refused: AtomicU64,
}

thread_local! {
    static TALLY: std::cell::RefCell<Option<std::sync::Arc<Tally>>> = const { std::cell::RefCell::new(None) };
}

pub fn tally<R>(f: impl FnOnce(&Tally) -> R) {
    TALLY.with(|t| {
        if let Some(t) = t.borrow().as_ref() {
            f(t);
        }
    });
}

/// Runs `cases` random cases of one family (failures are saved to
/// tests/<suite>.proptest-regressions and replayed first), then prints what they ended in.
pub fn fuzz<S: Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    run: impl Fn(&S::Value) -> Result<(), TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    let t = std::sync::Arc::new(Tally::default());
    TALLY.with(|x| *x.borrow_mut() = Some(t.clone()));
    let config = ProptestConfig {
        cases,
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
        )),
        ..ProptestConfig::default()
    };
    let start = Instant::now();
    let mut runner = proptest::test_runner::TestRunner::new(config);
    // The whole case runs under the watchdog too (the definitions here included).
    let r = runner.run(&strategy, |v| call(&format!("{name}: {v:?}"), || run(&v))?);
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    eprintln!(
        "{name}: {cases} cases in {:?}: {} ok and checked against the definition, {} ok \
         (values unchecked), {} typed errors, {} inputs refused by the tensor constructors",
        start.elapsed(),
        n(&t.checked),
        n(&t.ok),
        n(&t.err),
        n(&t.refused)
    );
    if let Err(e) = r {
        panic!("{name}: {e}");
    }
}

// ---------------------------------------------------------------------------------------
// Sizes, strides and tensors.

/// Huge sizes: none of them may ever be allocated or looped over.
pub const HUGE: [usize; 6] = [
    1 << 40,
    1 << 62,
    usize::MAX / 3,
    usize::MAX / 2 + 1,
    usize::MAX - 1,
    usize::MAX,
];

pub fn huge() -> impl Strategy<Value = usize> {
    prop::sample::select(HUGE.to_vec())
}

/// A dimension: mostly small (0 and 1 included), sometimes huge.
pub fn dim(max: usize) -> impl Strategy<Value = usize> {
    prop_oneof![24 => 1..=max, 1 => Just(0usize), 1 => huge()]
}

/// A positive size that is small, or huge, or 0.
pub fn option_size(max: usize) -> impl Strategy<Value = usize> {
    prop_oneof![20 => 1..=max, 1 => Just(0usize), 2 => huge()]
}

/// How one dimension's stride is made.
#[derive(Debug, Clone, Copy)]
pub enum StrideKind {
    /// Row-major over the dimensions after it.
    Contiguous,
    /// Broadcast.
    Zero,
    /// Overlapping or sparse: a small stride.
    Small(usize),
    /// Past any storage.
    Huge(usize),
}

pub fn stride_kind() -> impl Strategy<Value = StrideKind> {
    prop_oneof![
        40 => Just(StrideKind::Contiguous),
        2 => Just(StrideKind::Zero),
        2 => (1usize..=7).prop_map(StrideKind::Small),
        1 => huge().prop_map(StrideKind::Huge),
    ]
}

/// A tensor description: shape, stride kinds, dtype, and how much storage to give it.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub shape: Vec<usize>,
    pub strides: Vec<StrideKind>,
    pub dtype: DType,
    /// Storage = span + extra (or a too-short storage when `short`).
    pub extra: usize,
    pub short: bool,
    pub seed: u64,
}

pub fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)]
}

/// Storage bigger than this is not built: the case keeps a small storage and the
/// constructor must refuse it.
pub const MAX_STORAGE: usize = 1 << 16;

/// The layout of a spec (strides saturate; the library must refuse them if they
/// overflow).
pub fn layout_of(s: &TensorSpec) -> Layout {
    let mut strides = vec![0usize; s.shape.len()];
    let mut acc = 1usize;
    for i in (0..s.shape.len()).rev() {
        strides[i] = match s.strides[i] {
            StrideKind::Contiguous => acc,
            StrideKind::Zero => 0,
            StrideKind::Small(k) => k,
            StrideKind::Huge(h) => h,
        };
        acc = acc.saturating_mul(s.shape[i].max(1));
    }
    Layout {
        shape: s.shape.clone(),
        strides,
    }
}

/// 1 + sum (n - 1) * stride in u128, or 0 when empty.
pub fn span_u128(l: &Layout) -> u128 {
    if l.shape.contains(&0) {
        return 0;
    }
    l.shape.iter().zip(&l.strides).fold(1u128, |acc, (&n, &s)| {
        acc.saturating_add((n as u128 - 1).saturating_mul(s as u128))
    })
}

pub fn numel_u128(shape: &[usize]) -> u128 {
    shape
        .iter()
        .fold(1u128, |a, &n| a.saturating_mul(n as u128))
}

/// SplitMix64 values in [-2, 2), exactly representable in every dtype after rounding.
pub fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

pub fn host_data(dtype: DType, v: &[f32]) -> HostData {
    match dtype {
        DType::F32 => HostData::F32(v.to_vec()),
        DType::F16 => HostData::F16(v.iter().map(|&x| half::f16::from_f32(x)).collect()),
        DType::BF16 => HostData::BF16(v.iter().map(|&x| half::bf16::from_f32(x)).collect()),
    }
}

/// Builds the tensor, checking the constructor's verdict against the layout: Ok exactly
/// when the rank is positive, the element count fits and the span fits the storage.
/// `None` when it (rightly) refused.
pub fn build(s: &TensorSpec) -> Result<Option<HostTensor>, TestCaseError> {
    let layout = layout_of(s);
    let span = span_u128(&layout);
    let len = if span > MAX_STORAGE as u128 {
        16
    } else if s.short && span > 0 {
        span as usize - 1
    } else {
        span as usize + s.extra
    };
    let data = host_data(s.dtype, &values(s.seed, len));
    let r = call("HostTensor::from_data", || {
        HostTensor::from_data(data, layout.clone())
    })?;
    let numel_fits = numel_u128(&s.shape) <= usize::MAX as u128;
    let empty = s.shape.contains(&0);
    let should = !s.shape.is_empty() && numel_fits && (empty || span <= len as u128);
    match r {
        Ok(t) => {
            prop_assert!(should, "from_data accepted {layout:?} over {len} elements");
            Ok(Some(t))
        }
        Err(e) => {
            prop_assert!(!should, "from_data refused {layout:?} over {len}: {e}");
            typed("from_data", &e)?;
            tally(|t| t.refused.fetch_add(1, Ordering::Relaxed));
            Ok(None)
        }
    }
}

pub fn spec(shape: impl Strategy<Value = Vec<usize>>) -> impl Strategy<Value = TensorSpec> {
    shape.prop_flat_map(|shape| {
        let r = shape.len();
        (
            Just(shape),
            prop::collection::vec(stride_kind(), r),
            dtype(),
            0usize..3,
            prop::bool::weighted(0.02),
            any::<u64>(),
        )
            .prop_map(|(shape, strides, dtype, extra, short, seed)| TensorSpec {
                shape,
                strides,
                dtype,
                extra,
                short,
                seed,
            })
    })
}

/// The logical values of a tensor, read through its strides here (not by the library).
pub fn logical(t: &HostTensor) -> Vec<f64> {
    let (shape, strides) = (t.shape().to_vec(), t.strides().to_vec());
    let n = if shape.contains(&0) {
        0
    } else {
        shape.iter().product()
    };
    let read = |o: usize| -> f64 {
        match t.data() {
            HostData::F32(v) => v[o] as f64,
            HostData::F16(v) => v[o].to_f64(),
            HostData::BF16(v) => v[o].to_f64(),
        }
    };
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..n {
        out.push(read(idx.iter().zip(&strides).map(|(i, s)| i * s).sum()));
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

/// Output length of a window sweep in u128 (None when the window does not fit), as the
/// definition says: floor((len + 2 pad - dil (k - 1) - 1) / stride) + 1, ceil variant.
pub fn sweep_len(
    len: usize,
    k: usize,
    st: usize,
    pad: usize,
    dil: usize,
    ceil: bool,
) -> Option<u128> {
    let (len, k, st, pad, dil) = (len as u128, k as u128, st as u128, pad as u128, dil as u128);
    if k == 0 || st == 0 {
        return None;
    }
    let span = dil * (k - 1) + 1;
    let padded = len + 2 * pad;
    if span > padded {
        return None;
    }
    let room = padded - span;
    let mut out = if ceil {
        room.div_ceil(st) + 1
    } else {
        room / st + 1
    };
    if ceil && (out - 1) * st >= len + pad {
        out -= 1;
    }
    Some(out)
}

/// Outputs of this many elements are valid but too big to compute in a fuzz case (the
/// generators make them rare); smaller ones run and are checked, bigger ones must be
/// refused before anything is allocated.
pub fn mid_size(elements: u128) -> bool {
    elements > 1 << 20 && elements < 1 << 40
}

pub fn small(shape: &[usize], limit: usize) -> bool {
    numel_u128(shape) <= limit as u128
}

/// Half-ulp of the output dtype, relative.
pub fn eps(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-6,
        DType::F16 => 1.0 / 1024.0,
        DType::BF16 => 1.0 / 128.0,
    }
}

pub fn close(what: &str, got: &[f64], want: &[f64], tol: f64) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len(), "{}: lengths", what);
    let scale = want
        .iter()
        .filter(|x| x.is_finite())
        .fold(1.0f64, |a, &x| a.max(x.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_finite() {
            (g - w).abs() <= tol * scale
        } else {
            g == w
        };
        prop_assert!(
            ok,
            "{}: element {} is {}, want {} (tol {})",
            what,
            i,
            g,
            w,
            tol * scale
        );
    }
    Ok(())
}

// Helpers of the op suites (fuzz_ffn, fuzz_linformer, fuzz_reformer).

pub fn other_dtype(d: DType) -> DType {
    match d {
        DType::F32 => DType::F16,
        DType::F16 => DType::BF16,
        DType::BF16 => DType::F32,
    }
}

/// `got` within `abs` of `want`, elementwise.
pub fn within(what: &str, got: &[f64], want: &[f64], abs: f64) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len(), "{}: lengths", what);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        prop_assert!(
            (g - w).abs() <= abs,
            "{}: element {} is {}, want {} (tol {})",
            what,
            i,
            g,
            w,
            abs
        );
    }
    Ok(())
}

/// `t` with dimension `at` one larger (contiguous, values from `seed`).
pub fn grown(t: &HostTensor, at: usize, seed: u64) -> HostTensor {
    let mut shape = t.shape().to_vec();
    let r = shape.len();
    shape[at % r] += 1;
    let n: usize = shape.iter().product();
    let v = values(seed, n);
    HostTensor::from_fn(t.dtype(), &shape, |i| v[i]).expect("small")
}

/// `t`'s values with the last dimension at stride 2.
pub fn strided(t: &HostTensor) -> HostTensor {
    let shape = t.shape().to_vec();
    let r = shape.len();
    let mut strides = vec![2usize; r];
    for i in (0..r - 1).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    let vals = logical(t);
    let mut flat = vec![0f32; vals.len() * 2];
    for (i, x) in vals.iter().enumerate() {
        flat[2 * i] = *x as f32;
    }
    HostTensor::from_data(host_data(t.dtype(), &flat), Layout { shape, strides }).expect("small")
}

pub fn contiguous(shape: &[usize]) -> Layout {
    let mut strides = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1].saturating_mul(shape[i + 1].max(1));
    }
    Layout {
        shape: shape.to_vec(),
        strides,
    }
}

/// A dimension: mostly small, now and then 0 or huge.
pub fn dimw(max: usize) -> impl Strategy<Value = usize> {
    prop_oneof![60 => 1..=max, 1 => Just(0usize), 1 => huge()]
}
