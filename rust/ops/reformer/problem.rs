//! The Reformer LSH attention problem: what one call describes (sizes, rounds, buckets,
//! chunks, masks), and its validators (pure Rust), shared by the CPU reference and the
//! (future) CUDA path.

use super::{Buckets, TokenMask};
use crate::error::{Error, Result};
use crate::ops::common::{check_layout, check_row_layout, checked_elements, key_padding_flags};
use crate::tensor::{DType, Layout};

/// Options of a Reformer LSH attention call (Hugging Face's `ReformerConfig` names in
/// parentheses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReformerOptions {
    /// C (`lsh_attn_chunk_length`), > 0. When N > C, N must be a multiple of C; when
    /// N <= C the call is full shared-QK attention (no hashing), as in HF.
    pub chunk_length: usize,
    /// Chunks before each query chunk it attends to (`lsh_num_chunks_before`, default 1).
    pub chunks_before: usize,
    /// Chunks after (`lsh_num_chunks_after`, default 0).
    pub chunks_after: usize,
    /// Query position >= key position (`is_decoder`).
    pub causal: bool,
    /// The bucket count (`num_buckets`), if the caller states it: it must be even and
    /// equal twice the rotations' last dim. `None`: taken from the rotations.
    pub n_buckets: Option<usize>,
}

impl ReformerOptions {
    /// Chunk length C, one chunk before, none after, not causal.
    pub fn new(chunk_length: usize) -> Self {
        ReformerOptions {
            chunk_length,
            chunks_before: 1,
            chunks_after: 0,
            causal: false,
            n_buckets: None,
        }
    }

    pub fn chunks(self, before: usize, after: usize) -> Self {
        ReformerOptions {
            chunks_before: before,
            chunks_after: after,
            ..self
        }
    }

    pub fn causal(self, causal: bool) -> Self {
        ReformerOptions { causal, ..self }
    }

    pub fn n_buckets(self, n_buckets: Option<usize>) -> Self {
        ReformerOptions { n_buckets, ..self }
    }
}

/// Sizes of a validated Reformer call.
#[derive(Debug, Clone, PartialEq)]
// Non-exhaustive: outside this crate only the validator builds one, so holding a
// problem is proof that the call was checked.
#[non_exhaustive]
pub struct ReformerProblem {
    pub batch: usize,
    pub heads: usize,
    /// N.
    pub seqlen: usize,
    /// D.
    pub head_dim: usize,
    /// Hash rounds (the rotations' third dim).
    pub n_hashes: usize,
    /// Buckets per round from the rotations (twice their last dim), even, >= 2.
    pub n_buckets: usize,
    pub chunk_length: usize,
    pub chunks_before: usize,
    pub chunks_after: usize,
    pub causal: bool,
    /// The dtype of qk, v and O.
    pub dtype: DType,
    /// The rotations' dtype (any; hashing reads their values in f64).
    pub rotations_dtype: DType,
    /// (B, N) row-major, true = padded token; empty without a mask (read it through
    /// [`Self::padded`]).
    pub padding: Vec<bool>,
    /// Some token of the batch is padded: padded tokens then hash to the extra bucket
    /// `n_buckets` and round r's offset is r·(n_buckets + 1), for every sequence (HF).
    pub padded_anywhere: bool,
}

impl ReformerProblem {
    /// True when the call hashes (N > C); false: full shared-QK attention.
    pub fn hashed(&self) -> bool {
        self.seqlen > self.chunk_length
    }

    /// The bucket values one round spans: n_buckets, plus 1 when some token is padded.
    pub fn buckets_per_round(&self) -> usize {
        self.n_buckets + usize::from(self.padded_anywhere)
    }

    /// Rounds of the LSE: n_hashes when hashed, 1 for the full-attention fallback.
    pub fn lse_rounds(&self) -> usize {
        if self.hashed() {
            self.n_hashes
        } else {
            1
        }
    }

    /// Chunks over the sorted concatenation of all rounds, n_hashes·N / C (hashed calls).
    pub fn n_chunks(&self) -> usize {
        self.n_hashes * self.seqlen / self.chunk_length
    }

    /// True when token `i` of sequence `b` is padded.
    pub fn padded(&self, b: usize, i: usize) -> bool {
        !self.padding.is_empty() && self.padding[b * self.seqlen + i]
    }

