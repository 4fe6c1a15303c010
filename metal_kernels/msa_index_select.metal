// MSA block selection from index block scores: for row (b, h, t), the query's own block
// own = (offset + t) / BLOCK plus the TOPK - 1 best history blocks 0..own-1 ranked by score
// descending, ties to the lower block id. Output row: picked history ids ascending, then the
// own block, then -1 padding (the MLX-ops twin's order exactly).
//
// Grid: (NT, L, B * H) threads, threadgroup (NT, 1, 1), NT = 32 * NSG: one threadgroup per row.
// One pass over the row: each thread keeps the best K1 = TOPK - 1 of its strided share in
// registers, sorted (an insertion is K1 unrolled compare-and-swap steps). Each simdgroup then
// merges its 32 lists in K1 rounds of a butterfly arg-max over the list heads (the winning lane
// pops its head), and the NSG simdgroup results meet once in threadgroup memory, where each
// candidate counts the candidates ranked before it: the K1 best are those with a count below
// K1, and each takes the output slot given by how many picked ids are smaller than its own.
// Two threadgroup barriers in all.
//
// Inputs: scores [B, H, L, n_cols] float32 contiguous (from msa_index_scores*; NaN already
// mapped to -1e30), offset. Output: selection [B, H, L, TOPK] int32.
// Templates: BLOCK, TOPK, NSG.

constexpr int NT = 32 * NSG;
constexpr int K1 = TOPK - 1;
constexpr int KL = K1 > 0 ? K1 : 1;  // list length (TOPK == 1 selects the own block only)
constexpr int CAND = NSG * KL;

const int t = threadgroup_position_in_grid.y;
const int row_id = threadgroup_position_in_grid.z;
const uint tid = thread_index_in_threadgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const int L = scores_shape[2];
const int n_cols = scores_shape[3];
const int own = (offset + t) / BLOCK;
const int n_history = min(own, n_cols);
const int want = min(K1, n_history);
auto row = scores + (int64_t(row_id) * L + t) * n_cols;

threadgroup float cand_score[CAND];
threadgroup int cand_id[CAND];
threadgroup int cand_picked[CAND];

// 1. This thread's best K1, best first; an empty entry is (-INFINITY, n_cols), ranked last.
float ls[KL];
int li[KL];
MLX_MTL_PRAGMA_UNROLL
for (int k = 0; k < KL; ++k) {
  ls[k] = -INFINITY;
  li[k] = n_cols;
}
for (int e = tid; e < n_history; e += NT) {
  float s = row[e];
  int i = e;
  if (K1 > 0 && msa_ranks_before(s, i, ls[KL - 1], li[KL - 1])) {
    MLX_MTL_PRAGMA_UNROLL
    for (int k = 0; k < K1; ++k) {  // insert: the entry that ranks lower moves on down
      const bool take = msa_ranks_before(s, i, ls[k], li[k]);
      const float ps = ls[k];
      const int pi = li[k];
      ls[k] = take ? s : ps;
      li[k] = take ? i : pi;
      s = take ? ps : s;
      i = take ? pi : i;
    }
  }
}

// 2. The simdgroup's best `want`, in rank order, into candidates [sg * K1, sg * K1 + want).
for (int r = 0; r < want; ++r) {
  float bs = ls[0];
  int bi = li[0];
  for (ushort m = 16; m > 0; m >>= 1) {
    const float os = simd_shuffle_xor(bs, m);
    const int oi = simd_shuffle_xor(bi, m);
    if (msa_ranks_before(os, oi, bs, bi)) {
      bs = os;
      bi = oi;
    }
  }
  if (li[0] == bi) {  // this lane's head won: pop it (ids are unique across lanes)
    MLX_MTL_PRAGMA_UNROLL
    for (int k = 0; k + 1 < KL; ++k) {
      ls[k] = ls[k + 1];
      li[k] = li[k + 1];
    }
    ls[KL - 1] = -INFINITY;
    li[KL - 1] = n_cols;
  }
  if (lane == 0) {
    cand_score[sg * K1 + r] = bs;
    cand_id[sg * K1 + r] = bi;
  }
}
for (int r = want + lane; r < K1; r += 32) {
  cand_score[sg * K1 + r] = -INFINITY;
  cand_id[sg * K1 + r] = n_cols;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 3. The threadgroup's best `want` among the NSG * K1 candidates, then their output slots.
for (int e = tid; e < NSG * K1; e += NT) {
  int rank = 0;
  for (int k = 0; k < NSG * K1; ++k) {
    rank += msa_ranks_before(cand_score[k], cand_id[k], cand_score[e], cand_id[e]);
  }
  cand_picked[e] = rank < want;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
auto out = selection + (int64_t(row_id) * L + t) * TOPK;
for (int e = tid; e < NSG * K1; e += NT) {
  if (cand_picked[e]) {
    int slot = 0;
    for (int k = 0; k < NSG * K1; ++k) {
      slot += cand_picked[k] && cand_id[k] < cand_id[e];
    }
    out[slot] = cand_id[e];
  }
}
for (int slot = want + tid; slot < TOPK; slot += NT) {
  out[slot] = slot == want ? own : -1;
}
