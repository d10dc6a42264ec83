//! The Longformer problem: what one call describes (sizes, options, masks), and its
//! validators.

use super::{LongformerOptions, TokenMask};
use crate::error::{Error, Result};
use crate::ops::common::{
    check_row_layout, check_scale, checked_elements, try_alloc_vec, try_with_capacity,
};
use crate::tensor::{DType, Layout};

/// A validated call: sizes, options and the masks.
#[derive(Debug, Clone, PartialEq)]
// Non-exhaustive: outside this crate only the validator builds one, so holding a
// problem is proof that the call was checked; the launch consumes it as it is.
#[non_exhaustive]
pub struct LongformerProblem {
    pub batch: usize,
    pub seqlen: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub window: usize,
    /// One dilation per head (length `heads`).
    pub dilation: Vec<usize>,
    pub causal: bool,
    pub scale: f32,
    pub dtype: DType,
    /// True when Q_g, K_g, V_g were given (else Q, K, V serve for global rows).
    pub separate_global: bool,
    /// (B, N) row-major: global tokens.
    pub global: Vec<bool>,
    /// (B, N) row-major: padded tokens.
    pub padding: Vec<bool>,
    /// Per sequence, its global positions in increasing order.
    pub global_positions: Vec<Vec<usize>>,
}

impl LongformerProblem {
    /// Shape of Q, K, V, O and their gradients.
    pub fn qkv_shape(&self) -> Vec<usize> {
        vec![self.batch, self.seqlen, self.heads, self.head_dim]
    }

    /// Shape of LSE: (B, H, N).
    pub fn lse_shape(&self) -> Vec<usize> {
        vec![self.batch, self.heads, self.seqlen]
    }

    /// Index in the contiguous LSE of (sequence b, head h, token i).
    pub fn lse_index(&self, b: usize, h: usize, i: usize) -> usize {
        (b * self.heads + h) * self.seqlen + i
    }

    pub fn is_global(&self, b: usize, i: usize) -> bool {
        self.global[b * self.seqlen + i]
    }

    pub fn is_padded(&self, b: usize, i: usize) -> bool {
        self.padding[b * self.seqlen + i]
    }

