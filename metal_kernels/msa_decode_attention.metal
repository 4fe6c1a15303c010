// MSA decode attention, split phase: one query position (offset) per (b, KV head h); each
// threadgroup attends all G query heads of the group to ONE 32-key part of one selected block
// and writes an unnormalised partial (o, max m, sum l); msa_decode_merge combines the
// TOPK * SPLIT partials of a row (flash-decoding with split-K inside each block).
//
// Grid: (NT, TOPK * SPLIT, B * H) threads, threadgroup (NT, 1, 1), NT = 32 * NSG,
// SPLIT = ceil(BLOCK / 32): threadgroup = (slot, part of the block, b, h).
// 1. q (times scale) for the G heads and the part's 32 keys are staged in threadgroup memory
//    (coalesced loads; q is read from device memory once).
// 2. Scores: the G heads are dealt to the simdgroups (ROWS each), a lane owns a key and computes
//    its ROWS dot products from one read of each key element. Softmax over the part's keys
//    (simd_max, simd_sum); the weights go to threadgroup memory.
// 3. P.V: a thread owns CPT output columns for all G heads and reads each value element once,
//    straight from device memory (coalesced across the threadgroup).
// Keys after the query position (the causal cut inside the own block), past the buffer, and in
// a -1 slot are left out; a part with no key left writes m = -INFINITY, l = 0 and no o.
//
// Compact K/V (KV_BITS 8 or 4, msa_stage_compact_rows): only the part's 32 keys are decoded,
// into the key tile; after the scores the tile is free, and the part's values are decoded into
// it too, so that P.V reads them from threadgroup memory. A pool of blocks (PAGED): selected
// block `selection[slot]` (whose id sets the positions) is stored at block `slots[slot]` of the
// buffers.
//
// Inputs: q [B, H*G, 1, D], keys [B, H, S, D], values [B, H, S, DV] (compact: uint32 codes
// [B, H, S, D * KV_BITS / 32] with k_scales / k_biases [B, H, S, D / KV_GROUP], the same for
// values; otherwise those four are unread placeholders), selection [B, H, 1, TOPK] int32,
// slots (PAGED: like selection; otherwise a placeholder), offset, scale. Any strides.
// Outputs: o_part [B, H, TOPK * SPLIT, G, DV] and ml_part [B, H, TOPK * SPLIT, G, 2] (m, l),
// float32, contiguous. Templates: G, D, DV, BLOCK, NSG, KV_BITS (0: float K/V), KV_GROUP, PAGED.

constexpr int NT = 32 * NSG;
constexpr int ROWS = (G + NSG - 1) / NSG;
constexpr int CPT = (DV + NT - 1) / NT;
constexpr int LD = D + 1;  // padded key rows: lanes reading different keys hit different banks
constexpr int LDV = DV + 1;  // the value rows decoded into the same tile (compact K/V)
constexpr int KS = KV_BITS && LDV > LD ? 32 * LDV : 32 * LD;
constexpr int SPLIT = (BLOCK + 31) / 32;

const int part = threadgroup_position_in_grid.y;
const int bh = threadgroup_position_in_grid.z;
const uint tid = thread_index_in_threadgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const int H = keys_shape[1];
const int S = keys_shape[2];
const int n_parts = selection_shape[3] * SPLIT;
const int b = bh / H;
const int h = bh % H;
const int slot = part / SPLIT;
const int in_block = (part % SPLIT) * 32;

threadgroup float qs[G * D];
threadgroup float ks[KS];
threadgroup float ps[G * 32];

const int blk = selection[b * selection_strides[0] + h * selection_strides[1] +
                          slot * selection_strides[3]];
const int src = PAGED ? slots[b * slots_strides[0] + h * slots_strides[1] +
                              slot * slots_strides[3]] : blk;
const int key0 = blk * BLOCK + in_block;  // the part's first position
const int krow = src * BLOCK + in_block;  // and its row in the buffers
const int n = blk < 0 ? 0 : min(min(32, BLOCK - in_block), min(offset + 1 - key0, S - krow));
const int64_t row0 = (int64_t(bh) * n_parts + part) * G;

if (n <= 0) {  // uniform: nothing of this part is visible
  for (int g = tid; g < G; g += NT) {
    ml_part[(row0 + g) * 2] = -INFINITY;
    ml_part[(row0 + g) * 2 + 1] = 0.0f;
  }
  return;
}

