// MoE decode, phase 2: out[t] = sum over token t's experts of weight * (h_t,e . down_e^T), plus
// the shared expert's down projection (weight 1).
//
// Grid: (32 * NSG * ceil(D / (NSG * ROWS)), 1, 1) threads, threadgroup (32 * NSG, 1, 1).
// Simdgroup s of threadgroup x owns output rows [d, d + ROWS), d = (x * NSG + s) * ROWS, for all
// tokens: it walks the distinct experts of the call (first slots, as in phase 1), then the
// shared expert, reading each expert's ROWS down rows once and applying them to every token
// routed there with a non-zero weight. Lanes take 16 consecutive columns of the rows per step;
// per token and row a lane keeps one partial sum across all experts, and one simd_sum per
// (token, row) at the end finishes them. No atomics: the result does not depend on scheduling.
// Microscaling codes decode through tables in threadgroup memory, as in phase 1.
//
// Inputs: h [T, K * F + FS] float32 from phase 1; ids [T, K]; rw [T, K]; routed down_*
// (weight uint32 [E, D, F * RBITS / 32], scales and biases [E, D, F / RGS]); shared sdown_*
// ([D, ...], one-element dummies without a shared expert). Output: out [T, D] of type OutT.
// Templates: OutT, MAXT (>= T), RMODE, RBITS, RGS, SMODE, SBITS, SGS, HAS_SHARED, NSG, ROWS
// (D % ROWS == 0).

const int T = ids_shape[0];
const int K = ids_shape[1];
const int E = down_w_shape[0];
const int D = down_w_shape[1];
const int F = down_w_shape[2] * (32 / RBITS);
const int FS = HAS_SHARED ? sdown_w_shape[1] * (32 / SBITS) : 0;
const size_t HW = size_t(K) * F + FS;

const int row = (threadgroup_position_in_grid.x * NSG + simdgroup_index_in_threadgroup) * ROWS;
const int lane = thread_index_in_simdgroup;

threadgroup float e2m1[16];
threadgroup float e4m3[256];
if (RMODE == MOE_MX || SMODE == MOE_MX) {
  moe_fill_tables(e2m1, e4m3, thread_index_in_threadgroup, 32 * NSG);
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
if (row >= D) {
  return;
}

float acc[MAXT * ROWS];
for (int i = 0; i < MAXT * ROWS; ++i) {
  acc[i] = 0.0f;
}
float tw[MAXT];
int first[MAXT];
int col[MAXT];
for (int j = 0; j < T * K; ++j) {
  if (!moe_first_slot(ids, j, E)) {
    continue;
  }
  const int e = int(ids[j]);
  const uint mask = moe_expert_tokens<MAXT>(ids, rw, T, K, e, tw, first);
  for (int t = 0; t < MAXT; ++t) {
    col[t] = first[t] * F;
  }
  moe_down_dots<RMODE, RBITS, RGS, MAXT, ROWS>(
      h, HW, col, tw, F, mask, lane, size_t(e) * D + row, RBITS == 4 ? e2m1 : e4m3, down_w,
      down_s, down_b, acc);
}
if (HAS_SHARED) {
  for (int t = 0; t < MAXT; ++t) {
    tw[t] = 1.0f;
    col[t] = K * F;
  }
  moe_down_dots<SMODE, SBITS, SGS, MAXT, ROWS>(
      h, HW, col, tw, FS, (1u << T) - 1u, lane, row, SBITS == 4 ? e2m1 : e4m3, sdown_w, sdown_s,
      sdown_b, acc);
}

for (int t = 0; t < MAXT; ++t) {
  for (int r = 0; t < T && r < ROWS; ++r) {
    const float y = simd_sum(acc[t * ROWS + r]);
    if (lane == 0) {
      out[size_t(t) * D + row + r] = static_cast<OutT>(y);
    }
  }
}
