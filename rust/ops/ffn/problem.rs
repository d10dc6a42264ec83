//! The fused feed-forward block's problem and its validator (pure Rust): shapes, dtypes
//! and options turned into checked sizes, shared by the CPU reference and the CUDA path.

use crate::error::{Error, Result};
use crate::ops::common::{check_layout, check_row_layout, checked_elements};
use crate::tensor::{DType, Layout};

/// The activation of the hidden layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum FfnActivation {
    Relu,
    /// GELU, tanh approximation (torch's `approximate="tanh"`).
    GeluTanh,
    /// Exact GELU, x * Phi(x) (torch's default).
    #[default]
    GeluErf,
    /// x * sigmoid(x).
    Silu,
}

impl FfnActivation {
    pub fn name(self) -> &'static str {
        match self {
            FfnActivation::Relu => "relu",
            FfnActivation::GeluTanh => "gelu_tanh",
            FfnActivation::GeluErf => "gelu",
            FfnActivation::Silu => "silu",
        }
    }

    /// Parses "relu" / "gelu_tanh" / "gelu" / "silu".
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "relu" => FfnActivation::Relu,
            "gelu_tanh" => FfnActivation::GeluTanh,
            "gelu" => FfnActivation::GeluErf,
            "silu" => FfnActivation::Silu,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "activation must be one of relu, gelu_tanh, gelu, silu, got {name:?}"
                )))
            }
        })
    }
}

/// Options of a feed-forward call. Gating (SwiGLU = SiLU gated, GeGLU = GELU gated) is
/// chosen by passing W3; the biases by passing them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct FfnOptions {
    pub activation: FfnActivation,
    /// Add x to the output (y = ... + x).
    pub residual: bool,
}

impl FfnOptions {
    pub fn new(activation: FfnActivation) -> Self {
        FfnOptions {
            activation,
            residual: false,
        }
    }

    pub fn residual(self, residual: bool) -> Self {
        FfnOptions { residual, ..self }
    }
}

/// Sizes of a validated feed-forward call.
#[derive(Debug, Clone, PartialEq)]
// Non-exhaustive: outside this crate only the validator builds one, so holding a
// problem is proof that the call was checked; the launch consumes it as it is.
#[non_exhaustive]
pub struct FfnProblem {
    pub tokens: usize,
    pub d_model: usize,
    pub d_hidden: usize,
    pub activation: FfnActivation,
    /// W3 given: h = act(x W1ᵀ + b1) ∘ (x W3ᵀ + b3).
    pub gated: bool,
    pub residual: bool,
    pub has_b1: bool,
    pub has_b2: bool,
    pub has_b3: bool,
    pub dtype: DType,
}

impl FfnProblem {
    pub fn x_shape(&self) -> Vec<usize> {
        vec![self.tokens, self.d_model]
    }

    /// W1's and W3's shape, (d_hidden, d_model) as nn.Linear(d_model, d_hidden) stores it.
    pub fn w1_shape(&self) -> Vec<usize> {
        vec![self.d_hidden, self.d_model]
    }

    /// W2's shape, (d_model, d_hidden).
    pub fn w2_shape(&self) -> Vec<usize> {
        vec![self.d_model, self.d_hidden]
    }

    pub fn hidden_shape(&self) -> Vec<usize> {
        vec![self.tokens, self.d_hidden]
    }

    /// Forward FLOPs, 2 per multiply-add: two GEMMs, three when gated.
    pub fn flops(&self) -> f64 {
        let gemm = 2.0 * self.tokens as f64 * self.d_model as f64 * self.d_hidden as f64;
        gemm * if self.gated { 3.0 } else { 2.0 }
    }
}

/// (dtype, layout) of one tensor, as validators read it.
pub type Described<'a> = (DType, &'a Layout);

/// What a forward call is made of, as the validator sees it.
#[derive(Debug, Clone, Copy)]
pub struct FfnLayouts<'a> {
    pub x: Described<'a>,
    pub w1: Described<'a>,
    pub w2: Described<'a>,
    pub w3: Option<Described<'a>>,
    pub b1: Option<Described<'a>>,
    pub b2: Option<Described<'a>>,
    pub b3: Option<Described<'a>>,
}

const X_LAYOUT: &str = "(tokens, d_model)";
const W1_LAYOUT: &str = "(d_hidden, d_model)";
const W2_LAYOUT: &str = "(d_model, d_hidden)";
const B_LAYOUT: &str = "(features,)";

fn same_dtype(name: &str, d: DType, x: DType) -> Result<()> {
    if d != x {
        return Err(Error::DTypeMismatch {
            detail: format!("{name} is {d} but x is {x}"),
        });
    }
    Ok(())
}

fn check_matrix(name: &'static str, t: Described<'_>, layout: &'static str) -> Result<()> {
    check_row_layout(name, t.1, 2, layout)
}

fn check_shape(name: &str, l: &Layout, expected: &[usize], why: &str) -> Result<()> {
    if l.shape != expected {
        return Err(Error::ShapeMismatch {
            detail: format!(
                "{name} has shape {:?}, expected {expected:?} ({why})",
                l.shape
            ),
        });
    }
    Ok(())
}

