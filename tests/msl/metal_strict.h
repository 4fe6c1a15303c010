// The Metal Shading Language surface the kernels may use, declared for the strict compile check
// (tests/msl/strict.py): clang, C++14, no standard library, the source exactly as MLX generates
// it. Nothing here runs; it exists so that clang rejects what Metal's compiler would reject:
//
// - `device`, `constant` and `threadgroup` are distinct address spaces (1, 2, 3, as in Metal's
//   AIR), so a `const device T*` parameter does not take a `constant` buffer, and a `threadgroup`
//   variable anywhere but the kernel's own scope (strict.py rewrites those into references) is
//   an automatic variable with an address space: an error.
// - Only the types Metal has: half, a bfloat distinct from half (`__fp16`: a native 16-bit float,
//   like Metal's), vectors as clang ext_vector types (swizzles work; the multi-argument
//   constructor `float4(a, b, c, d)` does not: use a brace list), no double.
// - simd functions only for the types Metal's take (float, half, (u)int, (u)short, (u)char and
//   their vectors; bool for the exchanges; integers for the bitwise reductions); no bfloat,
//   no 64-bit types.
// - simdgroup_matrix<T, 8, 8> for float, half and bfloat, with its load / store / multiply
//   functions (threadgroup and device pointers of the matrix's own element type) and no element
//   access; the scalar constructor makes a diagonal matrix.
// - MLX's prelude pieces a custom kernel may name: bfloat16_t, float16_t, METAL_FUNC,
//   MLX_MTL_PRAGMA_UNROLL, elem_to_loc.
// Declarations without definitions become external calls; the matrix functions pass their
// 2-element per-lane share by value, so thread arrays of matrices can live in registers.
#pragma once

typedef __INT8_TYPE__ int8_t;
typedef __INT16_TYPE__ int16_t;
typedef __INT32_TYPE__ int32_t;
typedef __INT64_TYPE__ int64_t;
typedef __UINT8_TYPE__ uint8_t;
typedef __UINT16_TYPE__ uint16_t;
typedef __UINT32_TYPE__ uint32_t;
typedef __UINT64_TYPE__ uint64_t;
typedef __SIZE_TYPE__ size_t;
typedef __PTRDIFF_TYPE__ ptrdiff_t;
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;
typedef _Float16 half;
typedef __fp16 bfloat;

#define MSL_VECTORS(T, name)                               \
  typedef T name##2 __attribute__((ext_vector_type(2))); \
  typedef T name##3 __attribute__((ext_vector_type(3))); \
  typedef T name##4 __attribute__((ext_vector_type(4)));
MSL_VECTORS(float, float)
MSL_VECTORS(half, half)
MSL_VECTORS(bfloat, bfloat)
MSL_VECTORS(int, int)
MSL_VECTORS(uint, uint)
MSL_VECTORS(short, short)
MSL_VECTORS(ushort, ushort)
MSL_VECTORS(char, char)
MSL_VECTORS(uchar, uchar)
MSL_VECTORS(long, long)
MSL_VECTORS(ulong, ulong)
#undef MSL_VECTORS

#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#define thread

#define INFINITY __builtin_inff()
#define NAN __builtin_nanf("")
#define HUGE_VALF __builtin_huge_valf()
#define FLT_MAX __FLT_MAX__
#define FLT_MIN __FLT_MIN__

// strict.py turns each kernel-scope `threadgroup T name[N];` into a reference to this.
threadgroup char* __msl_threadgroup_memory(int declaration, size_t bytes);

