"""Would Metal take the kernels? MLX's own generated source, and the strict compile check
(`msl/strict.py`: clang, C++14, Metal's address spaces and types, no thread array left in
memory) on every kernel at M3's real geometry and at the shapes the kernel tests run."""

import mlx.core as mx
import pytest
from msl import cases, shapes, source, strict
from msl.cases import Spec
from msl.moe_cases import FORMATS

from m3mlx.metal_kernels import kernel, moe, msa_kernels

M3_CONTEXTS = [8192, 131072, 1 << 20]
MOE_SMALL = dict(E=16, D=576, F=192, FS=128, K=4)


def launch_cases():
    """(id, spec, launch) for every kernel launch the checks cover."""
    out = []

    def add(tag, launches):
        out.extend(pytest.param(spec, launch, id=f"{spec.name}-{tag}")
                   for spec, launch in launches)

    for context in M3_CONTEXTS:  # M3: decode, and a 2048-token prefill chunk
        add(f"m3-decode-{context}", shapes.m3_msa_launches(context, 1))
        add(f"m3-prefill-{context}", shapes.m3_msa_launches(context, 2048))
    add("m3-decode-int8", shapes.m3_msa_launches(8192, 1, int8=True))
    add("m3-prefill-int8", shapes.m3_msa_launches(8192, 2048, int8=True))
    add("m3-decode-fp32", shapes.m3_msa_launches(8192, 1, mx.float32))
    for bits in (8, 4):  # compact K/V in a pool of blocks (a memory tier), and contiguous
        add(f"m3-decode-kv{bits}-pooled", shapes.m3_kv_attention_launches(131072, 1, bits, True))
        add(f"m3-prefill-kv{bits}-pooled",
            shapes.m3_kv_attention_launches(131072, 2048, bits, True))
        add(f"m3-decode-kv{bits}", shapes.m3_kv_attention_launches(1 << 20, 1, bits, False))
    add("m3-decode-pooled", shapes.attention_launches(1, 4, 16, 128, 128, 128, 16, 8191, 1, 0,
                                                      mx.bfloat16, paged=True))
    for i, shape in enumerate(shapes.INDEX_SHAPES):
        add(f"index-{i}", shapes.index_launches(*shape))
    for i, shape in enumerate(shapes.ATTENTION_SHAPES):
        add(f"attention-{i}", shapes.attention_launches(*shape))
    for i, shape in enumerate(shapes.CONSTANT_SPACE_SHAPES):
        add(f"constant-{i}", shapes.msa_launches(*shape))
    for i, shape in enumerate(shapes.KV_ATTENTION_SHAPES):
        add(f"kv-attention-{i}", shapes.attention_launches(*shape[:10], mx.float32, *shape[10:]))
    for name, fmt in FORMATS.items():
        for T in (1, moe.MAX_TOKENS):
            add(f"m3-{name}-T{T}", shapes.moe_launches(fmt, T, **shapes.M3_MOE))
        add(f"small-{name}", shapes.moe_launches(fmt, 3, **MOE_SMALL, dtype=mx.float32))
    add("m3-mixed", shapes.moe_launches(FORMATS["affine3"], 1, **shapes.M3_MOE,
                                        shared_fmt=FORMATS["affine8"]))
    add("m3-no-shared", shapes.moe_launches(FORMATS["mxfp4"], 1, **{**shapes.M3_MOE, "FS": 0}))
    add("m3-streamed", shapes.moe_launches(FORMATS["affine4"], 1, **shapes.M3_MOE, slots=32))
    return out


CASES = launch_cases()


@pytest.fixture(scope="module", autouse=True)
def strict_programs():
    """Every case's strict program, compiled in parallel before the cases check them."""
    if cases.STRICT:
        strict.prebuild([param.values for param in CASES])


@pytest.mark.parametrize("spec,launch", CASES)
def test_mlx_generates_the_source_the_harness_compiles(spec, launch):
    """MLX itself (no compiler): its generated kernel name and source for the launch are the
    ones the harness reproduces and compiles."""
    assert source.exported_source(spec, launch) == source.launch_source(spec, launch)


@cases.strict_only
@pytest.mark.parametrize("spec,launch", CASES)
def test_kernel_compiles_strictly_with_its_arrays_in_registers(spec, launch):
    strict.check(spec, launch)


def test_kernel_plans_fit_the_threadgroup_limits():
    """The planners' footprints (no kernel runs): every covered launch fits 32 KB and the
    register budget, and MLX's dispatch limit of 1024 threads a threadgroup."""
    for param in CASES:
        spec, launch = param.values
        assert launch.threadgroup[0] * launch.threadgroup[1] * launch.threadgroup[2] <= 1024
    assert msa_kernels.index_scores_mma_footprint(128).fits
    assert msa_kernels.prefill_attention_footprint(16, 128, 128, 16).fits
    assert msa_kernels.decode_attention_footprint(16, 128, 128).fits
    assert msa_kernels.decode_attention_footprint(16, 128, 128, kv_bits=8).fits
    assert msa_kernels.prefill_attention_footprint(16, 128, 128, 16, paged=True).fits


# ---------------------------------------------------------------------------------------------
# The strict check catches what Metal rejects (and the runtime harness would let through)
# ---------------------------------------------------------------------------------------------


def probe(body, header="", inputs=None, template=()):
    """A one-output kernel over `inputs` (default: a 16-float array `x`)."""
    inputs = inputs or {"x": mx.zeros((16,))}
    spec = Spec("probe", tuple(inputs), ("out",), body, header)
    launch = kernel.Launch(list(inputs.values()), [(32,)], [mx.float32], (32, 1, 1),
                           (32, 1, 1), list(template))
    return spec, launch