// 1. Stage q * scale and the part's keys.
auto qb = q + b * q_strides[0] + h * G * q_strides[1];
for (int e = tid; e < G * D; e += NT) {
  qs[e] = float(qb[(e / D) * q_strides[1] + (e % D) * q_strides[3]]) * scale;
}
auto head_keys = keys + b * keys_strides[0] + h * keys_strides[1];
if (KV_BITS) {
  const int64_t at = b * k_scales_strides[0] + h * k_scales_strides[1] +
                     int64_t(krow) * k_scales_strides[2];
  msa_stage_compact_rows<32, D, D, LD, NT, (KV_BITS ? KV_BITS : 8), KV_GROUP>(
      ks, head_keys + krow * keys_strides[2], keys_strides[2], keys_strides[3],
      k_scales + at, k_biases + at, k_scales_strides[2], k_scales_strides[3], n, tid);
} else {
  msa_stage_rows<32, D, D, LD, NT>(
      ks, head_keys + krow * keys_strides[2], keys_strides[2], keys_strides[3], n, tid);
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 2. Scores and the softmax over this part's keys, per head.
float s[ROWS];
MLX_MTL_PRAGMA_UNROLL
for (int i = 0; i < ROWS; ++i) {
  s[i] = 0.0f;
}
for (int d = 0; d < D; ++d) {
  const float kd = ks[lane * LD + d];
  MLX_MTL_PRAGMA_UNROLL
  for (int i = 0; i < ROWS; ++i) {
    s[i] += qs[min(int(sg) + i * NSG, G - 1) * D + d] * kd;  // padding heads read a real row
  }
}
MLX_MTL_PRAGMA_UNROLL
for (int i = 0; i < ROWS; ++i) {
  const int g = sg + i * NSG;
  if (g >= G) {
    continue;  // uniform across the simdgroup
  }
  const float sc = lane < uint(n) ? s[i] : -INFINITY;
  const float m = simd_max(sc);
  const float p = m == -INFINITY ? 0.0f : exp(sc - m);
  const float l = simd_sum(p);
  ps[g * 32 + lane] = p;
  if (lane == 0) {
    ml_part[(row0 + g) * 2] = m;
    ml_part[(row0 + g) * 2 + 1] = l;
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 3. o[g][col] = sum over the part's keys of p[g][key] * values[key][col].
auto head_values = values + b * values_strides[0] + h * values_strides[1];
if (KV_BITS) {  // the scores are done with the key tile: decode the values into it
  const int64_t at = b * v_scales_strides[0] + h * v_scales_strides[1] +
                     int64_t(krow) * v_scales_strides[2];
  msa_stage_compact_rows<32, DV, DV, LDV, NT, (KV_BITS ? KV_BITS : 8), KV_GROUP>(
      ks, head_values + krow * values_strides[2], values_strides[2], values_strides[3],
      v_scales + at, v_biases + at, v_scales_strides[2], v_scales_strides[3], n, tid);
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
float o[G][CPT];
MLX_MTL_PRAGMA_UNROLL
for (int g = 0; g < G; ++g) {
  MLX_MTL_PRAGMA_UNROLL
  for (int c = 0; c < CPT; ++c) {
    o[g][c] = 0.0f;
  }
}
for (int k = 0; k < n; ++k) {
  auto vrow = head_values + int64_t(krow + k) * values_strides[2];
  MLX_MTL_PRAGMA_UNROLL
  for (int c = 0; c < CPT; ++c) {
    const int col = tid + NT * c;
    const float v = col >= DV ? 0.0f
                    : KV_BITS ? ks[k * LDV + col] : float(vrow[col * values_strides[3]]);
    MLX_MTL_PRAGMA_UNROLL
    for (int g = 0; g < G; ++g) {
      o[g][c] += ps[g * 32 + k] * v;
    }
  }
}
MLX_MTL_PRAGMA_UNROLL
for (int g = 0; g < G; ++g) {
  MLX_MTL_PRAGMA_UNROLL
  for (int c = 0; c < CPT; ++c) {
    const int col = tid + NT * c;
    if (col < DV) {
      o_part[(row0 + g) * DV + col] = o[g][c];
    }
  }
}
