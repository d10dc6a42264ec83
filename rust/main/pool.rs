//! max_pool2d and avg_pool2d, forward and backward, on NCHW and channels-last (NHWC)
//! inputs. Memory-bound: the throughput column is GB/s of tensors read and written.
//!
//! GPU check: the first and the last image (pooling never mixes images). The backward's
//! reference routes dy through the reference's own argmax, so wrong GPU indices show.

use flashkernels::pool::{self, Indices, Pool2dOptions, Pool2dProblem, PoolKind};
use flashkernels::{HostTensor, Result, Tensor};

use crate::bench::{
    ends, put_all, random_image_batch, run_case, select_dim0, worst_of, Backend, OpBench,
};
use crate::report::{Dir, Report, Work};

struct Case {
    kind: PoolKind,
    /// x as (N, C, H, W).
    x: [usize; 4],
    /// Square window, stride and padding.
    kernel: usize,
    stride: usize,
    pad: usize,
    nhwc: bool,
}

/// `full`: ResNet's stem max pool and a DenseNet transition's average pool at batch 32;
/// otherwise small shapes.
fn cases(full: bool) -> Vec<Case> {
    let (max_x, avg_x) = if full {
        ([32, 64, 112, 112], [32, 256, 56, 56])
    } else {
        ([2, 8, 17, 15], [2, 8, 16, 16])
    };
    let shapes = [
        (PoolKind::Max, max_x, 3, 2, 1),
        (PoolKind::Avg, avg_x, 2, 2, 0),
    ];
    shapes
        .into_iter()
        .flat_map(|(kind, x, kernel, stride, pad)| {
            [true, false].map(|nhwc| Case {
                kind,
                x,
                kernel,
                stride,
                pad,
                nhwc,
            })
        })
        .collect()
}

impl Case {
    fn op(&self) -> &'static str {
        match self.kind {
            PoolKind::Max => "max_pool2d",
            PoolKind::Avg => "avg_pool2d",
        }
    }

    fn describe(&self) -> String {
        let [n, c, h, w] = self.x;
        format!(
            "N{n} C{c} {h}x{w} {k}x{k} s{} p{} {}",
            self.stride,
            self.pad,
            if self.nhwc { "NHWC" } else { "NCHW" },
            k = self.kernel,
        )
    }
}

/// Runs every pooling case.
pub fn run(dev: &Backend, full: bool, r: &mut Report) {
    for c in cases(full) {
        run_case(r, dev, c.op(), c.describe(), || Pool::new(dev, &c));
    }
}

struct Pool {
    opts: Pool2dOptions,
    problem: Pool2dProblem,
    /// x and dy on the host and where the backend reads them.
    host: [HostTensor; 2],
    put: [Tensor; 2],
}

impl Pool {
    fn new(dev: &Backend, c: &Case) -> Result<Self> {
        let opts = Pool2dOptions {
            stride: Some([c.stride; 2]),
            padding: [c.pad; 2],
            ..Pool2dOptions::new([c.kernel; 2])
        };
        let x = random_image_batch(c.x, c.nhwc, 1, |_| true)?;
        let problem = pool::validate_pool(c.kind, (x.dtype(), x.layout()), &opts)?;
        let y_shape = <[usize; 4]>::try_from(problem.y_shape()).expect("rank 4");
        let host = [x, random_image_batch(y_shape, c.nhwc, 2, |_| true)?];
        Ok(Pool {
            opts,
            problem,
            put: put_all(dev, &host)?,
            host,
        })
    }

    /// Tensor `t` (x, y, dy or dx) on the checked images.
    fn checked(&self, t: &HostTensor) -> Result<HostTensor> {
        select_dim0(t, &ends(self.problem.n))
    }
}

/// The device address of max pooling's indices (0 for average pooling).
#[cfg(any(feature = "cuda", feature = "emulator"))]
#[cfg(any(feature = "cuda", feature = "emulator"))]
fn indices_view(indices: &Option<Indices>) -> Option<pool::cuda::IndicesView> {
    match indices {
        Some(Indices::Cuda(d)) => Some(d.view()),
        _ => None,
    }
}

