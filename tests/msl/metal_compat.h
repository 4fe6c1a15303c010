// Metal Shading Language on the CPU, for the kernel harness (tests/msl/harness.py).
//
// A kernel body is compiled as C++ exactly as MLX wraps it, against this header instead of
// MLX's `metal::utils()`. Each threadgroup runs as a set of fibers (one per thread) scheduled
// cooperatively: a thread runs until it reaches `threadgroup_barrier` or a simdgroup operation,
// and the scheduler releases a barrier only when every thread of the threadgroup waits on it,
// and a simdgroup operation only when every live lane of the 32-lane simdgroup waits on the same
// operation. Anything else (a barrier some threads never reach, lanes waiting on different
// operations, a shuffle from an exited lane, more than 32 KB of threadgroup memory) aborts the
// run with a message, as it would be undefined behaviour on a GPU. MSL_SCHEDULE=shuffle:SEED
// resumes the waiting threads in a fresh random order each time (default: thread order), so
// that a result depending on the order of threads between barriers shows up.
//
// simdgroup_matrix<T, 8, 8> is emulated with every lane holding the whole matrix; its
// operations (simdgroup_load, _store, _multiply, _multiply_accumulate) are simdgroup
// rendezvous that insist on uniform arguments and on identical copies in every lane, and no
// element accessor exists, so which lane holds which element cannot be observed, as in Metal.
//
// What this proves: the kernel's logic, indexing and synchronisation, with AddressSanitizer
// watching every buffer. What it does not prove: that Metal's compiler accepts the source (the
// strict compile check, metal_strict.h, covers that), or anything about speed.
#pragma once

#include <ucontext.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MSL_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define MSL_ASAN 1
#endif
#ifdef MSL_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

namespace msl {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "msl harness: %s\n", what);
  std::fflush(stderr);
  std::_Exit(3);
}

}  // namespace msl

// ---------------------------------------------------------------------------------------------
// Scalar types
// ---------------------------------------------------------------------------------------------

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef _Float16 half;
typedef half float16_t;

// bfloat16 as Metal stores it: the top 16 bits of a float, rounded to nearest even.
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) { bits = from_float(f); }
  bfloat16_t(double f) : bfloat16_t(static_cast<float>(f)) {}
  bfloat16_t(int i) : bfloat16_t(static_cast<float>(i)) {}
  operator float() const {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  static uint16_t from_float(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
  }
};
typedef bfloat16_t bfloat;

// ---------------------------------------------------------------------------------------------
// Vector types (float2..4, half2..4, int2..4, uint2..4, ...)
// ---------------------------------------------------------------------------------------------

template <typename T, int N>
struct vec;

#define MSL_VEC_COMMON(N)                                                                   \
  using value_type = T;                                                                     \
  static constexpr int size = N;                                                            \
  T& operator[](int i) { return (&x)[i]; }                                                  \
  const T& operator[](int i) const { return (&x)[i]; }                                      \
  template <typename U>                                                                     \
  explicit vec(const vec<U, N>& o) {                                                        \
    for (int i = 0; i < N; ++i) (*this)[i] = static_cast<T>(o[i]);                          \
  }

template <typename T>
struct vec<T, 2> {
  T x, y;
  vec() = default;
  vec(T s) : x(s), y(s) {}
  vec(T a, T b) : x(a), y(b) {}
  MSL_VEC_COMMON(2)
};
template <typename T>
struct vec<T, 3> {
  T x, y, z;
  vec() = default;
  vec(T s) : x(s), y(s), z(s) {}
  vec(T a, T b, T c) : x(a), y(b), z(c) {}
  MSL_VEC_COMMON(3)
};
template <typename T>
struct vec<T, 4> {
  T x, y, z, w;
  vec() = default;
  vec(T s) : x(s), y(s), z(s), w(s) {}
  vec(T a, T b, T c, T d) : x(a), y(b), z(c), w(d) {}
  MSL_VEC_COMMON(4)
};

#define MSL_VEC_BINOP(op)                                                                   \
  template <typename T, int N>                                                              \
  vec<T, N> operator op(const vec<T, N>& a, const vec<T, N>& b) {                           \
    vec<T, N> r;                                                                            \
    for (int i = 0; i < N; ++i) r[i] = a[i] op b[i];                                        \
    return r;                                                                               \
  }                                                                                         \
  template <typename T, int N, typename S,                                                  \
            typename = std::enable_if_t<std::is_arithmetic<S>::value>>                      \
  vec<T, N> operator op(const vec<T, N>& a, S s) {                                          \
    return a op vec<T, N>(static_cast<T>(s));                                               \
  }                                                                                         \
  template <typename T, int N, typename S,                                                  \
            typename = std::enable_if_t<std::is_arithmetic<S>::value>>                      \
  vec<T, N> operator op(S s, const vec<T, N>& a) {                                          \
    return vec<T, N>(static_cast<T>(s)) op a;                                               \
  }                                                                                         \
  template <typename T, int N, typename S>                                                  \
  vec<T, N>& operator op##=(vec<T, N>& a, const S& b) {                                     \
    a = a op b;                                                                             \
    return a;                                                                               \
  }
MSL_VEC_BINOP(+)
MSL_VEC_BINOP(-)
MSL_VEC_BINOP(*)
MSL_VEC_BINOP(/)

template <typename T, int N>
vec<T, N> operator-(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = -a[i];
  return r;
}

#define MSL_VEC_TYPES(T, name) \
  typedef vec<T, 2> name##2;   \
  typedef vec<T, 3> name##3;   \
  typedef vec<T, 4> name##4;
