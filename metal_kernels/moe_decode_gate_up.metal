// MoE decode, phase 1: h = SwiGLU-OAI(x . gate^T, x . up^T) for every (token, expert) pair
// the routing selects, and for the shared expert on every token.
//
// Grid: (32 * NSG * ceil(max(F, FS) / (NSG * RG)), T * K + HAS_SHARED, 1) threads, threadgroup
// (32 * NSG, 1, 1). Threadgroup (x, y) works on routed slot y (token y / K, its (y % K)-th
// expert) or, for y == T * K, on the shared expert; simdgroup s of it on the RG intermediate
// rows f0 = (x * NSG + s) * RG + [0, RG) of gate and of up. Only the first slot naming an
// expert works: it computes its rows for every token routed to that expert with a non-zero
// weight, so an expert shared by several tokens has its gate and up rows read once per call.
// A lane takes a chunk of 16 (or 32) consecutive inputs per step: it loads the token's x chunk
// once into registers and dots it with the 2 * RG rows' codes (decoded in registers), so x is
// read once per 2 * RG weight rows. A simd_sum per (token, row) finishes the sums and lane 0
// applies SwiGLU-OAI. Float-format codes decode through tables in threadgroup memory (1.1 KB),
// filled before any threadgroup returns.
//
// Inputs: x [T, D] float; ids [T, K] expert ids; rw [T, K] routing weights; slots [E] int32
// (with SLOTS: expert id -> row of the stacked weights, a pool of S resident experts; else a
// placeholder); routed gate_* / up_* (weight uint32 [S or E, F, D * RBITS / 32], scales and
// biases [S or E, F, D / RGS]); shared sgate_* /
// sup_* ([FS, ...]; one-element placeholders without a shared expert); alpha, limit. Affine
// biases are placeholders in the float modes.
// Output: h [T, K * F + FS] float32: token t's expert in slot i at columns [i * F, (i + 1) * F)
// (only the first slot of t naming an expert, and only when its weight is non-zero); the
// shared expert at [K * F, K * F + FS).
// Templates: MAXT (>= T), RMODE, RBITS, RGS (routed gate/up format), SMODE, SBITS, SGS (shared),
// HAS_SHARED, NSG, RG, SLOTS.

constexpr int RCHUNK = moe_chunk(RBITS);
constexpr int SCHUNK = moe_chunk(SBITS);
constexpr int VMAX = RCHUNK > SCHUNK ? RCHUNK : SCHUNK;

const int T = x_shape[0];
const int D = x_shape[1];
const int K = ids_shape[1];
const int E = SLOTS ? slots_shape[0] : gate_w_shape[0];  // expert ids are in [0, E)
const int F = gate_w_shape[1];
const int FS = HAS_SHARED ? sgate_w_shape[0] : 0;
const int HW = K * F + FS;

const int slot = threadgroup_position_in_grid.y;
const int f0 = (threadgroup_position_in_grid.x * NSG + simdgroup_index_in_threadgroup) * RG;
const int lane = thread_index_in_simdgroup;
const bool is_shared = slot == T * K;

threadgroup float e2m1[16];
threadgroup float e4m3[256];
if (RMODE != MOE_AFFINE || SMODE != MOE_AFFINE) {
  moe_fill_tables(e2m1, e4m3, thread_index_in_threadgroup, 32 * NSG);
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

float tw[MAXT];
int first[MAXT];
uint mask = 0u;
int w = 0;  // the expert's row in gate_w / up_w
if (is_shared) {
  mask = (1u << T) - 1u;
} else if (moe_first_slot(ids, slot, E)) {
  const int e = int(ids[slot]);
  w = moe_expert_row<SLOTS>(slots, e, gate_w_shape[0]);
  mask = w < 0 ? 0u : moe_expert_tokens<MAXT>(ids, rw, T, K, e, tw, first);
}
const int rows = is_shared ? FS : F;
if (mask == 0u || f0 >= rows) {
  return;
}

float g_acc[MAXT][RG];
float u_acc[MAXT][RG];
MLX_MTL_PRAGMA_UNROLL
for (int t = 0; t < MAXT; ++t) {
  MLX_MTL_PRAGMA_UNROLL
  for (int r = 0; r < RG; ++r) {
    g_acc[t][r] = 0.0f;
    u_acc[t][r] = 0.0f;
  }
}
float v[VMAX];
MLX_MTL_PRAGMA_UNROLL
for (int t = 0; t < MAXT; ++t) {
  if (!(mask & (1u << t))) {
    continue;  // uniform across the simdgroup
  }
  if (is_shared) {
    for (int k = lane * SCHUNK; k < D; k += 32 * SCHUNK) {
      const float v_sum = moe_load_chunk<SCHUNK>(x + size_t(t) * D + k, v);
      MLX_MTL_PRAGMA_UNROLL
      for (int r = 0; r < RG; ++r) {
        const size_t f = min(f0 + r, rows - 1);  // rows past the end: a real row, not written
        g_acc[t][r] += moe_row_dot<SMODE, SBITS, SGS>(
            sgate_w, sgate_s, sgate_b, SBITS == 8 ? e4m3 : e2m1, f, D, k, v, v_sum);
        u_acc[t][r] += moe_row_dot<SMODE, SBITS, SGS>(
            sup_w, sup_s, sup_b, SBITS == 8 ? e4m3 : e2m1, f, D, k, v, v_sum);
      }
    }
  } else {
    for (int k = lane * RCHUNK; k < D; k += 32 * RCHUNK) {
      const float v_sum = moe_load_chunk<RCHUNK>(x + size_t(t) * D + k, v);
      MLX_MTL_PRAGMA_UNROLL
      for (int r = 0; r < RG; ++r) {
        const size_t f = size_t(w) * F + min(f0 + r, rows - 1);
        g_acc[t][r] += moe_row_dot<RMODE, RBITS, RGS>(
            gate_w, gate_s, gate_b, RBITS == 8 ? e4m3 : e2m1, f, D, k, v, v_sum);
        u_acc[t][r] += moe_row_dot<RMODE, RBITS, RGS>(
            up_w, up_s, up_b, RBITS == 8 ? e4m3 : e2m1, f, D, k, v, v_sum);
      }
    }
  }
}

MLX_MTL_PRAGMA_UNROLL
for (int t = 0; t < MAXT; ++t) {
  if (!(mask & (1u << t))) {
    continue;
  }
  MLX_MTL_PRAGMA_UNROLL
  for (int r = 0; r < RG; ++r) {
    const float g = simd_sum(g_acc[t][r]);
    const float u = simd_sum(u_acc[t][r]);
    if (lane == 0 && f0 + r < rows) {
      const int col = (is_shared ? K * F : first[t] * F) + f0 + r;
      h[size_t(t) * HW + col] = moe_swiglu_oai(g, u, alpha, limit);
    }
  }
}
