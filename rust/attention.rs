//! Dense scaled-dot-product attention forward: validate -> plan -> launch (or the CPU
//! reference, behind the same signature).
//!
//! Layout: Q is (B, Nq, H, D), K and V are (B, Nk, H, D), given by shape and strides
//! (in elements), so a (B, H, N, D) tensor is passed by swapping the strides of dims 1
//! and 2, with no copy. The head dim must have unit stride. Outputs: O (B, Nq, H, D)
//! contiguous in Q's dtype and LSE (B, H, Nq) f32, the natural-log logsumexp of each
//! scaled score row. Causal masking is aligned bottom-right: query i sees keys
//! j <= i + Nk - Nq (as FlashAttention >= 2.1). A row with no visible key gives O = 0
//! and LSE = -inf.

use crate::error::{Error, Result};
use crate::reference;
use crate::tensor::{DType, HostTensor, Layout};
use crate::Tensor;

/// Options shared by every attention entry point.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AttentionOptions {
    /// Softmax scale; `None` means 1/sqrt(D).
    pub scale: Option<f32>,
    /// Causal mask, aligned bottom-right.
    pub causal: bool,
}

/// O and LSE of one forward call.
#[derive(Debug)]
pub struct AttentionOutput<T> {
    pub out: T,
    pub lse: T,
}

/// Sizes and strides of a validated call (the "plan" of this op).
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionProblem {
    pub batch: usize,
    pub heads: usize,
    pub seqlen_q: usize,
    pub seqlen_k: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub causal: bool,
    pub dtype: DType,
}

impl AttentionProblem {
    /// Multiply-adds x2 of the two matmuls, halved when causal (the convention of
    /// FlashAttention's benchmarks and of ../shared/ANCHORS.md).
    pub fn flops(&self) -> f64 {
        let f = 4.0
            * (self.batch * self.heads) as f64
            * self.seqlen_q as f64
            * self.seqlen_k as f64
            * self.head_dim as f64;
        if self.causal {
            f / 2.0
        } else {
            f
        }
    }
}

const QKV_LAYOUT: &str = "(batch, seqlen, heads, head_dim)";

/// Checks Q, K, V (by dtype and layout) and the options; returns the problem sizes.
pub fn validate(
    q: (DType, &Layout),
    k: (DType, &Layout),
    v: (DType, &Layout),
    opts: &AttentionOptions,
) -> Result<AttentionProblem> {
    for (name, (_, l)) in [("q", q), ("k", k), ("v", v)] {
        if l.shape.len() != 4 {
            return Err(Error::Rank {
                name,
                expected: 4,
                layout: QKV_LAYOUT,
                shape: l.shape.clone(),
            });
        }
        if l.strides.len() != 4 {
            return Err(Error::InvalidArgument(format!(
                "{name}: shape {:?} has {} strides {:?}",
                l.shape,
                l.strides.len(),
                l.strides
            )));
        }
        if l.numel() == 0 {
            return Err(Error::Empty {
                name,
                shape: l.shape.clone(),
            });
        }
        if l.strides[3] != 1 {
            return Err(Error::NonUnitStride {
                name,
                shape: l.shape.clone(),
                strides: l.strides.clone(),
            });
        }
    }
    if q.0 != k.0 || q.0 != v.0 {
        return Err(Error::DTypeMismatch {
            detail: format!("q is {}, k is {}, v is {}", q.0, k.0, v.0),
        });
    }
    let (qs, ks, vs) = (&q.1.shape, &k.1.shape, &v.1.shape);
    if ks != vs {
        return Err(Error::ShapeMismatch {
            detail: format!("k has shape {ks:?} but v has shape {vs:?}"),
        });
    }
    if qs[0] != ks[0] || qs[2] != ks[2] || qs[3] != ks[3] {
        return Err(Error::ShapeMismatch {
            detail: format!(
                "q {qs:?} and k {ks:?} must agree on batch, heads and head_dim {QKV_LAYOUT}"
            ),
        });
    }
    let scale = opts.scale.unwrap_or(1.0 / (qs[3] as f32).sqrt());
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::InvalidArgument(format!(
            "scale must be finite and positive, got {scale}"
        )));
    }
    Ok(AttentionProblem {
        batch: qs[0],
        heads: qs[2],
        seqlen_q: qs[1],
        seqlen_k: ks[1],
        head_dim: qs[3],
        scale,
        causal: opts.causal,
        dtype: q.0,
    })
}

/// Attention forward on host or device tensors: the CPU reference for host tensors, the
/// CUDA kernel (on the tensors' stream) for device tensors. All three must live on the
/// same side.
pub fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &AttentionOptions,
) -> Result<AttentionOutput<Tensor>> {
    match (q, k, v) {
        (Tensor::Host(q), Tensor::Host(k), Tensor::Host(v)) => {
            let o = forward_cpu(q, k, v, opts)?;
            Ok(AttentionOutput {
                out: Tensor::Host(o.out),
                lse: Tensor::Host(o.lse),
            })
        }
        #[cfg(feature = "cuda")]
        (Tensor::Cuda(q), Tensor::Cuda(k), Tensor::Cuda(v)) => {
            let o = cuda::forward(q, k, v, opts)?;
            Ok(AttentionOutput {
                out: Tensor::Cuda(o.out),
                lse: Tensor::Cuda(o.lse),
            })
        }
        #[allow(unreachable_patterns)]
        _ => Err(Error::DeviceMismatch {
            detail: format!(
                "q is on {}, k on {}, v on {}: all must be on one device",
                q.device_name(),
                k.device_name(),
                v.device_name()
            ),
        }),
    }
}

