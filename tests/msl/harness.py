"""Run an `mx.fast.metal_kernel` body on the CPU: the Metal-on-CPU kernel harness.

`run(spec, launch)` takes the same kernel description and launch that the runtime hands to
`mx.fast.metal_kernel` (see `m3mlx.metal_kernels.msa_kernels.KernelSpec` / `Launch`) and:

1. writes the kernel source exactly as MLX does (`write_signature` in MLX's
   `backend/common/metal_kernel.cpp`): header, `template <...>`, the generated signature with
   `[[buffer(i)]]` inputs (scalars by reference, arrays under 8 elements in `constant`),
   `*_shape` / `*_strides` / `*_ndim` only when the body names them, outputs, the attributes
   the body names, the body, and the explicit template instantiation, under MLX's kernel name;
2. rewrites `threadgroup` declarations into per-threadgroup shared allocations and appends a
   `main` that reads buffers, dispatches the grid like MLX (`dispatchThreads` with
   `min(threadgroup, grid)`) and writes the outputs;
3. compiles that with g++ against `metal_compat.h` (which stands in for MLX's Metal prelude)
   with AddressSanitizer and UBSan's integer checks, caches the executable by source hash
   (`$M3MLX_MSL_CACHE`, default a per-user temp dir; the generated `.cpp` stays beside it),
   runs it with the inputs streamed to its stdin (see `write_inputs` for the format), and
   returns the outputs as MLX arrays.

A kernel error (out-of-bounds access, barrier divergence, deadlock, ...) raises HarnessError,
and so does C++ that Metal does not have (`double`, `std::`, `static`, ...).
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
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

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
MAX_CONSTANT_ARRAY_SIZE = 8  # MLX: inputs with fewer elements go to the constant space

TYPE_NAMES = {
    mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t",
    mx.bool_: "bool", mx.int8: "int8_t", mx.int16: "int16_t", mx.int32: "int32_t",
    mx.int64: "int64_t", mx.uint8: "uint8_t", mx.uint16: "uint16_t",
    mx.uint32: "uint32_t", mx.uint64: "uint64_t",
}
# numpy storage for each MLX dtype (bf16 travels as its raw 16 bits)
NP_STORAGE = {
    mx.float32: np.float32, mx.float16: np.float16, mx.bfloat16: np.uint16, mx.bool_: np.bool_,
    mx.int8: np.int8, mx.int16: np.int16, mx.int32: np.int32, mx.int64: np.int64,
    mx.uint8: np.uint8, mx.uint16: np.uint16, mx.uint32: np.uint32, mx.uint64: np.uint64,
}
FROM_NP = {np.dtype(v): k for k, v in NP_STORAGE.items() if k != mx.bfloat16}

# MLX's attribute table, in MLX's order (backend/common/metal_kernel.cpp).
ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]


class HarnessError(RuntimeError):
    """The kernel failed under the harness: a sanitizer report, divergence or deadlock."""


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

    @property
    def suffix(self):
        if self.ndim == 0:
            return "s"
        return "c" if self.size < MAX_CONSTANT_ARRAY_SIZE else ""


# ---------------------------------------------------------------------------------------------
# The source MLX generates
# ---------------------------------------------------------------------------------------------


def template_text(template) -> str:
    """MLX's write_template: `<a, b, c>`; bools print as 1/0, dtypes as Metal type names."""
    parts = []
    for _, value in template:
        if isinstance(value, bool):
            parts.append("1" if value else "0")
        elif isinstance(value, int):
            parts.append(str(value))
        else:
            parts.append(TYPE_NAMES[value])
    return "<" + ", ".join(parts) + ">"


def _template_params(template) -> str:
    def kind(value):
        if isinstance(value, bool):
            return "bool"
        return "int" if isinstance(value, int) else "typename"

    return "template <" + ", ".join(f"{kind(v)} {n}" for n, v in template) + ">\n"