MSL_VEC_TYPES(float, float)
MSL_VEC_TYPES(half, half)
MSL_VEC_TYPES(int, int)
MSL_VEC_TYPES(uint, uint)
MSL_VEC_TYPES(short, short)
MSL_VEC_TYPES(ushort, ushort)
MSL_VEC_TYPES(char, char)
MSL_VEC_TYPES(uchar, uchar)
MSL_VEC_TYPES(bool, bool)
MSL_VEC_TYPES(long, long)
MSL_VEC_TYPES(ulong, ulong)

// ---------------------------------------------------------------------------------------------
// Address spaces. `threadgroup` declarations are rewritten by the harness into shared,
// per-threadgroup allocations (msl::tg_alloc); every other use of the qualifiers is a no-op.
// ---------------------------------------------------------------------------------------------

#define device
#define constant
#define thread
#define threadgroup
#define METAL_FUNC inline
// MLX's unroll pragma (kernels/utils.h, part of the prelude MLX prepends to custom kernels).
#define MLX_MTL_PRAGMA_UNROLL _Pragma("clang loop unroll(full)")

// ---------------------------------------------------------------------------------------------
// The emulated threadgroup: fibers, barriers, simdgroup rendezvous
// ---------------------------------------------------------------------------------------------

namespace metal {
template <typename T, int Cols, int Rows>
class simdgroup_matrix;
}  // namespace metal
using metal::simdgroup_matrix;

namespace msl {
struct matrix_access;

constexpr int kSimdWidth = 32;
constexpr size_t kThreadgroupMemoryLimit = 32768;
constexpr size_t kFiberStack = 256 * 1024;

enum class Wait { ready, barrier, simd, done };

struct Fiber;
using Combine = void (*)(Fiber** lanes);  // lanes[i] == nullptr: lane i is absent or exited

struct ThreadIds {
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid;
  uint3 threads_per_threadgroup, dispatch_threads_per_threadgroup, threadgroups_per_grid;
  uint3 threads_per_grid, grid_size, grid_origin;
  uint thread_index_in_threadgroup, thread_index_in_simdgroup, simdgroup_index_in_threadgroup;
  uint simdgroups_per_threadgroup, dispatch_simdgroups_per_threadgroup;
  uint thread_index_in_quadgroup, quadgroup_index_in_threadgroup, quadgroups_per_threadgroup;
  uint dispatch_quadgroups_per_threadgroup, threads_per_simdgroup, thread_execution_width;
};

// Switching between the scheduler and the fibers. On x86-64 a few instructions save the
// callee-saved registers and swap stacks; elsewhere ucontext does it (slower: it makes a system
// call per switch to save the signal mask).
#if defined(__x86_64__)
extern "C" void msl_switch_stack(void** save_sp, void* next_sp);
asm(R"(
.text
.globl msl_switch_stack
.type msl_switch_stack,@function
msl_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size msl_switch_stack, .-msl_switch_stack
)");

struct Context {
  void* sp = nullptr;
};
inline void swap_context(Context& from, Context& to) { msl_switch_stack(&from.sp, to.sp); }
inline void start_context(Context& c, char* stack, size_t size, void (*entry)()) {
  // A frame msl_switch_stack can return into: six saved registers, then `entry` as the return
  // address, then a dummy return address so `entry` starts with the ABI's stack alignment.
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;
  *--sp = reinterpret_cast<void*>(entry);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;
  c.sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};
inline void swap_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void start_context(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

struct Fiber {
  Context ctx;
  char* stack = nullptr;
  Wait wait = Wait::done;
  ThreadIds ids;
  // The simdgroup operation this lane waits on: its kind, argument, operand and result.
  int op = 0;
  int arg = 0;
  int site = 0;  // which call in the source (threadgroup_barrier and simdgroup operations)
  size_t matrix_ops = 0;  // simdgroup matrix operations this lane has done
  Combine combine = nullptr;
  alignas(16) unsigned char value[64];
  alignas(16) unsigned char result[64];
};

struct Slot {
  void* ptr;
  size_t bytes;
};

struct MatrixEntry {
  int site;
  size_t args, args_bytes, result;  // offsets into MatrixLog::bytes
};

struct MatrixLog {
  std::vector<MatrixEntry> entries;
  std::vector<unsigned char> bytes;  // the entries' arguments and results
  size_t base = 0;  // operations done and checked by every lane before entries[0]
};

struct Group {
  std::vector<Fiber> fibers;
  Context scheduler;
  std::function<void(const ThreadIds&)> entry;
  std::vector<Slot> slots;  // threadgroup memory, indexed by declaration
  size_t slot_bytes = 0;
  size_t max_slot_bytes = 0;  // over every threadgroup of the dispatch
  size_t barriers = 0;  // threadgroup barriers released in this threadgroup
  size_t max_barriers = 0;  // over every threadgroup
  uint64_t shuffle_seed = 0;  // 0: threads resume in order
  uint64_t rng = 0;
  Fiber* current = nullptr;
  std::vector<MatrixLog> matrix_logs;  // per simdgroup
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
};

inline Group& group() {
  static Group g;
  return g;
}

inline void switch_to_fiber(Fiber& f) {
  Group& g = group();
  g.current = &f;
#ifdef MSL_ASAN
  __sanitizer_start_switch_fiber(&g.scheduler_fake_stack, f.stack, kFiberStack);
#endif
  swap_context(g.scheduler, f.ctx);
#ifdef MSL_ASAN
  __sanitizer_finish_switch_fiber(g.scheduler_fake_stack, nullptr, nullptr);
#endif
  g.current = nullptr;
}

// Called on a fiber: hand control back to the scheduler until released.
inline void yield_to_scheduler(bool exiting = false) {
  Group& g = group();
  Fiber& f = *g.current;
  void* fake_stack = nullptr;
#ifdef MSL_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &fake_stack, g.scheduler_stack_bottom,
                                 g.scheduler_stack_size);
#endif
  swap_context(f.ctx, g.scheduler);
#ifdef MSL_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, &g.scheduler_stack_bottom,
                                  &g.scheduler_stack_size);
#else
  (void)fake_stack;
  (void)exiting;
#endif
}

