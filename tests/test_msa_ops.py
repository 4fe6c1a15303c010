"""The MSA ops (MLX-ops path) against brute-force numpy references."""

import mlx.core as mx
import numpy as np
import pytest

from m3mlx.metal_kernels import dispatch, index_topk, quantize_index_keys, sparse_attention


@pytest.fixture(autouse=True)
def twin_path(monkeypatch):
    """The MLX-ops twins on every machine (on a Mac the kernels are tested in test_msl_*)."""
    monkeypatch.setenv(dispatch.ENV_VAR, "ops")


def reference_selection(index_q, index_keys, offset, block, topk, scales=None):
    """Per (b, h, t): own block + top (topk-1) earlier blocks by max dot, ties to lower id."""
    q, k = np.array(index_q, np.float64), np.array(index_keys, np.float64)
    B, H, L, _ = q.shape
    out = np.full((B, H, L, topk), -1, np.int32)
    for b in range(B):
        dots_all = np.einsum("hld,sd->hls", q[b], k[b])
        if scales is not None:
            dots_all = dots_all * np.array(scales, np.float64)[b]
        for h in range(H):
            for t in range(L):
                own = (offset + t) // block
                scores = [dots_all[h, t, j * block : (j + 1) * block].max() for j in range(own)]
                best = sorted(range(own), key=lambda j: (-scores[j], j))[: topk - 1]
                ids = sorted(best) + [own]
                out[b, h, t, : len(ids)] = ids
    return out


@pytest.mark.parametrize(
    "B,H,D,block,topk,offset,L,extra",
    [
        (1, 1, 8, 4, 3, 0, 37, 0),  # prefill from scratch, not a multiple of the block
        (2, 2, 16, 8, 4, 50, 21, 11),  # chunk after a cache, longer buffer than needed
        (1, 3, 8, 16, 16, 20, 30, 0),  # fewer blocks than top-k: everything visible, -1 padding
        (1, 2, 16, 8, 4, 203, 1, 5),  # decode
        (1, 1, 128, 128, 16, 4095, 1, 0),  # real geometry decode at 4K
    ],
)
def test_selection_matches_brute_force(B, H, D, block, topk, offset, L, extra):
    rng = np.random.default_rng(offset + L)
    q = mx.array(rng.standard_normal((B, H, L, D)).astype(np.float32))
    k = mx.array(rng.standard_normal((B, offset + L + extra, D)).astype(np.float32))
    got = np.array(index_topk(q, k, offset=offset, block_size=block, topk=topk))
    np.testing.assert_array_equal(got, reference_selection(q, k, offset, block, topk))


def test_selection_ties_go_to_lower_block_ids():
    # Repeat four distinct blocks so most scores tie exactly.
    rng = np.random.default_rng(0)
    block, topk = 4, 5
    base = rng.standard_normal((4, block, 8)).astype(np.float32)
    keys = np.concatenate([base[i % 4] for i in [0, 1, 2, 3, 0, 1, 2, 3, 2, 2, 1, 0]])[None]
    q = rng.standard_normal((1, 2, 6, 8)).astype(np.float32)
    got = np.array(index_topk(mx.array(q), mx.array(keys), offset=42, block_size=block, topk=topk))
    np.testing.assert_array_equal(got, reference_selection(q, keys, 42, block, topk))
    assert (got[..., :-1] >= 0).all()


def test_nan_scores_lose_but_never_crash():
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((1, 64, 8)).astype(np.float32)
    keys[0, 8:16] = np.nan  # block 1 scores NaN
    q = rng.standard_normal((1, 1, 1, 8)).astype(np.float32)
    got = np.array(index_topk(mx.array(q), mx.array(keys), offset=63, block_size=8, topk=4))
    assert 1 not in got[0, 0, 0, :3] and got[0, 0, 0, 3] == 7


