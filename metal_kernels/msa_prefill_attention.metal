// MSA prefill attention: a tile of TQ consecutive queries (all G query heads of KV head h)
// against the union of the blocks those queries selected. Each query attends only to its own
// selection; keys after the query's position (the causal cut inside its own block) and past
// the buffer are masked; -1 slots and repeated ids across the tile are skipped.
//
// Grid: (NT, ceil(L / TQ), B * H) threads, threadgroup (NT, 1, 1), NT = 32 * NSG.
// The tile's TQ * TOPK ids are deduplicated in threadgroup memory, each unique block carrying a
// bit mask of the tile queries that chose it, so a block chosen by several queries of the tile
// is loaded once. The TQ * G (query, head) rows go 8 to a simdgroup. A simdgroup loads its 8
// query rows once (times scale) into simdgroup matrices; then, per KC-key chunk of a block
// (keys and values staged in threadgroup memory together), it computes its 8 x KC scores with
// simdgroup_multiply_accumulate, applies the masks and an online softmax on four lanes a row
// (in threadgroup memory), and accumulates P.V into 8 x 8 output matrices, also by
// simdgroup_multiply_accumulate. The softmax reference max is raised only when a row's chunk max
// exceeds it by more than RESCALE (e^8 bounds every weight), and the output is rescaled then,
// by a diagonal matrix product: at most a few times per row instead of every chunk.
//
// Compact K/V (KV_BITS 8 or 4): each chunk's keys and values are decoded as they are staged
// (msa_stage_compact_rows), so only the selected blocks are ever decoded. A pool of blocks
// (PAGED): selected block `selection[...]` (whose id sets the positions) is stored at block
// `slots[...]` of the buffers; the tile's unique blocks carry both.
//
// Inputs: q [B, H*G, L, D], keys [B, H, S, D], values [B, H, S, DV] (compact: uint32 codes
// [B, H, S, D * KV_BITS / 32] with k_scales / k_biases [B, H, S, D / KV_GROUP], the same for
// values; otherwise those four are unread placeholders), selection [B, H, L, TOPK] int32,
// slots (PAGED: like selection; otherwise a placeholder), offset, scale. Any strides.
// Output: out [B, H*G, L, DV] in T. Templates: T, G, D, DV, BLOCK, TOPK, TQ (<= 32,
// TQ * G <= 8 * NSG), NSG, KV_BITS (0: float K/V), KV_GROUP, PAGED.

constexpr int NT = 32 * NSG;
constexpr int KC = 16;  // keys per chunk: two 8-key tiles
constexpr int D8 = (D + 7) / 8 * 8;
constexpr int DV8 = (DV + 7) / 8 * 8;
constexpr int QF = D8 / 8;
constexpr int OF = DV8 / 8;
constexpr int LDK = D8 + 4;  // staging row pitches: whole float4s, off the bank period
constexpr int LDV = DV8 + 4;
constexpr int STAGE = KC * (LDK + LDV);
constexpr int QROWS = (STAGE / LDK) / 8 * 8;  // query rows staged per round (whole simdgroups)
constexpr int ROWS = TQ * G;
constexpr int CAND = TQ * TOPK;
constexpr float RESCALE = 8.0f;

const int t0 = threadgroup_position_in_grid.y * TQ;
const int bh = threadgroup_position_in_grid.z;
const uint tid = thread_index_in_threadgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const int H = keys_shape[1];
const int S = keys_shape[2];
const int L = q_shape[2];
const int b = bh / H;
const int h = bh % H;
const int t_end = min(t0 + TQ, L);
const int last_pos = offset + t_end - 1;

threadgroup float stage[STAGE];  // query rows, then each chunk's keys [KC][LDK], values [KC][LDV]
threadgroup float tiles[NSG * 8 * KC];  // each simdgroup's 8 x KC scores, then weights
threadgroup float squares[NSG * 64];  // each simdgroup's 8 x 8 scratch (rescale, output)
threadgroup int cand[CAND];
threadgroup uint cand_mask[CAND];
threadgroup int unique_block[CAND];
threadgroup uint unique_mask[CAND];
threadgroup int cand_src[PAGED ? CAND : 1];  // where each id is stored (PAGED)
threadgroup int unique_src[PAGED ? CAND : 1];

