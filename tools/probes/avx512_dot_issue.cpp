// A standalone probe (not built by the project): how many 512-bit dot-product instructions a
// core retires per second, alone and mixed, and what that allows the INT8 GEMM with 4 rows of
// int16 activations (beam search's 4 beams). Each loop keeps its accumulators in fixed
// registers (plain asm, no operands): with the accumulators in a C array GCC 12 at -O2 kept them
// on the stack, and the store-to-load round trip of each then set the pace (1.6-1.8 G
// vpdpwssd/s instead of 3.65 on an AMD EPYC Zen 4: the "wrong microbenchmark" of an earlier
// session).
//
//   g++ -O3 -march=x86-64-v4 -mavx512vnni -mavx512bf16 -o /tmp/dot_issue tools/probes/avx512_dot_issue.cpp
//   /tmp/dot_issue
//
// Prints G instructions/s per kind and mix, then weight GB/s of a 4-row x 64-column INT8 loop
// (vpmovsxbw + vpdpwssd over the packed pair rows) replayed from L1, L2 and streamed from
// memory (64 MB), with and without a software prefetch. Needs AVX512F + VNNI (checked at
// start) and builds for them; the bf16 kind runs only where AVX512-BF16 is.
//
// AMD EPYC Zen 4 (2026-12-06): vpdpwssd, vpdpbusd, vfmadd231ps and vdpbf16ps each 3.65 G/s
// alone (one a cycle) and 3.65 G/s together in any mix (16 vpdpwssd + 8 FMAs: 2.43 + 1.22), so
// they share one 512-bit issue slot and no other unit is left to take part of the products; the
// 4-row loop 28-29 GB/s from L1 / L2 (its 16 vpdpwssd a 128-byte pair row at one a cycle),
// 25.7 GB/s from memory without the prefetch, 22.6 with it, one process. (With both cores
// streaming at once, the extension's 4-row tile without its prefetch gave 16.8-22.7 GB/s against
// 21.3-21.9 with it: it keeps its prefetch.) The bound: 32 int16 products a cycle, 4 rows of a
// weight byte each, is 8 weight bytes a cycle (29 GB/s at 3.65 GHz), at or under what memory
// gives one core here, so INT8 with 4 rows of int16 activations cannot run at the memory floor
// on this CPU; 8-bit activations (vpdpbusd, 64 products a cycle) can.
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <initializer_list>

#define REPEAT4(s) s s s s
#define DP(r) "vpdpwssd %%zmm31, %%zmm30, %%zmm" #r "\n\t"
#define DB(r) "vpdpbusd %%zmm31, %%zmm30, %%zmm" #r "\n\t"
#define FMA(r) "vfmadd231ps %%zmm29, %%zmm28, %%zmm" #r "\n\t"
#define BF(r) "vdpbf16ps %%zmm27, %%zmm26, %%zmm" #r "\n\t"
#define SIXTEEN(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11) M(12) M(13) M(14) M(15)
#define EIGHT_HI(M) M(16) M(17) M(18) M(19) M(20) M(21) M(22) M(23)

static void clear_inputs() {
  asm volatile(
      "vpxord %%zmm26, %%zmm26, %%zmm26\n\tvpxord %%zmm27, %%zmm27, %%zmm27\n\t"
      "vpxord %%zmm28, %%zmm28, %%zmm28\n\tvpxord %%zmm29, %%zmm29, %%zmm29\n\t"
      "vpxord %%zmm30, %%zmm30, %%zmm30\n\tvpxord %%zmm31, %%zmm31, %%zmm31" ::: "memory");
}

template <class Body>
static double per_second(long iterations, Body body) {
  clear_inputs();
  const auto start = std::chrono::steady_clock::now();
  for (long i = 0; i < iterations; ++i) body();
  return iterations / std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

__attribute__((target("avx512f,avx512vnni"))) static void dp16() { asm volatile(SIXTEEN(DP) ::: "memory"); }
__attribute__((target("avx512f,avx512vnni"))) static void db16() { asm volatile(SIXTEEN(DB) ::: "memory"); }
__attribute__((target("avx512f"))) static void fma16() { asm volatile(SIXTEEN(FMA) ::: "memory"); }
__attribute__((target("avx512f,avx512bf16"))) static void bf16x16() { asm volatile(SIXTEEN(BF) ::: "memory"); }
__attribute__((target("avx512f,avx512vnni"))) static void dp16_fma8() {
  asm volatile(SIXTEEN(DP) EIGHT_HI(FMA) ::: "memory");
}
__attribute__((target("avx512f,avx512vnni,avx512bf16"))) static void dp16_bf8() {
  asm volatile(SIXTEEN(DP) EIGHT_HI(BF) ::: "memory");
}

// (the extension's form: the asm on a by-value copy; on the array element itself GCC keeps the
// array in memory)
static inline __m512i dpwssd(__m512i acc, __m512i x, __m512i w) {
  asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w));
  return acc;
}

