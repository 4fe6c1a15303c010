// Buffers in and out of a harness executable (see harness.py for the file layout).
// The input is read sequentially (a pipe works: harness.py streams it to /dev/stdin) straight
// into one exact-size heap allocation per buffer, so gigabyte-sized inputs cost their own size
// once, and AddressSanitizer flags any access outside a buffer; shape and stride vectors too.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

namespace msl {

template <typename T>
struct Array {
  T* data = nullptr;  // first element of the view
  int* shape = nullptr;
  int64_t* strides = nullptr;
  int ndim = 0;
  size_t bytes = 0;
};

class Reader {
 public:
  explicit Reader(const char* path) : f_(std::fopen(path, "rb")) {
    if (!f_) fail("cannot open the input file");
  }
  ~Reader() { std::fclose(f_); }

  void read(void* dst, size_t n) {
    if (n && std::fread(dst, 1, n, f_) != n) fail("input file truncated");
  }

  template <typename V>
  V get() {
    V v;
    read(&v, sizeof v);
    return v;
  }

  uint3 dims() {
    uint32_t x = get<uint32_t>(), y = get<uint32_t>(), z = get<uint32_t>();
    return uint3(x, y, z);
  }

  template <typename T>
  Array<T> input() {
    Array<T> a;
    a.ndim = get<int32_t>();
    a.bytes = static_cast<size_t>(get<int64_t>());
    int64_t offset = get<int64_t>();
    a.shape = static_cast<int*>(std::malloc(sizeof(int) * (a.ndim ? a.ndim : 1)));
    a.strides = static_cast<int64_t*>(std::malloc(sizeof(int64_t) * (a.ndim ? a.ndim : 1)));
    for (int i = 0; i < a.ndim; ++i) a.shape[i] = get<int32_t>();
    for (int i = 0; i < a.ndim; ++i) a.strides[i] = get<int64_t>();
    char* base = static_cast<char*>(std::malloc(a.bytes));
    read(base, a.bytes);
    a.data = reinterpret_cast<T*>(base) + offset;
    return a;
  }

  template <typename T>
  Array<T> output() {
    Array<T> a;
    a.bytes = static_cast<size_t>(get<int64_t>());
    int32_t has_init = get<int32_t>();
    double init = get<double>();
    a.data = static_cast<T*>(std::malloc(a.bytes));
    size_t n = a.bytes / sizeof(T);
    if (has_init) {
      for (size_t i = 0; i < n; ++i) a.data[i] = static_cast<T>(init);
    } else if (std::is_integral<T>::value) {
      std::memset(a.data, 0xA5, a.bytes);  // garbage, and never a valid id such as -1
    } else {
      T nan = static_cast<T>(std::numeric_limits<float>::quiet_NaN());
      for (size_t i = 0; i < n; ++i) a.data[i] = nan;
    }
    return a;
  }

 private:
  FILE* f_;
};

class Writer {
 public:
  explicit Writer(const char* path) : f_(std::fopen(path, "wb")) {
    if (!f_) fail("cannot open the output file");
  }
  ~Writer() { std::fclose(f_); }
  template <typename T>
  void put(const Array<T>& a) {
    if (std::fwrite(a.data, 1, a.bytes, f_) != a.bytes) fail("cannot write an output");
  }

 private:
  FILE* f_;
};

}  // namespace msl
