//! The attention problem: what one call describes, and its validator.

use std::ops::Range;

use super::{AttentionOptions, SeqLens};
use crate::error::{Error, Result};
use crate::ops::common::{check_row_layout as check_layout, check_scale, checked_elements};
use crate::tensor::{DType, Layout};

/// Sizes of a validated call (the "plan" of this op).
#[derive(Debug, Clone, PartialEq)]
// Non-exhaustive: outside this crate only the validator builds one, so holding a
// problem is proof that the call was checked; the launch consumes it as it is.
#[non_exhaustive]
pub struct AttentionProblem {
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub heads_kv: usize,
    /// Query length; the longest sequence's for varlen.
    pub seqlen_q: usize,
    /// Key length; the longest sequence's for varlen.
    pub seqlen_k: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub causal: bool,
    pub window_left: Option<usize>,
    /// Right window with `causal` folded in (causal means `Some(0)` at most).
    pub window_right: Option<usize>,
    pub dtype: DType,
    /// `Some` for variable-length batches.
    pub seqlens: Option<SeqLens>,
}

impl AttentionProblem {
    /// Query heads per key/value head.
    pub fn group_size(&self) -> usize {
        self.heads / self.heads_kv
    }

    /// True when some keys are masked by causality or a window.
    pub fn has_mask(&self) -> bool {
        self.window_left.is_some() || self.window_right.is_some()
    }

    /// Rows of packed Q (B * Nq for dense batches).
    pub fn rows_q(&self) -> usize {
        match &self.seqlens {
            Some(s) => *s.cu_seqlens_q.last().expect("validated") as usize,
            None => self.batch * self.seqlen_q,
        }
    }

    /// Rows of packed K and V.
    pub fn rows_k(&self) -> usize {
        match &self.seqlens {
            Some(s) => *s.cu_seqlens_k.last().expect("validated") as usize,
            None => self.batch * self.seqlen_k,
        }
    }

    /// Rows of packed Q that sequence `b` owns.
    pub fn q_rows(&self, b: usize) -> Range<usize> {
        match &self.seqlens {
            Some(s) => s.cu_seqlens_q[b] as usize..s.cu_seqlens_q[b + 1] as usize,
            None => b * self.seqlen_q..(b + 1) * self.seqlen_q,
        }
    }

    /// Rows of packed K / V that sequence `b` owns.
    pub fn k_rows(&self, b: usize) -> Range<usize> {
        match &self.seqlens {
            Some(s) => s.cu_seqlens_k[b] as usize..s.cu_seqlens_k[b + 1] as usize,
            None => b * self.seqlen_k..(b + 1) * self.seqlen_k,
        }
    }

    /// Index in the contiguous LSE of (sequence b, query head h, query i of b).
    pub fn lse_index(&self, b: usize, h: usize, i: usize) -> usize {
        match &self.seqlens {
            Some(s) => h * self.rows_q() + s.cu_seqlens_q[b] as usize + i,
            None => (b * self.heads + h) * self.seqlen_q + i,
        }
    }

    /// Keys that query `i` of a sequence with `nq` queries and `nk` keys sees. Computed
    /// in i128, so any window (up to `usize::MAX`, which is unbounded) is exact.
    pub fn visible_keys(&self, i: usize, nq: usize, nk: usize) -> Range<usize> {
        let (i, nq, nk) = (i as i128, nq as i128, nk as i128);
        let diag = i + nk - nq; // the aligned diagonal's key
        let lo = self.window_left.map_or(0, |w| diag - w as i128).max(0);
        let hi = self
            .window_right
            .map_or(nk, |w| diag + w as i128 + 1)
            .min(nk);
        if lo >= hi {
            0..0
        } else {
            // 0 <= lo < hi <= nk, which came from a usize.
            lo as usize..hi as usize
        }
    }

    /// The invariants the CPU reference relies on, checked again (the fields are public,
    /// so a validated problem can be changed): head counts, and varlen offsets.
    pub(crate) fn check_consistent(&self) -> Result<()> {
        if self.heads_kv == 0 || self.heads % self.heads_kv != 0 {
            return Err(crate::ops::common::altered(format!(
                "heads {} and heads_kv {}",
                self.heads, self.heads_kv
            )));
        }
        if let Some(s) = &self.seqlens {
            for (name, cu) in [
                ("cu_seqlens_q", &s.cu_seqlens_q),
                ("cu_seqlens_k", &s.cu_seqlens_k),
            ] {
                let total = cu.last().map_or(0, |&x| x.max(0) as usize);
                if cu.len() != self.batch + 1 {
                    return Err(crate::ops::common::altered(format!(
                        "{name} has {} offsets for batch {}",
                        cu.len(),
                        self.batch
                    )));
                }
                check_cu_seqlens(name, cu, total)?;
            }
        } else {
            checked_elements("q", &[self.batch, self.seqlen_q, self.heads, self.head_dim])?;
            checked_elements("k", &[self.batch, self.seqlen_k, self.heads, self.head_dim])?;
        }
        Ok(())
    }

