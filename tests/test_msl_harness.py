"""The Metal-on-CPU harness itself: MLX's generated source, the emulated GPU, and its alarms."""

import mlx.core as mx
import numpy as np
import pytest
from msl import cases, harness, source
from msl.cases import Spec

from m3mlx.metal_kernels.kernel import Launch

pytestmark = cases.harness_only


def run1(body, inputs, out_shape, out_dtype=mx.float32, grid=None, threadgroup=(32, 1, 1),
         names=None, template=None, init_value=None, order="in-order"):
    names = names or tuple(f"x{i}" for i in range(len(inputs)))
    spec = Spec("probe", names, ("out",), body)
    grid = grid or (int(np.prod(out_shape)), 1, 1)
    launch = Launch(inputs, [out_shape], [out_dtype], grid, threadgroup, template, init_value)
    return np.array(harness.run_with_stats(spec, launch, order)[0][0])


def test_generated_source_is_mlx_signature():
    spec = Spec("demo", ("a", "n", "c"), ("out",),
                "out[0] = a[a_shape[0] * a_strides[1]] + n + c[2] + "
                "thread_position_in_grid.x + threads_per_threadgroup.x;", header="// hdr\n")
    launch = Launch([mx.zeros((4, 3), mx.float16), 5, mx.zeros((3,), mx.int32)], [(1,)],
                    [mx.float32], (1, 1, 1), (1, 1, 1), [("T", mx.float32), ("N", 4), ("F", False)])
    name, text = source.launch_source(spec, launch)
    assert (name, text) == source.exported_source(spec, launch)  # MLX's own text
    assert name == "custom_kernel_demo__float_4_0_float16_t_int32_ts_int32_tc_float"
    assert text == (
        "// hdr\n"
        "template <typename T, int N, bool F>\n"
        f"[[kernel]] void {name}(\n"
        "  const device float16_t* a [[buffer(0)]],\n"
        "  const constant int* a_shape [[buffer(1)]],\n"
        "  const constant int64_t* a_strides [[buffer(2)]],\n"
        "  const constant int32_t& n [[buffer(3)]],\n"
        "  const constant int32_t* c [[buffer(4)]],\n"
        "  device float* out [[buffer(5)]],\n"
        "  uint3 thread_position_in_grid [[thread_position_in_grid]],\n"
        "  uint3 threads_per_threadgroup [[threads_per_threadgroup]]) {\n"
        + spec.source + "\n}\n\n"
        f'template [[host_name("{name}")]] [[kernel]] decltype({name}<float, 4, 0>) '
        f"{name}<float, 4, 0>;\n"
    )


def test_simdgroup_operations():
    src = """
    uint lane = thread_index_in_simdgroup;
    uint i = thread_position_in_grid.x;
    float v = x0[i];
    float* o = out + i * 12;
    o[0] = simd_sum(v);
    o[1] = simd_max(v);
    o[2] = simd_min(v);
    o[3] = simd_shuffle(v, (lane * 7) % 32);
    o[4] = simd_shuffle_xor(v, 5);
    o[5] = simd_shuffle_down(v, 3);
    o[6] = simd_shuffle_up(v, 2);
    o[7] = simd_broadcast(v, 9);
    o[8] = simd_prefix_exclusive_sum(v);
    o[9] = simd_prefix_inclusive_sum(v);
    o[10] = float(simd_sum(int(lane)));
    o[11] = simd_any(v > 60.0f) ? 1.0f : 0.0f;
    """
    x = np.random.default_rng(0).permutation(64).astype(np.float32)
    got = run1(src, [mx.array(x)], (64, 12), grid=(64, 1, 1), threadgroup=(64, 1, 1))
    for s in range(2):
        v = x[32 * s: 32 * s + 32]
        lanes = np.arange(32)
        want = np.stack([
            np.full(32, v.sum()), np.full(32, v.max()), np.full(32, v.min()),
            v[(lanes * 7) % 32], v[lanes ^ 5],
            np.where(lanes + 3 < 32, v[np.minimum(lanes + 3, 31)], v),
            np.where(lanes >= 2, v[np.maximum(lanes - 2, 0)], v),
            np.full(32, v[9]), np.cumsum(v) - v, np.cumsum(v),
            np.full(32, 496.0), np.full(32, float((v > 60).any())),
        ], axis=1)
        np.testing.assert_array_equal(got[32 * s: 32 * s + 32], want)


