//! Reformer LSH attention's CPU reference, forward and backward, as plain loops over
//! contiguous row-major f64 buffers (the callers in crate::ops::reformer make strided
//! inputs contiguous), with the semantics the module doc pins (see
//! [`crate::ops::reformer`]):
//!
//! - hashing (N > C): bucket = first argmax of [x R_r ; −x R_r] for the unnormalised qk
//!   row x, in f64 from the stored values; padded tokens get bucket nb when some token
//!   of the batch is padded; round r's values are offset by r · nb' (nb' = nb or nb + 1);
//! - per (b, h): a stable sort of the n_hashes · N concatenated positions p = r · N + i
//!   by bucket; chunks of C over the sorted order; a query at sorted position s (chunk c)
//!   attends to chunks c − before ..= c + after, circularly over all n_hashes · N / C
//!   chunks (duplicates counted twice); N <= C: every query attends to all N tokens;
//! - score = q_i · k_j, k_j = qk_j · (mean(qk_j²) + 1e-6)^(−1/2) / sqrt(D); scores of
//!   keys after the query (causal) or padded are replaced by the mask value, then the
//!   score of the query's own token by the self-mask value (see
//!   [`ReformerProblem::mask_values`]);
//! - per round: lse_r, o_r = softmax-weighted v; out = Σ_r exp(lse_r − logsumexp_r
//!   lse_r) o_r.
//!
//! qk / v / O / dO (B, N, H, D), rotations (H, D, n_hashes, n_buckets / 2), buckets
//! (B, H, n_hashes, N), LSE (B, H, rounds, N). Nothing is rounded here: the callers round
//! O to the dtype and LSE to f32 once.

use crate::error::Result;
use crate::ops::common::{
    altered, check_buffers, poll_interrupt, try_alloc_vec, try_with_capacity,
};
use crate::ops::reformer::ReformerProblem;

/// The epsilon of the keys' length normalisation (HF's `_len_norm`).
pub const KEY_NORM_EPS: f64 = 1e-6;

/// The inputs of one call, contiguous row-major f64 (see the module doc for shapes).
#[derive(Debug, Clone, Copy)]
pub struct ReformerInputs<'a> {
    pub qk: &'a [f64],
    pub v: &'a [f64],
    pub rotations: &'a [f64],
}

/// One forward call: O and LSE (not rounded), and the buckets used (`None` when
/// N <= C: no hashing).
#[derive(Debug, Clone, PartialEq)]
pub struct ReformerForward {
    pub out: Vec<f64>,
    pub lse: Vec<f64>,
    pub buckets: Option<Vec<i32>>,
}

/// One backward call's gradients (not rounded), shaped like qk and v.
#[derive(Debug, Clone, PartialEq)]
pub struct ReformerRefGradients {
    pub dqk: Vec<f64>,
    pub dv: Vec<f64>,
}

fn check_inputs(p: &ReformerProblem, x: &ReformerInputs<'_>) -> Result<()> {
    p.check_consistent()?;
    let s = p.qkv_shape();
    check_buffers(&[
        ("qk", x.qk.len(), &s),
        ("v", x.v.len(), &s),
        ("rotations", x.rotations.len(), &p.rotations_shape()),
    ])
}

/// Checks given buckets' length and ranges again (the problem may have been altered
/// after [`super::validate_buckets`]).
fn check_given(p: &ReformerProblem, buckets: Option<&[i32]>) -> Result<()> {
    let Some(bk) = buckets else { return Ok(()) };
    if !p.hashed() {
        return Err(altered("buckets given to an unhashed call (N <= C)".into()));
    }
    check_buffers(&[("buckets", bk.len(), &p.buckets_shape())])?;
    let nbr = p.buckets_per_round();
    for (at, &v) in bk.iter().enumerate() {
        let r = (at / p.seqlen) % p.n_hashes;
        if v < 0 || (v as usize) / nbr != r {
            return Err(altered(format!("bucket {v} at {at} (round {r})")));
        }
    }
    Ok(())
}

