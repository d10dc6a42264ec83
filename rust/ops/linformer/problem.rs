//! The Linformer problem: what one call describes (sizes, sharing, the key padding mask),
//! and its validators (pure Rust), shared by the CPU reference and the CUDA path.

use super::TokenMask;
use crate::error::{Error, Result};
use crate::ops::common::{
    check_layout, check_row_layout, check_scale, checked_elements, key_padding_flags,
};
use crate::tensor::{DType, Layout};

/// Options of a Linformer call.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinformerOptions {
    /// Softmax scale; `None` means 1/sqrt(D).
    pub scale: Option<f32>,
}

impl LinformerOptions {
    /// The default scale 1/sqrt(D).
    pub fn new() -> Self {
        LinformerOptions::default()
    }

    pub fn scale(self, scale: Option<f32>) -> Self {
        LinformerOptions { scale }
    }
}

/// Sizes of a validated Linformer call.
#[derive(Debug, Clone, PartialEq)]
// Non-exhaustive: outside this crate only the validator builds one, so holding a
// problem is proof that the call was checked; the launch consumes it as it is.
#[non_exhaustive]
pub struct LinformerProblem {
    pub batch: usize,
    /// Query heads H.
    pub heads: usize,
    /// Key/value heads H_kv (divides `heads`; query head h reads kv head
    /// h / (H / H_kv)).
    pub heads_kv: usize,
    /// The sequence length N of Q, K and V (N <= `n_max`).
    pub seqlen: usize,
    /// The projected length k (rows of E and F), >= 1.
    pub k_proj: usize,
    /// The projections' columns N_max; the first `seqlen` are used.
    pub n_max: usize,
    pub head_dim: usize,
    /// E's heads: 1 (one E for every K/V head) or `heads_kv`.
    pub e_heads: usize,
    /// F's heads: 1 or `heads_kv`; equal to `e_heads` when `shared_kv`.
    pub f_heads: usize,
    /// F = E (key-value sharing): no F was given, and dE holds both contributions.
    pub shared_kv: bool,
    pub scale: f32,
    pub dtype: DType,
    /// A key padding mask was given.
    pub has_mask: bool,
    /// (B, N) row-major, true = padded key; empty without a mask (see [`Self::padded`]).
    pub padding: Vec<bool>,
}

impl LinformerProblem {
    /// Query heads per key/value head.
    pub fn group_size(&self) -> usize {
        self.heads / self.heads_kv
    }

    /// The head of E that K/V head `hk` uses.
    pub fn e_head(&self, hk: usize) -> usize {
        if self.e_heads == 1 {
            0
        } else {
            hk
        }
    }

    /// The head of F that K/V head `hk` uses.
    pub fn f_head(&self, hk: usize) -> usize {
        if self.f_heads == 1 {
            0
        } else {
            hk
        }
    }

    /// True when key `j` of sequence `b` is padded.
    pub fn padded(&self, b: usize, j: usize) -> bool {
        self.has_mask && self.padding[b * self.seqlen + j]
    }

    /// Shape of Q, O, dO and dQ: (B, N, H, D).
    pub fn q_shape(&self) -> Vec<usize> {
        vec![self.batch, self.seqlen, self.heads, self.head_dim]
    }

    /// Shape of K, V, dK and dV: (B, N, H_kv, D).
    pub fn kv_shape(&self) -> Vec<usize> {
        vec![self.batch, self.seqlen, self.heads_kv, self.head_dim]
    }

    /// Shape of the projected keys and values: (B, k, H_kv, D).
    pub fn proj_shape(&self) -> Vec<usize> {
        vec![self.batch, self.k_proj, self.heads_kv, self.head_dim]
    }

    /// Shape of E and dE: (He, k, N_max).
    pub fn e_shape(&self) -> Vec<usize> {
        vec![self.e_heads, self.k_proj, self.n_max]
    }

    /// Shape of F and dF: (Hf, k, N_max).
    pub fn f_shape(&self) -> Vec<usize> {
        vec![self.f_heads, self.k_proj, self.n_max]
    }

    /// Shape of LSE: (B, H, N).
    pub fn lse_shape(&self) -> Vec<usize> {
        vec![self.batch, self.heads, self.seqlen]
    }

    /// Forward FLOPs, 2 per multiply-add: the two projections (k x N by N x D per
    /// sequence and K/V head) and the attention over k keys (two matmuls per head).
    pub fn flops(&self) -> f64 {
        let (b, n, k, d) = (
            self.batch as f64,
            self.seqlen as f64,
            self.k_proj as f64,
            self.head_dim as f64,
        );
        let proj = 2.0 * 2.0 * b * self.heads_kv as f64 * k * n * d;
        let attn = 4.0 * b * self.heads as f64 * n * k * d;
        proj + attn
    }

