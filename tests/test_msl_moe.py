"""The MoE decode kernels against their gather_qmm twin, under the Metal-on-CPU harness."""

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from msl import cases, harness
from msl.cases import Spec

from m3mlx.metal_kernels import moe
from m3mlx.metal_kernels.moe import ExpertWeights, QuantizedWeight

only_harness = cases.harness_only

FORMATS = {  # the formats the issue names: (mode, bits, group size)
    "affine4": ("affine", 4, 64),
    "affine8": ("affine", 8, 64),
    "mxfp4": ("mxfp4", 4, 32),
    "mxfp8": ("mxfp8", 8, 32),
}


# ---------------------------------------------------------------------------------------------
# MLX's packing, as the kernels read it
# ---------------------------------------------------------------------------------------------

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)


def e4m3(q):
    e, m = (q >> 3) & 15, (q & 7).astype(np.float32)
    v = np.where(e == 0, m * 2.0**-9, (1 + m / 8) * 2.0 ** (e.astype(np.int32) - 7))
    v = np.where((q & 0x7F) == 0x7F, np.nan, v)
    return np.where(q & 0x80, -v, v).astype(np.float32)


def dequantize_np(w_q, scales, biases, group_size, bits, mode):
    """Our reading of mx.quantize's layout: codes LSB-first in uint32 words; affine s * q + b per
    group; mxfp4 / mxfp8 E2M1 / E4M3 codes times an E8M0 scale 2^(s - 127) (255 gives inf)."""
    words = np.asarray(w_q).astype(np.uint32)
    shifts = np.arange(32 // bits, dtype=np.uint32) * bits
    q = ((words[..., None] >> shifts) & ((1 << bits) - 1)).reshape(*words.shape[:-1], -1)
    per_group = lambda a: np.repeat(np.asarray(a), group_size, axis=-1)  # noqa: E731
    if mode == "affine":
        s = per_group(scales.astype(mx.float32))
        return s * q.astype(np.float32) + per_group(biases.astype(mx.float32))
    with np.errstate(over="ignore", invalid="ignore"):
        scale = np.ldexp(np.float32(1), per_group(scales).astype(np.int32) - 127)
        values = np.where(q & 8, -1, 1) * E2M1[q & 7] if bits == 4 else e4m3(q)
        return (values * scale).astype(np.float32)


def every_code(bits, mode, rows=8, cols=256):
    """(w_q, scales, biases) whose rows run through every code, with scales that include the
    E8M0 extremes (0 and 255) or negative affine scales."""
    rng = np.random.default_rng(bits)
    codes = np.resize(np.arange(1 << bits, dtype=np.uint32), (rows, cols))
    codes = np.stack([np.roll(r, i) for i, r in enumerate(codes)])
    per = 32 // bits
    words = (codes.reshape(rows, -1, per) << (np.arange(per, dtype=np.uint32) * bits)).sum(
        -1, dtype=np.uint32)
    group = 64 if mode == "affine" else 32
    if mode == "affine":
        scales = rng.standard_normal((rows, cols // group)).astype(np.float32)
        biases = rng.standard_normal((rows, cols // group)).astype(np.float32)
        return mx.array(words), mx.array(scales), mx.array(biases)
    scales = np.resize(np.array([0, 1, 100, 126, 127, 128, 160, 254, 255], np.uint8),
                       (rows, cols // group))
    return mx.array(words), mx.array(scales), None


@pytest.mark.parametrize("fmt", FORMATS)
def test_numpy_reading_of_the_packing_matches_mx_dequantize(fmt):
    mode, bits, gs = FORMATS[fmt]
    rng = np.random.default_rng(0)
    w = mx.array(rng.standard_normal((3, 8, 256)).astype(np.float32) * 3)
    w_q, scales, *biases = mx.quantize(w, gs, bits, mode=mode)
    b = biases[0] if biases else None
    want = mx.dequantize(w_q, scales, b, group_size=gs, bits=bits, mode=mode, dtype=mx.float32)
    np.testing.assert_array_equal(dequantize_np(w_q, scales, b, gs, bits, mode), np.array(want))
    w_q, scales, b = every_code(bits, mode)
    want = mx.dequantize(w_q, scales, b, group_size=gs, bits=bits, mode=mode, dtype=mx.float32)
    np.testing.assert_array_equal(dequantize_np(w_q, scales, b, gs, bits, mode), np.array(want))


DECODE_PROBE = Spec(
    "moe_decode_probe",
    ("a4_w", "a4_s", "a4_b", "a8_w", "a8_s", "a8_b", "m4_w", "m4_s", "m8_w", "m8_s", "dummy"),
    ("out",),
    """
    // out[f, row, :]: row `row` of format f as moe_codes16 reads it, 16 weights per thread.
    const int k = thread_position_in_grid.x * MOE_CHUNK;
    const size_t row = thread_position_in_grid.y;
    const int f = thread_position_in_grid.z;
    const int rows = threads_per_grid.y;
    const int cols = threads_per_grid.x * MOE_CHUNK;
    threadgroup float e2m1[16];
    threadgroup float e4m3[256];
    moe_fill_tables(e2m1, e4m3, thread_index_in_threadgroup, 128);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float c[MOE_CHUNK];
    float s, b;
    if (f == 0) moe_codes16<MOE_AFFINE, 4, 64>(a4_w, a4_s, a4_b, e2m1, row, cols, k, c, s, b);
    if (f == 1) moe_codes16<MOE_AFFINE, 8, 64>(a8_w, a8_s, a8_b, e2m1, row, cols, k, c, s, b);
    if (f == 2) moe_codes16<MOE_MX, 4, 32>(m4_w, m4_s, dummy, e2m1, row, cols, k, c, s, b);
    if (f == 3) moe_codes16<MOE_MX, 8, 32>(m8_w, m8_s, dummy, e4m3, row, cols, k, c, s, b);
    for (int i = 0; i < MOE_CHUNK; ++i) {
      out[(size_t(f) * rows + row) * cols + k + i] = f < 2 ? s * c[i] + b : c[i] * s;
    }
    """,
    moe.GATE_UP.header,
)


@only_harness
def test_kernel_decoders_match_mx_dequantize_on_every_code():
    sets = [every_code(4, "affine"), every_code(8, "affine"), every_code(4, "mxfp4"),
            every_code(8, "mxfp8")]
    inputs = [*sets[0], *sets[1], *sets[2][:2], *sets[3][:2], mx.zeros((1,))]
    launch = moe.Launch(inputs, [(4, 8, 256)], [mx.float32], (256 // 16, 8, 4), (16, 8, 1))
    (got,) = harness.run(DECODE_PROBE, launch)
    for f, (w_q, s, b) in enumerate(sets):
        mode, bits, gs = list(FORMATS.values())[f]
        want = mx.dequantize(w_q, s, b, group_size=gs, bits=bits, mode=mode, dtype=mx.float32)
        np.testing.assert_array_equal(np.array(got[f]), np.array(want), err_msg=mode + str(bits))


# ---------------------------------------------------------------------------------------------
# The MoE block against the twin
# ---------------------------------------------------------------------------------------------


def random_experts(rng, fmt, E, D, F, scale=0.15) -> ExpertWeights:
    """gate/up [E, F, D], down [E, D, F] (E None: the shared expert's plain matrices)."""
    lead = () if E is None else (E,)

    def q(shape, fan_in):
        w = rng.standard_normal(lead + shape).astype(np.float32) * scale * (576 / fan_in) ** 0.5
        return QuantizedWeight.quantize(mx.array(w), fmt[2], fmt[1], fmt[0])

    return ExpertWeights(q((F, D), D), q((F, D), D), q((D, F), F))


def routing(rng, T, K, E, pool=6, zeros=True):
    """Expert ids [T, K] drawn from a small pool (tokens share experts; the last id E - 1 is
    in it) and weights [T, K] like the router's, some of them zero."""
    pool = np.concatenate([rng.choice(E - 1, pool - 1, replace=False), [E - 1]])
    ids = np.stack([rng.choice(pool, K, replace=False) for _ in range(T)]).astype(np.uint32)
    w = rng.random((T, K)).astype(np.float32)
    w = 2.0 * w / w.sum(-1, keepdims=True)
    if zeros:
        w[0, 1] = 0.0  # one slot of the first token; its expert may still serve another token
        if T >= 3:
            w[T - 1] = 0.0  # a token whose routed experts all weigh nothing
    return mx.array(ids), mx.array(w)


def check(run, x, ids, rw, experts, shared, rtol=2e-5):
    got = moe.moe_decode_kernels(x, ids, rw, experts, shared, run=run)
    want = moe.moe_decode_ops(x, ids, rw, experts, shared)
    assert got.dtype == want.dtype == x.dtype and got.shape == want.shape
    tol = rtol * float(mx.abs(want.astype(mx.float32)).max())
    cases.assert_close(got, want, atol=tol, rtol=rtol)
    return got, want


SMALL = dict(E=16, D=576, F=192, FS=128, K=4)  # D: one full and one partial 512-input step


@pytest.mark.parametrize("run", cases.RUNNERS)
@pytest.mark.parametrize("T", range(1, moe.MAX_TOKENS + 1))
@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_twin(run, fmt, T):
    E, D, F, FS, K = SMALL.values()
    rng = np.random.default_rng(T)
    experts = random_experts(rng, FORMATS[fmt], E, D, F)
    shared = random_experts(rng, FORMATS[fmt], None, D, FS)
    x = cases.normal(rng, (T, D))
    ids, rw = routing(rng, T, K, E)
    check(run, x, ids, rw, experts, shared)


@pytest.mark.parametrize("run", cases.RUNNERS)
def test_mixed_formats_and_int32_ids(run):
    # mlx-lm's mixed recipes give down_proj more bits; the shared expert may differ again.
    E, D, F, FS, K = SMALL.values()
    rng = np.random.default_rng(11)
    gate_up = random_experts(rng, FORMATS["mxfp4"], E, D, F)
    down = random_experts(rng, ("affine", 8, 32), E, D, F).down
    experts = ExpertWeights(gate_up.gate, gate_up.up, down)
    s = random_experts(rng, FORMATS["mxfp8"], None, D, FS)
    shared = ExpertWeights(s.gate, s.up, random_experts(rng, ("affine", 4, 32), None, D, FS).down)
    x = cases.normal(rng, (3, D))
    ids, rw = routing(rng, 3, K, E)
    check(run, x, ids.astype(mx.int32), rw, experts, shared)


@pytest.mark.parametrize("run", cases.RUNNERS)
def test_affine_group_sizes_32_and_128(run):
    E, D, F, FS, K = 16, 640, 256, 128, 4  # group 128 needs 128 | D and 128 | F
    rng = np.random.default_rng(19)
    gate_up = random_experts(rng, ("affine", 8, 128), E, D, F)
    experts = ExpertWeights(gate_up.gate, gate_up.up,
                            random_experts(rng, ("affine", 4, 128), E, D, F).down)
    s = random_experts(rng, ("affine", 4, 32), None, D, FS)
    shared = ExpertWeights(s.gate, s.up, random_experts(rng, ("affine", 8, 32), None, D, FS).down)
    x = cases.normal(rng, (1, D))
    ids, rw = routing(rng, 1, K, E)
    check(run, x, ids, rw, experts, shared)


@pytest.mark.parametrize("run", cases.RUNNERS)
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
    got = moe.moe_decode_kernels(x, ids, rw, experts, None, run=run)
    assert got.dtype == mx.bfloat16
    # The kernel accumulates and keeps h in fp32, rounding only its output to bf16; the twin in
    # bf16 rounds gate, up, h and every expert's output (measured 20x further off), so the
    # reference is the twin in fp32 on the same bf16 values.
    f32 = mx.float32
    want = moe.moe_decode_ops(x.astype(f32), ids, rw.astype(f32), cast(experts, f32), None)
    tol = 2.0**-8 * float(mx.abs(want).max())
    cases.assert_close(got, want, atol=tol)


@pytest.mark.parametrize("run", cases.RUNNERS)
def test_out_of_range_ids_read_nothing(run):
    # Not part of the contract (the twin's gather would fail), but memory-safe: such a slot
    # contributes nothing, as if its weight were zero.
    E, D, F, FS, K = SMALL.values()
    rng = np.random.default_rng(13)
    experts = random_experts(rng, FORMATS["affine4"], E, D, F)
    shared = random_experts(rng, FORMATS["affine4"], None, D, FS)
    x = cases.normal(rng, (2, D))
    ids, rw = routing(rng, 2, K, E, zeros=False)
    bad = np.array(ids)
    bad[1, 2] = E + 3
    got = moe.moe_decode_kernels(x, mx.array(bad), rw, experts, shared, run=run)
    bad[1, 2] = 0
    w = np.array(rw)
    w[1, 2] = 0
    want = moe.moe_decode_ops(x, mx.array(bad), mx.array(w), experts, shared)
    cases.assert_close(got, want, atol=2e-5 * float(mx.abs(want).max()), rtol=2e-5)


def test_unsupported_calls_take_the_twin():
    rng = np.random.default_rng(14)
    E, D, F, FS, K = SMALL.values()
    experts = random_experts(rng, ("affine", 3, 64), E, D, F)
    x = cases.normal(rng, (2, D))
    ids, rw = routing(rng, 2, K, E)
    assert not moe.moe_decode_supported(x, ids, rw, experts)
    ok = random_experts(rng, FORMATS["mxfp8"], E, D, F)
    assert moe.moe_decode_supported(x, ids, rw, ok)
    assert not moe.moe_decode_supported(cases.normal(rng, (9, D)), ids, rw, ok)
    with pytest.raises(ValueError, match="no Metal MoE kernel"):
        moe.moe_decode_kernels(x, ids, rw, experts, run=harness.run)
    got = moe.moe_decode(x, ids, rw, experts)
    cases.assert_close(got, moe.moe_decode_ops(x, ids, rw, experts), atol=0)


@only_harness
def test_public_op_dispatches_like_the_msa_ops(monkeypatch):
    # Metal "available", with the harness standing in for it: supported calls launch the two
    # kernels, others and use_metal=False take the twin.
    launched = cases.metal_is_the_harness(monkeypatch, moe, moe)
    E, D, F, FS, K = SMALL.values()
    rng = np.random.default_rng(18)
    experts = random_experts(rng, FORMATS["mxfp8"], E, D, F)
    shared = random_experts(rng, FORMATS["mxfp8"], None, D, FS)
    x = cases.normal(rng, (2, D))
    ids, rw = routing(rng, 2, K, E)
    got = moe.moe_decode(x, ids, rw, experts, shared)
    assert launched == ["moe_decode_gate_up", "moe_decode_down"]
    want = moe.moe_decode_ops(x, ids, rw, experts, shared)
    cases.assert_close(got, want, atol=2e-5 * float(mx.abs(want).max()), rtol=2e-5)
    moe.moe_decode(x, ids, rw, experts, shared, use_metal=False)
    moe.moe_decode(cases.normal(rng, (9, D)), mx.concatenate([ids] * 5)[:9],
                   mx.concatenate([rw] * 5)[:9], experts, shared)
    assert len(launched) == 2


# ---------------------------------------------------------------------------------------------
# The runtime's MoE layer
# ---------------------------------------------------------------------------------------------


def quantized_moe(fmt, seed=0):
    import mlx.nn as nn

    from m3mlx.config import ModelArgs
    from m3mlx.model import MoE

    E, D, F, FS, K = SMALL.values()
    mx.random.seed(seed)
    layer = MoE(ModelArgs(hidden_size=D, intermediate_size=F, shared_intermediate_size=FS,
                          num_local_experts=E, num_experts_per_tok=K, num_hidden_layers=4))
    layer.gate.weight = layer.gate.weight * 8  # decisive routing
    layer.e_score_correction_bias = mx.random.normal((E,)) * 0.1
    mode, bits, gs = fmt
    nn.quantize(layer, gs, bits, mode=mode, class_predicate=lambda p, m: p != "gate")
    return layer


@pytest.mark.parametrize("T", [1, 3])
def test_twin_is_the_runtime_moe(T):
    # Off Metal the layer runs its own gather_qmm code; the twin must be that computation.
    layer = quantized_moe(FORMATS["affine4"])
    x = cases.normal(np.random.default_rng(T), (T, SMALL["D"]))
    scores = mx.sigmoid(layer.gate(x))
    ids = mx.argpartition(-(scores + layer.e_score_correction_bias), kth=3, axis=-1)[:, :4]
    w = mx.take_along_axis(scores, ids, axis=-1)
    w = w / (w.sum(-1, keepdims=True) + 1e-20) * 2.0
    want = moe.moe_decode_ops(x, ids, w, ExpertWeights.of(layer.switch_mlp),
                              ExpertWeights.of(layer.shared_experts))
    np.testing.assert_array_equal(np.array(layer(x)), np.array(want))


@only_harness
@pytest.mark.parametrize("T", [1, 5])
def test_runtime_moe_takes_the_kernel_on_metal(monkeypatch, T):
    # m3mlx.model.MoE as it runs on a Mac: Metal available, the kernels run (here under the
    # harness) for up to 8 tokens, the gather_qmm path otherwise.
    import m3mlx.model

    layer = quantized_moe(FORMATS["mxfp8"], seed=T)
    x = cases.normal(np.random.default_rng(T), (1, T, SMALL["D"]))
    want = layer(x)
    calls = []

    def kernels(x, ids, rw, experts, shared, *, alpha, limit, use_metal):
        calls.append(x.shape[0])
        return moe.moe_decode_kernels(x, ids, rw, experts, shared, alpha, limit,
                                      run=harness.run)

    monkeypatch.setattr(m3mlx.model, "use_metal", lambda: True)
    monkeypatch.setattr(m3mlx.model, "moe_decode", kernels)
    got = layer(x)
    assert calls == [T]
    assert got.shape == want.shape
    cases.assert_close(got, want, atol=2e-5 * float(mx.abs(want).max()), rtol=2e-5)
    layer(cases.normal(np.random.default_rng(0), (1, moe.MAX_TOKENS + 1, SMALL["D"])))
    assert calls == [T]  # 9 tokens: the gather_qmm path


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


@pytest.mark.parametrize("run", cases.RUNNERS)
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
    wrap = harness.View if run is harness.run else mx.array
    got = moe.moe_decode_kernels(x, ids, rw, ExpertWeights(*(to_mx(q, wrap) for q in routed)),
                                 ExpertWeights(*(to_mx(q, wrap) for q in shared)), run=run)

    # The twin on the experts the routing names (gather_qmm with the ids remapped).
    used = np.unique(np.array(ids))
    remapped = mx.array(np.searchsorted(used, np.array(ids)).astype(np.uint32))
    want = moe.moe_decode_ops(x, remapped, rw,
                              ExpertWeights(*(to_mx(q, experts=used) for q in routed)),
                              ExpertWeights(*(to_mx(q) for q in shared)))
    scale = float(mx.abs(want).max())
    assert scale > 10.0  # activations of a sensible size, the clamps in play
    cases.assert_close(got, want, atol=2e-5 * scale, rtol=2e-5)


# ---------------------------------------------------------------------------------------------
# The harness catches broken kernels
# ---------------------------------------------------------------------------------------------


def mutant(spec, old, new):
    source = spec.source
    assert source.count(old) == 1, f"mutation site {old!r} not found once"
    return Spec(spec.name + "_mutant", spec.input_names, spec.output_names,
                     source.replace(old, new), spec.header)


def mutation_case():
    E, D, F, FS, K = SMALL.values()
    rng = np.random.default_rng(17)
    experts = random_experts(rng, FORMATS["mxfp4"], E, D, F)
    shared = random_experts(rng, FORMATS["mxfp4"], None, D, FS)
    x = cases.normal(rng, (4, D))
    ids, rw = routing(rng, 4, K, E, pool=5)
    return x, ids, rw, experts, shared


@only_harness
def test_mutant_counting_a_repeated_expert_twice_is_caught():
    # Phase 2 without the first-slot test: an expert named by several tokens is applied once
    # per naming slot.
    down = mutant(moe.DOWN, "if (!moe_first_slot(ids, j, E)) {", "if (int(ids[j]) >= E) {")
    x, ids, rw, experts, shared = mutation_case()
    assert len(np.unique(np.array(ids))) < ids.size  # the case repeats experts
    check(harness.run, x, ids, rw, experts, shared)  # the real kernel passes

    def run(spec, launch):
        return harness.run(down if spec is moe.DOWN else spec, launch)

    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        check(run, x, ids, rw, experts, shared)


@only_harness
def test_mutant_reading_past_the_shared_rows_is_caught():
    # Phase 1 without the row bound: the shared expert (FS = 128 < F = 192 rows) reads rows
    # past the end of its tensors.
    gate_up = mutant(moe.GATE_UP, "row >= (is_shared ? FS : F)", "row >= F")
    x, ids, rw, experts, shared = mutation_case()

    def run(spec, launch):
        return harness.run(gate_up if spec is moe.GATE_UP else spec, launch)

    with pytest.raises(harness.HarnessError, match="AddressSanitizer: heap-buffer-overflow"):
        moe.moe_decode_kernels(x, ids, rw, experts, shared, run=run)
