//! Linformer on a CUDA device (or the emulated one): the projection kernels plus the dense
//! attention kernels, forward and backward, against the CPU reference on the same inputs.
//! The backward runs both sides from the reference's forward outputs, so a mismatch is the
//! backward's own. Needs a device: run with `--ignored` (scripts/gpu_check.sh, or
//! scripts/emulate_rust_path.sh on the emulated device).

#![cfg(any(feature = "cuda", feature = "emulator"))]

mod common;
mod linformer_common;

use common::{assert_close_to_reference, gpu_stream, grad_tol, out_tol};
use flashkernels::linformer::{self, Inputs, LinformerOptions};
use flashkernels::{DType, DeviceTensor, Error, HostTensor, Stream, Tensor};
use linformer_common::{dims, opts, random_dout, tensor, Case, Dims, Padding, Sharing, Tensors};

fn dev(s: &Stream, t: &HostTensor) -> Tensor {
    Tensor::Cuda(DeviceTensor::from_host(s, t).unwrap())
}

fn host(t: &Tensor) -> HostTensor {
    t.to_host().unwrap()
}

struct DeviceInputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    e: Tensor,
    f: Option<Tensor>,
}

fn upload(s: &Stream, t: &Tensors) -> DeviceInputs {
    DeviceInputs {
        q: dev(s, &t.q),
        k: dev(s, &t.k),
        v: dev(s, &t.v),
        e: dev(s, &t.e),
        f: t.f.as_ref().map(|f| dev(s, f)),
    }
}

/// Device forward and backward of one case against the CPU reference; `strided`: Q, K, V
/// heads-first with padded rows and E, F transposed views (as lucidrains' `proj_k.T`).
fn check(s: &Stream, c: &Case, strided: bool) {
    let t = if strided {
        c.strided_tensors(8)
    } else {
        c.tensors()
    };
    let mask = c.mask();
    let o = opts(c);
    let hi = Inputs::new(&t.q, &t.k, &t.v, &t.e, t.f.as_ref()).key_padding_mask(mask.as_ref());
    let want = linformer::forward(&hi, &o).expect("reference forward");
    let d = upload(s, &t);
    let di = Inputs::new(&d.q, &d.k, &d.v, &d.e, d.f.as_ref()).key_padding_mask(mask.as_ref());
    let got = linformer::forward(&di, &o).expect("device forward");
    let case = format!("{:?} {:?} strided {strided}", c.dtype, c.dims);
    let tol = out_tol(c.dtype);
    assert_close_to_reference(&case, "kp", &host(&got.kp), &want.kp, tol);
    assert_close_to_reference(&case, "vp", &host(&got.vp), &want.vp, tol);
    assert_close_to_reference(&case, "out", &host(&got.out), &want.out, tol);
    assert_close_to_reference(&case, "lse", &host(&got.lse), &want.lse, 1e-3);

    let dout = tensor(&random_dout(c, 7), &c.q_shape(), c.dtype);
    let fwd = [want.out, want.lse, want.kp, want.vp, dout];
    let hb = hi.backward(&fwd[0], &fwd[1], &fwd[2], &fwd[3], &fwd[4]);
    let gw = linformer::backward(&hb, &o).expect("reference backward");
    let up = fwd.each_ref().map(|t| dev(s, t));
    let db = di.backward(&up[0], &up[1], &up[2], &up[3], &up[4]);
    let gg = linformer::backward(&db, &o).expect("device backward");
    let tol = grad_tol(c.dtype);
    for (what, g, w) in [
        ("dq", &gg.dq, &gw.dq),
        ("dk", &gg.dk, &gw.dk),
        ("dv", &gg.dv, &gw.dv),
        ("de", &gg.de, &gw.de),
    ] {
        assert_close_to_reference(&case, what, &host(g), w, tol);
    }
    assert_eq!(
        gg.df.is_some(),
        gw.df.is_some(),
        "{case}: df given iff F is"
    );
    if let (Some(g), Some(w)) = (&gg.df, &gw.df) {
        assert_close_to_reference(&case, "df", &host(g), w, tol);
    }
}

fn run(cases: &[(u64, DType, Dims, Sharing, Padding, bool)]) {
    let s = gpu_stream();
    for &(seed, dtype, d, sharing, padding, strided) in cases {
        let c = Case::random(seed, dtype, d, sharing, padding, None);
        check(&s, &c, strided);
    }
}