    /// The values that replace masked scores: (causal / padding, self) = (−1e9, −1e5), or
    /// (−1e4, −1e3) for f16 inputs (HF picks its fp16 values for float16 only; bf16
    /// uses the fp32 values).
    pub fn mask_values(&self) -> (f64, f64) {
        match self.dtype {
            DType::F16 => (-1e4, -1e3),
            DType::F32 | DType::BF16 => (-1e9, -1e5),
        }
    }

    /// Shape of qk, v, O, dO, dqk, dv: (B, N, H, D).
    pub fn qkv_shape(&self) -> Vec<usize> {
        vec![self.batch, self.seqlen, self.heads, self.head_dim]
    }

    /// Shape of the rotations: (H, D, n_hashes, n_buckets / 2).
    pub fn rotations_shape(&self) -> Vec<usize> {
        vec![self.heads, self.head_dim, self.n_hashes, self.n_buckets / 2]
    }

    /// Shape of the buckets: (B, H, n_hashes, N).
    pub fn buckets_shape(&self) -> [usize; 4] {
        [self.batch, self.heads, self.n_hashes, self.seqlen]
    }

    /// Shape of the LSE: (B, H, [`Self::lse_rounds`], N).
    pub fn lse_shape(&self) -> Vec<usize> {
        vec![self.batch, self.heads, self.lse_rounds(), self.seqlen]
    }

    /// Keys per query and round: (chunks_before + 1 + chunks_after)·C, or N unhashed.
    pub fn window(&self) -> usize {
        if self.hashed() {
            (self.chunks_before + 1 + self.chunks_after) * self.chunk_length
        } else {
            self.seqlen
        }
    }

    /// The invariants the CPU reference relies on, checked again (the fields are public,
    /// so a validated problem can be changed).
    pub(crate) fn check_consistent(&self) -> Result<()> {
        let bad = |what: String| Err(crate::ops::common::altered(what));
        if self.n_buckets < 2 || self.n_buckets % 2 != 0 || self.n_hashes == 0 {
            return bad(format!(
                "n_buckets {}, n_hashes {}",
                self.n_buckets, self.n_hashes
            ));
        }
        if self.chunk_length == 0
            || (self.hashed() && self.seqlen % self.chunk_length != 0)
            || self.head_dim == 0
        {
            return bad(format!(
                "chunk_length {}, seqlen {}, head_dim {}",
                self.chunk_length, self.seqlen, self.head_dim
            ));
        }
        let bn = checked_elements("the key padding mask", &[self.batch, self.seqlen])?;
        let len_ok = self.padding.is_empty() || self.padding.len() == bn;
        if !len_ok || self.padded_anywhere != self.padding.contains(&true) {
            return bad(format!(
                "{} padding flags (padded_anywhere {}) for (batch, seqlen) = ({}, {})",
                self.padding.len(),
                self.padded_anywhere,
                self.batch,
                self.seqlen
            ));
        }
        check_sizes(self)
    }
}

/// The most chunks a window reaches on either side (HF's `lsh_num_chunks_before` /
/// `_after`; a window longer than all chunks only repeats them).
pub const MAX_CHUNKS_AROUND: usize = 65_535;

/// Every size product the call derives, in checked arithmetic.
fn check_sizes(p: &ReformerProblem) -> Result<()> {
    checked_elements("qk", &p.qkv_shape())?;
    checked_elements("the rotations", &p.rotations_shape())?;
    checked_elements("the buckets", &p.buckets_shape())?;
    checked_elements("lse", &p.lse_shape())?;
    // A window wraps around the chunks (repeating them, as HF's look-adjacent does), so
    // its cost does not shrink with N: each side is capped (the kernels' grid limit too).
    for (what, value) in [
        ("chunks_before", p.chunks_before),
        ("chunks_after", p.chunks_after),
    ] {
        if value > MAX_CHUNKS_AROUND {
            return Err(Error::TooLarge {
                what: what.into(),
                value: value as u64,
                limit: MAX_CHUNKS_AROUND as u64,
            });
        }
    }
    if p.hashed() {
        checked_elements(
            "the key window (chunks_before + 1 + chunks_after, chunk_length)",
            &[p.chunks_before + 1 + p.chunks_after, p.chunk_length],
        )?;
    }
    // Bucket values (offset per round) are i32, as HF returns them (int64 there).
    let top = p
        .n_buckets
        .checked_add(1)
        .and_then(|b| b.checked_mul(p.n_hashes));
    match top {
        Some(t) if t <= i32::MAX as usize => Ok(()),
        _ => Err(Error::TooLarge {
            what: format!(
                "the bucket values n_hashes · (n_buckets + 1) = {} · {}",
                p.n_hashes,
                p.n_buckets.saturating_add(1)
            ),
            value: (p.n_hashes as u128 * (p.n_buckets as u128 + 1)).min(u64::MAX as u128) as u64,
            limit: i32::MAX as u64,
        }),
    }
}

