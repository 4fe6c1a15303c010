"""MoE inputs for the kernel tests: expert weights in every format, routings with every edge."""

import mlx.core as mx
import numpy as np

from m3mlx.metal_kernels.moe import DenseWeight, ExpertWeights, QuantizedWeight

FORMATS = {  # (mode, bits, group size): every format the kernels decode
    "affine1": ("affine", 1, 32),
    "affine2": ("affine", 2, 64),
    "affine3": ("affine", 3, 32),
    "affine4": ("affine", 4, 64),
    "affine5": ("affine", 5, 64),
    "affine6": ("affine", 6, 64),
    "affine8": ("affine", 8, 64),
    "mxfp4": ("mxfp4", 4, 32),
    "mxfp8": ("mxfp8", 8, 32),
    "nvfp4": ("nvfp4", 4, 16),
}

SMALL = dict(E=16, D=576, F=192, FS=128, K=4)  # D: one full and one partial 512-input step


def random_experts(rng, fmt, E, D, F, scale=0.15) -> ExpertWeights:
    """gate/up [E, F, D], down [E, D, F] (E None: the shared expert's plain matrices); fmt None
    for unquantized weights."""
    lead = () if E is None else (E,)

    def q(shape, fan_in):
        w = rng.standard_normal(lead + shape).astype(np.float32) * scale * (576 / fan_in) ** 0.5
        if fmt is None:
            return DenseWeight(mx.array(w))
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
