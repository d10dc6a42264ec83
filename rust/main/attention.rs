//! Dense attention, forward and backward: plain, causal, GQA, a sliding window and a
//! variable-length batch.
//!
//! GPU check, on the last sequence of the batch and the first and last KV head (with
//! their groups of query heads): O and LSE of its last 64 query rows (a suffix keeps the
//! bottom-right mask alignment); dQ of those rows; dK and dV of its last 64 key rows
//! (over every query). The reference backward takes the kernel's O and LSE, so a slice's
//! gradients are exact, not approximations.

use std::ops::Range;

use flashkernels::attention::{
    self, AttentionGradients, AttentionOptions, AttentionOutput, AttentionProblem, SeqLens,
};
use flashkernels::{HostTensor, Result, Tensor};

use crate::bench::{ends, gather, put_all, random_inputs, run_case, worst_of, Backend, OpBench};
use crate::report::{Dir, Report, Work};

/// Query (and key) rows of the checked slices.
const CHECK_ROWS: usize = 64;

#[derive(Clone)]
struct Case {
    batch: usize,
    seqlen: usize,
    heads: usize,
    heads_kv: usize,
    head_dim: usize,
    causal: bool,
    /// Sliding window (left, right).
    window: Option<(usize, usize)>,
    /// A variable-length batch: each sequence's length (q = k; `batch`, `seqlen` unused).
    varlen: Option<&'static [usize]>,
}

fn dense(batch: usize, seqlen: usize, heads: usize, head_dim: usize, causal: bool) -> Case {
    Case {
        batch,
        seqlen,
        heads,
        heads_kv: heads,
        head_dim,
        causal,
        window: None,
        varlen: None,
    }
}

/// `full`: GPU-sized shapes; otherwise small ones the CPU reference runs in moments.
fn cases(full: bool) -> Vec<Case> {
    if full {
        vec![
            dense(1, 1000, 4, 64, false),
            dense(2, 1537, 8, 128, true),
            dense(8, 2048, 16, 128, false),
            dense(2, 8192, 16, 128, false),
            dense(2, 8192, 16, 128, true),
            dense(2, 8192, 32, 64, false),
            Case {
                heads_kv: 8,
                ..dense(2, 8192, 32, 128, true)
            },
            Case {
                window: Some((1024, 0)),
                ..dense(2, 8192, 16, 128, false)
            },
            Case {
                varlen: Some(&[3000, 517, 2048, 1, 4096, 1531]),
                ..dense(0, 0, 16, 128, true)
            },
        ]
    } else {
        vec![
            dense(1, 128, 2, 64, false),
            dense(2, 200, 4, 64, true),
            dense(1, 256, 2, 128, false),
            Case {
                heads_kv: 3,
                ..dense(1, 192, 6, 64, true)
            },
            Case {
                window: Some((32, 16)),
                ..dense(1, 256, 2, 64, false)
            },
            Case {
                varlen: Some(&[100, 37, 150]),
                ..dense(0, 0, 2, 64, true)
            },
        ]
    }
}

impl Case {
    fn describe(&self) -> String {
        let rows = match self.varlen {
            Some(lens) => format!(
                "varlen {} seqs {} rows",
                lens.len(),
                lens.iter().sum::<usize>()
            ),
            None => format!("B{} N{}", self.batch, self.seqlen),
        };
        let heads = match self.heads_kv {
            kv if kv == self.heads => format!("H{}", self.heads),
            kv => format!("H{}/{kv}kv", self.heads),
        };
        let mask = match (self.window, self.causal) {
            (Some((l, r)), _) => format!(" window ({l}, {r})"),
            (None, true) => " causal".into(),
            (None, false) => String::new(),
        };
        format!("{rows} {heads} D{}{mask}", self.head_dim)
    }

    fn opts(&self) -> AttentionOptions {
        AttentionOptions {
            scale: None,
            causal: self.causal,
            window_left: self.window.map(|w| w.0),
            window_right: self.window.map(|w| w.1),
        }
    }

    fn seqlens(&self) -> Option<SeqLens> {
        let cu: Vec<i32> = std::iter::once(0)
            .chain(self.varlen?.iter().scan(0, |end, &n| {
                *end += n as i32;
                Some(*end)
            }))
            .collect();
        Some(SeqLens {
            cu_seqlens_q: cu.clone(),
            cu_seqlens_k: cu,
        })
    }

