// The AVX2 path (AVX2 + FMA: 8 fp32 lanes, 16 ymm registers), for x86-64 CPUs without AVX-512
// (AMD Zen 1-3, Intel before Skylake-SP and many client parts). bf16 widens to fp32 in
// registers as on AVX-512 (a shift for the even-K values, a mask for the odd ones); INT8
// multiplies int16 pairs (vpmaddwd, the spec's integer products). Tiles are smaller than AVX-512's to fit 16 registers. The all-reduce
// sums are the generic ones (memory-bound; the compiler vectorises them); the read probe has its own loop.
#include "kernel_table.h"

#if AUTOTP_X86_TABLES

#include <immintrin.h>

#include <algorithm>

namespace autotp {
namespace {

bool supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

#pragma GCC push_options
#pragma GCC target("avx2,fma")

struct Avx2 {
  using F = __m256;
  static constexpr int kWidth = 8;
  static constexpr int kAttnAccumulators = 8;  // decode attention's value sums in registers
  // 4 rows x 1 block (2 registers): 8 accumulators + 2 weights + 1 broadcast; one row takes a
  // whole group (8 accumulators, 8 weights), so decoding reads each 256-byte row once; two
  // rows take two blocks (8 accumulators, 4 weights).
  static constexpr int kTileM = 4;
  static constexpr int64_t kTileBlocks(int64_t mt) { return mt == 1 ? 4 : mt == 2 ? 2 : 1; }
  // 2-4 rows thus need several calls per group, and walk K in chunks of kFewChunkPairs
  // (gemm_tiles.h) rather than the whole K once per block with a 256-byte stride. Measured on
  // Zen 3 (1 thread, 2816 x 2048 and 2048 x 2816, medians, time over the 1-row time of the
  // same process): 2 rows 1.32-1.42x -> 1.16-1.28x; 3-4 rows unchanged within noise
  // (compute-bound: an fp32 FMA per weight per row).
  static constexpr int kDirectRows = 4, kPanelRows = 4, kPanelCols = 16;
  // INT8 columns per pass over a group's K for mt rows: 8 accumulators (one row takes the whole
  // 64-column group, so its 64-byte weight rows are read and interleaved once; 4 rows take 16
  // columns, each weight pair still interleaved once for all of them)
  static constexpr int kDirectCols(int mt) { return mt == 1 ? 64 : mt == 2 ? 32 : 16; }

  static F zero() { return _mm256_setzero_ps(); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F even(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), 16));
  }
  static F odd(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
                                                _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  // INT8 (gemm_tiles.h): 8 columns' pairs of K (16 bytes of a packed pair row) widened to int16
  // pairs; vpmaddwd multiplies them by a broadcast activation pair: 16 exact products into 8
  // int32 sums
  using W = __m256i;
  using X = __m256i;
  using A = __m256i;
  static W wpair(const int8_t* p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static X xpair(const int16_t* p) {
    int32_t v;
    __builtin_memcpy(&v, p, sizeof(v));
    return _mm256_set1_epi32(v);
  }
  static X xone(int16_t v) { return _mm256_set1_epi32(static_cast<uint16_t>(v)); }
  static X xsecond(int16_t v) {
    return _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(static_cast<uint16_t>(v)) << 16));
  }
  static A madd(X x, W w, A acc) { return _mm256_add_epi32(acc, _mm256_madd_epi16(x, w)); }
  static A izero() { return _mm256_setzero_si256(); }
  // INT4 (int4_tiles.h): 8 words = one block of a pair of K rows
  using I = __m256i;
  static I load_words(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I srli(I v, int n) { return _mm256_srli_epi32(v, n); }
  static F magic(I v, uint32_t mask) {
    return _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(mask))),
                                               _mm256_set1_epi32(0x4B000000)));
  }
  static I and_i(I v, int n) { return _mm256_and_si256(v, _mm256_set1_epi32(n)); }
  static F to_float(I v) { return _mm256_cvtepi32_ps(v); }
  static I widen_pairs(const uint8_t* p) {
    const __m256i even_first = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    return _mm256_permutevar8x32_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))),
                                       even_first);
  }
  static F bcast_half(const float* p) { return _mm256_broadcast_ps(reinterpret_cast<const __m128*>(p)); }
  static void store_halves(float* row0, float* row1, F v) {
    if (row0) _mm_storeu_ps(row0, _mm256_castps256_ps128(v));
    if (row1) _mm_storeu_ps(row1, _mm256_extractf128_ps(v, 1));
  }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static float hsum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  // lane i = the sum of v[i]'s lanes, for 8 registers at once
  static F hsums(const F* v) {
    F a[4];
    for (int i = 0; i < 4; ++i)  // lanes 0-3: v[2i]'s two 128-bit halves added; 4-7: v[2i+1]'s
      a[i] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x20),
                           _mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x31));
    const F g = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    // g's lanes: v0, v2, v4, v6 | v1, v3, v5, v7
    return _mm256_permutevar8x32_ps(g, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
};

#include "gemm_tiles.h"
#include "int8_activations.h"
#include "int4_tiles.h"
#include "attention_tiles.h"

// The read probe: 32-byte loads, four in flight, XORed; the tail past the last 128 bytes goes to
// the generic loop, so both give the same XOR of every 8-byte word for any length. The generic
// loop's 8-byte words read 11.5-13.1 GB/s per core where this reads 17.1-18.6 (AMD EPYC Zen 3,
// two processes on both cores reading 512 MB at once, medians of 21), below the 14.3 GB/s this
// table's own bf16 GEMM streams: a floor set by it was no floor. A software prefetch (1 or 4 KB
// ahead) lowered it to 12-14 GB/s there.
uint64_t stream_read(const uint8_t* data, int64_t bytes) {
  __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
  int64_t i = 0;
  for (; i + 128 <= bytes; i += 128) {
    a = _mm256_xor_si256(a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(data + i)));
    b = _mm256_xor_si256(b, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(data + i + 32)));
    c = _mm256_xor_si256(c, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(data + i + 64)));
    d = _mm256_xor_si256(d, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(data + i + 96)));
  }
  a = _mm256_xor_si256(_mm256_xor_si256(a, b), _mm256_xor_si256(c, d));
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), a);
  return lanes[0] ^ lanes[1] ^ lanes[2] ^ lanes[3] ^ generic_table().stream_read(data + i, bytes - i);
}

#pragma GCC pop_options

}  // namespace

const KernelTable& avx2_table() {
  static const KernelTable table{"avx2", supported, bf16_tile<Avx2>, nullptr, 0, 0, 0, 0, int8_tile<Avx2>, int4_tile<Avx2>, nullptr, generic_table().sum_bf16,
                                 generic_table().sum_f32, stream_read, attend_bf16_rows<Avx2>,
                                 int8_activation_rows<uint16_t>, int8_activation_rows<float>};
  return table;
}

}  // namespace autotp

#endif  // AUTOTP_X86_TABLES
