// The AVX512-BF16 path (Cooper Lake, Sapphire Rapids and later Xeons, AMD Zen 4 and later):
// vdpbf16ps multiplies a register of 16 bf16 pairs by a broadcast activation pair and adds both
// products to 16 fp32 lanes in one instruction, where the AVX-512 path widens the weights and
// issues two FMAs. The packed group rows are already the pairs it reads (kernel_table.h), so the
// weight streams as it is; the activations must be bf16 (an fp32 activation has no exact bf16
// pair), so this table has only the bf16-activation tile and leaves fp32 activations and INT8
// to the AVX-512 table below it. vdpbf16ps treats denormal inputs as zero and flushes denormal
// sums (below 1.2e-38): the only way it can differ from the generic path beyond summation order.
#include "kernel_table.h"

#if AUTOTP_X86_TABLES

#include <immintrin.h>

#include <algorithm>
#include <cstring>

namespace autotp {
namespace {

bool supported() {
  __builtin_cpu_init();
  return avx512_table().supported() && __builtin_cpu_supports("avx512bf16");
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma")

#include "avx512_vector.h"

#include "avx512_bf16_attention.h"

// acc[i][j] (+)= sum over `pairs` K pairs of x[i, 2p + s] * W[block j, p, s]: MT rows of bf16
// x (row stride ldx), NB blocks of the group rows at w. 6 x 4 accumulators, 4 weights, 1 pair.
template <int MT, int NB>
void dot_micro(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t pairs, float* c, int64_t ldc,
               bool accumulate) {
  __m512 acc[MT][NB];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = accumulate ? _mm512_loadu_ps(c + i * ldc + j * kBlockN) : _mm512_setzero_ps();
  const bool ahead = weight_prefetch();
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* row = w + p * kGroupRow;
    __m512bh wv[NB];
    for (int j = 0; j < NB; ++j) {
      if (ahead) _mm_prefetch(reinterpret_cast<const char*>(row + 16 * kGroupRow + j * kRowElems), _MM_HINT_T0);
      wv[j] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(row + j * kRowElems));
    }
    for (int i = 0; i < MT; ++i) {
      int32_t pair;
      std::memcpy(&pair, x + i * ldx + 2 * p, sizeof(pair));
      const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NB; ++j) _mm512_storeu_ps(c + i * ldc + j * kBlockN, acc[i][j]);
}

using DotFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, float*, int64_t, bool);

template <int MT>
DotFn pick_nb(int64_t nb) {
  switch (nb) {
    case 1: return dot_micro<MT, 1>;
    case 2: return dot_micro<MT, 2>;
    case 3: return dot_micro<MT, 3>;
    default: return dot_micro<MT, 4>;
  }
}

struct DotMicro {
  using X = uint16_t;
  static constexpr int kTileM = 6;
  // Whole K (up to 2048 pairs: a 512 KB group panel, in L2) per pass: the 24 accumulators stay
  // in registers, and vdpbf16ps is fed fast enough from L2. Measured on Zen 4 (1 thread, 4096 x
  // 4096 and 11008, M 16-256): chunks of 64-256 pairs 0.83-0.97x oneDNN, 1024-8192 0.96-1.15x.
  static constexpr int64_t kChunkPairs = 2048;
  static constexpr int64_t kTileBlocks(int64_t) { return 4; }
  static DotFn pick(int64_t mt, int64_t nb) {
    switch (mt) {
      case 1: return pick_nb<1>(nb);
      case 2: return pick_nb<2>(nb);
      case 3: return pick_nb<3>(nb);
      case 4: return pick_nb<4>(nb);
      case 5: return pick_nb<5>(nb);
      default: return pick_nb<6>(nb);
    }
  }
};

#include "gemm_tiles.h"
#include "attention_tiles.h"

void bf16x_tile(const GemmArgs& a, int64_t m0, int64_t m1, int64_t b0, int64_t b1) {
  bf16_drive<DotMicro>(a, a.xb, m0, m1, b0, b1);
}

// INT4 weights, bf16 activations (the packed layout: kernel_table.h). A block of 32 bytes
// widened to 16-bit words holds in its low nibbles the (k even, k odd) pairs of 16 columns and
// in its high nibbles those of the next 16; each nibble indexes a table of the 16 bf16 values
// u - 8 (vpermw), exact, and vdpbf16ps multiplies the pairs by the activation pair: per 64
// weights one widening, one mask or shift, two lookups and two dot products. Per group t the
// fp32 sums part = sum x * (u - 8) become, for zero points z, part + (8 - z) * sum x (the
// activations' sum over the group), and are scaled once: acc += part * S.
template <int MT>
void int4x_rows(const uint16_t* x, int64_t ldx, const uint8_t* q, const float* s, const uint8_t* z, int64_t K,
                int64_t G, int64_t O, float* out, int64_t ldo) {
  alignas(64) static const uint16_t table[32] = {
      0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,  // -8 .. -1
      0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,  //  0 .. 7
      0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,
      0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0};
  const __m512i lut = _mm512_load_si512(table), low = _mm512_set1_epi16(15);
  for (int i = 0; i < MT; ++i)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out + i * ldo + 16 * c, _mm512_setzero_ps());
  for (int64_t kg = 0; kg < K;) {
    const int64_t t = (kg + O) / G, kend = std::min(K, (t + 1) * G - O);
    __m512 part[MT][4];
    for (int i = 0; i < MT; ++i)
      for (int c = 0; c < 4; ++c) part[i][c] = _mm512_setzero_ps();
    for (int64_t p = kg / 2; 2 * p < kend; ++p) {
      const uint8_t* w = q + p * 64;
      _mm_prefetch(reinterpret_cast<const char*>(w + 32 * 64), _MM_HINT_T0);
      const __m512i b0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
      const __m512i b1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32)));
      const __m512bh wv[4] = {(__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(b0, low), lut),
                              (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(b0, 4), lut),
                              (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(b1, low), lut),
                              (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(b1, 4), lut)};
      const bool whole = 2 * p >= kg && 2 * p + 2 <= kend;
      for (int i = 0; i < MT; ++i) {
        const uint16_t* xi = x + i * ldx;
        uint32_t pair;
        if (whole) {
          std::memcpy(&pair, xi + 2 * p, sizeof(pair));
        } else {
          const uint32_t even = 2 * p >= kg ? xi[2 * p] : 0, odd = 2 * p + 1 < kend ? xi[2 * p + 1] : 0;
          pair = even | odd << 16;
        }
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
        for (int c = 0; c < 4; ++c) part[i][c] = _mm512_dpbf16_ps(part[i][c], wv[c], xv);
      }
    }
    for (int i = 0; i < MT; ++i) {
      float xsum = 0.0f;
      if (z)
        for (int64_t k = kg; k < kend; ++k) xsum += bf16_to_float(x[i * ldx + k]);
      for (int c = 0; c < 4; ++c) {
        __m512 sums = part[i][c];
        if (z) {
          const __m128i zb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(z + t * 64 + 16 * c));
          const __m512 shift = _mm512_sub_ps(_mm512_set1_ps(8.0f), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(zb)));
          sums = _mm512_fmadd_ps(shift, _mm512_set1_ps(xsum), sums);
        }
        float* o = out + i * ldo + 16 * c;
        _mm512_storeu_ps(o, _mm512_fmadd_ps(sums, _mm512_loadu_ps(s + t * 64 + 16 * c), _mm512_loadu_ps(o)));
      }
    }
    kg = kend;
  }
}

