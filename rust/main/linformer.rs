//! Linformer attention, forward and backward: K and V projected along the sequence to k
//! rows (kp = E K, vp = F V), then dense attention over the k projected keys. One case
//! shares E and F across heads (lucidrains' "headwise" sharing, F given); the other has
//! one E per head, F = E (key-value sharing) and a key padding mask. E and F are scaled
//! by 1/sqrt(N) so the projected keys keep unit scale.
//!
//! The op exposes no entry on caller-allocated views, so the GPU timing loop calls the
//! forward and backward afresh (allocating their outputs each time).
//!
//! GPU check: query heads are independent (H_kv = H here), so the first and the last
//! head are checked in full (O, LSE, kp, vp and every gradient), the reference backward
//! taking the kernel's O, LSE, kp and vp. dO is zero on every other head, so those heads
//! add nothing to dE and dF (sums over heads when E is shared): the kernels' dE and dF
//! equal the reference's on the checked heads.

use flashkernels::linformer::{self, LinformerGradients, LinformerOptions, TokenMask};
use flashkernels::{DType, HostTensor, Result, Tensor};

use crate::bench::{ends, gather, put_all, random_where, run_case, worst, Backend, OpBench};
use crate::report::{Dir, Report, Work};

struct Case {
    batch: usize,
    seqlen: usize,
    heads: usize,
    head_dim: usize,
    /// Projected length k.
    k_proj: usize,
    /// One E (and F) per head, else one shared by every head.
    per_head: bool,
    /// F given (else F = E).
    own_f: bool,
    /// Pad the tail of every other sequence (sequence b keeps N - b·N/4 keys).
    padded: bool,
}

/// `full`: GPU-sized shapes; otherwise small ones the CPU reference runs in moments.
fn cases(full: bool) -> Vec<Case> {
    let case = |[batch, seqlen, heads, head_dim, k_proj]: [usize; 5], per_head| Case {
        batch,
        seqlen,
        heads,
        head_dim,
        k_proj,
        per_head,
        own_f: !per_head,
        padded: per_head,
    };
    if full {
        vec![
            case([1, 16384, 12, 64, 256], false),
            case([2, 8192, 12, 64, 256], true),
        ]
    } else {
        vec![
            case([1, 100, 2, 32, 16], false),
            case([2, 100, 2, 32, 16], true),
        ]
    }
}

impl Case {
    fn describe(&self) -> String {
        format!(
            "B{} N{} H{} D{} k{} {} {}{}",
            self.batch,
            self.seqlen,
            self.heads,
            self.head_dim,
            self.k_proj,
            if self.per_head { "per-head" } else { "shared" },
            if self.own_f { "E, F" } else { "E=F" },
            if self.padded { ", padded" } else { "" }
        )
    }

    /// The key padding mask: sequence b's last b·N/4 keys padded.
    fn mask(&self) -> Option<TokenMask> {
        self.padded.then(|| {
            let n = self.seqlen;
            let values = (0..self.batch * n)
                .map(|i| i % n >= n - (i / n) * n / 4)
                .collect();
            TokenMask::new(values, &[self.batch, n])
        })
    }
}

/// Runs every Linformer case.
pub fn run(dev: &Backend, full: bool, r: &mut Report) {
    for c in cases(full) {
        run_case(r, dev, "linformer", c.describe(), || {
            Linformer::new(dev, &c)
        });
    }
}

/// Indices into [`Linformer::host`].
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const E: usize = 3;
const F: usize = 4;
const DOUT: usize = 5;

struct Linformer {
    opts: LinformerOptions,
    mask: Option<TokenMask>,
    heads: usize,
    per_head: bool,
    own_f: bool,
    flops: f64,
    /// Q, K, V, E, F, dO on the host and where the backend reads them (F unused when
    /// F = E).
    host: [HostTensor; 6],
    put: [Tensor; 6],
}

/// A random bf16 tensor scaled by `scale` (zero where `keep` is false).
fn random_scaled(
    shape: &[usize],
    seed: u64,
    scale: f32,
    keep: impl Fn(usize) -> bool,
) -> Result<HostTensor> {
    let values = random_where(shape, seed, keep)?.to_f32_vec();
    HostTensor::from_fn(DType::BF16, shape, |i| values[i] * scale)
}

/// Every gradient in order: dQ, dK, dV, dE, then dF when F is given.
fn flatten<T>(g: LinformerGradients<T>) -> Vec<T> {
    [g.dq, g.dk, g.dv, g.de].into_iter().chain(g.df).collect()
}