def test_threadgroup_memory_is_shared_and_barriers_order_it():
    src = """
    uint t = thread_position_in_threadgroup.x;
    threadgroup float buf[64];
    buf[t] = x0[thread_position_in_grid.x];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[thread_position_in_grid.x] = buf[63 - t];
    """
    x = np.arange(128, dtype=np.float32)
    got = run1(src, [mx.array(x)], (128,), threadgroup=(64, 1, 1))
    np.testing.assert_array_equal(got, x.reshape(2, 64)[:, ::-1].reshape(-1))


def test_a_missing_barrier_reads_poisoned_threadgroup_memory():
    src = """
    uint t = thread_position_in_threadgroup.x;
    threadgroup float buf[32];
    buf[t] = x0[t];
    out[t] = buf[(t + 1) % 32];
    """
    got = run1(src, [mx.ones(32)], (32,))
    assert np.isnan(got[:31]).all() and got[31] == 1  # neighbours had not written yet


def test_partial_threadgroups_at_the_grid_edge():
    src = """
    uint i = thread_position_in_grid.x;
    out[i] = threads_per_threadgroup.x * 1000 + thread_position_in_threadgroup.x
             + 100000 * threadgroup_position_in_grid.x + 0 * x0[0];
    """
    got = run1(src, [mx.zeros(1)], (100,), grid=(100, 1, 1), threadgroup=(64, 1, 1))
    i = np.arange(100)
    want = np.where(i < 64, 64000 + i, 100000 + 36000 + i - 64)
    np.testing.assert_array_equal(got, want)


def test_half_and_bfloat16_buffers():
    src = """
    uint i = thread_position_in_grid.x;
    out[i] = static_cast<bfloat16_t>(float(x0[i]) * 3.0f + float(x1[i]));
    """
    rng = np.random.default_rng(1)
    a = mx.array(rng.standard_normal(40).astype(np.float32)).astype(mx.bfloat16)
    b = mx.array(rng.standard_normal(40).astype(np.float32)).astype(mx.float16)
    spec = Spec("probe", ("x0", "x1"), ("out",), src)
    (got,) = harness.run(spec, Launch([a, b], [(40,)], [mx.bfloat16], (40, 1, 1), (32, 1, 1)))
    want = (a.astype(mx.float32) * 3 + b.astype(mx.float32)).astype(mx.bfloat16)
    assert got.dtype == mx.bfloat16
    np.testing.assert_array_equal(np.array(got.view(mx.uint16)), np.array(want.view(mx.uint16)))


def test_out_of_bounds_read_is_an_address_sanitizer_error():
    src = "out[thread_position_in_grid.x] = x0[thread_position_in_grid.x + 1];"
    with pytest.raises(harness.HarnessError, match="AddressSanitizer: heap-buffer-overflow"):
        run1(src, [mx.ones(40)], (40,))


def test_barrier_divergence_is_reported():
    src = """
    if (thread_position_in_threadgroup.x < 16) {
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    out[thread_position_in_grid.x] = x0[0];
    """
    with pytest.raises(harness.HarnessError, match="threadgroup_barrier"):
        run1(src, [mx.ones(1)], (64,), threadgroup=(64, 1, 1))


def test_barriers_at_different_calls_are_divergence():
    src = """
    float v = x0[0];
    if (thread_index_in_simdgroup == 0) {
      threadgroup_barrier(mem_flags::mem_threadgroup);
    } else {
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    out[thread_position_in_grid.x] = v;
    """
    with pytest.raises(harness.HarnessError, match="different threadgroup_barrier calls"):
        run1(src, [mx.ones(1)], (64,), threadgroup=(64, 1, 1))