    /// Shapes of Q (and dO) and of K (and V).
    fn shapes(&self) -> [Vec<usize>; 2] {
        let (h, kv, d) = (self.heads, self.heads_kv, self.head_dim);
        match self.varlen {
            Some(lens) => {
                let total = lens.iter().sum();
                [vec![total, h, d], vec![total, kv, d]]
            }
            None => [
                vec![self.batch, self.seqlen, h, d],
                vec![self.batch, self.seqlen, kv, d],
            ],
        }
    }
}

/// Runs every attention case.
pub fn run(dev: &Backend, full: bool, r: &mut Report) {
    for c in cases(full) {
        run_case(r, dev, "attention", c.describe(), || {
            Attention::new(dev, &c)
        });
    }
}

struct Attention {
    opts: AttentionOptions,
    seqlens: Option<SeqLens>,
    problem: AttentionProblem,
    /// Q, K, V, dO on the host (the reference's inputs) and where the backend reads them.
    host: [HostTensor; 4],
    put: [Tensor; 4],
}

impl Attention {
    fn new(dev: &Backend, c: &Case) -> Result<Self> {
        let [q_shape, kv_shape] = c.shapes();
        let host = random_inputs([&q_shape, &kv_shape, &kv_shape, &q_shape])?;
        let (opts, seqlens) = (c.opts(), c.seqlens());
        let [q, k, v, _] = host.each_ref().map(|t| (t.dtype(), t.layout()));
        let problem = match &seqlens {
            Some(s) => attention::validate_varlen(q, k, v, s, &opts)?,
            None => attention::validate(q, k, v, &opts)?,
        };
        Ok(Attention {
            opts,
            seqlens,
            problem,
            put: put_all(dev, &host)?,
            host,
        })
    }

    /// The packed query and key rows of the checked (last) sequence.
    fn checked_sequence(&self) -> (Range<usize>, Range<usize>) {
        let b = self.problem.batch - 1;
        (self.problem.q_rows(b), self.problem.k_rows(b))
    }

    /// The checked query heads and KV heads: the first and the last KV head, each with
    /// its group of query heads.
    fn checked_heads(&self) -> [Vec<usize>; 2] {
        let kv = ends(self.problem.heads_kv);
        let g = self.problem.group_size();
        let q = kv.iter().flat_map(|&h| h * g..(h + 1) * g).collect();
        [q, kv]
    }

    /// The reference backward on query rows `qs` and key rows `ks` of one sequence, from
    /// the kernel's `out` and `lse`.
    fn reference_backward(
        &self,
        qs: &Range<usize>,
        ks: &Range<usize>,
        out: &HostTensor,
        lse: &HostTensor,
    ) -> Result<AttentionGradients<HostTensor>> {
        let [q, k, v, dout] = &self.host;
        let [hq, hk] = &self.checked_heads();
        attention::backward(
            &attention::BackwardInputs::new([
                &rows(q, qs, hq)?,
                &rows(k, ks, hk)?,
                &rows(v, ks, hk)?,
                &rows(out, qs, hq)?,
                &lse_rows(lse, qs, hq)?,
                &rows(dout, qs, hq)?,
            ]),
            &self.opts,
        )
    }
}

/// The last `CHECK_ROWS` of `r`.
fn suffix(r: &Range<usize>) -> Range<usize> {
    r.end - r.len().min(CHECK_ROWS)..r.end
}

/// Packed rows `r` and heads `heads` of a (B, N, H, D) or (total, H, D) tensor, as an
/// f32 (1, rows, heads, D) tensor (one dense sequence, which the reference takes).
fn rows(t: &HostTensor, r: &Range<usize>, heads: &[usize]) -> Result<HostTensor> {
    let s = t.shape();
    let d = s[s.len() - 1];
    gather(t, &[1, r.len(), heads.len(), d], |i| {
        let (row, h) = (r.start + i[1], heads[i[2]]);
        match *s {
            [_, n, _, _] => [row / n, row % n, h, i[3]],
            _ => [row, h, i[3], 0],
        }
    })
}

/// The LSE of packed query rows `r` and heads `heads` from a (B, H, N) or (H, total)
/// LSE, as (1, heads, rows).
fn lse_rows(lse: &HostTensor, r: &Range<usize>, heads: &[usize]) -> Result<HostTensor> {
    let s = lse.shape();
    gather(lse, &[1, heads.len(), r.len()], |i| {
        let (row, h) = (r.start + i[2], heads[i[1]]);
        match *s {
            [_, _, n] => [row / n, h, row % n, 0],
            _ => [h, row, 0, 0],
        }
    })
}

impl OpBench for Attention {
    type Fwd = AttentionOutput<Tensor>;
    type Bwd = AttentionGradients<Tensor>;

