//! Fuzz suite of Reformer LSH attention (issue 16, in issue 13's shape), forward and
//! backward on host tensors: arbitrary shapes (B, N, H, D, n_hashes, n_buckets / 2) with
//! dimensions replaced, added or dropped, chunk lengths (0, huge, N <= C unhashed, N > C a
//! multiple of C or not), chunks before / after (huge included), causal, `n_buckets`
//! stated (right, odd, 0, another even count), dtypes (v of another dtype; rotations of
//! any dtype), strides (random, heads-first with padded rows, rotations transposed or of
//! any last stride), key padding masks (right, all false, fully padded sequences, wrong
//! shape or rank, wrong value count), given buckets (the definition's, any in-range
//! values, wrong shape or count, out-of-range values, given to an unhashed call), and the
//! backward's O / LSE / dO of the wrong shape, dtype, rank or strides (LSE with any
//! strides is valid); plus consistent calls of any size, described without storage and
//! validated (masks and buckets of absurd shapes included: refused without allocating).
//! Every call is Ok exactly when the inputs are valid by the rules written here, and
//! then: the buckets equal the f64 definition's (tests/reformer_common) or the given
//! ones, O equals the definition's with those buckets, the forward's own buckets given
//! back reproduce O and LSE bit for bit, everything is finite, dv satisfies
//! <dv, v> = <dO, O> (O is linear in v), dqk's derivative in a random direction matches
//! the definition's central difference, and the backward with the buckets given equals
//! the one that hashes again; otherwise a typed Err (TooLarge when only the size is
//! wrong), never a panic or a hang (harness: tests/fuzz_common).

mod fuzz_common;
mod reformer_common;

use fuzz_common::*;
use std::sync::atomic::Ordering;

use flashkernels::reformer::{
    self, Buckets, ReformerBackwardLayouts, ReformerLayouts, ReformerOptions, TokenMask,
};
use flashkernels::{DType, Error, HostTensor, Layout};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use reformer_common::{define, define_buckets, Case};

/// The most elements a validated size product may have (the crate's
/// `common::MAX_ELEMENTS`, whose f64 buffers' byte counts cannot overflow).
const MAX_ELEMENTS: u128 = (isize::MAX as usize / 8) as u128;

/// Calls with a tensor above this many elements are validated only, never run.
const RUN_LIMIT: u128 = 1 << 14;

/// Calls whose score work B · H · rounds · N · window · D (or hashing work) is above this
/// are validated only, never run (a window of huge chunks_before is valid, and costly).
const WORK_LIMIT: u128 = 1 << 16;

const NAMES: [&str; 3] = ["qk", "v", "rotations"];

// ---------------------------------------------------------------------------------------
// Random calls.

/// How a tensor is laid out beyond its spec's random strides.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Special {
    /// The spec's strides.
    None,
    /// A rank-4 (B, N, H, D) tensor stored heads-first (B, H, N, D + pad).
    HeadsFirst(usize),
    /// Rank-4 rotations (H, D, n_hashes, half) stored as (H, D, half, n_hashes).
    Transposed,
}

#[derive(Debug, Clone)]
struct Tspec {
    spec: TensorSpec,
    special: Special,
}

/// What the backward is given in place of one of its extra tensors.
#[derive(Debug, Clone, Copy, PartialEq)]
enum BadBackward {
    /// out, lse, dout: dimension `.1` one larger.
    Shape(usize, usize),
    /// out, dout: not qk's dtype; lse: f16.
    DType(usize),
    /// out, dout: a head dim of stride 2 (an error); lse: a last dim of stride 2 (valid:
    /// the LSE may have any strides).
    Stride(usize),
    /// lse of rank 3 (B·H, rounds, N).
    LseRank,
}

#[derive(Debug, Clone)]
enum MaskSpec {
    None,
    /// (B, N) flags; the listed sequences fully padded.
    Right(Vec<bool>, Vec<usize>),
    /// Some other shape (or rank) with as many values.
    Shape(Vec<usize>, Vec<bool>),
    /// (B, N) with one value too many or too few.
    Count(bool),
}

