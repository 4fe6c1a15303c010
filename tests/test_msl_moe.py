"""The MoE op: its gather twin against a dense reference, and its Metal kernels against the twin
on every kernel runner (`cases.RUNNERS`: the harness in thread order and shuffled, Metal)."""

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from msl import cases, harness
from msl.cases import Spec
from msl.cases import prebuilt  # noqa: F401 (the fixture)
from msl.moe_cases import FORMATS, SMALL, random_experts, routing

from m3mlx.metal_kernels import kernel, moe
from m3mlx.metal_kernels.moe import DenseWeight, ExpertWeights, QuantizedWeight

pytestmark = pytest.mark.usefixtures("prebuilt")

# ---------------------------------------------------------------------------------------------
# MLX's packing, as the kernels read it
# ---------------------------------------------------------------------------------------------

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)


def e4m3(q):
    e, m = (q >> 3) & 15, (q & 7).astype(np.float32)
    v = np.where(e == 0, m * 2.0**-9, (1 + m / 8) * 2.0 ** (e.astype(np.int32) - 7))
    v = np.where((q & 0x7F) == 0x7F, np.nan, v)
    return np.where(q & 0x80, -v, v).astype(np.float32)


def unpack(words, bits):
    """Codes from uint32 words: one LSB-first bit stream over the row (a code may straddle
    two words)."""
    stream = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=-1,
                           bitorder="little")
    n = stream.shape[-1] // bits
    chunks = stream[..., :n * bits].reshape(*stream.shape[:-1], n, bits)
    return (chunks.astype(np.uint32) << np.arange(bits, dtype=np.uint32)).sum(-1)