    /// The invariants the CPU reference relies on, checked again (the fields are public,
    /// so a validated problem can be changed).
    pub(crate) fn check_consistent(&self) -> Result<()> {
        let bad = |what: String| Err(crate::ops::common::altered(what));
        if self.heads_kv == 0 || self.heads % self.heads_kv != 0 {
            return bad(format!(
                "heads {} and heads_kv {}",
                self.heads, self.heads_kv
            ));
        }
        let heads_ok = |h: usize| h == 1 || h == self.heads_kv;
        if !heads_ok(self.e_heads)
            || !heads_ok(self.f_heads)
            || (self.shared_kv && self.f_heads != self.e_heads)
        {
            return bad(format!(
                "e_heads {}, f_heads {}, heads_kv {}, shared_kv {}",
                self.e_heads, self.f_heads, self.heads_kv, self.shared_kv
            ));
        }
        if self.k_proj == 0 || self.seqlen > self.n_max {
            return bad(format!(
                "k {}, seqlen {}, n_max {}",
                self.k_proj, self.seqlen, self.n_max
            ));
        }
        let bn = checked_elements("the key padding mask", &[self.batch, self.seqlen])?;
        if self.padding.len() != if self.has_mask { bn } else { 0 } {
            return bad(format!(
                "{} padding flags for (batch, seqlen) = ({}, {})",
                self.padding.len(),
                self.batch,
                self.seqlen
            ));
        }
        checked_elements("q", &self.q_shape())?;
        checked_elements("k", &self.kv_shape())?;
        checked_elements("the projected keys", &self.proj_shape())?;
        checked_elements("e", &self.e_shape())?;
        checked_elements("f", &self.f_shape())?;
        Ok(())
    }
}

/// (dtype, layout) of one tensor, as validators read it.
pub type Described<'a> = (DType, &'a Layout);

/// What a forward call is made of, as the validator sees it.
#[derive(Debug, Clone, Copy)]
pub struct LinformerLayouts<'a> {
    pub q: Described<'a>,
    pub k: Described<'a>,
    pub v: Described<'a>,
    pub e: Described<'a>,
    /// `None`: F = E (key-value sharing).
    pub f: Option<Described<'a>>,
}

/// The backward's extra tensors, as the validator sees them.
#[derive(Debug, Clone, Copy)]
pub struct LinformerBackwardLayouts<'a> {
    pub out: Described<'a>,
    pub lse: Described<'a>,
    pub kp: Described<'a>,
    pub vp: Described<'a>,
    pub dout: Described<'a>,
}

const QKV_LAYOUT: &str = "(batch, seqlen, heads, head_dim)";
const PROJ_LAYOUT: &str = "(heads, k, n_max)";
const KP_LAYOUT: &str = "(batch, k, heads_kv, head_dim)";
const LSE_LAYOUT: &str = "(batch, heads, seqlen)";

/// The widest head the kernels take; the CPU reference holds calls to the same limit,
/// so both paths accept the same calls.
pub const MAX_HEAD_DIM: usize = 256;