impl Linformer {
    fn new(dev: &Backend, c: &Case) -> Result<Self> {
        let (b, n, h, d, k) = (c.batch, c.seqlen, c.heads, c.head_dim, c.k_proj);
        let checked = ends(h);
        let qkv = [b, n, h, d];
        let he = if c.per_head { h } else { 1 };
        let proj_scale = 1.0 / (n as f32).sqrt();
        let all = |_| true;
        let host = [
            random_scaled(&qkv, 1, 1.0, all)?,
            random_scaled(&qkv, 2, 1.0, all)?,
            random_scaled(&qkv, 3, 1.0, all)?,
            random_scaled(&[he, k, n], 4, proj_scale, all)?,
            random_scaled(&[he, k, n], 5, proj_scale, all)?,
            random_scaled(&qkv, 6, 1.0, |i| checked.contains(&(i / d % h)))?,
        ];
        let opts = LinformerOptions::new();
        let mask = c.mask();
        let [q, kk, v, e, f, _] = &host;
        let problem = linformer::validate(
            &linformer::LinformerLayouts {
                q: q.described(),
                k: kk.described(),
                v: v.described(),
                e: e.described(),
                f: c.own_f.then(|| f.described()),
            },
            mask.as_ref(),
            &opts,
        )?;
        Ok(Linformer {
            opts,
            mask,
            heads: h,
            per_head: c.per_head,
            own_f: c.own_f,
            flops: problem.flops(),
            put: put_all(dev, &host)?,
            host,
        })
    }

    /// The forward's inputs among `t` (ordered as [`Linformer::host`]).
    fn inputs<'a, T>(&'a self, t: &'a [T]) -> linformer::Inputs<'a, T> {
        linformer::Inputs::new(&t[Q], &t[K], &t[V], &t[E], self.own_f.then(|| &t[F]))
            .key_padding_mask(self.mask.as_ref())
    }

    /// The checked heads of a tensor whose head dimension is `dim`, as f32.
    fn heads_of(&self, t: &HostTensor, dim: usize) -> Result<HostTensor> {
        let heads = ends(self.heads);
        let mut shape = t.shape().to_vec();
        shape[dim] = heads.len();
        gather(t, &shape, |i| {
            let mut at = [0; 4];
            at[..i.len()].copy_from_slice(i);
            at[dim] = heads[i[dim]];
            at
        })
    }

    /// The checked heads of Q, K, V, dO (B, N, H, D), kp, vp (B, k, H_kv, D), or E, F
    /// (He, k, N; whole when shared).
    fn checked(&self, t: &HostTensor, which: usize) -> Result<HostTensor> {
        match which {
            E | F if !self.per_head => Ok(t.to_contiguous(DType::F32)),
            E | F => self.heads_of(t, 0),
            _ => self.heads_of(t, 2),
        }
    }

    /// The inputs restricted to the checked heads.
    fn checked_inputs(&self) -> Result<Vec<HostTensor>> {
        let mut out = Vec::with_capacity(self.host.len());
        for (i, t) in self.host.iter().enumerate() {
            out.push(self.checked(t, i)?);
        }
        Ok(out)
    }
}

impl OpBench for Linformer {
    type Fwd = linformer::LinformerOutput<Tensor>;
    /// dQ, dK, dV, dE, then dF when F is given.
    type Bwd = Vec<Tensor>;

    fn forward(&self) -> Result<Self::Fwd> {
        linformer::forward(&self.inputs(&self.put), &self.opts)
    }

    fn backward(&self, f: &Self::Fwd) -> Result<Self::Bwd> {
        let i = self
            .inputs(&self.put)
            .backward(&f.out, &f.lse, &f.kp, &f.vp, &self.put[DOUT]);
        Ok(flatten(linformer::backward(&i, &self.opts)?))
    }

    fn check_forward(&self, f: &Self::Fwd) -> Result<f64> {
        let x = self.checked_inputs()?;
        let want = linformer::forward(&self.inputs(&x), &self.opts)?;
        let got = [
            self.heads_of(&f.out.to_host()?, 2)?,
            self.heads_of(&f.lse.to_host()?, 1)?,
            self.heads_of(&f.kp.to_host()?, 2)?,
            self.heads_of(&f.vp.to_host()?, 2)?,
        ];
        Ok(crate::bench::worst_of(&[
            (&got[0], &want.out),
            (&got[1], &want.lse),
            (&got[2], &want.kp),
            (&got[3], &want.vp),
        ]))
    }

    fn check_backward(&self, f: &Self::Fwd, g: &Self::Bwd) -> Result<f64> {
        let x = self.checked_inputs()?;
        let out = self.heads_of(&f.out.to_host()?, 2)?;
        let lse = self.heads_of(&f.lse.to_host()?, 1)?;
        let kp = self.heads_of(&f.kp.to_host()?, 2)?;
        let vp = self.heads_of(&f.vp.to_host()?, 2)?;
        let i = self.inputs(&x).backward(&out, &lse, &kp, &vp, &x[DOUT]);
        let want = flatten(linformer::backward(&i, &self.opts)?);
        if want.len() != g.len() {
            return Ok(f64::NAN);
        }
        // dQ, dK, dV per head; dE (and dF) shaped like E (and F).
        let which = [Q, K, V, E, F];
        let mut errors = Vec::with_capacity(g.len());
        for ((got, want), &w) in g.iter().zip(&want).zip(&which) {
            errors.push(crate::bench::rel_l2(
                &self.checked(&got.to_host()?, w)?,
                want,
            ));
        }
        Ok(worst(errors))
    }

    fn work(&self, dir: Dir) -> Work {
        // The projections 2·2·B·H_kv·k·N·D, the attention 4·B·H·N·k·D; the backward 2.5x
        // (as dense attention).
        Work::Flops(match dir {
            Dir::Fwd => self.flops,
            Dir::Bwd => 2.5 * self.flops,
        })
    }
}
