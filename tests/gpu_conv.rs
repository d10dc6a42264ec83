//! The CUDA convolution and pooling kernels against the CPU reference. Every test needs a
//! GPU: they are ignored by default; run them with
//! `cargo test --test gpu_conv -- --ignored` on a machine with one. Without a GPU an
//! ignored run fails loudly instead of passing.
#![cfg(any(feature = "cuda", feature = "emulator"))]

mod common;

use common::{gpu_stream, Rng};
use flashkernels::conv::{self, cuda, Activation, Conv2dOptions, ConvAlgo, ConvGrads};
use flashkernels::pool::{self, Pool2dOptions, PoolKind};
use flashkernels::{DType, DeviceTensor, HostTensor, Layout, Stream, Tensor};

/// A random (N, C, H, W)-logical host tensor in `dtype`, stored NCHW or NHWC.
fn tensor(
    rng: &mut Rng,
    dtype: DType,
    [n, c, h, w]: [usize; 4],
    nhwc: bool,
    scale: f32,
) -> HostTensor {
    let mem_shape = if nhwc { [n, h, w, c] } else { [n, c, h, w] };
    let mem = HostTensor::from_fn(dtype, &mem_shape, |_| rng.normal() * scale).unwrap();
    let strides = if nhwc {
        vec![h * w * c, 1, w * c, c]
    } else {
        Layout::contiguous(&[n, c, h, w]).strides
    };
    HostTensor::from_data(
        mem.data().clone(),
        Layout {
            shape: vec![n, c, h, w],
            strides,
        },
    )
    .unwrap()
}

fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5, // f32 on CUDA cores (no TF32): accumulation order only
        DType::F16 => 2e-3,
        DType::BF16 => 1.6e-2,
    }
}

/// Max |got - want| relative to max |want|.
fn rel_err(got: &HostTensor, want: &HostTensor) -> f64 {
    assert_eq!(got.shape(), want.shape());
    let (g, w) = (got.to_f32_vec(), want.to_f32_vec());
    assert!(
        g.iter().all(|v| v.is_finite()),
        "non-finite output (an unwritten element?)"
    );
    let scale = w.iter().fold(1e-6f32, |m, v| m.max(v.abs())) as f64;
    g.iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs() as f64)
        .fold(0.0, f64::max)
        / scale
}

#[derive(Debug, Clone, Copy)]
struct Case {
    x: [usize; 4],
    k: usize,
    rs: [usize; 2],
    opts: Conv2dOptions,
}

fn case(
    x: [usize; 4],
    k: usize,
    rs: [usize; 2],
    stride: usize,
    pad: usize,
    dil: usize,
    groups: usize,
) -> Case {
    Case {
        x,
        k,
        rs,
        opts: Conv2dOptions {
            stride: [stride; 2],
            padding: [pad; 2],
            dilation: [dil; 2],
            groups,
            ..Conv2dOptions::default()
        },
    }
}

fn cases() -> Vec<Case> {
    vec![
        case([2, 64, 16, 16], 64, [3, 3], 1, 1, 1, 1),
        case([2, 32, 28, 28], 64, [1, 1], 1, 0, 1, 1),
        case([1, 16, 33, 31], 64, [7, 7], 2, 3, 1, 1),
        case([2, 64, 14, 14], 64, [3, 3], 1, 1, 1, 64), // depthwise
        case([2, 64, 12, 12], 128, [3, 3], 2, 1, 1, 4), // grouped
        case([1, 32, 17, 19], 32, [3, 3], 1, 2, 2, 1),  // dilated
        case([3, 3, 24, 24], 16, [3, 3], 1, 1, 1, 1),   // stem: 3 channels
    ]
}

/// Whether a forced `algo` may refuse this case (fk_conv2d_supports, conv_api.cu): f32
/// runs the direct kernel and im2col runs every layout, but the f16 / bf16 implicit GEMM
/// gathers 16 bytes along C, so it needs NHWC (unit channel stride, the other strides
/// multiples of 8) and C / groups a multiple of 8. Any other refusal is a failure.
fn may_refuse(c: &Case, dtype: DType, nhwc: bool, algo: Option<ConvAlgo>) -> bool {
    let cg = c.x[1] / c.opts.groups;
    algo == Some(ConvAlgo::ImplicitGemm) && dtype != DType::F32 && !(nhwc && cg % 8 == 0)
}

