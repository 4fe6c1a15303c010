// Helpers shared by the MSA kernels; passed to mx.fast.metal_kernel as `header`.

// Max that keeps NaN: the result is NaN when either operand is (metal::max drops NaN).
inline float msa_nan_max(float a, float b) {
  return (isnan(a) || a > b) ? a : b;
}

// msa_nan_max over the 32 lanes of a simdgroup; every lane gets the result.
inline float msa_simd_nan_max(float v) {
  for (ushort m = 16; m > 0; m >>= 1) {
    v = msa_nan_max(v, simd_shuffle_xor(v, m));
  }
  return v;
}

// Block ranking for top-k: (s, i) ranks before (os, oi) on a higher score, then a lower id.
inline bool msa_ranks_before(float s, int i, float os, int oi) {
  return s > os || (s == os && i < oi);
}

// Stage rows [0, n) of a strided [rows, COLS] matrix into tile[32][LD] as float (row r at
// tile + r * LD); rows n..31 are zero-filled. All NT threads of the threadgroup call this.
template <int COLS, int LD, int NT, typename T>
inline void msa_stage_rows(
    threadgroup float* tile,
    const device T* base,
    int64_t row_stride,
    int64_t col_stride,
    int n,
    uint tid) {
  for (int e = tid; e < 32 * COLS; e += NT) {
    const int r = e / COLS;
    const int c = e % COLS;
    tile[r * LD + c] = r < n ? float(base[r * row_stride + c * col_stride]) : 0.0f;
  }
}

// One step of an online softmax over a 32-key chunk, for one row whose keys sit on the lanes.
// s is this lane's scaled score (-INFINITY when masked). Updates the running max m and sum l
// (uniform across the simdgroup); returns this lane's weight p and writes the factor that
// rescales the row's accumulated output to *alpha.
inline float msa_softmax_step(float s, thread float& m, thread float& l, thread float& alpha) {
  const float m_new = max(m, simd_max(s));
  if (m_new == -INFINITY) {  // nothing visible yet: keep the empty state
    alpha = 1.0f;
    return 0.0f;
  }
  alpha = exp(m - m_new);  // 0 when m was -INFINITY
  const float p = exp(s - m_new);  // 0 for masked keys
  l = l * alpha + simd_sum(p);
  m = m_new;
  return p;
}
