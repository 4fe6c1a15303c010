"""The Metal source MLX generates for one launch of a kernel, two ways.

`mlx_source` writes it as MLX's `metal_kernel` does (`write_signature` and the template
instantiation in MLX's `backend/common/metal_kernel.cpp`, unchanged since MLX 0.32.1): header,
`template <...>`, the generated signature with `[[buffer(i)]]` inputs (scalars by `constant`
reference, arrays with fewer than 8 elements as `const constant T*`, the others as
`const device T*`), `*_shape` / `*_strides` / `*_ndim` only when the body names them, the
outputs, the thread-position attributes the body names, the body, and the explicit template
instantiation, under MLX's kernel name.

`exported_source` asks MLX itself: it builds the runtime's own `mx.fast.metal_kernel` for the
spec (`m3mlx.metal_kernels.kernel.build`), calls it with the launch inside `mx.export_function`
(MLX records a custom kernel without running it, even with no Metal back end), and reads the
kernel name and source back from the exported file. A test holds the two equal, so the harness
and the strict compile check compile exactly what Metal would be given.
"""

from __future__ import annotations

import re
import struct
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from m3mlx.metal_kernels import kernel

MAX_CONSTANT_ARRAY_SIZE = 8  # MLX: inputs with fewer elements go to the constant space

TYPE_NAMES = {
    mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t",
    mx.bool_: "bool", mx.int8: "int8_t", mx.int16: "int16_t", mx.int32: "int32_t",
    mx.int64: "int64_t", mx.uint8: "uint8_t", mx.uint16: "uint16_t",
    mx.uint32: "uint32_t", mx.uint64: "uint64_t",
}

# MLX's attribute table, in MLX's order.
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
    """A kernel failed a check: its source is not Metal, or it misbehaved on the emulated GPU."""


def arg_kind(ndim: int, size: int) -> str:
    """How MLX passes an input: "s" a scalar, "c" a small array in `constant`, "" `device`."""
    if ndim == 0:
        return "s"
    return "c" if size < MAX_CONSTANT_ARRAY_SIZE else ""


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


def kernel_name(spec, args, output_dtypes, template) -> str:
    """args: (dtype, ndim, size) per input."""
    name = "custom_kernel_" + spec.name
    if template:
        name += "_" + re.sub(r"<|>|(, )", "_", template_text(template))[:-1]
    for dtype, ndim, size in args:
        name += "_" + TYPE_NAMES[dtype] + arg_kind(ndim, size)
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


def mlx_source(spec, args, output_dtypes, template) -> tuple[str, str]:
    """(kernel name, source) as MLX's metal_kernel generates them; args: (dtype, ndim, size)."""
    name = kernel_name(spec, args, output_dtypes, template)
    attributes = [f"  {t} {a} [[{a}]]" for a, t in used_attributes(spec)]
    out = [spec.header]
    if template:
        out.append(_template_params(template))
    out.append(f"[[kernel]] void {name}(\n")
    index = 0
    for xname, (dtype, ndim, size), (has_shape, has_strides, has_ndim) in zip(
            spec.input_names, args, shape_infos(spec)):
        location = "constant" if size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if ndim == 0 else "*"
        out.append(f"  const {location} {TYPE_NAMES[dtype]}{ref} {xname} [[buffer({index})]],\n")
        index += 1
        if ndim > 0:
            if has_shape:
                out.append(f"  const constant int* {xname}_shape [[buffer({index})]],\n")
                index += 1
            if has_strides:
                out.append(f"  const constant int64_t* {xname}_strides [[buffer({index})]],\n")
                index += 1
            if has_ndim:
                out.append(f"  const constant int& {xname}_ndim [[buffer({index})]],\n")
                index += 1
    for oname, dtype in zip(spec.output_names, output_dtypes):
        type_string = TYPE_NAMES[dtype]
        if spec.atomic_outputs:
            type_string = f"atomic<{type_string}>"
        out.append(f"  device {type_string}* {oname} [[buffer({index})]]")
        # MLX's own condition, index counting the shape/stride buffers too.
        if index < len(args) + len(spec.output_names) - 1 or attributes:
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


def launch_args(launch) -> list:
    """(dtype, ndim, size) of each input of a launch, as MLX will see them."""
    args = []
    for x in launch.inputs:
        if isinstance(x, (bool, int, float)):
            x = mx.array(x)
        args.append((x.dtype, len(x.shape), int(np.prod(x.shape))))
    return args


def launch_source(spec, launch) -> tuple[str, str]:
    return mlx_source(spec, launch_args(launch), launch.output_dtypes,
                      list(launch.template or []))


def _read_string(data: bytes, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", data, pos)
    return data[pos + 8:pos + 8 + n].decode(), pos + 8 + n


def exported_source(spec, launch) -> tuple[str, str]:
    """(kernel name, source) as MLX itself generates them for this launch."""
    arrays = [isinstance(x, mx.array) or hasattr(x, "to_mx") for x in launch.inputs]
    stand_ins = [mx.zeros(x.shape, x.dtype) for x, a in zip(launch.inputs, arrays) if a]
    built = kernel.build(spec)

    def fn(*xs):
        it = iter(xs)
        inputs = [next(it) if a else x for x, a in zip(launch.inputs, arrays)]
        call = kernel.Launch(inputs, launch.output_shapes, launch.output_dtypes, launch.grid,
                             launch.threadgroup, launch.template, launch.init_value)
        return kernel.call(built, call)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.mlxfn"
        mx.export_function(str(path), fn, *stand_ins)
        data = path.read_bytes()
    marker = b"CustomKernel"
    at = data.find(struct.pack("<Q", len(marker)) + marker)
    if at < 0:
        raise HarnessError(f"{spec.name}: no custom kernel in MLX's exported function")
    name, pos = _read_string(data, at + 8 + len(marker))
    source, _ = _read_string(data, pos)
    if not name.startswith("custom_kernel_") or f"void {name}(" not in source:
        raise HarnessError(f"{spec.name}: could not read the kernel source back from MLX "
                          f"{mx.__version__}'s export format")
    return name, source


# C++ that the harness would compile but Metal rejects (a short list; the strict compile
# mode catches the rest).
_NOT_METAL = re.compile(r"\b(double|std::|printf|malloc|free|new|delete|static|goto|throw|try|"
                        r"thread_local|long double)\b")


def check_metal_subset(spec):
    """Refuse bodies that use C++ Metal does not have, so they cannot pass here only."""
    for part in (spec.header, spec.source):
        code = re.sub(r"//[^\n]*|/\*.*?\*/", "", part, flags=re.DOTALL)
        found = _NOT_METAL.search(code)
        if found:
            raise HarnessError(f"{spec.name}: {found.group(0)!r} is not available in Metal")