void int4x_tile(const Int8GemmArgs& a, int64_t m0, int64_t m1, int64_t g0, int64_t g1) {
  alignas(64) float c[kInt8BlockM * kInt8MaxItemGroups * kInt8Group];
  const int64_t ldc = (g1 - g0) * kInt8Group, pairs = (a.K + 1) / 2;
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* q = a.q4 + g * pairs * 64;
    const float* s = a.s + g * a.KG * kInt8Group;
    const uint8_t* z = a.z ? a.z + g * a.KG * kInt8Group : nullptr;
    for (int64_t m = m0; m < m1;) {
      const int64_t rows = std::min<int64_t>(4, m1 - m);
      const uint16_t* x = a.xb + m * a.K;
      float* out = c + (m - m0) * ldc + (g - g0) * kInt8Group;
      switch (rows) {
        case 1: int4x_rows<1>(x, a.K, q, s, z, a.K, a.G, a.O, out, ldc); break;
        case 2: int4x_rows<2>(x, a.K, q, s, z, a.K, a.G, a.O, out, ldc); break;
        case 3: int4x_rows<3>(x, a.K, q, s, z, a.K, a.G, a.O, out, ldc); break;
        default: int4x_rows<4>(x, a.K, q, s, z, a.K, a.G, a.O, out, ldc); break;
      }
      m += rows;
    }
  }
  store_rows(c, ldc, m0, m1, g0 * kInt8Group, std::min(a.N, g1 * kInt8Group), a.bias, a.out, a.ldo, a.out_bf16);
}

#pragma GCC pop_options

}  // namespace

const KernelTable& avx512_bf16_table() {
  const KernelTable& below = avx512_table();
  static const KernelTable table{"avx512_bf16", supported, nullptr, bf16x_tile, 1, 0, 0, 0, nullptr, nullptr, int4x_tile,
                                 below.sum_bf16,
                                 below.sum_f32, below.stream_read, attend_bf16_rows<Avx512Bf16Attention>};
  return table;
}

}  // namespace autotp

#endif  // AUTOTP_X86_TABLES
