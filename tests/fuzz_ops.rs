//! The Rust fuzz suite (issue 13, "must be true" 4): proptest throws arbitrary shapes
//! (0, 1, small, and huge: 2^40, 2^62, usize::MAX / 3, ...), strides (contiguous, zero,
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

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use flashkernels::attention::{self, AttentionOptions};
use flashkernels::conv::{self, Activation, Conv2dOptions, ConvGrads};
use flashkernels::longformer::{self, LongformerOptions, TokenMask};
use flashkernels::pool::{self, Pool2dOptions, PoolKind};
use flashkernels::{DType, Error, HostData, HostTensor, Layout};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// Cases per property (each property below is one op family).
const CASES: u32 = 4096;

// ---------------------------------------------------------------------------------------
// Harness: panics fail the case, a watchdog fails the run on a hang.

/// The calls in flight, per test thread (the families run in parallel): when each
/// started and what it is.
static WATCH: Mutex<Vec<(std::thread::ThreadId, Instant, String)>> = Mutex::new(Vec::new());
static WATCHDOG: Once = Once::new();
const HANG: Duration = Duration::from_secs(20);

/// Runs `f` under `catch_unwind` and the watchdog: a panic is a failed case, a call that
/// runs past [`HANG`] ends the process with the case's description.
fn call<R>(what: &str, f: impl FnOnce() -> R) -> Result<R, TestCaseError> {
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
fn typed(what: &str, e: &Error) -> Result<(), TestCaseError> {
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
struct Tally {
    /// Ok, and checked against the definitions here.
    checked: AtomicU64,
    /// Ok (outputs' shapes and the backward checked), values not compared (extreme
    /// scales, huge kernels).
    ok: AtomicU64,
    /// A typed error from the op.
    err: AtomicU64,
    /// A tensor constructor refused an input (as it must).
    refused: AtomicU64,
}

thread_local! {
    static TALLY: std::cell::RefCell<Option<std::sync::Arc<Tally>>> = const { std::cell::RefCell::new(None) };
}

fn tally<R>(f: impl FnOnce(&Tally) -> R) {
    TALLY.with(|t| {
        if let Some(t) = t.borrow().as_ref() {
            f(t);
        }
    });
}

/// Runs `cases` random cases of one family (failures are saved to
/// tests/fuzz_ops.proptest-regressions and replayed first), then prints what they ended in.
fn fuzz<S: Strategy>(
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
const HUGE: [usize; 6] = [
    1 << 40,
    1 << 62,
    usize::MAX / 3,
    usize::MAX / 2 + 1,
    usize::MAX - 1,
    usize::MAX,
];

fn huge() -> impl Strategy<Value = usize> {
    prop::sample::select(HUGE.to_vec())
}

/// A dimension: mostly small (0 and 1 included), sometimes huge.
fn dim(max: usize) -> impl Strategy<Value = usize> {
    prop_oneof![24 => 1..=max, 1 => Just(0usize), 1 => huge()]
}

/// A positive size that is small, or huge, or 0.
fn option_size(max: usize) -> impl Strategy<Value = usize> {
    prop_oneof![20 => 1..=max, 1 => Just(0usize), 2 => huge()]
}

/// How one dimension's stride is made.
#[derive(Debug, Clone, Copy)]
enum StrideKind {
    /// Row-major over the dimensions after it.
    Contiguous,
    /// Broadcast.
    Zero,
    /// Overlapping or sparse: a small stride.
    Small(usize),
    /// Past any storage.
    Huge(usize),
}

fn stride_kind() -> impl Strategy<Value = StrideKind> {
    prop_oneof![
        40 => Just(StrideKind::Contiguous),
        2 => Just(StrideKind::Zero),
        2 => (1usize..=7).prop_map(StrideKind::Small),
        1 => huge().prop_map(StrideKind::Huge),
    ]
}

/// A tensor description: shape, stride kinds, dtype, and how much storage to give it.
#[derive(Debug, Clone)]
struct TensorSpec {
    shape: Vec<usize>,
    strides: Vec<StrideKind>,
    dtype: DType,
    /// Storage = span + extra (or a too-short storage when `short`).
    extra: usize,
    short: bool,
    seed: u64,
}

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)]
}

/// Storage bigger than this is not built: the case keeps a small storage and the
/// constructor must refuse it.
const MAX_STORAGE: usize = 1 << 16;