/// The buckets of a hashed call, (B, H, n_hashes, N) offset per round (see the module
/// doc), computed in f64 from qk and the rotations.
///
/// Fallible: allocation failures and interruptions returned as errors.
pub fn try_reformer_hash(p: &ReformerProblem, qk: &[f64], rotations: &[f64]) -> Result<Vec<i32>> {
    p.check_consistent()?;
    check_buffers(&[
        ("qk", qk.len(), &p.qkv_shape()),
        ("rotations", rotations.len(), &p.rotations_shape()),
    ])?;
    let (n, h_, d, nh, half) = (p.seqlen, p.heads, p.head_dim, p.n_hashes, p.n_buckets / 2);
    let nbr = p.buckets_per_round();
    let len = p.batch * h_ * nh * n;
    let mut out = try_alloc_vec(len, 0i32, "the buckets")?;
    for b in 0..p.batch {
        for h in 0..h_ {
            for i in 0..n {
                poll_interrupt()?;
                let x = &qk[((b * n + i) * h_ + h) * d..][..d];
                for r in 0..nh {
                    let bucket = if p.padded_anywhere && p.padded(b, i) {
                        p.n_buckets
                    } else {
                        let rot = |k: usize| -> f64 {
                            (0..d)
                                .map(|dd| x[dd] * rotations[((h * d + dd) * nh + r) * half + k])
                                .sum()
                        };
                        let mut best = (0usize, f64::NEG_INFINITY);
                        let mut first = true;
                        let proj: Vec<f64> = (0..half).map(rot).collect();
                        for k in 0..2 * half {
                            let val = if k < half { proj[k] } else { -proj[k - half] };
                            // The first maximum wins (torch.argmax).
                            if first || val > best.1 {
                                best = (k, val);
                                first = false;
                            }
                        }
                        best.0
                    };
                    out[((b * h_ + h) * nh + r) * n + i] = (bucket + r * nbr) as i32;
                }
            }
        }
    }
    Ok(out)
}

/// The sorted order of one (b, h)'s concatenated rounds: `perm[s]` is the position
/// p = r · N + i at sorted position s, `undo[p]` its sorted position.
struct Order {
    perm: Vec<usize>,
    undo: Vec<usize>,
}

fn order(p: &ReformerProblem, buckets: &[i32]) -> Result<Order> {
    let l = p.n_hashes * p.seqlen;
    let mut perm = try_alloc_vec(l, 0usize, "the sort permutation")?;
    perm.iter_mut().enumerate().for_each(|(s, v)| *v = s);
    // Stable: equal buckets keep their position order (HF's key L · bucket + p).
    perm.sort_by_key(|&pos| buckets[pos]);
    let mut undo = try_alloc_vec(l, 0usize, "the inverse permutation")?;
    for (s, &pos) in perm.iter().enumerate() {
        undo[pos] = s;
    }
    Ok(Order { perm, undo })
}

/// The key tokens query token `i` of round `r` attends to, in HF's order (chunks
/// before, its own, after; each chunk in sorted order), into `keys`.
fn window(p: &ReformerProblem, o: Option<&Order>, r: usize, i: usize, keys: &mut Vec<usize>) {
    keys.clear();
    let n = p.seqlen;
    let Some(o) = o else {
        keys.extend(0..n);
        return;
    };
    let c = p.chunk_length;
    let nc = p.n_chunks();
    let chunk = o.undo[r * n + i] / c;
    let base = (chunk + nc - p.chunks_before % nc) % nc;
    for j in 0..p.chunks_before + 1 + p.chunks_after {
        let cc = (base + j) % nc;
        keys.extend(o.perm[cc * c..(cc + 1) * c].iter().map(|&pos| pos % n));
    }
}

/// One (b, h): the normalised keys (N, D) and the order (hashed calls).
struct Head {
    keys: Vec<f64>,
    order: Option<Order>,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn row<'t>(t: &'t [f64], p: &ReformerProblem, b: usize, i: usize, h: usize) -> &'t [f64] {
    let d = p.head_dim;
    &t[((b * p.seqlen + i) * p.heads + h) * d..][..d]
}

/// k = x · (mean(x²) + eps)^(−1/2) / sqrt(D), and g = (mean(x²) + eps)^(−1/2).
fn norm_key(x: &[f64]) -> (Vec<f64>, f64) {
    let d = x.len() as f64;
    let g = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / d + KEY_NORM_EPS).sqrt();
    (x.iter().map(|v| v * g / d.sqrt()).collect(), g)
}