// 1. The tile's selected ids; queries past L select nothing.
for (int e = tid; e < CAND; e += NT) {
  const int t = t0 + e / TOPK;
  cand[e] = t < L ? selection[b * selection_strides[0] + h * selection_strides[1] +
                              t * selection_strides[2] + (e % TOPK) * selection_strides[3]]
                  : -1;
  if (PAGED) {
    cand_src[e] = t < L ? slots[b * slots_strides[0] + h * slots_strides[1] +
                                t * slots_strides[2] + (e % TOPK) * slots_strides[3]]
                        : -1;
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 2. The first occurrence of each id leads it and gathers which tile queries chose it.
for (int e = tid; e < CAND; e += NT) {
  const int id = cand[e];
  uint mask = 0;
  bool leads = id >= 0;
  for (int k = 0; k < CAND; ++k) {
    if (cand[k] == id) {
      leads = leads && k >= e;
      mask |= 1u << (k / TOPK);
    }
  }
  cand_mask[e] = leads ? mask : 0u;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 3. Compact the leaders into the unique-block list, in ascending block order: each query then
// meets its own blocks in the same order whichever queries share its tile, so its arithmetic
// (hence its bits) does not depend on where a call's tiles start (a memory tier splits long
// prefill chunks into groups of queries).
int n_unique = 0;
for (int k = 0; k < CAND; ++k) {
  n_unique += cand_mask[k] != 0u;
}
for (int e = tid; e < CAND; e += NT) {
  if (cand_mask[e] != 0u) {
    int at = 0;
    for (int k = 0; k < CAND; ++k) {
      at += cand_mask[k] != 0u && cand[k] < cand[e];
    }
    unique_block[at] = cand[e];
    unique_mask[at] = cand_mask[e];
    if (PAGED) {
      unique_src[at] = cand_src[e];
    }
  }
}

// 4. This simdgroup's 8 query rows, times scale, into simdgroup matrices, QROWS rows a round.
simdgroup_float8x8 qf[QF];
MLX_MTL_PRAGMA_UNROLL
for (int round = 0; round < (8 * NSG + QROWS - 1) / QROWS; ++round) {
  threadgroup_barrier(mem_flags::mem_threadgroup);  // the stage is free (and the ids are ready)
  for (int e = tid; e < QROWS * D8; e += NT) {
    const int r = round * QROWS + e / D8;
    const int d = e % D8;
    const int qt = t0 + r / G;
    float v = 0.0f;
    if (r < ROWS && qt < L && d < D) {
      v = float(q[b * q_strides[0] + (h * G + r % G) * q_strides[1] + qt * q_strides[2] +
                  d * q_strides[3]]) * scale;
    }
    stage[(e / D8) * LDK + d] = v;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (int(sg) * 8 / QROWS == round) {
    MLX_MTL_PRAGMA_UNROLL
    for (int k = 0; k < QF; ++k) {
      simdgroup_load(qf[k], stage + (int(sg) * 8 - round * QROWS) * LDK + k * 8, LDK);
    }
  }
}

// This lane's row of the simdgroup's 8 and its quarter of a chunk's KC keys.
const int r8 = lane / 4;
const int quarter = lane % 4;
const int row = sg * 8 + r8;
const int t = t0 + row / G;
const bool row_ok = row < ROWS && t < L;
float m_ref = -INFINITY;  // the row's softmax reference max; on the row's four lanes
float l_sum = 0.0f;

simdgroup_float8x8 of[OF];
MLX_MTL_PRAGMA_UNROLL
for (int c = 0; c < OF; ++c) {
  of[c] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
}
threadgroup float* tile = tiles + sg * 8 * KC;
threadgroup float* square = squares + sg * 64;
threadgroup float* ks = stage;
threadgroup float* vs = stage + KC * LDK;
auto head_keys = keys + b * keys_strides[0] + h * keys_strides[1];
auto head_values = values + b * values_strides[0] + h * values_strides[1];

for (int u = 0; u < n_unique; ++u) {
  const int blk = unique_block[u];
  const int src = PAGED ? unique_src[u] : blk;
  const bool chose = row_ok && ((unique_mask[u] >> (row / G)) & 1u);
  for (int c0 = 0; c0 < BLOCK; c0 += KC) {
    const int key0 = blk * BLOCK + c0;  // the chunk's first position
    const int krow = src * BLOCK + c0;  // and its row in the buffers
    const int n = min(min(KC, BLOCK - c0), S - krow);
    if (n <= 0 || key0 > last_pos) {
      break;  // uniform: the rest of the block lies past the buffer or after every tile query
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous chunk is consumed
    if (KV_BITS) {
      const int64_t kat = b * k_scales_strides[0] + h * k_scales_strides[1] +
                          int64_t(krow) * k_scales_strides[2];
      const int64_t vat = b * v_scales_strides[0] + h * v_scales_strides[1] +
                          int64_t(krow) * v_scales_strides[2];
      msa_stage_compact_rows<KC, D, D8, LDK, NT, (KV_BITS ? KV_BITS : 8), KV_GROUP>(
          ks, head_keys + krow * keys_strides[2], keys_strides[2], keys_strides[3],
          k_scales + kat, k_biases + kat, k_scales_strides[2], k_scales_strides[3], n, tid);
      msa_stage_compact_rows<KC, DV, DV8, LDV, NT, (KV_BITS ? KV_BITS : 8), KV_GROUP>(
          vs, head_values + krow * values_strides[2], values_strides[2], values_strides[3],
          v_scales + vat, v_biases + vat, v_scales_strides[2], v_scales_strides[3], n, tid);
    } else {
      msa_stage_rows<KC, D, D8, LDK, NT>(
          ks, head_keys + krow * keys_strides[2], keys_strides[2], keys_strides[3], n, tid);
      msa_stage_rows<KC, DV, DV8, LDV, NT>(
          vs, head_values + krow * values_strides[2], values_strides[2], values_strides[3], n,
          tid);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // Scores S = Q K^T for the chunk: 8 rows x KC keys.
    simdgroup_float8x8 sf[KC / 8];
    MLX_MTL_PRAGMA_UNROLL
    for (int kt = 0; kt < KC / 8; ++kt) {
      sf[kt] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
    MLX_MTL_PRAGMA_UNROLL
    for (int k = 0; k < QF; ++k) {
      MLX_MTL_PRAGMA_UNROLL
      for (int kt = 0; kt < KC / 8; ++kt) {
        simdgroup_float8x8 kf;
        simdgroup_load(kf, ks + kt * 8 * LDK + k * 8, LDK, 0, true);
        simdgroup_multiply_accumulate(sf[kt], qf[k], kf, sf[kt]);
      }
    }
    MLX_MTL_PRAGMA_UNROLL
    for (int kt = 0; kt < KC / 8; ++kt) {
      simdgroup_store(sf[kt], tile + kt * 8, KC);
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);

    // Masks and the online softmax, four lanes a row, KC / 4 keys a lane.
    float s[KC / 4];
    float chunk_max = -INFINITY;
    MLX_MTL_PRAGMA_UNROLL
    for (int i = 0; i < KC / 4; ++i) {
      const int key = quarter * (KC / 4) + i;
      const bool keep = chose && key < n && key0 + key <= offset + t;
      s[i] = keep ? tile[r8 * KC + key] : -INFINITY;
      chunk_max = max(chunk_max, s[i]);
    }
    chunk_max = max(chunk_max, simd_shuffle_xor(chunk_max, ushort(1)));
    chunk_max = max(chunk_max, simd_shuffle_xor(chunk_max, ushort(2)));
    const bool grow = chunk_max > m_ref + RESCALE || (m_ref == -INFINITY && chunk_max > m_ref);
    const float m_new = grow ? chunk_max : m_ref;
    const float alpha = grow ? exp(m_ref - m_new) : 1.0f;  // 0 when m_ref was -INFINITY
    float p_sum = 0.0f;
    MLX_MTL_PRAGMA_UNROLL
    for (int i = 0; i < KC / 4; ++i) {
      const float p = s[i] == -INFINITY ? 0.0f : exp(s[i] - m_new);
      tile[r8 * KC + quarter * (KC / 4) + i] = p;
      p_sum += p;
    }
    p_sum += simd_shuffle_xor(p_sum, ushort(1));
    p_sum += simd_shuffle_xor(p_sum, ushort(2));
    l_sum = l_sum * alpha + p_sum;
    m_ref = m_new;
    if (simd_any(grow)) {  // rescale the rows' outputs: O = diag(alpha) O
      MLX_MTL_PRAGMA_UNROLL
      for (int i = 0; i < 2; ++i) {
        const int col = quarter * 2 + i;
        square[r8 * 8 + col] = col == r8 ? alpha : 0.0f;
      }
      simdgroup_barrier(mem_flags::mem_threadgroup);
      simdgroup_float8x8 diag;
      simdgroup_load(diag, square, 8);
      MLX_MTL_PRAGMA_UNROLL
      for (int c = 0; c < OF; ++c) {
        simdgroup_multiply(of[c], diag, of[c]);
      }
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);

    // O += P V for the chunk.
    MLX_MTL_PRAGMA_UNROLL
    for (int kt = 0; kt < KC / 8; ++kt) {
      simdgroup_float8x8 pf;
      simdgroup_load(pf, tile + kt * 8, KC);
      MLX_MTL_PRAGMA_UNROLL
      for (int c = 0; c < OF; ++c) {
        simdgroup_float8x8 vf;
        simdgroup_load(vf, vs + kt * 8 * LDV + c * 8, LDV);
        simdgroup_multiply_accumulate(of[c], pf, vf, of[c]);
      }
    }
  }
}

// 5. out = O / l, an 8 x 8 matrix at a time through the simdgroup's scratch square; lane
// writes elements 2 lane and 2 lane + 1 of it, i.e. row lane / 4 = r8: its own row's l.
const int g = row % G;
auto orow = out + ((int64_t(b) * H * G + h * G + g) * L + t) * DV;
MLX_MTL_PRAGMA_UNROLL
for (int c = 0; c < OF; ++c) {
  simdgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_store(of[c], square, 8);
  simdgroup_barrier(mem_flags::mem_threadgroup);
  MLX_MTL_PRAGMA_UNROLL
  for (int i = 0; i < 2; ++i) {
    const int col = c * 8 + quarter * 2 + i;
    if (row_ok && col < DV) {
      orow[col] = static_cast<T>(square[r8 * 8 + quarter * 2 + i] / l_sum);
    }
  }
}
