//! Longformer attention, forward and backward: a sliding window plus a few global tokens,
//! with their own projections Q_g, K_g, V_g (as Hugging Face's layer) or sharing Q, K, V.
//! The GPU shapes (N 4096, 12 heads, 8 or 16 globals) make the global rows' passes
//! split over keys.
//!
//! GPU check: heads are independent, so the first and the last head of every sequence
//! are checked in full (O, LSE and every gradient), the reference backward taking the
//! kernel's O and LSE.

use flashkernels::longformer::{
    self, GlobalProjections, LongformerGradients, LongformerOptions, LongformerOutput, TokenMask,
};
use flashkernels::{DType, HostTensor, Layout, Result, Tensor};

use crate::bench::{ends, gather, put_all, random_inputs, run_case, worst, Backend, OpBench};
use crate::report::{Dir, Report, Work};

struct Case {
    batch: usize,
    seqlen: usize,
    heads: usize,
    head_dim: usize,
    /// One-sided window w.
    window: usize,
    /// Global token positions (the same in every sequence).
    globals: &'static [usize],
    /// Q_g, K_g, V_g given (else Q, K, V serve the global rows too).
    separate: bool,
}

/// Global tokens of the GPU cases: a few leading ones (a classifier token, a question)
/// and some scattered, the last position included.
const GLOBALS_8: &[usize] = &[0, 1, 2, 3, 512, 2049, 3000, 4095];
const GLOBALS_16: &[usize] = &[
    0, 1, 2, 3, 4, 5, 6, 7, 100, 1000, 2047, 2048, 2100, 3000, 4000, 4095,
];

/// `full`: GPU-sized shapes; otherwise small ones the CPU reference runs in moments.
fn cases(full: bool) -> Vec<Case> {
    let case = |[batch, seqlen, heads, head_dim, window]: [usize; 5], globals, separate| Case {
        batch,
        seqlen,
        heads,
        head_dim,
        window,
        globals,
        separate,
    };
    if full {
        vec![
            case([1, 4096, 12, 64, 256], GLOBALS_8, true),
            case([2, 4096, 12, 64, 256], GLOBALS_16, false),
        ]
    } else {
        vec![
            case([1, 512, 2, 64, 32], &[0, 100, 511], true),
            case([2, 300, 2, 32, 16], &[0, 150], false),
        ]
    }
}

impl Case {
    fn describe(&self) -> String {
        format!(
            "B{} N{} H{} D{} w{} {} globals, {} Q/K/V",
            self.batch,
            self.seqlen,
            self.heads,
            self.head_dim,
            self.window,
            self.globals.len(),
            if self.separate { "own" } else { "shared" }
        )
    }
}

/// Runs every Longformer case.
pub fn run(dev: &Backend, full: bool, r: &mut Report) {
    for c in cases(full) {
        run_case(r, dev, "longformer", c.describe(), || {
            Longformer::new(dev, &c)
        });
    }
}

struct Longformer {
    opts: LongformerOptions,
    global: TokenMask,
    separate: bool,
    heads: usize,
    head_dim: usize,
    /// Scored (query, key) pairs of the whole batch.
    pairs: f64,
    /// Q, K, V, dO, Q_g, K_g, V_g on the host and where the backend reads them (the
    /// last three unused when `separate` is false).
    host: [HostTensor; 7],
    put: [Tensor; 7],
}

/// Q_g, K_g, V_g of `t` (ordered as [`Longformer::host`]) when given.
fn globals_of<T>(separate: bool, t: &[T; 7]) -> Option<[&T; 3]> {
    separate.then(|| [&t[4], &t[5], &t[6]])
}

/// Every gradient in order: dQ, dK, dV, then dQ_g, dK_g, dV_g when given.
fn flatten<T>(g: LongformerGradients<T>, wrap: impl Fn(T) -> Tensor) -> Vec<Tensor> {
    [g.dq, g.dk, g.dv]
        .into_iter()
        .chain(g.global.into_iter().flatten())
        .map(wrap)
        .collect()
}

