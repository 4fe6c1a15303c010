// MSA index block scores for decode (one query per batch row; prefill chunks use
// msa_index_scores_mma): scores[b, h, 0, j] = max over the BLOCK keys of block j of
// dot(q[b, h], keys[b, key]) (times scales[b, key] when QUANT), for every block j that lies
// wholly before the query's own block; -INFINITY for the others; a NaN block max becomes -1e30.
//
// Grid: (n_cols * NT, 1, B) threads, threadgroup (NT, 1, 1), NT = 32 * NSG: threadgroup = key
// block j x batch row b. The H query rows are staged once in threadgroup memory and dealt to
// the simdgroups (PER_SG each); the block is walked in 32-key chunks staged in threadgroup memory
// (coalesced loads), one key per lane, each lane keeping a running max per row that one
// butterfly reduces at the end. Decode reads every index key once: this kernel streams them.
//
// Inputs: q [B, H, 1, D], keys [B, S, D] (float types, or int8 with scales [B, S]), offset
// (position of the query). Any strides. Output: scores [B, H, 1, n_cols] float32, contiguous,
// n_cols = max(offset / BLOCK, 1). Templates: H, D, BLOCK, NSG, QUANT.

constexpr int NT = 32 * NSG;
constexpr int PER_SG = (H + NSG - 1) / NSG;
constexpr int LD = D + 1;  // padded rows: lanes reading different keys hit different banks

const int j = threadgroup_position_in_grid.x;
const int b = threadgroup_position_in_grid.z;
const uint tid = thread_index_in_threadgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const int n_cols = max(offset / BLOCK, 1);
const bool visible = j < offset / BLOCK;  // block j lies before the query's own block

threadgroup float qs[H * D];
threadgroup float tile[32 * LD];

float best[PER_SG];
MLX_MTL_PRAGMA_UNROLL
for (int i = 0; i < PER_SG; ++i) {
  best[i] = -INFINITY;
}

if (visible) {
  for (int e = tid; e < H * D; e += NT) {
    qs[e] = float(q[b * q_strides[0] + (e / D) * q_strides[1] + (e % D) * q_strides[3]]);
  }
  auto block_keys = keys + b * keys_strides[0] + int64_t(j) * BLOCK * keys_strides[1];
  for (int c0 = 0; c0 < BLOCK; c0 += 32) {
    const int n = min(32, BLOCK - c0);
    threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous chunk is consumed
    msa_stage_rows<32, D, D, LD, NT>(
        tile, block_keys + c0 * keys_strides[1], keys_strides[1], keys_strides[2], n, tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float dot[PER_SG];
    MLX_MTL_PRAGMA_UNROLL
    for (int i = 0; i < PER_SG; ++i) {
      dot[i] = 0.0f;
    }
    for (int d = 0; d < D; ++d) {
      const float kd = tile[lane * LD + d];
      MLX_MTL_PRAGMA_UNROLL
      for (int i = 0; i < PER_SG; ++i) {
        dot[i] += qs[min(int(sg) + i * NSG, H - 1) * D + d] * kd;  // padding rows: a real row
      }
    }
    float key_scale = 1.0f;
    if (QUANT && lane < uint(n)) {
      const int64_t key = int64_t(j) * BLOCK + c0 + lane;
      key_scale = scales[b * scales_strides[0] + key * scales_strides[1]];
    }
    if (lane < uint(n)) {
      MLX_MTL_PRAGMA_UNROLL
      for (int i = 0; i < PER_SG; ++i) {
        best[i] = msa_nan_max(best[i], QUANT ? dot[i] * key_scale : dot[i]);
      }
    }
  }
}

MLX_MTL_PRAGMA_UNROLL
for (int i = 0; i < PER_SG; ++i) {
  const int h = sg + i * NSG;
  if (h >= H) {
    continue;  // uniform across the simdgroup
  }
  float v = visible ? msa_simd_nan_max(best[i]) : -INFINITY;
  if (isnan(v)) {
    v = -1e30f;
  }
  if (lane == 0) {
    scores[(int64_t(b) * H + h) * n_cols + j] = v;
  }
}