def test_simdgroup_divergence_is_reported():
    src = """
    float v = x0[0];
    v = thread_index_in_simdgroup < 16 ? simd_sum(v) : simd_max(v);
    out[thread_position_in_grid.x] = v;
    """
    with pytest.raises(harness.HarnessError, match="different simdgroup operations"):
        run1(src, [mx.ones(1)], (32,))


def test_threadgroup_memory_limit_is_enforced():
    src = """
    threadgroup float big[9000];
    big[thread_position_in_grid.x] = x0[0];
    out[thread_position_in_grid.x] = big[thread_position_in_grid.x];
    """
    with pytest.raises(harness.HarnessError, match="exceeds 32 KB"):
        run1(src, [mx.ones(1)], (32,))


def test_undefined_behaviour_is_a_sanitizer_error():
    src = "out[thread_position_in_grid.x] = x0[0] << 40;"
    with pytest.raises(harness.HarnessError, match="runtime error: shift exponent"):
        run1(src, [mx.ones(1, mx.int32)], (32,), out_dtype=mx.int32)


def test_cpp_that_metal_lacks_is_refused():
    with pytest.raises(harness.HarnessError, match="'double' is not available in Metal"):
        run1("double d = x0[0]; out[0] = d;", [mx.ones(1)], (1,))


@pytest.mark.parametrize("through_pointer,report", [
    (False, "runtime error: index 32 out of bounds"),  # UBSan's bounds check sees the array
    (True, "AddressSanitizer: heap-buffer-overflow"),  # a pointer into it: ASan
])
def test_threadgroup_memory_overflow_is_reported(through_pointer, report):
    src = f"""
    threadgroup float buf[32];
    threadgroup float* p = buf;
    {"p" if through_pointer else "buf"}[thread_index_in_threadgroup + 1] = x0[0];
    out[thread_position_in_grid.x] = 0;
    """
    with pytest.raises(harness.HarnessError, match=report):
        run1(src, [mx.ones(1)], (32,))


def test_simd_functions_take_metal_types_only():
    # bfloat has no simd reductions in Metal: the harness refuses to compile it, like Metal.
    src = "out[thread_position_in_grid.x] = float(simd_sum(bfloat16_t(x0[0])));"
    with pytest.raises(harness.HarnessError, match="simd functions take"):
        run1(src, [mx.ones(1)], (32,))


def test_threads_run_in_a_shuffled_order_between_barriers():
    # A race: thread t reads its neighbour's slot with no barrier between. In thread order
    # the neighbour always wrote first, so it passes; shuffled, some read unwritten memory.
    src = """
    uint t = thread_index_in_threadgroup;
    threadgroup float buf[64];
    buf[t] = x0[t];
    out[t] = buf[t == 0 ? 0 : t - 1];
    """
    x = np.arange(64, dtype=np.float32)
    want = np.concatenate([[0], x[:-1]])
    np.testing.assert_array_equal(run1(src, [mx.array(x)], (64,), threadgroup=(64, 1, 1)), want)
    shuffled = run1(src, [mx.array(x)], (64,), threadgroup=(64, 1, 1), order="shuffled")
    assert np.isnan(shuffled).any()
    fixed = src.replace("buf[t] = x0[t];",
                        "buf[t] = x0[t];\n threadgroup_barrier(mem_flags::mem_threadgroup);")
    np.testing.assert_array_equal(
        run1(fixed, [mx.array(x)], (64,), threadgroup=(64, 1, 1), order="shuffled"), want)


def test_the_threadgroup_memory_a_kernel_allocates_is_reported():
    spec = Spec("probe", ("x0",), ("out",),
                "threadgroup float a[40];\nthreadgroup int b[3][5];\n"
                "a[0] = x0[0];\nb[0][0] = 1;\nout[thread_position_in_grid.x] = a[0] + b[0][0];")
    launch = Launch([mx.ones(1)], [(64,)], [mx.float32], (64, 1, 1), (32, 1, 1))
    _, stats = harness.run_with_stats(spec, launch)
    assert stats.threadgroup_bytes == 40 * 4 + 15 * 4


