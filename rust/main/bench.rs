//! What every op family shares: where the ops run ([`Backend`]), the [`OpBench`] trait
//! each family implements, the driver that turns one case into a forward and a backward
//! row ([`run_case`]), and the timing, error and tensor-slicing helpers.

use std::time::Instant;

use flashkernels::{DType, HostTensor, Layout, Result, Tensor};

use crate::report::{Dir, Measured, Report, Row, Work};

#[cfg(any(feature = "cuda", feature = "emulator"))]
use flashkernels::{DeviceTensor, Error, Stream};

/// bf16 bounds on the relative L2 error against the CPU reference.
pub const FWD_TOL: f64 = 1e-2;
pub const BWD_TOL: f64 = 2e-2;

/// Where the ops run: the CPU reference, or the CUDA kernels on one stream.
pub enum Backend {
    /// `check`: compare the reference's results with itself on the GPU checks' slices
    /// (the tests' way to exercise the slicing without a GPU).
    Cpu { check: bool },
    #[cfg(any(feature = "cuda", feature = "emulator"))]
    Gpu(Stream),
}

impl Backend {
    pub fn is_gpu(&self) -> bool {
        !matches!(self, Backend::Cpu { .. })
    }

    /// True when results are checked against the reference (always on the GPU).
    fn checks(&self) -> bool {
        matches!(self, Backend::Cpu { check: true }) || self.is_gpu()
    }

    /// `t` where this backend's ops read it: a copy on the device, or on the host.
    pub fn put(&self, t: &HostTensor) -> Result<Tensor> {
        match self {
            Backend::Cpu { .. } => Ok(Tensor::Host(t.clone())),
            #[cfg(any(feature = "cuda", feature = "emulator"))]
            Backend::Gpu(s) => Ok(Tensor::Cuda(DeviceTensor::from_host(s, t)?)),
        }
    }

    /// Runs `run` once and returns its outputs with the seconds one call takes: on the
    /// CPU that call's time; on the GPU the mean over repeated launches of `again` (into
    /// the outputs of `run`, so no allocation is timed) after a warm-up, synchronized.
    #[cfg_attr(
        not(any(feature = "cuda", feature = "emulator")),
        allow(unused_variables, unused_mut)
    )]
    pub fn timed<T>(
        &self,
        run: impl FnOnce() -> Result<T>,
        mut again: impl FnMut(&T) -> Result<()>,
    ) -> Result<(T, f64)> {
        let t0 = Instant::now();
        let out = run()?;
        match self {
            Backend::Cpu { .. } => Ok((out, t0.elapsed().as_secs_f64())),
            #[cfg(any(feature = "cuda", feature = "emulator"))]
            Backend::Gpu(s) => {
                // On the CPU emulator a launch takes milliseconds to seconds and its time
                // says nothing about a GPU: one launch after one warm-up is enough there.
                const EMULATED: bool = cfg!(feature = "emulator");
                const WARMUP: usize = if EMULATED { 1 } else { 3 };
                const MIN_ITERS: f64 = if EMULATED { 1.0 } else { 10.0 };
                // Enough launches for about 0.1 s, within [10, 1000].
                let mut launches = |n: usize| -> Result<f64> {
                    s.synchronize()?;
                    let t0 = Instant::now();
                    for _ in 0..n {
                        again(&out)?;
                    }
                    s.synchronize()?;
                    Ok(t0.elapsed().as_secs_f64() / n as f64)
                };
                let estimate = launches(WARMUP)?;
                let iters = (0.1 / estimate.max(1e-7)).clamp(MIN_ITERS, 1000.0) as usize;
                let secs = launches(iters)?;
                Ok((out, secs))
            }
        }
    }
}