    /// Shape of Q, O, dO and dQ.
    pub fn q_shape(&self) -> Vec<usize> {
        match self.seqlens {
            Some(_) => vec![self.rows_q(), self.heads, self.head_dim],
            None => vec![self.batch, self.seqlen_q, self.heads, self.head_dim],
        }
    }

    /// Shape of K, V, dK and dV.
    pub fn kv_shape(&self) -> Vec<usize> {
        match self.seqlens {
            Some(_) => vec![self.rows_k(), self.heads_kv, self.head_dim],
            None => vec![self.batch, self.seqlen_k, self.heads_kv, self.head_dim],
        }
    }

    /// Shape of LSE: (B, H, Nq), or (H, total_q) for varlen.
    pub fn lse_shape(&self) -> Vec<usize> {
        match self.seqlens {
            Some(_) => vec![self.heads, self.rows_q()],
            None => vec![self.batch, self.heads, self.seqlen_q],
        }
    }

    /// Forward FLOPs: multiply-adds x2 of the two matmuls. Plain and causal dense
    /// problems use FlashAttention's benchmark convention (causal = half, as
    /// ../shared/ANCHORS.md); windows and varlen count the visible pairs exactly.
    pub fn flops(&self) -> f64 {
        let per_pair = 4.0 * self.heads as f64 * self.head_dim as f64;
        if self.seqlens.is_none() && self.window_left.is_none() {
            let f = per_pair * self.batch as f64 * self.seqlen_q as f64 * self.seqlen_k as f64;
            return if self.causal { f / 2.0 } else { f };
        }
        let pairs: usize = (0..self.batch)
            .map(|b| {
                let (nq, nk) = (self.q_rows(b).len(), self.k_rows(b).len());
                (0..nq)
                    .map(|i| self.visible_keys(i, nq, nk).len())
                    .sum::<usize>()
            })
            .sum();
        per_pair * pairs as f64
    }
}

const QKV_LAYOUT: &str = "(batch, seqlen, heads, head_dim)";
const VARLEN_LAYOUT: &str = "(total_seqlen, heads, head_dim)";

/// Checks Q, K, V (by dtype and layout) and the options for a dense batch; returns the
/// problem sizes.
pub fn validate(
    q: (DType, &Layout),
    k: (DType, &Layout),
    v: (DType, &Layout),
    opts: &AttentionOptions,
) -> Result<AttentionProblem> {
    validate_inputs(q, k, v, None, opts)
}

/// Like [`validate`], for a variable-length batch: Q, K, V are packed
/// (total, heads, head_dim) and `seqlens` must be B+1 non-decreasing offsets from 0 to
/// the total of each.
pub fn validate_varlen(
    q: (DType, &Layout),
    k: (DType, &Layout),
    v: (DType, &Layout),
    seqlens: &SeqLens,
    opts: &AttentionOptions,
) -> Result<AttentionProblem> {
    validate_inputs(q, k, v, Some(seqlens), opts)
}

pub(crate) fn validate_inputs(
    q: (DType, &Layout),
    k: (DType, &Layout),
    v: (DType, &Layout),
    seqlens: Option<&SeqLens>,
    opts: &AttentionOptions,
) -> Result<AttentionProblem> {
    let (rank, layout_name) = match seqlens {
        Some(_) => (3, VARLEN_LAYOUT),
        None => (4, QKV_LAYOUT),
    };
    for (name, (_, l)) in [("q", q), ("k", k), ("v", v)] {
        check_layout(name, l, rank, layout_name)?;
    }
    if q.0 != k.0 || q.0 != v.0 {
        return Err(Error::DTypeMismatch {
            detail: format!("q is {}, k is {}, v is {}", q.0, k.0, v.0),
        });
    }
    let (qs, ks, vs) = (&q.1.shape, &k.1.shape, &v.1.shape);
    if ks != vs {
        return Err(Error::ShapeMismatch {
            detail: format!("k has shape {ks:?} but v has shape {vs:?}"),
        });
    }
    // The last two dims are (heads, head_dim) in both layouts.
    let (hq, hkv, d) = (qs[rank - 2], ks[rank - 2], qs[rank - 1]);
    if qs[rank - 1] != ks[rank - 1] || (rank == 4 && qs[0] != ks[0]) {
        let what = if rank == 4 {
            "batch and head_dim"
        } else {
            "head_dim"
        };
        return Err(Error::ShapeMismatch {
            detail: format!("q {qs:?} and k {ks:?} must agree on {what} {layout_name}"),
        });
    }
    if hkv == 0 || hq % hkv != 0 {
        return Err(Error::ShapeMismatch {
            detail: format!(
                "q has {hq} heads, which is not a multiple of k/v's {hkv} heads \
                 (grouped-query attention needs heads_q % heads_kv == 0)"
            ),
        });
    }
    let scale = check_scale(opts.scale, d)?;
    let window_right = match (opts.causal, opts.window_right) {
        (true, _) => Some(0),
        (false, w) => w,
    };
    let (batch, seqlen_q, seqlen_k) = match seqlens {
        None => (qs[0], qs[1], ks[1]),
        Some(s) => {
            check_cu_seqlens("cu_seqlens_q", &s.cu_seqlens_q, qs[0])?;
            check_cu_seqlens("cu_seqlens_k", &s.cu_seqlens_k, ks[0])?;
            if s.cu_seqlens_q.len() != s.cu_seqlens_k.len() {
                return Err(Error::ShapeMismatch {
                    detail: format!(
                        "cu_seqlens_q has {} offsets but cu_seqlens_k has {}: both must be \
                         batch + 1",
                        s.cu_seqlens_q.len(),
                        s.cu_seqlens_k.len()
                    ),
                });
            }
            let longest = |cu: &[i32]| cu.windows(2).map(|w| (w[1] - w[0]) as usize).max();
            (
                s.cu_seqlens_q.len() - 1,
                longest(&s.cu_seqlens_q).unwrap_or(0),
                longest(&s.cu_seqlens_k).unwrap_or(0),
            )
        }
    };
    // Every buffer the call allocates (O, LSE, the f32 copies of Q, K, V) fits.
    checked_elements("q", qs)?;
    checked_elements("k", ks)?;
    let rows_q = qs[0] * if rank == 4 { qs[1] } else { 1 };
    checked_elements("lse", &[rows_q, hq])?;
    // A window wider than the sequence sees what an unbounded one does; clamp it (the
    // same on every path), so no later arithmetic meets a huge window: every key is
    // within seqlen_k - 1 before the diagonal and seqlen_q - 1 after it.
    let window_left = opts.window_left.map(|w| w.min(seqlen_k));
    let window_right = window_right.map(|w| w.min(seqlen_q));
    Ok(AttentionProblem {
        batch,
        heads: hq,
        heads_kv: hkv,
        seqlen_q,
        seqlen_k,
        head_dim: d,
        scale,
        causal: opts.causal,
        window_left,
        window_right,
        dtype: q.0,
        seqlens: seqlens.cloned(),
    })
}