/// How given buckets are wrong.
#[derive(Debug, Clone, Copy, PartialEq)]
enum BadBuckets {
    /// Dimension `.0` one larger (values for the right shape).
    Shape(usize),
    /// One value too many or too few.
    Count(bool),
    /// One value (at `seed % len`) out of its round's range, of kind `.0`.
    Value(usize),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum BucketSpec {
    None,
    /// The definition's (what the forward hashes).
    Hashed,
    /// Any values within their round's range.
    Random(u64),
    Bad(BadBuckets, u64),
}

#[derive(Debug, Clone)]
struct RefCase {
    /// qk, v, rotations.
    specs: Vec<Tspec>,
    dout: Tspec,
    mask: MaskSpec,
    buckets: BucketSpec,
    opts: ReformerOptions,
    bad: Option<BadBackward>,
    /// The finite-difference direction's seed.
    seed: u64,
}

/// Chunks before / after: mostly small; sometimes the most a side may reach
/// (reformer::MAX_CHUNKS_AROUND), one more, or so many that the count overflows.
fn chunks_around() -> impl Strategy<Value = usize> {
    let cap = reformer::MAX_CHUNKS_AROUND;
    prop_oneof![30 => 0usize..=2, 1 => Just(cap), 1 => Just(cap + 1), 1 => huge()]
}

/// A tensor of `shape`; unless `wild`, no stride past any storage, no short storage and
/// (but for the rotations, which may have any strides) a unit-stride last dimension.
fn tspec(
    shape: Vec<usize>,
    special: Special,
    wild: bool,
    rows: bool,
) -> impl Strategy<Value = Tspec> {
    spec(Just(shape)).prop_map(move |mut spec| {
        if !wild {
            spec.short = false;
            for s in &mut spec.strides {
                if matches!(s, StrideKind::Huge(_)) {
                    *s = StrideKind::Contiguous;
                }
            }
            if rows {
                if let Some(last) = spec.strides.last_mut() {
                    *last = StrideKind::Contiguous;
                }
            }
        }
        Tspec { spec, special }
    })
}

fn special_rows() -> impl Strategy<Value = Special> {
    prop_oneof![6 => Just(Special::None), 2 => (0usize..3).prop_map(Special::HeadsFirst)]
}

fn special_rot() -> impl Strategy<Value = Special> {
    prop_oneof![6 => Just(Special::None), 2 => Just(Special::Transposed)]
}

/// Mostly consistent shapes, N a multiple of C (hashed) or at most C (full attention);
/// sometimes N not a multiple, C = 0 or huge, one tensor's dimension replaced, added or
/// dropped, v (or the rotations: valid) of another dtype, `n_buckets` stated wrong.
fn ref_case() -> impl Strategy<Value = RefCase> {
    (
        (dimw(2), dimw(2), dimw(6)),
        (
            prop_oneof![30 => 1usize..=4, 1 => Just(0usize), 1 => huge()],
            0usize..10,
            1usize..=5,
            dimw(8),
        ),
        (
            prop_oneof![20 => 1usize..=3, 1 => Just(0usize), 1 => huge()],
            prop_oneof![20 => 1usize..=3, 1 => Just(0usize), 1 => huge()],
        ),
        (chunks_around(), chunks_around(), any::<bool>(), 0usize..15),
        prop::option::weighted(0.12, (0usize..3, 0usize..4, 0usize..5, dim(6))),
        prop::option::weighted(0.08, any::<bool>()),
        (
            prop::option::weighted(0.4, (any::<u64>(), 0usize..4)),
            0usize..13,
        ),
        (0usize..20, any::<u64>()),
        prop::option::weighted(0.2, (0usize..11, 0usize..3, 0usize..4)),
        (
            special_rows(),
            special_rows(),
            special_rot(),
            special_rows(),
        ),
        prop::bool::weighted(0.25),
        any::<u64>(),
    )
        .prop_flat_map(
            |(
                (b, h, d),
                (c, n_kind, m, r),
                (nh, half),
                (before, after, causal, nb_kind),
                mutate,
                other,
                (mask, mask_kind),
                (bk_kind, bk_seed),
                bad,
                sp,
                wild,
                seed,
            )| {
                let n = match n_kind {
                    _ if c == 0 => 2 * m,
                    0..=7 => c.saturating_mul(m),
                    8 => r,
                    _ => r % c + 1,
                };
                let nb = half.saturating_mul(2);
                let n_buckets = match nb_kind {
                    0..=10 => None,
                    11 => Some(nb),
                    12 => Some(nb | 1),
                    13 => Some(0),
                    _ => Some(nb.wrapping_add(2)),
                };
                let opts = ReformerOptions::new(c)
                    .chunks(before, after)
                    .causal(causal)
                    .n_buckets(n_buckets);
                let mut shapes = vec![
                    vec![b, n, h, d],
                    vec![b, n, h, d],
                    vec![h, d, nh, half],
                    vec![b, n, h, d],
                ];
                if let Some((i, how, at, v)) = mutate {
                    let s = &mut shapes[i];
                    match how {
                        0 | 1 => {
                            let at = at % s.len();
                            s[at] = v;
                        }
                        2 => {
                            let at = at % (s.len() + 1);
                            s.insert(at, v.clamp(1, 3));
                        }
                        _ => {
                            let at = at % s.len();
                            s.remove(at);
                        }
                    }
                }
                let mask = match mask {
                    None => MaskSpec::None,
                    Some((mseed, full)) => {
                        let bn = if small(&[b, n], 64) { b * n } else { 4 };
                        let cut = if mask_kind == 12 { 3.0 } else { 1.0 };
                        let vals: Vec<bool> = values(mseed, bn).iter().map(|x| *x > cut).collect();
                        match mask_kind {
                            0..=8 | 12 => MaskSpec::Right(
                                vals,
                                if full == 0 {
                                    vec![]
                                } else {
                                    vec![full % b.max(1)]
                                },
                            ),
                            9 => MaskSpec::Shape(
                                if mseed % 2 == 0 { vec![n, b] } else { vec![bn] },
                                vals,
                            ),
                            10 => MaskSpec::Shape(vec![b, n, 1], vals),
                            _ => MaskSpec::Count(full % 2 == 0),
                        }
                    }
                };
                let buckets = match bk_kind {
                    0..=12 => BucketSpec::None,
                    13..=15 => BucketSpec::Hashed,
                    16 | 17 => BucketSpec::Random(bk_seed),
                    18 if bk_seed % 2 == 0 => {
                        BucketSpec::Bad(BadBuckets::Shape((bk_seed / 2) as usize % 4), bk_seed)
                    }
                    18 => BucketSpec::Bad(BadBuckets::Count(bk_seed % 4 == 1), bk_seed),
                    _ => BucketSpec::Bad(BadBuckets::Value(bk_seed as usize % 5), bk_seed),
                };
                let specials = [sp.0, sp.1, sp.2, sp.3];
                let specs: Vec<_> = shapes
                    .into_iter()
                    .zip(specials)
                    .enumerate()
                    .map(|(i, (s, x))| tspec(s, x, wild, i != 2))
                    .collect();
                (specs, Just((mask, buckets, opts, other, bad, seed)))
            },
        )
        .prop_map(|(mut specs, (mask, buckets, opts, other, bad, seed))| {
            let dtype = specs[0].spec.dtype;
            // v: qk's dtype (another one now and then: an error); the rotations keep
            // their random dtype (any is valid), or qk's.
            specs[1].spec.dtype = if other == Some(true) {
                other_dtype(dtype)
            } else {
                dtype
            };
            if other.is_none() {
                specs[2].spec.dtype = dtype;
            }
            let dout = specs.pop().expect("dout");
            let bad = bad.map(|(kind, which, at)| match kind {
                0..=3 => BadBackward::Shape(which, at),
                4..=6 => BadBackward::DType(which),
                7..=9 => BadBackward::Stride(which),
                _ => BadBackward::LseRank,
            });
            RefCase {
                specs,
                dout,
                mask,
                buckets,
                opts,
                bad,
                seed,
            }
        })
}

/// The spec's layout, or the special one when its rank fits.
fn layout_special(t: &Tspec) -> Layout {
    let s = &t.spec.shape;
    match (t.special, s.len()) {
        (Special::HeadsFirst(pad), 4) => {
            let [n, h, d] = [s[1], s[2], s[3]];
            let ld = d.saturating_add(pad);
            Layout {
                shape: s.clone(),
                strides: vec![
                    h.saturating_mul(n).saturating_mul(ld),
                    ld,
                    n.saturating_mul(ld),
                    1,
                ],
            }
        }
        (Special::Transposed, 4) => {
            let [d, nh, half] = [s[1], s[2], s[3]];
            Layout {
                shape: s.clone(),
                strides: vec![
                    d.saturating_mul(nh).saturating_mul(half),
                    nh.saturating_mul(half),
                    1,
                    nh,
                ],
            }
        }
        _ => layout_of(&t.spec),
    }
}

/// Builds the tensor: the spec's (constructor checked by [`build`]), or the special
/// layout over exactly its span (must be accepted when small enough to build).
fn build_t(t: &Tspec) -> Result<Option<HostTensor>, TestCaseError> {
    let layout = layout_special(t);
    if t.special == Special::None || layout.strides == layout_of(&t.spec).strides {
        return build(&t.spec);
    }
    let span = span_u128(&layout);
    if span > MAX_STORAGE as u128 || numel_u128(&layout.shape) > MAX_STORAGE as u128 {
        return Ok(None);
    }
    let data = host_data(t.spec.dtype, &values(t.spec.seed, span as usize));
    let r = call("HostTensor::from_data", || {
        HostTensor::from_data(data, layout.clone())
    })?;
    match r {
        Ok(t) => Ok(Some(t)),
        Err(e) => Err(TestCaseError::fail(format!(
            "from_data refused {layout:?} over its span {span}: {e}"
        ))),
    }
}

/// The sizes and options of a valid call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    n: usize,
    h: usize,
    d: usize,
    nh: usize,
    nb: usize,
    c: usize,
    before: usize,
    after: usize,
}

