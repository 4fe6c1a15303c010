"""Run an `mx.fast.metal_kernel` body on the CPU: the Metal-on-CPU kernel harness.

`run(spec, launch)` takes the same kernel description and launch that the runtime hands to
`mx.fast.metal_kernel` (`m3mlx.metal_kernels.kernel.KernelSpec` / `Launch`) and:

1. writes the kernel source exactly as MLX generates it (`source.py`);
2. rewrites `threadgroup` declarations into per-threadgroup shared allocations and appends a
   `main` that reads buffers, dispatches the grid like MLX (`dispatchThreads` with
   `min(threadgroup, grid)`) and writes the outputs;
3. compiles that with g++ against `metal_compat.h` (which stands in for MLX's Metal prelude)
   with AddressSanitizer and UBSan's integer checks, caches the executable by source hash
   (`$M3MLX_MSL_CACHE`, default a per-user temp dir; the generated `.cpp` stays beside it), runs
   it with the inputs streamed to its stdin (see `write_inputs` for the format), and returns the
   outputs as MLX arrays.

Threads of a threadgroup run as fibers, in thread order or (`order="shuffled"`) in a seeded
random order each time they resume between synchronisation points, so a result that depends on
the order of threads between barriers shows up. A kernel error (out-of-bounds access, barrier
divergence, deadlock, a simdgroup matrix that differs across lanes, ...) raises HarnessError,
and so does C++ that Metal does not have (`double`, `std::`, `static`, ...). Whether Metal's
compiler accepts the source is the strict compile check's job (`strict.py`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .source import (TYPE_NAMES, HarnessError, check_metal_subset, launch_args, mlx_source,
                     shape_infos, template_text, used_attributes)

__all__ = ["HarnessError", "View", "run", "run_shuffled", "run_with_stats", "prepare",
           "prebuild"]

HERE = Path(__file__).resolve().parent
COMPILER = os.environ.get("CXX", "g++")
# AddressSanitizer, and the UBSan checks that matter for index arithmetic (the full UBSan set
# doubles compile time). -g1 keeps line numbers in sanitizer reports.
FLAGS = [
    "-std=c++17", "-O1", "-g1", "-fno-omit-frame-pointer",
    "-fsanitize=address,signed-integer-overflow,shift,integer-divide-by-zero,bounds",
    "-fno-sanitize-recover=all", "-Wno-attributes",
]
RUN_ENV = {
    "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=86",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}
ORDERS = ("in-order", "shuffled")

# numpy storage for each MLX dtype (bf16 travels as its raw 16 bits)
NP_STORAGE = {
    mx.float32: np.float32, mx.float16: np.float16, mx.bfloat16: np.uint16, mx.bool_: np.bool_,
    mx.int8: np.int8, mx.int16: np.int16, mx.int32: np.int32, mx.int64: np.int64,
    mx.uint8: np.uint8, mx.uint16: np.uint16, mx.uint32: np.uint32, mx.uint64: np.uint64,
}
FROM_NP = {np.dtype(v): k for k, v in NP_STORAGE.items() if k != mx.bfloat16}


@dataclass
class View:
    """A strided input: a numpy view (any non-negative strides) and its MLX dtype.

    MLX passes views unchanged when a kernel is built with ensure_row_contiguous=False; this is
    how tests reach the kernels' `*_strides` code paths, which MLX arrays cannot show from Python.
    """

    array: np.ndarray
    mx_dtype: mx.Dtype | None = None  # needed for bfloat16 (numpy holds its raw 16 bits)

    @property
    def dtype(self) -> mx.Dtype:
        return self.mx_dtype or FROM_NP[self.array.dtype]

    @property
    def shape(self) -> tuple:
        return self.array.shape

    @property
    def ndim(self) -> int:
        return self.array.ndim

    def to_mx(self) -> mx.array:
        """The same values as a (contiguous) MLX array."""
        arr = mx.array(np.asarray(order="C", a=self.array))
        return arr.view(mx.bfloat16) if self.dtype == mx.bfloat16 else arr


@dataclass
class _Input:
    name: str
    dtype: mx.Dtype
    shape: tuple
    strides: tuple  # in elements
    payload: memoryview  # the bytes from the first to the last element the view reaches

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        return int(np.prod(self.shape)) if self.shape else 1


@dataclass
class Stats:
    """What the emulated run observed, the most over its threadgroups: threadgroup memory
    allocated, and threadgroup barriers passed."""

    threadgroup_bytes: int
    barriers: int


# ---------------------------------------------------------------------------------------------
# From MLX source to a harness program
# ---------------------------------------------------------------------------------------------

_TG_DECL = re.compile(
    r"^(?P<indent>[ \t]*)threadgroup\s+(?P<type>[A-Za-z_][\w:<>, ]*?)\s+"
    r"(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\]]+\]\s*)*);",
    re.MULTILINE,
)


def rewrite_threadgroup_decls(source: str) -> str:
    """`threadgroup T x[N][M];` -> one allocation shared by the threadgroup's threads."""
    counter = iter(range(1 << 30))

    def repl(m):
        dims = re.sub(r"\s+", "", m["dims"])
        return (f"{m['indent']}auto& {m['name']} = "
                f"*msl::tg_alloc<{m['type']}{dims}>({next(counter)});")

    return _TG_DECL.sub(repl, source)


