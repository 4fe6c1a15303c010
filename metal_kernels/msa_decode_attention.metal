// MSA decode attention, split phase: one query position (offset) per (b, KV head h); each
// threadgroup attends all G query heads of the group to ONE selected key block and writes an
// unnormalised partial (o, running max m, running sum l); msa_decode_merge combines the
// TOPK partials of a row (flash-decoding).
//
// Grid: (NT, TOPK, B * H) threads, threadgroup (NT, 1, 1), NT = 32 * NSG: threadgroup =
// (slot, b, h). The block is walked in 32-key chunks staged in threadgroup memory (keys, then
// values in the same tile); query heads are dealt to simdgroups (ROWS each); for scores a lane
// owns a key, for P.V a lane owns output columns. Keys after the query position (the causal
// cut inside the own block) and past the buffer are masked; a -1 slot contributes nothing.
//
// Inputs: q [B, H*G, 1, D], keys [B, H, S, D], values [B, H, S, DV], selection [B, H, 1, TOPK]
// int32, offset, scale. Any strides. Outputs: o_part [B, H, TOPK, G, DV] and
// ml_part [B, H, TOPK, G, 2] (m, l), float32.
// Templates: G, D, DV, BLOCK, NSG.

constexpr int NT = 32 * NSG;
constexpr int ROWS = (G + NSG - 1) / NSG;
constexpr int DVL = (DV + 31) / 32;
constexpr int LD = D + 1 > DV ? D + 1 : DV;

const int slot = threadgroup_position_in_grid.y;
const int bh = threadgroup_position_in_grid.z;
const uint tid = thread_index_in_threadgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const int H = keys_shape[1];
const int S = keys_shape[2];
const int n_slots = selection_shape[3];
const int b = bh / H;
const int h = bh % H;

threadgroup float tile[32 * LD];
threadgroup float weights[NSG][ROWS][32];

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

const int blk = selection[b * selection_strides[0] + h * selection_strides[1] +
                          slot * selection_strides[3]];
auto head_keys = keys + b * keys_strides[0] + h * keys_strides[1];
auto head_values = values + b * values_strides[0] + h * values_strides[1];

for (int c0 = 0; blk >= 0 && c0 < BLOCK; c0 += 32) {
  const int key0 = blk * BLOCK + c0;
  const int n = min(min(32, BLOCK - c0), min(offset + 1, S) - key0);
  if (n <= 0) {
    break;  // the rest of the block lies after the query
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  msa_stage_rows<D, LD, NT>(
      tile, head_keys + key0 * keys_strides[2], keys_strides[2], keys_strides[3], n, tid);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int i = 0; i < ROWS; ++i) {
    const int g = sg + i * NSG;
    if (g >= G) {
      continue;  // uniform across the simdgroup
    }
    auto qrow = q + b * q_strides[0] + (h * G + g) * q_strides[1];
    float s = -INFINITY;
    if (lane < uint(n)) {
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
    if (int(sg) + i * NSG >= G) {
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

for (int i = 0; i < ROWS; ++i) {
  const int g = sg + i * NSG;
  if (g >= G) {
    continue;
  }
  const int64_t row = (int64_t(bh) * n_slots + slot) * G + g;
  for (int c = 0; c < DVL; ++c) {
    const int col = lane + 32 * c;
    if (col < DV) {
      o_part[row * DV + col] = o[i][c];
    }
  }
  if (lane == 0) {
    ml_part[row * 2] = m[i];
    ml_part[row * 2 + 1] = l[i];
  }
}
