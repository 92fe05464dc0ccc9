// The AVX512-VNNI path (Cascade Lake, Ice Lake, Sapphire Rapids and later Xeons, AMD Zen 4 and
// later): INT8 only. vpdpwssd multiplies the int16 pairs of the activations by the weights'
// and adds both products to the int32 sums in one instruction, where AVX-512 issues vpmaddwd
// then vpaddd. The products and sums are the same exact integers (the spec, kernel_table.h:
// |sum| < 2^31, and vpdpwssd does not saturate), so results are identical to the AVX-512 path
// bit for bit. With 8-bit activations (|X| <= 127) vpdpbusd multiplies bytes, four products
// of a column per lane (int8_u8_tile below): the same integers again, from half the
// instructions per weight byte. Everything else is left to the AVX-512 table below it.
#include "kernel_table.h"

#if AUTOTP_X86_TABLES

#include <immintrin.h>

#include <algorithm>
#include <cstring>

namespace autotp {
namespace {

bool supported() {
  __builtin_cpu_init();
  return avx512_table().supported() && __builtin_cpu_supports("avx512vnni");
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma")

#include "avx512_vector.h"

struct Avx512Vnni : Avx512 {
  // (inline assembly: with the intrinsic, GCC 12 copied each accumulator to another register and
  // back around every vpdpwssd of the 6-row panel tile, and spilled some, which made it 1.4x
  // slower than vpmaddwd + vpaddd; the "+v" operand keeps the accumulator in its register)
  static A madd(X x, W w, A acc) {
    asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w));
    return acc;
  }
};

#include "gemm_tiles.h"

// 8-bit activations as bytes (kernel_table.h). A quad u of K (k = 4u .. 4u + 3: packed pair rows
// 2u and 2u + 1) for 16 columns is one register: interleaving the 16-bit pairs of the two pair
// rows (vpunpckl/hwd) puts each column's four weights in one 32-bit lane, the lanes in the
// order of columns 8L + j (lo) and 8L + 4 + j (hi) for 128-bit lane L and j < 4. vpdpbusd
// multiplies unsigned bytes by signed ones: the weights' sign bits flipped make them Q + 128
// (u8), the activations are X (s8), and it adds the four products of a column to the lane's
// int32 sum; 128 * (the row's sum of X over the segment, a.xsum) subtracted at the end leaves the
// exact sums of X * Q. Positions of a quad outside the segment take X = 0. |sum| <= 256 * 255 *
// 127 < 2^31: no overflow.
inline __m512i dpbusd(__m512i acc, __m512i u, __m512i s) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));  // (as madd above: keeps acc in place)
  return acc;
}

// Row `row`'s bytes of quad u as one 32-bit value, positions outside [ks, ke) 0
inline int32_t quad_bytes(const int8_t* row, int64_t u, int64_t ks, int64_t ke) {
  int8_t b[4];
  for (int j = 0; j < 4; ++j) {
    const int64_t k = 4 * u + j;
    b[j] = k >= ks && k < ke ? row[k] : 0;
  }
  int32_t v;
  std::memcpy(&v, b, sizeof(v));
  return v;
}

