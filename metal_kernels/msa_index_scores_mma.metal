// MSA index block scores for prefill chunks (L > 1; decode uses msa_index_scores):
// scores[b, h, t, j] = max over the BLOCK keys of block j of dot(q[b, h, t], keys[b, key])
// (times scales[b, key] when QUANT) for every block j wholly before query t's own block;
// -INFINITY for the others (the causal cut); a NaN block max becomes -1e30.
//
// Grid: (ceil(L / TQ) * NT, ceil(n_cols / JB), B) threads, threadgroup (NT, 1, 1), NT = 32 * NSG.
// Threadgroup (x, y, b) = a tile of TQ queries x the JB key blocks [y * JB, (y + 1) * JB). The
// query tile is the fastest-varying axis, so the threadgroups that run together share their key
// blocks: each index key comes from DRAM about once per chunk and is re-read from the cache
// by the other query tiles, instead of every tile sweeping the whole index-key buffer.
// The tile's TQ * H (query, head) rows go 8 to a simdgroup: each simdgroup loads its 8 query
// rows once into simdgroup matrices (QF of them, 8 dims each), then for every 32-key chunk of a
// block (staged in threadgroup memory) multiplies them with the chunk's transposed 8 x 8 key
// tiles (simdgroup_multiply_accumulate, float32), stores its 8 x 32 score tile to threadgroup
// memory, and keeps a running max per row on four lanes a row.
//
// Inputs: q [B, H, L, D], keys [B, S, D] (float types, or int8 with scales [B, S]), offset
// (position of query 0). Any strides. Output: scores [B, H, L, n_cols] float32, contiguous,
// n_cols = max((offset + L - 1) / BLOCK, 1). Templates: H, D, BLOCK, TQ (TQ * H <= 8 * NSG),
// NSG (a multiple of 4), JB, QUANT.

constexpr int NT = 32 * NSG;
constexpr int D8 = (D + 7) / 8 * 8;  // head dim padded to whole 8 x 8 tiles (zeros)
constexpr int QF = D8 / 8;
constexpr int LD = D8 + 4;  // staging row pitch: a whole number of float4, off the bank period
constexpr int ROWS = TQ * H;

const int t0 = threadgroup_position_in_grid.x * TQ;
const int j0 = threadgroup_position_in_grid.y * JB;
const int b = threadgroup_position_in_grid.z;
const uint tid = thread_index_in_threadgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const int L = q_shape[2];
const int n_cols = max((offset + L - 1) / BLOCK, 1);
const int t_end = min(t0 + TQ, L);
const int last_own = (offset + t_end - 1) / BLOCK;  // the tile's latest own block

threadgroup float stage[32 * LD];  // 32 query rows at a time, then 32-key chunks
threadgroup float tiles[NSG * 8 * 32];  // each simdgroup's 8 x 32 score tile
threadgroup float key_scale[32];

// This lane's row of its simdgroup's tile and its quarter of the 32 keys.
const int r8 = lane / 4;
const int quarter = lane % 4;
const int row = sg * 8 + r8;
const int t = t0 + row / H;
const int h = row % H;
const bool row_ok = row < ROWS && t < L;

// The query rows, 32 at a time (4 simdgroups' worth), into each simdgroup's matrices.
simdgroup_float8x8 qf[QF];
MLX_MTL_PRAGMA_UNROLL
for (int round = 0; round < NSG / 4; ++round) {
  for (int e = tid; e < 32 * D8; e += NT) {
    const int r = round * 32 + e / D8;
    const int d = e % D8;
    const int qt = t0 + r / H;
    float v = 0.0f;
    if (r < ROWS && qt < L && d < D) {
      v = float(q[b * q_strides[0] + (r % H) * q_strides[1] + qt * q_strides[2] +
                  d * q_strides[3]]);
    }
    stage[(e / D8) * LD + d] = v;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (int(sg) / 4 == round) {
    MLX_MTL_PRAGMA_UNROLL
    for (int k = 0; k < QF; ++k) {
      simdgroup_load(qf[k], stage + (sg % 4) * 8 * LD + k * 8, LD);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

auto batch_keys = keys + b * keys_strides[0];
threadgroup float* tile = tiles + sg * 8 * 32;
for (int j = j0; j < min(j0 + JB, n_cols); ++j) {
  float best = -INFINITY;
  const bool visible = j < last_own;  // uniform: some query of the tile sees block j
  for (int c0 = 0; visible && c0 < BLOCK; c0 += 32) {
    const int n = min(32, BLOCK - c0);
    const int64_t key0 = int64_t(j) * BLOCK + c0;
    threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous chunk is consumed
    msa_stage_rows<32, D, D8, LD, NT>(
        stage, batch_keys + key0 * keys_strides[1], keys_strides[1], keys_strides[2], n, tid);
    if (QUANT && tid < uint(n)) {
      key_scale[tid] = scales[b * scales_strides[0] + (key0 + tid) * scales_strides[1]];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    simdgroup_float8x8 acc[4];
    MLX_MTL_PRAGMA_UNROLL
    for (int kt = 0; kt < 4; ++kt) {
      acc[kt] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
    MLX_MTL_PRAGMA_UNROLL
    for (int k = 0; k < QF; ++k) {
      MLX_MTL_PRAGMA_UNROLL
      for (int kt = 0; kt < 4; ++kt) {
        simdgroup_float8x8 kf;  // keys kt*8.. as columns: the transposed 8 x 8 key tile
        simdgroup_load(kf, stage + kt * 8 * LD + k * 8, LD, 0, true);
        simdgroup_multiply_accumulate(acc[kt], qf[k], kf, acc[kt]);
      }
    }
    MLX_MTL_PRAGMA_UNROLL
    for (int kt = 0; kt < 4; ++kt) {
      simdgroup_store(acc[kt], tile + kt * 8, 32);
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);
    MLX_MTL_PRAGMA_UNROLL
    for (int i = 0; i < 8; ++i) {
      const int key = quarter * 8 + i;
      if (key < n) {
        const float s = tile[r8 * 32 + key];
        best = msa_nan_max(best, QUANT ? s * key_scale[key] : s);
      }
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);  // read before the next chunk's stores
  }
  best = msa_nan_max(best, simd_shuffle_xor(best, ushort(1)));
  best = msa_nan_max(best, simd_shuffle_xor(best, ushort(2)));
  if (quarter == 0 && row_ok) {
    float v = isnan(best) ? -1e30f : best;
    if (j >= (offset + t) / BLOCK) {
      v = -INFINITY;  // block j is the query's own block or after it
    }
    scores[((int64_t(b) * H + h) * L + t) * n_cols + j] = v;
  }
}
