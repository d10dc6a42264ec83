//! The fused feed-forward block, forward and backward: GELU with biases (a BERT / GPT-2
//! block) and SwiGLU without biases (a LLaMA block). Weights are scaled by
//! 1/sqrt(fan_in), as nn.Linear initializes them, so activations keep unit scale.
//!
//! The op exposes no entry on caller-allocated views, so the GPU timing loop calls the
//! forward and backward afresh (allocating their outputs each time).
//!
//! GPU check: the first, a middle and the last token (tokens never mix in the forward).
//! The upstream gradient is zero on every other token, so the kernels' weight and bias
//! gradients (sums over the tokens) equal the reference's on those tokens, exactly.

use flashkernels::ffn::{self, FfnActivation, FfnGradients, FfnOptions, FfnProblem};
use flashkernels::{DType, HostTensor, Result, Tensor};

use crate::bench::{gather, put_all, random_where, run_case, worst_of, Backend, OpBench};
use crate::report::{Dir, Report, Work};

struct Case {
    tokens: usize,
    d_model: usize,
    d_hidden: usize,
    activation: FfnActivation,
    /// SwiGLU / GeGLU: W3 given.
    gated: bool,
    biases: bool,
}

/// `full`: a GPT-2-medium-wide GELU block and a LLaMA-style SwiGLU block (d_hidden about
/// 8/3 d_model) over 8192 tokens; otherwise small shapes.
fn cases(full: bool) -> Vec<Case> {
    let (tokens, d_model, gelu_hidden, swiglu_hidden) = if full {
        (8192, 1024, 4096, 2816)
    } else {
        (67, 64, 256, 192)
    };
    vec![
        Case {
            tokens,
            d_model,
            d_hidden: gelu_hidden,
            activation: FfnActivation::GeluErf,
            gated: false,
            biases: true,
        },
        Case {
            tokens,
            d_model,
            d_hidden: swiglu_hidden,
            activation: FfnActivation::Silu,
            gated: true,
            biases: false,
        },
    ]
}

impl Case {
    fn describe(&self) -> String {
        let kind = match (self.gated, self.activation) {
            (true, FfnActivation::Silu) => "SwiGLU".to_string(),
            (true, a) => format!("{}-gated", a.name()),
            (false, a) => a.name().to_string(),
        };
        format!(
            "T{} d{} h{} {kind}, {}",
            self.tokens,
            self.d_model,
            self.d_hidden,
            if self.biases { "biases" } else { "no biases" }
        )
    }
}

/// Runs every feed-forward case.
pub fn run(dev: &Backend, full: bool, r: &mut Report) {
    for c in cases(full) {
        run_case(r, dev, "ffn", c.describe(), || Ffn::new(dev, &c));
    }
}

/// Indices into [`Ffn::host`].
const X: usize = 0;
const W1: usize = 1;
const W2: usize = 2;
const W3: usize = 3;
const B1: usize = 4;
const B2: usize = 5;
const B3: usize = 6;
const DY: usize = 7;

struct Ffn {
    opts: FfnOptions,
    problem: FfnProblem,
    /// The checked tokens.
    rows: Vec<usize>,
    /// x, W1, W2, W3, b1, b2, b3, dy on the host and where the backend reads them (W3
    /// unused unless gated, the biases unless given).
    host: [HostTensor; 8],
    put: [Tensor; 8],
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

/// The forward's inputs among `t` (ordered as [`Ffn::host`]), gate and biases as given.
fn inputs<'a, T>(gated: bool, biases: bool, t: &'a [T]) -> ffn::Inputs<'a, T> {
    let bias = |i: usize| biases.then(|| &t[i]);
    ffn::Inputs::new(&t[X], &t[W1], &t[W2])
        .gate(gated.then(|| &t[W3]))
        .biases(bias(B1), bias(B2), if gated { bias(B3) } else { None })
}

/// Every gradient in order: dx, dW1, dW2, then dW3, db1, db2, db3 where given.
fn flatten<T>(g: FfnGradients<T>) -> Vec<T> {
    [g.dx, g.dw1, g.dw2]
        .into_iter()
        .chain([g.dw3, g.db1, g.db2, g.db3].into_iter().flatten())
        .collect()
}

