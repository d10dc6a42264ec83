//! conv2d forward (bias and ReLU fused) and backward (dx, dweight, dbias), with each
//! algorithm forced: the implicit GEMM on NHWC (channels-last) tensors, im2col on NCHW.
//!
//! GPU check: the last image (the largest offsets; the f64 reference is slow). The
//! forward's images are independent; the upstream gradient is zero on every other image,
//! so the kernels' dweight and dbias (sums over the batch) equal the reference's on that
//! image, exactly.

use flashkernels::conv::{self, Activation, Conv2dOptions, Conv2dProblem, ConvAlgo};
use flashkernels::{DType, HostTensor, Result, Tensor};

use crate::bench::{
    put_all, random_image_batch, random_inputs, run_case, select_dim0, worst_of, Backend, OpBench,
};
use crate::report::{Dir, Report, Work};

struct Case {
    /// x as (N, C, H, W).
    x: [usize; 4],
    /// Output channels.
    k: usize,
    /// Square filter size, stride and padding.
    rs: usize,
    stride: usize,
    pad: usize,
    /// Channels-last tensors and the implicit GEMM (else NCHW and im2col).
    nhwc: bool,
}

/// `full`: ResNet-50 layers at batch 32; otherwise small shapes.
fn cases(full: bool) -> Vec<Case> {
    let shapes = if full {
        [
            ([32, 64, 56, 56], 64, 3, 1, 1),
            ([32, 256, 56, 56], 512, 1, 2, 0),
        ]
    } else {
        [
            ([2, 16, 16, 16], 32, 3, 1, 1),
            ([2, 32, 12, 12], 64, 1, 2, 0),
        ]
    };
    [true, false]
        .into_iter()
        .flat_map(|nhwc| {
            shapes.map(|(x, k, rs, stride, pad)| Case {
                x,
                k,
                rs,
                stride,
                pad,
                nhwc,
            })
        })
        .collect()
}

impl Case {
    fn describe(&self) -> String {
        let [n, c, h, w] = self.x;
        format!(
            "N{n} C{c} {h}x{w} K{} {r}x{r} s{} p{} {}",
            self.k,
            self.stride,
            self.pad,
            if self.nhwc {
                "NHWC implicit-gemm"
            } else {
                "NCHW im2col"
            },
            r = self.rs,
        )
    }
}

/// Runs every conv2d case.
pub fn run(dev: &Backend, full: bool, r: &mut Report) {
    for c in cases(full) {
        run_case(r, dev, "conv2d", c.describe(), || Conv::new(dev, &c));
    }
}

struct Conv {
    opts: Conv2dOptions,
    problem: Conv2dProblem,
    /// x, weight, bias, dy on the host and where the backend reads them.
    host: [HostTensor; 4],
    put: [Tensor; 4],
}

impl Conv {
    fn new(dev: &Backend, c: &Case) -> Result<Self> {
        let opts = Conv2dOptions {
            stride: [c.stride; 2],
            padding: [c.pad; 2],
            activation: Activation::Relu,
            algo: Some(if c.nhwc {
                ConvAlgo::ImplicitGemm
            } else {
                ConvAlgo::Im2col
            }),
            ..Conv2dOptions::default()
        };
        let x = random_image_batch(c.x, c.nhwc, 1, |_| true)?;
        let w = random_image_batch([c.k, c.x[1], c.rs, c.rs], c.nhwc, 2, |_| true)?;
        let [bias] = random_inputs([&[c.k]])?;
        let problem = conv::validate(
            (x.dtype(), x.layout()),
            (w.dtype(), w.layout()),
            Some((bias.dtype(), bias.layout())),
            &opts,
        )?;
        let checked = problem.n - 1;
        let [n, k, p, q] = <[usize; 4]>::try_from(problem.y_shape()).expect("rank 4");
        let dy = random_image_batch([n, k, p, q], c.nhwc, 4, |image| image == checked)?;
        let host = [x, w, bias, dy];
        Ok(Conv {
            opts,
            problem,
            put: put_all(dev, &host)?,
            host,
        })
    }