def kernel_name(spec, inputs: list[_Input], output_dtypes, template) -> str:
    name = "custom_kernel_" + spec.name
    if template:
        name += "_" + re.sub(r"<|>|(, )", "_", template_text(template))[:-1]
    for x in inputs:
        name += "_" + TYPE_NAMES[x.dtype] + x.suffix
    for dtype in output_dtypes:
        name += "_" + TYPE_NAMES[dtype]
    return name


def shape_infos(spec):
    src = spec.source
    return [
        (f"{n}_shape" in src, f"{n}_strides" in src, f"{n}_ndim" in src) for n in spec.input_names
    ]


def used_attributes(spec):
    return [(a, t) for a, t in ATTRIBUTES if a in spec.source]


def mlx_source(spec, inputs: list[_Input], output_dtypes, template) -> tuple[str, str]:
    """(kernel name, source) exactly as MLX's metal_kernel generates them."""
    name = kernel_name(spec, inputs, output_dtypes, template)
    attributes = [f"  {t} {a} [[{a}]]" for a, t in used_attributes(spec)]
    out = [spec.header]
    if template:
        out.append(_template_params(template))
    out.append(f"[[kernel]] void {name}(\n")
    index = 0
    for x, (has_shape, has_strides, has_ndim) in zip(inputs, shape_infos(spec)):
        location = "constant" if x.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if x.ndim == 0 else "*"
        out.append(f"  const {location} {TYPE_NAMES[x.dtype]}{ref} {x.name} [[buffer({index})]],\n")
        index += 1
        if x.ndim > 0:
            if has_shape:
                out.append(f"  const constant int* {x.name}_shape [[buffer({index})]],\n")
                index += 1
            if has_strides:
                out.append(f"  const constant int64_t* {x.name}_strides [[buffer({index})]],\n")
                index += 1
            if has_ndim:
                out.append(f"  const constant int& {x.name}_ndim [[buffer({index})]],\n")
                index += 1
    for oname, dtype in zip(spec.output_names, output_dtypes):
        type_string = TYPE_NAMES[dtype]
        if spec.atomic_outputs:
            type_string = f"atomic<{type_string}>"
        out.append(f"  device {type_string}* {oname} [[buffer({index})]]")
        # MLX's own condition, index counting the shape/stride buffers too.
        if index < len(inputs) + len(spec.output_names) - 1 or attributes:
            out.append(",\n")
        else:
            out.append(") {\n")
        index += 1
    for i, attr in enumerate(attributes):
        out.append(attr + (",\n" if i < len(attributes) - 1 else ") {\n"))
    out.append(spec.source)
    out.append("\n}\n")
    if template:
        inst = name + template_text(template)
        out.append(
            f'\ntemplate [[host_name("{name}")]] [[kernel]] decltype({inst}) {inst};\n'
        )
    return name, "".join(out)


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


# C++ that the harness would compile but Metal rejects (a short list, not a Metal compiler).
_NOT_METAL = re.compile(r"\b(double|std::|printf|malloc|free|new|delete|static|goto|throw|try|"
                        r"thread_local|long double)\b")


def check_metal_subset(spec):
    """Refuse bodies that use C++ Metal does not have, so they cannot pass here only."""
    for part in (spec.header, spec.source):
        code = re.sub(r"//[^\n]*|/\*.*?\*/", "", part, flags=re.DOTALL)
        found = _NOT_METAL.search(code)
        if found:
            raise HarnessError(f"{spec.name}: {found.group(0)!r} is not available in Metal")


