//! Reformer LSH attention, forward and backward: shared-QK hashing into n_buckets per
//! round, one stable sort of all rounds, chunks attending to their look-back window,
//! rounds combined by logsumexp. One case is the goal shape (N 16384, 4 rounds,
//! chunk 64, 8 heads, D 64); the other is causal with a key padding mask.
//!
//! The GPU timing loop calls the forward and backward afresh (allocating their outputs
//! each time); the backward holds the forward's buckets fixed, as training does.
//!
//! GPU check: heads are independent, so the first and the last head are checked in full
//! against the CPU reference given the device's buckets on those heads (O, LSE, dqk, dv;
//! the reference backward takes the kernel's O and LSE), and the device's buckets against
//! the reference's own hashing (the fraction that differ: f32 on the device and f64 on
//! the host may split a near tie differently).

use flashkernels::reformer::{self, Buckets, ReformerGradients, ReformerOptions, TokenMask};
use flashkernels::{DType, HostTensor, Result, Tensor};

use crate::bench::{ends, gather, put_all, random_where, run_case, select_dim0, worst, Backend};
use crate::bench::{rel_l2, OpBench};
use crate::report::{Dir, Report, Work};

struct Case {
    batch: usize,
    seqlen: usize,
    heads: usize,
    head_dim: usize,
    n_hashes: usize,
    n_buckets: usize,
    chunk: usize,
    /// Causal, and the tail of every other sequence padded.
    causal_padded: bool,
}

/// `full`: GPU-sized shapes; otherwise small ones the CPU reference runs in moments.
fn cases(full: bool) -> Vec<Case> {
    let case = |[batch, seqlen, heads, head_dim]: [usize; 4],
                [n_hashes, n_buckets, chunk]: [usize; 3],
                causal_padded| Case {
        batch,
        seqlen,
        heads,
        head_dim,
        n_hashes,
        n_buckets,
        chunk,
        causal_padded,
    };
    if full {
        vec![
            case([1, 16384, 8, 64], [4, 512, 64], false),
            case([2, 4096, 8, 64], [2, 128, 64], true),
        ]
    } else {
        vec![
            case([1, 256, 2, 32], [2, 16, 32], false),
            case([2, 128, 2, 32], [1, 8, 16], true),
        ]
    }
}

impl Case {
    fn describe(&self) -> String {
        format!(
            "B{} N{} H{} D{} hashes {} buckets {} C{}{}",
            self.batch,
            self.seqlen,
            self.heads,
            self.head_dim,
            self.n_hashes,
            self.n_buckets,
            self.chunk,
            if self.causal_padded {
                ", causal, padded"
            } else {
                ""
            }
        )
    }

    /// The key padding mask: sequence b's last b·N/4 tokens padded.
    fn mask(&self) -> Option<TokenMask> {
        self.causal_padded.then(|| {
            let n = self.seqlen;
            let values = (0..self.batch * n)
                .map(|i| i % n >= n - (i / n) * n / 4)
                .collect();
            TokenMask::new(values, &[self.batch, n])
        })
    }
}

/// Runs every Reformer case.
pub fn run(dev: &Backend, full: bool, r: &mut Report) {
    for c in cases(full) {
        run_case(r, dev, "reformer", c.describe(), || Reformer::new(dev, &c));
    }
}

/// Indices into [`Reformer::host`].
const QK: usize = 0;
const V: usize = 1;
const ROT: usize = 2;
const DOUT: usize = 3;

struct Reformer {
    opts: ReformerOptions,
    mask: Option<TokenMask>,
    heads: usize,
    flops: f64,
    /// qk, v, the rotations (f32), dO on the host and where the backend reads them.
    host: [HostTensor; 4],
    put: [Tensor; 4],
}

impl Reformer {
    fn new(dev: &Backend, c: &Case) -> Result<Self> {
        let (b, n, h, d) = (c.batch, c.seqlen, c.heads, c.head_dim);
        let qkv = [b, n, h, d];
        let rot_shape = [h, d, c.n_hashes, c.n_buckets / 2];
        let rot = random_where(&rot_shape, 3, |_| true)?.to_contiguous(DType::F32);
        let host = [
            random_where(&qkv, 1, |_| true)?,
            random_where(&qkv, 2, |_| true)?,
            rot,
            random_where(&qkv, 4, |_| true)?,
        ];
        let opts = ReformerOptions::new(c.chunk)
            .chunks(1, 0)
            .causal(c.causal_padded);
        // Hashing 2·B·H·R·N·D·nb/2, the attention 4·B·H·R·N·(window C)·D.
        let (bhrn, window) = ((b * h * c.n_hashes * n) as f64, (2 * c.chunk) as f64);
        let flops = bhrn * d as f64 * (c.n_buckets as f64 + 4.0 * window);
        Ok(Reformer {
            mask: c.mask(),
            opts,
            heads: h,
            flops,
            put: put_all(dev, &host)?,
            host,
        })
    }

