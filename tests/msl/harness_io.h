// Buffers in and out of a harness executable (see harness.py for the file layout).
// Every buffer is its own exact-size heap allocation, so AddressSanitizer flags any access
// outside it; shape and stride vectors too.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

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
  explicit Reader(const char* path) {
    FILE* f = std::fopen(path, "rb");
    if (!f) fail("cannot open the input file");
    std::fseek(f, 0, SEEK_END);
    buf_.resize(static_cast<size_t>(std::ftell(f)));
    std::fseek(f, 0, SEEK_SET);
    if (std::fread(buf_.data(), 1, buf_.size(), f) != buf_.size()) fail("short input file");
    std::fclose(f);
  }

  template <typename V>
  V get() {
    if (pos_ + sizeof(V) > buf_.size()) fail("input file truncated");
    V v;
    std::memcpy(&v, buf_.data() + pos_, sizeof(V));
    pos_ += sizeof(V);
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
    if (pos_ + a.bytes > buf_.size()) fail("input file truncated");
    std::memcpy(base, buf_.data() + pos_, a.bytes);
    pos_ += a.bytes;
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
  std::vector<char> buf_;
  size_t pos_ = 0;
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