// MT rows x the group's 64 columns over segment [ks, ke) (int8_segment's contract, from bytes;
// xsum: the rows' sums of X over the segment, row stride ldxs as xs); `ahead`: prefetch the weights
template <int MT>
void u8_segment(const int8_t* xb, int64_t ldu, const int8_t* q, int64_t pairs, int64_t ks, int64_t ke,
                const float* xs, const int32_t* xsum, int64_t ldxs, const float* s, float* c, int64_t ldc,
                bool first, bool ahead) {
  __m512i acc[MT][4];
  for (int r = 0; r < 4; ++r)
    for (int i = 0; i < MT; ++i) acc[i][r] = _mm512_setzero_si512();
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
  // inlined at each call with `edge` constant: a quad inside the segment reads its bytes
  // directly, and its second pair row exists (4u + 4 <= K)
  const auto quad = [&](int64_t u, bool edge) __attribute__((always_inline)) {
    const int8_t* a = q + 2 * u * kInt8PairRow;
    const __m512i a0 = _mm512_loadu_si512(a), a1 = _mm512_loadu_si512(a + 64);
    __m512i b0 = _mm512_setzero_si512(), b1 = _mm512_setzero_si512();
    if (!edge || 2 * u + 1 < pairs) {
      b0 = _mm512_loadu_si512(a + kInt8PairRow);
      b1 = _mm512_loadu_si512(a + kInt8PairRow + 64);
    }
    const __m512i w[4] = {_mm512_xor_si512(_mm512_unpacklo_epi16(a0, b0), sign),
                          _mm512_xor_si512(_mm512_unpackhi_epi16(a0, b0), sign),
                          _mm512_xor_si512(_mm512_unpacklo_epi16(a1, b1), sign),
                          _mm512_xor_si512(_mm512_unpackhi_epi16(a1, b1), sign)};
    for (int i = 0; i < MT; ++i) {
      int32_t v;
      if (edge) v = quad_bytes(xb + i * ldu, u, ks, ke);
      else std::memcpy(&v, xb + i * ldu + 4 * u, sizeof(v));
      const __m512i xv = _mm512_set1_epi32(v);
      for (int r = 0; r < 4; ++r) acc[i][r] = dpbusd(acc[i][r], w[r], xv);
    }
  };
  int64_t u = ks / 4;
  if (4 * u < ks) quad(u++, true);
  for (; 4 * u + 4 <= ke; ++u) {
    if (ahead) {  // (here, not in the lambda: GCC drops _mm_prefetch there)
      const int8_t* next = q + (2 * u + kPrefetchPairs8) * kInt8PairRow;
      for (int line = 0; line < 4; ++line) Avx512::prefetch(next + 64 * line);
    }
    quad(u, false);
  }
  if (4 * u < ke) quad(u, true);
  // lanes back in column order: columns 32 h + 0..15 from (lo, hi) lanes 0-3, 4-7; 16..31 from 8-15
  const __m512i first_half = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second_half = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int h = 0; h < 2; ++h) {
    const __m512 sv[2] = {_mm512_loadu_ps(s + 32 * h), _mm512_loadu_ps(s + 32 * h + 16)};
    for (int i = 0; i < MT; ++i) {
      const __m512i shift = _mm512_set1_epi32(128 * xsum[i * ldxs]);
      const __m512i lo = _mm512_sub_epi32(acc[i][2 * h], shift), hi = _mm512_sub_epi32(acc[i][2 * h + 1], shift);
      const __m512i sums[2] = {_mm512_permutex2var_epi32(lo, first_half, hi),
                               _mm512_permutex2var_epi32(lo, second_half, hi)};
      for (int j = 0; j < 2; ++j) {  // int8_segment's epilogue, the same operations
        float* out = c + i * ldc + 32 * h + 16 * j;
        const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(xs[i * ldxs]), sv[j]);
        _mm512_storeu_ps(out, _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[j]), scale,
                                              first ? _mm512_setzero_ps() : _mm512_loadu_ps(out)));
      }
    }
  }
}

using U8SegmentFn = void (*)(const int8_t*, int64_t, const int8_t*, int64_t, int64_t, int64_t, const float*,
                             const int32_t*, int64_t, const float*, float*, int64_t, bool, bool);

U8SegmentFn u8_pick(int64_t mt) {
  switch (mt) {
    case 1: return u8_segment<1>;
    case 2: return u8_segment<2>;
    case 3: return u8_segment<3>;
    default: return u8_segment<4>;
  }
}

// int8_tile's order (a segment of a group at a time, every row over it while it is in cache),
// in tiles of at most 4 rows x 64 columns. A unit of at most kInt8DirectM rows only streams its
// weights (4 rows: 39 GB/s of in-cache weights a core on an AMD EPYC Zen 4, above what memory
// gives it), so it prefetches them only where weight_prefetch() says (kernel_table.h): with 2
// ranks at once, 4 rows took 0.96-0.97 of vpdpwssd's time without it, 1.07-1.09 with it.
void int8_u8_tile(const Int8GemmArgs& a, int64_t m0, int64_t m1, int64_t g0, int64_t g1) {
  alignas(64) float c[kInt8BlockM * kInt8MaxItemGroups * kInt8Group];
  const int64_t ldc = (g1 - g0) * kInt8Group, pairs = (a.K + 1) / 2;
  const bool ahead = m1 - m0 > kInt8DirectM || weight_prefetch();
  for (int64_t g = g0; g < g1; ++g) {
    const int8_t* q = a.q + g * pairs * kInt8PairRow;
    const float* s = a.s + g * a.KG * kInt8Group;
    float* cg = c + (g - g0) * kInt8Group;
    int64_t e = 0;
    int8_segments(0, a.K, a.G, a.O, [&](int64_t ks, int64_t ke, int64_t t) {
      for (int64_t m = m0; m < m1; m += 4) {
        const int64_t mt = std::min<int64_t>(4, m1 - m);
        u8_pick(mt)(a.xb8 + m * a.ldu, a.ldu, q, pairs, ks, ke, a.xs + m * a.segs + e, a.xsum + m * a.segs + e,
                    a.segs, s + t * kInt8Group, cg + (m - m0) * ldc, ldc, ks == 0, ahead);
      }
      ++e;
    });
  }
  store_rows(c, ldc, m0, m1, g0 * kInt8Group, std::min(a.N, g1 * kInt8Group), a.bias, a.out, a.ldo, a.out_bf16);
}

#pragma GCC pop_options

}  // namespace

const KernelTable& avx512_vnni_table() {
  const KernelTable& below = avx512_table();
  static const KernelTable table{"avx512_vnni", supported, nullptr, nullptr, 0, 0, 0, 0, int8_tile<Avx512Vnni>, nullptr,
                                 nullptr, below.sum_bf16, below.sum_f32, below.stream_read, nullptr, below.int8_x_bf16,
                                 below.int8_x_f32, int8_u8_tile};
  return table;
}

}  // namespace autotp

#endif  // AUTOTP_X86_TABLES