/// The forward of one case on the GPU against the CPU reference. A forced algorithm may
/// refuse a case only where [`may_refuse`] says so, and then with a typed refusal, never a
/// wrong answer (returns false); any other refusal fails the test.
#[allow(clippy::too_many_arguments)] // one case's full description
fn check_forward(
    s: &Stream,
    rng: &mut Rng,
    c: &Case,
    dtype: DType,
    nhwc: bool,
    act: Activation,
    with_bias: bool,
    algo: Option<ConvAlgo>,
) -> bool {
    let opts = Conv2dOptions {
        activation: act,
        algo,
        ..c.opts
    };
    let cg = c.x[1] / opts.groups;
    let x = tensor(rng, dtype, c.x, nhwc, 1.0);
    let wscale = 1.0 / ((cg * c.rs[0] * c.rs[1]) as f32).sqrt();
    let w = tensor(rng, dtype, [c.k, cg, c.rs[0], c.rs[1]], nhwc, wscale);
    let b = HostTensor::from_fn(dtype, &[c.k], |i| (i as f32 * 0.1).sin()).unwrap();
    let want = conv::forward(
        &conv::Inputs::new(&x, &w)
            .bias(with_bias.then_some(&b))
            .keep_pre(true),
        &opts,
    )
    .unwrap();
    let dev = |t: &HostTensor| DeviceTensor::from_host(s, t).unwrap();
    let bd = dev(&b);
    let got = match cuda::conv2d_forward(&dev(&x), &dev(&w), with_bias.then_some(&bd), &opts, true)
    {
        Ok(o) => o,
        Err(flashkernels::Error::Unsupported(msg))
            if algo.is_some() && may_refuse(c, dtype, nhwc, algo) =>
        {
            eprintln!("expected refusal {c:?} {dtype} nhwc={nhwc} {algo:?}: {msg}");
            return false;
        }
        Err(e) => panic!("{c:?} {dtype} nhwc={nhwc} {act:?} {algo:?}: {e}"),
    };
    let err = rel_err(&got.y.to_host().unwrap(), &want.y);
    let err_pre = rel_err(
        &got.y_pre.unwrap().to_host().unwrap(),
        want.y_pre.as_ref().unwrap(),
    );
    assert!(
        err <= tol(dtype) && err_pre <= tol(dtype),
        "{c:?} {dtype} nhwc={nhwc} {act:?} {algo:?}: rel err {err} / {err_pre}"
    );
    true
}

/// dx, dweight and dbias of one case on the GPU against the CPU reference.
fn check_backward(s: &Stream, rng: &mut Rng, c: &Case, dtype: DType, nhwc: bool) {
    let cg = c.x[1] / c.opts.groups;
    let x = tensor(rng, dtype, c.x, nhwc, 1.0);
    let w = tensor(rng, dtype, [c.k, cg, c.rs[0], c.rs[1]], nhwc, 0.2);
    let p = conv::validate((dtype, x.layout()), (dtype, w.layout()), None, &c.opts).unwrap();
    let dy = tensor(rng, dtype, p.y_shape().try_into().unwrap(), nhwc, 1.0);
    let want = conv::backward(&conv::BackwardInputs::new(&x, &w, &dy), &c.opts).unwrap();
    let dev = |t: &HostTensor| DeviceTensor::from_host(s, t).unwrap();
    let got = cuda::conv2d_backward(&dev(&x), &dev(&w), &dev(&dy), &c.opts, ConvGrads::ALL)
        .unwrap_or_else(|e| panic!("{c:?} {dtype} nhwc={nhwc}: {e}"));
    for (name, g, w) in [
        ("dx", got.dx.unwrap(), want.dx.unwrap()),
        ("dweight", got.dweight.unwrap(), want.dweight.unwrap()),
        ("dbias", got.dbias.unwrap(), want.dbias.unwrap()),
    ] {
        let err = rel_err(&g.to_host().unwrap(), &w);
        // Gradients sum over many more terms than the forward.
        assert!(
            err <= 4.0 * tol(dtype),
            "{name} {c:?} {dtype} nhwc={nhwc}: rel err {err}"
        );
    }
}

