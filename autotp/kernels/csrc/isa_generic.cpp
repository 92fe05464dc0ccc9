// The generic path: portable C++ for any CPU the compiler targets. It is the spec every other
// path is tested against (and checked against at first use), and what runs where no vector
// path does. A "register" here is one float; the compiler may vectorise the loops.
#include <algorithm>
#include <cstring>

#include "kernel_table.h"

namespace autotp {
namespace {

struct Int16Pair {  // INT8: a pair of K's weights or activations of one column
  int32_t lo, hi;
};

struct Scalar {
  using F = float;
  static constexpr int kWidth = 1;
  // decode attention's value sums: 128 dims of 4 heads per pass over the values (a register
  // here is a float; the compiler keeps what it can)
  static constexpr int kAttnAccumulators = 512;
  static constexpr int kTileM = 6;
  static constexpr int64_t kTileBlocks(int64_t) { return 4; }
  static constexpr int kDirectRows = 4, kPanelRows = 6, kPanelCols = 64;
  static constexpr int kDirectCols(int) { return 64; }

  static F zero() { return 0.0f; }
  static F load(const float* p) { return *p; }
  static void store(float* p, F v) { *p = v; }
  static F set1(float v) { return v; }
  static F fma(F a, F b, F c) { return a * b + c; }
  static F even(const uint16_t* p) { return bf16_to_float(p[0]); }
  static F odd(const uint16_t* p) { return bf16_to_float(p[1]); }
  static F mul(F a, F b) { return a * b; }
  using W = Int16Pair;
  using X = Int16Pair;
  using A = int32_t;
  static W wpair(const int8_t* p) { return {p[0], p[1]}; }
  static X xpair(const int16_t* p) { return {p[0], p[1]}; }
  static X xone(int16_t v) { return {v, 0}; }
  static X xsecond(int16_t v) { return {0, v}; }
  static A madd(X x, W w, A acc) { return acc + x.lo * w.lo + x.hi * w.hi; }  // exact: the spec's bound
  static A izero() { return 0; }
  static F to_float(A v) { return static_cast<float>(v); }
  static void prefetch(const void*) {}
  static float hsum(F v) { return v; }
  static F hsums(const F* v) { return v[0]; }
};

#include "gemm_tiles.h"
#include "int8_activations.h"
#include "attention_tiles.h"

// INT4, the spec (kernel_table.h): each weight (float(U - Z)) * S rounded once, x times it
// summed in K order, one output at a time; U read from the packed layout by its definition.
void int4_tile(const Int8GemmArgs& a, int64_t m0, int64_t m1, int64_t g0, int64_t g1) {
  alignas(64) float c[kInt8BlockM * kInt8MaxItemGroups * kInt8Group];
  const int64_t ldc = (g1 - g0) * kInt8Group, pairs = (a.K + 1) / 2;
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* q = a.q4 + g * pairs * 64;
    for (int64_t col = 0; col < kInt8Group; ++col) {
      const int64_t h = col / 32, i = col % 16, high = col % 32 / 16;
      for (int64_t m = m0; m < m1; ++m) {
        float acc = 0.0f;
        for (int64_t k = 0; k < a.K; ++k) {
          const int64_t t = (k + a.O) / a.G, at = (g * a.KG + t) * kInt8Group + col;
          const uint8_t byte = q[(k / 2) * 64 + 32 * h + 2 * i + k % 2];
          const int u = high ? byte >> 4 : byte & 15, zero = a.z ? a.z[at] : 8;
          acc += a.x[m * a.K + k] * (static_cast<float>(u - zero) * a.s[at]);
        }
        c[(m - m0) * ldc + (g - g0) * kInt8Group + col] = acc;
      }
    }
  }
  store_rows(c, ldc, m0, m1, g0 * kInt8Group, std::min(a.N, g1 * kInt8Group), a.bias, a.out, a.ldo, a.out_bf16);
}

void sum_bf16(const uint16_t* const* srcs, int64_t count, uint16_t* out, int64_t n) {
  float acc[1024];
  for (int64_t i0 = 0; i0 < n; i0 += 1024) {
    const int64_t m = std::min<int64_t>(1024, n - i0);
    for (int64_t i = 0; i < m; ++i) acc[i] = bf16_to_float(srcs[0][i0 + i]);
    for (int64_t s = 1; s < count; ++s)
      for (int64_t i = 0; i < m; ++i) acc[i] += bf16_to_float(srcs[s][i0 + i]);
    for (int64_t i = 0; i < m; ++i) out[i0 + i] = float_to_bf16(acc[i]);
  }
}

void sum_f32(const float* const* srcs, int64_t count, float* out, int64_t n) {
  if (out != srcs[0]) std::memmove(out, srcs[0], n * sizeof(float));
  for (int64_t s = 1; s < count; ++s)
    for (int64_t i = 0; i < n; ++i) out[i] += srcs[s][i];
}

// 8-byte words XORed in four chains (several loads in flight), the bytes past the last 32 one by one.
uint64_t stream_read(const uint8_t* data, int64_t bytes) {
  uint64_t a = 0, b = 0, c = 0, d = 0, w[4];
  int64_t i = 0;
  for (; i + 32 <= bytes; i += 32) {
    std::memcpy(w, data + i, 32);
    a ^= w[0], b ^= w[1], c ^= w[2], d ^= w[3];
  }
  uint64_t out = a ^ b ^ c ^ d;
  for (; i < bytes; ++i) out ^= data[i];
  return out;
}

bool always() { return true; }

}  // namespace

const KernelTable& generic_table() {
  static const KernelTable table{"generic", always, bf16_tile<Scalar>, nullptr, 0, 0, 0, 0, int8_tile<Scalar>, int4_tile, nullptr, sum_bf16, sum_f32,
                                 stream_read, attend_bf16_rows<Scalar>,
                                 int8_activation_rows<uint16_t>, int8_activation_rows<float>};
  return table;
}

}  // namespace autotp