def pack(codes, bits):
    """The inverse of unpack: codes [..., n] (n * bits a multiple of 32) into uint32 words."""
    stream = ((codes[..., None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    stream = stream.reshape(*codes.shape[:-1], -1)
    return np.packbits(stream, axis=-1, bitorder="little").view(np.uint32)


def dequantize_np(w_q, scales, biases, group_size, bits, mode):
    """Our reading of mx.quantize's layout: affine s * q + b per group; mxfp4 / mxfp8 E2M1 /
    E4M3 codes times an E8M0 scale 2^(s - 127) (255 gives inf); nvfp4 E2M1 codes times an
    E4M3 scale."""
    q = unpack(np.asarray(w_q).astype(np.uint32), bits)
    per_group = lambda a: np.repeat(np.asarray(a), group_size, axis=-1)  # noqa: E731
    if mode == "affine":
        s = per_group(scales.astype(mx.float32))
        return s * q.astype(np.float32) + per_group(biases.astype(mx.float32))
    values = np.where(q & 8, -1, 1) * E2M1[q & 7] if bits == 4 else e4m3(q)
    with np.errstate(over="ignore", invalid="ignore"):
        raw = per_group(scales)
        scale = np.ldexp(np.float32(1), raw.astype(np.int32) - 127) if mode == "mxfp4" or \
            mode == "mxfp8" else e4m3(raw)
        return (values * scale).astype(np.float32)


def every_code(fmt, rows=8, cols=256):
    """(w_q, scales, biases) whose rows run through every code, with scales that include the
    extremes (E8M0 0 and 255, E4M3 subnormals, zero and NaN) or negative affine scales."""
    mode, bits, group = fmt
    rng = np.random.default_rng(bits)
    codes = np.resize(np.arange(1 << bits, dtype=np.uint32), (rows, cols))
    codes = np.stack([np.roll(r, i) for i, r in enumerate(codes)])
    words = mx.array(pack(codes, bits))
    shape = (rows, cols // group)
    if mode == "affine":
        return (words, mx.array(rng.standard_normal(shape).astype(np.float32)),
                mx.array(rng.standard_normal(shape).astype(np.float32)))
    special = [0, 1, 100, 126, 127, 128, 160, 254, 255] if mode != "nvfp4" else \
        [0, 1, 7, 8, 56, 0x7E, 0x7F, 0x80, 0x38]
    return words, mx.array(np.resize(np.array(special, np.uint8), shape)), None


@pytest.mark.parametrize("fmt", FORMATS)
def test_numpy_reading_of_the_packing_matches_mx_dequantize(fmt):
    """MLX itself (no kernel): our model of mx.quantize's layout, on random weights and on
    every code."""
    mode, bits, gs = FORMATS[fmt]
    rng = np.random.default_rng(0)
    w = mx.array(rng.standard_normal((3, 8, 256)).astype(np.float32) * 3)
    w_q, scales, *biases = mx.quantize(w, gs, bits, mode=mode)
    b = biases[0] if biases else None
    want = mx.dequantize(w_q, scales, b, group_size=gs, bits=bits, mode=mode, dtype=mx.float32)
    np.testing.assert_array_equal(dequantize_np(w_q, scales, b, gs, bits, mode), np.array(want))
    w_q, scales, b = every_code(FORMATS[fmt])
    np.testing.assert_array_equal(unpack(np.array(w_q), bits),
                                  unpack(pack(unpack(np.array(w_q), bits), bits), bits))
    want = mx.dequantize(w_q, scales, b, group_size=gs, bits=bits, mode=mode, dtype=mx.float32)
    np.testing.assert_array_equal(dequantize_np(w_q, scales, b, gs, bits, mode), np.array(want))


def decode_probe(fmt) -> Spec:
    """A kernel writing row `row` of a matrix in format fmt as the MoE kernels decode it, one
    chunk per thread: out[row, :]."""
    mode, bits, gs = fmt
    MODE = {"affine": "MOE_AFFINE", "mxfp4": "MOE_MX", "mxfp8": "MOE_MX", "nvfp4": "MOE_NV"}
    return Spec(f"moe_decode_probe_{mode}{bits}", ("w", "s", "b"), ("out",), f"""
    constexpr int CHUNK = moe_chunk({bits});
    const int k = thread_position_in_grid.x * CHUNK;
    const size_t row = thread_position_in_grid.y;
    const int cols = threads_per_grid.x * CHUNK;
    threadgroup float e2m1[16];
    threadgroup float e4m3[256];
    moe_fill_tables(e2m1, e4m3, thread_index_in_threadgroup, threads_per_threadgroup.x *
                    threads_per_threadgroup.y);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    uint words[CHUNK * {bits} / 32];
    moe_load_words<{bits}>(w, row, cols, k, words);
    const size_t g = row * size_t(cols / {gs}) + k / {gs};
    const float scale = moe_scale<{MODE[mode]}>(float(s[g]));
    MLX_MTL_PRAGMA_UNROLL
    for (int i = 0; i < CHUNK; ++i) {{
      const float c = moe_code_value<{MODE[mode]}>(moe_code<{bits}>(words, i),
                                                     {bits} == 8 ? e4m3 : e2m1);
      out[row * cols + k + i] = {MODE[mode]} == MOE_AFFINE ? scale * c + float(b[g]) : c * scale;
    }}
    """, moe.GATE_UP.header)


@cases.kernel_runners
@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_decoder_matches_mx_dequantize_on_every_code(run, fmt):
    w_q, s, b = every_code(FORMATS[fmt])
    mode, bits, gs = FORMATS[fmt]
    chunk = 32 if bits in (1, 3, 5) else 16
    inputs = [w_q, s, b if b is not None else kernel.placeholder(mx.float32)]
    launch = kernel.Launch(inputs, [(8, 256)], [mx.float32], (256 // chunk, 8, 1),
                           (256 // chunk, 8, 1))
    (got,) = run(decode_probe(FORMATS[fmt]), launch)
    want = mx.dequantize(w_q, s, b, group_size=gs, bits=bits, mode=mode, dtype=mx.float32)
    np.testing.assert_array_equal(np.array(got), np.array(want))


# ---------------------------------------------------------------------------------------------
# The twin against a dense reference
# ---------------------------------------------------------------------------------------------


def dense(p) -> np.ndarray:
    if isinstance(p, DenseWeight):
        return np.array(p.weight)
    return np.array(mx.dequantize(p.weight, p.scales, p.biases, group_size=p.group_size,
                                  bits=p.bits, mode=p.mode, dtype=mx.float32))


def reference_moe(x, ids, rw, experts, shared, alpha=1.702, limit=7.0):
    """Token by token, slot by slot, with dequantized weights in float64."""
    def ffn(v, gate, up, down):
        g, u = np.minimum(gate @ v, limit), np.clip(up @ v, -limit, limit)
        return down @ ((u + 1) * g / (1 + np.exp(-alpha * g)))

    x, ids, rw = (np.array(a, np.float64) for a in (x, ids, rw))
    gate, up, down = (dense(p).astype(np.float64) for p in experts)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for i, e in enumerate(ids[t].astype(int)):
            out[t] += rw[t, i] * ffn(x[t], gate[e], up[e], down[e])
        if shared is not None:
            out[t] += ffn(x[t], *(dense(p).astype(np.float64) for p in shared))
    return out


@pytest.mark.parametrize("fmt", ["affine4", "mxfp8", None])
@pytest.mark.parametrize("T", [2, 40])  # 40 tokens x 4 slots: the twin's sorted path
def test_twin_matches_a_dense_reference(fmt, T):
    """The MLX-ops twin (gather_qmm / gather_mm, no kernel) against float64 dense math."""
    E, D, F, FS, K = SMALL.values()
    rng = np.random.default_rng(T)
    f = FORMATS[fmt] if fmt else None
    experts, shared = random_experts(rng, f, E, D, F), random_experts(rng, f, None, D, FS)
    x = cases.normal(rng, (T, D))
    ids, rw = routing(rng, T, K, E, pool=12)
    got = moe.moe_experts_ops(x, ids, rw, experts, shared)
    want = reference_moe(x, ids, rw, experts, shared)
    np.testing.assert_allclose(np.array(got), want, atol=2e-5 * np.abs(want).max(), rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# The kernels against the twin
# ---------------------------------------------------------------------------------------------


def check(run, x, ids, rw, experts, shared, rtol=2e-5):
    got = moe.moe_experts_kernels(x, ids, rw, experts, shared, run=run)
    want = moe.moe_experts_ops(x, ids, rw, experts, shared)
    assert got.dtype == want.dtype == x.dtype and got.shape == want.shape
    tol = rtol * float(mx.abs(want.astype(mx.float32)).max())
    cases.assert_close(got, want, atol=tol, rtol=rtol)
    return got, want


@cases.kernel_runners
@pytest.mark.parametrize("T", [1, 3, moe.MAX_TOKENS])
@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_twin(run, fmt, T):
    E, D, F, FS, K = SMALL.values()
    rng = np.random.default_rng(T)
    experts = random_experts(rng, FORMATS[fmt], E, D, F)
    shared = random_experts(rng, FORMATS[fmt], None, D, FS)
    x = cases.normal(rng, (T, D))
    ids, rw = routing(rng, T, K, E)
    check(run, x, ids, rw, experts, shared)


@cases.kernel_runners
@pytest.mark.parametrize("T", [2, 4, 5, 6, 7])
def test_every_token_count(run, T):
    E, D, F, FS, K = SMALL.values()
    rng = np.random.default_rng(20 + T)
    experts = random_experts(rng, FORMATS["affine4"], E, D, F)
    shared = random_experts(rng, FORMATS["affine4"], None, D, FS)
    x = cases.normal(rng, (T, D))
    ids, rw = routing(rng, T, K, E)
    check(run, x, ids, rw, experts, shared)


@cases.kernel_runners
def test_mixed_formats_and_int32_ids(run):
    # mlx-lm's mixed recipes give down_proj more bits; the shared expert may differ again.
    E, D, F, FS, K = SMALL.values()
    rng = np.random.default_rng(11)
    gate_up = random_experts(rng, FORMATS["affine3"], E, D, F)
    down = random_experts(rng, ("affine", 6, 32), E, D, F).down
    experts = ExpertWeights(gate_up.gate, gate_up.up, down)
    s = random_experts(rng, FORMATS["nvfp4"], None, D, FS)
    shared = ExpertWeights(s.gate, s.up, random_experts(rng, ("affine", 5, 32), None, D, FS).down)
    x = cases.normal(rng, (3, D))
    ids, rw = routing(rng, 3, K, E)
    check(run, x, ids.astype(mx.int32), rw, experts, shared)


@cases.kernel_runners
def test_affine_group_sizes_32_and_128(run):
    E, D, F, FS, K = 16, 640, 256, 128, 4  # group 128 needs 128 | D and 128 | F
    rng = np.random.default_rng(19)
    gate_up = random_experts(rng, ("affine", 2, 128), E, D, F)
    experts = ExpertWeights(gate_up.gate, gate_up.up,
                            random_experts(rng, ("affine", 3, 128), E, D, F).down)
    s = random_experts(rng, ("affine", 4, 32), None, D, FS)
    shared = ExpertWeights(s.gate, s.up, random_experts(rng, ("affine", 8, 32), None, D, FS).down)
    x = cases.normal(rng, (1, D))
    ids, rw = routing(rng, 1, K, E)
    check(run, x, ids, rw, experts, shared)


@cases.kernel_runners
def test_bfloat16_without_shared_expert(run):
    E, D, F, _, K = SMALL.values()
    rng = np.random.default_rng(12)

    def cast(m, dtype):
        return ExpertWeights(*(replace(q, scales=q.scales.astype(dtype),
                                       biases=q.biases.astype(dtype)) for q in m))

    experts = cast(random_experts(rng, ("affine", 4, 64), E, D, F), mx.bfloat16)
    x = cases.normal(rng, (2, D), mx.bfloat16)
    ids, rw = routing(rng, 2, K, E)
    rw = rw.astype(mx.bfloat16)
    got = moe.moe_experts_kernels(x, ids, rw, experts, None, run=run)
    assert got.dtype == mx.bfloat16
    # The kernel accumulates and keeps h in fp32, rounding only its output to bf16; the twin in
    # bf16 rounds gate, up, h and every expert's output (measured 20x further off), so the
    # reference is the twin in fp32 on the same bf16 values.
    f32 = mx.float32
    want = moe.moe_experts_ops(x.astype(f32), ids, rw.astype(f32), cast(experts, f32), None)
    tol = 2.0**-8 * float(mx.abs(want).max())
    cases.assert_close(got, want, atol=tol)


def _two_tokens(seed):
    """Affine 4-bit experts and a shared expert of SMALL's sizes, two tokens routed to them."""
    E, D, F, FS, K = SMALL.values()
    rng = np.random.default_rng(seed)
    experts = random_experts(rng, FORMATS["affine4"], E, D, F)
    shared = random_experts(rng, FORMATS["affine4"], None, D, FS)
    x = cases.normal(rng, (2, D))
    ids, rw = routing(rng, 2, K, E, zeros=False)
    return experts, shared, x, ids, rw


@cases.kernel_runners
def test_out_of_range_ids_read_nothing(run):
    # Not part of the contract (the twin's gather would fail), but memory-safe: such a slot
    # contributes nothing, as if its weight were zero.
    E = SMALL["E"]
    experts, shared, x, ids, rw = _two_tokens(13)
    bad = np.array(ids)
    bad[1, 2] = E + 3
    got = moe.moe_experts_kernels(x, mx.array(bad), rw, experts, shared, run=run)
    bad[1, 2] = 0
    w = np.array(rw)
    w[1, 2] = 0
    want = moe.moe_experts_ops(x, mx.array(bad), mx.array(w), experts, shared)
    cases.assert_close(got, want, atol=2e-5 * float(mx.abs(want).max()), rtol=2e-5)


def pool_of(experts: ExpertWeights, held) -> ExpertWeights:
    """The stacked experts' rows `held` (expert ids) as a pool of len(held) slots."""
    rows = mx.array(np.asarray(held, np.int32))
    return ExpertWeights(*(replace(q, weight=q.weight[rows], scales=q.scales[rows],
                                   biases=None if q.biases is None else q.biases[rows])
                           for q in experts))


@cases.kernel_runners
@pytest.mark.parametrize("T", [1, 3, moe.MAX_TOKENS])
@pytest.mark.parametrize("fmt", ["affine4", "mxfp4", "nvfp4"])
def test_a_slot_table_over_a_pool_of_resident_experts(run, fmt, T):
    # Expert streaming (m3mlx.experts): only some experts sit in a pool of slots, in any order,
    # and the table maps expert ids to slots. The kernels look the rows up themselves; the
    # result is the one over all the experts stacked, bit for bit the twin's on the same pool.
    E, D, F, FS, K = SMALL.values()
    rng = np.random.default_rng(40 + T)
    experts = random_experts(rng, FORMATS[fmt], E, D, F)
    shared = random_experts(rng, FORMATS[fmt], None, D, FS)
    x = cases.normal(rng, (T, D))
    ids, rw = routing(rng, T, K, E)
    routed = np.unique(np.array(ids))
    others = np.setdiff1d(np.arange(E), routed)
    held = rng.permutation(np.concatenate([routed, rng.choice(others, 3, replace=False)]))
    table = np.full(E, -1, np.int32)
    table[held] = np.arange(len(held))
    pool, slots = pool_of(experts, held), mx.array(table)
    got = moe.moe_experts_kernels(x, ids, rw, pool, shared, run=run, slots=slots)
    want = moe.moe_experts_kernels(x, ids, rw, experts, shared, run=run)
    assert mx.array_equal(got, want).item()
    twin = moe.moe_experts_ops(x, ids, rw, pool, shared, slots=slots)
    assert mx.array_equal(twin, moe.moe_experts_ops(x, ids, rw, experts, shared)).item()
    cases.assert_close(got, twin, atol=2e-5 * float(mx.abs(twin).max()), rtol=2e-5)


@cases.kernel_runners
def test_an_expert_without_a_slot_reads_nothing(run):
    # Memory safety, as for out-of-range ids: a table entry of -1 (or past the pool) makes that
    # expert contribute nothing; the tier never routes to one.
    E = SMALL["E"]
    experts, shared, x, ids, rw = _two_tokens(47)
    missing, far = int(np.array(ids)[1, 2]), int(np.array(ids)[0, 0])
    table = np.arange(E, dtype=np.int32)
    table[missing], table[far] = -1, E + 5
    got = moe.moe_experts_kernels(x, ids, rw, experts, shared, run=run, slots=mx.array(table))
    w = np.array(rw)
    w[np.isin(np.array(ids), [missing, far])] = 0
    want = moe.moe_experts_ops(x, ids, mx.array(w), experts, shared)
    cases.assert_close(got, want, atol=2e-5 * float(mx.abs(want).max()), rtol=2e-5)


def test_which_calls_the_kernels_cover():
    """The support rule itself (no kernel runs): formats, token counts, dtypes."""
    rng = np.random.default_rng(14)
    E, D, F, FS, K = SMALL.values()
    x = cases.normal(rng, (2, D))
    ids, rw = routing(rng, 2, K, E)
    for fmt in FORMATS.values():
        assert moe.moe_kernels_supported(x, ids, rw, random_experts(rng, fmt, E, D, F)), fmt
    dense_experts = random_experts(rng, None, E, D, F)
    assert not moe.moe_kernels_supported(x, ids, rw, dense_experts)
    ok = random_experts(rng, FORMATS["mxfp8"], E, D, F)
    assert not moe.moe_kernels_supported(cases.normal(rng, (9, D)), ids, rw, ok)
    assert not moe.moe_kernels_supported(x, ids, rw.astype(mx.float16), ok)
    with pytest.raises(ValueError, match="no Metal MoE kernel"):
        moe.moe_experts_kernels(x, ids, rw, dense_experts, run=harness.run)


# ---------------------------------------------------------------------------------------------
# M3's geometry: hidden 6144, experts of width 3072, 128 of them, top-4, a shared expert
# ---------------------------------------------------------------------------------------------


class Pool:
    """Random data at gigabyte sizes, cheaply: a random block of prime length repeated, handed
    out as views at different offsets, so that the tensors and the experts inside them all
    hold different stretches of it."""

    def __init__(self, block, size):
        self.block, self.data, self.offset = block, np.resize(block, size + block.size), 0

    def take(self, shape):
        n = int(np.prod(shape))
        self.offset = (self.offset + self.block.size // 5) % self.block.size
        return self.data[self.offset:self.offset + n].reshape(shape)


def real_mxfp4(words: Pool, scales: Pool, lead, out, inp) -> QuantizedWeight:
    return QuantizedWeight(words.take(lead + (out, inp // 8)),
                           scales.take(lead + (out, inp // 32)), None, 32, 4, "mxfp4")


def to_mx(q: QuantizedWeight, wrap=mx.array, experts=None) -> QuantizedWeight:
    pick = (lambda a: a) if experts is None else (lambda a: a[experts])  # noqa: E731
    return replace(q, weight=wrap(pick(q.weight)), scales=wrap(pick(q.scales)))


@cases.kernel_runners
def test_real_geometry(run):
    E, D, F, K, T = 128, 6144, 3072, 4, 1
    rng = np.random.default_rng(15)
    n = E * F * D
    words = Pool(rng.integers(0, 2**32, 1_000_003, dtype=np.uint32), n // 8)
    # E8M0 scales 2^-7 .. 2^-5 on uniform E2M1 codes (rms 2.9): gate and up of rms ~3.6.
    scales = Pool(rng.integers(120, 123, 100_003).astype(np.uint8), n // 32)
    routed = [real_mxfp4(words, scales, (E,), F, D), real_mxfp4(words, scales, (E,), F, D),
              real_mxfp4(words, scales, (E,), D, F)]
    shared = [real_mxfp4(words, scales, (), F, D), real_mxfp4(words, scales, (), F, D),
              real_mxfp4(words, scales, (), D, F)]
    x = cases.normal(rng, (T, D))
    ids = mx.array([[127, 0, 77, 31]], mx.uint32)  # both ends of the expert buffers
    rw = mx.array([[0.9, 0.0, 0.6, 0.5]], mx.float32)  # expert 0 weighs nothing
    # Under the harness the weights stay numpy views, which it streams to the kernel in place.
    wrap = mx.array if run is kernel.metal_run else harness.View
    got = moe.moe_experts_kernels(x, ids, rw, ExpertWeights(*(to_mx(q, wrap) for q in routed)),
                                  ExpertWeights(*(to_mx(q, wrap) for q in shared)), run=run)

    # The twin on the experts the routing names (gather_qmm with the ids remapped).
    used = np.unique(np.array(ids))
    remapped = mx.array(np.searchsorted(used, np.array(ids)).astype(np.uint32))
    want = moe.moe_experts_ops(x, remapped, rw,
                               ExpertWeights(*(to_mx(q, experts=used) for q in routed)),
                               ExpertWeights(*(to_mx(q) for q in shared)))
    scale = float(mx.abs(want).max())
    assert scale > 10.0  # activations of a sensible size, the clamps in play
    cases.assert_close(got, want, atol=2e-5 * scale, rtol=2e-5)