    fn forward(&self) -> Result<Self::Fwd> {
        let [q, k, v, _] = &self.put;
        match &self.seqlens {
            Some(s) => attention::forward(&attention::Inputs::new(q, k, v).varlen(s), &self.opts),
            None => attention::forward(&attention::Inputs::new(q, k, v), &self.opts),
        }
    }

    fn backward(&self, f: &Self::Fwd) -> Result<Self::Bwd> {
        let [q, k, v, dout] = &self.put;
        let (o, l) = (&f.out, &f.lse);
        match &self.seqlens {
            Some(s) => attention::backward(
                &attention::BackwardInputs::new([q, k, v, o, l, dout]).varlen(s),
                &self.opts,
            ),
            None => attention::backward(
                &attention::BackwardInputs::new([q, k, v, o, l, dout]),
                &self.opts,
            ),
        }
    }

    #[cfg(any(feature = "cuda", feature = "emulator"))]
    fn forward_again(&self, f: &Self::Fwd) -> Result<()> {
        let [q, k, v, _] = &self.put;
        let t = crate::bench::on_device([q, k, v, &f.out, &f.lse])?;
        let [q, k, v, out, lse] = t.map(flashkernels::DeviceTensor::view);
        // SAFETY: views of live device tensors on one stream; out and lse were allocated
        // by the forward for this problem and overlap no input.
        unsafe {
            attention::cuda::forward_views_varlen(
                &q,
                &k,
                &v,
                &out,
                &lse,
                self.seqlens.as_ref(),
                &self.opts,
                t[0].stream().raw(),
            )
        }
    }

    #[cfg(any(feature = "cuda", feature = "emulator"))]
    fn backward_again(&self, f: &Self::Fwd, g: &Self::Bwd) -> Result<()> {
        let [q, k, v, dout] = &self.put;
        let t = crate::bench::on_device([q, k, v, &f.out, &f.lse, dout, &g.dq, &g.dk, &g.dv])?;
        let views = t.map(flashkernels::DeviceTensor::view);
        // SAFETY: as in `forward_again`; dq, dk, dv were allocated by the backward.
        unsafe {
            attention::cuda::backward_views(
                views.each_ref(),
                self.seqlens.as_ref(),
                &self.opts,
                t[0].stream().raw(),
            )
        }
    }

    fn check_forward(&self, f: &Self::Fwd) -> Result<f64> {
        let (qr, kr) = self.checked_sequence();
        let qs = suffix(&qr);
        let [q, k, v, _] = &self.host;
        let [hq, hk] = &self.checked_heads();
        let want = attention::forward(
            &attention::Inputs::new(&rows(q, &qs, hq)?, &rows(k, &kr, hk)?, &rows(v, &kr, hk)?),
            &self.opts,
        )?;
        let (out, lse) = (f.out.to_host()?, f.lse.to_host()?);
        Ok(worst_of(&[
            (&rows(&out, &qs, hq)?, &want.out),
            (&lse_rows(&lse, &qs, hq)?, &want.lse),
        ]))
    }

    fn check_backward(&self, f: &Self::Fwd, g: &Self::Bwd) -> Result<f64> {
        let (qr, kr) = self.checked_sequence();
        let (qs, ks) = (suffix(&qr), suffix(&kr));
        let (out, lse) = (f.out.to_host()?, f.lse.to_host()?);
        // The two reference runs use a thread per checked head each: run them side by side.
        let (by_query, by_key) = std::thread::scope(|s| {
            let by_query = s.spawn(|| self.reference_backward(&qs, &kr, &out, &lse));
            let by_key = self.reference_backward(&qr, &ks, &out, &lse);
            (by_query.join().expect("reference thread"), by_key)
        });
        let (by_query, by_key) = (by_query?, by_key?);
        let (dq, dk, dv) = (g.dq.to_host()?, g.dk.to_host()?, g.dv.to_host()?);
        let [hq, hk] = &self.checked_heads();
        Ok(worst_of(&[
            (&rows(&dq, &qs, hq)?, &by_query.dq),
            (&rows(&dk, &ks, hk)?, &by_key.dk),
            (&rows(&dv, &ks, hk)?, &by_key.dv),
        ]))
    }

    fn work(&self, dir: Dir) -> Work {
        let fwd = self.problem.flops();
        // The backward does 2.5x the forward's matmul work (FlashAttention's count).
        Work::Flops(match dir {
            Dir::Fwd => fwd,
            Dir::Bwd => 2.5 * fwd,
        })
    }
}