# ---------------------------------------------------------------------------------------------
# simdgroup matrices
# ---------------------------------------------------------------------------------------------

MATRIX_KERNEL = """
const uint lane = thread_index_in_simdgroup;
threadgroup float a[64];
threadgroup float b[80];
threadgroup float o[64 * 5];
a[lane] = x0[lane];
a[lane + 32] = x0[lane + 32];
for (uint i = lane; i < 80; i += 32) {
  b[i] = x1[i];
}
simdgroup_barrier(mem_flags::mem_threadgroup);
simdgroup_float8x8 ma, mb, mt;
simdgroup_load(ma, a, 8);
simdgroup_load(mb, b, 10);  // b as an 8 x 8 block of an 8 x 10 matrix
simdgroup_load(mt, b, 10, 0, true);  // its transpose: element (r, c) = b[c * 10 + r]
simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(1.0f);
simdgroup_multiply_accumulate(acc, ma, mb, acc);  // a b + 1
simdgroup_float8x8 prod;
simdgroup_multiply(prod, ma, mt);  // a b'^T
simdgroup_float8x8 diag = simdgroup_float8x8(2.0f);  // the scalar constructor: 2 I
simdgroup_multiply(diag, diag, ma);
simdgroup_store(acc, o, 8);
simdgroup_store(prod, o + 64, 8);
simdgroup_store(diag, o + 128, 8);
simdgroup_store(ma, o + 192, 8, 0, true);  // a^T
simdgroup_barrier(mem_flags::mem_threadgroup);
for (uint i = lane; i < 256; i += 32) {
  out[i] = o[i];
}
"""


def test_simdgroup_matrix_operations():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((8, 8)).astype(np.float32)
    b = rng.standard_normal((8, 10)).astype(np.float32)
    got = run1(MATRIX_KERNEL, [mx.array(a.ravel()), mx.array(b.ravel())], (256,), grid=(32, 1, 1))
    got = got.reshape(4, 8, 8)
    bt = b.ravel()[np.arange(8)[None, :] * 10 + np.arange(8)[:, None]]  # the transposed load
    np.testing.assert_allclose(got[0], a @ b[:, :8] + 1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], a @ bt, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[2], 2 * a)
    np.testing.assert_array_equal(got[3], a.T)


@pytest.mark.parametrize("mutation,report", [
    # A matrix built from a lane-dependent value differs across the lanes.
    ("make_filled_simdgroup_matrix<float, 8, 8>(1.0f)",
     "differs across the lanes"),
    # A lane-dependent pointer.
    ("simdgroup_load(ma, a, 8);", "differs across the lanes"),
    # A matrix operation some lanes skip.
    ("simdgroup_multiply(prod, ma, mt);", "not run by every lane|different simdgroup matrix"),
])
def test_simdgroup_matrix_misuse_is_reported(mutation, report):
    bad = {
        "make_filled_simdgroup_matrix<float, 8, 8>(1.0f)":
            "make_filled_simdgroup_matrix<float, 8, 8>(float(lane))",
        "simdgroup_load(ma, a, 8);": "simdgroup_load(ma, a + (lane & 1), 8);",
        "simdgroup_multiply(prod, ma, mt);":
            "if (lane < 16) {\n simdgroup_multiply(prod, ma, mt);\n}",
    }[mutation]
    assert MATRIX_KERNEL.count(mutation) == 1
    src = MATRIX_KERNEL.replace(mutation, bad)
    x = [mx.zeros((64,)), mx.zeros((80,))]
    with pytest.raises(harness.HarnessError, match=report):
        run1(src, x, (256,), grid=(32, 1, 1))


def test_simdgroup_matrix_reads_are_bounds_checked():
    src = MATRIX_KERNEL.replace("simdgroup_load(mb, b, 10);", "simdgroup_load(mb, b, 11);")
    with pytest.raises(harness.HarnessError, match="index 8. out of bounds|overflow"):
        run1(src, [mx.zeros((64,)), mx.zeros((80,))], (256,), grid=(32, 1, 1))