    /// The keys query `i` of sequence `b` attends to on head `h`, increasing, each once.
    pub fn keys(&self, b: usize, h: usize, i: usize) -> Vec<usize> {
        let n = self.seqlen;
        if self.is_padded(b, i) {
            return Vec::new();
        }
        let last = if self.causal { i } else { n - 1 };
        if self.is_global(b, i) {
            return (0..=last).filter(|&j| !self.is_padded(b, j)).collect();
        }
        // Clipping both to N changes no key; i128 keeps every product exact.
        let d = self.dilation[h].min(n) as i128;
        let w = self.window.min(n) as i128;
        let hi = if self.causal { 0 } else { w };
        let (i, n) = (i as i128, n as i128);
        let mut keys: Vec<usize> = (-w..=hi)
            .map(|t| i + d * t)
            .filter(|&j| j >= 0 && j < n)
            .map(|j| j as usize)
            .filter(|&j| !self.is_padded(b, j))
            .collect();
        keys.extend(
            self.global_positions[b]
                .iter()
                .copied()
                .take_while(|&g| g <= last),
        );
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// The invariants the CPU reference relies on, checked again (the fields are public,
    /// so a validated problem can be changed).
    pub(crate) fn check_consistent(&self) -> Result<()> {
        let bn = checked_elements("the masks", &[self.batch, self.seqlen])?;
        checked_elements("q", &[bn, self.heads, self.head_dim])?;
        let bad = |what: String| Err(crate::ops::common::altered(what));
        if self.dilation.len() != self.heads || self.dilation.contains(&0) {
            return bad(format!(
                "dilation {:?} for {} heads",
                self.dilation, self.heads
            ));
        }
        if self.global.len() != bn || self.padding.len() != bn {
            return bad("mask lengths".into());
        }
        if self.global_positions.len() != self.batch
            || self.global_positions.iter().enumerate().any(|(b, g)| {
                g.windows(2).any(|w| w[0] >= w[1])
                    || g.iter()
                        .any(|&i| i >= self.seqlen || !self.global[b * self.seqlen + i])
            })
        {
            return bad("global_positions".into());
        }
        Ok(())
    }

    /// Number of (query, key) pairs scored, over all sequences and heads.
    pub fn pairs(&self) -> usize {
        (0..self.batch)
            .flat_map(|b| (0..self.heads).map(move |h| (b, h)))
            .map(|(b, h)| {
                (0..self.seqlen)
                    .map(|i| self.keys(b, h, i).len())
                    .sum::<usize>()
            })
            .sum()
    }
}

const QKV_LAYOUT: &str = "(batch, seqlen, heads, head_dim)";
const MASK_LAYOUT: &str = "(batch, seqlen)";

fn check_mask(
    name: &'static str,
    m: Option<&TokenMask>,
    batch: usize,
    n: usize,
) -> Result<Vec<bool>> {
    let Some(m) = m else {
        return try_alloc_vec(batch * n, false, name);
    };
    if m.shape.len() != 2 {
        return Err(Error::Rank {
            name,
            expected: 2,
            layout: MASK_LAYOUT,
            shape: m.shape.clone(),
        });
    }
    if m.shape != [batch, n] {
        return Err(Error::ShapeMismatch {
            detail: format!(
                "{name} has shape {:?}, expected (batch, seqlen) = {:?}",
                m.shape,
                [batch, n]
            ),
        });
    }
    if m.values.len() != batch * n {
        return Err(Error::InvalidArgument(format!(
            "{name}: shape {:?} needs {} values, got {}",
            m.shape,
            batch * n,
            m.values.len()
        )));
    }
    let mut v = try_with_capacity(m.values.len(), name)?;
    v.extend_from_slice(&m.values);
    Ok(v)
}

/// Checks Q, K, V, the optional global projections (by dtype and layout), the masks and
/// the options; returns the validated problem.
pub fn validate(
    q: (DType, &Layout),
    k: (DType, &Layout),
    v: (DType, &Layout),
    globals: Option<[(DType, &Layout); 3]>,
    global_mask: Option<&TokenMask>,
    padding_mask: Option<&TokenMask>,
    opts: &LongformerOptions,
) -> Result<LongformerProblem> {
    let mut all = vec![("q", q), ("k", k), ("v", v)];
    if let Some([qg, kg, vg]) = globals {
        all.extend([("q_global", qg), ("k_global", kg), ("v_global", vg)]);
    }
    for &(name, (_, l)) in &all {
        check_row_layout(name, l, 4, QKV_LAYOUT)?;
    }
    for &(name, (dtype, l)) in &all[1..] {
        if dtype != q.0 {
            return Err(Error::DTypeMismatch {
                detail: format!("{name} is {dtype} but q is {}", q.0),
            });
        }
        if l.shape != q.1.shape {
            return Err(Error::ShapeMismatch {
                detail: format!(
                    "{name} has shape {:?} but q has shape {:?}: all must be {QKV_LAYOUT} \
                     of one size",
                    l.shape, q.1.shape
                ),
            });
        }
    }
    let (batch, n, heads, d) = (q.1.shape[0], q.1.shape[1], q.1.shape[2], q.1.shape[3]);
    let dilation = match opts.dilation.len() {
        1 => vec![opts.dilation[0]; heads],
        len if len == heads => opts.dilation.clone(),
        len => {
            return Err(Error::InvalidArgument(format!(
                "dilation has {len} values {:?}: give one per head ({heads}) or one for all",
                opts.dilation
            )))
        }
    };
    if let Some(h) = dilation.iter().position(|&x| x == 0) {
        return Err(Error::InvalidArgument(format!(
            "dilation must be >= 1, got 0 for head {h} ({:?})",
            opts.dilation
        )));
    }
    let scale = check_scale(opts.scale, d)?;
    // The masks, LSE and the six gradient buffers of the reference are sized from these.
    checked_elements("lse", &[batch, heads, n])?;
    let global = check_mask("global_mask", global_mask, batch, n)?;
    let padding = check_mask("padding_mask", padding_mask, batch, n)?;
    if let Some(x) = (0..batch * n).find(|&x| global[x] && padding[x]) {
        return Err(Error::InvalidArgument(format!(
            "token {} of sequence {} is both global and padded: a padded token cannot be global",
            x % n,
            x / n
        )));
    }
    let global_positions = (0..batch)
        .map(|b| (0..n).filter(|&i| global[b * n + i]).collect())
        .collect();
    Ok(LongformerProblem {
        batch,
        seqlen: n,
        heads,
        head_dim: d,
        window: opts.window,
        dilation,
        causal: opts.causal,
        scale,
        dtype: q.0,
        separate_global: globals.is_some(),
        global,
        padding,
        global_positions,
    })
}

/// Checks the backward's extra inputs: O and dO shaped and typed like Q, LSE f32 (B, H, N).
pub fn validate_backward(
    p: &LongformerProblem,
    out: (DType, &Layout),
    lse: (DType, &Layout),
    dout: (DType, &Layout),
) -> Result<()> {
    let shape = p.qkv_shape();
    for (name, (dtype, l)) in [("out", out), ("dout", dout)] {
        check_row_layout(name, l, 4, QKV_LAYOUT)?;
        if l.shape != shape {
            return Err(Error::ShapeMismatch {
                detail: format!("{name} has shape {:?}, expected q's {shape:?}", l.shape),
            });
        }
        if dtype != p.dtype {
            return Err(Error::DTypeMismatch {
                detail: format!("{name} is {dtype} but q is {}", p.dtype),
            });
        }
    }
    let lse_shape = p.lse_shape();
    if lse.1.shape != lse_shape {
        return Err(Error::ShapeMismatch {
            detail: format!(
                "lse has shape {:?}, expected {lse_shape:?} (the forward's lse)",
                lse.1.shape
            ),
        });
    }
    if lse.0 != DType::F32 {
        return Err(Error::UnsupportedDType {
            name: "lse",
            dtype: lse.0,
            supported: "lse is float32, as the forward returns it",
        });
    }
    Ok(())
}
