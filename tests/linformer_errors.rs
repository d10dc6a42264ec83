//! Linformer's error paths: every bad input to the forward and backward is a typed
//! error naming the values (never a panic), a problem altered after validation is an
//! error in the reference, and a failing interrupt check stops it.

mod linformer_common;

use flashkernels::linformer::{self, validate, LinformerLayouts, LinformerOptions, TokenMask};
use flashkernels::reference::{try_linformer, LinformerInputs};
use flashkernels::{DType, Error, HostTensor, Layout};
use linformer_common::{dims, inputs, opts, random_dout, tensor, Case, Padding, Sharing};

fn lay(shape: &[usize]) -> Layout {
    Layout::contiguous(shape)
}

/// Validates a forward call described by layouts: (q, k, v, e, f).
fn check_layouts(
    dt: [DType; 5],
    l: [&Layout; 5],
    f_given: bool,
    mask: Option<&TokenMask>,
    o: &LinformerOptions,
) -> Result<(), Error> {
    let t = LinformerLayouts {
        q: (dt[0], l[0]),
        k: (dt[1], l[1]),
        v: (dt[2], l[2]),
        e: (dt[3], l[3]),
        f: f_given.then_some((dt[4], l[4])),
    };
    validate(&t, mask, o).map(|_| ())
}

