// Weight-only INT8 GEMM for CPUs with AVX-512 (F, BW, DQ, VL): int8 weights with fp32 scales
// per (output channel, group of G input columns), activations and accumulation in fp32.
//
// The product it computes (the spec the torch fallback and the tests share):
//   y[m, n] = bias[n] + sum over k of x[m, k] * (float(Q[n, k]) * S[n, (k + O) / G])
// with each dequantised weight float(Q) * S rounded to fp32 once, summed in K order. The
// group offset O (0 <= O < G) lets a row-parallel shard that starts inside a group of the
// whole weight keep the whole weight's groups and scales: O is its first column's place in
// its group.
//
// Packed layouts (shared with the registration code and the Python side):
//   weight Q [N, K] int8  -> [NG, K, 64] int8,   element (g, k, c) = Q[64 g + c, k]
//   scales S [N, KG] fp32 -> [NG, KG, 64] fp32,  element (g, t, c) = S[64 g + c, t]
// NG = ceil(N / 64), KG = ceil((K + O) / G); zero past N. A group of 64 output columns is one
// contiguous stream of 64-byte rows, one per K: half the bytes of the bf16 layout.
#pragma once

#include <cstdint>

namespace autotp::avx512 {

struct Int8GemmArgs {
  const float* x;      // activations as fp32, [M, K]
  const int8_t* q;     // packed weight, [NG, K, 64]
  const float* s;      // packed scales, [NG, KG, 64]
  const float* bias;   // [N] or nullptr
  void* out;           // [M, N] with row stride ldo, bf16 or fp32
  int64_t M, N, K, G, O, KG, ldo;
  bool out_bf16;
};

constexpr int64_t kInt8Group = 64;        // output columns per packed group
constexpr int64_t kInt8MaxItemGroups = 4; // packed groups (256 columns) per unit of work
constexpr int64_t kInt8BlockM = 96;       // activation rows per unit of work
constexpr int64_t kInt8DirectM = 4;       // up to this many rows, convert weights in registers

// Computes rows [m0, m1) (at most kInt8BlockM) and packed groups [g0, g1) (at most
// kInt8MaxItemGroups) of the output. Up to kInt8DirectM rows, each weight row is widened,
// scaled and used in registers; with more, a chunk of K is dequantised once into an fp32
// panel in cache that every row tile then reads (the same products, in the same order).
void gemm_int8_tile(const Int8GemmArgs& a, int64_t m0, int64_t m1, int64_t g0, int64_t g1);

}  // namespace autotp::avx512
