// Helpers shared by the MoE decode kernels (moe_decode_gate_up.metal, moe_decode_down.metal);
// passed to mx.fast.metal_kernel as `header`.
//
// Weight formats, exactly as mx.quantize packs them (rows of `in` elements along the last axis):
//   MODE 0, affine: BITS-bit unsigned codes q packed LSB-first into uint32 words (32 / BITS per
//     word); one scale s and bias b per GS consecutive elements, in the model's float dtype;
//     w = s * q + b.
//   MODE 1, microscaling (mxfp4 when BITS == 4, mxfp8 when BITS == 8): E2M1 or E4M3 codes packed
//     the same way; one uint8 E8M0 scale 2^(e - 127) per GS == 32 elements; w = fp(q) * scale.
//
// Pointer arguments are template types so that one helper serves device and constant buffers
// (MLX puts inputs with fewer than 8 elements in the constant address space).

constexpr constant int MOE_AFFINE = 0;
constexpr constant int MOE_MX = 1;
constexpr constant int MOE_CHUNK = 16;  // weights a lane decodes per step (one scale group)
constexpr constant int MOE_STRIDE = 32 * MOE_CHUNK;  // elements a simdgroup covers per step

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

// Code -> value tables for the microscaling formats, in threadgroup memory (a lane's codes are
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

// The codes of weights [k, k + 16) of row `row` of a stacked [rows, in_dims] quantized matrix
// as floats c[i], and their group's scale and bias: w[k + i] = scale * c[i] + bias. Affine: c
// is the integer code; microscaling: the E2M1 / E4M3 value from `table`, bias 0. k is a
// multiple of 16 and GS of 16, so the 16 weights share one group. `biases` is read only in
// affine mode, `table` only in microscaling mode.
template <int MODE, int BITS, int GS, typename WPtr, typename SPtr, typename BPtr>
inline void moe_codes16(
    WPtr w, SPtr scales, BPtr biases, threadgroup const float* table, size_t row, int in_dims,
    int k, thread float* c, thread float& scale, thread float& bias) {
  constexpr int PER_WORD = 32 / BITS;
  constexpr uint MASK = (1u << BITS) - 1u;
  const size_t g = row * size_t(in_dims / GS) + k / GS;
  const float raw_scale = float(scales[g]);
  scale = MODE == MOE_AFFINE ? raw_scale : moe_e8m0(uint(raw_scale));
  bias = MODE == MOE_AFFINE ? float(biases[g]) : 0.0f;
  const size_t w0 = row * size_t(in_dims / PER_WORD) + k / PER_WORD;
  for (int j = 0; j < MOE_CHUNK / PER_WORD; ++j) {
    const uint word = w[w0 + j];
    for (int i = 0; i < PER_WORD; ++i) {
      const uint q = (word >> (i * BITS)) & MASK;
      c[j * PER_WORD + i] = MODE == MOE_AFFINE ? float(q) : table[q];
    }
  }
}

// Phase 1 for one simdgroup: row `row` of a gate and an up matrix (same format, [rows, D]),
// dotted with x[t] for every token t in `mask`. Each lane accumulates its share of the 2 * T
// dot products into g_acc[t], u_acc[t]; the caller sums over the simdgroup. Scales and biases
// apply once per 16 weights: dot(w, x) = scale * dot(c, x) + bias * sum(x).
template <int MODE, int BITS, int GS, int MAXT, typename XPtr, typename WPtr, typename SPtr,
          typename BPtr>
inline void moe_gate_up_dots(
    XPtr x, int D, uint mask, int lane, size_t row, threadgroup const float* table,
    WPtr gate_w, SPtr gate_s, BPtr gate_b, WPtr up_w, SPtr up_s, BPtr up_b,
    thread float* g_acc, thread float* u_acc) {
  for (int k = lane * MOE_CHUNK; k < D; k += MOE_STRIDE) {
    float cg[MOE_CHUNK];
    float cu[MOE_CHUNK];
    float sg, bg, su, bu;
    moe_codes16<MODE, BITS, GS>(gate_w, gate_s, gate_b, table, row, D, k, cg, sg, bg);
    moe_codes16<MODE, BITS, GS>(up_w, up_s, up_b, table, row, D, k, cu, su, bu);
    for (int t = 0; t < MAXT; ++t) {
      if (mask & (1u << t)) {
        const auto xt = x + size_t(t) * D + k;
        float dg = 0.0f;
        float du = 0.0f;
        float xs = 0.0f;
        for (int i = 0; i < MOE_CHUNK; ++i) {
          const float xv = float(xt[i]);
          dg += cg[i] * xv;
          du += cu[i] * xv;
          xs += MODE == MOE_AFFINE ? xv : 0.0f;
        }
        g_acc[t] += sg * dg + bg * xs;
        u_acc[t] += su * du + bu * xs;
      }
    }
  }
}

// Phase 2 for one simdgroup: ROWS consecutive rows from `row` of a down matrix ([rows, F]),
// dotted with token t's activations h_t[0, F) (at h + t * hw + col[t]) and scaled by its
// routing weight tw[t], for every token in `mask`; accumulated per lane into acc[t * ROWS + r].
template <int MODE, int BITS, int GS, int MAXT, int ROWS, typename WPtr, typename SPtr,
          typename BPtr>
inline void moe_down_dots(
    const device float* h, size_t hw, thread const int* col, thread const float* tw,
    int F, uint mask, int lane, size_t row, threadgroup const float* table,
    WPtr w, SPtr s, BPtr b, thread float* acc) {
  for (int k = lane * MOE_CHUNK; k < F; k += MOE_STRIDE) {
    float c[ROWS][MOE_CHUNK];
    float scale[ROWS];
    float bias[ROWS];
    for (int r = 0; r < ROWS; ++r) {
      moe_codes16<MODE, BITS, GS>(w, s, b, table, row + r, F, k, c[r], scale[r], bias[r]);
    }
    for (int t = 0; t < MAXT; ++t) {
      if (mask & (1u << t)) {
        const device float* ht = h + size_t(t) * hw + col[t] + k;
        float d[ROWS];
        for (int r = 0; r < ROWS; ++r) {
          d[r] = 0.0f;
        }
        float hs = 0.0f;
        for (int i = 0; i < MOE_CHUNK; ++i) {
          const float hv = ht[i];
          hs += MODE == MOE_AFFINE ? hv : 0.0f;
          for (int r = 0; r < ROWS; ++r) {
            d[r] += c[r][i] * hv;
          }
        }
        for (int r = 0; r < ROWS; ++r) {
          acc[t * ROWS + r] += tw[t] * (scale[r] * d[r] + bias[r] * hs);
        }
      }
    }
  }
}

// The tokens whose combined routing weight for expert e is non-zero, as a bit mask, and for
// each such token the weight (summed over its slots holding e) and its first slot holding e.
// Slots hold expert ids [T, K] and weights [T, K], row-major.
template <int MAXT, typename IdPtr, typename WeightPtr>
inline uint moe_expert_tokens(
    IdPtr ids, WeightPtr rw, int T, int K, int e, thread float* weight, thread int* first) {
  uint mask = 0u;
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

// SwiGLU-OAI: min(gate, limit) and clip(up, -limit, limit), NaN kept (metal::min drops it).
inline float moe_swiglu_oai(float gate, float up, float alpha, float limit) {
  const float g = gate > limit ? limit : gate;
  const float u = up > limit ? limit : (up < -limit ? -limit : up);
  return (u + 1.0f) * g * (1.0f / (1.0f + exp(-alpha * g)));
}
