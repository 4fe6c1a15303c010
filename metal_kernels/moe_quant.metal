// Helpers shared by the MoE kernels (moe_decode_gate_up.metal, moe_decode_down.metal); passed
// to mx.fast.metal_kernel as `header`.
//
// Weight formats, exactly as mx.quantize packs them (rows of `in` elements along the last axis):
//   MODE 0, affine: BITS-bit unsigned codes q (BITS in 1, 2, 3, 4, 5, 6, 8) as one LSB-first bit
//     stream over the row's uint32 words (a 3-, 5- or 6-bit code may straddle two words); one
//     scale s and bias b per GS consecutive elements, in the model's float dtype; w = s * q + b.
//   MODE 1, mxfp4 (BITS 4) / mxfp8 (BITS 8): E2M1 / E4M3 codes packed the same way; one uint8
//     E8M0 scale 2^(e - 127) per GS = 32 elements; w = fp(q) * scale.
//   MODE 2, nvfp4 (BITS 4): E2M1 codes; one uint8 E4M3 scale per GS = 16 elements.
//
// A lane takes moe_chunk(BITS) consecutive inputs of a row per step: 16, or 32 for 1-, 3- and
// 5-bit codes, so that its codes start and end on a word boundary and every bit position below
// is a compile-time constant. A chunk never crosses a scale group (GS >= the chunk).
// Pointer arguments are template types: MLX passes an input with fewer than 8 elements in the
// `constant` address space and a larger one in `device`.

constexpr constant int MOE_AFFINE = 0;
constexpr constant int MOE_MX = 1;
constexpr constant int MOE_NV = 2;

constexpr int moe_chunk(int bits) {
  return (16 * bits) % 32 == 0 ? 16 : 32;
}

// E8M0: 2^(s - 127). s == 0 is the subnormal 2^-127; s == 255 is +inf, as MLX decodes it.
inline float moe_e8m0(uint s) {
  return as_type<float>(s == 0u ? 0x00400000u : s << 23);
}

// E2M1 (sign, 2 exponent bits with bias 1, 1 mantissa bit): 0, 0.5, 1, 1.5, 2, 3, 4, 6.
// The 3 magnitude bits shifted into a float's exponent/mantissa fields, rebased, give the
// normal values directly; the exponent-0 codes are the subnormals 0 and 0.5.
inline float moe_e2m1(uint q) {
  const uint em = q & 7u;
  const float v = em < 2u ? 0.5f * float(em) : as_type<float>((em << 22) + (126u << 23));
  return (q & 8u) ? -v : v;
}

// E4M3 (sign, 4 exponent bits with bias 7, 3 mantissa bits; 0x7f/0xff are NaN, no inf).
inline float moe_e4m3(uint q) {
  const uint em = q & 0x7fu;
  float v = em < 8u ? float(em) * 0.001953125f  // subnormal: m * 2^-9
                    : as_type<float>((em << 20) + (120u << 23));
  v = em == 0x7fu ? as_type<float>(0x7fc00000u) : v;
  return (q & 0x80u) ? -v : v;
}

// Code -> value tables for the float formats, in threadgroup memory (a lane's codes are
// arbitrary, so a table read replaces the arithmetic decode; the E2M1 table fits 16 banks).
// Every thread of the threadgroup calls this, then a threadgroup_barrier, before any returns.
inline void moe_fill_tables(
    threadgroup float* e2m1, threadgroup float* e4m3, uint tid, uint n_threads) {
  for (uint i = tid; i < 256u; i += n_threads) {
    e4m3[i] = moe_e4m3(i);
    if (i < 16u) {
      e2m1[i] = moe_e2m1(i);
    }
  }
}

// The WORDS = CHUNK * BITS / 32 words holding codes [k, k + CHUNK) of row `row` of a stacked
// [rows, in_dims] quantized matrix (k a multiple of CHUNK).
template <int BITS, typename WPtr>
inline void moe_load_words(WPtr w, size_t row, int in_dims, int k, thread uint* words) {
  const size_t w0 = row * size_t(in_dims * BITS / 32) + size_t(k * BITS / 32);
  MLX_MTL_PRAGMA_UNROLL
  for (int j = 0; j < moe_chunk(BITS) * BITS / 32; ++j) {
    words[j] = w[w0 + j];
  }
}

// Code i of the chunk in `words`; i is a compile-time constant once the caller's loop unrolls.
template <int BITS>
inline uint moe_code(thread const uint* words, int i) {
  constexpr int WORDS = moe_chunk(BITS) * BITS / 32;
  const int word = i * BITS / 32;
  const int shift = i * BITS % 32;
  uint q = words[word] >> shift;
  if (shift + BITS > 32) {  // the code straddles two words
    q |= words[min(word + 1, WORDS - 1)] << (32 - shift);
  }
  return q & ((1u << BITS) - 1u);
}

