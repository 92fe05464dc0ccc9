// Per-thread scratch for the ops' temporary buffers (ops.cpp). Included by ops.cpp only.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace autotp {

// Scratch for an op's temporary buffers, kept by the calling thread from call to call: a decode
// step makes each linear op a few hundred times, and at::empty's aligned allocation of its
// temporaries (glibc's memalign) and their tensor objects cost more than the small GEMMs' own
// work around them. Up to kMaxBytes are kept (decode sizes: a few rows); a larger request gets
// a buffer of its own, freed with the Regions that hold it, so that a long prompt does not pin
// its buffers. Regions are 64-byte aligned. An op takes the thread's scratch once (the parallel
// workers only read it) and calls no other op that takes it while it holds its pointers.
template <size_t N>
struct Regions {
  std::array<char*, N> ptr;
  at::Tensor owner;  // a larger request's own buffer; undefined: the thread's kept scratch
};

class Scratch {
 public:
  static constexpr size_t kMaxBytes = size_t{1} << 20;

  // A region for each of `sizes` (bytes), valid until this thread's next take() (or, for a
  // request over kMaxBytes, while the returned owner lives)
  template <size_t N>
  Regions<N> take(const std::array<size_t, N>& sizes) {
    size_t total = 0;
    std::array<size_t, N> offsets{};
    for (size_t i = 0; i < N; ++i) {
      offsets[i] = total;
      total += (sizes[i] + 63) / 64 * 64;
    }
    Regions<N> out;
    char* base;
    if (total > kMaxBytes) {
      out.owner = at::empty({static_cast<int64_t>(total) + 64}, at::TensorOptions().dtype(at::kByte));
      base = align(static_cast<char*>(out.owner.data_ptr()));
    } else {
      if (kept_.size() < kMaxBytes + 64) kept_.resize(kMaxBytes + 64);
      base = align(kept_.data());
    }
    for (size_t i = 0; i < N; ++i) out.ptr[i] = base + offsets[i];
    return out;
  }

  static Scratch& of_this_thread() {
    thread_local Scratch scratch;
    return scratch;
  }

 private:
  static char* align(char* p) {
    return reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(p) + 63) / 64 * 64);
  }
  std::vector<char> kept_;
};

}  // namespace autotp
