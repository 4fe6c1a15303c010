// MoE decode, phase 1: h = SwiGLU-OAI(x . gate^T, x . up^T) for every (token, expert) pair
// the routing selects, and for the shared expert on every token.
//
// Grid: (32 * NSG * ceil(max(F, FS) / NSG), T * K + HAS_SHARED, 1) threads, threadgroup
// (32 * NSG, 1, 1). Threadgroup (x, y) works on routed slot y (token y / K, its (y % K)-th
// expert) or, for y == T * K, on the shared expert; simdgroup s of it on intermediate row
// f = x * NSG + s. Only the first slot naming an expert works: it computes row f for every
// token routed to that expert with a non-zero weight, so an expert shared by several tokens
// has its gate and up rows read once per call. A lane takes 16 consecutive inputs of the row
// per step (a simdgroup covers 512 inputs per step), decodes them from the gate and the up
// tensor in the same pass, and accumulates one gate and one up dot product per token; a
// simd_sum per token finishes them and lane 0 applies SwiGLU-OAI. Microscaling codes decode
// through tables in threadgroup memory (1.1 KB), filled before any threadgroup returns.
//
// Inputs: x [T, D] float; ids [T, K] expert ids; rw [T, K] routing weights; routed gate_* / up_*
// (weight uint32 [E, F, D * RBITS / 32], scales and biases [E, F, D / RGS]); shared sgate_* /
// sup_* ([FS, ...]; one-element dummies without a shared expert); alpha, limit. Affine biases
// are one-element dummies in microscaling modes.
// Output: h [T, K * F + FS] float32: token t's expert in slot i at columns [i * F, (i + 1) * F)
// (only the first slot of t naming an expert, and only when its weight is non-zero); the
// shared expert at [K * F, K * F + FS).
// Templates: MAXT (>= T), RMODE, RBITS, RGS (routed gate/up format), SMODE, SBITS, SGS (shared),
// HAS_SHARED, NSG.

const int T = x_shape[0];
const int D = x_shape[1];
const int K = ids_shape[1];
const int E = gate_w_shape[0];
const int F = gate_w_shape[1];
const int FS = HAS_SHARED ? sgate_w_shape[0] : 0;
const int HW = K * F + FS;

const int slot = threadgroup_position_in_grid.y;
const int row = threadgroup_position_in_grid.x * NSG + simdgroup_index_in_threadgroup;
const int lane = thread_index_in_simdgroup;
const bool is_shared = slot == T * K;

threadgroup float e2m1[16];
threadgroup float e4m3[256];
if (RMODE == MOE_MX || SMODE == MOE_MX) {
  moe_fill_tables(e2m1, e4m3, thread_index_in_threadgroup, 32 * NSG);
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

float tw[MAXT];
int first[MAXT];
uint mask = 0u;
int e = 0;
if (is_shared) {
  mask = (1u << T) - 1u;
} else if (moe_first_slot(ids, slot, E)) {
  e = int(ids[slot]);
  mask = moe_expert_tokens<MAXT>(ids, rw, T, K, e, tw, first);
}
if (mask == 0u || row >= (is_shared ? FS : F)) {
  return;
}

float g_acc[MAXT];
float u_acc[MAXT];
for (int t = 0; t < MAXT; ++t) {
  g_acc[t] = 0.0f;
  u_acc[t] = 0.0f;
}
if (is_shared) {
  moe_gate_up_dots<SMODE, SBITS, SGS, MAXT>(
      x, D, mask, lane, row, SBITS == 4 ? e2m1 : e4m3, sgate_w, sgate_s, sgate_b, sup_w, sup_s,
      sup_b, g_acc, u_acc);
} else {
  moe_gate_up_dots<RMODE, RBITS, RGS, MAXT>(
      x, D, mask, lane, size_t(e) * F + row, RBITS == 4 ? e2m1 : e4m3, gate_w, gate_s, gate_b,
      up_w, up_s, up_b, g_acc, u_acc);
}

for (int t = 0; t < MAXT; ++t) {
  if (mask & (1u << t)) {
    const float g = simd_sum(g_acc[t]);
    const float u = simd_sum(u_acc[t]);
    if (lane == 0) {
      const int col = is_shared ? K * F + row : first[t] * F + row;
      h[size_t(t) * HW + col] = moe_swiglu_oai(g, u, alpha, limit);
    }
  }
}
