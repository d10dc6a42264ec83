//! Dense attention, forward and backward, as plain loops over packed sequences.
//!
//! Buffers are contiguous: Q / O / dO / dQ are (rows_q, H, D) and K / V / dK / dV are
//! (rows_k, H_kv, D), where a dense batch is the packing of its B sequences of equal
//! length, so (B, N, H, D) contiguous memory is already in this form. LSE is laid out as
//! [`AttentionProblem::lse_index`] says. Generic over f32 (what the library serves) and
//! f64 (what the tests' finite differences need).

use std::ops::{Add, AddAssign, Div, Mul, Sub};

use crate::attention::AttentionProblem;
use crate::error::Result;
use crate::ops::common::{check_buffers, poll_interrupt, try_alloc_vec, try_parallel_map};

/// The float types the reference runs in.
pub trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + AddAssign
    + 'static
{
    const ZERO: Self;
    const NEG_INFINITY: Self;
    fn from_f32(x: f32) -> Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    fn from_f32(x: f32) -> Self {
        x
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    fn from_f32(x: f32) -> Self {
        x as f64
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
}

/// dQ, dK, dV of one backward call, laid out like Q, K, V.
#[derive(Debug, Clone, PartialEq)]
pub struct Gradients<T> {
    pub dq: Vec<T>,
    pub dk: Vec<T>,
    pub dv: Vec<T>,
}

pub(crate) fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    a.iter().zip(b).fold(T::ZERO, |acc, (&x, &y)| acc + x * y)
}

/// Row `r` of head `h` in a (rows, heads, d) buffer.
fn row_range(r: usize, h: usize, heads: usize, d: usize) -> std::ops::Range<usize> {
    let start = (r * heads + h) * d;
    start..start + d
}

/// Attention forward. Returns O (laid out like Q) and LSE (natural log, per
/// [`AttentionProblem::lse_index`]).
///
/// Fallible: allocation failures (`Error::OutOfMemory`) and interruptions (see
/// [`crate::ops::with_interrupt_check`]) returned as errors.
pub fn try_attention<T: Real>(
    p: &AttentionProblem,
    q: &[T],
    k: &[T],
    v: &[T],
) -> Result<(Vec<T>, Vec<T>)> {
    p.check_consistent()?;
    let (hq, hkv, d) = (p.heads, p.heads_kv, p.head_dim);
    check_buffers(&[
        ("q", q.len(), &[p.rows_q(), hq, d]),
        ("k", k.len(), &[p.rows_k(), hkv, d]),
        ("v", v.len(), &[p.rows_k(), hkv, d]),
    ])?;
    let mut out = try_alloc_vec(p.rows_q() * hq * d, T::ZERO, "the attention output")?;
    let mut lse = try_alloc_vec(p.rows_q() * hq, T::NEG_INFINITY, "the attention LSE")?;
    let tasks: Vec<(usize, usize)> = (0..p.batch)
        .flat_map(|b| (0..hq).map(move |h| (b, h)))
        .collect();
    // One task per (sequence, query head): O rows (nq x D) and LSE (nq).
    let results = try_parallel_map(&tasks, |&(b, h)| {
        let (qr, kr) = (p.q_rows(b), p.k_rows(b));
        let (nq, nk) = (qr.len(), kr.len());
        let hk = h / p.group_size();
        let mut o = try_alloc_vec(nq * d, T::ZERO, "attention output rows")?;
        let mut l = try_alloc_vec(nq, T::NEG_INFINITY, "attention LSE rows")?;
        let mut scores = Vec::new();
        let scale = T::from_f32(p.scale);
        for i in 0..nq {
            poll_interrupt()?;
            let keys = p.visible_keys(i, nq, nk);
            if keys.is_empty() {
                continue; // O stays 0, LSE -inf
            }
            let qi = &q[row_range(qr.start + i, h, hq, d)];
            scores.clear();
            let mut max = T::NEG_INFINITY;
            for j in keys.clone() {
                let s = dot(qi, &k[row_range(kr.start + j, hk, hkv, d)]) * scale;
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
            for (j, &w) in keys.zip(&scores) {
                for (acc, &x) in oi.iter_mut().zip(&v[row_range(kr.start + j, hk, hkv, d)]) {
                    *acc += w * x;
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
        let qr = p.q_rows(b);
        for i in 0..qr.len() {
            out[row_range(qr.start + i, h, hq, d)].copy_from_slice(&o[i * d..(i + 1) * d]);
            lse[p.lse_index(b, h, i)] = l[i];
        }
    }
    Ok((out, lse))
}

/// Attention backward from the forward's O and LSE (as FlashAttention's backward):
/// P = exp(scale * Q K^T - LSE), Delta = rowsum(dO * O), dV = P^T dO, dP = dO V^T,
/// dS = P * (dP - Delta), dQ = scale * dS K, dK = scale * dS^T Q. For GQA, dK and dV sum
/// over the query heads of each group.
///
/// Fallible: allocation failures and interruptions returned as errors.
#[allow(clippy::too_many_arguments)]
pub fn try_attention_backward<T: Real>(
    p: &AttentionProblem,
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    lse: &[T],
    dout: &[T],
) -> Result<Gradients<T>> {
    p.check_consistent()?;
    let (hq, hkv, d, group) = (p.heads, p.heads_kv, p.head_dim, p.group_size());
    let (qs, kvs) = ([p.rows_q(), hq, d], [p.rows_k(), hkv, d]);
    check_buffers(&[
        ("q", q.len(), &qs),
        ("k", k.len(), &kvs),
        ("v", v.len(), &kvs),
        ("out", out.len(), &qs),
        ("dout", dout.len(), &qs),
        ("lse", lse.len(), &[p.rows_q(), hq]),
    ])?;
    let mut grads = Gradients {
        dq: try_alloc_vec(p.rows_q() * hq * d, T::ZERO, "dq")?,
        dk: try_alloc_vec(p.rows_k() * hkv * d, T::ZERO, "dk")?,
        dv: try_alloc_vec(p.rows_k() * hkv * d, T::ZERO, "dv")?,
    };
    let tasks: Vec<(usize, usize)> = (0..p.batch)
        .flat_map(|b| (0..hkv).map(move |h| (b, h)))
        .collect();
    // One task per (sequence, kv head): its dK, dV rows and the dQ rows of its group.
    let results = try_parallel_map(&tasks, |&(b, hk)| {
        let (qr, kr) = (p.q_rows(b), p.k_rows(b));
        let (nq, nk) = (qr.len(), kr.len());
        let scale = T::from_f32(p.scale);
        let mut dq = try_alloc_vec(group * nq * d, T::ZERO, "dq rows")?;
        let mut dk = try_alloc_vec(nk * d, T::ZERO, "dk rows")?;
        let mut dv = try_alloc_vec(nk * d, T::ZERO, "dv rows")?;
        for g in 0..group {
            let h = hk * group + g;
            for i in 0..nq {
                poll_interrupt()?;
                let keys = p.visible_keys(i, nq, nk);
                let l = lse[p.lse_index(b, h, i)];
                if keys.is_empty() || l == T::NEG_INFINITY {
                    continue;
                }
                let qi = &q[row_range(qr.start + i, h, hq, d)];
                let doi = &dout[row_range(qr.start + i, h, hq, d)];
                let delta = dot(doi, &out[row_range(qr.start + i, h, hq, d)]);
                let dqi = &mut dq[(g * nq + i) * d..(g * nq + i + 1) * d];
                for j in keys {
                    let kj = &k[row_range(kr.start + j, hk, hkv, d)];
                    let vj = &v[row_range(kr.start + j, hk, hkv, d)];
                    let pij = (dot(qi, kj) * scale - l).exp();
                    let ds = pij * (dot(doi, vj) - delta);
                    for (acc, &x) in dv[j * d..(j + 1) * d].iter_mut().zip(doi) {
                        *acc += pij * x;
                    }
                    for (acc, &x) in dk[j * d..(j + 1) * d].iter_mut().zip(qi) {
                        *acc += ds * scale * x;
                    }
                    for (acc, &x) in dqi.iter_mut().zip(kj) {
                        *acc += ds * scale * x;
                    }
                }
            }
        }
        Ok((dq, dk, dv))
    })?;
    for (&(b, hk), (dq, dk, dv)) in tasks.iter().zip(results) {
        let (qr, kr) = (p.q_rows(b), p.k_rows(b));
        let nq = qr.len();
        for g in 0..group {
            for i in 0..nq {
                grads.dq[row_range(qr.start + i, hk * group + g, hq, d)]
                    .copy_from_slice(&dq[(g * nq + i) * d..(g * nq + i + 1) * d]);
            }
        }
        for j in 0..kr.len() {
            grads.dk[row_range(kr.start + j, hk, hkv, d)].copy_from_slice(&dk[j * d..(j + 1) * d]);
            grads.dv[row_range(kr.start + j, hk, hkv, d)].copy_from_slice(&dv[j * d..(j + 1) * d]);
        }
    }
    Ok(grads)
}