impl Longformer {
    fn new(dev: &Backend, c: &Case) -> Result<Self> {
        let shape = [c.batch, c.seqlen, c.heads, c.head_dim];
        let host = random_inputs([&shape; 7])?;
        let positions: Vec<(usize, usize)> = (0..c.batch)
            .flat_map(|b| c.globals.iter().map(move |&i| (b, i)))
            .collect();
        let global = TokenMask::from_positions(c.batch, c.seqlen, &positions)?;
        let opts = LongformerOptions::new(c.window);
        // Every head has the same dilation, hence the same pairs: count one head's.
        let one_head = Layout::contiguous(&[c.batch, c.seqlen, 1, c.head_dim]);
        let x = (DType::BF16, &one_head);
        let p = longformer::validate(x, x, x, None, Some(&global), None, &opts)?;
        Ok(Longformer {
            pairs: (p.pairs() * c.heads) as f64,
            opts,
            global,
            separate: c.separate,
            heads: c.heads,
            head_dim: c.head_dim,
            put: put_all(dev, &host)?,
            host,
        })
    }

    /// The checked heads of a (B, N, H, D) tensor, as f32 (B, N, heads, D).
    fn heads_of(&self, t: &HostTensor) -> Result<HostTensor> {
        let heads = ends(self.heads);
        let s = t.shape();
        gather(t, &[s[0], s[1], heads.len(), s[3]], |i| {
            [i[0], i[1], heads[i[2]], i[3]]
        })
    }

    /// The checked heads of a (B, H, N) LSE.
    fn lse_heads_of(&self, lse: &HostTensor) -> Result<HostTensor> {
        let heads = ends(self.heads);
        let s = lse.shape();
        gather(lse, &[s[0], heads.len(), s[2]], |i| {
            [i[0], heads[i[1]], i[2], 0]
        })
    }

    /// The inputs restricted to the checked heads.
    fn checked_inputs(&self) -> Result<[HostTensor; 7]> {
        let mut out = Vec::with_capacity(7);
        for t in &self.host {
            out.push(self.heads_of(t)?);
        }
        Ok(out.try_into().expect("seven inputs"))
    }

    fn projections<'a>(&self, x: &'a [HostTensor; 7]) -> Option<GlobalProjections<'a>> {
        globals_of(self.separate, x).map(|[q, k, v]| GlobalProjections { q, k, v })
    }
}

impl OpBench for Longformer {
    type Fwd = LongformerOutput<Tensor>;
    /// dQ, dK, dV, then dQ_g, dK_g, dV_g when the projections are separate.
    type Bwd = Vec<Tensor>;

    fn forward(&self) -> Result<Self::Fwd> {
        match &self.put[0] {
            #[cfg(any(feature = "cuda", feature = "emulator"))]
            Tensor::Cuda(_) => {
                let [q, k, v, _, qg, kg, vg] = crate::bench::on_device(self.put.each_ref())?;
                let g = self.separate.then_some([qg, kg, vg]);
                let o =
                    longformer::cuda::forward([q, k, v], g, Some(&self.global), None, &self.opts)?;
                Ok(LongformerOutput {
                    out: Tensor::Cuda(o.out),
                    lse: Tensor::Cuda(o.lse),
                })
            }
            Tensor::Host(_) => {
                let [q, k, v, ..] = &self.host;
                let g = self.projections(&self.host);
                let o = longformer::forward(
                    &longformer::Inputs::new(q, k, v)
                        .globals(g)
                        .masks(Some(&self.global), None),
                    &self.opts,
                )?;
                Ok(LongformerOutput {
                    out: Tensor::Host(o.out),
                    lse: Tensor::Host(o.lse),
                })
            }
        }
    }

    fn backward(&self, f: &Self::Fwd) -> Result<Self::Bwd> {
        let gm = Some(&self.global);
        match &self.put[0] {
            #[cfg(any(feature = "cuda", feature = "emulator"))]
            Tensor::Cuda(_) => {
                let [q, k, v, dout, qg, kg, vg] = crate::bench::on_device(self.put.each_ref())?;
                let [out, lse] = crate::bench::on_device([&f.out, &f.lse])?;
                let g = self.separate.then_some([qg, kg, vg]);
                let grads =
                    longformer::cuda::backward([q, k, v], g, out, lse, dout, gm, None, &self.opts)?;
                Ok(flatten(grads, Tensor::Cuda))
            }
            Tensor::Host(_) => {
                let [q, k, v, dout, ..] = &self.host;
                let (out, lse) = (f.out.to_host()?, f.lse.to_host()?);
                let g = self.projections(&self.host);
                let grads = longformer::backward(
                    &longformer::Inputs::new(q, k, v)
                        .globals(g)
                        .masks(gm, None)
                        .backward(&out, &lse, dout),
                    &self.opts,
                )?;
                Ok(flatten(grads, Tensor::Host))
            }
        }
    }