/// One small case of each kernel: bf16, headwise E/F, N not a multiple of a tile.
#[test]
#[ignore = "needs a CUDA device"]
fn smoke() {
    run(&[(
        1,
        DType::BF16,
        dims(1, 37, 2, 1, 16, 5, 40),
        Sharing::Headwise,
        Padding::None,
        false,
    )]);
}

/// Every sharing level, padding (a fully padded sequence too), GQA, strided inputs and
/// transposed projections, a reduction long enough to be split, k > N.
#[test]
#[ignore = "needs a CUDA device"]
fn matches_reference() {
    run(&[
        (
            2,
            DType::F16,
            dims(2, 45, 4, 2, 24, 9, 50),
            Sharing::PerHead,
            Padding::FirstSequenceFull,
            false,
        ),
        (
            3,
            DType::BF16,
            dims(1, 29, 2, 2, 8, 33, 29),
            Sharing::KvHeadwise,
            Padding::Random,
            true,
        ),
        (
            4,
            DType::F16,
            dims(1, 1100, 2, 1, 32, 16, 1200),
            Sharing::Mixed,
            Padding::Random,
            false,
        ),
        (
            5,
            DType::BF16,
            dims(2, 70, 3, 3, 64, 70, 77),
            Sharing::KvPerHead,
            Padding::None,
            true,
        ),
    ]);
}

/// f32 has no kernel: a typed error, not a launch.
#[test]
#[ignore = "needs a CUDA device"]
fn f32_is_refused_before_launch() {
    let s = gpu_stream();
    let c = Case::random(
        6,
        DType::F32,
        dims(1, 16, 1, 1, 8, 4, 16),
        Sharing::Headwise,
        Padding::None,
        None,
    );
    let d = upload(&s, &c.tensors());
    let i = Inputs::new(&d.q, &d.k, &d.v, &d.e, d.f.as_ref());
    let e = linformer::forward(&i, &LinformerOptions::new()).unwrap_err();
    assert!(matches!(e, Error::UnsupportedDType { .. }), "{e}");
}

/// lucidrains/linformer's golden fixtures (tests/fixtures/linformer) on the device: each
/// input rounded to f16 and bf16, the kernels against the CPU reference on those inputs
/// (the same bounds as above), and against lucidrains' float64 output within what the
/// rounding of the inputs moves it (1% of its largest value for f16, 5% for bf16).
#[test]
#[ignore = "needs a CUDA device"]
fn lucidrains_golden_fixtures() {
    let s = gpu_stream();
    let fixtures = linformer_common::load_fixtures();
    assert!(fixtures.len() >= 6, "expected the 6 committed fixtures");
    for fx in &fixtures {
        let u = |key: &str| fx.usize(key);
        let (_, q) = fx.get("q").unwrap();
        let (_, k) = fx.get("k").unwrap();
        let v = fx.get("v").map_or(k.clone(), |t| t.1);
        let (_, e) = fx.get("e").unwrap();
        let f = fx.get("f").map(|t| t.1);
        let (_, want) = fx.get("out").unwrap();
        for (dtype, slack) in [(DType::F16, 1e-2), (DType::BF16, 5e-2)] {
            let r = |x: &[f64]| -> Vec<f64> {
                x.iter()
                    .map(|&x| linformer_common::round(dtype, x))
                    .collect()
            };
            let c = Case {
                dtype,
                dims: dims(
                    u("batch"),
                    u("seqlen"),
                    u("heads"),
                    u("heads_kv"),
                    u("head_dim"),
                    u("k"),
                    u("n_max"),
                ),
                e_heads: 1,
                f_heads: 1,
                shared: f.is_none(),
                scale: None,
                q: r(&q),
                k: r(&k),
                v: r(&v),
                e: r(&e),
                f: f.as_deref().map(r),
                pad: None,
            };
            check(&s, &c, true);
            let d = upload(&s, &c.strided_tensors(0));
            let i = Inputs::new(&d.q, &d.k, &d.v, &d.e, d.f.as_ref());
            let got = host(&linformer::forward(&i, &opts(&c)).unwrap().out);
            let want_t = tensor(&want, &c.q_shape(), DType::F32);
            let case = format!("{} {dtype:?} vs lucidrains", fx.name);
            assert_close_to_reference(&case, "out", &got, &want_t, slack);
        }
    }
}