/// (dtype, layout) of one tensor, as validators read it.
pub type Described<'a> = (DType, &'a Layout);

/// What a forward call is made of, as the validator sees it.
#[derive(Debug, Clone, Copy)]
pub struct ReformerLayouts<'a> {
    pub qk: Described<'a>,
    pub v: Described<'a>,
    pub rotations: Described<'a>,
}

/// The backward's extra tensors, as the validator sees them.
#[derive(Debug, Clone, Copy)]
pub struct ReformerBackwardLayouts<'a> {
    pub out: Described<'a>,
    pub lse: Described<'a>,
    pub dout: Described<'a>,
}

const QKV_LAYOUT: &str = "(batch, seqlen, heads, head_dim)";
const ROT_LAYOUT: &str = "(heads, head_dim, n_hashes, n_buckets / 2)";
const LSE_LAYOUT: &str = "(batch, heads, rounds, seqlen)";

fn same_dtype(name: &str, d: DType, q: DType) -> Result<()> {
    if d != q {
        return Err(Error::DTypeMismatch {
            detail: format!("{name} is {d} but qk is {q}"),
        });
    }
    Ok(())
}

fn check_shape(name: &str, l: &Layout, expected: &[usize], why: &str) -> Result<()> {
    if l.shape != expected {
        return Err(Error::ShapeMismatch {
            detail: format!(
                "{name} has shape {:?}, expected {expected:?} ({why})",
                l.shape
            ),
        });
    }
    Ok(())
}

/// Checks a forward call: qk and v (B, N, H, D), one dtype, any strides and a
/// unit-stride head dim; rotations (H, D, n_hashes, n_buckets / 2), any dtype and
/// strides, n_hashes >= 1, n_buckets / 2 >= 1 (and `opts.n_buckets`, if given, even
/// and equal to twice the last dim); C > 0 and, when N > C, N a multiple of C; the key
/// padding mask (B, N); nothing empty; every size product within memory and bucket
/// values within i32 (checked arithmetic).
pub fn validate(
    t: &ReformerLayouts<'_>,
    key_padding_mask: Option<&TokenMask>,
    opts: &ReformerOptions,
) -> Result<ReformerProblem> {
    for (name, (_, l)) in [("qk", t.qk), ("v", t.v)] {
        check_row_layout(name, l, 4, QKV_LAYOUT)?;
    }
    let dtype = t.qk.0;
    same_dtype("v", t.v.0, dtype)?;
    let qs = &t.qk.1.shape;
    let (batch, seqlen, heads, head_dim) = (qs[0], qs[1], qs[2], qs[3]);
    check_shape("v", t.v.1, qs, "qk's shape")?;
    if let Some(nb) = opts.n_buckets {
        if nb % 2 != 0 || nb == 0 {
            return Err(Error::InvalidArgument(format!(
                "n_buckets = {nb}: the bucket count must be even and positive (a bucket is \
                 the argmax over [xR, -xR], R of n_buckets / 2 columns)"
            )));
        }
    }
    let (rot_dtype, rot) = t.rotations;
    check_layout("rotations", rot, 4, ROT_LAYOUT)?;
    let rs = &rot.shape;
    if rs[0] != heads || rs[1] != head_dim {
        return Err(Error::ShapeMismatch {
            detail: format!(
                "rotations have shape {rs:?}, expected (heads, head_dim) = ({heads}, \
                 {head_dim}) in front {ROT_LAYOUT}"
            ),
        });
    }
    let (n_hashes, half) = (rs[2], rs[3]);
    let n_buckets = half.checked_mul(2).ok_or_else(|| Error::TooLarge {
        what: "n_buckets = 2 · the rotations' last dim".into(),
        value: half as u64,
        limit: (usize::MAX / 2) as u64,
    })?;
    if let Some(nb) = opts.n_buckets {
        if nb != n_buckets {
            return Err(Error::ShapeMismatch {
                detail: format!(
                    "n_buckets = {nb}, but the rotations have shape {rs:?}: {half} columns \
                     per round give {n_buckets} buckets {ROT_LAYOUT}"
                ),
            });
        }
    }
    let c = opts.chunk_length;
    if c == 0 {
        return Err(Error::InvalidArgument(
            "chunk_length = 0: the chunk length must be positive".into(),
        ));
    }
    if seqlen > c && seqlen % c != 0 {
        return Err(Error::InvalidArgument(format!(
            "seqlen N = {seqlen} is not a multiple of chunk_length C = {c}: when N > C the \
             sorted rounds are cut into chunks of C tokens, so N must be a multiple of C (as \
             in Hugging Face's LSHSelfAttention; pad the sequence, masking the padding)"
        )));
    }
    let padding = key_padding_flags(key_padding_mask, batch, seqlen)?;
    let padded_anywhere = padding.contains(&true);
    let p = ReformerProblem {
        batch,
        heads,
        seqlen,
        head_dim,
        n_hashes,
        n_buckets,
        chunk_length: c,
        chunks_before: opts.chunks_before,
        chunks_after: opts.chunks_after,
        causal: opts.causal,
        dtype,
        rotations_dtype: rot_dtype,
        padding,
        padded_anywhere,
    };
    check_sizes(&p)?;
    Ok(p)
}