/// One case of an op family: the forward and backward on the backend's tensors, and
/// (GPU only) their check against the CPU reference.
pub trait OpBench {
    type Fwd;
    type Bwd;
    /// The forward, allocating its outputs: the CPU reference on host tensors, the
    /// kernels on device tensors.
    fn forward(&self) -> Result<Self::Fwd>;
    /// The backward from the forward's outputs (and the case's upstream gradient).
    fn backward(&self, f: &Self::Fwd) -> Result<Self::Bwd>;
    /// The forward again, into `f`'s buffers: the GPU timing loop. A fresh call unless
    /// the family launches the kernels into existing outputs.
    fn forward_again(&self, _f: &Self::Fwd) -> Result<()> {
        self.forward().map(drop)
    }
    /// The backward again, into `g`'s buffers (as [`OpBench::forward_again`]).
    fn backward_again(&self, f: &Self::Fwd, _g: &Self::Bwd) -> Result<()> {
        self.backward(f).map(drop)
    }
    /// Relative L2 error of the forward's outputs against the CPU reference (on a
    /// slice that keeps the reference cheap).
    fn check_forward(&self, f: &Self::Fwd) -> Result<f64>;
    /// The worst relative L2 error of the gradients against the CPU reference.
    fn check_backward(&self, f: &Self::Fwd, g: &Self::Bwd) -> Result<f64>;
    /// FLOPs (or bytes moved, for memory-bound ops) of one call.
    fn work(&self, dir: Dir) -> Work;
}

/// Runs one case (built by `make`) forward then backward, each timed and, on the GPU,
/// checked; adds a row per direction to `r`. An error ends the case with an error row.
pub fn run_case<B: OpBench>(
    r: &mut Report,
    dev: &Backend,
    op: &'static str,
    case: String,
    make: impl FnOnce() -> Result<B>,
) {
    let row = |dir, outcome| Row {
        op,
        case: case.clone(),
        dir,
        outcome,
    };
    let fwd = make().and_then(|b| {
        let (f, m) = measure(
            dev,
            (b.work(Dir::Fwd), FWD_TOL),
            || b.forward(),
            |f| b.forward_again(f),
            |f| b.check_forward(f),
        )?;
        Ok((b, f, m))
    });
    let (b, f) = match fwd {
        Ok((b, f, m)) => {
            r.push(row(Dir::Fwd, Ok(m)));
            (b, f)
        }
        Err(e) => return r.push(row(Dir::Fwd, Err(e.to_string()))),
    };
    let bwd = measure(
        dev,
        (b.work(Dir::Bwd), BWD_TOL),
        || b.backward(&f),
        |g| b.backward_again(&f, g),
        |g| b.check_backward(&f, g),
    );
    r.push(row(
        Dir::Bwd,
        bwd.map(|(_, m)| m).map_err(|e| e.to_string()),
    ));
}

/// Times `run` (see [`Backend::timed`]) and, on the GPU, checks its outputs.
fn measure<T>(
    dev: &Backend,
    (work, tol): (Work, f64),
    run: impl FnOnce() -> Result<T>,
    again: impl FnMut(&T) -> Result<()>,
    check: impl FnOnce(&T) -> Result<f64>,
) -> Result<(T, Measured)> {
    let (out, secs) = dev.timed(run, again)?;
    let err = if dev.checks() {
        Some(check(&out)?)
    } else {
        None
    };
    Ok((
        out,
        Measured {
            secs,
            work,
            err,
            tol,
        },
    ))
}