// 4 rows x 64 columns over `pairs` packed pair rows (128 bytes: 64 columns' (k, k + 1) bytes),
// x as int16 pairs per row, the INT8 few-row tile's inner loop
template <int kPrefetch>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"), noinline)) static void four_rows(
    const int8_t* q, int64_t pairs, const int16_t* x, int64_t ldx, int32_t* out) {
  __m512i acc[4][4];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_si512();
  for (int64_t p = 0; p < pairs; ++p) {
    const int8_t* row = q + p * 128;
    if (kPrefetch) {
      _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetch * 128), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetch * 128 + 64), _MM_HINT_T0);
    }
    __m512i w[4];
    for (int r = 0; r < 4; ++r)
      w[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * r)));
    for (int i = 0; i < 4; ++i) {
      int32_t pair;
      std::memcpy(&pair, x + i * ldx + 2 * (p & 1023), sizeof(pair));
      const __m512i xv = _mm512_set1_epi32(pair);
      for (int r = 0; r < 4; ++r) acc[i][r] = dpwssd(acc[i][r], xv, w[r]);
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int r = 0; r < 4; ++r) _mm512_storeu_si512(out + 64 * i + 16 * r, acc[i][r]);
}

int main() {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512vnni")) {
    std::puts("this CPU has no AVX512-VNNI: nothing to probe");
    return 0;
  }
  const bool bf16 = __builtin_cpu_supports("avx512bf16");
  const long n = 20000000;
  for (int round = 0; round < 2; ++round) {
    std::printf("round %d, G instructions/s:\n", round + 1);
    std::printf("  16 vpdpwssd               %.2f\n", 16 * per_second(n, dp16) / 1e9);
    std::printf("  16 vpdpbusd               %.2f\n", 16 * per_second(n, db16) / 1e9);
    std::printf("  16 vfmadd231ps            %.2f\n", 16 * per_second(n, fma16) / 1e9);
    if (bf16) std::printf("  16 vdpbf16ps              %.2f\n", 16 * per_second(n, bf16x16) / 1e9);
    const double mixed = per_second(n, dp16_fma8);
    std::printf("  16 vpdpwssd + 8 FMA       %.2f + %.2f\n", 16 * mixed / 1e9, 8 * mixed / 1e9);
    if (bf16) {
      const double with_bf = per_second(n, dp16_bf8);
      std::printf("  16 vpdpwssd + 8 vdpbf16ps %.2f + %.2f\n", 16 * with_bf / 1e9, 8 * with_bf / 1e9);
    }
  }
  const int64_t big = int64_t{64} << 20;
  auto* weights = static_cast<int8_t*>(std::aligned_alloc(64, big));
  for (int64_t i = 0; i < big; ++i) weights[i] = static_cast<int8_t>(i * 7);
  static int16_t x[4][2048];
  for (int i = 0; i < 4; ++i)
    for (int k = 0; k < 2048; ++k) x[i][k] = static_cast<int16_t>(k * 31 - i);
  alignas(64) static int32_t out[256];
  std::puts("4 rows x 64 columns, int16 activations, weight GB/s (best of 5):");
  for (const int64_t bytes : {int64_t{16} << 10, int64_t{512} << 10, big}) {
    const int64_t pairs = bytes / 128, passes = std::max<int64_t>(1, (int64_t{2} << 30) / bytes);
    double best[2] = {0, 0};
    for (int rep = 0; rep < 5; ++rep)
      for (int pf = 0; pf < 2; ++pf) {
        const auto start = std::chrono::steady_clock::now();
        for (int64_t i = 0; i < passes; ++i)
          (pf ? four_rows<16> : four_rows<0>)(weights, pairs - 16, &x[0][0], 2048, out);
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        best[pf] = std::max(best[pf], passes * (pairs - 16) * 128.0 / s / 1e9);
      }
    std::printf("  %8lld KB: no prefetch %.1f, prefetch 2 KB ahead %.1f\n", static_cast<long long>(bytes >> 10),
                best[0], best[1]);
  }
  std::free(weights);
  return out[0] == 42;  // (keeps the results alive)
}