/// Checks a forward call: x (tokens, d_model), W1 (d_hidden, d_model), W2 (d_model,
/// d_hidden), optional W3 like W1, optional biases b1, b3 (d_hidden) and b2 (d_model);
/// one dtype; matrices with any row stride and a unit-stride last dimension, biases
/// contiguous; nothing empty; every size product within memory (checked arithmetic).
pub fn validate(t: &FfnLayouts<'_>, opts: &FfnOptions) -> Result<FfnProblem> {
    check_matrix("x", t.x, X_LAYOUT)?;
    check_matrix("w1", t.w1, W1_LAYOUT)?;
    check_matrix("w2", t.w2, W2_LAYOUT)?;
    let dtype = t.x.0;
    let (tokens, d_model) = (t.x.1.shape[0], t.x.1.shape[1]);
    let d_hidden = t.w1.1.shape[0];
    same_dtype("w1", t.w1.0, dtype)?;
    same_dtype("w2", t.w2.0, dtype)?;
    check_shape(
        "w1",
        t.w1.1,
        &[d_hidden, d_model],
        "(d_hidden, d_model): its columns must match x's d_model",
    )?;
    check_shape(
        "w2",
        t.w2.1,
        &[d_model, d_hidden],
        "(d_model, d_hidden), from x and w1",
    )?;
    if let Some(w3) = t.w3 {
        check_matrix("w3", w3, W1_LAYOUT)?;
        same_dtype("w3", w3.0, dtype)?;
        check_shape("w3", w3.1, &[d_hidden, d_model], "like w1")?;
    }
    let bias = |name: &'static str, b: Option<Described<'_>>, len: usize, of: &str| {
        if let Some(b) = b {
            check_row_layout(name, b.1, 1, B_LAYOUT)?;
            same_dtype(name, b.0, dtype)?;
            check_shape(name, b.1, &[len], of)?;
        }
        Ok::<(), Error>(())
    };
    bias("b1", t.b1, d_hidden, "one per row of w1")?;
    bias("b2", t.b2, d_model, "one per row of w2")?;
    if t.b3.is_some() && t.w3.is_none() {
        return Err(Error::InvalidArgument(
            "b3 is given without w3: the gate's bias needs the gate's weight".into(),
        ));
    }
    bias("b3", t.b3, d_hidden, "one per row of w3")?;
    // The hidden activation (and the references' f64 copies of it) must fit in memory.
    for (what, dims) in [
        ("x", [tokens, d_model]),
        ("the hidden activation", [tokens, d_hidden]),
        ("w1", [d_hidden, d_model]),
    ] {
        checked_elements(what, &dims)?;
    }
    Ok(FfnProblem {
        tokens,
        d_model,
        d_hidden,
        activation: opts.activation,
        gated: t.w3.is_some(),
        residual: opts.residual,
        has_b1: t.b1.is_some(),
        has_b2: t.b2.is_some(),
        has_b3: t.b3.is_some(),
        dtype,
    })
}

/// Checks the backward's dy against a validated forward problem: (tokens, d_model) in
/// x's dtype, any row stride, unit-stride last dimension.
pub fn validate_backward(p: &FfnProblem, dy: Described<'_>) -> Result<()> {
    check_layout("dy", dy.1, 2, X_LAYOUT)?;
    check_shape("dy", dy.1, &p.x_shape(), "the output's shape, that of x")?;
    check_row_layout("dy", dy.1, 2, X_LAYOUT)?;
    same_dtype("dy", dy.0, p.dtype)
}

/// The most tokens the kernels take: 32-bit row indices up to the next whole
/// 128-row tile past the last.
pub const KERNEL_MAX_TOKENS: usize = (1 << 31) - 256;
/// The widest output a GEMM of the kernels writes: 64-column tiles index grid y (at
/// most 65535). GEMM2 has d_model columns; GEMM1 d_hidden, or 2 d_hidden when gated (W1
/// and W3 interleaved), so d_hidden is held to half of it either way.
pub const KERNEL_MAX_D_MODEL: usize = 65_535 * 64;
pub const KERNEL_MAX_D_HIDDEN: usize = 65_535 * 32;

/// What the CUDA kernels additionally need (checked before any launch, testable without
/// a GPU): f16 or bf16 storage, d_model and d_hidden multiples of 8 (whole 16-byte
/// chunks along every reduction), and sizes within the kernels' 32-bit indexing and grid.
pub fn check_kernel_limits(p: &FfnProblem) -> Result<()> {
    if p.dtype == DType::F32 {
        return Err(Error::UnsupportedDType {
            name: "x",
            dtype: p.dtype,
            supported: "the feed-forward kernels take float16 or bfloat16",
        });
    }
    for (what, v) in [("d_model", p.d_model), ("d_hidden", p.d_hidden)] {
        if v % 8 != 0 {
            return Err(Error::Unsupported(format!(
                "{what} = {v}: the feed-forward kernels need widths that are multiples of 8"
            )));
        }
    }
    for (what, v, limit) in [
        ("tokens", p.tokens, KERNEL_MAX_TOKENS),
        ("d_model", p.d_model, KERNEL_MAX_D_MODEL),
        ("d_hidden", p.d_hidden, KERNEL_MAX_D_HIDDEN),
    ] {
        if v > limit {
            return Err(Error::TooLarge {
                what: what.to_string(),
                value: v as u64,
                limit: limit as u64,
            });
        }
    }
    Ok(())
}