fn same_dtype(name: &str, d: DType, q: DType) -> Result<()> {
    if d != q {
        return Err(Error::DTypeMismatch {
            detail: format!("{name} is {d} but q is {q}"),
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

/// A projection (E or F): rank 3 (heads, k, n_max), any strides, k >= 1, heads 1 or
/// heads_kv. Returns (heads, k, n_max).
fn check_projection(name: &'static str, l: &Layout, heads_kv: usize) -> Result<[usize; 3]> {
    if l.shape.len() == 3 && l.shape[1] == 0 {
        return Err(Error::InvalidArgument(format!(
            "{name} has shape {:?}: k = 0, but the projection needs k >= 1 rows \
             {PROJ_LAYOUT}",
            l.shape
        )));
    }
    check_layout(name, l, 3, PROJ_LAYOUT)?;
    let s = [l.shape[0], l.shape[1], l.shape[2]];
    if s[0] != 1 && s[0] != heads_kv {
        return Err(Error::ShapeMismatch {
            detail: format!(
                "{name} has shape {:?}: {} heads, but a projection has 1 head (shared by \
                 every head) or one per key/value head ({heads_kv})",
                l.shape, s[0]
            ),
        });
    }
    Ok(s)
}

/// Checks a forward call: Q (B, N, H, D), K and V (B, N, H_kv, D) with H % H_kv == 0,
/// any strides and a unit-stride head dim; E (He, k, N_max) and F (Hf, k, N_max) (or no
/// F: F = E) with any strides, He and Hf in {1, H_kv}, the same k >= 1 and N_max, and
/// N <= N_max; D <= [`MAX_HEAD_DIM`]; one dtype; nothing empty; the key padding mask
/// (B, N); every size product within memory (checked arithmetic).
pub fn validate(
    t: &LinformerLayouts<'_>,
    key_padding_mask: Option<&TokenMask>,
    opts: &LinformerOptions,
) -> Result<LinformerProblem> {
    for (name, (_, l)) in [("q", t.q), ("k", t.k), ("v", t.v)] {
        check_row_layout(name, l, 4, QKV_LAYOUT)?;
    }
    let dtype = t.q.0;
    same_dtype("k", t.k.0, dtype)?;
    same_dtype("v", t.v.0, dtype)?;
    same_dtype("e", t.e.0, dtype)?;
    if let Some(f) = t.f {
        same_dtype("f", f.0, dtype)?;
    }
    let (qs, ks) = (&t.q.1.shape, &t.k.1.shape);
    let (batch, seqlen, heads, head_dim) = (qs[0], qs[1], qs[2], qs[3]);
    let heads_kv = ks[2];
    check_shape(
        "k",
        t.k.1,
        &[batch, seqlen, heads_kv, head_dim],
        "q's batch, seqlen and head_dim",
    )?;
    check_shape("v", t.v.1, ks, "k's shape")?;
    if heads % heads_kv != 0 {
        return Err(Error::ShapeMismatch {
            detail: format!(
                "q has {heads} heads, which is not a multiple of k/v's {heads_kv} heads \
                 (grouped-query attention needs heads_q % heads_kv == 0)"
            ),
        });
    }
    if head_dim > MAX_HEAD_DIM {
        return Err(Error::Unsupported(format!(
            "head_dim = {head_dim}: Linformer takes head dims up to {MAX_HEAD_DIM}"
        )));
    }
    let [e_heads, k_proj, n_max] = check_projection("e", t.e.1, heads_kv)?;
    let f_heads = match t.f {
        None => e_heads,
        Some(f) => {
            let [f_heads, fk, fn_max] = check_projection("f", f.1, heads_kv)?;
            if (fk, fn_max) != (k_proj, n_max) {
                return Err(Error::ShapeMismatch {
                    detail: format!(
                        "e has shape {:?} and f has shape {:?}: E and F must agree on k and \
                         n_max {PROJ_LAYOUT}",
                        t.e.1.shape, f.1.shape
                    ),
                });
            }
            f_heads
        }
    };
    if seqlen > n_max {
        return Err(Error::ShapeMismatch {
            detail: format!(
                "the sequence length N = {seqlen} exceeds the projections' n_max = {n_max} \
                 (e has shape {:?}): E and F project at most n_max keys",
                t.e.1.shape
            ),
        });
    }
    let scale = check_scale(opts.scale, head_dim)?;
    let padding = key_padding_flags(key_padding_mask, batch, seqlen)?;
    // Every buffer the call allocates (O, LSE, kp, vp, the f64 copies) fits.
    checked_elements("q", qs)?;
    checked_elements("k", ks)?;
    checked_elements("the projected keys", &[batch, k_proj, heads_kv, head_dim])?;
    checked_elements("lse", &[batch, heads, seqlen])?;
    Ok(LinformerProblem {
        batch,
        heads,
        heads_kv,
        seqlen,
        k_proj,
        n_max,
        head_dim,
        e_heads,
        f_heads,
        shared_kv: t.f.is_none(),
        scale,
        dtype,
        has_mask: key_padding_mask.is_some(),
        padding,
    })
}

/// Checks the backward's extra tensors against a validated forward problem: O and dO
/// like Q (q's dtype, any strides, unit-stride head dim), LSE (B, H, N) float32, kp and
/// vp (B, k, H_kv, D) in q's dtype (the forward's projected keys and values).
pub fn validate_backward(p: &LinformerProblem, t: &LinformerBackwardLayouts<'_>) -> Result<()> {
    let q_shape = p.q_shape();
    for (name, (dtype, l)) in [("out", t.out), ("dout", t.dout)] {
        check_row_layout(name, l, 4, QKV_LAYOUT)?;
        check_shape(name, l, &q_shape, "q's shape")?;
        same_dtype(name, dtype, p.dtype)?;
    }
    let proj_shape = p.proj_shape();
    for (name, (dtype, l)) in [("kp", t.kp), ("vp", t.vp)] {
        check_row_layout(name, l, 4, KP_LAYOUT)?;
        check_shape(
            name,
            l,
            &proj_shape,
            "the forward's projected keys/values (batch, k, heads_kv, head_dim)",
        )?;
        same_dtype(name, dtype, p.dtype)?;
    }
    let (lse_dtype, lse) = t.lse;
    check_layout("lse", lse, 3, LSE_LAYOUT)?;
    check_shape(
        "lse",
        lse,
        &p.lse_shape(),
        "the forward's lse (batch, heads, seqlen)",
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