def harness_program(spec, name, source, inputs: list[_Input], output_dtypes, template) -> str:
    lines = ['#include "metal_compat.h"', rewrite_threadgroup_decls(source),
             '#include "harness_io.h"', "",
             "int main(int argc, char** argv) {",
             "  if (argc != 3) msl::fail(\"usage: kernel INPUTS OUTPUTS\");",
             "  msl::Reader in(argv[1]);",
             "  uint3 grid = in.dims();",
             "  uint3 threadgroup_size = in.dims();"]
    args = []
    for i, (x, (has_shape, has_strides, has_ndim)) in enumerate(zip(inputs, shape_infos(spec))):
        lines.append(f"  auto in{i} = in.input<{TYPE_NAMES[x.dtype]}>();")
        args.append(f"*in{i}.data" if x.ndim == 0 else f"in{i}.data")
        if x.ndim > 0:
            args += [f"in{i}.shape"] * has_shape + [f"in{i}.strides"] * has_strides
            args += [f"in{i}.ndim"] * has_ndim
    for i, dtype in enumerate(output_dtypes):
        if spec.atomic_outputs:
            raise NotImplementedError("the harness does not emulate atomic outputs")
        lines.append(f"  auto out{i} = in.output<{TYPE_NAMES[dtype]}>();")
        args.append(f"out{i}.data")
    args += [f"id.{a}" for a, _ in used_attributes(spec)]
    callee = name + (template_text(template) if template else "")
    lines += [
        "  msl::dispatch(grid, threadgroup_size, [&](const msl::ThreadIds& id) {",
        f"    {callee}({', '.join(args)});",
        "  });",
        "  msl::Writer w(argv[2]);",
    ]
    lines += [f"  w.put(out{i});" for i in range(len(output_dtypes))]
    lines += ["  return 0;", "}", ""]
    return "\n".join(lines)


def cache_dir() -> Path:
    root = os.environ.get("M3MLX_MSL_CACHE") or os.path.join(
        tempfile.gettempdir(), f"m3mlx-msl-{os.getuid()}")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def build(program: str) -> Path:
    """Compile (or reuse) the executable for this exact program text."""
    if shutil.which(COMPILER) is None:
        raise HarnessError(f"the kernel harness needs a C++17 compiler; {COMPILER!r} not found")
    key = hashlib.sha256()
    for part in (program, " ".join(FLAGS), (HERE / "metal_compat.h").read_text(),
                 (HERE / "harness_io.h").read_text()):
        key.update(part.encode())
    exe = cache_dir() / f"k{key.hexdigest()[:24]}"
    if exe.exists():
        return exe
    # The source stays next to the executable, so sanitizer reports point at a readable file.
    src = exe.with_suffix(".cpp")
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        (Path(tmp) / "k.cpp").write_text(program)
        os.replace(Path(tmp) / "k.cpp", src)
        out = Path(tmp) / "kernel"
        proc = subprocess.run([COMPILER, *FLAGS, f"-I{HERE}", str(src), "-o", str(out)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise HarnessError(f"compiling {src} failed:\n{proc.stderr[-6000:]}")
        os.replace(out, exe)
    return exe


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
# Entry point
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
    template = list(launch.template or [])
    name, source = mlx_source(spec, inputs, launch.output_dtypes, template)
    program = harness_program(spec, name, source, inputs, launch.output_dtypes, template)
    return build(program), inputs, name


def run(spec, launch, timeout=600) -> list[mx.array]:
    """Run one launch of `spec` on the emulated grid; the outputs as MLX arrays.

    The inputs stream to the executable through a pipe straight from the arrays' own memory
    (MLX arrays, and numpy arrays in `View`s, are read in place), so gigabyte-sized inputs
    cost no copies on the way."""
    exe, inputs, name = prepare(spec, launch)
    with tempfile.TemporaryDirectory() as tmp:
        dst, log = Path(tmp) / "out.bin", Path(tmp) / "stderr.txt"
        with open(log, "wb") as err:
            proc = subprocess.Popen([str(exe), "/dev/stdin", str(dst)], stdin=subprocess.PIPE,
                                    stderr=err, env={**os.environ, **RUN_ENV})
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
        if code != 0:
            report = log.read_text(errors="replace")
            raise HarnessError(
                f"{name} failed under the harness (exit {code}):\n{report[-8000:]}")
        return _decode(dst.read_bytes(), launch)
