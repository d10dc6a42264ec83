//! Linformer's CPU reference, forward and backward, as plain loops over contiguous
//! row-major f64 buffers (the callers in crate::ops::linformer make strided inputs
//! contiguous), with the roundings the module doc pins (see [`crate::ops::linformer`]):
//!
//!   kp = round(E[:, :N] · K̃),  vp = round(F[:, :N] · Ṽ)   (K̃, Ṽ: padded rows zeroed)
//!   O, LSE = dense non-causal attention of (Q, kp, vp)    (the attention reference, f64)
//!
//! Q / O / dO (B, N, H, D), K / V (B, N, H_kv, D), kp / vp (B, k, H_kv, D), E (He, k,
//! N_max), F (Hf, k, N_max), LSE (B, H, N). Everything is computed in f64; kp, vp (and
//! in the backward dkp, dvp) are rounded to the storage dtype, as the kernels store them
//! between their passes; the callers round each output once.

use crate::attention::AttentionProblem;
use crate::error::Result;
use crate::ops::attention::reference::{try_attention, try_attention_backward};
use crate::ops::common::{altered, check_buffers, poll_interrupt, try_alloc_vec};
use crate::ops::ffn::reference::round_to_dtype;
use crate::ops::linformer::LinformerProblem;

/// The inputs of one call, contiguous row-major f64 (see the module doc for shapes).
#[derive(Debug, Clone, Copy)]
pub struct LinformerInputs<'a> {
    pub q: &'a [f64],
    pub k: &'a [f64],
    pub v: &'a [f64],
    pub e: &'a [f64],
    /// `None`: F = E (the problem's `shared_kv`).
    pub f: Option<&'a [f64]>,
}

/// One forward call: O (not rounded; the caller rounds it once), LSE, and kp, vp
/// (already rounded to the dtype).
#[derive(Debug, Clone, PartialEq)]
pub struct LinformerForward {
    pub out: Vec<f64>,
    pub lse: Vec<f64>,
    pub kp: Vec<f64>,
    pub vp: Vec<f64>,
}

/// One backward call's gradients (not rounded; the caller rounds each once): dQ, dK, dV
/// like Q, K, V; dE like E (and dF like F, `None` when F = E: dE then holds both
/// contributions). Columns >= N of dE, dF are 0; padded keys' rows of dK, dV are 0.
#[derive(Debug, Clone, PartialEq)]
pub struct LinformerRefGradients {
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
    pub de: Vec<f64>,
    pub df: Option<Vec<f64>>,
}

/// The dense attention problem over the projected keys: N queries, k keys, not causal.
fn attention_problem(p: &LinformerProblem) -> AttentionProblem {
    AttentionProblem {
        batch: p.batch,
        heads: p.heads,
        heads_kv: p.heads_kv,
        seqlen_q: p.seqlen,
        seqlen_k: p.k_proj,
        head_dim: p.head_dim,
        scale: p.scale,
        causal: false,
        window_left: None,
        window_right: None,
        dtype: p.dtype,
        seqlens: None,
    }
}

/// Checks the problem and the input buffers' lengths.
fn check_inputs(p: &LinformerProblem, x: &LinformerInputs<'_>) -> Result<()> {
    p.check_consistent()?;
    if p.shared_kv != x.f.is_none() {
        return Err(altered(format!(
            "shared_kv is {} but f is {}given",
            p.shared_kv,
            if x.f.is_some() { "" } else { "not " }
        )));
    }
    let (qs, kvs) = (p.q_shape(), p.kv_shape());
    let (es, fs) = (p.e_shape(), p.f_shape());
    check_buffers(&[
        ("q", x.q.len(), &qs),
        ("k", x.k.len(), &kvs),
        ("v", x.v.len(), &kvs),
        ("e", x.e.len(), &es),
    ])?;
    if let Some(f) = x.f {
        check_buffers(&[("f", f.len(), &fs)])?;
    }
    Ok(())
}

/// One projection: out[b, r, hk, :] = round(Σ_{j < N, not padded} P[head(hk), r, j]
/// · X[b, j, hk, :]) for X (B, N, H_kv, D) and P (heads, k, N_max).
fn project(
    p: &LinformerProblem,
    proj: &[f64],
    head: impl Fn(usize) -> usize,
    x: &[f64],
) -> Result<Vec<f64>> {
    let (n, kp, hkv, d, n_max) = (p.seqlen, p.k_proj, p.heads_kv, p.head_dim, p.n_max);
    let mut out = try_alloc_vec(p.batch * kp * hkv * d, 0.0, "the projected keys/values")?;
    let mut acc = try_alloc_vec(d, 0.0, "a projected row")?;
    for b in 0..p.batch {
        for r in 0..kp {
            poll_interrupt()?;
            for hk in 0..hkv {
                let row = &proj[(head(hk) * kp + r) * n_max..][..n];
                acc.iter_mut().for_each(|a| *a = 0.0);
                for (j, &w) in row.iter().enumerate() {
                    if p.padded(b, j) {
                        continue;
                    }
                    let xr = &x[((b * n + j) * hkv + hk) * d..][..d];
                    for (a, &xv) in acc.iter_mut().zip(xr) {
                        *a += w * xv;
                    }
                }
                let o = &mut out[((b * kp + r) * hkv + hk) * d..][..d];
                for (ov, &a) in o.iter_mut().zip(&acc) {
                    *ov = round_to_dtype(p.dtype, a);
                }
            }
        }
    }
    Ok(out)
}