namespace metal {

template <bool B, typename T = int>
struct enable_if {};
template <typename T>
struct enable_if<true, T> {
  typedef T type;
};
template <typename A, typename B>
struct is_same {
  static constexpr bool value = false;
};
template <typename A>
struct is_same<A, A> {
  static constexpr bool value = true;
};

// ---- the types Metal's simd functions take ----
template <typename T> struct simd_arith { static constexpr bool value = false; };
template <typename T> struct simd_integer { static constexpr bool value = false; };
#define MSL_SIMD_TYPE(T, trait)                                              \
  template <> struct trait<T> { static constexpr bool value = true; };      \
  template <> struct trait<T##2> { static constexpr bool value = true; };   \
  template <> struct trait<T##3> { static constexpr bool value = true; };   \
  template <> struct trait<T##4> { static constexpr bool value = true; };
MSL_SIMD_TYPE(float, simd_arith)
MSL_SIMD_TYPE(half, simd_arith)
MSL_SIMD_TYPE(int, simd_arith)
MSL_SIMD_TYPE(uint, simd_arith)
MSL_SIMD_TYPE(short, simd_arith)
MSL_SIMD_TYPE(ushort, simd_arith)
MSL_SIMD_TYPE(char, simd_arith)
MSL_SIMD_TYPE(uchar, simd_arith)
MSL_SIMD_TYPE(int, simd_integer)
MSL_SIMD_TYPE(uint, simd_integer)
MSL_SIMD_TYPE(short, simd_integer)
MSL_SIMD_TYPE(ushort, simd_integer)
MSL_SIMD_TYPE(char, simd_integer)
MSL_SIMD_TYPE(uchar, simd_integer)
#undef MSL_SIMD_TYPE
template <> struct simd_arith<signed char> { static constexpr bool value = true; };
template <> struct simd_integer<signed char> { static constexpr bool value = true; };
template <typename T>
struct simd_exchange {
  static constexpr bool value = simd_arith<T>::value || is_same<T, bool>::value;
};

#define MSL_ARITH typename enable_if<simd_arith<T>::value>::type = 0
#define MSL_INTEGER typename enable_if<simd_integer<T>::value>::type = 0
#define MSL_EXCHANGE typename enable_if<simd_exchange<T>::value>::type = 0
template <typename T, MSL_ARITH> T simd_sum(T data);
template <typename T, MSL_ARITH> T simd_product(T data);
template <typename T, MSL_ARITH> T simd_max(T data);
template <typename T, MSL_ARITH> T simd_min(T data);
template <typename T, MSL_ARITH> T simd_prefix_inclusive_sum(T data);
template <typename T, MSL_ARITH> T simd_prefix_exclusive_sum(T data);
template <typename T, MSL_INTEGER> T simd_and(T data);
template <typename T, MSL_INTEGER> T simd_or(T data);
template <typename T, MSL_INTEGER> T simd_xor(T data);
template <typename T, MSL_EXCHANGE> T simd_shuffle(T data, ushort lane);
template <typename T, MSL_EXCHANGE> T simd_shuffle_xor(T data, ushort mask);
template <typename T, MSL_EXCHANGE> T simd_shuffle_up(T data, ushort delta);
template <typename T, MSL_EXCHANGE> T simd_shuffle_down(T data, ushort delta);
template <typename T, MSL_EXCHANGE> T simd_broadcast(T data, ushort lane);
template <typename T, MSL_EXCHANGE> T simd_broadcast_first(T data);
#undef MSL_ARITH
#undef MSL_INTEGER
#undef MSL_EXCHANGE
bool simd_any(bool expr);
bool simd_all(bool expr);

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
constexpr mem_flags operator|(mem_flags a, mem_flags b) {
  return static_cast<mem_flags>(static_cast<int>(a) | static_cast<int>(b));
}
void threadgroup_barrier(mem_flags flags);
void simdgroup_barrier(mem_flags flags);

// ---- math (float and half declared; min / max / clamp / abs / select for integers) ----
#define MSL_FLOAT_MATH(T)                                                            \
  T exp(T); T exp2(T); T log(T); T log2(T); T sqrt(T); T rsqrt(T); T fabs(T);        \
  T abs(T); T floor(T); T ceil(T); T round(T); T trunc(T); T sin(T); T cos(T);       \
  T tanh(T); T pow(T, T); T fma(T, T, T); T fmax(T, T); T fmin(T, T); T max(T, T);   \
  T min(T, T); T clamp(T, T, T); T select(T, T, bool); bool isnan(T); bool isinf(T); \
  bool isfinite(T); bool signbit(T);
MSL_FLOAT_MATH(float)
MSL_FLOAT_MATH(half)
// Defined, so that constant arguments fold as in Metal (an index computed with min() is still
// a compile-time constant).
#define MSL_INT_MATH(T)                                                               \
  constexpr T abs(T x) { return x < 0 ? T(-x) : x; }                                 \
  constexpr T max(T a, T b) { return a > b ? a : b; }                                \
  constexpr T min(T a, T b) { return a < b ? a : b; }                                \
  constexpr T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }                 \
  constexpr T select(T a, T b, bool c) { return c ? b : a; }