fn head(
    p: &ReformerProblem,
    x: &ReformerInputs<'_>,
    buckets: Option<&[i32]>,
    b: usize,
    h: usize,
) -> Result<Head> {
    let (n, d) = (p.seqlen, p.head_dim);
    let mut keys = try_alloc_vec(n * d, 0.0, "the normalised keys")?;
    for i in 0..n {
        keys[i * d..(i + 1) * d].copy_from_slice(&norm_key(row(x.qk, p, b, i, h)).0);
    }
    let order = match buckets {
        Some(bk) => {
            let l = p.n_hashes * n;
            Some(order(p, &bk[(b * p.heads + h) * l..][..l])?)
        }
        None => None,
    };
    Ok(Head { keys, order })
}

/// The (masked) score of query token i with key token j, and whether it was replaced.
fn score(
    p: &ReformerProblem,
    x: &ReformerInputs<'_>,
    hd: &Head,
    bh: (usize, usize),
    i: usize,
    j: usize,
) -> (f64, bool) {
    let (b, h) = bh;
    let (mask, self_mask) = p.mask_values();
    let d = p.head_dim;
    if j == i {
        return (self_mask, true);
    }
    if (p.causal && i < j) || p.padded(b, j) {
        return (mask, true);
    }
    (
        dot(row(x.qk, p, b, i, h), &hd.keys[j * d..(j + 1) * d]),
        false,
    )
}

/// The buckets a call uses: the given ones, or hashed (N > C), or none (N <= C).
fn buckets_used(
    p: &ReformerProblem,
    x: &ReformerInputs<'_>,
    given: Option<&[i32]>,
) -> Result<Option<Vec<i32>>> {
    check_given(p, given)?;
    Ok(match given {
        Some(bk) => {
            let mut v = try_with_capacity(bk.len(), "the buckets")?;
            v.extend_from_slice(bk);
            Some(v)
        }
        None if p.hashed() => Some(try_reformer_hash(p, x.qk, x.rotations)?),
        None => None,
    })
}

/// The forward: O and the per-round LSE (neither rounded), and the buckets used (the
/// given ones, or hashed from qk and the rotations; `None` when N <= C, where given
/// buckets are an error).
///
/// Fallible: allocation failures (`Error::OutOfMemory`) and interruptions (see
/// [`crate::ops::with_interrupt_check`]) returned as errors.
pub fn try_reformer(
    p: &ReformerProblem,
    x: &ReformerInputs<'_>,
    buckets: Option<&[i32]>,
) -> Result<ReformerForward> {
    check_inputs(p, x)?;
    let bk = buckets_used(p, x, buckets)?;
    let (n, hh, d, rounds) = (p.seqlen, p.heads, p.head_dim, p.lse_rounds());
    let mut out = try_alloc_vec(p.batch * n * hh * d, 0.0, "out")?;
    let mut lse = try_alloc_vec(p.batch * hh * rounds * n, 0.0, "lse")?;
    let mut o_r = try_alloc_vec(rounds * n * d, 0.0, "the per-round outputs")?;
    let mut keys = try_alloc_vec(p.window(), 0usize, "a key window")?;
    let mut s = try_alloc_vec(p.window(), 0.0, "a score row")?;
    for b in 0..p.batch {
        for h in 0..hh {
            let hd = head(p, x, bk.as_deref(), b, h)?;
            for r in 0..rounds {
                for i in 0..n {
                    poll_interrupt()?;
                    window(p, hd.order.as_ref(), r, i, &mut keys);
                    s.clear();
                    s.extend(keys.iter().map(|&j| score(p, x, &hd, (b, h), i, j).0));
                    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let l = m + s.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                    lse[((b * hh + h) * rounds + r) * n + i] = l;
                    let o = &mut o_r[(r * n + i) * d..][..d];
                    o.iter_mut().for_each(|v| *v = 0.0);
                    for (&j, &sv) in keys.iter().zip(&s) {
                        let w = (sv - l).exp();
                        for (ov, &vv) in o.iter_mut().zip(row(x.v, p, b, j, h)) {
                            *ov += w * vv;
                        }
                    }
                }
            }
            for i in 0..n {
                let ls: Vec<f64> = (0..rounds)
                    .map(|r| lse[((b * hh + h) * rounds + r) * n + i])
                    .collect();
                let total = logsumexp(&ls);
                let at = ((b * n + i) * hh + h) * d;
                for (r, &l) in ls.iter().enumerate() {
                    let w = (l - total).exp();
                    for (k, &ov) in o_r[(r * n + i) * d..][..d].iter().enumerate() {
                        out[at + k] += w * ov;
                    }
                }
            }
        }
    }
    Ok(ReformerForward {
        out,
        lse,
        buckets: bk,
    })
}