def rejects(spec_launch, message):
    with pytest.raises(source.HarnessError, match=message):
        strict.check(*spec_launch)


def accepts(spec_launch):
    strict.check(*spec_launch)


@cases.strict_only
def test_a_device_pointer_does_not_take_a_constant_buffer():
    # Finding 3's latent error: inputs under 8 elements are `constant`, not `device`.
    helper = "inline float first(const device float* p) { return p[0]; }\n"
    generic = "template <typename P> inline float first(P p) { return p[0]; }\n"
    small = {"x": mx.zeros((4,))}
    body = "out[thread_position_in_grid.x] = first(x);"
    rejects(probe(body, helper, small), "address space")
    accepts(probe(body, generic, small))
    accepts(probe(body, helper))  # 16 elements: `device`


@cases.strict_only
def test_threadgroup_arrays_live_at_kernel_scope_only():
    use = "t[thread_index_in_simdgroup] = x[0];\nout[thread_position_in_grid.x] = t[0];"
    accepts(probe(f"threadgroup float t[32];\n{use}"))
    rejects(probe(f"if (x[0] > 0) {{\n  threadgroup float t[32];\n  {use}\n}}"),
            "automatic variable qualified with an address space")
    helper = ("inline float f(float v) {\n  threadgroup float t[32];\n  t[0] = v;\n"
              "  return t[0];\n}\n")
    rejects(probe("out[thread_position_in_grid.x] = f(x[0]);", helper),
            "automatic variable qualified with an address space")


@cases.strict_only
@pytest.mark.parametrize("expr,ok", [
    ("simd_sum(x[0])", True),
    ("simd_sum(half(x[0]))", True),
    ("simd_sum(int(x[0]))", True),
    ("float(simd_sum(bfloat16_t(x[0])))", False),  # Metal has no bfloat simd reductions
    ("float(simd_sum(int64_t(x[0])))", False),  # nor 64-bit ones
    ("float(simd_and(x[0] > 0.0f))", False),  # simd_and is for integers
    ("float(simd_shuffle(x[0] > 0.0f, ushort(1)))", True),  # bool exchanges are fine
])
def test_simd_functions_take_metal_types_only(expr, ok):
    check = accepts if ok else lambda sl: rejects(sl, "no matching function")
    check(probe(f"out[thread_position_in_grid.x] = {expr};"))


@cases.strict_only
def test_vectors_build_from_one_value_or_several():
    accepts(probe("float4 v = float4(x[0], x[1], float2(x[2], x[3]).y, 1.0f);\n"
                  "uint2 w = uint2(3);\nout[thread_position_in_grid.x] = v.w + v.x + float(w.y);"))


@cases.strict_only
def test_cpp17_and_double_are_refused():
    rejects(probe("if constexpr (true) { out[0] = x[0]; }"), "constexpr")
    rejects(probe("double d = x[0];\nout[0] = d;"), "'double' is not available in Metal")
    rejects(probe("int n = int(x[0]);\nfloat a[n];\na[0] = 1;\nout[0] = a[0];"), "variable")


@cases.strict_only
def test_a_thread_array_indexed_at_run_time_is_caught_as_a_spill():
    # Finding 7: small per-thread arrays must be indexed by compile-time constants.
    loop = "for (int i = 0; i < 8; ++i) {\n  a[i] = x[i];\n}\n"
    use = "float s = 0.0f;\nfor (int i = 0; i < n; ++i) {\n  s += a[i & 7];\n}\n"
    body = ("const int n = int(x[15]);\nfloat a[8];\n" + "{pragma}" + loop + use +
            "out[thread_position_in_grid.x] = s;")
    rejects(probe(body.replace("{pragma}", "MLX_MTL_PRAGMA_UNROLL\n")), "kept in memory")
    unrolled = ("float a[8];\nMLX_MTL_PRAGMA_UNROLL\n" + loop + "float s = 0.0f;\n"
                "MLX_MTL_PRAGMA_UNROLL\nfor (int i = 0; i < 8; ++i) {\n  s += a[i];\n}\n"
                "out[thread_position_in_grid.x] = s;")
    accepts(probe(unrolled))
    rejects(probe(unrolled.replace("MLX_MTL_PRAGMA_UNROLL\n", "")), "kept in memory")
    rejects(probe("MLX_MTL_PRAGMA_UNROLL\nfor (int i = 0; i < int(x[0]); ++i) {\n"
                  "  out[i] = 0;\n}"), "loop not unrolled")


@cases.strict_only
def test_simdgroup_matrices_are_used_through_their_functions_only():
    head = ("threadgroup float t[64];\nt[thread_index_in_simdgroup] = x[0];\n"
            "simdgroup_float8x8 m;\nsimdgroup_load(m, t, 8);\n")
    accepts(probe(head + "simdgroup_multiply_accumulate(m, m, m, m);\nsimdgroup_store(m, t, 8);"
                  "\nout[thread_position_in_grid.x] = t[0];"))
    rejects(probe(head + "out[0] = m.thread_elements()[0];"), "thread_elements")
    rejects(probe("threadgroup half t[64];\nsimdgroup_float8x8 m;\nsimdgroup_load(m, t, 8);\n"
                  "out[0] = x[0];"), "no matching function")
    rejects(probe("simdgroup_matrix<int, 8, 8> m;\nout[0] = x[0];"), "float, half or bfloat")


@cases.strict_only
def test_program_scope_variables_must_be_constant():
    body = "counter += 1;\nout[0] = x[0] + counter;"
    rejects(probe(body, "int counter = 0;\n"), "constant address space")
    accepts(probe("out[0] = x[0] + K;", "constexpr constant int K = 3;\n"))