impl Ffn {
    fn new(dev: &Backend, c: &Case) -> Result<Self> {
        let (t, d, h) = (c.tokens, c.d_model, c.d_hidden);
        let rows = if t > 2 {
            vec![0, t / 2, t - 1]
        } else {
            (0..t).collect()
        };
        let all = |_| true;
        let (s1, s2) = (1.0 / (d as f32).sqrt(), 1.0 / (h as f32).sqrt());
        let host = [
            random_scaled(&[t, d], 1, 1.0, all)?,
            random_scaled(&[h, d], 2, s1, all)?,
            random_scaled(&[d, h], 3, s2, all)?,
            random_scaled(&[h, d], 4, s1, all)?,
            random_scaled(&[h], 5, s1, all)?,
            random_scaled(&[d], 6, s2, all)?,
            random_scaled(&[h], 7, s1, all)?,
            random_scaled(&[t, d], 8, 1.0, |i| rows.contains(&(i / d)))?,
        ];
        let opts = FfnOptions::new(c.activation);
        let i = inputs(c.gated, c.biases, &host);
        let problem = ffn::validate(
            &ffn::FfnLayouts {
                x: i.x.described(),
                w1: i.w1.described(),
                w2: i.w2.described(),
                w3: i.w3.map(HostTensor::described),
                b1: i.b1.map(HostTensor::described),
                b2: i.b2.map(HostTensor::described),
                b3: i.b3.map(HostTensor::described),
            },
            &opts,
        )?;
        Ok(Ffn {
            opts,
            problem,
            rows,
            put: put_all(dev, &host)?,
            host,
        })
    }

    fn inputs<'a, T>(&self, t: &'a [T]) -> ffn::Inputs<'a, T> {
        inputs(self.problem.gated, self.problem.has_b1, t)
    }

    /// The checked tokens of a (tokens, width) tensor, as f32.
    fn rows_of(&self, t: &HostTensor) -> Result<HostTensor> {
        gather(t, &[self.rows.len(), t.shape()[1]], |i| {
            [self.rows[i[0]], i[1], 0, 0]
        })
    }

    /// The inputs the reference takes: x and dy on the checked tokens, f32.
    fn checked(&self) -> Result<Vec<HostTensor>> {
        let mut out = Vec::with_capacity(self.host.len());
        for (i, t) in self.host.iter().enumerate() {
            out.push(match i {
                X | DY => self.rows_of(t)?,
                _ => t.to_contiguous(DType::F32),
            });
        }
        Ok(out)
    }
}

impl OpBench for Ffn {
    /// y.
    type Fwd = Tensor;
    /// dx, dW1, dW2, then dW3, db1, db2, db3 where given.
    type Bwd = Vec<Tensor>;

    fn forward(&self) -> Result<Tensor> {
        Ok(ffn::forward(&self.inputs(&self.put), &self.opts)?.y)
    }

    fn backward(&self, _y: &Tensor) -> Result<Self::Bwd> {
        let i = ffn::BackwardInputs::new(self.inputs(&self.put), &self.put[DY]);
        Ok(flatten(ffn::backward(&i, &self.opts)?))
    }

    fn check_forward(&self, y: &Tensor) -> Result<f64> {
        let x = self.checked()?;
        let want = ffn::forward(&self.inputs(&x), &self.opts)?.y;
        Ok(worst_of(&[(&self.rows_of(&y.to_host()?)?, &want)]))
    }

    fn check_backward(&self, _y: &Tensor, g: &Self::Bwd) -> Result<f64> {
        let x = self.checked()?;
        let i = ffn::BackwardInputs::new(self.inputs(&x), &x[DY]);
        let want = flatten(ffn::backward(&i, &self.opts)?);
        if want.len() != g.len() {
            return Ok(f64::NAN);
        }
        let mut got = Vec::with_capacity(g.len());
        for (k, t) in g.iter().enumerate() {
            let t = t.to_host()?;
            // dx is per token; the weight and bias gradients are whole.
            got.push(if k == 0 { self.rows_of(&t)? } else { t });
        }
        let pairs: Vec<_> = got.iter().zip(&want).collect();
        Ok(worst_of(&pairs))
    }

    fn work(&self, dir: Dir) -> Work {
        // 2 * tokens * d_model * d_hidden per GEMM; the backward two GEMMs per forward one.
        let fwd = self.problem.flops();
        Work::Flops(match dir {
            Dir::Fwd => fwd,
            Dir::Bwd => 2.0 * fwd,
        })
    }
}