inline void fiber_main() {
  Group& g = group();
#ifdef MSL_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g.scheduler_stack_bottom, &g.scheduler_stack_size);
#endif
  Fiber& f = *g.current;
  g.entry(f.ids);
  f.wait = Wait::done;
  yield_to_scheduler(true);
  fail("a finished thread was resumed");
}

inline Fiber& self() {
  Fiber* f = group().current;
  if (!f) fail("a Metal builtin was called outside a kernel thread");
  return *f;
}

// ---- threadgroup memory ----

template <typename T>
T* tg_alloc(int slot) {
  Group& g = group();
  if (static_cast<size_t>(slot) >= g.slots.size()) g.slots.resize(slot + 1, Slot{nullptr, 0});
  Slot& s = g.slots[slot];
  if (!s.ptr) {
    s.bytes = sizeof(T);
    s.ptr = std::malloc(s.bytes);
    g.slot_bytes += s.bytes;
    if (g.slot_bytes > kThreadgroupMemoryLimit) fail("threadgroup memory exceeds 32 KB");
    // Poison: a kernel that reads threadgroup memory it never wrote sees NaN or garbage.
    using E = std::remove_all_extents_t<T>;
    if (std::is_floating_point<E>::value || std::is_same<E, half>::value) {
      E nan = static_cast<E>(std::numeric_limits<float>::quiet_NaN());
      E* e = reinterpret_cast<E*>(s.ptr);
      for (size_t i = 0; i < s.bytes / sizeof(E); ++i) e[i] = nan;
    } else {
      std::memset(s.ptr, 0xA5, s.bytes);
    }
  }
  return reinterpret_cast<T*>(s.ptr);
}

inline void free_threadgroup_memory() {
  Group& g = group();
  g.max_slot_bytes = std::max(g.max_slot_bytes, g.slot_bytes);
  g.max_barriers = std::max(g.max_barriers, g.barriers);
  g.barriers = 0;
  for (Slot& s : g.slots) std::free(s.ptr);
  g.slots.clear();
  g.slot_bytes = 0;
}

// ---- scheduling one threadgroup ----

inline int lanes_of(int simdgroup, int n_threads, Fiber** lanes) {
  Group& g = group();
  int waiting = 0;
  for (int l = 0; l < kSimdWidth; ++l) {
    int t = simdgroup * kSimdWidth + l;
    lanes[l] = (t < n_threads && g.fibers[t].wait != Wait::done) ? &g.fibers[t] : nullptr;
    if (lanes[l] && lanes[l]->wait == Wait::simd) ++waiting;
  }
  return waiting;
}

inline void settle_matrix_log(int simdgroup, int n_threads);

// Release whatever can be released; false when nothing can (a deadlock or divergence).
inline bool release_waiters(int n_threads) {
  Group& g = group();
  bool released = false;
  int n_simd = (n_threads + kSimdWidth - 1) / kSimdWidth;
  for (int s = 0; s < n_simd; ++s) {
    Fiber* lanes[kSimdWidth];
    int waiting = lanes_of(s, n_threads, lanes);
    if (waiting == 0) continue;
    Fiber* first = nullptr;
    bool complete = true;
    for (Fiber* f : lanes) {
      if (!f) continue;
      if (f->wait != Wait::simd) {
        complete = false;
        break;
      }
      if (!first) first = f;
      if (f->op != first->op || f->site != first->site || f->combine != first->combine)
        fail("lanes of a simdgroup wait on different simdgroup operations (divergence)");
    }
    if (!complete) continue;
    settle_matrix_log(s, n_threads);
    first->combine(lanes);
    for (Fiber* f : lanes)
      if (f) f->wait = Wait::ready;
    released = true;
  }
  if (released) return true;

  int live = 0, at_barrier = 0;
  for (int t = 0; t < n_threads; ++t) {
    Wait w = g.fibers[t].wait;
    live += w != Wait::done;
    at_barrier += w == Wait::barrier;
  }
  if (at_barrier == 0) return false;
  if (at_barrier != n_threads)
    fail(live == n_threads
             ? "threads wait on a threadgroup_barrier while others wait on a simdgroup operation"
             : "a threadgroup_barrier is not reached by every thread of the threadgroup");
  for (int t = 1; t < n_threads; ++t)
    if (g.fibers[t].site != g.fibers[0].site)
      fail("threads wait on different threadgroup_barrier calls (divergence)");
  for (int s = 0; s < n_simd; ++s) settle_matrix_log(s, n_threads);
  for (int t = 0; t < n_threads; ++t) g.fibers[t].wait = Wait::ready;
  g.barriers += 1;
  return true;
}

inline uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

