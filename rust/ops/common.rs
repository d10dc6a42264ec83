//! Host-side helpers every op's validation and CPU path share.

use crate::error::{Error, Result};
use crate::ops::longformer::TokenMask;
use crate::tensor::{DType, HostTensor, Layout};
use crate::TensorRef;

/// Rank, stride count and non-emptiness of one input's layout; `layout` names the
/// logical dimensions for the error message.
pub(crate) fn check_layout(
    name: &'static str,
    l: &Layout,
    rank: usize,
    layout: &'static str,
) -> Result<()> {
    if l.shape.len() != rank {
        return Err(Error::Rank {
            name,
            expected: rank,
            layout,
            shape: l.shape.clone(),
        });
    }
    if l.strides.len() != rank {
        return Err(Error::InvalidArgument(format!(
            "{name}: shape {:?} has {} strides {:?}",
            l.shape,
            l.strides.len(),
            l.strides
        )));
    }
    if l.numel() == 0 {
        return Err(Error::Empty {
            name,
            shape: l.shape.clone(),
        });
    }
    checked_elements(name, &l.shape)?;
    Ok(())
}

/// [`check_layout`], plus the unit-stride last (head) dim that attention kernels and
/// references read rows through.
pub(crate) fn check_row_layout(
    name: &'static str,
    l: &Layout,
    rank: usize,
    layout: &'static str,
) -> Result<()> {
    check_layout(name, l, rank, layout)?;
    if l.strides[rank - 1] != 1 {
        return Err(Error::NonUnitStride {
            name,
            shape: l.shape.clone(),
            strides: l.strides.clone(),
        });
    }
    Ok(())
}

/// The softmax scale of an attention call: `scale`, or 1/sqrt(head_dim) when absent;
/// it must be finite and positive.
pub(crate) fn check_scale(scale: Option<f32>, head_dim: usize) -> Result<f32> {
    let s = scale.unwrap_or(1.0 / (head_dim as f32).sqrt());
    if !(s.is_finite() && s > 0.0) {
        return Err(Error::InvalidArgument(format!(
            "scale must be finite and positive, got {s:?}"
        )));
    }
    Ok(s)
}

/// A softmax scale given in f64 (as Python floats are) converted to the f32 the
/// attention ops compute with: an error showing the value given when it is not finite
/// and positive, or when it is but over- or underflows f32 (1e-50 would become 0).
pub fn scale_to_f32(name: &str, scale: f64) -> Result<f32> {
    let s = scale as f32;
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::InvalidArgument(format!(
            "{name} must be finite and positive, got {scale:?}"
        )));
    }
    if !(s.is_finite() && s > 0.0) {
        return Err(Error::InvalidArgument(format!(
            "{name} = {scale:?} is out of float32 range (the scores are computed in float32, \
             where it becomes {s:?}): use a value in [{:e}, {:e}]",
            f32::from_bits(1),
            f32::MAX
        )));
    }
    Ok(s)
}