def harness_program(spec, name, source, args, output_dtypes, template) -> str:
    """args: (dtype, ndim, size) per input."""
    lines = ['#include "metal_compat.h"', rewrite_threadgroup_decls(source),
             '#include "harness_io.h"', "",
             "int main(int argc, char** argv) {",
             "  if (argc != 3) msl::fail(\"usage: kernel INPUTS OUTPUTS\");",
             "  msl::Reader in(argv[1]);",
             "  uint3 grid = in.dims();",
             "  uint3 threadgroup_size = in.dims();"]
    call = []
    for i, ((dtype, ndim, _), (has_shape, has_strides, has_ndim)) in enumerate(
            zip(args, shape_infos(spec))):
        lines.append(f"  auto in{i} = in.input<{TYPE_NAMES[dtype]}>();")
        call.append(f"*in{i}.data" if ndim == 0 else f"in{i}.data")
        if ndim > 0:
            call += [f"in{i}.shape"] * has_shape + [f"in{i}.strides"] * has_strides
            call += [f"in{i}.ndim"] * has_ndim
    for i, dtype in enumerate(output_dtypes):
        if spec.atomic_outputs:
            raise NotImplementedError("the harness does not emulate atomic outputs")
        lines.append(f"  auto out{i} = in.output<{TYPE_NAMES[dtype]}>();")
        call.append(f"out{i}.data")
    call += [f"id.{a}" for a, _ in used_attributes(spec)]
    callee = name + (template_text(template) if template else "")
    lines += [
        "  msl::dispatch(grid, threadgroup_size, [&](const msl::ThreadIds& id) {",
        f"    {callee}({', '.join(call)});",
        "  });",
        "  msl::Writer w(argv[2]);",
    ]
    lines += [f"  w.put(out{i});" for i in range(len(output_dtypes))]
    lines += ["  msl::report_stats();", "  return 0;", "}", ""]
    return "\n".join(lines)


