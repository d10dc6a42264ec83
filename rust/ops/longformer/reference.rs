//! Longformer self-attention, forward and backward, as plain loops over each row's key
//! list ([`LongformerProblem::keys`]).
//!
//! Buffers are contiguous (B, N, H, D) for Q, K, V, Q_g, K_g, V_g, O, dO and the
//! gradients; LSE is (B, H, N). A global query row scores Q_g[i] against K_g and averages
//! V_g; every other row scores Q[i] against K and averages V (global key columns
//! included). Generic over f32 and f64 (for the tests' finite differences).

use crate::error::Result;
use crate::longformer::LongformerProblem;
use crate::ops::attention::reference::{dot, Real};
use crate::ops::common::{check_buffers, poll_interrupt, try_alloc_vec, try_parallel_map};

/// The six input buffers of one call (pass Q, K, V again as the global projections when
/// there are none).
#[derive(Debug, Clone, Copy)]
pub struct LongformerInputs<'a, T> {
    pub q: &'a [T],
    pub k: &'a [T],
    pub v: &'a [T],
    pub q_g: &'a [T],
    pub k_g: &'a [T],
    pub v_g: &'a [T],
}

/// Gradients of the six inputs: dq, dk, dv from the non-global rows, dq_g, dk_g, dv_g
/// from the global rows.
#[derive(Debug, Clone, PartialEq)]
pub struct LongformerGrads<T> {
    pub dq: Vec<T>,
    pub dk: Vec<T>,
    pub dv: Vec<T>,
    pub dq_g: Vec<T>,
    pub dk_g: Vec<T>,
    pub dv_g: Vec<T>,
}

fn check_inputs<T>(p: &LongformerProblem, x: &LongformerInputs<'_, T>) -> Result<()> {
    let s = p.qkv_shape();
    check_buffers(&[
        ("q", x.q.len(), &s),
        ("k", x.k.len(), &s),
        ("v", x.v.len(), &s),
        ("q_global", x.q_g.len(), &s),
        ("k_global", x.k_g.len(), &s),
        ("v_global", x.v_g.len(), &s),
    ])
}

fn tasks(p: &LongformerProblem) -> Vec<(usize, usize)> {
    (0..p.batch)
        .flat_map(|b| (0..p.heads).map(move |h| (b, h)))
        .collect()
}

/// Offset of (b, i, h) in a (B, N, H, D) buffer.
fn at(p: &LongformerProblem, b: usize, i: usize, h: usize) -> usize {
    ((b * p.seqlen + i) * p.heads + h) * p.head_dim
}

/// Longformer forward: O (B, N, H, D) and LSE (B, H, N; -inf for padded rows).
///
/// Fallible: allocation failures and interruptions (see
/// [`crate::ops::with_interrupt_check`]) returned as errors.
pub fn try_longformer<T: Real>(
    p: &LongformerProblem,
    x: &LongformerInputs<'_, T>,
) -> Result<(Vec<T>, Vec<T>)> {
    p.check_consistent()?;
    check_inputs(p, x)?;
    let (n, d) = (p.seqlen, p.head_dim);
    let mut out = try_alloc_vec(p.batch * n * p.heads * d, T::ZERO, "the Longformer output")?;
    let mut lse = try_alloc_vec(p.batch * p.heads * n, T::NEG_INFINITY, "the Longformer LSE")?;
    let tasks = tasks(p);
    let scale = T::from_f32(p.scale);
    let results = try_parallel_map(&tasks, |&(b, h)| {
        let mut o = try_alloc_vec(n * d, T::ZERO, "Longformer output rows")?;
        let mut l = try_alloc_vec(n, T::NEG_INFINITY, "Longformer LSE rows")?;
        let mut scores = Vec::new();
        for i in 0..n {
            poll_interrupt()?;
            let keys = p.keys(b, h, i);
            if keys.is_empty() {
                continue;
            }
            let (q, k, v) = if p.is_global(b, i) {
                (x.q_g, x.k_g, x.v_g)
            } else {
                (x.q, x.k, x.v)
            };
            let qi = &q[at(p, b, i, h)..at(p, b, i, h) + d];
            scores.clear();
            let mut max = T::NEG_INFINITY;
            for &j in &keys {
                let s = dot(qi, &k[at(p, b, j, h)..at(p, b, j, h) + d]) * scale;
                if s > max {
                    max = s;
                }
                scores.push(s);
            }
            let mut sum = T::ZERO;
            for s in &mut scores {
                *s = (*s - max).exp();
                sum += *s;
            }
            let oi = &mut o[i * d..(i + 1) * d];
            for (&j, &w) in keys.iter().zip(&scores) {
                for (acc, &y) in oi.iter_mut().zip(&v[at(p, b, j, h)..at(p, b, j, h) + d]) {
                    *acc += w * y;
                }
            }
            for acc in oi.iter_mut() {
                *acc = *acc / sum;
            }
            l[i] = max + sum.ln();
        }
        Ok((o, l))
    })?;
    for (&(b, h), (o, l)) in tasks.iter().zip(results) {
        for i in 0..n {
            out[at(p, b, i, h)..at(p, b, i, h) + d].copy_from_slice(&o[i * d..(i + 1) * d]);
            lse[p.lse_index(b, h, i)] = l[i];
        }
    }
    Ok((out, lse))
}