MSL_INT_MATH(int)
MSL_INT_MATH(uint)
MSL_INT_MATH(short)
MSL_INT_MATH(ushort)
MSL_INT_MATH(char)
MSL_INT_MATH(uchar)
MSL_INT_MATH(long)
MSL_INT_MATH(ulong)
namespace fast {
MSL_FLOAT_MATH(float)
MSL_FLOAT_MATH(half)
}  // namespace fast
namespace precise {
MSL_FLOAT_MATH(float)
MSL_FLOAT_MATH(half)
}  // namespace precise
#undef MSL_FLOAT_MATH
#undef MSL_INT_MATH

template <typename To, typename From>
To as_type(From x) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs types of the same size");
  return __builtin_bit_cast(To, x);
}

template <typename T>
struct numeric_limits;
template <>
struct numeric_limits<float> {
  static constexpr float infinity() { return __builtin_inff(); }
  static constexpr float quiet_NaN() { return __builtin_nanf(""); }
  static constexpr float max() { return __FLT_MAX__; }
  static constexpr float min() { return __FLT_MIN__; }
  static constexpr float lowest() { return -__FLT_MAX__; }
  static constexpr float epsilon() { return __FLT_EPSILON__; }
};
template <>
struct numeric_limits<int> {
  static constexpr int max() { return __INT_MAX__; }
  static constexpr int min() { return -__INT_MAX__ - 1; }
  static constexpr int lowest() { return -__INT_MAX__ - 1; }
};
template <>
struct numeric_limits<uint> {
  static constexpr uint max() { return 2u * __INT_MAX__ + 1u; }
  static constexpr uint min() { return 0u; }
  static constexpr uint lowest() { return 0u; }
};

// ---- simdgroup matrices ----
template <typename T>
struct simdgroup_share {  // one lane's part of a matrix: opaque, 2 elements
  T part[2];
};
template <typename T> struct matrix_element { static constexpr bool value = false; };
template <> struct matrix_element<float> { static constexpr bool value = true; };
template <> struct matrix_element<half> { static constexpr bool value = true; };
template <> struct matrix_element<bfloat> { static constexpr bool value = true; };

template <typename T> simdgroup_share<T> __msl_matrix_diagonal(T value);
template <typename T> simdgroup_share<T> __msl_matrix_filled(T value);
template <typename T> simdgroup_share<T> __msl_matrix_load_tg(const threadgroup T* src, ulong epr,
                                                              ulong2 origin, bool transpose);
template <typename T> simdgroup_share<T> __msl_matrix_load_dev(const device T* src, ulong epr,
                                                               ulong2 origin, bool transpose);
template <typename T> void __msl_matrix_store_tg(simdgroup_share<T> a, threadgroup T* dst,
                                                 ulong epr, ulong2 origin, bool transpose);
template <typename T> void __msl_matrix_store_dev(simdgroup_share<T> a, device T* dst, ulong epr,
                                                  ulong2 origin, bool transpose);
template <typename T> simdgroup_share<T> __msl_matrix_mma(simdgroup_share<T> a,
                                                          simdgroup_share<T> b,
                                                          simdgroup_share<T> c);
template <typename T> simdgroup_share<T> __msl_matrix_multiply(simdgroup_share<T> a,
                                                               simdgroup_share<T> b);