// A code's value: the integer itself (affine) or its E2M1 / E4M3 value from `table`.
template <int MODE>
inline float moe_code_value(uint q, threadgroup const float* table) {
  return MODE == MOE_AFFINE ? float(q) : table[q];
}

// The group's scale as a float: affine scales are floats already; E8M0 or E4M3 bytes decode.
template <int MODE>
inline float moe_scale(float raw) {
  return MODE == MOE_AFFINE ? raw : MODE == MOE_MX ? moe_e8m0(uint(raw)) : moe_e4m3(uint(raw));
}

// dot(w[row, k : k + CHUNK], v) for a stacked [rows, in_dims] quantized matrix, with v this
// lane's CHUNK inputs in registers and v_sum their sum (affine: the bias term is bias * v_sum).
// k is a multiple of CHUNK. `biases` is read only in affine mode, `table` (the code values)
// only in the float modes.
template <int MODE, int BITS, int GS, typename WPtr, typename SPtr, typename BPtr>
inline float moe_row_dot(
    WPtr w, SPtr scales, BPtr biases, threadgroup const float* table, size_t row,
    int in_dims, int k, thread const float* v, float v_sum) {
  constexpr int CHUNK = moe_chunk(BITS);
  uint words[CHUNK * BITS / 32];
  moe_load_words<BITS>(w, row, in_dims, k, words);
  float dot = 0.0f;
  MLX_MTL_PRAGMA_UNROLL
  for (int i = 0; i < CHUNK; ++i) {
    dot += moe_code_value<MODE>(moe_code<BITS>(words, i), table) * v[i];
  }
  const size_t g = row * size_t(in_dims / GS) + k / GS;
  const float scale = moe_scale<MODE>(float(scales[g]));
  return MODE == MOE_AFFINE ? scale * dot + float(biases[g]) * v_sum : dot * scale;
}

// Loads this lane's CHUNK inputs v[k : k + CHUNK] as float; returns their sum.
template <int CHUNK, typename VPtr>
inline float moe_load_chunk(VPtr src, thread float* v) {
  float sum = 0.0f;
  MLX_MTL_PRAGMA_UNROLL
  for (int i = 0; i < CHUNK; ++i) {
    v[i] = float(src[i]);
    sum += v[i];
  }
  return sum;
}

// The tokens whose combined routing weight for expert e is non-zero, as a bit mask, and for
// each such token the weight (summed over its slots holding e) and its first slot holding e.
// Slots hold expert ids [T, K] and weights [T, K], row-major.
template <int MAXT, typename IdPtr, typename WeightPtr>
inline uint moe_expert_tokens(
    IdPtr ids, WeightPtr rw, int T, int K, int e, thread float* weight, thread int* first) {
  uint mask = 0u;
  MLX_MTL_PRAGMA_UNROLL
  for (int t = 0; t < MAXT; ++t) {
    weight[t] = 0.0f;
    first[t] = -1;
    for (int i = 0; t < T && i < K; ++i) {
      if (int(ids[t * K + i]) == e) {
        weight[t] += float(rw[t * K + i]);
        first[t] = first[t] < 0 ? i : first[t];
      }
    }
    mask |= (first[t] >= 0 && weight[t] != 0.0f) ? (1u << t) : 0u;
  }
  return mask;
}

// Whether flat slot j is the first slot (over all tokens) naming its expert, and that expert
// is a valid id in [0, E). Only first slots do an expert's work, so repeated ids across tokens
// read the expert's weights once.
template <typename IdPtr>
inline bool moe_first_slot(IdPtr ids, int j, int E) {
  const int e = int(ids[j]);
  if (e < 0 || e >= E) {
    return false;
  }
  for (int i = 0; i < j; ++i) {
    if (int(ids[i]) == e) {
      return false;
    }
  }
  return true;
}

// The row of the stacked weights that holds expert e: with a slot table (USE_SLOTS: only some
// experts are resident, in a pool of `rows` slots) its slot, else e itself; -1 when that row is
// outside [0, rows) (an expert without a slot contributes nothing and reads nothing).
template <bool USE_SLOTS, typename SlotPtr>
inline int moe_expert_row(SlotPtr slots, int e, int rows) {
  const int r = USE_SLOTS ? int(slots[e]) : e;
  return (r >= 0 && r < rows) ? r : -1;
}

// SwiGLU-OAI: min(gate, limit) and clip(up, -limit, limit), NaN kept (metal::min drops it).
inline float moe_swiglu_oai(float gate, float up, float alpha, float limit) {
  const float g = gate > limit ? limit : gate;
  const float u = up > limit ? limit : (up < -limit ? -limit : up);
  return (u + 1.0f) * g * (1.0f / (1.0f + exp(-alpha * g)));
}