    #[cfg(any(feature = "cuda", feature = "emulator"))]
    fn forward_again(&self, f: &Self::Fwd) -> Result<()> {
        let t = crate::bench::on_device(self.put.each_ref())?;
        let x = t.map(flashkernels::DeviceTensor::view);
        let [out, lse] = crate::bench::on_device([&f.out, &f.lse])?.map(|t| t.view());
        // SAFETY: views of live device tensors on one stream; out and lse were allocated
        // by the forward for this problem and overlap no input.
        unsafe {
            longformer::cuda::forward_views(
                [&x[0], &x[1], &x[2]],
                globals_of(self.separate, &x),
                &out,
                &lse,
                Some(&self.global),
                None,
                &self.opts,
                t[0].stream().raw(),
            )
        }
    }

    #[cfg(any(feature = "cuda", feature = "emulator"))]
    fn backward_again(&self, f: &Self::Fwd, g: &Self::Bwd) -> Result<()> {
        use crate::bench::on_device;
        let t = on_device(self.put.each_ref())?;
        let x = t.map(flashkernels::DeviceTensor::view);
        let [out, lse] = on_device([&f.out, &f.lse])?.map(|t| t.view());
        let mut grads = Vec::with_capacity(g.len());
        for t in g {
            grads.push(on_device([t])?[0].view());
        }
        let views = longformer::cuda::BackwardViews {
            inputs: [&x[0], &x[1], &x[2]],
            globals: globals_of(self.separate, &x),
            out: &out,
            lse: &lse,
            dout: &x[3],
            grads: [&grads[0], &grads[1], &grads[2]],
            global_grads: grads.get(3..6).map(|g| [&g[0], &g[1], &g[2]]),
        };
        // SAFETY: as in `forward_again`; the gradients were allocated by the backward.
        unsafe {
            longformer::cuda::backward_views(
                &views,
                Some(&self.global),
                None,
                &self.opts,
                t[0].stream().raw(),
            )
        }
    }

    fn check_forward(&self, f: &Self::Fwd) -> Result<f64> {
        let x = self.checked_inputs()?;
        let g = self.projections(&x);
        let want = longformer::forward(
            &longformer::Inputs::new(&x[0], &x[1], &x[2])
                .globals(g)
                .masks(Some(&self.global), None),
            &self.opts,
        )?;
        let out = self.heads_of(&f.out.to_host()?)?;
        let lse = self.lse_heads_of(&f.lse.to_host()?)?;
        Ok(crate::bench::worst_of(&[
            (&out, &want.out),
            (&lse, &want.lse),
        ]))
    }

    fn check_backward(&self, f: &Self::Fwd, g: &Self::Bwd) -> Result<f64> {
        let x = self.checked_inputs()?;
        let out = self.heads_of(&f.out.to_host()?)?;
        let lse = self.lse_heads_of(&f.lse.to_host()?)?;
        let want = longformer::backward(
            &longformer::Inputs::new(&x[0], &x[1], &x[2])
                .globals(self.projections(&x))
                .masks(Some(&self.global), None)
                .backward(&out, &lse, &x[3]),
            &self.opts,
        )?;
        let want = flatten(want, Tensor::Host);
        let mut errors = Vec::with_capacity(g.len());
        for (got, want) in g.iter().zip(&want) {
            errors.push(crate::bench::rel_l2(
                &self.heads_of(&got.to_host()?)?,
                &want.to_host()?,
            ));
        }
        Ok(worst(errors))
    }

    fn work(&self, dir: Dir) -> Work {
        // Two matmuls of 2 * D FLOPs per scored pair; the backward 2.5x (as dense).
        let fwd = 4.0 * self.head_dim as f64 * self.pairs;
        Work::Flops(match dir {
            Dir::Fwd => fwd,
            Dir::Bwd => 2.5 * fwd,
        })
    }
}
