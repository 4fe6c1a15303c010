// MoE decode, phase 2: out[t] = sum over token t's experts of weight * (h_t,e . down_e^T), plus
// the shared expert's down projection (weight 1).
//
// Grid: (32 * NSG * ceil(D / (NSG * RD)), 1, 1) threads, threadgroup (32 * NSG, 1, 1).
// Simdgroup s of threadgroup x owns output rows [d0, d0 + RD), d0 = (x * NSG + s) * RD, for all
// tokens: it walks the distinct experts of the call (first slots, as in phase 1), then the
// shared expert, reading each expert's RD down rows once for each token routed there with a
// non-zero weight. A lane takes a chunk of 16 (or 32) consecutive columns per step: it loads
// the token's h chunk once into registers and dots it with the RD rows' codes, so h is read
// once per RD weight rows (64 B of fp32 activations per lane-step then meet RD x 8 B of 4-bit
// weights). Per token and row a lane keeps one partial sum across all experts (the routing
// weight folded in), and one simd_sum per (token, row) at the end finishes them. No atomics:
// the result does not depend on scheduling. Float-format codes decode through tables in
// threadgroup memory, as in phase 1.
//
// Inputs: h [T, K * F + FS] float32 from phase 1; ids [T, K]; rw [T, K]; slots [E] (as in
// phase 1); routed down_* (weight uint32 [S or E, D, F * RBITS / 32], scales and biases
// [S or E, D, F / RGS]); shared sdown_*
// ([D, ...], one-element placeholders without a shared expert). Output: out [T, D] of type OutT.
// Templates: OutT, MAXT (>= T), RMODE, RBITS, RGS, SMODE, SBITS, SGS, HAS_SHARED, NSG, RD,
// SLOTS.

constexpr int RCHUNK = moe_chunk(RBITS);
constexpr int SCHUNK = moe_chunk(SBITS);
constexpr int VMAX = RCHUNK > SCHUNK ? RCHUNK : SCHUNK;

const int T = ids_shape[0];
const int K = ids_shape[1];
const int E = SLOTS ? slots_shape[0] : down_w_shape[0];  // expert ids are in [0, E)
const int D = down_w_shape[1];
const int F = down_w_shape[2] * 32 / RBITS;
const int FS = HAS_SHARED ? sdown_w_shape[1] * 32 / SBITS : 0;
const size_t HW = size_t(K) * F + FS;

const int d0 = (threadgroup_position_in_grid.x * NSG + simdgroup_index_in_threadgroup) * RD;
const int lane = thread_index_in_simdgroup;

threadgroup float e2m1[16];
threadgroup float e4m3[256];
if (RMODE != MOE_AFFINE || SMODE != MOE_AFFINE) {
  moe_fill_tables(e2m1, e4m3, thread_index_in_threadgroup, 32 * NSG);
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
if (d0 >= D) {
  return;
}

float acc[MAXT][RD];
MLX_MTL_PRAGMA_UNROLL
for (int t = 0; t < MAXT; ++t) {
  MLX_MTL_PRAGMA_UNROLL
  for (int r = 0; r < RD; ++r) {
    acc[t][r] = 0.0f;
  }
}
float v[VMAX];
float tw[MAXT];
int first[MAXT];
for (int j = 0; j < T * K; ++j) {
  if (!moe_first_slot(ids, j, E)) {
    continue;
  }
  const int e = int(ids[j]);
  const int w = moe_expert_row<SLOTS>(slots, e, down_w_shape[0]);  // its row in down_w
  if (w < 0) {
    continue;
  }
  const uint mask = moe_expert_tokens<MAXT>(ids, rw, T, K, e, tw, first);
  MLX_MTL_PRAGMA_UNROLL
  for (int t = 0; t < MAXT; ++t) {
    if (!(mask & (1u << t))) {
      continue;  // uniform across the simdgroup
    }
    auto ht = h + size_t(t) * HW + size_t(first[t]) * F;
    for (int k = lane * RCHUNK; k < F; k += 32 * RCHUNK) {
      const float v_sum = moe_load_chunk<RCHUNK>(ht + k, v);
      MLX_MTL_PRAGMA_UNROLL
      for (int r = 0; r < RD; ++r) {
        const size_t row = size_t(w) * D + min(d0 + r, D - 1);  // past the end: not written
        acc[t][r] += tw[t] * moe_row_dot<RMODE, RBITS, RGS>(
            down_w, down_s, down_b, RBITS == 8 ? e4m3 : e2m1, row, F, k, v, v_sum);
      }
    }
  }
}
if (HAS_SHARED) {
  MLX_MTL_PRAGMA_UNROLL
  for (int t = 0; t < MAXT; ++t) {
    if (t >= T) {
      continue;
    }
    auto ht = h + size_t(t) * HW + size_t(K) * F;
    for (int k = lane * SCHUNK; k < FS; k += 32 * SCHUNK) {
      const float v_sum = moe_load_chunk<SCHUNK>(ht + k, v);
      MLX_MTL_PRAGMA_UNROLL
      for (int r = 0; r < RD; ++r) {
        acc[t][r] += moe_row_dot<SMODE, SBITS, SGS>(
            sdown_w, sdown_s, sdown_b, SBITS == 8 ? e4m3 : e2m1, min(d0 + r, D - 1), FS, k, v,
            v_sum);
      }
    }
  }
}

MLX_MTL_PRAGMA_UNROLL
for (int t = 0; t < MAXT; ++t) {
  if (t >= T) {
    continue;
  }
  MLX_MTL_PRAGMA_UNROLL
  for (int r = 0; r < RD; ++r) {
    const float y = simd_sum(acc[t][r]);
    if (lane == 0 && d0 + r < D) {
      out[size_t(t) * D + d0 + r] = static_cast<OutT>(y);
    }
  }
}