/// The CPU reference on host tensors (f32 accumulation; O in Q's dtype).
pub fn forward_cpu(
    q: &HostTensor,
    k: &HostTensor,
    v: &HostTensor,
    opts: &AttentionOptions,
) -> Result<AttentionOutput<HostTensor>> {
    let p = validate(
        (q.dtype(), q.layout()),
        (k.dtype(), k.layout()),
        (v.dtype(), v.layout()),
        opts,
    )?;
    let (o, lse) = reference::attention(
        &p,
        &q.to_contiguous(DType::F32).to_f32_vec(),
        &k.to_contiguous(DType::F32).to_f32_vec(),
        &v.to_contiguous(DType::F32).to_f32_vec(),
    );
    let out = HostTensor::from_vec(o, &[p.batch, p.seqlen_q, p.heads, p.head_dim])?
        .to_contiguous(p.dtype);
    let lse = HostTensor::from_vec(lse, &[p.batch, p.heads, p.seqlen_q])?;
    Ok(AttentionOutput { out, lse })
}

#[cfg(feature = "cuda")]
pub mod cuda {
    //! The CUDA path: kernel-specific checks, then the C launcher.

    use std::ffi::c_void;

    use super::{validate, AttentionOptions, AttentionOutput, AttentionProblem};
    use crate::device::{DeviceTensor, DeviceView};
    use crate::error::{Error, Result};
    use crate::ffi;
    use crate::tensor::{DType, Layout};

    /// Largest grid y/z extent (heads, batch).
    const MAX_GRID_YZ: usize = 65_535;
    /// Longest sequence the kernel's 32-bit row arithmetic handles: it forms values up to
    /// a sequence length plus one tile (128 rows).
    const MAX_SEQLEN: u64 = i32::MAX as u64 - 1024;

