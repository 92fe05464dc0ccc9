// A standalone probe (not built by the project): how fast could an INT8 GEMM of few rows go on
// this CPU if its products were integer? autotp's INT8 spec multiplies fp32 activations by the
// weights widened to fp32 (vpmovsxbd + vcvtdq2ps + an FMA per 8 weights and row on AVX2); the
// alternative timed here quantises each activation segment to int16 and multiplies pairs of K
// with vpmaddwd into int32 (two rows of weights interleaved by vpunpcklbw, widened by
// vpmovsxbw: 16 products per instruction, exact integer sums in any order). Both walk the INT8
// packed layout ([groups, K, 64] bytes), one 64-column group after another.
//
//   g++ -O2 -mavx2 -mfma -o /tmp/int8_probe tools/probes/int8_int16_activations.cpp && /tmp/int8_probe
//
// Prints weight GB/s per variant: f<rows>x<cols> the fp32 path, i<rows>x<cols> the int16 one;
// "L1" a 16 KB weight replayed (compute only), "DRAM" 16 MB streamed. x86-64 with AVX2 + FMA only
// (checked at start); K even (the int16 loop takes K in pairs).
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <vector>
#include <algorithm>
static inline __m256 widen8(const int8_t* q) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)q)));
}
// current float path: MT rows, CR registers of columns (CR*8 cols), K rows of 64 bytes
template <int MT, int CR>
void fseg(const float* x, int64_t ldx, const int8_t* q, int64_t K, float* c) {
  __m256 acc[MT][CR];
  for (int i = 0; i < MT; ++i) for (int r = 0; r < CR; ++r) acc[i][r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const int8_t* row = q + k * 64;
    _mm_prefetch((const char*)(row + 64 * 64), _MM_HINT_T0);
    __m256 wv[CR];
    for (int r = 0; r < CR; ++r) wv[r] = widen8(row + r * 8);
    for (int i = 0; i < MT; ++i) { __m256 xv = _mm256_set1_ps(x[i * ldx + k]);
      for (int r = 0; r < CR; ++r) acc[i][r] = _mm256_fmadd_ps(xv, wv[r], acc[i][r]); }
  }
  for (int i = 0; i < MT; ++i) for (int r = 0; r < CR; ++r) _mm256_storeu_ps(c + i * 64 + r * 8, acc[i][r]);
}
// int16 path: xq = int16 pairs (as int32 words) per row: xq[i*ldq + p] = (x[2p], x[2p+1])
// weights: rows k, k+1 of 64 bytes; CR registers of 8 columns each
template <int MT, int CR>
void iseg(const int32_t* xq, int64_t ldq, const int8_t* q, int64_t K, float* c) {
  __m256i acc[MT][CR];
  for (int i = 0; i < MT; ++i) for (int r = 0; r < CR; ++r) acc[i][r] = _mm256_setzero_si256();
  for (int64_t k = 0; k < K; k += 2) {
    const int8_t* r0 = q + k * 64; const int8_t* r1 = r0 + 64;
    _mm_prefetch((const char*)(r0 + 64 * 64), _MM_HINT_T0);
    _mm_prefetch((const char*)(r0 + 65 * 64), _MM_HINT_T0);
    __m256i wv[CR];
    for (int r = 0; r < CR; r += 2) {
      __m128i a = _mm_loadu_si128((const __m128i*)(r0 + r * 8)), b = _mm_loadu_si128((const __m128i*)(r1 + r * 8));
      wv[r] = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(a, b));
      if (r + 1 < CR) wv[r + 1] = _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(a, b));
    }
    for (int i = 0; i < MT; ++i) { __m256i xv = _mm256_set1_epi32(xq[i * ldq + k / 2]);
      for (int r = 0; r < CR; ++r) acc[i][r] = _mm256_add_epi32(acc[i][r], _mm256_madd_epi16(xv, wv[r])); }
  }
  for (int i = 0; i < MT; ++i) for (int r = 0; r < CR; ++r) _mm256_storeu_ps(c + i * 64 + r * 8, _mm256_cvtepi32_ps(acc[i][r]));
}
template <class F> double timeit(F f, int reps) {
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) { auto a = std::chrono::steady_clock::now(); f(); auto b = std::chrono::steady_clock::now();
    t.push_back(std::chrono::duration<double>(b - a).count()); }
  std::sort(t.begin(), t.end()); return t[t.size() / 2];
}
int main() {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    std::puts("this probe needs AVX2 + FMA, which this CPU lacks");
    return 1;
  }
  for (int mode = 0; mode < 2; ++mode) {
    const int64_t N = mode ? 4096 : 64, K = mode ? 4096 : 256; const int reps = mode ? 21 : 4001;
    int8_t* q = (int8_t*)aligned_alloc(64, N * K);
    for (int64_t i = 0; i < N * K; ++i) q[i] = (int8_t)(rand() % 255 - 127);
    std::vector<float> x(4 * K), c(4 * 64 * 64); std::vector<int32_t> xq(4 * K / 2);
    for (auto& v : x) v = rand() / (float)RAND_MAX; for (auto& v : xq) v = rand();
    double G = N * K / 1e9;
    for (int round = 0; round < 3; ++round) {
      printf("%s ", mode ? "DRAM 16MB" : "L1 16KB");
#define F(MT, CR) printf("f%dx%d %.1f ", MT, CR * 8, G / timeit([&] { for (int64_t g = 0; g < N / 64; ++g) for (int col = 0; col < 64; col += CR * 8) fseg<MT, CR>(x.data(), K, q + g * K * 64 + col, K, c.data()); }, reps));
#define I(MT, CR) printf("i%dx%d %.1f ", MT, CR * 8, G / timeit([&] { for (int64_t g = 0; g < N / 64; ++g) for (int col = 0; col < 64; col += CR * 8) iseg<MT, CR>(xq.data(), K / 2, q + g * K * 64 + col, K, c.data()); }, reps));
      F(1, 8) I(1, 8) I(1, 4) F(4, 2) I(4, 2) I(2, 4) F(2, 4)
      printf("GB/s\n");
    }
  }
}
