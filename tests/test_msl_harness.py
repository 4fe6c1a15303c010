"""The Metal-on-CPU harness itself: MLX's generated source, the emulated GPU, and its alarms."""

import mlx.core as mx
import numpy as np
import pytest
from msl import cases, harness
from msl.cases import Spec

from m3mlx.metal_kernels.msa_kernels import Launch

pytestmark = cases.harness_only


def run1(source, inputs, out_shape, out_dtype=mx.float32, grid=None, threadgroup=(32, 1, 1),
         names=None, template=None, init_value=None):
    names = names or tuple(f"x{i}" for i in range(len(inputs)))
    spec = Spec("probe", names, ("out",), source)
    grid = grid or (int(np.prod(out_shape)), 1, 1)
    launch = Launch(inputs, [out_shape], [out_dtype], grid, threadgroup, template, init_value)
    return np.array(harness.run(spec, launch)[0])


def test_generated_source_is_mlx_signature():
    spec = Spec("demo", ("a", "n", "c"), ("out",),
                "out[0] = a[a_shape[0] * a_strides[1]] + n + c[2] + "
                "thread_position_in_grid.x + threads_per_threadgroup.x;", header="// hdr\n")
    inputs = [harness._to_input("a", mx.zeros((4, 3), mx.float16), True),
              harness._to_input("n", 5, True),
              harness._to_input("c", mx.zeros((3,), mx.int32), True)]
    template = [("T", mx.float32), ("N", 4), ("F", False)]
    name, source = harness.mlx_source(spec, inputs, [mx.float32], template)
    assert name == "custom_kernel_demo__float_4_0_float16_t_int32_ts_int32_tc_float"
    assert source == (
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
