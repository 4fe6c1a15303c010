"""Strict compile check: would Metal's compiler take this kernel, and keep its arrays in registers?

`check(spec, launch)` takes the source MLX generates for the launch (`source.exported_source`:
MLX's own text, read back from `mx.export_function`) and compiles it with clang as C++14
against `metal_strict.h`: distinct `device` / `constant` / `threadgroup` address spaces, the
simd functions only for Metal's types, simdgroup matrices, a bfloat distinct from half, no
standard library, no C++17, no variable-length arrays (and, as in the harness, no `double`). Two
rewrites only, both of things clang's C++ lacks and Metal has: each `threadgroup` array
declared at the kernel's own scope becomes a reference to threadgroup memory (one declared
anywhere else stays and is an error, as in Metal), the attributes on MLX's explicit template
instantiation are dropped, and a vector built from several values, `float4(a, b, c, d)`,
becomes the brace list `float4{a, b, c, d}` clang's vectors take (one value still splats).

It then optimises (-O2, every function inlined, loops unrolled only where the source asks with
MLX_MTL_PRAGMA_UNROLL) and reads the LLVM IR of the kernel: a thread array still in memory
(`alloca`) is an array indexed by a value the compiler cannot resolve, which on a GPU spills to
memory; the check fails on it, and on a pragma-unrolled loop whose trip count is not a constant.
Compiled results are cached like the harness's (`harness.cache_dir()`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

from . import harness, source

COMPILER = os.environ.get("M3MLX_MSL_CLANG", "clang++")
FLAGS = [
    "--target=aarch64-linux-gnu", "-std=c++14", "-ffreestanding", "-nostdinc", "-nostdinc++",
    "-fno-exceptions", "-fno-rtti", "-O2", "-fno-unroll-loops", "-mllvm",
    "-inline-threshold=100000", "-S", "-emit-llvm", "-include", "metal_strict.h",
    "-Wno-unknown-attributes", "-Werror=pass-failed", "-Werror=vla", "-Werror=return-type",
    "-Werror=array-bounds", "-Werror=c++17-extensions", "-Werror=c++20-extensions",
]


def available() -> bool:
    return shutil.which(COMPILER) is not None


def _kernel_body_span(text: str, body: str) -> tuple[int, int]:
    start = text.find(body)
    if start < 0:
        raise source.HarnessError("the kernel body is not in MLX's generated source")
    return start, start + len(body)


_INSTANTIATION = re.compile(r"^template \[\[host_name\(\"[^\"]*\"\)\]\] \[\[kernel\]\] ",
                            re.MULTILINE)


_VECTOR_CALL = re.compile(r"\b(?:float|half|bfloat|int|uint|short|ushort|char|uchar|long|ulong)"
                          r"[234]\(")


def _vector_braces(text: str) -> str:
    """`T4(a, b, c, d)` -> `T4{a, b, c, d}` for Metal's vector types (not `T4(a)`)."""
    out, pos = [], 0
    for m in _VECTOR_CALL.finditer(text):
        if m.start() < pos:
            continue
        depth, commas, i = 1, 0, m.end()
        while depth and i < len(text):
            depth += (text[i] in "([{") - (text[i] in ")]}")
            commas += text[i] == "," and depth == 1
            i += 1
        if commas:
            out += [text[pos:m.end() - 1], "{", _vector_braces(text[m.end():i - 1]), "}"]
            pos = i
    return "".join(out) + text[pos:]


def strict_program(spec, text: str) -> str:
    """MLX's generated source with the two rewrites described above."""
    start, end = _kernel_body_span(text, spec.source)
    body = text[start:end]
    depth_at = []
    depth = 0
    for ch in body:
        depth_at.append(depth)
        depth += (ch == "{") - (ch == "}")
    counter = iter(range(1 << 30))

    def at_kernel_scope(m):
        if depth_at[m.start()] != 0:
            return m.group(0)  # left alone: clang rejects it, as Metal would
        dims = re.sub(r"\s+", "", m["dims"])
        array = f"threadgroup {m['type']} (*){dims}"
        return (f"{m['indent']}threadgroup {m['type']} (&{m['name']}){dims} = "
                f"*reinterpret_cast<{array}>(__msl_threadgroup_memory({next(counter)}, "
                f"sizeof({m['type']}{dims})));")

    body = harness._TG_DECL.sub(at_kernel_scope, body)
    return _vector_braces(_INSTANTIATION.sub("template ", text[:start] + body + text[end:]))


def _kernel_ir(ir: str, name: str) -> str:
    for m in re.finditer(r"^define [^\n]*@(\S+)\(", ir, re.MULTILINE):
        if name in m.group(1):
            return ir[m.start():ir.index("\n}\n", m.start())]
    raise source.HarnessError(f"no function for {name} in the optimised IR")


def prebuild(pairs, workers=None) -> None:
    """Compile these launches' strict programs, one per CPU at a time (see harness.prebuild)."""
    if not available():
        return
    programs = []
    for spec, launch in pairs:  # MLX's export, in this thread
        with contextlib.suppress(source.HarnessError):
            programs.append((spec, strict_program(spec, source.exported_source(spec, launch)[1])))

    def one(job):
        spec, program = job
        with contextlib.suppress(source.HarnessError):
            harness.compile_cached(program, COMPILER, FLAGS, ["metal_strict.h"], ".ll",
                                   f"{spec.name} (strict)")

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as pool:
        list(pool.map(one, programs))


def check(spec, launch) -> str:
    """Raise HarnessError unless the kernel compiles strictly with no thread array in memory;
    returns the kernel's optimised IR."""
    if not available():
        raise source.HarnessError(f"the strict compile check needs {COMPILER!r} (Debian: "
                                  "apt-get install clang)")
    source.check_metal_subset(spec)
    name, text = source.exported_source(spec, launch)
    out = harness.compile_cached(strict_program(spec, text), COMPILER, FLAGS,
                                 ["metal_strict.h"], ".ll", f"{spec.name} (strict)")
    ir = _kernel_ir(out.read_text(), name)
    spilled = re.findall(r"= alloca ([^,\n]+)", ir)
    if spilled:
        raise source.HarnessError(
            f"{name}: thread arrays kept in memory (indexed by a value the compiler cannot "
            f"resolve; unroll the loop with MLX_MTL_PRAGMA_UNROLL): {', '.join(spilled)}")
    globals_ = re.findall(r"^@\S+ = (?!.*addrspace\(2\) constant)[^\n]*", out.read_text(),
                          re.MULTILINE)
    if globals_:
        raise source.HarnessError(f"{name}: program-scope variables outside the constant "
                                  f"address space: {globals_}")
    return ir