inline void run_threadgroup(int n_threads) {
  Group& g = group();
  std::vector<int> order(n_threads);
  for (int t = 0; t < n_threads; ++t) order[t] = t;
  for (;;) {
    // Every ready thread runs until it exits or waits; then release what can be released.
    if (g.shuffle_seed)
      for (int i = n_threads - 1; i > 0; --i)
        std::swap(order[i], order[splitmix64(g.rng) % static_cast<uint64_t>(i + 1)]);
    for (int t : order)
      if (g.fibers[t].wait == Wait::ready) switch_to_fiber(g.fibers[t]);
    bool all_done = true;
    for (int t = 0; t < n_threads; ++t) all_done &= g.fibers[t].wait == Wait::done;
    if (all_done) {
      for (int s = 0; s * kSimdWidth < n_threads; ++s) settle_matrix_log(s, n_threads);
      return;
    }
    if (!release_waiters(n_threads)) fail("deadlock: no thread can make progress");
  }
}

inline unsigned ceil_div(unsigned a, unsigned b) { return (a + b - 1) / b; }

// MLX's dispatch: dispatchThreads(grid, min(threadgroup, grid)); edge threadgroups may be
// partial (non-uniform threadgroups), and their threads_per_threadgroup is their actual size.
inline void read_schedule() {
  Group& g = group();
  const char* mode = std::getenv("MSL_SCHEDULE");
  if (!mode || !std::strcmp(mode, "in-order")) return;
  if (std::strncmp(mode, "shuffle:", 8)) fail("MSL_SCHEDULE must be in-order or shuffle:SEED");
  g.shuffle_seed = std::strtoull(mode + 8, nullptr, 10) * 2 + 1;  // never 0
}

inline void report_stats() {
  std::fprintf(stderr, "msl-stats: threadgroup_bytes=%zu barriers=%zu\n", group().max_slot_bytes,
               group().max_barriers);
}

inline void dispatch(uint3 grid, uint3 requested_tg, std::function<void(const ThreadIds&)> entry) {
  Group& g = group();
  read_schedule();
  uint3 tg(std::min(requested_tg.x, grid.x), std::min(requested_tg.y, grid.y),
           std::min(requested_tg.z, grid.z));
  if (tg.x == 0 || tg.y == 0 || tg.z == 0) return;
  unsigned tg_size = tg.x * tg.y * tg.z;
  if (tg_size > 1024) fail("threadgroup larger than 1024 threads");
  g.entry = std::move(entry);
  g.fibers.resize(tg_size);
  for (Fiber& f : g.fibers) {
    if (!f.stack) {
      void* p = mmap(nullptr, kFiberStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                     -1, 0);
      if (p == MAP_FAILED) fail("cannot allocate a fiber stack");
      f.stack = static_cast<char*>(p);
    }
  }
  uint3 groups(ceil_div(grid.x, tg.x), ceil_div(grid.y, tg.y), ceil_div(grid.z, tg.z));
  for (uint gz = 0; gz < groups.z; ++gz)
    for (uint gy = 0; gy < groups.y; ++gy)
      for (uint gx = 0; gx < groups.x; ++gx) {
        uint3 gpos(gx, gy, gz);
        uint3 size(std::min(tg.x, grid.x - gx * tg.x), std::min(tg.y, grid.y - gy * tg.y),
                   std::min(tg.z, grid.z - gz * tg.z));
        int n = static_cast<int>(size.x * size.y * size.z);
        // Each threadgroup's own shuffle, the same whatever order the dispatch visits them in.
        g.rng = g.shuffle_seed ^ (0x100000001b3ull * (gx + 65536ull * (gy + 65536ull * gz)));
        for (int t = 0; t < n; ++t) {
          Fiber& f = g.fibers[t];
          uint3 tpos(t % size.x, (t / size.x) % size.y, t / (size.x * size.y));
          ThreadIds& id = f.ids;
          id.thread_position_in_threadgroup = tpos;
          id.threadgroup_position_in_grid = gpos;
          id.thread_position_in_grid =
              uint3(gx * tg.x + tpos.x, gy * tg.y + tpos.y, gz * tg.z + tpos.z);
          id.threads_per_threadgroup = size;
          id.dispatch_threads_per_threadgroup = tg;
          id.threadgroups_per_grid = groups;
          id.threads_per_grid = grid;
          id.grid_size = grid;
          id.grid_origin = uint3(0u);
          id.thread_index_in_threadgroup = t;
          id.thread_index_in_simdgroup = t % kSimdWidth;
          id.simdgroup_index_in_threadgroup = t / kSimdWidth;
          id.simdgroups_per_threadgroup = ceil_div(n, kSimdWidth);
          id.dispatch_simdgroups_per_threadgroup = ceil_div(tg_size, kSimdWidth);
          id.thread_index_in_quadgroup = t % 4;
          id.quadgroup_index_in_threadgroup = t / 4;
          id.quadgroups_per_threadgroup = ceil_div(n, 4);
          id.dispatch_quadgroups_per_threadgroup = ceil_div(tg_size, 4);
          id.threads_per_simdgroup = kSimdWidth;
          id.thread_execution_width = kSimdWidth;
          start_context(f.ctx, f.stack, kFiberStack, fiber_main);
          f.wait = Wait::ready;
          f.matrix_ops = 0;
        }
        g.matrix_logs.clear();
        run_threadgroup(n);
        free_threadgroup_memory();
      }
}

// ---- simdgroup operations ----

enum Op {
  op_sum = 1, op_prod, op_max, op_min, op_and, op_or, op_xor, op_shuffle, op_shuffle_xor,
  op_shuffle_up, op_shuffle_down, op_broadcast, op_broadcast_first, op_prefix_inclusive_sum,
  op_prefix_exclusive_sum, op_any, op_all, op_barrier
};

