"""A harness that cannot fail is worthless: plant realistic bugs in copies of the kernels and
check that the harness catches each one, while the unmodified kernel passes the same case."""

import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from msl import cases, harness

from m3mlx.metal_kernels import msa_kernels, msa_ops, quantize_index_keys

pytestmark = cases.harness_only


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    input_names: tuple
    output_names: tuple
    source: str
    header: str
    ensure_row_contiguous: bool
    atomic_outputs: bool


def mutate(spec, old, new, part="source"):
    """A copy of `spec` with the one occurrence of `old` in its source (or header) replaced."""
    fields = {f: getattr(spec, f) for f in
              ("name", "input_names", "output_names", "source", "header",
               "ensure_row_contiguous", "atomic_outputs")}
    assert fields[part].count(old) == 1, f"mutation site not unique in {spec.name}: {old!r}"
    fields[part] = fields[part].replace(old, new)
    return Mutant(**fields)


def runner_with(mutant):
    def run(spec, launch):
        return harness.run(mutant if spec.name == mutant.name else spec, launch)

    return run


BLOCK = 40  # two 32-key chunks per block, the second one partial


def attention_matches(run, L, offset=300, S=310):
    rng = np.random.default_rng(L)
    q = cases.normal(rng, (1, 2 * 4, L, 8))
    k = cases.normal(rng, (1, 2, S, 8))
    v = cases.normal(rng, (1, 2, S, 8))
    sel = msa_ops.index_topk(cases.normal(rng, (1, 2, L, 8)), cases.normal(rng, (1, S, 8)),
                             offset, BLOCK, 4)
    got = msa_kernels.sparse_attention(q, k, v, sel, offset, 0.35, BLOCK, run=run)
    want = msa_ops.sparse_attention(q, k, v, sel, offset, 0.35, BLOCK)
    return np.allclose(np.array(got), np.array(want), atol=2e-5)


def test_causal_cut_off_by_one_in_prefill_is_caught():
    mutant = mutate(msa_kernels.PREFILL_ATTENTION,
                    "key0 + int(lane) <= offset + t", "key0 + int(lane) <= offset + t + 1")
    assert attention_matches(harness.run, L=9)
    assert not attention_matches(runner_with(mutant), L=9)


def test_missing_barrier_in_decode_is_caught():
    mutant = mutate(
        msa_kernels.DECODE_ATTENTION,
        "      tid);\n  threadgroup_barrier(mem_flags::mem_threadgroup);\n",
        "      tid);\n")
    assert attention_matches(harness.run, L=1)
    assert not attention_matches(runner_with(mutant), L=1)


def test_stale_softmax_rescale_in_decode_is_caught():
    # Forgetting to rescale the accumulated output when the running max grows.
    mutant = mutate(msa_kernels.DECODE_ATTENTION, "      o[i][c] *= alpha;\n", "")
    assert attention_matches(harness.run, L=1)
    assert not attention_matches(runner_with(mutant), L=1)


def selection_matches(run, ties=False):
    rng = np.random.default_rng(3)
    if ties:  # repeated blocks: exact ties around the top-k cut
        base = rng.standard_normal((4, 8, 8)).astype(np.float32)
        pattern = [0, 1, 2, 3, 0, 1, 2, 3, 2, 2, 1, 0]
        keys = mx.array(np.concatenate([base[i] for i in pattern])[None])
        offset, L, scales = 90, 6, None
    else:
        keys, scales = quantize_index_keys(cases.normal(rng, (1, 41, 8)))
        offset, L = 40, 1  # the last history block ends 1 key before the buffer does
    q = cases.normal(rng, (1, 2, L, 8))
    got = msa_kernels.index_topk(q, keys, offset, 8, 4, scales, run=run)
    want = msa_ops.index_topk(q, keys, offset, 8, 4, scales)
    return np.array_equal(np.array(got), np.array(want))


def test_missing_bounds_guard_is_an_address_sanitizer_error():
    # Lanes past a block of 8 keys read the scales of keys beyond the buffer.
    mutant = mutate(msa_kernels.INDEX_SCORES, "if (QUANT && lane < uint(n)) {", "if (QUANT) {")
    assert selection_matches(harness.run)
    with pytest.raises(harness.HarnessError, match="AddressSanitizer: heap-buffer-overflow"):
        selection_matches(runner_with(mutant))


def test_wrong_tie_break_is_caught():
    mutant = mutate(msa_kernels.INDEX_SELECT, "(s == os && i < oi)", "(s == os && i > oi)",
                    part="header")
    assert selection_matches(harness.run, ties=True)
    assert not selection_matches(runner_with(mutant), ties=True)


def test_barrier_in_divergent_code_is_caught():
    mutant = mutate(
        msa_kernels.INDEX_SELECT,
        "    winner_id[sg] = best_id;\n  }\n  threadgroup_barrier(mem_flags::mem_threadgroup);\n",
        "    winner_id[sg] = best_id;\n    threadgroup_barrier(mem_flags::mem_threadgroup);\n  }\n")
    assert selection_matches(harness.run, ties=True)
    with pytest.raises(harness.HarnessError, match="divergence"):
        selection_matches(runner_with(mutant), ties=True)