impl Dims {
    fn hashed(&self) -> bool {
        self.n > self.c
    }

    fn rounds(&self) -> usize {
        if self.hashed() {
            self.nh
        } else {
            1
        }
    }

    fn buckets_shape(&self) -> [usize; 4] {
        [self.b, self.h, self.nh, self.n]
    }

    /// Score and hashing work, in u128.
    fn work(&self) -> u128 {
        let window = if self.hashed() {
            (self.before as u128 + 1 + self.after as u128).saturating_mul(self.c as u128)
        } else {
            self.n as u128
        };
        let bhnd = numel_u128(&[self.b, self.h, self.n, self.d]);
        let scores = bhnd
            .saturating_mul(self.rounds() as u128)
            .saturating_mul(window);
        let hashing = bhnd
            .saturating_mul(self.nh as u128)
            .saturating_mul(self.nb as u128);
        scores.max(hashing)
    }
}

/// Why a call must fail, or None when it must succeed: the validator's rules restated.
#[derive(Clone, Copy)]
enum Verdict {
    Valid(Dims),
    /// Valid but for the size: must be `TooLarge`.
    TooLarge,
    Invalid,
}

fn mask_of(m: &MaskSpec, b: usize, n: usize) -> Option<TokenMask> {
    match m {
        MaskSpec::None => None,
        MaskSpec::Right(v, full) => {
            let mut v = v.clone();
            if b > 0 && v.len() == b * n {
                for s in full.iter().map(|s| s % b) {
                    v[s * n..(s + 1) * n].iter_mut().for_each(|x| *x = true);
                }
            }
            Some(TokenMask::new(v, &[b, n]))
        }
        MaskSpec::Shape(s, v) => Some(TokenMask::new(v.clone(), s)),
        MaskSpec::Count(more) => {
            let len = if small(&[b, n], 64) { b * n } else { 4 };
            let len = if *more {
                len + 1
            } else {
                len.saturating_sub(1)
            };
            Some(TokenMask::new(vec![false; len], &[b, n]))
        }
    }
}

fn verdict(t: [&HostTensor; 3], mask: Option<&TokenMask>, o: &ReformerOptions) -> Verdict {
    let [qk, v, rot] = t;
    let rows_ok =
        |x: &HostTensor| x.shape().len() == 4 && x.strides()[3] == 1 && !x.shape().contains(&0);
    if !rows_ok(qk) || !rows_ok(v) || v.dtype() != qk.dtype() || v.shape() != qk.shape() {
        return Verdict::Invalid;
    }
    let rs = rot.shape();
    if rs.len() != 4 || rs.contains(&0) {
        return Verdict::Invalid;
    }
    let qs = qk.shape();
    let [b, n, h, d] = [qs[0], qs[1], qs[2], qs[3]];
    if rs[0] != h || rs[1] != d {
        return Verdict::Invalid;
    }
    let (nh, half) = (rs[2], rs[3]);
    let nb = half.checked_mul(2);
    if let Some(x) = o.n_buckets {
        if x == 0 || x % 2 != 0 || Some(x) != nb {
            return Verdict::Invalid;
        }
    }
    let c = o.chunk_length;
    if c == 0 || (n > c && n % c != 0) {
        return Verdict::Invalid;
    }
    let mask_ok = mask
        .is_none_or(|m| m.shape == [b, n] && m.values.len() as u128 == (b as u128) * (n as u128));
    if !mask_ok {
        return Verdict::Invalid;
    }
    let Some(nb) = nb else {
        return Verdict::TooLarge;
    };
    let rounds = if n > c { nh } else { 1 };
    let cap = reformer::MAX_CHUNKS_AROUND;
    let around = o.chunks_before as u128 + 1 + o.chunks_after as u128;
    // The key window counts only when the call hashes (N > C).
    let window = if n > c {
        around.saturating_mul(c as u128)
    } else {
        0
    };
    let fits = [
        numel_u128(qs),
        numel_u128(rs),
        numel_u128(&[b, h, nh, n]),
        numel_u128(&[b, h, rounds, n]),
        window,
    ]
    .iter()
    .all(|&x| x <= MAX_ELEMENTS)
        && o.chunks_before <= cap
        && o.chunks_after <= cap
        && (nh as u128).saturating_mul(nb as u128 + 1) <= i32::MAX as u128;
    if !fits {
        return Verdict::TooLarge;
    }
    Verdict::Valid(Dims {
        b,
        n,
        h,
        d,
        nh,
        nb,
        c,
        before: o.chunks_before,
        after: o.chunks_after,
    })
}

