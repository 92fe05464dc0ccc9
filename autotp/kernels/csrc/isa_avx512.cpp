// The AVX-512 path (F, BW, DQ, VL; the tiles' FMAs on 16 fp32 lanes; the vector type in
// avx512_vector.h).
// Compiled only for x86-64; everything in it runs only where supported() says so.
#include "kernel_table.h"

#if AUTOTP_X86_TABLES

#include <immintrin.h>

#include <algorithm>

namespace autotp {
namespace {

bool supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,fma")

#include "avx512_vector.h"

#include "gemm_tiles.h"
#include "int8_activations.h"
#include "int4_tiles.h"
#include "attention_tiles.h"

// fp32 -> bf16, round to nearest even, NaN kept as a quiet NaN (as float_to_bf16 does).
inline __m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_blend_epi32(nan, rounded, _mm512_set1_epi32(0x7FC00000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

void sum_bf16(const uint16_t* const* srcs, int64_t count, uint16_t* out, int64_t n) {
  auto widen = [](__m256i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)); };
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1u);
    __m512 acc = widen(_mm256_maskz_loadu_epi16(mask, srcs[0] + i));
    for (int64_t s = 1; s < count; ++s) acc = _mm512_add_ps(acc, widen(_mm256_maskz_loadu_epi16(mask, srcs[s] + i)));
    _mm256_mask_storeu_epi16(out + i, mask, to_bf16(acc));
  }
}

void sum_f32(const float* const* srcs, int64_t count, float* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1u);
    __m512 acc = _mm512_maskz_loadu_ps(mask, srcs[0] + i);
    for (int64_t s = 1; s < count; ++s) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mask, srcs[s] + i));
    _mm512_mask_storeu_ps(out + i, mask, acc);
  }
}

// 64-byte loads, four in flight, XORed; what is left past the last 256 bytes goes to the
// generic loop, so both give the same XOR of every 8-byte word for any length.
uint64_t stream_read(const uint8_t* data, int64_t bytes) {
  __m512i a = _mm512_setzero_si512(), b = a, c = a, d = a;
  int64_t i = 0;
  for (; i + 256 <= bytes; i += 256) {
    a = _mm512_xor_si512(a, _mm512_loadu_si512(data + i));
    b = _mm512_xor_si512(b, _mm512_loadu_si512(data + i + 64));
    c = _mm512_xor_si512(c, _mm512_loadu_si512(data + i + 128));
    d = _mm512_xor_si512(d, _mm512_loadu_si512(data + i + 192));
  }
  a = _mm512_xor_si512(_mm512_xor_si512(a, b), _mm512_xor_si512(c, d));
  alignas(64) uint64_t lanes[8];
  _mm512_store_si512(lanes, a);
  uint64_t out = 0;
  for (uint64_t lane : lanes) out ^= lane;
  return out ^ generic_table().stream_read(data + i, bytes - i);
}

#pragma GCC pop_options

}  // namespace

const KernelTable& avx512_table() {
  static const KernelTable table{"avx512", supported, bf16_tile<Avx512>, nullptr, 0, 0, 0, 0, int8_tile<Avx512>, int4_tile<Avx512>, nullptr, sum_bf16, sum_f32,
                                 stream_read, attend_bf16_rows<Avx512>, int8_activation_rows<uint16_t>,
                                 int8_activation_rows<float>};
  return table;
}

}  // namespace autotp

#endif  // AUTOTP_X86_TABLES
