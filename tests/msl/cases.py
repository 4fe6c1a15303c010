"""What the kernel tests share: the paths they run on, random inputs with every edge, checks.

A kernel test runs each case on every runner this machine has, and names the path in its id:

- `harness`: the Metal kernel's exact source on the Metal-on-CPU harness (Linux, g++), threads
  in order;
- `harness-shuffled`: the same, each threadgroup's threads resumed in a seeded random order
  between synchronisation points, so that an order-dependent race shows up;
- `metal`: the kernel on a real Mac's GPU (wherever MLX has Metal).

The MLX-ops twin is the reference in every case. Tests of the twin alone, or of the dispatch,
say so in their names and docstrings.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import pytest

from m3mlx.metal_kernels import QuantizedKV, dispatch, kernel, moe, msa_kernels

from . import harness, strict

# The harness needs Linux and g++; the strict compile check needs clang. On a Mac the kernels
# run on Metal itself. M3MLX_MSL_REQUIRED=1 (set by CI) turns a missing compiler into a failure
# instead of a skip.
REQUIRED = os.environ.get("M3MLX_MSL_REQUIRED") == "1"
ON_LINUX = sys.platform.startswith("linux")
HARNESS = ON_LINUX and (shutil.which(harness.COMPILER) is not None or REQUIRED)
STRICT = strict.available() or REQUIRED
harness_only = pytest.mark.skipif(
    not HARNESS, reason=f"the Metal-on-CPU kernel harness needs Linux and {harness.COMPILER}")
strict_only = pytest.mark.skipif(
    not STRICT, reason=f"the strict compile check needs {strict.COMPILER} (Debian: apt-get "
                       "install clang); set M3MLX_MSL_REQUIRED=1 to make this a failure")


def _harness_runner(order: str):
    def run(spec, launch):
        return harness.run_with_stats(spec, launch, order)[0]

    return run


RUNNERS = []
if HARNESS:
    RUNNERS.append(pytest.param(_harness_runner("in-order"), id="harness"))
    RUNNERS.append(pytest.param(_harness_runner("shuffled"), id="harness-shuffled"))
if mx.metal.is_available():
    RUNNERS.append(pytest.param(kernel.metal_run, id="metal"))
kernel_runners = pytest.mark.parametrize("run", RUNNERS)


@pytest.fixture(scope="session")
def prebuilt():
    """The harness executables of `shapes.runtime_launches()`, compiled in parallel up front
    (a kernel test module names this fixture; it is quick once they are cached)."""
    if HARNESS:
        from . import shapes

        harness.prebuild(shapes.runtime_launches())
needs_runner = pytest.mark.skipif(not RUNNERS, reason="no kernel runner here: neither the "
                                  "harness (Linux, g++) nor Metal")


@dataclass(frozen=True)
class Spec:
    """A kernel spec written in a test (the harness and `kernel.build` read these fields)."""

    name: str
    input_names: tuple
    output_names: tuple
    source: str
    header: str = ""
    ensure_row_contiguous: bool = True
    atomic_outputs: bool = False


def metal_is_the_harness(monkeypatch, order="in-order") -> list:
    """Every public op behaves as on a Mac (Metal 'available' to `dispatch`) with each kernel
    launch going to the harness; returns the launched kernels' names, in order."""
    launched = []

    def run(spec, launch):
        launched.append(spec.name)
        return harness.run_with_stats(spec, launch, order)[0]

    monkeypatch.setattr(dispatch, "use_metal", lambda requested=None: requested is not False)
    for module in (msa_kernels, moe):
        monkeypatch.setattr(module, "metal_run", run)
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


def _pooled_array(x: mx.array, block: int, slot_of: np.ndarray, capacity: int, rng):
    """x [B, H, S, W] as a pool [B, H, capacity * block, W] holding block j of (b, h) at block
    slot_of[b, h, j], every other slot filled with garbage."""
    bf16 = x.dtype == mx.bfloat16
    a = np.array(x.view(mx.uint16) if bf16 else x)
    B, H, S, W = a.shape
    n = -(-S // block)
    a = np.pad(a, ((0, 0), (0, 0), (0, n * block - S), (0, 0))).reshape(B, H, n, block, W)
    if a.dtype.kind == "f":
        pool = rng.standard_normal((B, H, capacity, block, W)).astype(a.dtype) * 100
    else:
        pool = rng.integers(0, np.iinfo(a.dtype).max, (B, H, capacity, block, W), a.dtype)
    for b, h in np.ndindex(B, H):
        pool[b, h, slot_of[b, h]] = a[b, h]
    out = mx.array(pool.reshape(B, H, capacity * block, W))
    return out.view(mx.bfloat16) if bf16 else out


def pooled(keys, values, selection: mx.array, block: int, rng, spare: int = 2):
    """The same K/V as a pool of blocks in a random order with `spare` garbage slots, and the
    slots that locate the selection in it (-1 where it is -1): what a memory tier hands the
    attention op. K/V are arrays or QuantizedKV."""
    B, H, S = keys.shape[:3]
    n = -(-S // block)
    capacity = n + spare
    slot_of = np.stack([rng.permutation(capacity)[:n] for _ in range(B * H)]).reshape(B, H, n)

    def pool(x):
        if isinstance(x, QuantizedKV):
            return x.map(lambda a: _pooled_array(a, block, slot_of, capacity, rng))
        return _pooled_array(x, block, slot_of, capacity, rng)

    sel = np.array(selection)
    slots = np.where(sel >= 0, np.take_along_axis(
        slot_of, np.maximum(sel, 0).reshape(B, H, -1), axis=2).reshape(sel.shape), -1)
    return pool(keys), pool(values), mx.array(slots.astype(np.int32))