/// SplitMix64's next value.
fn mix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The buckets a case gives, and whether they are valid for it. `def` is the case of a
/// valid call small enough to run (its buckets are then built to its shape), else the
/// buckets are of a problem-like shape with no values at all (never valid).
fn buckets_of(
    spec: BucketSpec,
    dims: Option<&Dims>,
    def: Option<&Case>,
) -> Option<(Buckets, bool)> {
    if spec == BucketSpec::None {
        return None;
    }
    let (Some(x), Some(case)) = (dims, def) else {
        let shape = dims.map_or([1, 1, 1, 1], Dims::buckets_shape);
        return Some((Buckets::new(vec![], shape), false));
    };
    let shape = x.buckets_shape();
    let any_pad = case.pad.as_ref().is_some_and(|p| p.contains(&true));
    let nbr = x.nb + usize::from(any_pad);
    let random = |seed: u64| -> Vec<i32> {
        let mut s = seed;
        (0..shape.iter().product::<usize>())
            .map(|at| {
                let r = (at / x.n) % x.nh;
                (r * nbr + (mix(&mut s) % nbr as u64) as usize) as i32
            })
            .collect()
    };
    let (vals, shape, ok) = match spec {
        BucketSpec::None => unreachable!(),
        BucketSpec::Hashed => (define_buckets(case), shape, true),
        BucketSpec::Random(seed) => (random(seed), shape, true),
        BucketSpec::Bad(BadBuckets::Shape(at), seed) => {
            let mut s = shape;
            s[at] += 1;
            (random(seed), s, false)
        }
        BucketSpec::Bad(BadBuckets::Count(more), seed) => {
            let mut v = random(seed);
            if more {
                v.push(0);
            } else {
                v.pop();
            }
            (v, shape, false)
        }
        BucketSpec::Bad(BadBuckets::Value(kind), seed) => {
            let mut v = random(seed);
            let at = seed as usize % v.len();
            let r = (at / x.n) % x.nh;
            v[at] = match kind {
                0 => -1,
                1 => (r * nbr) as i32 - 1,
                2 => ((r + 1) * nbr) as i32,
                3 => i32::MAX,
                _ => i32::MIN,
            };
            (v, shape, false)
        }
    };
    // Buckets are for hashed calls only.
    Some((Buckets::new(vals, shape), ok && x.hashed()))
}

fn layouts(t: [&HostTensor; 3]) -> ReformerLayouts<'_> {
    ReformerLayouts {
        qk: t[0].described(),
        v: t[1].described(),
        rotations: t[2].described(),
    }
}

