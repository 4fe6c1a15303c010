"""Inputs for the kernel tests: random tensors, selections with every edge, comparisons."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import pytest

from m3mlx.metal_kernels import msa_kernels

from . import harness

# The harness needs Linux and a C++17 compiler; on a Mac the kernels run on Metal itself.
# M3MLX_MSL_REQUIRED=1 (set by CI) turns a missing compiler into a failure instead of a skip.
ON_LINUX = sys.platform.startswith("linux")
HARNESS = ON_LINUX and (shutil.which(harness.COMPILER) is not None
                        or os.environ.get("M3MLX_MSL_REQUIRED") == "1")
harness_only = pytest.mark.skipif(
    not HARNESS, reason=f"the kernel harness needs Linux and {harness.COMPILER}")
RUNNERS = []
if HARNESS:
    RUNNERS.append(pytest.param(harness.run, id="harness"))
if mx.metal.is_available():
    RUNNERS.append(pytest.param(msa_kernels.metal_run, id="metal"))


@dataclass
class Spec:
    """A kernel spec written in a test (the harness reads these fields)."""

    name: str
    input_names: tuple
    output_names: tuple
    source: str
    header: str = ""
    ensure_row_contiguous: bool = True
    atomic_outputs: bool = False


def metal_is_the_harness(monkeypatch, dispatch, kernels) -> list:
    """Pretend Metal is available to the public ops in module `dispatch` (its `_use_metal`),
    with every launch through `kernels.metal_run` going to the harness; the launched kernels'
    names, in order."""
    launched = []

    def run(spec, launch):
        launched.append(spec.name)
        return harness.run(spec, launch)

    monkeypatch.setattr(dispatch, "_use_metal", lambda requested: requested is not False)
    monkeypatch.setattr(kernels, "metal_run", run)
    return launched


def normal(rng, shape, dtype=mx.float32) -> mx.array:
    return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


def edgy_selection(rng, B, H, L, offset, block, topk, holes=True) -> np.ndarray:
    """Valid selections in any order: own block plus a random history subset, -1 padding,
    and (with holes) -1 slots between valid ones."""
    sel = np.full((B, H, L, topk), -1, np.int32)
    for b, h, t in np.ndindex(B, H, L):
        own = (offset + t) // block
        n_hist = rng.integers(0, min(own, topk - 1) + 1)
        ids = list(rng.permutation(own)[:n_hist]) + [own]
        rng.shuffle(ids)
        slots = rng.permutation(topk)[: len(ids)] if holes else np.arange(len(ids))
        sel[b, h, t, np.sort(slots)] = ids
    return sel


def strided(x: mx.array, layout: tuple, pad_axis: int | None = None, pad: int = 0):
    """The same values as `x`, as a harness View whose memory is laid out in axis order
    `layout` (a permutation) and, with pad_axis, inside a longer buffer along that axis."""
    storage = np.array(x.view(mx.uint16) if x.dtype == mx.bfloat16 else x)
    big_shape = list(storage.shape)
    if pad_axis is not None:
        big_shape[pad_axis] += pad
    buf = np.zeros([big_shape[a] for a in layout], storage.dtype)
    view = buf.transpose(np.argsort(layout))
    view = view[tuple(slice(0, n) for n in storage.shape)]
    view[...] = storage
    return harness.View(view, x.dtype)


def as_mx(x):
    return x.to_mx() if isinstance(x, harness.View) else x


def assert_close(got, want, atol, rtol=0.0):
    got = np.array(got.astype(mx.float32))
    want = np.array(want.astype(mx.float32))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol)
