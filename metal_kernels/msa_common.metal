// Helpers shared by the MSA kernels; passed to mx.fast.metal_kernel as `header`.
//
// Pointer parameters are template types: MLX passes an input with fewer than 8 elements in the
// `constant` address space and a larger one in `device`, so a helper must take either.

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

// Stage rows [0, n) of a strided [rows, COLS] matrix into a [ROWS][LD] float tile (row r at
// tile + r * LD), columns [0, WIDTH): rows n..ROWS-1 and columns COLS..WIDTH-1 are zero-filled
// (padding a simdgroup_matrix tile reads as 0). All NT threads of the threadgroup call this.
template <int ROWS, int COLS, int WIDTH, int LD, int NT, typename Ptr>
inline void msa_stage_rows(
    threadgroup float* tile,
    Ptr base,
    int64_t row_stride,
    int64_t col_stride,
    int n,
    uint tid) {
  for (int e = tid; e < ROWS * WIDTH; e += NT) {
    const int r = e / WIDTH;
    const int c = e % WIDTH;
    tile[r * LD + c] =
        r < n && c < COLS ? float(base[r * row_stride + c * col_stride]) : 0.0f;
  }
}
