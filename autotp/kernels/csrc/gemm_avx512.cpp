// AVX-512 micro-kernels of the BF16 GEMM (layout in gemm_avx512.h).
//
// BF16 is the top half of an fp32, so a packed row (a K pair for 16 columns) widens to fp32
// with two integer ops: shifting each 32-bit lane left by 16 gives the even-K values, masking
// off the low half gives the odd-K values. Each is multiplied by a broadcast activation and
// accumulated in fp32. Only this file is compiled for AVX-512; callers check cpu_supported().
#include "gemm_avx512.h"

#include <immintrin.h>

#include <algorithm>

namespace autotp::avx512 {

bool cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,fma")

namespace {

constexpr int64_t kPrefetchRows = 16;

// fp32 -> bf16, round to nearest even, NaN kept as a quiet NaN (as c10::BFloat16 does).
inline __m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_blend_epi32(nan, rounded, _mm512_set1_epi32(0x7FC00000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

// acc[i][j] (+)= sum over `pairs` K pairs of x[i, 2p + s] * W[block j, p, s], for MT rows of x
// (row stride ldx) and the first NB blocks of the packed group at w.
template <int MT, int NB>
void micro(const float* x, int64_t ldx, const uint16_t* w, int64_t pairs,
           float* c, int64_t ldc, bool accumulate) {
  __m512 acc[MT][NB];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NB; ++j)
      acc[i][j] = accumulate ? _mm512_loadu_ps(c + i * ldc + j * kBlockN)
                             : _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  // Even K first, then odd K, so that only NB weight registers are live next to the MT x NB
  // accumulators (6 x 4 + 4 + 1 broadcast fits the 32 zmm registers without spilling).
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* row = w + p * kGroupRow;
    // Software prefetch 4 KB ahead: measured 5-10% faster than the hardware prefetcher alone
    // when the weight streams from memory (decoding).
    for (int j = 0; j < NB; ++j)
      _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchRows * kGroupRow + j * kRowElems), _MM_HINT_T0);
    __m512 wv[NB];
    for (int j = 0; j < NB; ++j)
      wv[j] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512(row + j * kRowElems), 16));
    for (int i = 0; i < MT; ++i) {
      const __m512 xv = _mm512_set1_ps(x[i * ldx + 2 * p]);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
    for (int j = 0; j < NB; ++j)
      wv[j] = _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512(row + j * kRowElems), high));
    for (int i = 0; i < MT; ++i) {
      const __m512 xv = _mm512_set1_ps(x[i * ldx + 2 * p + 1]);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NB; ++j)
      _mm512_storeu_ps(c + i * ldc + j * kBlockN, acc[i][j]);
}

using MicroFn = void (*)(const float*, int64_t, const uint16_t*, int64_t, float*, int64_t, bool);

template <int MT>
MicroFn pick_nb(int64_t nb) {
  switch (nb) {
    case 1: return micro<MT, 1>;
    case 2: return micro<MT, 2>;
    case 3: return micro<MT, 3>;
    default: return micro<MT, 4>;
  }
}

MicroFn pick(int64_t mt, int64_t nb) {
  switch (mt) {
    case 1: return pick_nb<1>(nb);
    case 2: return pick_nb<2>(nb);
    case 3: return pick_nb<3>(nb);
    case 4: return pick_nb<4>(nb);
    case 5: return pick_nb<5>(nb);
    default: return pick_nb<6>(nb);
  }
}

}  // namespace

void gemm_tile(const GemmArgs& a, int64_t m0, int64_t m1, int64_t b0, int64_t b1) {
  static_assert(kTileM <= 6 && kGroupBlocks == 4, "pick() covers 1..6 rows and 1..4 blocks");
  alignas(64) float c[kBlockM * kMaxItemBlocks * kBlockN];
  const int64_t ldx = 2 * a.K2, ldc = (b1 - b0) * kBlockN;
  const int64_t chunk = (m1 - m0) <= kTileM ? a.K2 : kChunkPairs;
  for (int64_t p0 = 0; p0 < a.K2; p0 += chunk) {
    const int64_t pairs = std::min(chunk, a.K2 - p0);
    for (int64_t g = b0; g < b1; g += kGroupBlocks) {
      const int64_t nb = std::min(kGroupBlocks, b1 - g);
      const uint16_t* w = a.w + (g / kGroupBlocks * a.K2 + p0) * kGroupRow;
      for (int64_t m = m0; m < m1; m += kTileM) {
        pick(std::min(kTileM, m1 - m), nb)(a.x + m * ldx + 2 * p0, ldx, w, pairs,
                                            c + (m - m0) * ldc + (g - b0) * kBlockN, ldc, p0 > 0);
      }
    }
  }
  store_rows(c, ldc, m0, m1, b0 * kBlockN, std::min(a.N, b1 * kBlockN), a.bias, a.out, a.ldo, a.out_bf16);
}

void store_rows(const float* c, int64_t ldc, int64_t m0, int64_t m1, int64_t n0, int64_t n1, const float* bias,
                void* out, int64_t ldo, bool out_bf16) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* crow = c + (m - m0) * ldc;
    for (int64_t n = n0; n < n1; n += kBlockN) {
      const int64_t valid = std::min<int64_t>(kBlockN, n1 - n);
      const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
      __m512 v = _mm512_maskz_loadu_ps(mask, crow + (n - n0));
      if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + n));
      if (out_bf16) {
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + m * ldo + n, mask, to_bf16(v));
      } else {
        _mm512_mask_storeu_ps(static_cast<float*>(out) + m * ldo + n, mask, v);
      }
    }
  }
}

void sum_bf16(const uint16_t* const* srcs, int64_t count, uint16_t* out, int64_t n) {
  int64_t i = 0;
  auto widen = [](__m256i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)); };
  for (; i + 16 <= n; i += 16) {
    __m512 acc = widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(srcs[0] + i)));
    for (int64_t s = 1; s < count; ++s)
      acc = _mm512_add_ps(acc, widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(srcs[s] + i))));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), to_bf16(acc));
  }
  if (i < n) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (n - i)) - 1u);
    __m512 acc = widen(_mm256_maskz_loadu_epi16(mask, srcs[0] + i));
    for (int64_t s = 1; s < count; ++s) acc = _mm512_add_ps(acc, widen(_mm256_maskz_loadu_epi16(mask, srcs[s] + i)));
    _mm256_mask_storeu_epi16(out + i, mask, to_bf16(acc));
  }
}

void sum_f32(const float* const* srcs, int64_t count, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 acc = _mm512_loadu_ps(srcs[0] + i);
    for (int64_t s = 1; s < count; ++s) acc = _mm512_add_ps(acc, _mm512_loadu_ps(srcs[s] + i));
    _mm512_storeu_ps(out + i, acc);
  }
  if (i < n) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (n - i)) - 1u);
    __m512 acc = _mm512_maskz_loadu_ps(mask, srcs[0] + i);
    for (int64_t s = 1; s < count; ++s) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mask, srcs[s] + i));
    _mm512_mask_storeu_ps(out + i, mask, acc);
  }
}

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
  for (uint64_t lane : lanes) out ^= lane;  // the XOR of every 8-byte word: what the portable loop gives
  for (; i < bytes; ++i) out ^= data[i];
  return out;
}

#pragma GCC pop_options

}  // namespace autotp::avx512