/// The error for an op's tensors split between the host and a device.
pub(crate) fn mixed_devices(ts: &[(&str, TensorRef<'_>)]) -> Error {
    let where_: Vec<String> = ts
        .iter()
        .map(|(n, t)| format!("{n} on {}", t.device_name()))
        .collect();
    Error::DeviceMismatch {
        detail: format!("{}: all must be on one device", where_.join(", ")),
    }
}

/// Where an op's optional tensors live, in the order given: all on the host, or (with a
/// device backend) all on devices; `None` where a tensor was not given.
pub(crate) enum Placed<'a> {
    Host(Vec<Option<&'a HostTensor>>),
    #[cfg(any(feature = "cuda", feature = "emulator"))]
    Device(Vec<Option<&'a crate::DeviceTensor>>),
}

/// Sorts named, optional tensors into [`Placed`]; a mix of host and device tensors is
/// [`mixed_devices`]' error.
pub(crate) fn place<'a>(ts: &[(&'static str, Option<TensorRef<'a>>)]) -> Result<Placed<'a>> {
    let given: Vec<(&str, TensorRef<'a>)> =
        ts.iter().filter_map(|(n, t)| t.map(|t| (*n, t))).collect();
    if given.iter().all(|(_, t)| matches!(t, TensorRef::Host(_))) {
        return Ok(Placed::Host(
            ts.iter()
                .map(|(_, t)| match t {
                    Some(TensorRef::Host(h)) => Some(*h),
                    _ => None,
                })
                .collect(),
        ));
    }
    #[cfg(any(feature = "cuda", feature = "emulator"))]
    if given.iter().all(|(_, t)| matches!(t, TensorRef::Cuda(_))) {
        return Ok(Placed::Device(
            ts.iter()
                .map(|(_, t)| match t {
                    Some(TensorRef::Cuda(d)) => Some(*d),
                    _ => None,
                })
                .collect(),
        ));
    }
    Err(mixed_devices(&given))
}

/// Named optional tensors of any [`crate::OpTensor`] kind as [`TensorRef`]s, for [`place`].
pub(crate) fn refs<'a, T: crate::OpTensor>(
    named: &[(&'static str, Option<&'a T>)],
) -> Vec<(&'static str, Option<TensorRef<'a>>)> {
    named
        .iter()
        .map(|(n, t)| (*n, t.map(crate::OpTensor::tensor_ref)))
        .collect()
}

/// A key padding mask (Linformer, Reformer) as (B, N) flags, true = padded; none (empty) when absent, so a call without a
/// mask allocates nothing of size B·N here.
pub(crate) fn key_padding_flags(
    m: Option<&TokenMask>,
    batch: usize,
    n: usize,
) -> Result<Vec<bool>> {
    let name = "key_padding_mask";
    let len = checked_elements(name, &[batch, n])?;
    let Some(m) = m else {
        return Ok(Vec::new());
    };
    if m.shape.len() != 2 {
        return Err(Error::Rank {
            name,
            expected: 2,
            layout: "(batch, seqlen)",
            shape: m.shape.clone(),
        });
    }
    if m.shape != [batch, n] {
        return Err(Error::ShapeMismatch {
            detail: format!(
                "{name} has shape {:?}, expected (batch, seqlen) = {:?}",
                m.shape,
                [batch, n]
            ),
        });
    }
    if m.values.len() != len {
        return Err(Error::InvalidArgument(format!(
            "{name}: shape {:?} needs {len} values, got {}",
            m.shape,
            m.values.len()
        )));
    }
    let mut v = try_with_capacity(len, name)?;
    v.extend_from_slice(&m.values);
    Ok(v)
}

/// A host tensor's values as f32 (the attention references' input), read element by
/// element through its strides: O(numel), whatever the storage's size.
pub(crate) fn f32_data(t: &HostTensor) -> Result<Vec<f32>> {
    t.try_to_f32_vec()
}

/// A host tensor's values as f64 (the conv and pool references' input), read element by
/// element through its strides.
pub(crate) fn f64_data(t: &HostTensor) -> Result<Vec<f64>> {
    let mut v = try_with_capacity(t.numel(), "an f64 copy of an input")?;
    let f = t.try_to_f32_vec()?;
    v.extend(f.into_iter().map(f64::from));
    Ok(v)
}

/// An f64 reference result as a contiguous host tensor of `dtype`, rounded once.
pub(crate) fn host_out(v: Vec<f64>, shape: &[usize], dtype: DType) -> Result<HostTensor> {
    HostTensor::from_fn(dtype, shape, |i| v[i] as f32)
}

/// The most elements any host buffer sized from a call's input may have: every product
/// of validated sizes is at most this, so byte counts of f64 buffers (and sums of a few
/// such sizes, or `as i64` of any of them) cannot overflow.
pub(crate) const MAX_ELEMENTS: usize = isize::MAX as usize / 8;

/// The product of `dims`, or `Error::TooLarge` naming `what` when it overflows or
/// exceeds [`MAX_ELEMENTS`].
pub(crate) fn checked_elements(what: &str, dims: &[usize]) -> Result<usize> {
    match dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) {
        Some(n) if n <= MAX_ELEMENTS => Ok(n),
        _ => Err(Error::TooLarge {
            what: format!("the element count of {what} {dims:?}"),
            value: dims
                .iter()
                .fold(1u128, |a, &d| a.saturating_mul(d as u128))
                .min(u64::MAX as u128) as u64,
            limit: MAX_ELEMENTS as u64,
        }),
    }
}

/// Checks that each buffer a reference was given has the length its problem implies
/// (`(name, given, dims)`): a problem's fields are public, so one can be changed after
/// validation, and the references must not index out of bounds for it.
pub(crate) fn check_buffers(bufs: &[(&str, usize, &[usize])]) -> Result<()> {
    for &(name, len, dims) in bufs {
        let want = checked_elements(name, dims)?;
        if len != want {
            return Err(Error::ShapeMismatch {
                detail: format!(
                    "{name} has {len} elements, but the problem needs {dims:?} = {want} (was \
                     the problem changed after validation?)"
                ),
            });
        }
    }
    Ok(())
}

/// The error for a problem whose fields were changed after validation.
pub(crate) fn altered(what: String) -> Error {
    Error::InvalidArgument(format!(
        "the problem is inconsistent ({what}): was it changed after validation?"
    ))
}

/// An empty vector with room for `len` elements, allocated fallibly:
/// `Error::OutOfMemory` (naming `what`) instead of aborting the process.
pub(crate) fn try_with_capacity<T>(len: usize, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| Error::OutOfMemory {
        what: what.to_string(),
        bytes: (len as u128 * std::mem::size_of::<T>() as u128).min(u64::MAX as u128) as u64,
    })?;
    Ok(v)
}

/// `vec![value; len]`, allocated fallibly (see [`try_with_capacity`]).
pub(crate) fn try_alloc_vec<T: Clone>(len: usize, value: T, what: &str) -> Result<Vec<T>> {
    let mut v = try_with_capacity(len, what)?;
    v.resize(len, value);
    Ok(v)
}

// ---------------------------------------------------------------------------------------
// Interrupting long CPU calls (Ctrl-C).
//
// API for callers (the Python module wires it to `py.check_signals()`):
//
//     ops::with_interrupt_check(&|| -> Result<()> { ... }, || long_call())
//     ops::with_interrupt_check_every(interval, &checker, || long_call())
//
// While `long_call` runs on this thread, every CPU reference (attention, Longformer,
// conv, pooling, forward and backward, and their input copies) calls `checker` on this
// same thread at most once per `interval` (DEFAULT_INTERRUPT_INTERVAL = 50 ms) and at
// least about that often while it works (the references poll once per output row or
// window; the ones that fan out over threads keep this thread waiting in a loop that
// polls). When `checker` returns `Err(e)`, the call stops as soon as every worker notices
// (within one row) and returns `Err(e)` (use `Error::Interrupted`); workers that stop
// because of it report `Error::Interrupted`. Without a checker (every plain Rust call)
// polling is a thread-local read. The checker runs on the calling thread only, so a
// checker that needs the GIL or the main thread works.
// ---------------------------------------------------------------------------------------

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often, at most, [`with_interrupt_check`] runs its checker.
pub const DEFAULT_INTERRUPT_INTERVAL: Duration = Duration::from_millis(50);

type Checker = dyn Fn() -> Result<()>;

#[derive(Clone)]
struct InterruptCtx {
    /// The installing thread's checker (valid while its `with_interrupt_check*` runs);
    /// `None` on worker threads, which only watch `cancelled`.
    checker: Option<*const Checker>,
    interval: Duration,
    /// Set when the call must stop (a checker's error, or a sibling worker's).
    cancelled: Arc<AtomicBool>,
}

thread_local! {
    static INTERRUPT: RefCell<Option<InterruptCtx>> = const { RefCell::new(None) };
    static LAST_CHECK: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Runs `f` with `checker` as this thread's interrupt check, run at most every
/// [`DEFAULT_INTERRUPT_INTERVAL`] by the CPU references `f` calls; see
/// [`with_interrupt_check_every`].
pub fn with_interrupt_check<R>(checker: &dyn Fn() -> Result<()>, f: impl FnOnce() -> R) -> R {
    with_interrupt_check_every(DEFAULT_INTERRUPT_INTERVAL, checker, f)
}

/// Runs `f` with `checker` as this thread's interrupt check: every CPU reference `f`
/// runs calls it on this thread at most once per `interval` (and about that often while
/// it works); when it returns `Err(e)`, the reference stops and the op returns `Err(e)`
/// (callers should return [`Error::Interrupted`]). The previous check (if any) is
/// restored afterwards, also when `f` panics.
pub fn with_interrupt_check_every<R>(
    interval: Duration,
    checker: &dyn Fn() -> Result<()>,
    f: impl FnOnce() -> R,
) -> R {
    // SAFETY: only the lifetime is erased; the pointer is removed from the thread-local
    // (by `Restore`'s drop) before `checker`'s borrow ends, and only this thread reads it.
    let ptr: *const Checker = unsafe {
        std::mem::transmute::<*const (dyn Fn() -> Result<()> + '_), *const Checker>(checker)
    };
    let ctx = InterruptCtx {
        checker: Some(ptr),
        interval,
        cancelled: Arc::new(AtomicBool::new(false)),
    };
    let _restore = Restore::install(Some(ctx), Some(Instant::now()));
    f()
}

struct Restore(Option<InterruptCtx>, Option<Instant>);

impl Restore {
    fn install(ctx: Option<InterruptCtx>, last: Option<Instant>) -> Restore {
        let prev = INTERRUPT.with(|c| c.replace(ctx));
        let prev_last = LAST_CHECK.with(|c| c.replace(last));
        Restore(prev, prev_last)
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        let (ctx, last) = (self.0.take(), self.1.take());
        INTERRUPT.with(|c| *c.borrow_mut() = ctx);
        LAST_CHECK.with(|c| c.set(last));
    }
}

/// The interrupt poll of the CPU references: call it every row or so. Cheap without a
/// checker (a thread-local read); with one, an `Instant` comparison, and the checker
/// itself at most once per interval.
pub(crate) fn poll_interrupt() -> Result<()> {
    let Some(ctx) = INTERRUPT.with(|c| c.borrow().clone()) else {
        return Ok(());
    };
    if ctx.cancelled.load(Ordering::Relaxed) {
        return Err(Error::Interrupted);
    }
    if let Some(checker) = ctx.checker {
        let now = Instant::now();
        let due = LAST_CHECK
            .with(|c| c.get())
            .is_none_or(|t| now.duration_since(t) >= ctx.interval);
        if due {
            LAST_CHECK.with(|c| c.set(Some(now)));
            // SAFETY: set by `with_interrupt_check_every` on this thread, whose scope is
            // still running (the pointer is cleared when it ends).
            if let Err(e) = unsafe { (*checker)() } {
                ctx.cancelled.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Runs `work` for every item on all cores, returning the results in item order, or the
/// first error (the other workers stop within one item). The calling thread waits in a
/// loop that runs this thread's interrupt check, so a long fan-out stays interruptible;
/// workers see a cancellation through [`poll_interrupt`].
pub(crate) fn try_parallel_map<I: Sync, R: Send>(
    items: &[I],
    work: impl Fn(&I) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    poll_interrupt()?;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(items.len())
        .max(1);
    let mut slots: Vec<Option<R>> = try_with_capacity(items.len(), "the reference's work list")?;
    slots.resize_with(items.len(), || None);
    let outer = INTERRUPT.with(|c| c.borrow().clone());
    let interval = outer.as_ref().map(|c| c.interval);
    let cancelled = Arc::new(AtomicBool::new(false));
    let mut first_err: Option<Error> = None;
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel::<Result<Vec<(usize, R)>>>();
        let work = &work;
        for t in 0..threads {
            let (tx, cancelled) = (tx.clone(), cancelled.clone());
            s.spawn(move || {
                let _ctx = Restore::install(
                    Some(InterruptCtx {
                        checker: None,
                        interval: DEFAULT_INTERRUPT_INTERVAL,
                        cancelled: cancelled.clone(),
                    }),
                    None,
                );
                let mut out = Vec::new();
                for i in (t..items.len()).step_by(threads) {
                    if cancelled.load(Ordering::Relaxed) {
                        break;
                    }
                    match work(&items[i]) {
                        Ok(r) => out.push((i, r)),
                        Err(e) => {
                            cancelled.store(true, Ordering::Relaxed);
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                }
                let _ = tx.send(Ok(out));
            });
        }
        drop(tx);
        let mut done = 0;
        while done < threads {
            let msg = match interval {
                Some(iv) => match rx.recv_timeout(iv.max(Duration::from_millis(1))) {
                    Ok(m) => m,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        if let Err(e) = poll_interrupt() {
                            cancelled.store(true, Ordering::Relaxed);
                            first_err.get_or_insert(e);
                        }
                        continue;
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                },
                None => match rx.recv() {
                    Ok(m) => m,
                    Err(_) => break,
                },
            };
            done += 1;
            match msg {
                Ok(v) => {
                    for (i, r) in v {
                        slots[i] = Some(r);
                    }
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
    });
    if let Some(e) = first_err {
        return Err(e);
    }
    slots
        .into_iter()
        .map(|r| r.ok_or(Error::Interrupted))
        .collect()
}