template <typename V>
V load(const unsigned char* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
void store(unsigned char* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

template <typename V>
V max_of(V a, V b) { return a > b ? a : b; }
template <typename T, int N>
vec<T, N> max_of(vec<T, N> a, vec<T, N> b) {
  for (int i = 0; i < N; ++i) a[i] = max_of(a[i], b[i]);
  return a;
}
template <typename V>
V min_of(V a, V b) { return a < b ? a : b; }
template <typename T, int N>
vec<T, N> min_of(vec<T, N> a, vec<T, N> b) {
  for (int i = 0; i < N; ++i) a[i] = min_of(a[i], b[i]);
  return a;
}

template <typename V>
V reduce(int op, V a, V b) {
  switch (op) {
    case op_sum: return a + b;
    case op_prod: return a * b;
    case op_max: return max_of(a, b);
    case op_min: return min_of(a, b);
    default: break;
  }
  if constexpr (std::is_integral<V>::value) {
    switch (op) {
      case op_and: return a & b;
      case op_or: return a | b;
      case op_xor: return a ^ b;
      default: break;
    }
  }
  fail("unsupported simdgroup reduction for this type");
}

inline Fiber* source_lane(Fiber** lanes, int lane) {
  if (lane < 0 || lane >= kSimdWidth || !lanes[lane])
    fail("simdgroup shuffle reads a lane that is absent or has exited");
  return lanes[lane];
}

template <typename V>
void combine(Fiber** lanes) {
  int first = 0;
  while (!lanes[first]) ++first;
  int op = lanes[first]->op;
  if (op == op_barrier) return;
  if (op == op_broadcast || op == op_broadcast_first || op == op_shuffle ||
      op == op_shuffle_xor || op == op_shuffle_up || op == op_shuffle_down) {
    for (int l = 0; l < kSimdWidth; ++l) {
      Fiber* f = lanes[l];
      if (!f) continue;
      int src = l;
      switch (op) {
        case op_broadcast:
          if (f->arg != lanes[first]->arg) fail("simd_broadcast lane is not uniform");
          src = f->arg;
          break;
        case op_broadcast_first: src = first; break;
        case op_shuffle: src = f->arg; break;
        case op_shuffle_xor: src = l ^ f->arg; break;
        case op_shuffle_up: src = l - f->arg >= 0 ? l - f->arg : l; break;
        case op_shuffle_down: src = l + f->arg < kSimdWidth ? l + f->arg : l; break;
      }
      std::memcpy(f->result, source_lane(lanes, src)->value, sizeof(V));
    }
    return;
  }
  if (op == op_prefix_inclusive_sum || op == op_prefix_exclusive_sum) {
    V run = V(0);
    for (int l = 0; l < kSimdWidth; ++l) {
      Fiber* f = lanes[l];
      if (!f) continue;
      V v = load<V>(f->value);
      if (op == op_prefix_exclusive_sum) store(f->result, run);
      run = run + v;
      if (op == op_prefix_inclusive_sum) store(f->result, run);
    }
    return;
  }
  if (op == op_any || op == op_all) {
    bool acc = op == op_all;
    for (int l = 0; l < kSimdWidth; ++l) {
      if (!lanes[l]) continue;
      bool v = load<bool>(lanes[l]->value);
      acc = op == op_all ? (acc && v) : (acc || v);
    }
    for (int l = 0; l < kSimdWidth; ++l)
      if (lanes[l]) store(lanes[l]->result, acc);
    return;
  }
  V acc = load<V>(lanes[first]->value);
  for (int l = first + 1; l < kSimdWidth; ++l)
    if (lanes[l]) acc = reduce(op, acc, load<V>(lanes[l]->value));
  for (int l = 0; l < kSimdWidth; ++l)
    if (lanes[l]) store(lanes[l]->result, acc);
}

// The types Metal's simd functions take: scalars and vectors of float, half, int, uint, short,
// ushort, char, uchar, and bool for the exchanges and simd_any / simd_all (no bfloat, no 64-bit).
template <typename V> struct simd_scalar : std::false_type {};
template <> struct simd_scalar<float> : std::true_type {};
template <> struct simd_scalar<half> : std::true_type {};
template <> struct simd_scalar<int> : std::true_type {};
template <> struct simd_scalar<uint> : std::true_type {};
template <> struct simd_scalar<short> : std::true_type {};
template <> struct simd_scalar<ushort> : std::true_type {};
template <> struct simd_scalar<char> : std::true_type {};
template <> struct simd_scalar<signed char> : std::true_type {};
template <> struct simd_scalar<uchar> : std::true_type {};
template <> struct simd_scalar<bool> : std::true_type {};
template <typename T, int N> struct simd_scalar<vec<T, N>> : simd_scalar<T> {};

template <typename V>
V simd_op(int site, int op, V value, int arg = 0) {
  static_assert(simd_scalar<V>::value,
                "Metal's simd functions take float, half, (u)int, (u)short, (u)char or bool "
                "scalars and vectors only");
  static_assert(sizeof(V) <= 64, "simdgroup operand too large");
  Fiber& f = self();
  f.op = op;
  f.arg = arg;
  f.site = site;
  f.combine = &combine<V>;
  store(f.value, value);
  f.wait = Wait::simd;
  yield_to_scheduler();
  return load<V>(f.result);
}

inline void barrier(int site) {
  Fiber& f = self();
  f.site = site;
  f.wait = Wait::barrier;
  yield_to_scheduler();
}

// ---- simdgroup matrices: the emulation behind metal::simdgroup_* ----
//
// A matrix operation is computed once per simdgroup, by the first lane to reach it, and logged;
// each other lane, reaching the same operation (the same call site, in the same order), must
// present byte-identical arguments (pointers, strides, operand matrices) and takes the logged
// result. So no fiber switch is needed, lanes may run ahead of each other between
// synchronisation points as they may on a GPU, and a lane that skips or reorders a matrix
// operation (divergence) is caught: every lane of a simdgroup must have done the same number of
// them whenever the simdgroup synchronises and when the threadgroup ends.

struct matrix_access {
  template <typename M>
  static auto& elements(M& m) { return m.e_; }
  template <typename M>
  static const auto& elements(const M& m) { return m.e_; }
  template <typename M, typename T>
  static void fill(M& m, T value) {
    for (auto& row : m.e_)
      for (auto& x : row) x = value;
  }
};

inline MatrixLog& matrix_log(const Fiber& f) {
  Group& g = group();
  size_t sg = f.ids.simdgroup_index_in_threadgroup;
  if (g.matrix_logs.size() <= sg) g.matrix_logs.resize(sg + 1);
  return g.matrix_logs[sg];
}

struct Piece {
  const void* data;
  size_t bytes;
};

// Byte moves between lanes' own matrices and the log: memory the harness owns, left out of
// AddressSanitizer's checks (its memcmp / memcpy interceptors cost more than the operation).
#define MSL_UNCHECKED __attribute__((no_sanitize("address")))
MSL_UNCHECKED inline bool same_bytes(const void* a, const void* b, size_t n) {
  const unsigned char* x = static_cast<const unsigned char*>(a);
  const unsigned char* y = static_cast<const unsigned char*>(b);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t u, v;
    __builtin_memcpy(&u, x + i, 8);
    __builtin_memcpy(&v, y + i, 8);
    if (u != v) return false;
  }
  for (; i < n; ++i)
    if (x[i] != y[i]) return false;
  return true;
}
MSL_UNCHECKED inline void copy_bytes(void* dst, const void* src, size_t n) {
  unsigned char* x = static_cast<unsigned char*>(dst);
  const unsigned char* y = static_cast<const unsigned char*>(src);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t u;
    __builtin_memcpy(&u, y + i, 8);
    __builtin_memcpy(x + i, &u, 8);
  }
  for (; i < n; ++i) x[i] = y[i];
}

