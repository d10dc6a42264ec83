//! The CUDA path: kernel-specific checks, the plan (algorithm and workspace), then
//! the C launchers of kernels/include/fk_conv.h.

use std::ffi::c_void;

use super::{
    validate, validate_backward, Activation, Conv2dGradients, Conv2dOptions, Conv2dOutput,
    Conv2dProblem, ConvAlgo, ConvGrads,
};
use crate::device::{DeviceTensor, DeviceView, Stream};
use crate::error::{Error, Result};
use crate::ffi;
use crate::ops::glue::{
    borrowed, check_contiguous, check_out, check_same_device, dtype_arg, i32_arg, order_after,
    workspace,
};
use crate::tensor::{DType, Layout};

/// Largest size any one dimension may have: the kernels index with 32-bit integers.
const MAX_DIM: u64 = i32::MAX as u64;
/// Largest GEMM extent, M = N*P*Q and K_gemm = C/groups*R*S: the kernels form 32-bit
/// row and column indices up to the next whole tile past it (128 rows, 64 columns) and
/// pad K_gemm to a multiple of 8.
const MAX_GEMM_EXTENT: u64 = (1 << 31) - 256;
/// Largest padded input extent, H + 2 pad_h and W + 2 pad_w: window positions
/// p*stride - pad + r*dil are 32-bit, and the implicit GEMM parks the rows past M at
/// i32::MAX / 2, beyond every position (pooling: window ends and sizes likewise).
const MAX_PADDED_EXTENT: u64 = 1 << 30;
/// The f16 / bf16 GEMMs' grid: groups index grid z and 64-column tiles grid y (at most
/// 65535 each): out_channels / groups columns forward, K_gemm columns backward.
const MAX_GROUPS: u64 = 65_535;
const MAX_GEMM_COLUMNS: u64 = 65_535 * 64;
/// Elements of an im2col workspace (groups * M * K_gemm rounded up to 8): the C side
/// sizes it in bytes (up to 6 per element backward) in an int64_t.
const MAX_WORKSPACE_ELEMS: u64 = (i64::MAX / 8) as u64;

fn activation_arg(a: Activation) -> i32 {
    (match a {
        Activation::None => ffi::fk_activation_FK_ACT_NONE,
        Activation::Relu => ffi::fk_activation_FK_ACT_RELU,
        Activation::Gelu => ffi::fk_activation_FK_ACT_GELU,
        Activation::Silu => ffi::fk_activation_FK_ACT_SILU,
    }) as i32
}

fn algo_arg(a: ConvAlgo) -> i32 {
    (match a {
        ConvAlgo::Im2col => ffi::fk_conv_algo_FK_CONV_ALGO_IM2COL,
        ConvAlgo::ImplicitGemm => ffi::fk_conv_algo_FK_CONV_ALGO_IMPLICIT_GEMM,
    }) as i32
}

pub(crate) fn strides4(l: &Layout) -> [i64; 4] {
    [0, 1, 2, 3].map(|i| l.strides[i] as i64)
}

/// The product of sizes, saturating at u64::MAX (which every limit refuses).
pub(crate) fn product(sizes: &[usize]) -> u64 {
    sizes
        .iter()
        .try_fold(1u64, |acc, &x| acc.checked_mul(x as u64))
        .unwrap_or(u64::MAX)
}

/// `size + 2 * pad`, saturating.
pub(crate) fn padded_extent(size: usize, pad: usize) -> u64 {
    (pad as u64)
        .checked_mul(2)
        .and_then(|p| p.checked_add(size as u64))
        .unwrap_or(u64::MAX)
}

/// Each (what, value, limit): `Error::TooLarge` for the first value above its limit.
pub(crate) fn check_each(what: &[(&str, u64, u64)]) -> Result<()> {
    for &(name, value, limit) in what {
        if value > limit {
            return Err(Error::TooLarge {
                what: name.into(),
                value,
                limit,
            });
        }
    }
    Ok(())
}

pub(crate) fn check_limits(what: &[(&str, usize)]) -> Result<()> {
    let each: Vec<_> = what
        .iter()
        .map(|&(name, value)| (name, value as u64, MAX_DIM))
        .collect();
    check_each(&each)
}

/// Window positions of the convolution and pooling kernels: H + 2 pad_h and W + 2 pad_w
/// within [`MAX_PADDED_EXTENT`].
pub(crate) fn check_padded_extents(h: usize, w: usize, padding: [usize; 2]) -> Result<()> {
    check_each(&[
        (
            "height + 2 * padding[0]",
            padded_extent(h, padding[0]),
            MAX_PADDED_EXTENT,
        ),
        (
            "width + 2 * padding[1]",
            padded_extent(w, padding[1]),
            MAX_PADDED_EXTENT,
        ),
    ])
}