struct matrix_ops;
template <typename T, int Cols, int Rows>
class simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "Metal's simdgroup matrices are 8 x 8");
  static_assert(matrix_element<T>::value, "simdgroup matrices hold float, half or bfloat");

 public:
  simdgroup_matrix() = default;
  explicit simdgroup_matrix(T diagonal) : share_(__msl_matrix_diagonal(diagonal)) {}

 private:
  simdgroup_share<T> share_;
  friend struct matrix_ops;
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

struct matrix_ops {
  template <typename T>
  static thread simdgroup_share<T>& of(thread simdgroup_matrix<T, 8, 8>& m) {
    return m.share_;
  }
  template <typename T>
  static simdgroup_share<T> of(thread const simdgroup_matrix<T, 8, 8>& m) {
    return m.share_;
  }
};

template <typename T, int Cols, int Rows>
simdgroup_matrix<T, Cols, Rows> make_filled_simdgroup_matrix(T value) {
  simdgroup_matrix<T, Cols, Rows> m;
  matrix_ops::of(m) = __msl_matrix_filled(value);
  return m;
}
template <typename T>
void simdgroup_load(thread simdgroup_matrix<T, 8, 8>& d, const threadgroup T* src,
                    ulong elements_per_row = 8, ulong2 matrix_origin = 0,
                    bool transpose_matrix = false) {
  matrix_ops::of(d) = __msl_matrix_load_tg(src, elements_per_row, matrix_origin,
                                           transpose_matrix);
}
template <typename T>
void simdgroup_load(thread simdgroup_matrix<T, 8, 8>& d, const device T* src,
                    ulong elements_per_row = 8, ulong2 matrix_origin = 0,
                    bool transpose_matrix = false) {
  matrix_ops::of(d) = __msl_matrix_load_dev(src, elements_per_row, matrix_origin,
                                            transpose_matrix);
}
template <typename T>
void simdgroup_store(thread const simdgroup_matrix<T, 8, 8>& a, threadgroup T* dst,
                     ulong elements_per_row = 8, ulong2 matrix_origin = 0,
                     bool transpose_matrix = false) {
  __msl_matrix_store_tg(matrix_ops::of(a), dst, elements_per_row, matrix_origin,
                        transpose_matrix);
}
template <typename T>
void simdgroup_store(thread const simdgroup_matrix<T, 8, 8>& a, device T* dst,
                     ulong elements_per_row = 8, ulong2 matrix_origin = 0,
                     bool transpose_matrix = false) {
  __msl_matrix_store_dev(matrix_ops::of(a), dst, elements_per_row, matrix_origin,
                         transpose_matrix);
}
template <typename T>
void simdgroup_multiply_accumulate(thread simdgroup_matrix<T, 8, 8>& d,
                                   thread const simdgroup_matrix<T, 8, 8>& a,
                                   thread const simdgroup_matrix<T, 8, 8>& b,
                                   thread const simdgroup_matrix<T, 8, 8>& c) {
  matrix_ops::of(d) = __msl_matrix_mma(matrix_ops::of(a), matrix_ops::of(b), matrix_ops::of(c));
}
template <typename T>
void simdgroup_multiply(thread simdgroup_matrix<T, 8, 8>& d,
                        thread const simdgroup_matrix<T, 8, 8>& a,
                        thread const simdgroup_matrix<T, 8, 8>& b) {
  matrix_ops::of(d) = __msl_matrix_multiply(matrix_ops::of(a), matrix_ops::of(b));
}

}  // namespace metal

using namespace metal;

// From MLX's prelude (kernels/bf16.h, utils.h), which MLX prepends to every custom kernel.
typedef bfloat bfloat16_t;
typedef half float16_t;
#define METAL_FUNC inline __attribute__((always_inline))
#define MLX_MTL_PRAGMA_UNROLL _Pragma("clang loop unroll(full)")

template <typename IdxT = int64_t>
METAL_FUNC IdxT elem_to_loc(IdxT elem, constant const int* shape,
                            constant const int64_t* strides, int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return loc;
}
