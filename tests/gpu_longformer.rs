//! The Longformer CUDA passes (forward and backward) against the CPU reference on the same
//! rounded inputs, and against Hugging Face's golden fixtures. The reference itself is
//! checked against an independent dense definition and finite differences
//! (tests/longformer.rs). Every test needs a GPU: run with
//! `cargo test --test gpu_longformer -- --ignored`.
#![cfg(any(feature = "cuda", feature = "emulator"))]

mod common;

use common::{gpu_stream, round_to, Rng};
use flashkernels::longformer::{
    self, cuda, GlobalProjections, LongformerGradients, LongformerOptions, TokenMask,
};
use flashkernels::{DType, DeviceTensor, Error, HostTensor, Stream};

#[derive(Debug, Clone)]
struct Case {
    dims: [usize; 4],
    dtype: DType,
    window: usize,
    dilation: Vec<usize>,
    causal: bool,
    /// Separate global projections Q_g, K_g, V_g.
    separate: bool,
    /// Per sequence: global token positions, padded token positions.
    globals: Vec<Vec<usize>>,
    padded: Vec<Vec<usize>>,
}

impl Case {
    fn new(dims: [usize; 4], window: usize, dilation: &[usize]) -> Self {
        Case {
            dims,
            dtype: DType::BF16,
            window,
            dilation: dilation.to_vec(),
            causal: false,
            separate: true,
            globals: vec![Vec::new(); dims[0]],
            padded: vec![Vec::new(); dims[0]],
        }
    }

    fn opts(&self) -> LongformerOptions {
        LongformerOptions {
            window: self.window,
            dilation: self.dilation.clone(),
            causal: self.causal,
            scale: None,
        }
    }

    fn masks(&self) -> (TokenMask, TokenMask) {
        let [b, n, _, _] = self.dims;
        let pos = |lists: &[Vec<usize>]| -> Vec<(usize, usize)> {
            lists
                .iter()
                .enumerate()
                .flat_map(|(s, l)| l.iter().map(move |&i| (s, i)))
                .collect()
        };
        (
            TokenMask::from_positions(b, n, &pos(&self.globals)).expect("positions in range"),
            TokenMask::from_positions(b, n, &pos(&self.padded)).expect("positions in range"),
        )
    }
}

fn random(rng: &mut Rng, dtype: DType, shape: &[usize]) -> HostTensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| round_to(dtype, rng.normal())).collect();
    HostTensor::from_vec(v, shape).unwrap().to_contiguous(dtype)
}

fn assert_close(c: &Case, what: &str, got: &HostTensor, want: &HostTensor, tol: f64) {
    common::assert_close_to_reference(c, what, got, want, tol);
}

fn grads_of(g: LongformerGradients<DeviceTensor>) -> Vec<HostTensor> {
    let mut v = vec![g.dq, g.dk, g.dv];
    v.extend(g.global.into_iter().flatten());
    v.iter().map(|t| t.to_host().unwrap()).collect()
}

/// Forward and backward on the GPU against the CPU reference; returns the GPU gradients.
fn check(s: &Stream, c: &Case, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = Rng::new(seed);
    let shape = c.dims.to_vec();
    let inputs: Vec<HostTensor> = (0..6).map(|_| random(&mut rng, c.dtype, &shape)).collect();
    let dout = random(&mut rng, c.dtype, &shape);
    let (gm, pm) = c.masks();
    let opts = c.opts();
    let up = |t: &HostTensor| DeviceTensor::from_host(s, t).unwrap();
    let dev: Vec<DeviceTensor> = inputs.iter().map(up).collect();
    let host_g = c.separate.then(|| GlobalProjections {
        q: &inputs[3],
        k: &inputs[4],
        v: &inputs[5],
    });
    let dev_g = c.separate.then(|| [&dev[3], &dev[4], &dev[5]]);
    let (hq, hk, hv) = (&inputs[0], &inputs[1], &inputs[2]);

    let want = longformer::forward(
        &longformer::Inputs::new(hq, hk, hv)
            .globals(host_g)
            .masks(Some(&gm), Some(&pm)),
        &opts,
    )
    .unwrap_or_else(|e| panic!("{c:?}: cpu forward: {e}"));
    let got = cuda::forward(
        [&dev[0], &dev[1], &dev[2]],
        dev_g,
        Some(&gm),
        Some(&pm),
        &opts,
    )
    .unwrap_or_else(|e| panic!("{c:?}: cuda forward: {e}"));
    assert_close(
        c,
        "out",
        &got.out.to_host().unwrap(),
        &want.out,
        common::out_tol(c.dtype),
    );
    assert_close(c, "lse", &got.lse.to_host().unwrap(), &want.lse, 1e-3);

    // Backward from each side's own forward, as training does.
    let want_g = longformer::backward(
        &longformer::Inputs::new(hq, hk, hv)
            .globals(host_g)
            .masks(Some(&gm), Some(&pm))
            .backward(&want.out, &want.lse, &dout),
        &opts,
    )
    .unwrap_or_else(|e| panic!("{c:?}: cpu backward: {e}"));
    let got_g = cuda::backward(
        [&dev[0], &dev[1], &dev[2]],
        dev_g,
        &got.out,
        &got.lse,
        &up(&dout),
        Some(&gm),
        Some(&pm),
        &opts,
    )
    .unwrap_or_else(|e| panic!("{c:?}: cuda backward: {e}"));
    let mut want_all = vec![want_g.dq, want_g.dk, want_g.dv];
    want_all.extend(want_g.global.into_iter().flatten());
    let got_all = grads_of(got_g);
    assert_eq!(got_all.len(), want_all.len());
    let names = ["dq", "dk", "dv", "dq_global", "dk_global", "dv_global"];
    for ((name, g), w) in names.iter().zip(&got_all).zip(&want_all) {
        assert_close(c, name, g, w, common::grad_tol(c.dtype));
    }
    got_all.iter().map(HostTensor::to_f32_vec).collect()
}