#[test]
fn every_bad_input_is_a_typed_error() {
    let f32s = [DType::F32; 5];
    let (q, kv) = (lay(&[2, 10, 4, 8]), lay(&[2, 10, 2, 8]));
    let (e, f) = (lay(&[2, 6, 12]), lay(&[1, 6, 12]));
    let o = LinformerOptions::new();
    let ok = |l: [&Layout; 5]| check_layouts(f32s, l, true, None, &o);
    assert!(ok([&q, &kv, &kv, &e, &f]).is_ok());
    assert!(check_layouts(f32s, [&q, &kv, &kv, &e, &f], false, None, &o).is_ok());
    let shape = |r: Result<(), Error>, what: &str| {
        let err = r.expect_err(what);
        assert!(
            matches!(err, Error::ShapeMismatch { .. }),
            "{what}: {err:?}"
        );
        err.to_string()
    };
    // E and F disagree on k, on N_max; N > N_max; He, Hf not in {1, Hkv}.
    let msg = shape(ok([&q, &kv, &kv, &e, &lay(&[1, 5, 12])]), "k of f");
    assert!(
        msg.contains("[2, 6, 12]") && msg.contains("[1, 5, 12]"),
        "{msg}"
    );
    shape(ok([&q, &kv, &kv, &e, &lay(&[1, 6, 13])]), "n_max of f");
    let msg = shape(
        ok([&q, &kv, &kv, &lay(&[2, 6, 9]), &lay(&[2, 6, 9])]),
        "N > N_max",
    );
    assert!(msg.contains("N = 10") && msg.contains("n_max = 9"), "{msg}");
    let msg = shape(ok([&q, &kv, &kv, &lay(&[3, 6, 12]), &f]), "He = 3");
    assert!(msg.contains("3 heads"), "{msg}");
    shape(ok([&q, &kv, &kv, &e, &lay(&[4, 6, 12])]), "Hf = 4");
    shape(
        ok([
            &q,
            &lay(&[2, 10, 3, 8]),
            &lay(&[2, 10, 3, 8]),
            &lay(&[1, 6, 12]),
            &f,
        ]),
        "H % Hkv",
    );
    shape(ok([&q, &kv, &lay(&[2, 10, 1, 8]), &e, &f]), "v unlike k");
    shape(
        ok([&q, &lay(&[2, 11, 2, 8]), &lay(&[2, 11, 2, 8]), &e, &f]),
        "k's N",
    );
    shape(
        ok([&q, &lay(&[2, 10, 2, 4]), &lay(&[2, 10, 2, 4]), &e, &f]),
        "k's D",
    );
    // k = 0.
    let err = ok([&q, &kv, &kv, &lay(&[1, 0, 12]), &f]).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("k = 0")),
        "{err:?}"
    );
    // Ranks, empty tensors, a non-unit head dim, D > 256.
    assert!(matches!(
        ok([&q, &kv, &kv, &lay(&[6, 12]), &f]),
        Err(Error::Rank { name: "e", .. })
    ));
    assert!(matches!(
        ok([&lay(&[2, 10, 32]), &kv, &kv, &e, &f]),
        Err(Error::Rank { name: "q", .. })
    ));
    assert!(matches!(
        ok([&lay(&[0, 10, 4, 8]), &kv, &kv, &e, &f]),
        Err(Error::Empty { name: "q", .. })
    ));
    assert!(matches!(
        ok([&q, &kv, &kv, &lay(&[1, 6, 0]), &f]),
        Err(Error::Empty { name: "e", .. })
    ));
    let heads_last = Layout {
        shape: vec![2, 10, 4, 8],
        strides: vec![320, 1, 80, 10],
    };
    assert!(matches!(
        ok([&heads_last, &kv, &kv, &e, &f]),
        Err(Error::NonUnitStride { name: "q", .. })
    ));
    let (qd, kvd) = (lay(&[1, 4, 1, 264]), lay(&[1, 4, 1, 264]));
    let err = ok([&qd, &kvd, &kvd, &lay(&[1, 2, 4]), &lay(&[1, 2, 4])]).unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported(m) if m.contains("264")),
        "{err:?}"
    );
    // Dtypes, scale.
    let mut mixed = f32s;
    mixed[3] = DType::F16;
    assert!(matches!(
        check_layouts(mixed, [&q, &kv, &kv, &e, &f], true, None, &o),
        Err(Error::DTypeMismatch { .. })
    ));
    mixed = f32s;
    mixed[4] = DType::BF16;
    assert!(matches!(
        check_layouts(mixed, [&q, &kv, &kv, &e, &f], true, None, &o),
        Err(Error::DTypeMismatch { .. })
    ));
    let bad_scale = LinformerOptions::new().scale(Some(-1.0));
    assert!(matches!(
        check_layouts(f32s, [&q, &kv, &kv, &e, &f], true, None, &bad_scale),
        Err(Error::InvalidArgument(_))
    ));
    // Masks: wrong shape, rank, value count.
    let with = |m: TokenMask| check_layouts(f32s, [&q, &kv, &kv, &e, &f], true, Some(&m), &o);
    assert!(with(TokenMask::new(vec![false; 20], &[2, 10])).is_ok());
    assert!(matches!(
        with(TokenMask::new(vec![false; 22], &[2, 11])),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        with(TokenMask::new(vec![false; 20], &[20])),
        Err(Error::Rank { .. })
    ));
    assert!(matches!(
        with(TokenMask::new(vec![false; 19], &[2, 10])),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn backward_input_errors_and_altered_problems() {
    let c = Case::random(
        71,
        DType::F16,
        dims(1, 9, 2, 1, 8, 4, 9),
        Sharing::Headwise,
        Padding::None,
        None,
    );
    let t = c.tensors();
    let i = inputs(&t, None);
    let o = linformer::forward(&i, &opts(&c)).unwrap();
    let dout = tensor(&random_dout(&c, 72), &c.q_shape(), DType::F16);
    let bw =
        |out: &HostTensor, lse: &HostTensor, kp: &HostTensor, vp: &HostTensor, d: &HostTensor| {
            linformer::backward(&i.backward(out, lse, kp, vp, d), &opts(&c)).map(|_| ())
        };
    assert!(bw(&o.out, &o.lse, &o.kp, &o.vp, &dout).is_ok());
    let lse16 = o.lse.to_contiguous(DType::F16);
    assert!(matches!(
        bw(&o.out, &lse16, &o.kp, &o.vp, &dout),
        Err(Error::UnsupportedDType { name: "lse", .. })
    ));
    let short = tensor(&[0.0; 8], &[1, 2, 4], DType::F32);
    assert!(matches!(
        bw(&o.out, &short, &o.kp, &o.vp, &dout),
        Err(Error::ShapeMismatch { .. })
    ));
    let kp5 = tensor(&[0.0; 40], &[1, 5, 1, 8], DType::F16);
    assert!(matches!(
        bw(&o.out, &o.lse, &kp5, &o.vp, &dout),
        Err(Error::ShapeMismatch { .. })
    ));
    let vp32 = o.vp.to_contiguous(DType::F32);
    assert!(matches!(
        bw(&o.out, &o.lse, &o.kp, &vp32, &dout),
        Err(Error::DTypeMismatch { .. })
    ));
    let d32 = dout.to_contiguous(DType::F32);
    assert!(matches!(
        bw(&o.out, &o.lse, &o.kp, &o.vp, &d32),
        Err(Error::DTypeMismatch { .. })
    ));
    assert!(matches!(
        bw(&o.out, &o.lse, &o.kp, &o.vp, &o.kp),
        Err(Error::ShapeMismatch { .. })
    ));
    // A problem changed after validation is an error in the reference, never a panic.
    let l = LinformerLayouts {
        q: t.q.described(),
        k: t.k.described(),
        v: t.v.described(),
        e: t.e.described(),
        f: t.f.as_ref().map(HostTensor::described),
    };
    let p = validate(&l, None, &opts(&c)).unwrap();
    let x = LinformerInputs {
        q: &c.q,
        k: &c.k,
        v: &c.v,
        e: &c.e,
        f: c.f.as_deref(),
    };
    assert!(try_linformer(&p, &x).is_ok());
    let alter: [fn(&mut linformer::LinformerProblem); 6] = [
        |p| p.seqlen += 1,
        |p| p.k_proj += 1,
        |p| p.e_heads = 2,
        |p| p.has_mask = !p.has_mask,
        |p| p.padding.push(true),
        |p| p.shared_kv = !p.shared_kv,
    ];
    for (n, f) in alter.iter().enumerate() {
        let mut q = p.clone();
        f(&mut q);
        assert!(try_linformer(&q, &x).is_err(), "alteration {n}");
    }
}

#[test]
fn a_failing_interrupt_check_stops_the_reference() {
    let c = Case::random(
        81,
        DType::F32,
        dims(1, 40, 2, 2, 16, 16, 40),
        Sharing::PerHead,
        Padding::None,
        None,
    );
    let t = c.tensors();
    let r = flashkernels::ops::with_interrupt_check_every(
        std::time::Duration::ZERO,
        &|| Err(Error::Interrupted),
        || linformer::forward(&inputs(&t, None), &opts(&c)),
    );
    assert!(matches!(r, Err(Error::Interrupted)), "{r:?}");
}
