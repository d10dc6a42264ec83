//! Longformer self-attention, forward and backward, as plain loops over each row's key
//! list ([`LongformerProblem::keys`]).
//!
//! Buffers are contiguous (B, N, H, D) for Q, K, V, Q_g, K_g, V_g, O, dO and the
//! gradients; LSE is (B, H, N). A global query row scores Q_g[i] against K_g and averages
//! V_g; every other row scores Q[i] against K and averages V (global key columns
//! included). Generic over f32 and f64 (for the tests' finite differences).

use crate::longformer::LongformerProblem;
use crate::ops::attention::reference::{dot, parallel_map, Real};

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
pub fn longformer<T: Real>(p: &LongformerProblem, x: &LongformerInputs<'_, T>) -> (Vec<T>, Vec<T>) {
    let (n, d) = (p.seqlen, p.head_dim);
    let mut out = vec![T::ZERO; p.batch * n * p.heads * d];
    let mut lse = vec![T::NEG_INFINITY; p.batch * p.heads * n];
    let tasks = tasks(p);
    let scale = T::from_f32(p.scale);
    let results = parallel_map(&tasks, |&(b, h)| {
        let mut o = vec![T::ZERO; n * d];
        let mut l = vec![T::NEG_INFINITY; n];
        let mut scores = Vec::new();
        for i in 0..n {
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
        (o, l)
    });
    for (&(b, h), (o, l)) in tasks.iter().zip(results) {
        for i in 0..n {
            out[at(p, b, i, h)..at(p, b, i, h) + d].copy_from_slice(&o[i * d..(i + 1) * d]);
            lse[p.lse_index(b, h, i)] = l[i];
        }
    }
    (out, lse)
}

/// Longformer backward from the forward's O and LSE, row by row as FlashAttention's:
/// P = exp(scale * q K^T - LSE), Delta = dO . O, dV += P^T dO, dS = P * (dO V^T - Delta),
/// dQ = scale * dS K, dK += scale * dS^T q, each on the projections the row used.
pub fn longformer_backward<T: Real>(
    p: &LongformerProblem,
    x: &LongformerInputs<'_, T>,
    out: &[T],
    lse: &[T],
    dout: &[T],
) -> LongformerGrads<T> {
    let (n, d) = (p.seqlen, p.head_dim);
    let len = p.batch * n * p.heads * d;
    let mut g = LongformerGrads {
        dq: vec![T::ZERO; len],
        dk: vec![T::ZERO; len],
        dv: vec![T::ZERO; len],
        dq_g: vec![T::ZERO; len],
        dk_g: vec![T::ZERO; len],
        dv_g: vec![T::ZERO; len],
    };
    let tasks = tasks(p);
    let scale = T::from_f32(p.scale);
    // One task per (sequence, head): it owns those rows of all six gradients, stored as
    // [local (dq, dk, dv), global (dq, dk, dv)], each n x d.
    let results = parallel_map(&tasks, |&(b, h)| {
        let mut acc: [Vec<T>; 6] = std::array::from_fn(|_| vec![T::ZERO; n * d]);
        for i in 0..n {
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
        acc
    });
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
    g
}
