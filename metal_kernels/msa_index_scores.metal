// MSA index block scores: scores[b, h, t, j] = max over the BLOCK keys of block j of
// dot(q[b, h, t], keys[b, key]) (times scales[b, key] when QUANT), for every block j that lies
// wholly before query t's own block; -INFINITY for the others (the causal cut); a NaN block
// max becomes -1e30.
//
// Grid: (n_cols * NT, ceil(L / TQ), B) threads, threadgroup (NT, 1, 1), NT = 32 * NSG.
// One threadgroup = key block j x a tile of TQ queries x batch row b. The tile's TQ * H
// (query, head) pairs are dealt to the NSG simdgroups; the block is walked in 32-key chunks
// staged in threadgroup memory (coalesced loads), one key per lane, and each simdgroup keeps a
// per-lane running max that one butterfly reduces at the end.
//
// Inputs: q [B, H, L, D], keys [B, S, D] (float types, or int8 with scales [B, S]), offset
// (position of query 0). Any strides. Output: scores [B, H, L, n_cols] float32, contiguous,
// n_cols = max((offset + L - 1) / BLOCK, 1).
// Templates: H, D, BLOCK, TQ, NSG, QUANT.

constexpr int NT = 32 * NSG;
constexpr int PAIRS = TQ * H;
constexpr int PER_SG = (PAIRS + NSG - 1) / NSG;
constexpr int LD = D + 1;  // padded rows: lanes reading different keys hit different banks

const int j = threadgroup_position_in_grid.x;
const int t0 = threadgroup_position_in_grid.y * TQ;
const int b = threadgroup_position_in_grid.z;
const uint tid = thread_index_in_threadgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const int L = q_shape[2];
const int n_cols = max((offset + L - 1) / BLOCK, 1);
const int t_end = min(t0 + TQ, L);

threadgroup float tile[32 * LD];

// The whole tile sees block j only if the tile's last query has its own block after j.
const bool tile_sees_block = j < (offset + t_end - 1) / BLOCK;

float best[PER_SG];
for (int i = 0; i < PER_SG; ++i) {
  best[i] = -INFINITY;
}

if (tile_sees_block) {
  auto block_keys =
      keys + b * keys_strides[0] + int64_t(j) * BLOCK * keys_strides[1];
  for (int c0 = 0; c0 < BLOCK; c0 += 32) {
    const int n = min(32, BLOCK - c0);
    threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous chunk is consumed
    msa_stage_rows<D, LD, NT>(
        tile, block_keys + c0 * keys_strides[1], keys_strides[1], keys_strides[2], n, tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float key_scale = 1.0f;
    if (QUANT && lane < uint(n)) {
      const int64_t key = int64_t(j) * BLOCK + c0 + lane;
      key_scale = scales[b * scales_strides[0] + key * scales_strides[1]];
    }
    for (int i = 0; i < PER_SG; ++i) {
      const int p = sg + i * NSG;
      const int t = t0 + p / H;
      if (p >= PAIRS || t >= L) {
        continue;  // uniform across the simdgroup
      }
      const int h = p % H;
      auto qrow = q + b * q_strides[0] + h * q_strides[1] + t * q_strides[2];
      float dot = 0.0f;
      for (int d = 0; d < D; ++d) {
        dot += float(qrow[d * q_strides[3]]) * tile[lane * LD + d];
      }
      if (QUANT) {
        dot *= key_scale;
      }
      if (lane < uint(n)) {
        best[i] = msa_nan_max(best[i], dot);
      }
    }
  }
}

for (int i = 0; i < PER_SG; ++i) {
  const int p = sg + i * NSG;
  const int t = t0 + p / H;
  if (p >= PAIRS || t >= L) {
    continue;
  }
  const int h = p % H;
  float v = tile_sees_block ? msa_simd_nan_max(best[i]) : -INFINITY;
  if (j >= (offset + t) / BLOCK) {
    v = -INFINITY;  // block j is the query's own block or after it
  } else if (isnan(v)) {
    v = -1e30f;
  }
  if (lane == 0) {
    scores[((int64_t(b) * H + h) * L + t) * n_cols + j] = v;
  }
}