fn logsumexp(v: &[f64]) -> f64 {
    let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

/// The backward with the buckets held fixed (the given ones, or hashed again from qk and
/// the rotations: the same as the forward's), from the forward's O and per-round LSE (as
/// given: not recomputed) and dO. The rounds form one softmax over the union of their
/// windows, P = exp(score − logsumexp_r lse_r), so this is the attention backward
/// (FlashAttention's Delta = rowsum(dO ∘ O)) with dS reaching qk twice: as the query
/// (dq = dS · k) and through the key normalisation (dk = dS · q, then its Jacobian).
/// Replaced (masked) scores are constants: no gradient flows through them. Nothing
/// rounded.
///
/// Fallible: allocation failures and interruptions returned as errors.
pub fn try_reformer_backward(
    p: &ReformerProblem,
    x: &ReformerInputs<'_>,
    buckets: Option<&[i32]>,
    out: &[f64],
    lse: &[f64],
    dout: &[f64],
) -> Result<ReformerRefGradients> {
    check_inputs(p, x)?;
    let s = p.qkv_shape();
    check_buffers(&[
        ("out", out.len(), &s),
        ("dout", dout.len(), &s),
        ("lse", lse.len(), &p.lse_shape()),
    ])?;
    let bk = buckets_used(p, x, buckets)?;
    let (n, hh, d, rounds) = (p.seqlen, p.heads, p.head_dim, p.lse_rounds());
    let mut dqk = try_alloc_vec(x.qk.len(), 0.0, "dqk")?;
    let mut dv = try_alloc_vec(x.v.len(), 0.0, "dv")?;
    let mut dkn = try_alloc_vec(n * d, 0.0, "the normalised keys' gradient")?;
    let mut keys = try_alloc_vec(p.window(), 0usize, "a key window")?;
    for b in 0..p.batch {
        for h in 0..hh {
            let hd = head(p, x, bk.as_deref(), b, h)?;
            dkn.iter_mut().for_each(|v| *v = 0.0);
            for i in 0..n {
                poll_interrupt()?;
                let ls: Vec<f64> = (0..rounds)
                    .map(|r| lse[((b * hh + h) * rounds + r) * n + i])
                    .collect();
                let total = logsumexp(&ls);
                let doi = row(dout, p, b, i, h);
                let delta = dot(doi, row(out, p, b, i, h));
                let qi = row(x.qk, p, b, i, h);
                let mut dq = vec![0.0; d];
                for r in 0..rounds {
                    window(p, hd.order.as_ref(), r, i, &mut keys);
                    for &j in keys.iter() {
                        let (sv, replaced) = score(p, x, &hd, (b, h), i, j);
                        let pr = (sv - total).exp();
                        let vj = row(x.v, p, b, j, h);
                        let dp = dot(doi, vj);
                        let at = ((b * n + j) * hh + h) * d;
                        for (g, &o) in dv[at..at + d].iter_mut().zip(doi) {
                            *g += pr * o;
                        }
                        if replaced {
                            continue;
                        }
                        let ds = pr * (dp - delta);
                        let kj = &hd.keys[j * d..(j + 1) * d];
                        for k in 0..d {
                            dq[k] += ds * kj[k];
                            dkn[j * d + k] += ds * qi[k];
                        }
                    }
                }
                let at = ((b * n + i) * hh + h) * d;
                for (g, v) in dqk[at..at + d].iter_mut().zip(&dq) {
                    *g += v;
                }
            }
            // Through k = x g / sqrt(D), g = (mean(x²) + eps)^(−1/2):
            // dx = (g dk − x (x · dk) g³ / D) / sqrt(D).
            let df = d as f64;
            for j in 0..n {
                let xj = row(x.qk, p, b, j, h);
                let g = norm_key(xj).1;
                let dk = &dkn[j * d..(j + 1) * d];
                let xdk = dot(xj, dk);
                let at = ((b * n + j) * hh + h) * d;
                for k in 0..d {
                    dqk[at + k] += (g * dk[k] - xj[k] * xdk * g * g * g / df) / df.sqrt();
                }
            }
        }
    }
    Ok(ReformerRefGradients { dqk, dv })
}