/// B+1 offsets, starting at 0, non-decreasing, ending at `total` rows.
fn check_cu_seqlens(name: &str, cu: &[i32], total: usize) -> Result<()> {
    let bad = |why: String| Err(Error::InvalidArgument(format!("{name}: {why}")));
    if cu.len() < 2 {
        return bad(format!(
            "needs batch + 1 >= 2 offsets, got {} ({cu:?})",
            cu.len()
        ));
    }
    if cu[0] != 0 {
        return bad(format!("must start at 0, got {}", cu[0]));
    }
    if let Some(i) = cu.windows(2).position(|w| w[1] < w[0]) {
        return bad(format!(
            "must be non-decreasing, but offset {} is {} and offset {} is {}",
            i,
            cu[i],
            i + 1,
            cu[i + 1]
        ));
    }
    let last = *cu.last().expect("len >= 2");
    if last as usize != total {
        return bad(format!(
            "ends at {last} but the packed tensor has {total} rows (out of range or short)"
        ));
    }
    Ok(())
}

/// Checks the backward's extra inputs (O, dO like Q; LSE f32 of the problem's LSE
/// shape) against a validated forward problem.
/// [`validate_inputs`] then [`validate_backward`] of a backward call's six tensors
/// (q, k, v, out, lse, dout).
pub(crate) fn validate_backward_call(
    [q, k, v, out, lse, dout]: [(DType, &Layout); 6],
    seqlens: Option<&SeqLens>,
    opts: &AttentionOptions,
) -> Result<AttentionProblem> {
    let p = validate_inputs(q, k, v, seqlens, opts)?;
    validate_backward(&p, out, lse, dout)?;
    Ok(p)
}

pub fn validate_backward(
    p: &AttentionProblem,
    out: (DType, &Layout),
    lse: (DType, &Layout),
    dout: (DType, &Layout),
) -> Result<()> {
    let q_shape = p.q_shape();
    let layout_name = if p.seqlens.is_some() {
        VARLEN_LAYOUT
    } else {
        QKV_LAYOUT
    };
    for (name, (dtype, l)) in [("out", out), ("dout", dout)] {
        check_layout(name, l, q_shape.len(), layout_name)?;
        if l.shape != q_shape {
            return Err(Error::ShapeMismatch {
                detail: format!("{name} has shape {:?}, expected q's {q_shape:?}", l.shape),
            });
        }
        if dtype != p.dtype {
            return Err(Error::DTypeMismatch {
                detail: format!("{name} is {dtype} but q is {}", p.dtype),
            });
        }
    }
    let lse_shape = p.lse_shape();
    if lse.1.shape != lse_shape || lse.1.strides.len() != lse_shape.len() {
        return Err(Error::ShapeMismatch {
            detail: format!(
                "lse has shape {:?}, expected {lse_shape:?} (the forward's lse)",
                lse.1.shape
            ),
        });
    }
    if lse.0 != DType::F32 {
        return Err(Error::UnsupportedDType {
            name: "lse",
            dtype: lse.0,
            supported: "lse is float32, as the forward returns it",
        });
    }
    Ok(())
}