/// The forward: kp, vp (rounded), then the attention of (Q, kp, vp); O not rounded.
///
/// Fallible: allocation failures (`Error::OutOfMemory`) and interruptions (see
/// [`crate::ops::with_interrupt_check`]) returned as errors.
pub fn try_linformer(p: &LinformerProblem, x: &LinformerInputs<'_>) -> Result<LinformerForward> {
    check_inputs(p, x)?;
    let kp = project(p, x.e, |hk| p.e_head(hk), x.k)?;
    let vp = match x.f {
        Some(f) => project(p, f, |hk| p.f_head(hk), x.v)?,
        None => project(p, x.e, |hk| p.e_head(hk), x.v)?,
    };
    let (out, lse) = try_attention(&attention_problem(p), x.q, &kp, &vp)?;
    Ok(LinformerForward { out, lse, kp, vp })
}

/// dX[b, j, hk, :] = Σ_r P[head(hk), r, j] · dXp[b, r, hk, :] for unpadded j < N (0 for
/// padded keys), and dP[head(hk), r, j] += Σ_{b, hk} dXp[b, r, hk, :] · X[b, j, hk, :]
/// into `dproj` (heads, k, N_max; columns >= N untouched).
#[allow(clippy::too_many_arguments)]
fn project_backward(
    p: &LinformerProblem,
    proj: &[f64],
    head: impl Fn(usize) -> usize,
    x: &[f64],
    dxp: &[f64],
    dx: &mut [f64],
    dproj: &mut [f64],
) -> Result<()> {
    let (n, kp, hkv, d, n_max) = (p.seqlen, p.k_proj, p.heads_kv, p.head_dim, p.n_max);
    for b in 0..p.batch {
        for j in 0..n {
            poll_interrupt()?;
            if p.padded(b, j) {
                continue; // dX stays 0, and the key adds nothing to dP
            }
            for hk in 0..hkv {
                let h = head(hk);
                let at = ((b * n + j) * hkv + hk) * d;
                let xr = &x[at..at + d];
                for r in 0..kp {
                    let g = &dxp[((b * kp + r) * hkv + hk) * d..][..d];
                    let w = proj[(h * kp + r) * n_max + j];
                    for (o, &gv) in dx[at..at + d].iter_mut().zip(g) {
                        *o += w * gv;
                    }
                    dproj[(h * kp + r) * n_max + j] +=
                        g.iter().zip(xr).map(|(a, b)| a * b).sum::<f64>();
                }
            }
        }
    }
    Ok(())
}

/// The backward from the forward's O, LSE, kp and vp (as given: nothing is recomputed)
/// and dO: dQ, dkp, dvp are the dense attention backward of (Q, kp, vp) (dkp, dvp
/// rounded to the dtype), then dK = Eᵀ dkp, dV = Fᵀ dvp (padded keys 0), dE = Σ dkp K̃ᵀ
/// (+ Σ dvp Ṽᵀ when F = E), dF = Σ dvp Ṽᵀ, summed over the batch and the K/V heads that
/// share a projection head. Nothing rounded but dkp, dvp.
///
/// Fallible: allocation failures and interruptions returned as errors.
#[allow(clippy::too_many_arguments)]
pub fn try_linformer_backward(
    p: &LinformerProblem,
    x: &LinformerInputs<'_>,
    out: &[f64],
    lse: &[f64],
    kp: &[f64],
    vp: &[f64],
    dout: &[f64],
) -> Result<LinformerRefGradients> {
    check_inputs(p, x)?;
    let (qs, ps) = (p.q_shape(), p.proj_shape());
    check_buffers(&[
        ("out", out.len(), &qs),
        ("dout", dout.len(), &qs),
        ("lse", lse.len(), &p.lse_shape()),
        ("kp", kp.len(), &ps),
        ("vp", vp.len(), &ps),
    ])?;
    let g = try_attention_backward(&attention_problem(p), x.q, kp, vp, out, lse, dout)?;
    let round = |mut v: Vec<f64>| {
        v.iter_mut().for_each(|x| *x = round_to_dtype(p.dtype, *x));
        v
    };
    let (dkp, dvp) = (round(g.dk), round(g.dv));
    let kv_len = x.k.len();
    let mut dk = try_alloc_vec(kv_len, 0.0, "dk")?;
    let mut dv = try_alloc_vec(kv_len, 0.0, "dv")?;
    let mut de = try_alloc_vec(x.e.len(), 0.0, "de")?;
    project_backward(p, x.e, |hk| p.e_head(hk), x.k, &dkp, &mut dk, &mut de)?;
    let df = match x.f {
        Some(f) => {
            let mut df = try_alloc_vec(f.len(), 0.0, "df")?;
            project_backward(p, f, |hk| p.f_head(hk), x.v, &dvp, &mut dv, &mut df)?;
            Some(df)
        }
        None => {
            project_backward(p, x.e, |hk| p.e_head(hk), x.v, &dvp, &mut dv, &mut de)?;
            None
        }
    };
    Ok(LinformerRefGradients {
        dq: g.dq,
        dk,
        dv,
        de,
        df,
    })
}