/// Longformer backward from the forward's O and LSE, row by row as FlashAttention's:
/// P = exp(scale * q K^T - LSE), Delta = dO . O, dV += P^T dO, dS = P * (dO V^T - Delta),
/// dQ = scale * dS K, dK += scale * dS^T q, each on the projections the row used.
///
/// Fallible: allocation failures and interruptions returned as errors.
pub fn try_longformer_backward<T: Real>(
    p: &LongformerProblem,
    x: &LongformerInputs<'_, T>,
    out: &[T],
    lse: &[T],
    dout: &[T],
) -> Result<LongformerGrads<T>> {
    p.check_consistent()?;
    check_inputs(p, x)?;
    let shape = p.qkv_shape();
    check_buffers(&[
        ("out", out.len(), &shape),
        ("dout", dout.len(), &shape),
        ("lse", lse.len(), &p.lse_shape()),
    ])?;
    let (n, d) = (p.seqlen, p.head_dim);
    let len = p.batch * n * p.heads * d;
    let buf = || try_alloc_vec(len, T::ZERO, "a Longformer gradient");
    let mut g = LongformerGrads {
        dq: buf()?,
        dk: buf()?,
        dv: buf()?,
        dq_g: buf()?,
        dk_g: buf()?,
        dv_g: buf()?,
    };
    let tasks = tasks(p);
    let scale = T::from_f32(p.scale);
    // One task per (sequence, head): it owns those rows of all six gradients, stored as
    // [local (dq, dk, dv), global (dq, dk, dv)], each n x d.
    let results = try_parallel_map(&tasks, |&(b, h)| {
        let row_buf = || try_alloc_vec(n * d, T::ZERO, "Longformer gradient rows");
        let mut acc: [Vec<T>; 6] = [
            row_buf()?,
            row_buf()?,
            row_buf()?,
            row_buf()?,
            row_buf()?,
            row_buf()?,
        ];
        for i in 0..n {
            poll_interrupt()?;
            let keys = p.keys(b, h, i);
            let l = lse[p.lse_index(b, h, i)];
            if keys.is_empty() || l == T::NEG_INFINITY {
                continue;
            }
            let global = p.is_global(b, i);
            let (q, k, v, base) = if global {
                (x.q_g, x.k_g, x.v_g, 3)
            } else {
                (x.q, x.k, x.v, 0)
            };
            let row = at(p, b, i, h)..at(p, b, i, h) + d;
            let qi = &q[row.clone()];
            let doi = &dout[row.clone()];
            let delta = dot(doi, &out[row]);
            let [dq, dk, dv] = &mut acc[base..base + 3] else {
                unreachable!("three buffers")
            };
            for &j in &keys {
                let kj = &k[at(p, b, j, h)..at(p, b, j, h) + d];
                let vj = &v[at(p, b, j, h)..at(p, b, j, h) + d];
                let pij = (dot(qi, kj) * scale - l).exp();
                let ds = pij * (dot(doi, vj) - delta) * scale;
                for (a, &y) in dv[j * d..(j + 1) * d].iter_mut().zip(doi) {
                    *a += pij * y;
                }
                for (a, &y) in dk[j * d..(j + 1) * d].iter_mut().zip(qi) {
                    *a += ds * y;
                }
                for (a, &y) in dq[i * d..(i + 1) * d].iter_mut().zip(kj) {
                    *a += ds * y;
                }
            }
        }
        Ok(acc)
    })?;
    for (&(b, h), acc) in tasks.iter().zip(results) {
        let dst = [
            &mut g.dq,
            &mut g.dk,
            &mut g.dv,
            &mut g.dq_g,
            &mut g.dk_g,
            &mut g.dv_g,
        ];
        for (dst, src) in dst.into_iter().zip(&acc) {
            for i in 0..n {
                dst[at(p, b, i, h)..at(p, b, i, h) + d].copy_from_slice(&src[i * d..(i + 1) * d]);
            }
        }
    }
    Ok(g)
}