def cache_dir() -> Path:
    root = os.environ.get("M3MLX_MSL_CACHE") or os.path.join(
        tempfile.gettempdir(), f"m3mlx-msl-{os.getuid()}")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def compile_cached(program: str, compiler: str, flags: list, headers: list, suffix: str,
                   what: str) -> Path:
    """Compile `program` (or reuse the result for this exact text, flags and headers)."""
    if shutil.which(compiler) is None:
        raise HarnessError(f"{what} needs {compiler!r}, which is not installed")
    key = hashlib.sha256()
    for part in (program, compiler, " ".join(flags), *((HERE / h).read_text() for h in headers)):
        key.update(part.encode())
    out = cache_dir() / f"k{key.hexdigest()[:24]}{suffix}"
    if out.exists():
        return out
    # The source stays next to the result, so compiler and sanitizer reports point at it.
    src = out.with_name(out.name.split(".")[0] + ".cpp")
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        (Path(tmp) / "k.cpp").write_text(program)
        os.replace(Path(tmp) / "k.cpp", src)
        result = Path(tmp) / "out"
        proc = subprocess.run([compiler, *flags, f"-I{HERE}", str(src), "-o", str(result)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise HarnessError(f"{what}: compiling {src} failed:\n{proc.stderr[-6000:]}")
        os.replace(result, out)
    return out


def build(program: str) -> Path:
    """The harness executable for this exact program text."""
    return compile_cached(program, COMPILER, FLAGS, ["metal_compat.h", "harness_io.h"], "",
                          "the kernel harness")


# ---------------------------------------------------------------------------------------------
# Buffers
# ---------------------------------------------------------------------------------------------


def _from_numpy(name, arr: np.ndarray, dtype) -> _Input:
    item = arr.itemsize
    if any(s < 0 or s % item for s in arr.strides):
        arr = np.asarray(order="C", a=arr)
    strides = tuple(s // item for s in arr.strides)
    if arr.size == 0:
        return _Input(name, dtype, arr.shape, strides, memoryview(b""))
    reach = sum((n - 1) * s for n, s in zip(arr.shape, arr.strides)) + item
    # The array's own memory from its first to its last element, read in place (no copy).
    span = np.lib.stride_tricks.as_strided(arr, (reach // item,), (item,), writeable=False)
    return _Input(name, dtype, arr.shape, strides, memoryview(span.view(np.uint8)))


def _to_input(name, value, row_contiguous: bool) -> _Input:
    if isinstance(value, View):
        arr, dtype = value.array, value.dtype
        if row_contiguous:
            arr = np.asarray(order="C", a=arr)
        return _from_numpy(name, arr, dtype)
    if not isinstance(value, mx.array):
        value = mx.array(value)  # python scalars become 0-d arrays, as in MLX
    dtype = value.dtype
    host = value.view(mx.uint16) if dtype == mx.bfloat16 else value
    return _from_numpy(name, np.asarray(order="C", a=host), dtype)  # in place when contiguous


CHUNK = 1 << 26  # bytes per write


def write_inputs(f, inputs: list[_Input], launch) -> None:
    """The executable's input, written piece by piece to the binary file `f`: grid and
    threadgroup (3 + 3 uint32); per input ndim (int32), payload bytes and element offset
    (int64), shape (ndim int32), strides in elements (ndim int64) and the payload; per output
    its bytes (int64), whether it has an initial value (int32) and that value (float64)."""
    f.write(struct.pack("<3I3I", *(int(g) for g in launch.grid),
                        *(int(t) for t in launch.threadgroup)))
    for x in inputs:
        f.write(struct.pack("<iqq", x.ndim, len(x.payload), 0))
        f.write(struct.pack(f"<{x.ndim}i", *x.shape))
        f.write(struct.pack(f"<{x.ndim}q", *x.strides))
        for start in range(0, len(x.payload), CHUNK):
            f.write(x.payload[start:start + CHUNK])
    init = launch.init_value
    for shape, dtype in zip(launch.output_shapes, launch.output_dtypes):
        nbytes = int(np.prod(shape)) * np.dtype(NP_STORAGE[dtype]).itemsize
        f.write(struct.pack("<qid", nbytes, init is not None, init or 0.0))


def _decode(raw: bytes, launch) -> list[mx.array]:
    outs, pos = [], 0
    for shape, dtype in zip(launch.output_shapes, launch.output_dtypes):
        storage = np.dtype(NP_STORAGE[dtype])
        n = int(np.prod(shape))
        arr = np.frombuffer(raw, storage, n, pos).reshape(shape).copy()
        pos += n * storage.itemsize
        out = mx.array(arr)
        outs.append(out.view(mx.bfloat16) if dtype == mx.bfloat16 else out)
    if pos != len(raw):
        raise HarnessError("the kernel wrote an unexpected number of output bytes")
    return outs


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def prepare(spec, launch):
    """(executable, inputs, kernel name) for this spec and launch; `write_inputs` writes the
    inputs in the executable's format."""
    if len(launch.inputs) != len(spec.input_names):
        raise ValueError(f"{spec.name}: expected {len(spec.input_names)} inputs, "
                         f"got {len(launch.inputs)}")
    check_metal_subset(spec)
    inputs = [_to_input(n, v, spec.ensure_row_contiguous)
              for n, v in zip(spec.input_names, launch.inputs)]
    name, program = harness_source(spec, [(x.dtype, x.ndim, x.size) for x in inputs], launch)
    return build(program), inputs, name


def harness_source(spec, args, launch) -> tuple[str, str]:
    """(kernel name, harness program) for a launch whose inputs are `args`."""
    template = list(launch.template or [])
    name, source = mlx_source(spec, args, launch.output_dtypes, template)
    return name, harness_program(spec, name, source, args, launch.output_dtypes, template)


def prebuild(pairs, workers=None) -> None:
    """Compile the executables of these (spec, launch) pairs, one per CPU at a time, so that the
    tests that run them find them built: compiling dominates a first run. Nothing is evaluated;
    a pair that does not compile is left for its test to report."""
    def one(pair):
        spec, launch = pair
        with contextlib.suppress(HarnessError):
            build(harness_source(spec, launch_args(launch), launch)[1])

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as pool:
        list(pool.map(one, pairs))


_STATS = re.compile(r"^msl-stats: threadgroup_bytes=(\d+) barriers=(\d+)$", re.MULTILINE)


def run_with_stats(spec, launch, order="in-order", seed=0, timeout=600):
    """Run one launch of `spec` on the emulated grid: (outputs as MLX arrays, Stats).

    order: "in-order" resumes a threadgroup's waiting threads by thread index, "shuffled" in a
    random order drawn from `seed` (and the threadgroup's position) every time. The inputs
    stream to the executable through a pipe straight from the arrays' own memory (MLX arrays,
    and numpy arrays in `View`s, are read in place), so gigabyte-sized inputs cost no copies."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
    exe, inputs, name = prepare(spec, launch)
    env = {**os.environ, **RUN_ENV,
           "MSL_SCHEDULE": "in-order" if order == "in-order" else f"shuffle:{seed}"}
    with tempfile.TemporaryDirectory() as tmp:
        dst, log = Path(tmp) / "out.bin", Path(tmp) / "stderr.txt"
        with open(log, "wb") as err:
            proc = subprocess.Popen([str(exe), "/dev/stdin", str(dst)], stdin=subprocess.PIPE,
                                    stderr=err, env=env)
            try:
                # A broken pipe: the kernel died early, and its report is in the log.
                with contextlib.suppress(BrokenPipeError):
                    write_inputs(proc.stdin, inputs, launch)
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()
                code = proc.wait(timeout=timeout)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        report = log.read_text(errors="replace")
        if code != 0:
            raise HarnessError(
                f"{name} failed under the harness ({order}, exit {code}):\n{report[-8000:]}")
        stats = _STATS.search(report)
        if not stats:
            raise HarnessError(f"{name}: the harness wrote no statistics:\n{report[-2000:]}")
        return _decode(dst.read_bytes(), launch), Stats(int(stats[1]), int(stats[2]))


def run(spec, launch, timeout=600) -> list[mx.array]:
    """Run one launch, threads in order; the outputs as MLX arrays."""
    return run_with_stats(spec, launch, "in-order", timeout=timeout)[0]


def run_shuffled(spec, launch, seed=1, timeout=600) -> list[mx.array]:
    """Run one launch with each threadgroup's threads resumed in a shuffled order."""
    return run_with_stats(spec, launch, "shuffled", seed, timeout)[0]
