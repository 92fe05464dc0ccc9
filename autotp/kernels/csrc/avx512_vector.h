// The AVX-512 vector type of the tiles (gemm_tiles.h, int4_tiles.h, attention_tiles.h): 16 fp32
// lanes (F, BW, DQ, VL). Included by isa_avx512.cpp and isa_avx512_vnni.cpp inside their
// `#pragma GCC target` regions and anonymous namespaces, so each compiles its own copy.
// bf16 widens to fp32 with two integer ops per 32 values: shifting each 32-bit lane left by 16
// gives the even-K values, masking off the low half the odd-K ones. INT8 multiplies int16 pairs
// (vpmaddwd, the spec's integer products; the VNNI table fuses the add, isa_avx512_vnni.cpp).

struct Avx512 {
  using F = __m512;
  static constexpr int kWidth = 16;
  static constexpr int kAttnAccumulators = 16;  // decode attention's value sums in registers
  // 6 rows x 4 blocks: 24 accumulators + 4 weights + 1 broadcast of the 32 zmm registers
  static constexpr int kTileM = 6;
  static constexpr int64_t kTileBlocks(int64_t) { return 4; }
  static constexpr int kDirectRows = 4, kPanelRows = 6, kPanelCols = 64;
  static constexpr int kDirectCols(int) { return 64; }  // 4 rows x 4 registers

  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F even(const uint16_t* p) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512(p), 16)); }
  static F odd(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512(p), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  // INT8 (gemm_tiles.h): 16 columns' pairs of K (32 bytes of a packed pair row) widened to int16
  // pairs; vpmaddwd (AVX512BW): 32 exact products into 16 int32 sums
  using W = __m512i;
  using X = __m512i;
  using A = __m512i;
  static W wpair(const int8_t* p) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static X xpair(const int16_t* p) {
    int32_t v;
    __builtin_memcpy(&v, p, sizeof(v));
    return _mm512_set1_epi32(v);
  }
  static X xone(int16_t v) { return _mm512_set1_epi32(static_cast<uint16_t>(v)); }
  static X xsecond(int16_t v) {
    return _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(static_cast<uint16_t>(v)) << 16));
  }
  static A madd(X x, W w, A acc) { return _mm512_add_epi32(acc, _mm512_madd_epi16(x, w)); }
  static A izero() { return _mm512_setzero_si512(); }
  // INT4 (int4_tiles.h): 16 words = both blocks of a pair of K rows
  using I = __m512i;
  static I load_words(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static I srli(I v, int n) { return _mm512_srli_epi32(v, n); }
  static F magic(I v, uint32_t mask) {  // (v & mask) | 0x4B000000: A & B | C is 0xEA
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(v, _mm512_set1_epi32(static_cast<int>(mask)),
                                                         _mm512_set1_epi32(0x4B000000), 0xEA));
  }
  static I and_i(I v, int n) { return _mm512_and_si512(v, _mm512_set1_epi32(n)); }
  static F to_float(I v) { return _mm512_cvtepi32_ps(v); }
  static I widen_pairs(const uint8_t* p) {
    const __m512i even_first = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    return _mm512_permutexvar_epi32(even_first,
                                    _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static F bcast_half(const float* p) { return _mm512_broadcast_f32x8(_mm256_loadu_ps(p)); }
  static void store_halves(float* row0, float* row1, F v) {
    if (row0) _mm256_storeu_ps(row0, _mm512_castps512_ps256(v));
    if (row1) _mm256_storeu_ps(row1, _mm512_extractf32x8_ps(v, 1));
  }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static float hsum(F v) { return _mm512_reduce_add_ps(v); }
  // lane i = the sum of v[i]'s lanes, for 16 registers at once: halves, quarters, pairs and
  // single lanes folded pairwise (46 instructions where 16 hsums take about 128)
  static F hsums(const F* v) {
    F a[8], c[4];
    for (int i = 0; i < 8; ++i)  // lanes 0-7: v[2i]'s two 256-bit halves added; 8-15: v[2i+1]'s
      a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                           _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
    for (int j = 0; j < 4; ++j)  // 128-bit lane k: the 4 partial sums of v[4j + k]
      c[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0x88),
                           _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0xDD));
    const F e = _mm512_add_ps(_mm512_unpacklo_ps(c[0], c[1]), _mm512_unpackhi_ps(c[0], c[1]));
    const F f = _mm512_add_ps(_mm512_unpacklo_ps(c[2], c[3]), _mm512_unpackhi_ps(c[2], c[3]));
    const F g = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(e), _mm512_castps_pd(f))),
                              _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(e), _mm512_castps_pd(f))));
    // g's lane 4k + m holds the sum of v[4m + k]
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), g);
  }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  // decode attention's keys across lanes (attention_tiles.h, score_block_across, with the
  // AVX512-BF16 table's dot_pairs): the bf16 pairs of 16 registers transposed as 32-bit words
  // (afterwards lane t of register p holds what lane p of register t held), in 64 shuffles:
  // pairs of words, of quadwords, then the 4 x 4 128-bit lanes in two steps
  static void transpose_words(I* r) {
    I t[16];
    for (int i = 0; i < 16; i += 2) {  // t[i], t[i + 1]: rows i, i + 1 interleaved by word
      t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    I s[16];  // s[4b + c], 128-bit lane L: column 4L + c of rows 4b .. 4b + 3
    for (int b = 0; b < 16; b += 4) {
      s[b] = _mm512_unpacklo_epi64(t[b], t[b + 2]);
      s[b + 1] = _mm512_unpackhi_epi64(t[b], t[b + 2]);
      s[b + 2] = _mm512_unpacklo_epi64(t[b + 1], t[b + 3]);
      s[b + 3] = _mm512_unpackhi_epi64(t[b + 1], t[b + 3]);
    }
    for (int c = 0; c < 4; ++c) {  // column 4L + c wants 128-bit lane b from s[4b + c]'s lane L
      const I x0 = _mm512_shuffle_i32x4(s[c], s[4 + c], 0x88), x1 = _mm512_shuffle_i32x4(s[c], s[4 + c], 0xDD);
      const I y0 = _mm512_shuffle_i32x4(s[8 + c], s[12 + c], 0x88), y1 = _mm512_shuffle_i32x4(s[8 + c], s[12 + c], 0xDD);
      r[c] = _mm512_shuffle_i32x4(x0, y0, 0x88);
      r[4 + c] = _mm512_shuffle_i32x4(x1, y1, 0x88);
      r[8 + c] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
      r[12 + c] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
    }
  }
};