fn finite(what: &str, v: &[f64]) -> Result<(), TestCaseError> {
    let bad = v.iter().position(|x| !x.is_finite());
    prop_assert!(bad.is_none(), "{}: element {:?} is not finite", what, bad);
    Ok(())
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn ref_case_run(c: &RefCase) -> Result<(), TestCaseError> {
    let mut built = Vec::new();
    for s in &c.specs {
        match build_t(s)? {
            Some(t) => built.push(t),
            None => return Ok(()), // refused by the constructor (or too big to store here)
        }
    }
    let t: [&HostTensor; 3] = [&built[0], &built[1], &built[2]];
    let qk = t[0];
    let (mb, mn) = (qk.shape()[0], qk.shape().get(1).copied().unwrap_or(1));
    let mask = mask_of(&c.mask, mb, mn);
    let opts = c.opts;
    let v = verdict(t, mask.as_ref(), &opts);
    let big = t.iter().any(|t| numel_u128(t.shape()) > RUN_LIMIT)
        || matches!(&v, Verdict::Valid(x) if x.work() > WORK_LIMIT);
    let dims = match &v {
        Verdict::Valid(x) => Some(*x),
        _ => None,
    };
    // The definition's case of a valid call small enough to run.
    let case = match dims {
        Some(x) if !big => Some(Case {
            b: x.b,
            n: x.n,
            h: x.h,
            d: x.d,
            n_hashes: x.nh,
            n_buckets: x.nb,
            c: x.c,
            before: x.before,
            after: x.after,
            causal: opts.causal,
            pad: mask.as_ref().map(|m| m.values.clone()),
            dtype: qk.dtype(),
            qk: logical(qk),
            v: logical(t[1]),
            rot: logical(t[2]),
        }),
        _ => None,
    };
    let given = buckets_of(c.buckets, dims.as_ref(), case.as_ref());
    let v = match (&given, v) {
        (Some((_, false)), Verdict::Valid(_)) => Verdict::Invalid,
        (_, v) => v,
    };
    let given = given.map(|g| g.0);
    let what = format!(
        "reformer {:?} mask {:?} buckets {:?} {}",
        opts,
        mask.as_ref().map(|m| (&m.shape, m.values.len())),
        given.as_ref().map(|b| (b.shape, b.values.len(), c.buckets)),
        NAMES
            .iter()
            .zip(&built)
            .map(|(n, t)| format!("{n} {:?} {:?}", t.dtype(), t.layout()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let inputs = reformer::Inputs::new(t[0], t[1], t[2])
        .key_padding_mask(mask.as_ref())
        .buckets(given.as_ref());
    // The public validators (which the device path relies on alone) agree with the
    // rules here, on every call.
    let r = call(&what, || {
        reformer::validate(&layouts(t), mask.as_ref(), &opts).and_then(|p| match &given {
            Some(b) => reformer::validate_buckets(&p, b).map(|()| p),
            None => Ok(p),
        })
    })?;
    match (r, v) {
        (Ok(p), Verdict::Valid(x)) => {
            prop_assert_eq!(
                (
                    p.batch,
                    p.seqlen,
                    p.heads,
                    p.head_dim,
                    p.n_hashes,
                    p.n_buckets
                ),
                (x.b, x.n, x.h, x.d, x.nh, x.nb),
                "{}",
                what
            );
            prop_assert_eq!(
                (p.chunk_length, p.chunks_before, p.chunks_after, p.causal),
                (x.c, x.before, x.after, opts.causal),
                "{}",
                what
            );
            prop_assert_eq!(p.hashed(), x.hashed());
            prop_assert_eq!(p.lse_shape(), vec![x.b, x.h, x.rounds(), x.n]);
            prop_assert_eq!(p.buckets_shape(), x.buckets_shape());
        }
        (Ok(p), _) => {
            return Err(TestCaseError::fail(format!(
                "{what}: validate accepted as {p:?}"
            )))
        }
        (Err(e), Verdict::Valid(_)) => {
            return Err(TestCaseError::fail(format!(
                "{what}: validate refused: {e}"
            )))
        }
        (Err(e), Verdict::TooLarge) => {
            typed(&what, &e)?;
            prop_assert!(matches!(e, Error::TooLarge { .. }), "{}: {:?}", what, e);
        }
        (Err(e), Verdict::Invalid) => {
            typed(&what, &e)?;
            prop_assert!(!matches!(e, Error::OutOfMemory { .. }), "{}: {:?}", what, e);
        }
    }
    if big && matches!(v, Verdict::Valid(_)) {
        // Too big to compute here: validated only.
        tally(|t| t.ok.fetch_add(1, Ordering::Relaxed));
        return Ok(());
    }
    // Invalid calls (of any size) must be refused by the entry itself, before anything
    // is allocated or computed; the backward too.
    let r = call(&what, || reformer::forward(&inputs, &opts))?;
    let (o, x) = match (r, v) {
        (Ok(o), Verdict::Valid(x)) => (o, x),
        (Ok(_), _) => return Err(TestCaseError::fail(format!("{what}: accepted"))),
        (Err(e), Verdict::Valid(_)) => {
            return Err(TestCaseError::fail(format!("{what}: refused: {e}")))
        }
        (Err(e), v) => {
            typed(&what, &e)?;
            // Refused before allocating anything sized from the input.
            prop_assert!(!matches!(e, Error::OutOfMemory { .. }), "{}: {:?}", what, e);
            if matches!(v, Verdict::TooLarge) {
                prop_assert!(matches!(e, Error::TooLarge { .. }), "{}: {:?}", what, e);
            }
            let bw = format!("{what}: backward");
            let r = call(&bw, || {
                reformer::backward(&inputs.backward(t[0], t[0], t[0]), &opts)
            })?;
            return match r {
                Ok(_) => Err(TestCaseError::fail(format!("{bw}: accepted"))),
                Err(e) => typed(&bw, &e),
            };
        }
    };
    let case = case.expect("a valid small call has its case");
    let dtype = qk.dtype();
    let Dims { b, n, h, d, nh, .. } = x;
    prop_assert_eq!(o.out.shape(), &[b, n, h, d], "{}: out", what);
    prop_assert_eq!(o.lse.shape(), &[b, h, x.rounds(), n], "{}: lse", what);
    prop_assert_eq!(
        [o.out.dtype(), o.lse.dtype()],
        [dtype, DType::F32],
        "{}",
        what
    );
    let (out, lse) = (logical(&o.out), logical(&o.lse));
    finite(&format!("{what}: out"), &out)?;
    finite(&format!("{what}: lse"), &lse)?;
    // The buckets: none unhashed; else the given ones, or the definition's (the same f64
    // sums in the same order: equal).
    let bk = match &o.buckets {
        None => {
            prop_assert!(!x.hashed(), "{}: no buckets from a hashed call", what);
            vec![]
        }
        Some(ob) => {
            prop_assert!(x.hashed(), "{}: buckets from an unhashed call", what);
            prop_assert_eq!(ob.shape, [b, h, nh, n], "{}: buckets' shape", what);
            let want = match &given {
                Some(g) => g.values.clone(),
                None => define_buckets(&case),
            };
            prop_assert!(
                ob.values == want,
                "{}: buckets {:?}, want {:?}",
                what,
                ob.values,
                want
            );
            want
        }
    };
    let def = define(&case, &case.qk, &case.v, Some(&bk));
    let u = eps(dtype);
    close(&format!("{what}: out"), &out, &def, 2.0 * u + 1e-9)?;
    // The forward's own buckets given back: the same O and LSE, bit for bit.
    if let (Some(ob), None) = (&o.buckets, &given) {
        let again = inputs.buckets(Some(ob));
        let r = call(&what, || reformer::forward(&again, &opts))?;
        let o2 = r.map_err(|e| TestCaseError::fail(format!("{what}: own buckets refused: {e}")))?;
        within(
            &format!("{what}: out with its buckets"),
            &logical(&o2.out),
            &out,
            0.0,
        )?;
        within(
            &format!("{what}: lse with its buckets"),
            &logical(&o2.lse),
            &lse,
            0.0,
        )?;
    }
    backward_check(c, &what, t, &inputs, &o, &case, &bk, &def)?;
    Ok(())
}

/// The backward of a valid forward call: with one of O, LSE, dO wrong a typed Err; else
/// Ok, finite, and consistent with the definition (see the module doc), and the same with
/// the buckets given.
#[allow(clippy::too_many_arguments)]
fn backward_check(
    c: &RefCase,
    what: &str,
    t: [&HostTensor; 3],
    inputs: &reformer::Inputs<'_, HostTensor>,
    o: &reformer::ReformerOutput<HostTensor>,
    case: &Case,
    bk: &[i32],
    def: &[f64],
) -> Result<(), TestCaseError> {
    let dtype = case.dtype;
    let (b, n, h, d) = (case.b, case.n, case.h, case.d);
    let mut ds = c.dout.clone();
    ds.spec.shape = vec![b, n, h, d];
    ds.spec.dtype = dtype;
    ds.spec.short = false;
    if ds.spec.strides.len() != 4 {
        ds.spec.strides = vec![StrideKind::Contiguous; 4];
    }
    ds.spec.strides[3] = StrideKind::Contiguous;
    for s in &mut ds.spec.strides {
        if matches!(s, StrideKind::Huge(_)) {
            *s = StrideKind::Contiguous;
        }
    }
    let Some(dout) = build_t(&ds)? else {
        return Ok(()); // a dO layout the constructor refuses
    };
    let what = format!(
        "{what}: backward, dout {:?}, bad {:?}",
        dout.layout(),
        c.bad
    );
    let mut given = [&o.out, &o.lse, &dout];
    let bad_t;
    if let Some(bad) = c.bad {
        bad_t = match bad {
            BadBackward::Shape(i, at) => grown(given[i], at, 7),
            BadBackward::DType(i) => {
                let to = if i == 1 {
                    DType::F16
                } else {
                    other_dtype(dtype)
                };
                given[i].to_contiguous(to)
            }
            BadBackward::Stride(i) => strided(given[i]),
            BadBackward::LseRank => {
                let r = o.lse.shape()[2];
                HostTensor::from_fn(DType::F32, &[b * h, r, n], |_| 0.0).expect("small")
            }
        };
        let i = match bad {
            BadBackward::Shape(i, _) | BadBackward::DType(i) | BadBackward::Stride(i) => i,
            BadBackward::LseRank => 1,
        };
        given[i] = &bad_t;
        // An LSE with a last dim of stride 2 is valid: checked as any other call.
        if bad != BadBackward::Stride(1) {
            let [out, lse, dout] = given;
            let r = call(&what, || {
                reformer::backward(&inputs.backward(out, lse, dout), &c.opts)
            })?;
            return match r {
                Ok(_) => Err(TestCaseError::fail(format!("{what}: accepted"))),
                Err(e) => typed(&what, &e),
            };
        }
    }
    let [out, lse, dout] = given;
    let r = call(&what, || {
        reformer::backward(&inputs.backward(out, lse, dout), &c.opts)
    })?;
    let g = r.map_err(|e| TestCaseError::fail(format!("{what}: refused: {e}")))?;
    prop_assert_eq!(g.dqk.shape(), t[0].shape(), "{}: dqk", what);
    prop_assert_eq!(g.dv.shape(), t[1].shape(), "{}: dv", what);
    prop_assert_eq!([g.dqk.dtype(), g.dv.dtype()], [dtype, dtype], "{}", what);
    let (dqk, dv) = (logical(&g.dqk), logical(&g.dv));
    finite(&format!("{what}: dqk"), &dqk)?;
    finite(&format!("{what}: dv"), &dv)?;
    // Hashed again or given: the same buckets, the same gradients.
    if case.hashed() && inputs.buckets.is_none() {
        let own = Buckets::new(bk.to_vec(), [b, h, case.n_hashes, n]);
        let again = inputs.buckets(Some(&own));
        let r = call(&what, || {
            reformer::backward(&again.backward(out, lse, dout), &c.opts)
        })?;
        let g2 = r.map_err(|e| TestCaseError::fail(format!("{what}: with buckets: {e}")))?;
        within(
            &format!("{what}: dqk with buckets"),
            &logical(&g2.dqk),
            &dqk,
            0.0,
        )?;
        within(
            &format!("{what}: dv with buckets"),
            &logical(&g2.dv),
            &dv,
            0.0,
        )?;
    }
    let u = eps(dtype);
    let (o_given, lse_v, dov) = (logical(out), logical(lse), logical(dout));
    let rounds = lse_v.len() / (b * h * n);
    let vmax = case.v.iter().fold(0.0f64, |a, x| a.max(x.abs()));
    // Per query row (b, i, h): the relative error of its P = exp(score − logsumexp_r
    // lse_r) from the LSE's f32 rounding, and the error of Delta = dO · O from O's.
    let rows = b * n * h;
    let mut eta = vec![0.0; rows];
    let mut d_delta = vec![0.0; rows];
    for bb in 0..b {
        for i in 0..n {
            for hh in 0..h {
                let row = (bb * n + i) * h + hh;
                let m = (0..rounds)
                    .map(|r| lse_v[((bb * h + hh) * rounds + r) * n + i].abs())
                    .fold(0.0f64, f64::max);
                eta[row] = 1.01 * (2f64.powi(-23) * m + 1e-12).exp_m1();
                let at = row * d;
                d_delta[row] = (0..d)
                    .map(|k| dov[at + k] * (o_given[at + k] - def[at + k]))
                    .sum::<f64>()
                    .abs()
                    + 1e-12 * (0..d).map(|k| dov[at + k].abs()).sum::<f64>();
            }
        }
    }
    let norm1 = |v: &[f64], row: usize| {
        v[row * d..(row + 1) * d]
            .iter()
            .map(|x| x.abs())
            .sum::<f64>()
    };
    let norm2 =
        |v: &[f64], row: usize| dot(&v[row * d..(row + 1) * d], &v[row * d..(row + 1) * d]).sqrt();
    // dv: O is linear in v, so <dv, v> = <dO, O>, up to P's error and dv's rounding.
    let lhs = dot(&dv, &case.v);
    let rhs = dot(&dov, def);
    let tol = (0..rows)
        .map(|r| eta[r] * norm1(&dov, r) * vmax)
        .sum::<f64>()
        + 1.01
            * u
            * dv.iter()
                .zip(&case.v)
                .map(|(a, b)| (a * b).abs())
                .sum::<f64>()
        + 1e-10 * (1.0 + dov.iter().zip(def).map(|(a, b)| (a * b).abs()).sum::<f64>());
    prop_assert!(
        (lhs - rhs).abs() <= tol,
        "{}: <dv, v> = {}, <dO, O> = {} (tol {})",
        what,
        lhs,
        rhs,
        tol
    );
    // dqk: its derivative in a random direction w against the definition's central
    // difference (the buckets fixed). The keys' normalisation has derivatives of order
    // (mean(x²) + eps)^(−k/2): rows near 0 make the difference inaccurate, skip them.
    let gmax = (0..rows)
        .map(|r| 1.0 / (norm2(&case.qk, r).powi(2) / d as f64 + 1e-6).sqrt())
        .fold(0.0f64, f64::max);
    let moderate = gmax <= 32.0;
    if moderate {
        let w: Vec<f64> = values(c.seed, case.qk.len())
            .into_iter()
            .map(f64::from)
            .collect();
        let eps_fd = 1e-6;
        let shifted =
            |s: f64| -> Vec<f64> { case.qk.iter().zip(&w).map(|(q, w)| q + s * w).collect() };
        let loss = |qk: &[f64]| dot(&dov, &define(case, qk, &case.v, Some(bk)));
        let fd = (loss(&shifted(eps_fd)) - loss(&shifted(-eps_fd))) / (2.0 * eps_fd);
        let got = dot(&dqk, &w);
        let wmax = (0..rows).map(|r| norm2(&w, r)).fold(0.0f64, f64::max);
        // |dS error| <= P (eta (|dP| + |Delta|) + |dDelta|) summed over a row's keys
        // (sum P = 1), times |k_j · w_i| + |q_i · J_j w_j| <= |w_i| + |q_i| g / sqrt(D) |w_j|.
        let sqd = (d as f64).sqrt();
        let model = (0..rows)
            .map(|r| {
                let at = r * d;
                let delta = dot(&dov[at..at + d], &o_given[at..at + d]).abs();
                let ds = (1.0 + eta[r]) * (eta[r] * (norm1(&dov, r) * vmax + delta) + d_delta[r]);
                ds * (norm2(&w, r) + norm2(&case.qk, r) * gmax / sqd * wmax)
            })
            .sum::<f64>();
        let gw = dqk.iter().zip(&w).map(|(a, b)| (a * b).abs()).sum::<f64>();
        let lmag = dov.iter().zip(def).map(|(a, b)| (a * b).abs()).sum::<f64>();
        let tol = 2.0 * model + 1.01 * u * gw + 1e-7 * (1.0 + gw + fd.abs()) + 1e-8 * lmag;
        prop_assert!(
            (got - fd).abs() <= tol,
            "{}: <dqk, w> = {}, central difference {} (tol {})",
            what,
            got,
            fd,
            tol
        );
    }
    tally(|t| {
        if moderate {
            t.checked.fetch_add(1, Ordering::Relaxed)
        } else {
            t.ok.fetch_add(1, Ordering::Relaxed)
        }
    });
    Ok(())
}

#[test]
fn fuzz_reformer() {
    fuzz("fuzz_reformer", CASES, ref_case(), ref_case_run);
}

// ---------------------------------------------------------------------------------------
// Sizes only: consistent calls of any size, described (no storage), validated, with the
// backward's tensors, masks and buckets validated against the problem.

fn size() -> impl Strategy<Value = usize> {
    prop_oneof![
        8 => 1usize..=16,
        1 => Just(0usize),
        2 => prop::sample::select(vec![
            1 << 15,
            1 << 20,
            1 << 31,
            1 << 32,
            (1 << 40) + 8,
        ]),
        2 => huge(),
    ]
}

#[derive(Debug, Clone)]
struct SizeCase {
    /// b, n, h, d, n_hashes, half, c, before, after.
    sizes: [usize; 9],
    /// N = C · this (when given).
    multiple: Option<usize>,
    /// 0: None; 1: 2 · half; 2: odd; 3: another even count.
    n_buckets: usize,
    dtype: DType,
    rot_dtype: DType,
    causal: bool,
    /// 0: none; 1: (B, N) right when small, else 3 values; 2: rank 1.
    mask: usize,
}

fn size_case() -> impl Strategy<Value = SizeCase> {
    (
        [
            size().boxed(),
            size().boxed(),
            size().boxed(),
            size().boxed(),
            size().boxed(),
            size().boxed(),
            size().boxed(),
            prop_oneof![4 => 0usize..=2, 1 => size()].boxed(),
            prop_oneof![4 => 0usize..=2, 1 => size()].boxed(),
        ],
        prop::option::weighted(0.5, prop_oneof![4 => 1usize..=4, 1 => size()]),
        prop_oneof![6 => Just(0usize), 1 => 1usize..=3],
        (dtype(), dtype(), any::<bool>()),
        prop_oneof![6 => Just(0usize), 1 => 1usize..=2],
    )
        .prop_map(
            |(sizes, multiple, n_buckets, (dtype, rot_dtype, causal), mask)| SizeCase {
                sizes,
                multiple,
                n_buckets,
                dtype,
                rot_dtype,
                causal,
                mask,
            },
        )
}

fn size_case_run(c: &SizeCase) -> Result<(), TestCaseError> {
    let [b, n, h, d, nh, half, ch, before, after] = c.sizes;
    let n = match c.multiple {
        Some(m) => ch.saturating_mul(m),
        None => n,
    };
    let nb2 = half.checked_mul(2);
    let nb_opt = match c.n_buckets {
        0 => None,
        1 => Some(half.saturating_mul(2)),
        2 => Some(half.saturating_mul(2) | 1),
        _ => Some(half.saturating_mul(2).wrapping_add(2)),
    };
    let (qk, rot) = (contiguous(&[b, n, h, d]), contiguous(&[h, d, nh, half]));
    let dt = c.dtype;
    let l = ReformerLayouts {
        qk: (dt, &qk),
        v: (dt, &qk),
        rotations: (c.rot_dtype, &rot),
    };
    let opts = ReformerOptions::new(ch)
        .chunks(before, after)
        .causal(c.causal)
        .n_buckets(nb_opt);
    let bn = numel_u128(&[b, n]);
    let mask = match c.mask {
        0 => None,
        1 if bn <= 64 => Some(TokenMask::new(
            (0..bn as usize).map(|i| i % 3 == 1).collect(),
            &[b, n],
        )),
        1 => Some(TokenMask::new(vec![true; 3], &[b, n])),
        _ => Some(TokenMask::new(vec![false; 2], &[2])),
    };
    let mask_bad = match c.mask {
        0 => false,
        1 => bn > 64,
        _ => true,
    };
    let what = format!("validate {c:?} (N {n}, n_buckets {nb_opt:?})");
    let rounds = if n > ch { nh } else { 1 };
    let cap = reformer::MAX_CHUNKS_AROUND;
    let around = before as u128 + 1 + after as u128;
    let window = if n > ch {
        around.saturating_mul(ch as u128)
    } else {
        0
    };
    let fits = [
        numel_u128(&[b, n, h, d]),
        numel_u128(&[h, d, nh, half]),
        numel_u128(&[b, h, nh, n]),
        numel_u128(&[b, h, rounds, n]),
        window,
    ]
    .iter()
    .all(|&x| x <= MAX_ELEMENTS)
        && before <= cap
        && after <= cap
        && nb2.is_some_and(|nb| (nh as u128).saturating_mul(nb as u128 + 1) <= i32::MAX as u128);
    let empty = [b, n, h, d, nh, half].contains(&0);
    let nb_bad = nb_opt.is_some_and(|x| x == 0 || x % 2 != 0);
    let nb_mismatch = nb_opt.is_some_and(|x| Some(x) != nb2);
    let chunk_bad = ch == 0 || (n > ch && n % ch != 0);
    let valid = fits && !empty && !nb_bad && !nb_mismatch && !chunk_bad && !mask_bad;
    let r = call(&what, || reformer::validate(&l, mask.as_ref(), &opts))?;
    let p = match r {
        Err(e) => {
            typed(&what, &e)?;
            prop_assert!(!valid, "{}: refused: {:?}", what, e);
            // Whichever the validator meets first, among the reasons that apply.
            let why = match e {
                Error::Empty { .. } => empty,
                Error::TooLarge { .. } => !fits,
                Error::InvalidArgument(_) => nb_bad || chunk_bad || mask_bad,
                Error::ShapeMismatch { .. } => nb_mismatch,
                Error::Rank { .. } => c.mask == 2,
                _ => false,
            };
            prop_assert!(why, "{}: {:?}", what, e);
            return Ok(());
        }
        Ok(p) => p,
    };
    prop_assert!(valid, "{}: accepted", what);
    prop_assert_eq!(
        (
            p.batch,
            p.seqlen,
            p.heads,
            p.head_dim,
            p.n_hashes,
            p.n_buckets
        ),
        (b, n, h, d, nh, half * 2),
        "{}",
        what
    );
    prop_assert_eq!(
        (p.chunk_length, p.chunks_before, p.chunks_after),
        (ch, before, after)
    );
    prop_assert_eq!(
        (p.dtype, p.rotations_dtype, p.causal),
        (dt, c.rot_dtype, c.causal)
    );
    prop_assert_eq!(p.hashed(), n > ch);
    // No mask: no (B, N) flags allocated.
    prop_assert_eq!(p.padding.is_empty(), mask.is_none(), "{}: padding", what);
    prop_assert_eq!(
        p.padded_anywhere,
        mask.as_ref().is_some_and(|m| m.values.contains(&true))
    );
    tally(|t| t.ok.fetch_add(1, Ordering::Relaxed));
    // The backward's tensors of the problem's shapes pass; LSE in another dtype, with
    // the other count of rounds, or O one token longer or strided, does not.
    let (qs, lse) = (contiguous(&p.qkv_shape()), contiguous(&p.lse_shape()));
    prop_assert_eq!(p.lse_shape(), vec![b, h, rounds, n]);
    let bl = ReformerBackwardLayouts {
        out: (dt, &qs),
        lse: (DType::F32, &lse),
        dout: (dt, &qs),
    };
    let r = call(&what, || reformer::validate_backward(&p, &bl))?;
    prop_assert!(r.is_ok(), "{}: backward refused: {:?}", what, r);
    let r = call(&what, || {
        reformer::validate_backward(
            &p,
            &ReformerBackwardLayouts {
                lse: (dt, &lse),
                ..bl
            },
        )
    })?;
    prop_assert_eq!(r.is_err(), dt != DType::F32, "{}: lse {:?}", what, dt);
    let other_rounds = contiguous(&[b, h, if rounds == 1 { 2 } else { 1 }, n]);
    let longer = contiguous(&[b, n.saturating_add(1), h, d]);
    let mut unit = contiguous(&p.qkv_shape());
    unit.strides[3] = 2;
    for (name, bad) in [
        (
            "lse rounds",
            ReformerBackwardLayouts {
                lse: (DType::F32, &other_rounds),
                ..bl
            },
        ),
        (
            "out longer",
            ReformerBackwardLayouts {
                out: (dt, &longer),
                ..bl
            },
        ),
        (
            "dout strided",
            ReformerBackwardLayouts {
                dout: (dt, &unit),
                ..bl
            },
        ),
    ] {
        let r = call(&what, || reformer::validate_backward(&p, &bad))?;
        match r {
            Ok(()) => return Err(TestCaseError::fail(format!("{what}: {name} accepted"))),
            Err(e) => typed(&what, &e)?,
        }
    }
    // Buckets without values (of the right shape, or one round more): refused at once,
    // whatever B·H·n_hashes·N, and never for being too large.
    for shape in [p.buckets_shape(), [b, h, nh.saturating_add(1), n]] {
        let bk = Buckets::new(vec![], shape);
        let r = call(&what, || reformer::validate_buckets(&p, &bk))?;
        match r {
            Ok(()) => {
                return Err(TestCaseError::fail(format!(
                    "{what}: empty buckets {shape:?} accepted"
                )))
            }
            Err(e) => {
                typed(&what, &e)?;
                let want = if !p.hashed() || shape == p.buckets_shape() {
                    matches!(e, Error::InvalidArgument(_))
                } else {
                    matches!(e, Error::ShapeMismatch { .. })
                };
                prop_assert!(want, "{}: buckets {:?}: {:?}", what, shape, e);
            }
        }
    }
    Ok(())
}

#[test]
fn fuzz_reformer_sizes() {
    fuzz("fuzz_reformer_sizes", CASES, size_case(), size_case_run);
}