    /// Checks what the kernel needs beyond the op's semantics: dtype, head dim, 16-byte
    /// aligned rows, sizes that fit its 32-bit indices and grid, every view on `device`.
    pub fn check_kernel_support(
        p: &AttentionProblem,
        device: usize,
        views: &[(&'static str, &DeviceView)],
    ) -> Result<()> {
        if !matches!(p.dtype, DType::F16 | DType::BF16) {
            return Err(Error::UnsupportedDType {
                name: "q",
                dtype: p.dtype,
                supported: "the CUDA kernel takes float16 or bfloat16",
            });
        }
        // SAFETY: a pure function of its argument.
        if unsafe { ffi::fk_attention_fwd_supports_head_dim(p.head_dim as i32) } == 0 {
            return Err(Error::Unsupported(format!(
                "head_dim {} (the CUDA kernel supports 64 and 128)",
                p.head_dim
            )));
        }
        for (what, value) in [("seqlen_q", p.seqlen_q), ("seqlen_k", p.seqlen_k)] {
            if value as u64 > MAX_SEQLEN {
                return Err(Error::TooLarge {
                    what: what.into(),
                    value: value as u64,
                    limit: MAX_SEQLEN,
                });
            }
        }
        for (what, value) in [("batch", p.batch), ("heads", p.heads)] {
            if value > MAX_GRID_YZ {
                return Err(Error::TooLarge {
                    what: what.into(),
                    value: value as u64,
                    limit: MAX_GRID_YZ as u64,
                });
            }
        }
        for (name, view) in views {
            if view.device != device {
                return Err(Error::DeviceMismatch {
                    detail: format!(
                        "{name} is on cuda:{} but q is on cuda:{device}",
                        view.device
                    ),
                });
            }
            let elem = view.dtype.size() as u64;
            let misaligned_stride = view.layout.strides[..view.layout.strides.len() - 1]
                .iter()
                .any(|&s| (s as u64 * elem) % 16 != 0);
            if view.ptr % 16 != 0 || misaligned_stride {
                return Err(Error::InvalidArgument(format!(
                    "{name}: the CUDA kernel needs 16-byte aligned rows (pointer {:#x}, strides {:?} \
                     in {}-byte elements); make the tensor contiguous",
                    view.ptr, view.layout.strides, elem
                )));
            }
        }
        Ok(())
    }

    /// Allocates O and LSE and runs the kernel on Q's stream.
    pub fn forward(
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        opts: &AttentionOptions,
    ) -> Result<AttentionOutput<DeviceTensor>> {
        let p = validate(
            (q.dtype(), q.layout()),
            (k.dtype(), k.layout()),
            (v.dtype(), v.layout()),
            opts,
        )?;
        let stream = q.stream();
        for (name, t) in [("k", k), ("v", v)] {
            if t.stream().ordinal() != stream.ordinal() {
                return Err(Error::DeviceMismatch {
                    detail: format!(
                        "{name} is on cuda:{} but q is on cuda:{}",
                        t.stream().ordinal(),
                        stream.ordinal()
                    ),
                });
            }
            // Inputs written on another stream: order the launch after them without
            // blocking the host.
            stream.wait_for(t.stream())?;
        }
        let out =
            DeviceTensor::poisoned(stream, p.dtype, &[p.batch, p.seqlen_q, p.heads, p.head_dim])?;
        let lse = DeviceTensor::poisoned(stream, DType::F32, &[p.batch, p.heads, p.seqlen_q])?;
        // SAFETY: all views come from live DeviceTensors whose layouts were checked
        // against their allocations; outputs are freshly allocated with matching shapes.
        unsafe {
            forward_views(
                &q.view(),
                &k.view(),
                &v.view(),
                &out.view(),
                &lse.view(),
                opts,
                stream.raw(),
            )?
        };
        Ok(AttentionOutput { out, lse })
    }

    /// Runs the kernel on raw device memory, writing into `out` and `lse`.
    ///
    /// # Safety
    /// Every view must describe live device memory on its device that its layout stays
    /// inside; `out` and `lse` must not overlap the inputs or each other; `stream` must
    /// be a live stream (or null) of the views' device, ordered after whatever produced
    /// the inputs.
    pub unsafe fn forward_views(
        q: &DeviceView,
        k: &DeviceView,
        v: &DeviceView,
        out: &DeviceView,
        lse: &DeviceView,
        opts: &AttentionOptions,
        stream: *mut c_void,
    ) -> Result<()> {
        let p = validate(
            (q.dtype, &q.layout),
            (k.dtype, &k.layout),
            (v.dtype, &v.layout),
            opts,
        )?;
        let o_shape = [p.batch, p.seqlen_q, p.heads, p.head_dim];
        let unit_last =
            |l: &Layout| l.strides.len() == l.shape.len() && l.strides.last() == Some(&1);
        if out.layout.shape != o_shape || out.dtype != p.dtype || !unit_last(&out.layout) {
            return Err(Error::ShapeMismatch {
                detail: format!(
                    "out must be {} {o_shape:?} with unit last stride, got {} {:?} strides {:?}",
                    p.dtype, out.dtype, out.layout.shape, out.layout.strides
                ),
            });
        }
        let lse_shape = [p.batch, p.heads, p.seqlen_q];
        if lse.layout.shape != lse_shape || lse.dtype != DType::F32 || !unit_last(&lse.layout) {
            return Err(Error::ShapeMismatch {
                detail: format!(
                    "lse must be float32 {lse_shape:?} with unit last stride, got {} {:?} strides {:?}",
                    lse.dtype, lse.layout.shape, lse.layout.strides
                ),
            });
        }
        check_kernel_support(&p, q.device, &[("q", q), ("k", k), ("v", v), ("out", out)])?;
        if lse.device != q.device {
            return Err(Error::DeviceMismatch {
                detail: format!(
                    "lse is on cuda:{} but q is on cuda:{}",
                    lse.device, q.device
                ),
            });
        }
        if lse.ptr % 4 != 0 {
            return Err(Error::InvalidArgument(format!(
                "lse: needs a 4-byte aligned pointer, got {:#x}",
                lse.ptr
            )));
        }
        let s = |l: &Layout, i: usize| l.strides[i] as i64;
        let params = ffi::fk_attention_fwd_params {
            q: q.ptr as *const c_void,
            k: k.ptr as *const c_void,
            v: v.ptr as *const c_void,
            o: out.ptr as *mut c_void,
            lse: lse.ptr as *mut f32,
            q_batch_stride: s(&q.layout, 0),
            q_row_stride: s(&q.layout, 1),
            q_head_stride: s(&q.layout, 2),
            k_batch_stride: s(&k.layout, 0),
            k_row_stride: s(&k.layout, 1),
            k_head_stride: s(&k.layout, 2),
            v_batch_stride: s(&v.layout, 0),
            v_row_stride: s(&v.layout, 1),
            v_head_stride: s(&v.layout, 2),
            o_batch_stride: s(&out.layout, 0),
            o_row_stride: s(&out.layout, 1),
            o_head_stride: s(&out.layout, 2),
            lse_batch_stride: s(&lse.layout, 0),
            lse_head_stride: s(&lse.layout, 1),
            batch: p.batch as i32,
            heads: p.heads as i32,
            seqlen_q: p.seqlen_q as i32,
            seqlen_k: p.seqlen_k as i32,
            head_dim: p.head_dim as i32,
            softmax_scale: p.scale,
            causal: p.causal as i32,
            dtype: match p.dtype {
                DType::F16 => ffi::fk_dtype_FK_DTYPE_F16 as i32,
                _ => ffi::fk_dtype_FK_DTYPE_BF16 as i32,
            },
            device: q.device as i32,
        };
        // SAFETY: params were validated above; the caller vouches for the memory.
        let code = unsafe { ffi::fk_attention_fwd(&params, stream) };
        ffi::check(code)
    }
}