    /// The checked image (as a list of one).
    fn image(&self) -> [usize; 1] {
        [self.problem.n - 1]
    }

    /// The inputs the reference takes: x and dy on the checked image, f32.
    fn checked(&self) -> Result<[HostTensor; 4]> {
        let [x, w, bias, dy] = &self.host;
        Ok([
            select_dim0(x, &self.image())?,
            w.to_contiguous(DType::F32),
            bias.to_contiguous(DType::F32),
            select_dim0(dy, &self.image())?,
        ])
    }
}

impl OpBench for Conv {
    /// y.
    type Fwd = Tensor;
    /// dx, dweight, dbias.
    type Bwd = [Tensor; 3];

    fn forward(&self) -> Result<Tensor> {
        let [x, w, bias, _] = &self.put;
        Ok(conv::forward(&conv::Inputs::new(x, w).bias(Some(bias)), &self.opts)?.y)
    }

    fn backward(&self, _y: &Tensor) -> Result<[Tensor; 3]> {
        let [x, w, _, dy] = &self.put;
        let g = conv::backward(&conv::BackwardInputs::new(x, w, dy), &self.opts)?;
        let all = "every gradient was asked for";
        Ok([g.dx.expect(all), g.dweight.expect(all), g.dbias.expect(all)])
    }

    #[cfg(any(feature = "cuda", feature = "emulator"))]
    fn forward_again(&self, y: &Tensor) -> Result<()> {
        let [x, w, bias, _] = &self.put;
        let t = crate::bench::on_device([x, w, bias, y])?;
        let [x, w, bias, y] = t.map(flashkernels::DeviceTensor::view);
        // SAFETY: views of live device tensors on one stream; y was allocated by the
        // forward for this problem and overlaps no input.
        unsafe {
            conv::cuda::conv2d_forward_views(
                &x,
                &w,
                Some(&bias),
                &y,
                None,
                &self.opts,
                t[0].stream().raw(),
            )
        }
    }

    #[cfg(any(feature = "cuda", feature = "emulator"))]
    fn backward_again(&self, _y: &Tensor, [dx, dw, db]: &[Tensor; 3]) -> Result<()> {
        let [x, w, _, dy] = &self.put;
        let t = crate::bench::on_device([x, w, dy, dx, dw, db])?;
        let [x, w, dy, dx, dw, db] = t.map(flashkernels::DeviceTensor::view);
        // SAFETY: as in `forward_again`; the gradients were allocated by the backward.
        unsafe {
            conv::cuda::conv2d_backward_views(
                [&x, &w, &dy],
                [Some(&dx), Some(&dw), Some(&db)],
                &self.opts,
                t[0].stream().raw(),
            )
        }
    }

    fn check_forward(&self, y: &Tensor) -> Result<f64> {
        let [x, w, bias, _] = self.checked()?;
        let want = conv::forward(&conv::Inputs::new(&x, &w).bias(Some(&bias)), &self.opts)?.y;
        let got = select_dim0(&y.to_host()?, &self.image())?;
        Ok(worst_of(&[(&got, &want)]))
    }

    fn check_backward(&self, _y: &Tensor, [dx, dw, db]: &[Tensor; 3]) -> Result<f64> {
        let [x, w, _, dy] = self.checked()?;
        let want = conv::backward(&conv::BackwardInputs::new(&x, &w, &dy), &self.opts)?;
        let all = "every gradient was asked for";
        let dx = select_dim0(&dx.to_host()?, &self.image())?;
        Ok(worst_of(&[
            (&dx, &want.dx.expect(all)),
            (&dw.to_host()?, &want.dweight.expect(all)),
            (&db.to_host()?, &want.dbias.expect(all)),
        ]))
    }

    fn work(&self, dir: Dir) -> Work {
        let fwd = self.problem.flops();
        // dx and dweight are each a GEMM of the forward's size.
        Work::Flops(match dir {
            Dir::Fwd => fwd,
            Dir::Bwd => 2.0 * fwd,
        })
    }
}
