// MSA block selection from index block scores: for row (b, h, t), the query's own block
// own = (offset + t) / BLOCK plus the TOPK - 1 best history blocks 0..own-1 ranked by score
// descending, ties to the lower block id. Output row: picked history ids ascending, then the
// own block, then -1 padding (the MLX-ops twin's order exactly).
//
// Grid: (NT, L, B * H) threads, threadgroup (NT, 1, 1), NT = 32 * NSG: one threadgroup per
// row. Selection is TOPK - 1 rounds of a threadgroup arg-max over the blocks ranked below the
// previous pick (so nothing needs marking): each thread scans its strided share of the row,
// a butterfly reduces each simdgroup, and the simdgroup winners meet in threadgroup memory.
//
// Inputs: scores [B, H, L, n_cols] float32 contiguous (from msa_index_scores; NaN already
// mapped to -1e30), offset. Output: selection [B, H, L, TOPK] int32.
// Templates: BLOCK, TOPK, NSG.

constexpr int NT = 32 * NSG;

const int t = threadgroup_position_in_grid.y;
const int row_id = threadgroup_position_in_grid.z;
const uint tid = thread_index_in_threadgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const int L = scores_shape[2];
const int n_cols = scores_shape[3];
const int own = (offset + t) / BLOCK;
const int n_history = min(own, n_cols);
const int want = min(TOPK - 1, n_history);
auto row = scores + (int64_t(row_id) * L + t) * n_cols;

threadgroup float winner_score[NSG];
threadgroup int winner_id[NSG];
threadgroup int picked[TOPK];

float prev_score = INFINITY;
int prev_id = -1;
for (int r = 0; r < want; ++r) {
  float best_score = -INFINITY;
  int best_id = n_cols;  // "none": ranks after every real block
  for (int e = tid; e < n_history; e += NT) {
    const float s = row[e];
    if (msa_ranks_before(prev_score, prev_id, s, e) &&
        msa_ranks_before(s, e, best_score, best_id)) {
      best_score = s;
      best_id = e;
    }
  }
  for (ushort m = 16; m > 0; m >>= 1) {
    const float os = simd_shuffle_xor(best_score, m);
    const int oi = simd_shuffle_xor(best_id, m);
    if (msa_ranks_before(os, oi, best_score, best_id)) {
      best_score = os;
      best_id = oi;
    }
  }
  if (lane == 0) {
    winner_score[sg] = best_score;
    winner_id[sg] = best_id;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int k = 0; k < NSG; ++k) {
    if (msa_ranks_before(winner_score[k], winner_id[k], best_score, best_id)) {
      best_score = winner_score[k];
      best_id = winner_id[k];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);  // winners are read before the next round
  prev_score = best_score;
  prev_id = best_id;
  if (tid == 0) {
    picked[r] = best_id;
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

auto out = selection + (int64_t(row_id) * L + t) * TOPK;
for (int slot = tid; slot < TOPK; slot += NT) {
  if (slot < want) {
    // Place this pick at its rank among the picks: ids come out ascending.
    const int id = picked[slot];
    int rank = 0;
    for (int k = 0; k < want; ++k) {
      rank += picked[k] < id;
    }
    out[rank] = id;
  } else {
    out[slot] = slot == want ? own : -1;
  }
}