/// ||got - want|| / ||want|| (NaN when got holds a NaN or the shapes differ).
pub fn rel_l2(got: &HostTensor, want: &HostTensor) -> f64 {
    if got.shape() != want.shape() {
        return f64::NAN;
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.to_f32_vec().iter().zip(want.to_f32_vec()) {
        num += f64::from(g - w).powi(2);
        den += f64::from(w).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// The largest error of several (NaN wins: a NaN output must not pass).
pub fn worst(errors: impl IntoIterator<Item = f64>) -> f64 {
    errors
        .into_iter()
        .fold(0.0, |m, e| if e.is_nan() || e > m { e } else { m })
}

/// `(got, want)` pairs of host tensors compared by [`rel_l2`]; the worst error.
pub fn worst_of(pairs: &[(&HostTensor, &HostTensor)]) -> f64 {
    worst(pairs.iter().map(|(g, w)| rel_l2(g, w)))
}

/// Deterministic pseudo-random values in [-1, 1) (xorshift), so runs are comparable;
/// zero at the flat indices where `keep` is false.
pub fn random_where(
    shape: &[usize],
    seed: u64,
    keep: impl Fn(usize) -> bool,
) -> Result<HostTensor> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    HostTensor::from_fn(DType::BF16, shape, |i| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let x = (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
        if keep(i) {
            x
        } else {
            0.0
        }
    })
}

/// bf16 tensors of the given shapes, random (seeds 1, 2, ...).
pub fn random_inputs<const N: usize>(shapes: [&[usize]; N]) -> Result<[HostTensor; N]> {
    let mut out = Vec::with_capacity(N);
    for (seed, shape) in (1..).zip(shapes) {
        out.push(random_where(shape, seed, |_| true)?);
    }
    Ok(out.try_into().expect("one per shape"))
}

/// `ts` where `dev`'s ops read them.
pub fn put_all<const N: usize>(dev: &Backend, ts: &[HostTensor; N]) -> Result<[Tensor; N]> {
    let mut out = Vec::with_capacity(N);
    for t in ts {
        out.push(dev.put(t)?);
    }
    Ok(out.try_into().expect("one per input"))
}

/// A random bf16 tensor of logical shape (N, C, H, W) stored NCHW, or NHWC when
/// `channels_last` (as torch's channels_last: strides, no copy); zero on the images
/// (indices along N) that `keep` rejects.
pub fn random_image_batch(
    [n, c, h, w]: [usize; 4],
    channels_last: bool,
    seed: u64,
    keep: impl Fn(usize) -> bool,
) -> Result<HostTensor> {
    let image = c * h * w;
    let keep_flat = |i: usize| keep(i / image);
    if !channels_last {
        return random_where(&[n, c, h, w], seed, keep_flat);
    }
    let mem = random_where(&[n, h, w, c], seed, keep_flat)?;
    HostTensor::from_data(
        mem.data().clone(),
        Layout {
            shape: vec![n, c, h, w],
            strides: vec![h * w * c, 1, w * c, c],
        },
    )
}

/// A contiguous f32 tensor of `shape` (rank <= 4) whose element at index i is `t` at
/// `source(i)` (the first `t.shape().len()` entries): slices, gathers, reshapes.
pub fn gather(
    t: &HostTensor,
    shape: &[usize],
    source: impl Fn(&[usize]) -> [usize; 4],
) -> Result<HostTensor> {
    let strides = Layout::contiguous(shape).strides;
    let rank = t.shape().len();
    let mut index = vec![0; shape.len()];
    HostTensor::from_fn(DType::F32, shape, |flat| {
        for ((i, &s), &n) in index.iter_mut().zip(&strides).zip(shape) {
            *i = flat / s % n;
        }
        t.get(&source(&index)[..rank])
            .expect("a gathered index lies inside the tensor")
    })
}

/// The entries `picks` of dimension 0 of a rank-4 tensor, as contiguous f32.
pub fn select_dim0(t: &HostTensor, picks: &[usize]) -> Result<HostTensor> {
    let mut shape = t.shape().to_vec();
    shape[0] = picks.len();
    gather(t, &shape, |i| [picks[i[0]], i[1], i[2], i[3]])
}

/// The first and the last of `0..n` (the checks' cheap slices: the first and last image
/// or head, so both ends of every offset computation are exercised).
pub fn ends(n: usize) -> Vec<usize> {
    if n > 1 {
        vec![0, n - 1]
    } else {
        vec![0]
    }
}

/// The device tensors behind `ts`, or an error when one of them lives on the host.
#[cfg(any(feature = "cuda", feature = "emulator"))]
pub fn on_device<const N: usize>(ts: [&Tensor; N]) -> Result<[&DeviceTensor; N]> {
    let mut out = Vec::with_capacity(N);
    for t in ts {
        match t {
            Tensor::Cuda(d) => out.push(d),
            Tensor::Host(_) => {
                return Err(Error::InvalidArgument(
                    "the GPU timing loop got a host tensor".into(),
                ))
            }
        }
    }
    Ok(out.try_into().expect("one per input"))
}