/// Max or average pooling, forward and backward, on the GPU against the CPU reference.
/// For combinations torch does not define (dilated average pooling, average-only options
/// on max pooling) asserts that both devices refuse them, and returns false.
fn check_pool(
    s: &Stream,
    rng: &mut Rng,
    kind: PoolKind,
    opts: &Pool2dOptions,
    dtype: DType,
    nhwc: bool,
) -> bool {
    let x = tensor(rng, dtype, [2, 24, 17, 15], nhwc, 1.0);
    let xd = Tensor::Cuda(DeviceTensor::from_host(s, &x).unwrap());
    let xh = Tensor::Host(x.clone());
    let avg_ok = opts.dilation == [1, 1];
    let max_ok = opts.divisor_override.is_none() && opts.count_include_pad;
    if (kind == PoolKind::Avg && !avg_ok) || (kind == PoolKind::Max && !max_ok) {
        for x in [&xd, &xh] {
            let e = match kind {
                PoolKind::Max => pool::forward(&pool::Inputs::max(x), opts).map(|_| ()),
                PoolKind::Avg => pool::forward(&pool::Inputs::avg(x), opts)
                    .map(|o| o.y)
                    .map(|_| ()),
            };
            assert!(
                matches!(e, Err(flashkernels::Error::InvalidArgument(_))),
                "{kind:?} {opts:?}: want InvalidArgument, got {e:?}"
            );
        }
        return false;
    }
    let p = pool::validate_pool(kind, (dtype, x.layout()), opts).unwrap();
    let dy = tensor(rng, dtype, p.y_shape().try_into().unwrap(), false, 1.0);
    let dyd = Tensor::Cuda(DeviceTensor::from_host(s, &dy).unwrap());
    let dyh = Tensor::Host(dy);
    let (y, yh, dx, dxh) = match kind {
        PoolKind::Max => {
            let g = pool::forward(&pool::Inputs::max(&xd), opts).unwrap();
            let h = pool::forward(&pool::Inputs::max(&xh), opts).unwrap();
            assert_eq!(
                g.max_indices().unwrap().to_host().unwrap(),
                h.max_indices().unwrap().to_host().unwrap(),
                "{opts:?} {dtype}"
            );
            let dx = pool::backward(
                &pool::BackwardInputs::max(&xd, &dyd, g.max_indices().unwrap()),
                opts,
            )
            .unwrap();
            let dxh = pool::backward(
                &pool::BackwardInputs::max(&xh, &dyh, h.max_indices().unwrap()),
                opts,
            )
            .unwrap();
            (g.y, h.y, dx, dxh)
        }
        PoolKind::Avg => (
            pool::forward(&pool::Inputs::avg(&xd), opts)
                .map(|o| o.y)
                .unwrap(),
            pool::forward(&pool::Inputs::avg(&xh), opts)
                .map(|o| o.y)
                .unwrap(),
            pool::backward(&pool::BackwardInputs::avg(&xd, &dyd), opts).unwrap(),
            pool::backward(&pool::BackwardInputs::avg(&xh, &dyh), opts).unwrap(),
        ),
    };
    let ey = rel_err(&y.to_host().unwrap(), &yh.to_host().unwrap());
    let edx = rel_err(&dx.to_host().unwrap(), &dxh.to_host().unwrap());
    assert!(
        ey <= tol(dtype) && edx <= tol(dtype),
        "{kind:?} {opts:?} {dtype} nhwc={nhwc}: {ey} {edx}"
    );
    true
}

const ACTIVATIONS: [Activation; 4] = [
    Activation::None,
    Activation::Relu,
    Activation::Gelu,
    Activation::Silu,
];