#[test]
#[ignore = "needs a CUDA device"]
fn window_only_odd_lengths_and_head_dims() {
    let s = gpu_stream();
    for n in [1, 5, 63, 64, 65, 130, 257] {
        for d in [8, 64, 72, 128] {
            for dtype in [DType::F16, DType::BF16] {
                let mut c = Case::new([1, n, 1, d], 7, &[1]);
                c.dtype = dtype;
                check(&s, &c, (n * d) as u64);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn windows_from_zero_to_beyond_n() {
    let s = gpu_stream();
    for w in [0, 1, 2, 31, 64, 100, 299, 1000] {
        for causal in [false, true] {
            let mut c = Case::new([2, 299, 2, 64], w, &[1]);
            c.causal = causal;
            c.globals = vec![vec![0, 150], vec![]];
            check(&s, &c, w as u64);
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn dilation_per_head() {
    let s = gpu_stream();
    for dil in [vec![1], vec![2], vec![1, 2, 3, 4], vec![4, 1, 1, 3]] {
        for causal in [false, true] {
            let mut c = Case::new([1, 333, 4, 64], 9, &dil);
            c.causal = causal;
            c.globals = vec![vec![3, 200, 204]];
            c.padded = vec![(320..333).collect()];
            check(&s, &c, dil.len() as u64);
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn global_tokens_everywhere() {
    let s = gpu_stream();
    let n = 300;
    let placements: Vec<Vec<usize>> = vec![
        vec![0],
        vec![n - 1],
        vec![150],
        vec![0, 1, 2, 3],
        vec![100, 101, 105, 110], // inside each other's windows
        (0..n).step_by(7).collect(),
        (40..210).collect(), // more than one gathered tile of 128 rows
    ];
    for (x, g) in placements.into_iter().enumerate() {
        for separate in [true, false] {
            for causal in [false, true] {
                let mut c = Case::new([2, n, 2, 64], 16, &[1, 2]);
                c.globals = vec![g.clone(), vec![]];
                c.separate = separate;
                c.causal = causal;
                check(&s, &c, x as u64);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn padding_anywhere() {
    let s = gpu_stream();
    let n = 200;
    for (x, pads) in [
        vec![],
        (150..200).collect::<Vec<_>>(),
        (0..n).filter(|i| i % 5 == 3).collect(),
        (1..200).collect(), // only token 0 is real
    ]
    .into_iter()
    .enumerate()
    {
        for d in [64, 128] {
            let mut c = Case::new([2, n, 3, d], 10, &[1, 3, 2]);
            c.globals = vec![vec![0], vec![0, 60]];
            c.padded = vec![pads.clone(), (100..200).collect()];
            c.dtype = DType::F16;
            check(&s, &c, (x * d) as u64);
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn few_global_rows_over_a_long_sequence() {
    // Few gathered rows against thousands of keys: the global passes split over keys
    // (the host picks the splits), the local rows see packed global-key tiles.
    let s = gpu_stream();
    for (n, globals) in [
        (2085, vec![0, 1, 2, 3]),
        (4100, vec![0, 999, 1000, 2047, 4099]),
        (3000, (0..3000).step_by(150).collect()),
    ] {
        for causal in [false, true] {
            for separate in [true, false] {
                let mut c = Case::new([1, n, 1, 64], 32, &[1]);
                c.globals = vec![globals.clone()];
                c.padded = vec![(n - 20..n).filter(|i| !globals.contains(i)).collect()];
                c.causal = causal;
                c.separate = separate;
                check(&s, &c, n as u64);
            }
        }
    }
}

/// One small case of every Longformer pass (local, global rows, global columns, the split
/// and packed variants) at head dims 64 and 128: what `gpu_check.sh quick` runs first and
/// under compute-sanitizer.
#[test]
#[ignore = "needs a CUDA device"]
fn smoke() {
    let s = gpu_stream();
    let mut a = Case::new([2, 300, 2, 64], 16, &[1, 2]);
    a.globals = vec![vec![0, 150], vec![299]];
    a.padded = vec![vec![], (280..299).collect()];
    let mut b = Case::new([1, 200, 1, 128], 8, &[1]);
    b.dtype = DType::F16;
    b.globals = vec![vec![3]];
    b.causal = true;
    // Few global rows over thousands of keys: the split and packed paths.
    let mut c = Case::new([1, 2085, 1, 64], 32, &[1]);
    c.globals = vec![vec![0, 1, 2, 3]];
    c.separate = false;
    for (i, case) in [a, b, c].iter().enumerate() {
        check(&s, case, i as u64);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn backward_is_deterministic() {
    let s = gpu_stream();
    let mut c = Case::new([1, 500, 2, 64], 32, &[1, 2]);
    c.globals = vec![vec![0, 1, 250, 499]];
    c.padded = vec![(480..499).collect()];
    let a = check(&s, &c, 7);
    let b = check(&s, &c, 7);
    assert!(a == b, "two backward runs differ");
}

#[test]
#[ignore = "needs a CUDA device"]
fn matches_hugging_face_fixtures() {
    let s = gpu_stream();
    for f in common::longformer_fixtures::load() {
        // The kernels take head dims in multiples of 8: zero-pad D (q.k and the real
        // output columns do not change), compare the real columns.
        let (shape, _) = f.get("q");
        let [b, n, h, d] = [shape[0], shape[1], shape[2], shape[3]];
        let dp = d.div_ceil(8) * 8;
        let padded = |name: &str| {
            let (_, v) = f.get(name);
            let mut out = vec![0f32; b * n * h * dp];
            for row in 0..b * n * h {
                out[row * dp..row * dp + d].copy_from_slice(&v[row * d..(row + 1) * d]);
            }
            let t = HostTensor::from_vec(out, &[b, n, h, dp]).unwrap();
            t.to_contiguous(DType::F16)
        };
        let t: Vec<HostTensor> = ["q", "k", "v", "q_g", "k_g", "v_g"]
            .iter()
            .map(|x| padded(x))
            .collect();
        let mask = |name: &str| {
            let (s, v) = f.mask(name);
            TokenMask::new(v, &s)
        };
        let (gm, pm) = (mask("global_mask"), mask("padding_mask"));
        let opts = LongformerOptions {
            window: f.window,
            dilation: vec![f.dilation],
            causal: f.causal,
            scale: Some(f.scale),
        };
        let dev: Vec<DeviceTensor> = t
            .iter()
            .map(|x| DeviceTensor::from_host(&s, x).unwrap())
            .collect();
        let got = cuda::forward(
            [&dev[0], &dev[1], &dev[2]],
            Some([&dev[3], &dev[4], &dev[5]]),
            Some(&gm),
            Some(&pm),
            &opts,
        )
        .unwrap()
        .out
        .to_host()
        .unwrap()
        .to_f32_vec();
        let (_, want) = f.get("out_hf");
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        for row in 0..b * n * h {
            for c in 0..d {
                let (g, w) = (got[row * dp + c], want[row * d + c]);
                // f16 inputs of magnitude ~5: scores carry ~1e-2 relative error.
                assert!(
                    (g - w).abs() <= 3e-2 * scale,
                    "{}: row {row} col {c}: {g} vs Hugging Face {w}",
                    f.path.display()
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn kernel_limits_are_errors() {
    let s = gpu_stream();
    let opts = LongformerOptions::new(4);
    let t = |dtype: DType, d: usize| {
        let h = HostTensor::from_fn(dtype, &[1, 16, 1, d], |_| 0.5).unwrap();
        DeviceTensor::from_host(&s, &h).unwrap()
    };
    let f32s = t(DType::F32, 8);
    let e = cuda::forward([&f32s, &f32s, &f32s], None, None, None, &opts).unwrap_err();
    assert!(matches!(e, Error::UnsupportedDType { .. }), "{e}");
    let wide = t(DType::BF16, 136);
    let e = cuda::forward([&wide, &wide, &wide], None, None, None, &opts).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    let odd = t(DType::BF16, 12);
    let e = cuda::forward([&odd, &odd, &odd], None, None, None, &opts).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
}
