// MSA decode attention, merge phase: combines the P = TOPK * SPLIT partials written by
// msa_decode_attention into out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s, M = max_s m_s.
// Empty partials (-1 slots, parts after the query) have m = -INFINITY, l = 0 and drop out.
//
// Grid: (DV, G, B * H) threads, threadgroup (32, 1, 1): one thread per output element.
// Inputs: o_part [B, H, P, G, DV], ml_part [B, H, P, G, 2] float32 contiguous.
// Output: out [B, H*G, 1, DV] in T. Templates: T, G, DV.

const int col = thread_position_in_grid.x;
const int g = thread_position_in_grid.y;
const int bh = thread_position_in_grid.z;
const int n_slots = ml_part_shape[2];

float peak = -INFINITY;
for (int s = 0; s < n_slots; ++s) {
  peak = max(peak, ml_part[((int64_t(bh) * n_slots + s) * G + g) * 2]);
}
float num = 0.0f;
float den = 0.0f;
for (int s = 0; s < n_slots; ++s) {
  const int64_t row = (int64_t(bh) * n_slots + s) * G + g;
  const float m = ml_part[row * 2];
  if (m == -INFINITY) {
    continue;
  }
  const float w = exp(m - peak);
  num += w * o_part[row * DV + col];
  den += w * ml_part[row * 2 + 1];
}
out[(int64_t(bh) * G + g) * DV + col] = static_cast<T>(num / den);