def test_int8_index_keys_follow_the_scaled_scores():
    rng = np.random.default_rng(2)
    keys = mx.array(rng.standard_normal((1, 300, 16)).astype(np.float32))
    q = mx.array(rng.standard_normal((1, 2, 5, 16)).astype(np.float32))
    qk, scale = quantize_index_keys(keys)
    assert qk.dtype == mx.int8 and scale.shape == (1, 300)
    err = np.abs(np.array(qk.astype(mx.float32) * scale[..., None]) - np.array(keys)).max()
    assert err <= float(scale.max()) / 2 + 1e-6
    got = index_topk(q, qk, offset=295, block_size=16, topk=6, index_scales=scale)
    ref = reference_selection(q, np.array(qk, np.float32), 295, 16, 6, scales=scale)
    np.testing.assert_array_equal(np.array(got), ref)


def reference_attention(q, k, v, sel, offset, block, scale):
    q, k, v, sel = (np.array(a, np.float64) for a in (q, k, v, sel))
    B, Hq, L, D = q.shape
    G = Hq // k.shape[1]
    out = np.zeros((B, Hq, L, v.shape[-1]))
    for b in range(B):
        for h in range(Hq):
            for t in range(L):
                pos = offset + t
                keys = [int(j) * block + r for j in sel[b, h // G, t] if j >= 0
                        for r in range(block) if int(j) * block + r <= pos]
                s = k[b, h // G, keys] @ q[b, h, t] * scale
                w = np.exp(s - s.max())
                out[b, h, t] = (w / w.sum()) @ v[b, h // G, keys]
    return out


@pytest.mark.parametrize("B,Hkv,G,D,block,offset,L,S", [
    (1, 1, 2, 8, 4, 0, 23, 23),  # no cache, buffer not a multiple of the block
    (2, 2, 3, 16, 8, 40, 9, 64),  # chunk into a padded cache buffer
    (1, 2, 4, 16, 8, 77, 1, 80),  # decode
])
def test_sparse_attention_matches_brute_force(B, Hkv, G, D, block, offset, L, S):
    rng = np.random.default_rng(S + L)
    q = rng.standard_normal((B, Hkv * G, L, D)).astype(np.float32)
    k = rng.standard_normal((B, Hkv, S, D)).astype(np.float32)
    v = rng.standard_normal((B, Hkv, S, D)).astype(np.float32)
    topk = 4
    sel = np.full((B, Hkv, L, topk), -1, np.int32)
    for idx in np.ndindex(B, Hkv, L):
        own = (offset + idx[2]) // block
        history = rng.permutation(own)[: rng.integers(0, min(own, topk - 1) + 1)]
        ids = list(history) + [own]
        rng.shuffle(ids)  # consumers must accept unordered ids
        sel[idx][: len(ids)] = ids
    got = sparse_attention(mx.array(q), mx.array(k), mx.array(v), mx.array(sel), offset=offset,
                           scale=D**-0.5, block_size=block)
    ref = reference_attention(q, k, v, sel, offset, block, D**-0.5)
    np.testing.assert_allclose(np.array(got), ref, atol=2e-5)


def test_sparse_attention_over_every_block_is_dense_causal_attention():
    rng = np.random.default_rng(3)
    B, H, G, L, D, block = 1, 2, 2, 40, 8, 8
    q, k, v = (mx.array(rng.standard_normal(s).astype(np.float32))
               for s in ((B, H * G, L, D), (B, H, L, D), (B, H, L, D)))
    n = -(-L // block)
    sel = mx.broadcast_to(mx.arange(n, dtype=mx.int32), (B, H, L, n))
    sel = mx.where(sel <= (mx.arange(L) // block)[:, None], sel, -1)
    got = sparse_attention(q, k, v, sel, offset=0, scale=D**-0.5, block_size=block)
    dense = mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask="causal")
    np.testing.assert_allclose(np.array(got), np.array(dense), atol=1e-5)