template <typename V>
Piece piece(const V& v) {
  return Piece{&v, sizeof(V)};
}

// This lane's next matrix operation: `compute(out)` writes its result (result_bytes) when this
// lane is the first to reach it; otherwise this lane's arguments must equal the first lane's.
// Returns the logged result.
template <typename Compute>
const unsigned char* matrix_step(int site, std::initializer_list<Piece> args,
                                 size_t result_bytes, Compute compute) {
  Fiber& f = self();
  MatrixLog& log = matrix_log(f);
  size_t i = f.matrix_ops - log.base;
  f.matrix_ops += 1;
  if (i == log.entries.size()) {
    MatrixEntry e{site, log.bytes.size(), 0, 0};
    for (const Piece& a : args) {
      size_t at = log.bytes.size();
      log.bytes.resize(at + a.bytes);
      copy_bytes(log.bytes.data() + at, a.data, a.bytes);
    }
    e.args_bytes = log.bytes.size() - e.args;
    e.result = log.bytes.size();
    log.bytes.resize(log.bytes.size() + result_bytes);
    compute(log.bytes.data() + e.result);
    log.entries.push_back(e);
    return log.bytes.data() + e.result;
  }
  const MatrixEntry& e = log.entries[i];
  if (e.site != site)
    fail("lanes of a simdgroup run different simdgroup matrix operations (divergence)");
  size_t at = e.args;
  for (const Piece& a : args) {
    if (at + a.bytes > e.args + e.args_bytes ||
        !same_bytes(log.bytes.data() + at, a.data, a.bytes))
      fail("simdgroup matrix operation: an argument or operand differs across the lanes of the "
           "simdgroup (a lane-dependent pointer, stride or matrix value?)");
    at += a.bytes;
  }
  return log.bytes.data() + e.result;
}

// Called whenever the simdgroup synchronises and when the threadgroup ends: every lane must
// have done the same matrix operations; the log is then settled.
inline void settle_matrix_log(int simdgroup, int n_threads) {
  Group& g = group();
  if (g.matrix_logs.size() <= static_cast<size_t>(simdgroup)) return;
  MatrixLog& log = g.matrix_logs[simdgroup];
  size_t done = log.base + log.entries.size();
  for (int l = 0; l < kSimdWidth; ++l) {
    int t = simdgroup * kSimdWidth + l;
    if (t < n_threads && g.fibers[t].matrix_ops != done)
      fail("a simdgroup matrix operation is not run by every lane of the simdgroup "
           "(divergent control flow, or lanes that returned early)");
  }
  log.base = done;
  log.entries.clear();
  log.bytes.clear();
}

template <typename T>
using matrix = simdgroup_matrix<T, 8, 8>;

inline void check_origin(ulong2 origin) {
  if (origin[0] || origin[1])
    fail("simdgroup_load/store: the harness models matrix_origin 0 only; offset the pointer");
}

inline size_t matrix_index(int row, int col, ulong elements_per_row, bool transpose) {
  return transpose ? col * elements_per_row + row : row * elements_per_row + col;
}

template <typename T>
void matrix_load(int site, matrix<T>& d, const T* src, ulong epr, ulong2 origin, bool tr) {
  check_origin(origin);
  auto& e = matrix_access::elements(d);
  const unsigned char* r = matrix_step(site, {piece(src), piece(epr), piece(tr)}, sizeof e,
                                       [&](unsigned char* out) {
    T m[8][8];
    for (int row = 0; row < 8; ++row)
      for (int col = 0; col < 8; ++col) m[row][col] = src[matrix_index(row, col, epr, tr)];
    std::memcpy(out, m, sizeof m);
  });
  copy_bytes(&e, r, sizeof e);
}