pub(crate) fn check_views(device: usize, views: &[(&'static str, &DeviceView)]) -> Result<()> {
    for &(name, view) in views {
        check_same_device("x", device, &[(name, view)])?;
        if view.ptr % view.dtype.size() as u64 != 0 {
            return Err(Error::InvalidArgument(format!(
                "{name}: pointer {:#x} is not aligned to its {}-byte elements",
                view.ptr,
                view.dtype.size()
            )));
        }
    }
    Ok(())
}

/// Which direction a check is for: the backward's GEMMs have K_gemm columns.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Forward,
    Backward,
}

/// Checks what the kernels need beyond the op's semantics: sizes that fit their 32-bit
/// indices, workspaces and grids (the f16 / bf16 GEMMs'; f32 runs direct kernels), every
/// view on `device`.
pub fn check_kernel_support(
    p: &Conv2dProblem,
    device: usize,
    views: &[(&'static str, &DeviceView)],
) -> Result<()> {
    check_support(p, device, views, Direction::Forward)
}

fn check_support(
    p: &Conv2dProblem,
    device: usize,
    views: &[(&'static str, &DeviceView)],
    direction: Direction,
) -> Result<()> {
    check_limits(&[
        ("batch", p.n),
        ("channels", p.c),
        ("height", p.h),
        ("width", p.w),
        ("out_channels", p.k),
    ])?;
    let m = product(&[p.n, p.p, p.q]);
    let k_gemm = product(&[p.c / p.groups, p.r, p.s]);
    check_each(&[
        ("batch * out_height * out_width", m, MAX_GEMM_EXTENT),
        (
            "in_channels / groups * kernel_h * kernel_w",
            k_gemm,
            MAX_GEMM_EXTENT,
        ),
    ])?;
    check_padded_extents(p.h, p.w, p.padding)?;
    if matches!(p.dtype, DType::F16 | DType::BF16) {
        let k_padded = k_gemm.div_ceil(8) * 8;
        let workspace = m
            .checked_mul(k_padded)
            .and_then(|e| e.checked_mul(p.groups as u64))
            .unwrap_or(u64::MAX);
        check_each(&[
            ("groups", p.groups as u64, MAX_GROUPS),
            (
                "out_channels / groups",
                (p.k / p.groups) as u64,
                MAX_GEMM_COLUMNS,
            ),
            ("im2col workspace elements", workspace, MAX_WORKSPACE_ELEMS),
        ])?;
        if direction == Direction::Backward {
            check_each(&[(
                "in_channels / groups * kernel_h * kernel_w (backward)",
                k_gemm,
                MAX_GEMM_COLUMNS,
            )])?;
        }
        if direction == Direction::Backward && p.stride == [1, 1] {
            // The implicit dx is a forward convolution of dy: rows N H W, reduction
            // K/groups R S, columns C/groups.
            check_each(&[
                (
                    "batch * height * width (backward)",
                    product(&[p.n, p.h, p.w]),
                    MAX_GEMM_EXTENT,
                ),
                (
                    "out_channels / groups * kernel_h * kernel_w (backward)",
                    product(&[p.k / p.groups, p.r, p.s]),
                    MAX_GEMM_EXTENT,
                ),
                (
                    "in_channels / groups (backward)",
                    (p.c / p.groups) as u64,
                    MAX_GEMM_COLUMNS,
                ),
            ])?;
        }
    }
    check_views(device, views)
}

/// What the forward will run: the algorithm and its workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dPlan {
    pub algo: ConvAlgo,
    pub workspace_bytes: usize,
}

fn shape_arg(p: &Conv2dProblem) -> Result<ffi::fk_conv2d_shape> {
    Ok(ffi::fk_conv2d_shape {
        n: i32_arg("batch", p.n)?,
        c: i32_arg("channels", p.c)?,
        h: i32_arg("height", p.h)?,
        w: i32_arg("width", p.w)?,
        k: i32_arg("out_channels", p.k)?,
        r: i32_arg("kernel_h", p.r)?,
        s: i32_arg("kernel_w", p.s)?,
        p: i32_arg("out_height", p.p)?,
        q: i32_arg("out_width", p.q)?,
        stride_h: i32_arg("stride[0]", p.stride[0])?,
        stride_w: i32_arg("stride[1]", p.stride[1])?,
        pad_h: i32_arg("padding[0]", p.padding[0])?,
        pad_w: i32_arg("padding[1]", p.padding[1])?,
        dil_h: i32_arg("dilation[0]", p.dilation[0])?,
        dil_w: i32_arg("dilation[1]", p.dilation[1])?,
        groups: i32_arg("groups", p.groups)?,
    })
}

/// Candidate algorithms: the forced one, or the implicit GEMM then im2col.
fn candidates(p: &Conv2dProblem) -> Vec<ConvAlgo> {
    match p.algo {
        Some(a) => vec![a],
        None => vec![ConvAlgo::ImplicitGemm, ConvAlgo::Im2col],
    }
}

fn no_algo(p: &Conv2dProblem, what: &str) -> Error {
    Error::Unsupported(match p.algo {
        Some(a) => format!(
            "the {} algorithm cannot run this {what} ({} {:?} -> {:?}, groups {}): check the \
             dtype, channel alignment and strides, or let flashkernels choose",
            a.name(),
            p.dtype,
            p.x_shape(),
            p.y_shape(),
            p.groups
        ),
        None => format!(
            "no CUDA algorithm runs this {what} ({} {:?} -> {:?}, groups {}); make the tensors \
             contiguous (NCHW or NHWC)",
            p.dtype,
            p.x_shape(),
            p.y_shape(),
            p.groups
        ),
    })
}

/// The forward's parameters (pointers from the views, `algo` set by [`plan`]).
fn fwd_params(
    p: &Conv2dProblem,
    [x, w, y]: [&DeviceView; 3],
    bias: Option<&DeviceView>,
    y_pre: Option<&DeviceView>,
) -> Result<ffi::fk_conv2d_params> {
    Ok(ffi::fk_conv2d_params {
        x: x.ptr as *const c_void,
        weight: w.ptr as *const c_void,
        bias: bias.map_or(std::ptr::null(), |b| b.ptr as *const c_void),
        y: y.ptr as *mut c_void,
        y_pre: y_pre.map_or(std::ptr::null_mut(), |v| v.ptr as *mut c_void),
        workspace: std::ptr::null_mut(),
        x_strides: strides4(&x.layout),
        w_strides: strides4(&w.layout),
        y_strides: strides4(&y.layout),
        shape: shape_arg(p)?,
        activation: activation_arg(p.activation),
        algo: 0,
        dtype: dtype_arg(p.dtype),
        device: i32_arg("device", x.device)?,
    })
}

/// Chooses the forward's algorithm (the implicit GEMM when `fk_conv2d_supports`
/// accepts it, else im2col; or the forced one) and sizes its workspace. Sets
/// `params.algo`. Pure: reads no pointer.
fn plan_params(p: &Conv2dProblem, params: &mut ffi::fk_conv2d_params) -> Result<Conv2dPlan> {
    for algo in candidates(p) {
        params.algo = algo_arg(algo);
        // SAFETY: a pure function of the parameters; no pointer is read.
        if unsafe { ffi::fk_conv2d_supports(params) } != 0 {
            // SAFETY: as above.
            let bytes = unsafe { ffi::fk_conv2d_workspace_bytes(params) };
            return Ok(Conv2dPlan {
                algo,
                workspace_bytes: bytes.max(0) as usize,
            });
        }
    }
    Err(no_algo(p, "convolution"))
}

/// The plan of a forward call on these views (x, weight, y; bias and y_pre
/// optional), after the kernel checks (sizes beyond the kernels' limits are
/// `Error::TooLarge` here, before any launch).
pub fn plan(
    p: &Conv2dProblem,
    [x, w, y]: [&DeviceView; 3],
    bias: Option<&DeviceView>,
    y_pre: Option<&DeviceView>,
) -> Result<Conv2dPlan> {
    check_kernel_support(p, x.device, &[])?;
    let mut params = fwd_params(p, [x, w, y], bias, y_pre)?;
    plan_params(p, &mut params)
}

/// Allocates y (and y_pre when `keep_pre`), contiguous NCHW, and runs the forward on
/// x's stream.
pub fn conv2d_forward(
    x: &DeviceTensor,
    w: &DeviceTensor,
    bias: Option<&DeviceTensor>,
    opts: &Conv2dOptions,
    keep_pre: bool,
) -> Result<Conv2dOutput<DeviceTensor>> {
    let p = validate(
        (x.dtype(), x.layout()),
        (w.dtype(), w.layout()),
        bias.map(|b| (b.dtype(), b.layout())),
        opts,
    )?;
    let stream = x.stream();
    let mut others = vec![("weight", w)];
    others.extend(bias.map(|b| ("bias", b)));
    order_after(stream, "x", &others)?;
    let y = DeviceTensor::poisoned(stream, p.dtype, &p.y_shape())?;
    let y_pre = keep_pre
        .then(|| DeviceTensor::poisoned(stream, p.dtype, &p.y_shape()))
        .transpose()?;
    let bias_view = bias.map(|b| b.view());
    let pre_view = y_pre.as_ref().map(|t| t.view());
    // SAFETY: views of live DeviceTensors whose layouts fit their allocations; the
    // outputs are fresh.
    unsafe {
        launch_forward(
            &p,
            [&x.view(), &w.view(), &y.view()],
            bias_view.as_ref(),
            pre_view.as_ref(),
            || Ok(stream.clone()),
        )?
    };
    Ok(Conv2dOutput { y, y_pre })
}

/// Runs the forward on raw device memory, writing `y` (and `y_pre` when given).
///
/// # Safety
/// Every view must describe live device memory on its device that its layout stays
/// inside; the outputs must not overlap the inputs or each other; `stream` must be a
/// live stream (or null) of the views' device, ordered after whatever produced the
/// inputs.
#[allow(clippy::too_many_arguments)]
pub unsafe fn conv2d_forward_views(
    x: &DeviceView,
    w: &DeviceView,
    bias: Option<&DeviceView>,
    y: &DeviceView,
    y_pre: Option<&DeviceView>,
    opts: &Conv2dOptions,
    stream: *mut c_void,
) -> Result<()> {
    let p = validate(
        (x.dtype, &x.layout),
        (w.dtype, &w.layout),
        bias.map(|b| (b.dtype, &b.layout)),
        opts,
    )?;
    // SAFETY: forwarded from the caller.
    unsafe { launch_forward(&p, [x, w, y], bias, y_pre, || borrowed(x.device, stream)) }
}

/// Checks the outputs and the kernel's needs, plans, then launches on the stream
/// `stream` gives (asked for only once every check has passed).
///
/// # Safety
/// As [`conv2d_forward_views`].
pub(crate) unsafe fn launch_forward(
    p: &Conv2dProblem,
    [x, w, y]: [&DeviceView; 3],
    bias: Option<&DeviceView>,
    y_pre: Option<&DeviceView>,
    stream: impl FnOnce() -> Result<Stream>,
) -> Result<()> {
    check_out("y", y, p.dtype, &p.y_shape())?;
    let mut views = vec![("x", x), ("weight", w), ("y", y)];
    if let Some(b) = bias {
        check_contiguous("bias", b, "must be contiguous")?;
        views.push(("bias", b));
    }
    if let Some(v) = y_pre {
        check_out("y_pre", v, p.dtype, &p.y_shape())?;
        if v.layout.strides != y.layout.strides {
            return Err(Error::InvalidArgument(format!(
                "y_pre must have y's strides {:?}, got {:?}",
                y.layout.strides, v.layout.strides
            )));
        }
        views.push(("y_pre", v));
    }
    check_kernel_support(p, x.device, &views)?;
    let mut params = fwd_params(p, [x, w, y], bias, y_pre)?;
    let plan = plan_params(p, &mut params)?;
    let stream = &stream()?;
    let ws = workspace(stream, plan.workspace_bytes)?;
    params.workspace = ws.ptr;
    // SAFETY: params were validated above; the caller vouches for the memory.
    let code = unsafe { ffi::fk_conv2d_fwd(&params, stream.raw()) };
    ffi::check(code)
}

/// Allocates the requested gradients (contiguous) and runs the backward on x's
/// stream. `dy` is the gradient of conv + bias.
pub fn conv2d_backward(
    x: &DeviceTensor,
    w: &DeviceTensor,
    dy: &DeviceTensor,
    opts: &Conv2dOptions,
    grads: ConvGrads,
) -> Result<Conv2dGradients<DeviceTensor>> {
    let p = validate((x.dtype(), x.layout()), (w.dtype(), w.layout()), None, opts)?;
    validate_backward(&p, (dy.dtype(), dy.layout()))?;
    let stream = x.stream();
    order_after(stream, "x", &[("weight", w), ("dy", dy)])?;
    let alloc = |want: bool, shape: &[usize]| {
        want.then(|| DeviceTensor::poisoned(stream, p.dtype, shape))
            .transpose()
    };
    let dx = alloc(grads.input, &p.x_shape())?;
    let dw = alloc(grads.weight, &p.weight_shape())?;
    let db = alloc(grads.bias, &[p.k])?;
    let (vdx, vdw, vdb) = (
        dx.as_ref().map(|t| t.view()),
        dw.as_ref().map(|t| t.view()),
        db.as_ref().map(|t| t.view()),
    );
    // SAFETY: as in `conv2d_forward`.
    unsafe {
        launch_backward(
            &p,
            [&x.view(), &w.view(), &dy.view()],
            [vdx.as_ref(), vdw.as_ref(), vdb.as_ref()],
            || Ok(stream.clone()),
        )?
    };
    Ok(Conv2dGradients {
        dx,
        dweight: dw,
        dbias: db,
    })
}

/// Runs the backward on raw device memory: the outputs given (dx, dweight, dbias,
/// each optional) are fully written.
///
/// # Safety
/// As [`conv2d_forward_views`].
pub unsafe fn conv2d_backward_views(
    [x, w, dy]: [&DeviceView; 3],
    outputs: [Option<&DeviceView>; 3],
    opts: &Conv2dOptions,
    stream: *mut c_void,
) -> Result<()> {
    let p = validate((x.dtype, &x.layout), (w.dtype, &w.layout), None, opts)?;
    validate_backward(&p, (dy.dtype, &dy.layout))?;
    // SAFETY: forwarded from the caller.
    unsafe { launch_backward(&p, [x, w, dy], outputs, || borrowed(x.device, stream)) }
}

/// # Safety
/// As [`conv2d_forward_views`].
pub(crate) unsafe fn launch_backward(
    p: &Conv2dProblem,
    [x, w, dy]: [&DeviceView; 3],
    [dx, dw, db]: [Option<&DeviceView>; 3],
    stream: impl FnOnce() -> Result<Stream>,
) -> Result<()> {
    let mut views = vec![("x", x), ("weight", w), ("dy", dy)];
    if let Some(v) = dx {
        check_out("dx", v, p.dtype, &p.x_shape())?;
        views.push(("dx", v));
    }
    if let Some(v) = dw {
        check_out("dweight", v, p.dtype, &p.weight_shape())?;
        views.push(("dweight", v));
    }
    if let Some(v) = db {
        check_out("dbias", v, p.dtype, &[p.k])?;
        check_contiguous("dbias", v, "must be contiguous")?;
        views.push(("dbias", v));
    }
    check_support(p, x.device, &views, Direction::Backward)?;
    if dx.is_none() && dw.is_none() && db.is_none() {
        return Ok(());
    }
    let zero = [0i64; 4];
    let mut params = ffi::fk_conv2d_bwd_params {
        x: x.ptr as *const c_void,
        weight: w.ptr as *const c_void,
        dy: dy.ptr as *const c_void,
        dx: dx.map_or(std::ptr::null_mut(), |v| v.ptr as *mut c_void),
        dweight: dw.map_or(std::ptr::null_mut(), |v| v.ptr as *mut c_void),
        dbias: db.map_or(std::ptr::null_mut(), |v| v.ptr as *mut c_void),
        workspace: std::ptr::null_mut(),
        x_strides: strides4(&x.layout),
        w_strides: strides4(&w.layout),
        dy_strides: strides4(&dy.layout),
        dx_strides: dx.map_or(zero, |v| strides4(&v.layout)),
        dw_strides: dw.map_or(zero, |v| strides4(&v.layout)),
        shape: shape_arg(p)?,
        algo: 0,
        dtype: dtype_arg(p.dtype),
        device: i32_arg("device", x.device)?,
    };
    let mut bytes = None;
    for algo in candidates(p) {
        params.algo = algo_arg(algo);
        // SAFETY: pure functions of the parameters; no pointer is read.
        if unsafe { ffi::fk_conv2d_bwd_supports(&params) } != 0 {
            bytes = Some(unsafe { ffi::fk_conv2d_bwd_workspace_bytes(&params) }.max(0) as usize);
            break;
        }
    }
    let bytes = bytes.ok_or_else(|| no_algo(p, "convolution backward"))?;
    let stream = &stream()?;
    let ws = workspace(stream, bytes)?;
    params.workspace = ws.ptr;
    // SAFETY: params were validated above; the caller vouches for the memory.
    let code = unsafe { ffi::fk_conv2d_bwd(&params, stream.raw()) };
    ffi::check(code)
}