/// Checks buckets given to a call: hashed calls only (N > C), shape (B, H, n_hashes, N),
/// as many values, and round r's values in [r·nb', (r + 1)·nb'), nb' =
/// [`ReformerProblem::buckets_per_round`] (HF's offsets).
pub fn validate_buckets(p: &ReformerProblem, b: &Buckets) -> Result<()> {
    if !p.hashed() {
        return Err(Error::InvalidArgument(format!(
            "buckets were given, but seqlen N = {} <= chunk_length C = {}: such calls are full \
             attention without hashing (their forward returns no buckets)",
            p.seqlen, p.chunk_length
        )));
    }
    let want = p.buckets_shape();
    if b.shape != want {
        return Err(Error::ShapeMismatch {
            detail: format!(
                "buckets have shape {:?}, expected (batch, heads, n_hashes, seqlen) = {want:?}",
                b.shape
            ),
        });
    }
    let len = checked_elements("the buckets", &want)?;
    if b.values.len() != len {
        return Err(Error::InvalidArgument(format!(
            "buckets: shape {:?} needs {len} values, got {}",
            b.shape,
            b.values.len()
        )));
    }
    let (nbr, n) = (p.buckets_per_round(), p.seqlen);
    for (at, &v) in b.values.iter().enumerate() {
        let r = (at / n) % p.n_hashes;
        let (lo, hi) = (r * nbr, (r + 1) * nbr);
        if v < 0 || (v as usize) < lo || (v as usize) >= hi {
            return Err(Error::InvalidArgument(format!(
                "buckets[{at}] = {v} (round {r}) is outside [{lo}, {hi}): round r's buckets \
                 are offset by r · {nbr} ({} buckets{})",
                p.n_buckets,
                if p.padded_anywhere {
                    " plus the padding bucket"
                } else {
                    ""
                }
            )));
        }
    }
    Ok(())
}

/// Checks the backward's extra tensors against a validated forward problem: O and dO
/// like qk (its dtype, any strides, unit-stride head dim), LSE (B, H, rounds, N) f32.
pub fn validate_backward(p: &ReformerProblem, t: &ReformerBackwardLayouts<'_>) -> Result<()> {
    let shape = p.qkv_shape();
    for (name, (dtype, l)) in [("out", t.out), ("dout", t.dout)] {
        check_row_layout(name, l, 4, QKV_LAYOUT)?;
        check_shape(name, l, &shape, "qk's shape")?;
        same_dtype(name, dtype, p.dtype)?;
    }
    let (lse_dtype, lse) = t.lse;
    check_layout("lse", lse, 4, LSE_LAYOUT)?;
    check_shape(
        "lse",
        lse,
        &p.lse_shape(),
        "the forward's lse (batch, heads, n_hashes or 1 when N <= C, seqlen)",
    )?;
    if lse_dtype != DType::F32 {
        return Err(Error::UnsupportedDType {
            name: "lse",
            dtype: lse_dtype,
            supported: "lse is float32, as the forward returns it",
        });
    }
    Ok(())
}