/// The layout of a spec (strides saturate; the library must refuse them if they
/// overflow).
fn layout_of(s: &TensorSpec) -> Layout {
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
fn span_u128(l: &Layout) -> u128 {
    if l.shape.contains(&0) {
        return 0;
    }
    l.shape.iter().zip(&l.strides).fold(1u128, |acc, (&n, &s)| {
        acc.saturating_add((n as u128 - 1).saturating_mul(s as u128))
    })
}

fn numel_u128(shape: &[usize]) -> u128 {
    shape
        .iter()
        .fold(1u128, |a, &n| a.saturating_mul(n as u128))
}

/// SplitMix64 values in [-2, 2), exactly representable in every dtype after rounding.
fn values(seed: u64, n: usize) -> Vec<f32> {
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

fn host_data(dtype: DType, v: &[f32]) -> HostData {
    match dtype {
        DType::F32 => HostData::F32(v.to_vec()),
        DType::F16 => HostData::F16(v.iter().map(|&x| half::f16::from_f32(x)).collect()),
        DType::BF16 => HostData::BF16(v.iter().map(|&x| half::bf16::from_f32(x)).collect()),
    }
}

/// Builds the tensor, checking the constructor's verdict against the layout: Ok exactly
/// when the rank is positive, the element count fits and the span fits the storage.
/// `None` when it (rightly) refused.
fn build(s: &TensorSpec) -> Result<Option<HostTensor>, TestCaseError> {
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

fn spec(shape: impl Strategy<Value = Vec<usize>>) -> impl Strategy<Value = TensorSpec> {
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
fn logical(t: &HostTensor) -> Vec<f64> {
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
fn sweep_len(len: usize, k: usize, st: usize, pad: usize, dil: usize, ceil: bool) -> Option<u128> {
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
fn mid_size(elements: u128) -> bool {
    elements > 1 << 20 && elements < 1 << 40
}

fn small(shape: &[usize], limit: usize) -> bool {
    numel_u128(shape) <= limit as u128
}

/// Half-ulp of the output dtype, relative.
fn eps(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-6,
        DType::F16 => 1.0 / 1024.0,
        DType::BF16 => 1.0 / 128.0,
    }
}

fn close(what: &str, got: &[f64], want: &[f64], tol: f64) -> Result<(), TestCaseError> {
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

// ---------------------------------------------------------------------------------------
// Dense attention.

fn window() -> impl Strategy<Value = Option<usize>> {
    prop_oneof![3 => Just(None), 4 => (0usize..6).prop_map(Some), 1 => huge().prop_map(Some)]
}

fn scale() -> impl Strategy<Value = Option<f32>> {
    prop_oneof![
        10 => Just(None),
        8 => (0.05f32..2.0).prop_map(Some),
        2 => prop::sample::select(vec![
            0.0f32, -0.0, -1.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY,
            1e-45, 1e-38, 1e30, f32::MAX,
        ]).prop_map(Some),
    ]
}

fn scale_is_moderate(s: Option<f32>) -> bool {
    s.is_none_or(|s| (1e-3..=1e3).contains(&s))
}

#[derive(Debug, Clone)]
struct AttnCase {
    q: TensorSpec,
    k: TensorSpec,
    v: TensorSpec,
    opts: AttentionOptions,
    dout_seed: u64,
}

/// Mostly consistent shapes (b, nq, h, d) / (b, nk, h_kv, d), sometimes one dimension
/// replaced by an arbitrary one.
fn attn_case() -> impl Strategy<Value = AttnCase> {
    (
        (
            dim(2),
            dim(6),
            dim(6),
            prop_oneof![8 => 1usize..=3, 1 => Just(0usize)],
            1usize..=3,
            dim(8),
        ),
        prop::option::weighted(0.1, (0usize..3, 0usize..4, dim(8))),
        prop::bool::weighted(0.9),
    )
        .prop_flat_map(|((b, nq, nk, hkv, g, d), mutate, same_dtype)| {
            let mut shapes = [
                vec![b, nq, hkv * g, d],
                vec![b, nk, hkv, d],
                vec![b, nk, hkv, d],
            ];
            if let Some((t, i, x)) = mutate {
                shapes[t][i] = x;
            }
            let [sq, sk, sv] = shapes;
            (
                spec(Just(sq)),
                spec(Just(sk)),
                spec(Just(sv)),
                (window(), window(), any::<bool>(), scale()),
                any::<u64>(),
                Just(same_dtype),
            )
        })
        .prop_map(
            |(q, mut k, mut v, (wl, wr, causal, scale), dout_seed, same)| {
                if same {
                    k.dtype = q.dtype;
                    v.dtype = q.dtype;
                }
                AttnCase {
                    q,
                    k,
                    v,
                    opts: AttentionOptions {
                        scale,
                        causal,
                        window_left: wl,
                        window_right: wr,
                    },
                    dout_seed,
                }
            },
        )
}

/// Keys [lo, hi) that query i of (nq, nk) sees, in i128 from the definition.
fn naive_keys(o: &AttentionOptions, i: usize, nq: usize, nk: usize) -> std::ops::Range<usize> {
    let diag = i as i128 + nk as i128 - nq as i128;
    let right = if o.causal { Some(0) } else { o.window_right };
    let lo = o.window_left.map_or(0, |w| diag - w as i128).max(0);
    let hi = right
        .map_or(nk as i128, |w| diag + w as i128 + 1)
        .min(nk as i128);
    if lo >= hi {
        0..0
    } else {
        lo as usize..hi as usize
    }
}

/// O, LSE and the probabilities of dense attention in f64.
#[allow(clippy::type_complexity)]
fn naive_attention(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    [b, nq, h, d]: [usize; 4],
    [nk, hkv]: [usize; 2],
    scale: f64,
    o: &AttentionOptions,
) -> (Vec<f64>, Vec<f64>, Vec<Vec<(usize, f64)>>) {
    let g = h / hkv;
    let mut out = vec![0.0; b * nq * h * d];
    let mut lse = vec![f64::NEG_INFINITY; b * h * nq];
    let mut probs = vec![Vec::new(); b * h * nq];
    for bi in 0..b {
        for hi in 0..h {
            let hk = hi / g;
            for i in 0..nq {
                let keys = naive_keys(o, i, nq, nk);
                if keys.is_empty() {
                    continue;
                }
                let qi = &q[((bi * nq + i) * h + hi) * d..][..d];
                let s: Vec<f64> = keys
                    .clone()
                    .map(|j| {
                        let kj = &k[((bi * nk + j) * hkv + hk) * d..][..d];
                        qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                let row = (bi * h + hi) * nq + i;
                lse[row] = m + z.ln();
                for (j, sj) in keys.zip(&s) {
                    let p = (sj - m).exp() / z;
                    probs[row].push((j, p));
                    let vj = &v[((bi * nk + j) * hkv + hk) * d..][..d];
                    for (acc, x) in out[((bi * nq + i) * h + hi) * d..][..d].iter_mut().zip(vj) {
                        *acc += p * x;
                    }
                }
            }
        }
    }
    (out, lse, probs)
}

fn attention_case(c: &AttnCase) -> Result<(), TestCaseError> {
    let (Some(q), Some(k), Some(v)) = (build(&c.q)?, build(&c.k)?, build(&c.v)?) else {
        return Ok(());
    };
    let what = format!(
        "attention {:?} {:?} {:?} {:?}",
        q.layout(),
        k.layout(),
        v.layout(),
        c.opts
    );
    let r = call(&what, || {
        attention::forward(&attention::Inputs::new(&q, &k, &v), &c.opts)
    })?;
    let f = match r {
        Ok(f) => f,
        Err(e) => return typed(&what, &e),
    };
    let [b, nq, h, d] = <[usize; 4]>::try_from(q.shape()).unwrap();
    let [_, nk, hkv, _] = <[usize; 4]>::try_from(k.shape()).unwrap();
    prop_assert_eq!(f.out.shape(), q.shape());
    prop_assert_eq!(f.lse.shape(), &[b, h, nq]);
    prop_assert!(c.q.dtype == c.k.dtype && c.q.dtype == c.v.dtype && h % hkv == 0);
    prop_assert!(
        small(q.shape(), 1 << 12) && small(k.shape(), 1 << 12),
        "accepted huge {}",
        what
    );
    let scale = c.opts.scale.map_or(1.0 / (d as f64).sqrt(), f64::from);
    prop_assert!(
        scale.is_finite() && scale > 0.0,
        "accepted scale {:?}",
        c.opts.scale
    );
    // Backward from the forward's O and LSE, with a random dO.
    let dout = HostTensor::from_vec(values(c.dout_seed, b * nq * h * d), &[b, nq, h, d])
        .unwrap()
        .to_contiguous(c.q.dtype);
    let rb = call(&what, || {
        attention::backward(
            &attention::BackwardInputs::new([&q, &k, &v, &f.out, &f.lse, &dout]),
            &c.opts,
        )
    })?;
    let g = rb.map_err(|e| TestCaseError::fail(format!("{what}: backward: {e}")))?;
    prop_assert_eq!(g.dq.shape(), q.shape());
    prop_assert_eq!(g.dk.shape(), k.shape());
    prop_assert_eq!(g.dv.shape(), v.shape());
    // A wrong LSE shape is an error.
    let bad_lse = HostTensor::from_vec(vec![0f32; b * h * nq + 1], &[b * h * nq + 1]).unwrap();
    let rb = call(&what, || {
        attention::backward(
            &attention::BackwardInputs::new([&q, &k, &v, &f.out, &bad_lse, &dout]),
            &c.opts,
        )
    })?;
    prop_assert!(rb.is_err());
    if !scale_is_moderate(c.opts.scale) {
        tally(|t| t.ok.fetch_add(1, Ordering::Relaxed));
        return Ok(());
    }
    let (qv, kv, vv) = (logical(&q), logical(&k), logical(&v));
    let (o, lse, probs) = naive_attention(&qv, &kv, &vv, [b, nq, h, d], [nk, hkv], scale, &c.opts);
    let tol = 4.0 * eps(c.q.dtype) + 1e-5;
    close(&format!("{what}: out"), &logical(&f.out), &o, tol)?;
    close(&format!("{what}: lse"), &logical(&f.lse), &lse, 1e-5)?;
    // dV = P^T dO (P from the definition).
    let dov = logical(&dout);
    let g_ = h / hkv;
    let mut dv = vec![0.0; b * nk * hkv * d];
    for bi in 0..b {
        for hi in 0..h {
            for i in 0..nq {
                for &(j, p) in &probs[(bi * h + hi) * nq + i] {
                    for x in 0..d {
                        dv[((bi * nk + j) * hkv + hi / g_) * d + x] +=
                            p * dov[((bi * nq + i) * h + hi) * d + x];
                    }
                }
            }
        }
    }
    close(
        &format!("{what}: dv"),
        &logical(&g.dv),
        &dv,
        8.0 * eps(c.q.dtype) + 1e-5,
    )?;
    for (name, t) in [("dq", &g.dq), ("dk", &g.dk)] {
        prop_assert!(
            logical(t).iter().all(|x| x.is_finite()),
            "{}: {} not finite",
            what,
            name
        );
    }
    tally(|t| t.checked.fetch_add(1, Ordering::Relaxed));
    Ok(())
}

#[test]
fn fuzz_attention() {
    fuzz("fuzz_attention", CASES, attn_case(), attention_case);
}

// ---------------------------------------------------------------------------------------
// Longformer.

#[derive(Debug, Clone)]
struct LfCase {
    q: TensorSpec,
    k: TensorSpec,
    v: TensorSpec,
    globals: Option<[TensorSpec; 3]>,
    window: usize,
    dilation: Vec<usize>,
    causal: bool,
    scale: Option<f32>,
    global_mask: Option<(Vec<usize>, Vec<bool>)>,
    padding_mask: Option<(Vec<usize>, Vec<bool>)>,
    dout_seed: u64,
}

fn mask(shape: [usize; 2]) -> impl Strategy<Value = Option<(Vec<usize>, Vec<bool>)>> {
    let n = if small(&shape, 64) {
        shape[0] * shape[1]
    } else {
        4
    };
    prop_oneof![
        6 => Just(None),
        6 => prop::collection::vec(prop::bool::weighted(0.2), n)
            .prop_map(move |v| Some((shape.to_vec(), v))),
        1 => (prop::collection::vec(dim(6), 0..=3), prop::collection::vec(any::<bool>(), 0..20))
            .prop_map(Some),
    ]
}

fn lf_case() -> impl Strategy<Value = LfCase> {
    (
        (dim(2), dim(9), 1usize..=2, dim(8)),
        prop::option::weighted(0.1, (0usize..3, 0usize..4, dim(8))),
        any::<bool>(),
    )
        .prop_flat_map(|((b, n, h, d), mutate, with_globals)| {
            let mut shapes = [vec![b, n, h, d], vec![b, n, h, d], vec![b, n, h, d]];
            if let Some((t, i, x)) = mutate {
                shapes[t][i] = x;
            }
            let [sq, sk, sv] = shapes;
            let base = vec![b, n, h, d];
            (
                (spec(Just(sq)), spec(Just(sk)), spec(Just(sv))),
                prop::option::weighted(
                    if with_globals { 0.5 } else { 0.01 },
                    (
                        spec(Just(base.clone())),
                        spec(Just(base.clone())),
                        spec(Just(base)),
                    ),
                ),
                prop_oneof![5 => 0usize..5, 1 => huge()],
                prop::collection::vec(
                    prop_oneof![16 => 1usize..4, 1 => Just(0usize), 1 => huge()],
                    1..=3,
                ),
                (any::<bool>(), scale()),
                mask([b, n]),
                mask([b, n]),
                any::<u64>(),
            )
        })
        .prop_map(
            |((q, k, v), g, window, dilation, (causal, scale), gm, pm, dout_seed)| {
                let (mut k, mut v) = (k, v);
                k.dtype = q.dtype;
                v.dtype = q.dtype;
                let globals = g.map(|(a, b, c)| {
                    let mut t = [a, b, c];
                    for x in &mut t {
                        x.dtype = q.dtype;
                    }
                    t
                });
                LfCase {
                    q,
                    k,
                    v,
                    globals,
                    window,
                    dilation,
                    causal,
                    scale,
                    global_mask: gm,
                    padding_mask: pm,
                    dout_seed,
                }
            },
        )
}

/// The Longformer rule from the module docs, in f64: O and LSE.
fn naive_longformer(
    x: [&[f64]; 6],
    [b, n, h, d]: [usize; 4],
    c: &LfCase,
    dil: &[usize],
    global: &[bool],
    padded: &[bool],
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0; b * n * h * d];
    let mut lse = vec![f64::NEG_INFINITY; b * h * n];
    let at = |bi: usize, i: usize, hi: usize| ((bi * n + i) * h + hi) * d;
    for bi in 0..b {
        for hi in 0..h {
            for i in 0..n {
                if padded[bi * n + i] {
                    continue;
                }
                let is_global = global[bi * n + i];
                let keys: Vec<usize> = (0..n)
                    .filter(|&j| !padded[bi * n + j] && (!c.causal || j <= i))
                    .filter(|&j| {
                        if is_global || global[bi * n + j] {
                            return true;
                        }
                        let (dj, di) = (j as i128 - i as i128, dil[hi] as i128);
                        dj % di == 0 && (dj / di).abs() <= c.window as i128
                    })
                    .collect();
                let (q, k, v) = if is_global {
                    (x[3], x[4], x[5])
                } else {
                    (x[0], x[1], x[2])
                };
                let qi = &q[at(bi, i, hi)..][..d];
                let s: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        qi.iter()
                            .zip(&k[at(bi, j, hi)..][..d])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                lse[(bi * h + hi) * n + i] = m + z.ln();
                for (&j, sj) in keys.iter().zip(&s) {
                    let p = (sj - m).exp() / z;
                    for (acc, y) in out[at(bi, i, hi)..][..d]
                        .iter_mut()
                        .zip(&v[at(bi, j, hi)..][..d])
                    {
                        *acc += p * y;
                    }
                }
            }
        }
    }
    (out, lse)
}

fn longformer_case(c: &LfCase) -> Result<(), TestCaseError> {
    let (Some(q), Some(k), Some(v)) = (build(&c.q)?, build(&c.k)?, build(&c.v)?) else {
        return Ok(());
    };
    let globals = match &c.globals {
        Some([a, b, g]) => match (build(a)?, build(b)?, build(g)?) {
            (Some(a), Some(b), Some(g)) => Some([a, b, g]),
            _ => return Ok(()),
        },
        None => None,
    };
    let gm = c
        .global_mask
        .as_ref()
        .map(|(s, v)| TokenMask::new(v.clone(), s));
    let pm = c
        .padding_mask
        .as_ref()
        .map(|(s, v)| TokenMask::new(v.clone(), s));
    let opts = LongformerOptions {
        window: c.window,
        dilation: c.dilation.clone(),
        causal: c.causal,
        scale: c.scale,
    };
    let inputs = longformer::Inputs::new(&q, &k, &v)
        .globals(
            globals
                .as_ref()
                .map(|[a, b, g]| longformer::GlobalProjections { q: a, k: b, v: g }),
        )
        .masks(gm.as_ref(), pm.as_ref());
    let what = format!(
        "longformer {:?} {:?} {:?}",
        q.layout(),
        opts,
        (gm.as_ref().map(|m| &m.shape), pm.as_ref().map(|m| &m.shape))
    );
    let f = match call(&what, || longformer::forward(&inputs, &opts))? {
        Ok(f) => f,
        Err(e) => return typed(&what, &e),
    };
    let [b, n, h, d] = <[usize; 4]>::try_from(q.shape()).unwrap();
    prop_assert!(small(q.shape(), 1 << 12), "accepted huge {}", what);
    prop_assert_eq!(f.out.shape(), q.shape());
    prop_assert_eq!(f.lse.shape(), &[b, h, n]);
    let dout = HostTensor::from_vec(values(c.dout_seed, b * n * h * d), &[b, n, h, d])
        .unwrap()
        .to_contiguous(c.q.dtype);
    let g = call(&what, || {
        longformer::backward(&inputs.backward(&f.out, &f.lse, &dout), &opts)
    })?
    .map_err(|e| TestCaseError::fail(format!("{what}: backward: {e}")))?;
    prop_assert_eq!(g.dq.shape(), q.shape());
    prop_assert_eq!(g.global.is_some(), globals.is_some());
    if !scale_is_moderate(c.scale) {
        tally(|t| t.ok.fetch_add(1, Ordering::Relaxed));
        return Ok(());
    }
    let dil: Vec<usize> = if c.dilation.len() == 1 {
        vec![c.dilation[0]; h]
    } else {
        c.dilation.clone()
    };
    let global = gm.map_or(vec![false; b * n], |m| m.values);
    let padded = pm.map_or(vec![false; b * n], |m| m.values);
    let (qv, kv, vv) = (logical(&q), logical(&k), logical(&v));
    let gv = globals
        .as_ref()
        .map(|[a, b, g]| [logical(a), logical(b), logical(g)]);
    let x6 = match &gv {
        Some([a, b, g]) => [&qv[..], &kv, &vv, a, b, g],
        None => [&qv[..], &kv, &vv, &qv, &kv, &vv],
    };
    let scale = c.scale.map_or(1.0 / (d as f64).sqrt(), f64::from);
    let (o, lse) = naive_longformer(x6, [b, n, h, d], c, &dil, &global, &padded, scale);
    close(
        &format!("{what}: out"),
        &logical(&f.out),
        &o,
        4.0 * eps(c.q.dtype) + 1e-5,
    )?;
    close(&format!("{what}: lse"), &logical(&f.lse), &lse, 1e-5)?;
    for t in [&g.dq, &g.dk, &g.dv] {
        prop_assert!(
            logical(t).iter().all(|x| x.is_finite()),
            "{}: gradient not finite",
            what
        );
    }
    tally(|t| t.checked.fetch_add(1, Ordering::Relaxed));
    Ok(())
}

#[test]
fn fuzz_longformer() {
    fuzz("fuzz_longformer", CASES, lf_case(), longformer_case);
}

// ---------------------------------------------------------------------------------------
// Convolution.

#[derive(Debug, Clone)]
struct ConvCase {
    x: TensorSpec,
    w: TensorSpec,
    bias: Option<TensorSpec>,
    opts: Conv2dOptions,
    dy_seed: u64,
}

fn pair(max: usize) -> impl Strategy<Value = [usize; 2]> {
    (option_size(max), option_size(max)).prop_map(|(a, b)| [a, b])
}

fn pad_pair() -> impl Strategy<Value = [usize; 2]> {
    let p = || prop_oneof![16 => 0usize..3, 1 => huge()];
    (p(), p()).prop_map(|(a, b)| [a, b])
}

fn conv_case() -> impl Strategy<Value = ConvCase> {
    (
        (dim(2), 1usize..=3, 1usize..=2, dim(6), dim(6), prop_oneof![12 => 1usize..=3, 1 => Just(0usize), 1 => huge()]),
        (dim(3), dim(3)),
        prop::option::weighted(0.1, (0usize..2, 0usize..4, dim(6))),
        (pair(3), pad_pair(), pair(3)),
        (prop::sample::select(vec![Activation::None, Activation::Relu, Activation::Gelu, Activation::Silu]), any::<bool>(), any::<u64>()),
    )
        .prop_flat_map(|((n, cg, kg, h, w, groups), (r, s), mutate, (stride, padding, dilation), (act, with_bias, dy_seed))| {
            let g = groups.clamp(1, 3);
            let mut shapes = [vec![n, cg * g, h, w], vec![kg * g, cg, r, s]];
            if let Some((t, i, x)) = mutate {
                shapes[t][i] = x;
            }
            let kout = shapes[1][0];
            let [sx, sw] = shapes;
            (
                spec(Just(sx)),
                spec(Just(sw)),
                prop::option::weighted(if with_bias { 0.6 } else { 0.01 }, spec(prop_oneof![6 => Just(vec![kout]), 1 => prop::collection::vec(dim(5), 0..=2)])),
                Just(Conv2dOptions { stride, padding, dilation, groups, activation: act, algo: None }),
                Just(dy_seed),
            )
        })
        .prop_map(|(x, mut w, mut bias, opts, dy_seed)| {
            w.dtype = x.dtype;
            if let Some(b) = &mut bias {
                b.dtype = x.dtype;
            }
            ConvCase { x, w, bias, opts, dy_seed }
        })
}

/// y_pre (= conv + bias), dx, dw of a convolution in f64, from the definition (i128
/// positions).
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn naive_conv(
    x: &[f64],
    w: &[f64],
    bias: Option<&[f64]>,
    dy: &[f64],
    [n, c, h, wd]: [usize; 4],
    [k, cg, r, s]: [usize; 4],
    [p, q]: [usize; 2],
    o: &Conv2dOptions,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let kg = k / o.groups;
    let mut y = vec![0.0; n * k * p * q];
    let mut dx = vec![0.0; x.len()];
    let mut dw = vec![0.0; w.len()];
    for b in 0..n {
        for ko in 0..k {
            let g = ko / kg;
            for oh in 0..p {
                for ow in 0..q {
                    let yi = ((b * k + ko) * p + oh) * q + ow;
                    let mut acc = bias.map_or(0.0, |bb| bb[ko]);
                    for ci in 0..cg {
                        for fr in 0..r {
                            let ih = (oh * o.stride[0]) as i128 + (fr * o.dilation[0]) as i128
                                - o.padding[0] as i128;
                            if ih < 0 || ih >= h as i128 {
                                continue;
                            }
                            for fs in 0..s {
                                let iw = (ow * o.stride[1]) as i128 + (fs * o.dilation[1]) as i128
                                    - o.padding[1] as i128;
                                if iw < 0 || iw >= wd as i128 {
                                    continue;
                                }
                                let xi =
                                    ((b * c + g * cg + ci) * h + ih as usize) * wd + iw as usize;
                                let wi = ((ko * cg + ci) * r + fr) * s + fs;
                                acc += x[xi] * w[wi];
                                dx[xi] += dy[yi] * w[wi];
                                dw[wi] += dy[yi] * x[xi];
                            }
                        }
                    }
                    y[yi] = acc;
                }
            }
        }
    }
    (y, dx, dw)
}

fn conv_case_run(c: &ConvCase) -> Result<(), TestCaseError> {
    let (Some(x), Some(w)) = (build(&c.x)?, build(&c.w)?) else {
        return Ok(());
    };
    let bias = match &c.bias {
        Some(b) => match build(b)? {
            Some(b) => Some(b),
            None => return Ok(()),
        },
        None => None,
    };
    let what = format!(
        "conv2d x {:?} w {:?} bias {:?} {:?}",
        x.layout(),
        w.layout(),
        bias.as_ref().map(|b| b.layout()),
        c.opts
    );
    if x.shape().len() == 4 && w.shape().len() == 4 {
        let o = &c.opts;
        let (xs, ws) = (x.shape(), w.shape());
        let p = sweep_len(
            xs[2],
            ws[2],
            o.stride[0],
            o.padding[0],
            o.dilation[0],
            false,
        );
        let q = sweep_len(
            xs[3],
            ws[3],
            o.stride[1],
            o.padding[1],
            o.dilation[1],
            false,
        );
        if let (Some(p), Some(q)) = (p, q) {
            let y = (xs[0] as u128)
                .saturating_mul(ws[0] as u128)
                .saturating_mul(p)
                .saturating_mul(q);
            if mid_size(y) {
                let v = call(&what, || {
                    conv::validate(x.described(), w.described(), None, o)
                })?;
                tally(|t| t.ok.fetch_add(1, Ordering::Relaxed));
                return v.map_or_else(|e| typed(&what, &e), |_| Ok(()));
            }
        }
    }
    let f = match call(&what, || {
        conv::forward(
            &conv::Inputs::new(&x, &w).bias(bias.as_ref()).keep_pre(true),
            &c.opts,
        )
    })? {
        Ok(f) => f,
        Err(e) => return typed(&what, &e),
    };
    let [n, ch, h, wd] = <[usize; 4]>::try_from(x.shape()).unwrap();
    let [k, cg, r, s] = <[usize; 4]>::try_from(w.shape()).unwrap();
    let yshape = f.y.shape().to_vec();
    prop_assert!(
        small(&yshape, 1 << 14) && small(x.shape(), 1 << 14),
        "accepted huge {}",
        what
    );
    prop_assert_eq!(&yshape[..2], &[n, k]);
    let (p, q) = (yshape[2], yshape[3]);
    let dy = HostTensor::from_vec(values(c.dy_seed, yshape.iter().product()), &yshape)
        .unwrap()
        .to_contiguous(c.x.dtype);
    let g = call(&what, || {
        conv::backward(
            &conv::BackwardInputs::new(&x, &w, &dy).grads(ConvGrads::ALL),
            &c.opts,
        )
    })?
    .map_err(|e| TestCaseError::fail(format!("{what}: backward: {e}")))?;
    // A dy of another shape is an error.
    let bad = HostTensor::from_vec(
        vec![0f32; yshape.iter().product::<usize>() + 1],
        &[yshape.iter().product::<usize>() + 1],
    )
    .unwrap();
    prop_assert!(call(&what, || conv::backward(
        &conv::BackwardInputs::new(&x, &w, &bad),
        &c.opts
    ))?
    .is_err());
    let (xv, wv, dyv) = (logical(&x), logical(&w), logical(&dy));
    let bv = bias.as_ref().map(logical);
    let (y, dx, dw) = naive_conv(
        &xv,
        &wv,
        bv.as_deref(),
        &dyv,
        [n, ch, h, wd],
        [k, cg, r, s],
        [p, q],
        &c.opts,
    );
    let tol = 4.0 * eps(c.x.dtype) + 1e-9;
    close(
        &format!("{what}: y_pre"),
        &logical(f.y_pre.as_ref().unwrap()),
        &y,
        tol,
    )?;
    let act: Vec<f64> = y
        .iter()
        .map(|&v| flashkernels::reference::activate(c.opts.activation, v))
        .collect();
    close(&format!("{what}: y"), &logical(&f.y), &act, tol)?;
    close(
        &format!("{what}: dx"),
        &logical(g.dx.as_ref().unwrap()),
        &dx,
        tol,
    )?;
    close(
        &format!("{what}: dw"),
        &logical(g.dweight.as_ref().unwrap()),
        &dw,
        tol,
    )?;
    let mut db = vec![0.0; k];
    for (i, v) in dyv.iter().enumerate() {
        db[(i / (p * q)) % k] += v;
    }
    close(
        &format!("{what}: db"),
        &logical(g.dbias.as_ref().unwrap()),
        &db,
        tol,
    )?;
    tally(|t| t.checked.fetch_add(1, Ordering::Relaxed));
    Ok(())
}

#[test]
fn fuzz_conv2d() {
    fuzz("fuzz_conv2d", CASES, conv_case(), conv_case_run);
}

// ---------------------------------------------------------------------------------------
// Pooling.

#[derive(Debug, Clone)]
struct PoolCase {
    x: TensorSpec,
    kind: PoolKind,
    opts: Pool2dOptions,
    dy_seed: u64,
    bad_indices: Option<(usize, i32)>,
}

fn pool_case() -> impl Strategy<Value = PoolCase> {
    let kernel = || prop_oneof![16 => 1usize..=4, 1 => Just(0usize), 2 => huge()];
    let pad = || prop_oneof![16 => 0usize..=2, 1 => huge()];
    (
        spec(prop::collection::vec(dim(7), 4..=4)),
        prop_oneof![Just(PoolKind::Max), Just(PoolKind::Avg)],
        (
            (kernel(), kernel()),
            prop::option::weighted(0.5, pair(3)),
            (pad(), pad()),
        ),
        (
            prop_oneof![6 => Just([1usize, 1]), 1 => pair(3)],
            any::<bool>(),
            any::<bool>(),
            prop::option::weighted(0.1, option_size(5)),
        ),
        any::<u64>(),
        prop::option::weighted(0.2, (0usize..64, any::<i32>())),
    )
        .prop_map(
            |(
                x,
                kind,
                ((k0, k1), stride, (p0, p1)),
                (dilation, ceil_mode, cip, div),
                dy_seed,
                bad,
            )| {
                // Padding within half the kernel most of the time (else it is an error).
                let fit = |p: usize, k: usize| {
                    if p > k / 2 && p < 1 << 40 {
                        p % (k / 2 + 1)
                    } else {
                        p
                    }
                };
                PoolCase {
                    x,
                    kind,
                    opts: Pool2dOptions {
                        kernel_size: [k0, k1],
                        stride,
                        padding: [fit(p0, k0), fit(p1, k1)],
                        dilation,
                        ceil_mode,
                        count_include_pad: cip || kind == PoolKind::Max,
                        divisor_override: if kind == PoolKind::Avg { div } else { None },
                    },
                    dy_seed,
                    bad_indices: bad,
                }
            },
        )
}

/// The input positions of window o (i128 arithmetic from the definition), taps < 64.
fn naive_taps(o: usize, k: usize, st: usize, pad: usize, dil: usize, len: usize) -> Vec<usize> {
    (0..k)
        .map(|t| (o * st) as i128 + t as i128 * dil as i128 - pad as i128)
        .filter(|&i| i >= 0 && i < len as i128)
        .map(|i| i as usize)
        .collect()
}

fn pool_case_run(c: &PoolCase) -> Result<(), TestCaseError> {
    let Some(x) = build(&c.x)? else {
        return Ok(());
    };
    let what = format!("{:?} pool x {:?} {:?}", c.kind, x.layout(), c.opts);
    if x.shape().len() == 4 {
        let o = &c.opts;
        let xs = x.shape();
        let st = o.stride.unwrap_or(o.kernel_size);
        let len = |i: usize| {
            sweep_len(
                xs[2 + i],
                o.kernel_size[i],
                st[i],
                o.padding[i],
                o.dilation[i],
                o.ceil_mode,
            )
        };
        if let (Some(p), Some(q)) = (len(0), len(1)) {
            let y = (xs[0] as u128)
                .saturating_mul(xs[1] as u128)
                .saturating_mul(p)
                .saturating_mul(q);
            if mid_size(y) {
                let v = call(&what, || pool::validate_pool(c.kind, x.described(), o))?;
                tally(|t| t.ok.fetch_add(1, Ordering::Relaxed));
                return v.map_or_else(|e| typed(&what, &e), |_| Ok(()));
            }
        }
    }
    let inputs = match c.kind {
        PoolKind::Max => pool::Inputs::max(&x),
        PoolKind::Avg => pool::Inputs::avg(&x),
    };
    let f = match call(&what, || pool::forward(&inputs, &c.opts))? {
        Ok(f) => f,
        Err(e) => return typed(&what, &e),
    };
    let [n, ch, h, w] = <[usize; 4]>::try_from(x.shape()).unwrap();
    let ys = f.y.shape().to_vec();
    prop_assert!(
        small(&ys, 1 << 14) && small(x.shape(), 1 << 14),
        "accepted huge {}",
        what
    );
    prop_assert_eq!(&ys[..2], &[n, ch]);
    let (p, q) = (ys[2], ys[3]);
    let dy = HostTensor::from_vec(values(c.dy_seed, ys.iter().product()), &ys)
        .unwrap()
        .to_contiguous(c.x.dtype);
    let dx = match c.kind {
        PoolKind::Max => {
            let idx = f.indices.as_ref().unwrap();
            if let Some((at, v)) = c.bad_indices {
                let mut bad = idx.to_host().unwrap();
                let at = at % bad.len();
                let bad_value = if (v as i64) < 0 || v as i64 >= (h * w) as i64 {
                    v
                } else {
                    -1
                };
                bad[at] = bad_value;
                let bad = pool::Indices::Host(bad);
                let r = call(&what, || {
                    pool::backward(&pool::BackwardInputs::max(&x, &dy, &bad), &c.opts)
                })?;
                prop_assert!(r.is_err(), "{}: index {} accepted", what, bad_value);
                let short = pool::Indices::Host(vec![0; at]);
                let r = call(&what, || {
                    pool::backward(&pool::BackwardInputs::max(&x, &dy, &short), &c.opts)
                })?;
                prop_assert!(r.is_err(), "{}: {} indices accepted", what, at);
            }
            call(&what, || {
                pool::backward(&pool::BackwardInputs::max(&x, &dy, idx), &c.opts)
            })?
        }
        PoolKind::Avg => call(&what, || {
            pool::backward(&pool::BackwardInputs::avg(&x, &dy), &c.opts)
        })?,
    }
    .map_err(|e| TestCaseError::fail(format!("{what}: backward: {e}")))?;
    prop_assert_eq!(dx.shape(), x.shape());
    let o = &c.opts;
    if o.kernel_size[0] > 64 || o.kernel_size[1] > 64 {
        tally(|t| t.ok.fetch_add(1, Ordering::Relaxed));
        return Ok(());
    }
    let stride = o.stride.unwrap_or(o.kernel_size);
    let (xv, dyv) = (logical(&x), logical(&dy));
    let mut y = vec![0.0; n * ch * p * q];
    let mut want_dx = vec![0.0; n * ch * h * w];
    let mut want_idx = vec![0i32; n * ch * p * q];
    for plane in 0..n * ch {
        for oh in 0..p {
            let rows = naive_taps(
                oh,
                o.kernel_size[0],
                stride[0],
                o.padding[0],
                o.dilation[0],
                h,
            );
            for ow in 0..q {
                let cols = naive_taps(
                    ow,
                    o.kernel_size[1],
                    stride[1],
                    o.padding[1],
                    o.dilation[1],
                    w,
                );
                let yi = (plane * p + oh) * q + ow;
                match c.kind {
                    PoolKind::Max => {
                        let (mut best, mut bi) = (f64::NEG_INFINITY, rows[0] * w + cols[0]);
                        for &r in &rows {
                            for &cc in &cols {
                                let v = xv[plane * h * w + r * w + cc];
                                if v > best {
                                    (best, bi) = (v, r * w + cc);
                                }
                            }
                        }
                        y[yi] = best;
                        want_idx[yi] = bi as i32;
                        want_dx[plane * h * w + bi] += dyv[yi];
                    }
                    PoolKind::Avg => {
                        // torch: the window clipped to [-pad, len + pad), then to the input.
                        let size = |oo: usize, k: usize, st: usize, pad: usize, len: usize| {
                            let start = (oo * st) as i128 - pad as i128;
                            let end = (start + k as i128).min((len + pad) as i128);
                            (end - start) as f64
                        };
                        let div = match o.divisor_override {
                            Some(dv) => dv as f64,
                            None if o.count_include_pad => {
                                size(oh, o.kernel_size[0], stride[0], o.padding[0], h)
                                    * size(ow, o.kernel_size[1], stride[1], o.padding[1], w)
                            }
                            None => (rows.len() * cols.len()) as f64,
                        };
                        let mut sum = 0.0;
                        for &r in &rows {
                            for &cc in &cols {
                                sum += xv[plane * h * w + r * w + cc];
                                want_dx[plane * h * w + r * w + cc] += dyv[yi] / div;
                            }
                        }
                        y[yi] = sum / div;
                    }
                }
            }
        }
    }
    let tol = 4.0 * eps(c.x.dtype) + 1e-9;
    close(&format!("{what}: y"), &logical(&f.y), &y, tol)?;
    close(&format!("{what}: dx"), &logical(&dx), &want_dx, tol)?;
    if c.kind == PoolKind::Max {
        prop_assert_eq!(
            f.indices.as_ref().unwrap().to_host().unwrap(),
            want_idx,
            "{}: indices",
            what
        );
    }
    tally(|t| t.checked.fetch_add(1, Ordering::Relaxed));
    Ok(())
}

#[test]
fn fuzz_pool2d() {
    fuzz("fuzz_pool2d", CASES * 2, pool_case(), pool_case_run);
}

/// The watchdog itself: run with `--ignored watchdog_fires`; the process must exit 101
/// after about 20 s, naming the call.
#[test]
#[ignore]
fn watchdog_fires() {
    let _ = call("a call that sleeps for a minute", || {
        std::thread::sleep(Duration::from_secs(60))
    });
}