template <typename T>
void matrix_store(int site, const matrix<T>& a, T* dst, ulong epr, ulong2 origin, bool tr) {
  check_origin(origin);
  const auto& e = matrix_access::elements(a);
  matrix_step(site, {piece(dst), piece(epr), piece(tr), piece(e)}, 0, [&](unsigned char*) {
    for (int row = 0; row < 8; ++row)
      for (int col = 0; col < 8; ++col) dst[matrix_index(row, col, epr, tr)] = e[row][col];
  });
}

// m = a b (+ c), accumulating in float.
template <typename T>
MSL_UNCHECKED void multiply(const T (&a)[8][8], const T (&b)[8][8], const T (*c)[8][8],
                            T (&m)[8][8]) {
  for (int row = 0; row < 8; ++row)
    for (int col = 0; col < 8; ++col) {
      float acc = c ? float((*c)[row][col]) : 0.0f;
      for (int k = 0; k < 8; ++k) acc += float(a[row][k]) * float(b[k][col]);
      m[row][col] = static_cast<T>(acc);
    }
}

template <typename T>
void matrix_mma(int site, matrix<T>& d, const matrix<T>& a, const matrix<T>& b,
                const matrix<T>* c) {
  const auto& ea = matrix_access::elements(a);
  const auto& eb = matrix_access::elements(b);
  auto& ed = matrix_access::elements(d);
  auto compute = [&](unsigned char* out) {
    T m[8][8];
    multiply(ea, eb, c ? &matrix_access::elements(*c) : nullptr, m);
    copy_bytes(out, m, sizeof m);
  };
  const unsigned char* r =
      c ? matrix_step(site, {piece(ea), piece(eb), piece(matrix_access::elements(*c))},
                      sizeof ed, compute)
        : matrix_step(site, {piece(ea), piece(eb)}, sizeof ed, compute);
  copy_bytes(&ed, r, sizeof ed);
}

}  // namespace msl

// ---------------------------------------------------------------------------------------------
// The Metal builtins kernels call
// ---------------------------------------------------------------------------------------------

namespace metal {

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) {
  return static_cast<mem_flags>(static_cast<int>(a) | static_cast<int>(b));
}

// Each call site gets its own id (the macros at the end of this file pass __COUNTER__), so
// threads waiting at two different barriers, or lanes at two different simdgroup operations,
// are reported as divergence instead of being matched up.
inline void threadgroup_barrier_at(int site, mem_flags) { msl::barrier(site); }
inline void simdgroup_barrier_at(int site, mem_flags) {
  msl::simd_op<int>(site, msl::op_barrier, 0);
}

#define MSL_SIMD_REDUCTION(name, op)                                           \
  template <typename V> V name##_at(int site, V v) { return msl::simd_op(site, op, v); }
MSL_SIMD_REDUCTION(simd_sum, msl::op_sum)
MSL_SIMD_REDUCTION(simd_product, msl::op_prod)
MSL_SIMD_REDUCTION(simd_max, msl::op_max)
MSL_SIMD_REDUCTION(simd_min, msl::op_min)
MSL_SIMD_REDUCTION(simd_and, msl::op_and)
MSL_SIMD_REDUCTION(simd_or, msl::op_or)
MSL_SIMD_REDUCTION(simd_xor, msl::op_xor)
MSL_SIMD_REDUCTION(simd_broadcast_first, msl::op_broadcast_first)
MSL_SIMD_REDUCTION(simd_prefix_inclusive_sum, msl::op_prefix_inclusive_sum)
MSL_SIMD_REDUCTION(simd_prefix_exclusive_sum, msl::op_prefix_exclusive_sum)
#undef MSL_SIMD_REDUCTION

#define MSL_SIMD_EXCHANGE(name, op)                                            \
  template <typename V> V name##_at(int site, V v, ushort arg) {               \
    return msl::simd_op(site, op, v, arg);                                     \
  }
MSL_SIMD_EXCHANGE(simd_shuffle, msl::op_shuffle)
MSL_SIMD_EXCHANGE(simd_shuffle_xor, msl::op_shuffle_xor)
MSL_SIMD_EXCHANGE(simd_shuffle_up, msl::op_shuffle_up)
MSL_SIMD_EXCHANGE(simd_shuffle_down, msl::op_shuffle_down)
MSL_SIMD_EXCHANGE(simd_broadcast, msl::op_broadcast)
#undef MSL_SIMD_EXCHANGE

inline bool simd_any_at(int site, bool v) { return msl::simd_op(site, msl::op_any, v); }
inline bool simd_all_at(int site, bool v) { return msl::simd_op(site, msl::op_all, v); }

// ---- simdgroup matrices ----

template <typename T, int Cols, int Rows>
class simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "Metal's simdgroup matrices are 8 x 8");
  static_assert(std::is_same<T, float>::value || std::is_same<T, half>::value ||
                    std::is_same<T, bfloat>::value,
                "simdgroup matrices hold float, half or bfloat");

 public:
  simdgroup_matrix() {  // uninitialised in Metal: NaN here, so using it shows
    for (auto& row : e_)
      for (T& x : row) x = static_cast<T>(std::numeric_limits<float>::quiet_NaN());
  }
  explicit simdgroup_matrix(T diagonal) {  // Metal's scalar constructor: a diagonal matrix
    for (int r = 0; r < 8; ++r)
      for (int c = 0; c < 8; ++c) e_[r][c] = r == c ? diagonal : static_cast<T>(0.0f);
  }

 private:
  T e_[8][8];  // [row][col]; every lane holds all of it, and nothing outside msl reads it
  friend struct msl::matrix_access;
};

typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

template <typename T, int Cols, int Rows>
simdgroup_matrix<T, Cols, Rows> make_filled_simdgroup_matrix(T value) {
  simdgroup_matrix<T, Cols, Rows> m;
  msl::matrix_access::fill(m, value);
  return m;
}

template <typename T>
void simdgroup_load_at(int site, simdgroup_matrix<T, 8, 8>& d, const T* src,
                       ulong elements_per_row = 8, ulong2 matrix_origin = ulong2(0),
                       bool transpose_matrix = false) {
  msl::matrix_load(site, d, src, elements_per_row, matrix_origin, transpose_matrix);
}

template <typename T>
void simdgroup_store_at(int site, const simdgroup_matrix<T, 8, 8>& a, T* dst,
                        ulong elements_per_row = 8, ulong2 matrix_origin = ulong2(0),
                        bool transpose_matrix = false) {
  msl::matrix_store(site, a, dst, elements_per_row, matrix_origin, transpose_matrix);
}

template <typename T>
void simdgroup_multiply_accumulate_at(int site, simdgroup_matrix<T, 8, 8>& d,
                                      const simdgroup_matrix<T, 8, 8>& a,
                                      const simdgroup_matrix<T, 8, 8>& b,
                                      const simdgroup_matrix<T, 8, 8>& c) {
  msl::matrix_mma(site, d, a, b, &c);
}

template <typename T>
void simdgroup_multiply_at(int site, simdgroup_matrix<T, 8, 8>& d,
                           const simdgroup_matrix<T, 8, 8>& a,
                           const simdgroup_matrix<T, 8, 8>& b) {
  msl::matrix_mma<T>(site, d, a, b, nullptr);
}

// ---- math ----
using std::abs;
using std::ceil;
using std::cos;
using std::exp;
using std::exp2;
using std::fabs;
using std::floor;
using std::fma;
using std::fmax;
using std::fmin;
using std::isfinite;
using std::isinf;
using std::isnan;
using std::log;
using std::log2;
using std::numeric_limits;
using std::pow;
using std::round;
using std::sin;
using std::sqrt;
using std::tanh;
using std::trunc;

inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline uint max(uint a, uint b) { return a > b ? a : b; }
inline uint min(uint a, uint b) { return a < b ? a : b; }
inline half max(half a, half b) { return a > b ? a : b; }
inline half min(half a, half b) { return a < b ? a : b; }
template <typename T> T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <typename T> T select(T a, T b, bool c) { return c ? b : a; }

template <typename To, typename From>
To as_type(const From& x) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs equal sizes");
  To r;
  std::memcpy(&r, &x, sizeof(To));
  return r;
}

namespace fast {
using std::exp;
using std::exp2;
using std::log;
using std::log2;
using std::sqrt;
using metal::max;
using metal::min;
using metal::rsqrt;
}  // namespace fast
namespace precise = fast;  // on a CPU both are the same functions

}  // namespace metal

using namespace metal;

// From MLX's kernels/utils.h, which MLX prepends to every custom kernel.
template <typename IdxT = int64_t>
inline IdxT elem_to_loc(IdxT elem, const constant int* shape, const constant int64_t* strides,
                        int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return loc;
}

#define threadgroup_barrier(flags) metal::threadgroup_barrier_at(__COUNTER__, flags)
#define simdgroup_barrier(flags) metal::simdgroup_barrier_at(__COUNTER__, flags)
#define simd_sum(v) metal::simd_sum_at(__COUNTER__, v)
#define simd_product(v) metal::simd_product_at(__COUNTER__, v)
#define simd_max(v) metal::simd_max_at(__COUNTER__, v)
#define simd_min(v) metal::simd_min_at(__COUNTER__, v)
#define simd_and(v) metal::simd_and_at(__COUNTER__, v)
#define simd_or(v) metal::simd_or_at(__COUNTER__, v)
#define simd_xor(v) metal::simd_xor_at(__COUNTER__, v)
#define simd_broadcast_first(v) metal::simd_broadcast_first_at(__COUNTER__, v)
#define simd_prefix_inclusive_sum(v) metal::simd_prefix_inclusive_sum_at(__COUNTER__, v)
#define simd_prefix_exclusive_sum(v) metal::simd_prefix_exclusive_sum_at(__COUNTER__, v)
#define simd_shuffle(v, lane) metal::simd_shuffle_at(__COUNTER__, v, lane)
#define simd_shuffle_xor(v, mask) metal::simd_shuffle_xor_at(__COUNTER__, v, mask)
#define simd_shuffle_up(v, delta) metal::simd_shuffle_up_at(__COUNTER__, v, delta)
#define simd_shuffle_down(v, delta) metal::simd_shuffle_down_at(__COUNTER__, v, delta)
#define simd_broadcast(v, lane) metal::simd_broadcast_at(__COUNTER__, v, lane)
#define simd_any(v) metal::simd_any_at(__COUNTER__, v)
#define simdgroup_load(...) metal::simdgroup_load_at(__COUNTER__, __VA_ARGS__)
#define simdgroup_store(...) metal::simdgroup_store_at(__COUNTER__, __VA_ARGS__)
#define simdgroup_multiply_accumulate(...) \
  metal::simdgroup_multiply_accumulate_at(__COUNTER__, __VA_ARGS__)
#define simdgroup_multiply(...) metal::simdgroup_multiply_at(__COUNTER__, __VA_ARGS__)
#define simd_all(v) metal::simd_all_at(__COUNTER__, v)