impl OpBench for Pool {
    /// y, and the argmax indices of max pooling.
    type Fwd = (Tensor, Option<Indices>);
    /// dx.
    type Bwd = Tensor;

    fn forward(&self) -> Result<Self::Fwd> {
        let x = &self.put[0];
        let kind = self.problem.kind;
        let o = pool::forward(&pool::Inputs { x, kind }, &self.opts)?;
        Ok((o.y, o.indices))
    }

    fn backward(&self, (_, indices): &Self::Fwd) -> Result<Tensor> {
        let [x, dy] = &self.put;
        match indices {
            Some(i) => pool::backward(&pool::BackwardInputs::max(x, dy, i), &self.opts),
            None => pool::backward(&pool::BackwardInputs::avg(x, dy), &self.opts),
        }
    }

    #[cfg(any(feature = "cuda", feature = "emulator"))]
    fn forward_again(&self, (y, indices): &Self::Fwd) -> Result<()> {
        let [x, y] = crate::bench::on_device([&self.put[0], y])?;
        // SAFETY: views of live device tensors on one stream; y and the indices were
        // allocated by the forward for this problem and overlap nothing else.
        unsafe {
            pool::cuda::pool2d_forward_views(
                self.problem.kind,
                &x.view(),
                &y.view(),
                indices_view(indices).as_ref(),
                &self.opts,
                x.stream().raw(),
            )
        }
    }

    #[cfg(any(feature = "cuda", feature = "emulator"))]
    fn backward_again(&self, (_, indices): &Self::Fwd, dx: &Tensor) -> Result<()> {
        let [x, dy] = &self.put;
        let [x, dy, dx] = crate::bench::on_device([x, dy, dx])?;
        // SAFETY: as in `forward_again`; dx was allocated by the backward.
        unsafe {
            pool::cuda::pool2d_backward_views(
                self.problem.kind,
                (x.dtype(), x.layout()),
                &dy.view(),
                indices_view(indices).as_ref(),
                &dx.view(),
                &self.opts,
                x.stream().raw(),
            )
        }
    }

    fn check_forward(&self, (y, _): &Self::Fwd) -> Result<f64> {
        let x = self.checked(&self.host[0])?;
        let want = match self.problem.kind {
            PoolKind::Max => pool::forward(&pool::Inputs::max(&x), &self.opts)?.y,
            PoolKind::Avg => pool::forward(&pool::Inputs::avg(&x), &self.opts).map(|o| o.y)?,
        };
        Ok(worst_of(&[(&self.checked(&y.to_host()?)?, &want)]))
    }

    fn check_backward(&self, _: &Self::Fwd, dx: &Tensor) -> Result<f64> {
        let [x, dy] = &self.host;
        let (x, dy) = (self.checked(x)?, self.checked(dy)?);
        let want = match self.problem.kind {
            PoolKind::Max => {
                let indices = pool::forward(&pool::Inputs::max(&x), &self.opts)?
                    .max_indices()?
                    .to_host()?;
                pool::backward(
                    &pool::BackwardInputs::max(&x, &dy, &pool::Indices::Host(indices.to_vec())),
                    &self.opts,
                )?
            }
            PoolKind::Avg => pool::backward(&pool::BackwardInputs::avg(&x, &dy), &self.opts)?,
        };
        Ok(worst_of(&[(&self.checked(&dx.to_host()?)?, &want)]))
    }

    fn work(&self, _: Dir) -> Work {
        let p = &self.problem;
        let elem = p.dtype.size() as f64;
        let (x, y) = (
            (p.n * p.c * p.h * p.w) as f64,
            (p.n * p.c * p.p * p.q) as f64,
        );
        // int32 argmax indices: written by the forward, read by the backward.
        let indices = if p.kind == PoolKind::Max {
            4.0 * y
        } else {
            0.0
        };
        // Forward: read x, write y; backward: read dy, write dx.
        Work::Bytes((x + y) * elem + indices)
    }
}
