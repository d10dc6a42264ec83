use crate::attention::AttentionProblem;

/// Dense attention on contiguous f32 (B, Nq, H, D) / (B, Nk, H, D) buffers.
/// Returns O (B, Nq, H, D) and LSE (B, H, Nq), both f32. Rows run on all cores.
pub fn attention(p: &AttentionProblem, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (b, h, nq, d) = (p.batch, p.heads, p.seqlen_q, p.head_dim);
    let mut out = vec![0f32; b * nq * h * d];
    let mut lse = vec![0f32; b * h * nq];
    // One task per (batch, head); each writes disjoint rows of O and LSE.
    let tasks: Vec<(usize, usize)> = (0..b)
        .flat_map(|bi| (0..h).map(move |hi| (bi, hi)))
        .collect();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(tasks.len());
    let results: Vec<Vec<HeadResult>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let tasks = &tasks;
                s.spawn(move || {
                    tasks
                        .iter()
                        .skip(t)
                        .step_by(threads)
                        .map(|&(bi, hi)| {
                            let (o, lse) = head(p, q, k, v, bi, hi);
                            HeadResult { bi, hi, o, lse }
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("reference worker"))
            .collect()
    });
    for HeadResult { bi, hi, o, lse: l } in results.into_iter().flatten() {
        for i in 0..nq {
            let dst = ((bi * nq + i) * h + hi) * d;
            out[dst..dst + d].copy_from_slice(&o[i * d..(i + 1) * d]);
        }
        lse[(bi * h + hi) * nq..(bi * h + hi + 1) * nq].copy_from_slice(&l);
    }
    (out, lse)
}

/// O rows (Nq x D) and LSE of one (batch, head).
struct HeadResult {
    bi: usize,
    hi: usize,
    o: Vec<f32>,
    lse: Vec<f32>,
}

/// One (batch, head): O rows (Nq x D) and LSE (Nq).
fn head(
    p: &AttentionProblem,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bi: usize,
    hi: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (h, nq, nk, d) = (p.heads, p.seqlen_q, p.seqlen_k, p.head_dim);
    // Range of row i of a (B, n, H, D) buffer, for this (batch, head).
    let row = |n: usize, i: usize| {
        let start = ((bi * n + i) * h + hi) * d;
        start..start + d
    };
    let mut o = vec![0f32; nq * d];
    let mut lse = vec![f32::NEG_INFINITY; nq];
    let mut scores = vec![0f32; nk];
    for i in 0..nq {
        // Bottom-right aligned causal mask: keys j <= i + nk - nq.
        let visible = if p.causal {
            (i + nk + 1).saturating_sub(nq).min(nk)
        } else {
            nk
        };
        if visible == 0 {
            continue; // O stays 0, LSE -inf
        }
        let qi = &q[row(nq, i)];
        let mut max = f32::NEG_INFINITY;
        for (j, s) in scores[..visible].iter_mut().enumerate() {
            let kj = &k[row(nk, j)];
            *s = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * p.scale;
            max = max.max(*s);
        }
        let mut sum = 0f32;
        for s in &mut scores[..visible] {
            *s = (*s - max).exp();
            sum += *s;
        }
        let oi = &mut o[i * d..(i + 1) * d];
        for (j, &w) in scores[..visible].iter().enumerate() {
            let vj = &v[row(nk, j)];
            for (acc, x) in oi.iter_mut().zip(vj) {
                *acc += w * x;
            }
        }
        for acc in oi.iter_mut() {
            *acc /= sum;
        }
        lse[i] = max + sum.ln();
    }
    (o, lse)
}
