// AVX-512 micro-kernels of the weight-only INT8 GEMM (spec and layouts in gemm_int8.h).
//
// A packed row is 64 int8 weights, one K of a group's 64 output columns. Each 16 of them
// widen to int32 (vpmovsxbd), convert to fp32 exactly, and are multiplied by their fp32 scale:
// the dequantised weight, rounded once, as the spec defines it. Activations are broadcast and
// accumulated with FMAs in K order. Only this file and gemm_avx512.cpp are compiled for AVX-512.
#include "gemm_int8.h"

#include <immintrin.h>

#include <algorithm>

#include "gemm_avx512.h"

namespace autotp::avx512 {

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,fma")

namespace {

constexpr int64_t kPrefetchK = 32;      // rows (64 B each) ahead: 2 KB, as far as the bf16 kernel's 4 KB in time
constexpr int64_t kPanelK = 256;        // K per dequantised panel (64 KB of fp32)
constexpr int64_t kTileRows = 6;        // rows per fp32 micro-kernel call

inline __m512 dequant(const int8_t* q, __m512 scale) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), scale);
}

// acc[i][j] (+)= sum over k in [k0, k1) of x[i, k] * W[k, 16 j .. 16 j + 15], W dequantised in
// registers, for MT rows of x (row stride ldx). q and s point at the group's packed base.
template <int MT>
void direct(const float* x, int64_t ldx, const int8_t* q, const float* s, int64_t G, int64_t O, int64_t k0,
            int64_t k1, float* c, int64_t ldc, bool accumulate) {
  __m512 acc[MT][4];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < 4; ++j)
      acc[i][j] = accumulate ? _mm512_loadu_ps(c + i * ldc + 16 * j) : _mm512_setzero_ps();
  for (int64_t kg = k0; kg < k1;) {
    const int64_t t = (kg + O) / G, kend = std::min(k1, (t + 1) * G - O);
    __m512 sv[4];
    for (int j = 0; j < 4; ++j) sv[j] = _mm512_loadu_ps(s + t * kInt8Group + 16 * j);
    for (int64_t k = kg; k < kend; ++k) {
      const int8_t* row = q + k * kInt8Group;
      _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchK * kInt8Group), _MM_HINT_T0);
      __m512 wv[4];
      for (int j = 0; j < 4; ++j) wv[j] = dequant(row + 16 * j, sv[j]);
      for (int i = 0; i < MT; ++i) {
        const __m512 xv = _mm512_set1_ps(x[i * ldx + k]);
        for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
      }
    }
    kg = kend;
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(c + i * ldc + 16 * j, acc[i][j]);
}

// The dequantised weight of K [k0, k1) for one group, as fp32 rows of 64: panel[k - k0][c].
void dequant_panel(const int8_t* q, const float* s, int64_t G, int64_t O, int64_t k0, int64_t k1, float* panel) {
  for (int64_t kg = k0; kg < k1;) {
    const int64_t t = (kg + O) / G, kend = std::min(k1, (t + 1) * G - O);
    __m512 sv[4];
    for (int j = 0; j < 4; ++j) sv[j] = _mm512_loadu_ps(s + t * kInt8Group + 16 * j);
    for (int64_t k = kg; k < kend; ++k)
      for (int j = 0; j < 4; ++j)
        _mm512_storeu_ps(panel + (k - k0) * kInt8Group + 16 * j, dequant(q + k * kInt8Group + 16 * j, sv[j]));
    kg = kend;
  }
}

// acc[i][j] (+)= sum over the panel's rows of x[i, k] * panel[k, 16 j ..]: MT rows of x.
template <int MT>
void from_panel(const float* x, int64_t ldx, const float* panel, int64_t rows, float* c, int64_t ldc,
                bool accumulate) {
  __m512 acc[MT][4];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < 4; ++j)
      acc[i][j] = accumulate ? _mm512_loadu_ps(c + i * ldc + 16 * j) : _mm512_setzero_ps();
  for (int64_t k = 0; k < rows; ++k) {
    __m512 wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = _mm512_loadu_ps(panel + k * kInt8Group + 16 * j);
    for (int i = 0; i < MT; ++i) {
      const __m512 xv = _mm512_set1_ps(x[i * ldx + k]);
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(c + i * ldc + 16 * j, acc[i][j]);
}

using DirectFn = void (*)(const float*, int64_t, const int8_t*, const float*, int64_t, int64_t, int64_t, int64_t,
                          float*, int64_t, bool);
using PanelFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, bool);

DirectFn pick_direct(int64_t mt) {
  switch (mt) {
    case 1: return direct<1>;
    case 2: return direct<2>;
    case 3: return direct<3>;
    default: return direct<4>;
  }
}

PanelFn pick_panel(int64_t mt) {
  switch (mt) {
    case 1: return from_panel<1>;
    case 2: return from_panel<2>;
    case 3: return from_panel<3>;
    case 4: return from_panel<4>;
    case 5: return from_panel<5>;
    default: return from_panel<6>;
  }
}

}  // namespace

void gemm_int8_tile(const Int8GemmArgs& a, int64_t m0, int64_t m1, int64_t g0, int64_t g1) {
  static_assert(kInt8DirectM <= 4 && kTileRows <= 6, "pick_direct covers 1..4 rows, pick_panel 1..6");
  alignas(64) float c[kInt8BlockM * kInt8MaxItemGroups * kInt8Group];
  alignas(64) float panel[kPanelK * kInt8Group];
  const int64_t ldc = (g1 - g0) * kInt8Group, rows = m1 - m0;
  for (int64_t g = g0; g < g1; ++g) {
    const int8_t* q = a.q + g * a.K * kInt8Group;
    const float* s = a.s + g * a.KG * kInt8Group;
    float* cg = c + (g - g0) * kInt8Group;
    if (rows <= kInt8DirectM) {  // decoding: one pass over the group's stream, nothing staged
      pick_direct(rows)(a.x + m0 * a.K, a.K, q, s, a.G, a.O, 0, a.K, cg, ldc, false);
      continue;
    }
    for (int64_t k0 = 0; k0 < a.K; k0 += kPanelK) {
      const int64_t k1 = std::min(a.K, k0 + kPanelK);
      dequant_panel(q, s, a.G, a.O, k0, k1, panel);
      for (int64_t m = m0; m < m1; m += kTileRows)
        pick_panel(std::min(kTileRows, m1 - m))(a.x + m * a.K + k0, a.K, panel, k1 - k0,
                                                 cg + (m - m0) * ldc, ldc, k0 > 0);
    }
  }
  store_rows(c, ldc, m0, m1, g0 * kInt8Group, std::min(a.N, g1 * kInt8Group), a.bias, a.out, a.ldo, a.out_bf16);
}

#pragma GCC pop_options

}  // namespace autotp::avx512
