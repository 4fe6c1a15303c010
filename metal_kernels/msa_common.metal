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

// Compact K/V rows (KV_BITS 8 or 4), as mx.quantize packs a row along its last axis: its codes
// are an LSB-first stream over uint32 words (32 / BITS codes a word, none straddling two), with
// one scale s and bias b per GROUP consecutive values: x = s * q + b.
// Stage rows [0, n) of a compact [rows, COLS] matrix (words, scales, biases: any strides) into a
// [ROWS][LD] float tile like msa_stage_rows, columns [0, WIDTH) (COLS..WIDTH-1 and rows n..ROWS-1
// zero-filled): a thread decodes one word (32 / BITS values) at a time. COLS and WIDTH are
// multiples of 32 / BITS, GROUP of 32 / BITS. All NT threads of the threadgroup call this.
// (Words are read through uint(): a float K/V instantiation compiles this without calling it.)
template <int ROWS, int COLS, int WIDTH, int LD, int NT, int BITS, int GROUP, typename WPtr,
          typename SPtr>
inline void msa_stage_compact_rows(
    threadgroup float* tile,
    WPtr words,
    int64_t word_row_stride,
    int64_t word_col_stride,
    SPtr scales,
    SPtr biases,
    int64_t scale_row_stride,
    int64_t scale_col_stride,
    int n,
    uint tid) {
  constexpr int PER = 32 / BITS;
  constexpr uint MASK = (1u << BITS) - 1u;
  constexpr int ROW_WORDS = WIDTH / PER;
  for (int e = tid; e < ROWS * ROW_WORDS; e += NT) {
    const int r = e / ROW_WORDS;
    const int c0 = (e % ROW_WORDS) * PER;
    threadgroup float* out = tile + r * LD + c0;
    if (r < n && c0 < COLS) {
      const uint word = uint(words[r * word_row_stride + (c0 / PER) * word_col_stride]);
      const int64_t g = r * scale_row_stride + (c0 / GROUP) * scale_col_stride;
      const float s = float(scales[g]);
      const float b = float(biases[g]);
      MLX_MTL_PRAGMA_UNROLL
      for (int i = 0; i < PER; ++i) {
        out[i] = s * float((word >> (i * BITS)) & MASK) + b;
      }
    } else {
      MLX_MTL_PRAGMA_UNROLL
      for (int i = 0; i < PER; ++i) {
        out[i] = 0.0f;
      }
    }
  }
}