#[test]
#[ignore = "needs a CUDA device"]
fn conv_forward_matches_reference() {
    let s = gpu_stream();
    let mut rng = Rng::new(7);
    let (mut implicit_runs, mut implicit_must_run) = (0, 0);
    for c in cases() {
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            for nhwc in [false, true] {
                for (ai, act) in ACTIVATIONS.into_iter().enumerate() {
                    for algo in [None, Some(ConvAlgo::Im2col), Some(ConvAlgo::ImplicitGemm)] {
                        let ran =
                            check_forward(&s, &mut rng, &c, dtype, nhwc, act, ai % 2 == 0, algo);
                        // check_forward fails on any refusal may_refuse does not allow.
                        assert!(ran || may_refuse(&c, dtype, nhwc, algo));
                        if algo == Some(ConvAlgo::ImplicitGemm) && dtype != DType::F32 {
                            implicit_runs += usize::from(ran);
                            implicit_must_run += usize::from(!may_refuse(&c, dtype, nhwc, algo));
                        }
                    }
                }
            }
        }
    }
    // The half-precision implicit GEMM ran on every NHWC case with C / groups % 8 == 0:
    // five of the seven cases (not the depthwise nor the 3-channel stem), two dtypes,
    // four activations.
    assert_eq!(implicit_must_run, 5 * 2 * 4);
    assert!(
        implicit_runs >= implicit_must_run,
        "implicit GEMM ran {implicit_runs} of {implicit_must_run} cases it supports"
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn conv_backward_matches_reference() {
    let s = gpu_stream();
    let mut rng = Rng::new(11);
    for c in cases() {
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            for nhwc in [false, true] {
                check_backward(&s, &mut rng, &c, dtype, nhwc);
            }
        }
    }
}

fn pool_configs() -> [Pool2dOptions; 5] {
    [
        Pool2dOptions {
            stride: Some([2, 2]),
            padding: [1, 1],
            ..Pool2dOptions::new([3, 3])
        },
        Pool2dOptions {
            ceil_mode: true,
            ..Pool2dOptions::new([2, 2])
        },
        Pool2dOptions {
            stride: Some([1, 2]),
            dilation: [2, 1],
            ..Pool2dOptions::new([3, 2])
        },
        Pool2dOptions {
            padding: [1, 1],
            count_include_pad: false,
            ceil_mode: true,
            ..Pool2dOptions::new([3, 3])
        },
        Pool2dOptions {
            divisor_override: Some(5),
            ..Pool2dOptions::new([2, 3])
        },
    ]
}

#[test]
#[ignore = "needs a CUDA device"]
fn pooling_matches_reference() {
    let s = gpu_stream();
    let mut rng = Rng::new(13);
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        for nhwc in [false, true] {
            let mut checked = 0;
            for opts in pool_configs() {
                for kind in [PoolKind::Max, PoolKind::Avg] {
                    checked += usize::from(check_pool(&s, &mut rng, kind, &opts, dtype, nhwc));
                }
            }
            // Refused (asserted in check_pool): max pooling with count_include_pad false or
            // a divisor, average pooling with dilation; the other 7 are compared.
            assert_eq!(checked, 7, "{dtype} nhwc={nhwc}");
        }
    }
}

/// One small case of every conv and pooling kernel (both algorithms, the f32 direct path,
/// backward, max and avg pooling): what `gpu_check.sh quick` runs under compute-sanitizer.
#[test]
#[ignore = "needs a CUDA device"]
fn smoke() {
    let s = gpu_stream();
    let mut rng = Rng::new(17);
    let c = case([1, 16, 9, 11], 24, [3, 3], 2, 1, 1, 1);
    let grouped = case([1, 32, 7, 7], 32, [3, 3], 1, 1, 1, 4);
    for (c, dtype, nhwc, algo) in [
        (&c, DType::BF16, true, ConvAlgo::ImplicitGemm),
        (&c, DType::F16, false, ConvAlgo::Im2col),
        (&grouped, DType::BF16, true, ConvAlgo::ImplicitGemm),
    ] {
        assert!(
            check_forward(
                &s,
                &mut rng,
                c,
                dtype,
                nhwc,
                Activation::Gelu,
                true,
                Some(algo)
            ),
            "{c:?}: {algo:?} refused a case it supports"
        );
    }
    check_forward(
        &s,
        &mut rng,
        &c,
        DType::F32,
        false,
        Activation::Relu,
        true,
        None,
    );
    check_backward(&s, &mut rng, &c, DType::BF16, true);
    check_backward(&s, &mut rng, &c, DType::F32, false);
    let opts = pool_configs()[0];
    for kind in [PoolKind::Max, PoolKind::Avg] {
        assert!(check_pool(&s, &mut rng, kind, &opts, DType::BF16, true));
    }
}
