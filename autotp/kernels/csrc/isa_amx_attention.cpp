// Decode attention on AMX (Sapphire Rapids and later Xeons): attention_tiles.h as AVX512-BF16
// computes it (isa_avx512_bf16.cpp), except that where a KV head serves 4 to 16 query heads and
// the query is exactly bf16 (a bf16 model's: Llama-style grouped KV heads), each block of 16
// positions is scored for all of its heads by tile multiplies. The keys are the A tile as they
// lie in the cache (16 positions x 32 dims, one row each), the query's bf16 pairs the B tile
// (16 pairs of dims x the heads, across_query's layout), so that one tdpbf16ps gives the 16 x G
// scores of 32 dims; nothing is transposed or widened, where score_block_across transposes
// every block's key words in registers and issues one vdpbf16ps per pair of dims and head.
// tdpbf16ps multiplies bf16 pairs exactly and sums in fp32 (bf16 denormals read as 0), as
// vdpbf16ps does, in its own order within a tile. The softmax and the value sums are
// AVX512-BF16's. The AMX table (isa_amx.cpp) serves decode attention with this.
#include "kernel_table.h"

#if AUTOTP_X86_TABLES

#include <immintrin.h>

#include <algorithm>
#include <cstring>

namespace autotp {
namespace {

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma")

#include "amx_config.h"
#include "avx512_vector.h"
#include "avx512_bf16_attention.h"
#include "gemm_tiles.h"
#include "attention_tiles.h"

struct AmxAttention : Avx512Bf16Attention {
  static constexpr int64_t kTileHeads = 16;  // the B and C tiles' columns: 4 bytes a head, 64 a row

  // tile 0: the scores (16 positions x G heads, fp32); 1: keys (16 positions x 32 dims); 2: the
  // query (16 pairs of dims x G heads)
  static void tile_begin(int64_t G) {
    TileConfig config;
    config.rows[0] = config.rows[1] = config.rows[2] = 16;
    config.colsb[0] = config.colsb[2] = static_cast<uint16_t>(4 * G);
    config.colsb[1] = 64;
    _tile_loadconfig(&config);
  }

  static void tile_end() { _tile_release(); }

  // score_block_across's scores of positions [l0, l0 + 16) for heads [0, G), from the query
  // words qt (across_query with one group of G) and, past Dv, q in fp32. Each 32 dims' half
  // rows of the block kAcrossAhead blocks on are prefetched into L2 as this block's are read.
  static void tile_scores(const uint32_t* qt, const float* q, const uint16_t* k, int64_t l0, int64_t G, int64_t L,
                          int64_t D, int64_t Dv, float scale, const float* const* bias, float* scores) {
    const uint16_t* block = k + l0 * D;
    const bool fetch = l0 + (kAcrossAhead + 1) * kWidth <= L;
    const char* ahead = reinterpret_cast<const char*>(fetch ? block + kAcrossAhead * kWidth * D : block);
    _tile_zero(0);
    for (int64_t j = 0; j < Dv; j += 32) {
      if (fetch) {  // one pointer stepped by the row stride, as in score_block_across
        const char* row = ahead + j * 2;
        for (int r = 0; r < kWidth; ++r) {
          _mm_prefetch(row, _MM_HINT_T1);
          row += D * 2;
          asm("" : "+r"(row));
        }
      }
      _tile_loadd(1, block + j, D * 2);
      _tile_loadd(2, qt + j / 2 * G, G * 4);
      _tile_dpbf16ps(0, 1, 2);
    }
    alignas(64) float s[16 * 16];  // s[16 r + h]: position l0 + r, head h
    _tile_stored(0, s, 64);
    const __m512i column = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
    for (int64_t g = 0; g < G; ++g) {
      __m512 v = _mm512_i32gather_ps(column, s + g, 4);
      if (Dv < D) {  // the dims past the tiles' multiples of 32, as score_block_across adds them
        alignas(64) float t[16];
        _mm512_store_ps(t, v);
        for (int64_t r = 0; r < 16; ++r)
          for (int64_t d = Dv; d < D; ++d) t[r] += q[g * D + d] * bf16_to_float(block[r * D + d]);
        v = _mm512_load_ps(t);
      }
      const __m512 b = bias[g] ? _mm512_loadu_ps(bias[g] + l0) : _mm512_setzero_ps();
      _mm512_storeu_ps(scores + g * L + l0, _mm512_fmadd_ps(v, _mm512_set1_ps(scale), b));
    }
  }
};

#pragma GCC pop_options

}  // namespace

AttendBf16Fn amx_attend_bf16() { return attend_bf16_rows<AmxAttention>; }

}  // namespace autotp

#endif  // AUTOTP_X86_TABLES