    /// The forward's inputs among `t` (ordered as [`Reformer::host`]).
    fn inputs<'a, T>(
        &'a self,
        t: &'a [T],
        buckets: Option<&'a Buckets>,
    ) -> reformer::Inputs<'a, T> {
        reformer::Inputs::new(&t[QK], &t[V], &t[ROT])
            .key_padding_mask(self.mask.as_ref())
            .buckets(buckets)
    }

    /// The checked heads of a (B, N, H, D) tensor (dim 2) or of the rotations or LSE
    /// (dim 0 or 1), as f32.
    fn heads_of(&self, t: &HostTensor, dim: usize) -> Result<HostTensor> {
        let heads = ends(self.heads);
        if dim == 0 {
            return select_dim0(t, &heads);
        }
        let mut shape = t.shape().to_vec();
        shape[dim] = heads.len();
        gather(t, &shape, |i| {
            let mut at = [0; 4];
            at[..i.len()].copy_from_slice(i);
            at[dim] = heads[i[dim]];
            at
        })
    }

    /// qk, v, the rotations and dO restricted to the checked heads.
    fn checked_inputs(&self) -> Result<Vec<HostTensor>> {
        let dims = [2, 2, 0, 2];
        self.host
            .iter()
            .zip(dims)
            .map(|(t, d)| self.heads_of(t, d))
            .collect()
    }

    /// Buckets (B, H, R, N) restricted to the checked heads.
    fn heads_of_buckets(&self, b: &Buckets) -> Buckets {
        let [bs, h, r, n] = b.shape;
        let heads = ends(h);
        let mut values = Vec::with_capacity(bs * heads.len() * r * n);
        for bi in 0..bs {
            for &hi in &heads {
                let at = (bi * h + hi) * r * n;
                values.extend_from_slice(&b.values[at..at + r * n]);
            }
        }
        Buckets::new(values, [bs, heads.len(), r, n])
    }

    /// The device's buckets on the checked heads, or None (N <= C).
    fn checked_buckets(&self, f: &reformer::ReformerOutput<Tensor>) -> Option<Buckets> {
        f.buckets.as_ref().map(|b| self.heads_of_buckets(b))
    }
}

impl OpBench for Reformer {
    type Fwd = reformer::ReformerOutput<Tensor>;
    type Bwd = ReformerGradients<Tensor>;

    fn forward(&self) -> Result<Self::Fwd> {
        reformer::forward(&self.inputs(&self.put, None), &self.opts)
    }

    fn backward(&self, f: &Self::Fwd) -> Result<Self::Bwd> {
        let i =
            self.inputs(&self.put, f.buckets.as_ref())
                .backward(&f.out, &f.lse, &self.put[DOUT]);
        reformer::backward(&i, &self.opts)
    }

    fn check_forward(&self, f: &Self::Fwd) -> Result<f64> {
        let x = self.checked_inputs()?;
        let given = self.checked_buckets(f);
        let want = reformer::forward(&self.inputs(&x, given.as_ref()), &self.opts)?;
        let out = self.heads_of(&f.out.to_host()?, 2)?;
        let lse = self.heads_of(&f.lse.to_host()?, 1)?;
        // The device's hashing against the reference's: the fraction of buckets that
        // differ (near ties only), as an error that fails the check above 1e-3.
        let hashed = reformer::forward(&self.inputs(&x, None), &self.opts)?;
        let differ = match (&given, &hashed.buckets) {
            (Some(g), Some(h)) => {
                let n = g
                    .values
                    .iter()
                    .zip(&h.values)
                    .filter(|(a, b)| a != b)
                    .count();
                n as f64 / g.values.len().max(1) as f64
            }
            (None, None) => 0.0,
            _ => f64::NAN,
        };
        Ok(worst([
            rel_l2(&out, &want.out),
            rel_l2(&lse, &want.lse),
            differ * 10.0,
        ]))
    }

    fn check_backward(&self, f: &Self::Fwd, g: &Self::Bwd) -> Result<f64> {
        let x = self.checked_inputs()?;
        let given = self.checked_buckets(f);
        let out = self.heads_of(&f.out.to_host()?, 2)?;
        let lse = self.heads_of(&f.lse.to_host()?, 1)?;
        let i = self
            .inputs(&x, given.as_ref())
            .backward(&out, &lse, &x[DOUT]);
        let want = reformer::backward(&i, &self.opts)?;
        Ok(worst([
            rel_l2(&self.heads_of(&g.dqk.to_host()?, 2)?, &want.dqk),
            rel_l2(&self.heads_of(&g.dv.to_host()?, 2)?, &want.dv),
        ]))
    }

    fn work(&self, dir: Dir) -> Work {
        // The backward 2.5x the forward (as dense attention; it does not hash).
        Work::Flops(match dir {
            Dir::Fwd => self.flops,
            Dir::Bwd => 2.5 * self.flops,
        })
    }
}
