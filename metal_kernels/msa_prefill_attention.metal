// MSA prefill attention: a tile of TQ consecutive queries (all G query heads of KV head h)
// against the union of the blocks those queries selected. Each query attends only to its own
// selection; keys after the query's position (the causal cut inside its own block) and past
// the buffer are masked; -1 slots and repeated ids across the tile are skipped.
//
// Grid: (NT, ceil(L / TQ), B * H) threads, threadgroup (NT, 1, 1), NT = 32 * NSG.
// The tile's TQ * TOPK ids are deduplicated in threadgroup memory, each unique block carrying a
// bit mask of the tile queries that chose it, so a block chosen by several queries of the tile
// is loaded once. Blocks are walked in 32-key chunks staged in threadgroup memory (keys, then
// values in the same tile); the TQ * G (query, head) rows are dealt to simdgroups (ROWS each),
// with an online softmax per row: a lane owns a key for scores and output columns for P.V.
//
// Inputs: q [B, H*G, L, D], keys [B, H, S, D], values [B, H, S, DV], selection
// [B, H, L, TOPK] int32, offset, scale. Any strides. Output: out [B, H*G, L, DV] in T.
// Templates: T, G, D, DV, BLOCK, TOPK, TQ (<= 32), NSG.

constexpr int NT = 32 * NSG;
constexpr int TILE_ROWS = TQ * G;
constexpr int ROWS = (TILE_ROWS + NSG - 1) / NSG;
constexpr int DVL = (DV + 31) / 32;
constexpr int LD = D + 1 > DV ? D + 1 : DV;
constexpr int CAND = TQ * TOPK;

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

threadgroup float tile[32 * LD];
threadgroup float weights[NSG][ROWS][32];
threadgroup int cand[CAND];
threadgroup uint cand_mask[CAND];
threadgroup int unique_block[CAND];
threadgroup uint unique_mask[CAND];

// 1. The tile's selected ids; queries past L select nothing.
for (int e = tid; e < CAND; e += NT) {
  const int t = t0 + e / TOPK;
  cand[e] = t < L ? selection[b * selection_strides[0] + h * selection_strides[1] +
                              t * selection_strides[2] + (e % TOPK) * selection_strides[3]]
                  : -1;
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

// 3. Compact the leaders into the unique-block list.
int n_unique = 0;
for (int k = 0; k < CAND; ++k) {
  n_unique += cand_mask[k] != 0u;
}
for (int e = tid; e < CAND; e += NT) {
  if (cand_mask[e] != 0u) {
    int at = 0;
    for (int k = 0; k < e; ++k) {
      at += cand_mask[k] != 0u;
    }
    unique_block[at] = cand[e];
    unique_mask[at] = cand_mask[e];
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

float m[ROWS];
float l[ROWS];
float o[ROWS][DVL];
for (int i = 0; i < ROWS; ++i) {
  m[i] = -INFINITY;
  l[i] = 0.0f;
  for (int c = 0; c < DVL; ++c) {
    o[i][c] = 0.0f;
  }
}

auto head_keys = keys + b * keys_strides[0] + h * keys_strides[1];
auto head_values = values + b * values_strides[0] + h * values_strides[1];

for (int u = 0; u < n_unique; ++u) {
  const int blk = unique_block[u];
  const uint chosen_by = unique_mask[u];
  for (int c0 = 0; c0 < BLOCK; c0 += 32) {
    const int key0 = blk * BLOCK + c0;
    const int n = min(min(32, BLOCK - c0), S - key0);
    if (n <= 0 || key0 > last_pos) {
      break;  // the rest of the block lies past the buffer or after every tile query
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    msa_stage_rows<D, LD, NT>(
        tile, head_keys + key0 * keys_strides[2], keys_strides[2], keys_strides[3], n, tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int i = 0; i < ROWS; ++i) {
      const int r = sg + i * NSG;
      const int t = t0 + r / G;
      if (r >= TILE_ROWS || t >= L) {
        continue;  // uniform across the simdgroup
      }
      const int g = r % G;
      const bool chose = (chosen_by >> (r / G)) & 1u;
      float s = -INFINITY;
      if (chose && lane < uint(n) && key0 + int(lane) <= offset + t) {
        auto qrow = q + b * q_strides[0] + (h * G + g) * q_strides[1] + t * q_strides[2];
        float dot = 0.0f;
        for (int d = 0; d < D; ++d) {
          dot += float(qrow[d * q_strides[3]]) * tile[lane * LD + d];
        }
        s = dot * scale;
      }
      float alpha;
      weights[sg][i][lane] = msa_softmax_step(s, m[i], l[i], alpha);
      for (int c = 0; c < DVL; ++c) {
        o[i][c] *= alpha;
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    msa_stage_rows<DV, LD, NT>(
        tile, head_values + key0 * values_strides[2], values_strides[2], values_strides[3], n,
        tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int i = 0; i < ROWS; ++i) {
      const int r = sg + i * NSG;
      if (r >= TILE_ROWS || t0 + r / G >= L) {
        continue;
      }
      for (int k = 0; k < n; ++k) {
        const float w = weights[sg][i][k];
        for (int c = 0; c < DVL; ++c) {
          const int col = lane + 32 * c;
          if (col < DV) {
            o[i][c] += w * tile[k * LD + col];
          }
        }
      }
    }
  }
}

for (int i = 0; i < ROWS; ++i) {
  const int r = sg + i * NSG;
  const int t = t0 + r / G;
  if (r >= TILE_ROWS || t >= L) {
    continue;
  }
  const int g = r % G;
  auto orow = out + ((int64_t(b) * H * G + h * G + g) * L + t) * DV;
  for (int c = 0; c < DVL; ++c) {
    const int col = lane + 32 * c;
    if (col < DV) {
      orow[col] = static_cast<T>(o[i][c] / l[i]);
    }
  }
}
