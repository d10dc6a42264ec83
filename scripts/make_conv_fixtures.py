#!/usr/bin/env python
"""Writes the convolution / pooling fixtures under tests/fixtures/conv/ from torch (CPU).

Each fixture is one small ``.npz`` file (float32 arrays, int64 indices) with a
``config`` entry: a JSON string of the call's arguments, in torch's conventions. The
tests (python/tests/test_conv_cpu.py) need only numpy to read them, so CI checks our CPU
path against torch without installing torch.

Regenerate (any torch >= 2.1 with a CPU build; the repository's files were written with
torch 2.15 from /work/torchenv):

    python scripts/make_conv_fixtures.py            # rewrites tests/fixtures/conv/*.npz

Contents:
- ``conv_*.npz``: x, weight, bias (absent when the call has none), y (after the
  activation), y_pre (conv + bias), and for the loss ``sum(y * dy)``: dy, dy_pre (the
  gradient of y_pre, i.e. dy times the activation's derivative), dx, dweight, dbias.
- ``maxpool_*.npz``: x, y, indices (torch's, int64), dy, dx.
- ``avgpool_*.npz``: x, y, dy, dx.

Inputs are drawn from a seeded generator, so a rerun with the same torch writes the same
files. Keep the total under 1 MB (the script prints it).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch
import torch.nn.functional as F

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "conv"

# (name, N, C, H, W, K, R, S, stride, padding, dilation, groups, bias, activation)
CONV_CASES = [
    ("conv_3x3_pad1", 2, 4, 8, 8, 6, 3, 3, 1, 1, 1, 1, True, None),
    ("conv_7x7_stride2", 1, 3, 15, 13, 8, 7, 7, 2, 3, 1, 1, True, "relu"),
    ("conv_groups2_dil2_relu", 2, 4, 9, 10, 6, 3, 3, 1, 2, 2, 2, True, "relu"),
    ("conv_depthwise_gelu", 2, 6, 7, 7, 6, 3, 3, 1, 1, 1, 6, True, "gelu"),
    ("conv_1x1_silu_nobias", 2, 8, 5, 6, 4, 1, 1, 1, 0, 1, 1, False, "silu"),
    ("conv_asym_gelu", 1, 3, 9, 11, 5, 2, 3, (2, 1), (0, 2), (1, 2), 1, True, "gelu"),
    ("conv_stride3_groups3", 2, 6, 11, 9, 9, 3, 2, (3, 2), (1, 0), 1, 3, True, "silu"),
]

# (name, N, C, H, W, kernel, stride, padding, dilation, ceil_mode, ties)
MAXPOOL_CASES = [
    ("maxpool_k3_s2_p1", 2, 3, 9, 8, 3, 2, 1, 1, False, False),
    ("maxpool_k2_ceil", 1, 2, 7, 9, 2, 2, 0, 1, True, False),
    ("maxpool_dil2_ceil_ties", 2, 2, 10, 9, (3, 2), (2, 3), (1, 1), 2, True, True),
    ("maxpool_k2_s1_ties", 1, 3, 6, 6, 2, 1, 0, 1, False, True),
]

# (name, N, C, H, W, kernel, stride, padding, ceil_mode, count_include_pad, divisor)
AVGPOOL_CASES = [
    ("avgpool_k3_s2_p1", 2, 3, 9, 8, 3, 2, 1, False, True, None),
    ("avgpool_exclude_pad_ceil", 1, 2, 7, 9, 3, 2, 1, True, False, None),
    ("avgpool_divisor", 2, 2, 8, 8, (2, 3), (2, 1), (1, 1), False, True, 5),
]

ACT = {None: lambda t: t, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def np32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).numpy().copy()


def conv_fixture(gen: torch.Generator, case) -> dict:
    name, n, c, h, w, k, r, s, stride, padding, dilation, groups, bias, act = case
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64).requires_grad_()
    weight = torch.randn(k, c // groups, r, s, generator=gen, dtype=torch.float64)
    weight = (weight / (c // groups * r * s) ** 0.5).requires_grad_()
    b = torch.randn(k, generator=gen, dtype=torch.float64).requires_grad_() if bias else None
    # Compute in f64 from f32-representable inputs: the expected values are then the
    # exact f32 problem's, rounded once.
    with torch.no_grad():
        x.copy_(x.float().double())
        weight.copy_(weight.float().double())
        if b is not None:
            b.copy_(b.float().double())
    y_pre = F.conv2d(x, weight, b, stride=stride, padding=padding, dilation=dilation, groups=groups)
    y_pre.retain_grad()
    y = ACT[act](y_pre)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).float().double()
    (y * dy).sum().backward()
    config = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, activation=act, bias=bias)
    arrays = dict(
        x=np32(x),
        weight=np32(weight),
        y=np32(y),
        y_pre=np32(y_pre),
        dy=np32(dy),
        dy_pre=np32(y_pre.grad),
        dx=np32(x.grad),
        dweight=np32(weight.grad),
    )
    if b is not None:
        arrays.update(bias=np32(b), dbias=np32(b.grad))
    return dict(name=name, config=config, arrays=arrays)


def maxpool_fixture(gen: torch.Generator, case) -> dict:
    name, n, c, h, w, kernel, stride, padding, dilation, ceil_mode, ties = case
    if ties:
        x = torch.randint(-2, 3, (n, c, h, w), generator=gen).double()
    else:
        x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64).float().double()
    x.requires_grad_()
    y, idx = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).float().double()
    (y * dy).sum().backward()
    config = dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode)
    arrays = dict(x=np32(x), y=np32(y), indices=idx.numpy().astype(np.int64), dy=np32(dy), dx=np32(x.grad))
    return dict(name=name, config=config, arrays=arrays)


def avgpool_fixture(gen: torch.Generator, case) -> dict:
    name, n, c, h, w, kernel, stride, padding, ceil_mode, include, divisor = case
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64).float().double()
    x.requires_grad_()
    y = F.avg_pool2d(x, kernel, stride, padding, ceil_mode, include, divisor)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).float().double()
    (y * dy).sum().backward()
    config = dict(
        kernel_size=kernel,
        stride=stride,
        padding=padding,
        ceil_mode=ceil_mode,
        count_include_pad=include,
        divisor_override=divisor,
    )
    arrays = dict(x=np32(x), y=np32(y), dy=np32(dy), dx=np32(x.grad))
    return dict(name=name, config=config, arrays=arrays)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(20261129)
    fixtures = [conv_fixture(gen, c) for c in CONV_CASES]
    fixtures += [maxpool_fixture(gen, c) for c in MAXPOOL_CASES]
    fixtures += [avgpool_fixture(gen, c) for c in AVGPOOL_CASES]
    total = 0
    for f in fixtures:
        path = OUT / f"{f['name']}.npz"
        np.savez_compressed(path, config=np.array(json.dumps(f["config"])), **f["arrays"])
        total += path.stat().st_size
    print(f"wrote {len(fixtures)} fixtures to {OUT} ({total / 1024:.0f} KiB, torch {torch.__version__})")


if __name__ == "__main__":
    main()
