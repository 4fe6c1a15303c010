"""Plumbing shared by every custom Metal kernel: what a kernel is, one launch of it, how it runs.

A kernel is a `KernelSpec`: the arguments of `mx.fast.metal_kernel`, its body read from a `.metal`
file next to this one and its header from others. A planner (one per kernel, in the op's module)
turns the shapes of one call into a `Launch`: inputs, template, grid in threads, threadgroup and
outputs. An op chains launches through a `Runner`, `(spec, launch) -> outputs`: `metal_run` on a
Mac; the test harness (`tests/msl`) passes its own, which compiles the same source inside the
same MLX-generated signature as C++ and runs it on an emulated GPU, so it exercises this code.

Per-call cost matters: a decode step launches about 342 kernels (6 per layer over 57 layers), and
MLX regenerates and hashes a kernel's whole source on every call. So the source MLX receives is
built once per spec, with comment text removed (newlines kept, so compiler messages still point
at the right line of the `.metal` file); the MLX kernel object is built once per spec (MLX keeps
one Metal library per template instantiation); and each planner caches the part of a launch that
depends only on the shape class (template, threadgroup, placeholder inputs) with `lru_cache`, so a
call only computes its grid and output shapes.

Variants (another input, a template flag) are new specs: `dataclasses.replace(SPEC, name=...,
input_names=...)` and a planner that adds what the variant needs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Callable

import mlx.core as mx

HERE = Path(__file__).resolve().parent
SIMD = 32  # lanes per simdgroup on every Apple GPU
THREADGROUP_MEMORY = 32 * 1024  # bytes one threadgroup may allocate (Metal's limit on Apple GPUs)
FLOATS = (mx.float32, mx.float16, mx.bfloat16)
REGISTERS = 128  # 32-bit registers a thread's arrays may take before a shape goes to the twin
# The kernels rely on IEEE special values (exp(-inf) == 0, NaN through comparisons, isnan):
# MLX's default math mode, stated here so that no change of default can break them silently.
COMPILE_OPTIONS = {"math_mode": "safe"}


@lru_cache(maxsize=None)
def read_source(name: str) -> str:
    """A `.metal` file as MLX receives it: comment text removed, every newline kept."""
    return re.sub(r"[ \t]*//[^\n]*", "", (HERE / name).read_text())


@dataclass(frozen=True)
class KernelSpec:
    """What `mx.fast.metal_kernel` is built from."""

    name: str
    input_names: tuple
    output_names: tuple
    source_file: str
    header_files: tuple = ()
    ensure_row_contiguous: bool = False  # bodies address their inputs through `*_strides`
    atomic_outputs: bool = False

    @cached_property
    def source(self) -> str:
        return read_source(self.source_file)

    @cached_property
    def header(self) -> str:
        return "".join(read_source(f) for f in self.header_files)


@dataclass
class Launch:
    """One call of a kernel: `kernel(inputs=..., template=..., grid=..., ...)`."""

    inputs: list
    output_shapes: list
    output_dtypes: list
    grid: tuple
    threadgroup: tuple
    template: list = field(default_factory=list)
    init_value: float | None = None


Runner = Callable[[KernelSpec, Launch], list]


@dataclass(frozen=True)
class Footprint:
    """What one threadgroup of a kernel holds: threadgroup memory, and per thread the 32-bit
    registers of its live arrays (scalars and addresses are not counted). Each planner states
    its kernel's; the harness checks the threadgroup bytes against what the kernel allocates."""

    threadgroup_bytes: int
    registers: int

    @property
    def fits(self) -> bool:
        return self.threadgroup_bytes <= THREADGROUP_MEMORY and self.registers <= REGISTERS


@lru_cache(maxsize=None)
def placeholder(dtype: mx.Dtype) -> mx.array:
    """A one-element input standing in for an absent one (never read), made once per dtype."""
    x = mx.zeros((1,), dtype)
    mx.eval(x)
    return x


_built: dict[KernelSpec, object] = {}


def build(spec: KernelSpec):
    """A new `mx.fast.metal_kernel` for `spec` (MLX builds one even without Metal, for export)."""
    return mx.fast.metal_kernel(
        name=spec.name,
        input_names=list(spec.input_names),
        output_names=list(spec.output_names),
        source=spec.source,
        header=spec.header,
        ensure_row_contiguous=spec.ensure_row_contiguous,
        atomic_outputs=spec.atomic_outputs,
        compile_options=COMPILE_OPTIONS,
    )


def metal_kernel(spec: KernelSpec):
    """The `mx.fast.metal_kernel` for `spec`, built on first use and kept."""
    kernel = _built.get(spec)
    if kernel is None:
        if not mx.metal.is_available():
            raise RuntimeError(f"{spec.name}: Metal is not available; use the MLX-ops path")
        kernel = _built[spec] = build(spec)
    return kernel


def call(kernel, launch: Launch) -> list:
    """Call an `mx.fast.metal_kernel` with one launch."""
    return kernel(
        inputs=launch.inputs,
        template=launch.template,
        grid=launch.grid,
        threadgroup=launch.threadgroup,
        output_shapes=launch.output_shapes,
        output_dtypes=launch.output_dtypes,
        init_value=launch.init_value,
    )


def metal_run(spec: KernelSpec, launch: Launch) -> list:
    """Run one launch on the GPU."""
    return call(metal_kernel(spec), launch)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
