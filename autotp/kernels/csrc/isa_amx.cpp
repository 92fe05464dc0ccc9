// The AMX path (AMX-BF16 tiles: Sapphire Rapids and later Xeons), for bf16 activations. Eight tile
// registers of 16 rows x 64 bytes: four fp32 accumulators (32 rows x 32 columns), two of
// activations (16 rows x 16 K pairs each) and two of weights (16 K pairs x 16 columns each);
// one tdpbf16ps is 16 x 16 x 32 multiply-adds. The packed group rows of kernel_table.h are the
// tile layout the weights need as they lie: a block's 16 K pairs are 16 rows of 64 bytes at a
// stride of 256. Units are 96 rows x 256 columns; K is walked in chunks of 128 pairs so that a
// chunk of both stays in L2 (two weight blocks' chunk in L1 across the row passes); partial
// sums wait in an fp32 buffer. It reaches 0.7-0.9x oneDNN's own AMX matmul (see the README).
// Calls of up to 16 rows stream the weights instead (stream_tile). fp32 activations go to the
// tables below (AVX-512; AVX512-BF16 serves only bf16 ones). INT8 calls of more than 16
// rows (prompts, batches) take AMX-INT8's tdpbssd / tdpbusd on the packed INT8 layout as it lies
// (int8_amx_tile below); fewer rows go to AVX512-VNNI. Decode attention scores grouped query
// heads on tiles too (isa_amx_attention.cpp).
#include "kernel_table.h"

#if AUTOTP_X86_TABLES

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <vector>

namespace autotp {
namespace {

// Every bf16-activation call: up to 16 rows the streaming tile below, more the prefill tile.
// Measured on a Xeon with AMX (2 ranks at once, 1 thread each, 461 MB of 2816 x 2048 weights
// per rank on huge pages, interleaved in one process, time / the read probe's): 1 row 1.09-1.12
// against 1.14-1.15 on AVX512-BF16's vdpbf16ps tile, 4 rows 1.10-1.11 against 1.32-1.33; in L2
// 2.5x faster at 4 rows, 6.7x at 16.
constexpr int64_t kMinRows = 1;
constexpr int64_t kChunkSteps = 8;     // steps of 16 K pairs per chunk: 8 KB of weights per column block
constexpr int64_t kStepPairs = 16;   // K pairs per tile multiply
constexpr int64_t kUnitRows = 96;   // rows and 16-column blocks per unit: larger units measured no faster at M=1024
constexpr int64_t kUnitBlocks = 16;  // (256 columns) and slower at M=16 (fewer units to split)
constexpr int64_t kSubRows = 32;     // rows per pass of the four accumulators
constexpr int64_t kAmxStreamRows = 16;  // calls of at most this many rows: x row-major, one tile of it
constexpr int64_t kStreamAhead = 1;  // steps of weights prefetched ahead (2, or into L2 only: 3-10% slower)

// Linux hands out the tile state only to a process that asks (arch_prctl, since 5.16).
bool os_grants_tiles() {
  constexpr long kReqPerm = 0x1023, kXtileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
  return syscall(SYS_arch_prctl, kReqPerm, kXtileData) == 0;
}

bool supported() {
  __builtin_cpu_init();
  static const bool granted = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
                              avx512_bf16_table().supported() && os_grants_tiles();
  return granted;
}

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,amx-int8,avx512f,avx512bw,avx512dq,avx512vl")

#include "epilogue.h"
#include "amx_config.h"

// One pass: rows [0, 32) of x (bf16, row stride ldx elements; rows past the call's M are the
// zero padding ops.cpp leaves), `steps` steps of 16 K pairs from x and from the group rows at
// w (two column blocks, stride 128 elements), into c (fp32, row stride ldc), 32 columns.
void pass(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t steps, float* c, int64_t ldc, bool accumulate,
          const uint16_t* ahead) {
  const int64_t sc = ldc * 4, sx = 64, sw = kGroupRow * 2;
  if (accumulate) {
    _tile_loadd(0, c, sc);
    _tile_loadd(1, c + kBlockN, sc);
    _tile_loadd(2, c + 16 * ldc, sc);
    _tile_loadd(3, c + 16 * ldc + kBlockN, sc);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t s = 0; s < steps; ++s) {
    const uint16_t* xs = x + s * 16 * 2 * kStepPairs;  // blocks of 16 rows: each step's tile is 1 KB
    const uint16_t* ws = w + s * kStepPairs * kGroupRow;
    if (ahead)  // the weight rows a later pass reads, 16 rows of 256 bytes per step
      for (int r = 0; r < 16; ++r)
        for (int l = 0; l < 4; ++l)
          _mm_prefetch(reinterpret_cast<const char*>(ahead + (s * kStepPairs + r) * kGroupRow + l * 32), _MM_HINT_T0);
    _tile_loadd(4, xs, sx);
    _tile_loadd(6, ws, sw);
    _tile_loadd(7, ws + kRowElems, sw);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, xs + 16 * ldx, sx);  // the next block of 16 rows
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, sc);
  _tile_stored(1, c + kBlockN, sc);
  _tile_stored(2, c + 16 * ldc, sc);
  _tile_stored(3, c + 16 * ldc + kBlockN, sc);
}

// A group's last, partial step (`tail` < 16 K pairs after `full` whole steps, at w) zero-padded
// to a whole step in buf: past K2 lie the next group's weights, which the tiles must not multiply.
inline void partial_step(uint16_t* buf, const uint16_t* w, int64_t full, int64_t tail) {
  std::memcpy(buf, w + full * kStepPairs * kGroupRow, tail * kGroupRow * sizeof(uint16_t));
  std::memset(buf + tail * kGroupRow, 0, (kStepPairs - tail) * kGroupRow * sizeof(uint16_t));
}

// One step of the streaming tile: 16 K pairs of the activation rows (tile 4) by the four column
// blocks of a group (4 KB of weights at ws, rows 256 bytes apart) into accumulators 0..3.
inline void stream_step(const uint16_t* xs, int64_t sx, const uint16_t* ws) {
  const int64_t sw = kGroupRow * 2;
  _tile_loadd(4, xs, sx);
  _tile_loadd(5, ws, sw);
  _tile_dpbf16ps(0, 4, 5);
  _tile_loadd(6, ws + kRowElems, sw);
  _tile_dpbf16ps(1, 4, 6);
  _tile_loadd(7, ws + 2 * kRowElems, sw);
  _tile_dpbf16ps(2, 4, 7);
  _tile_loadd(5, ws + 3 * kRowElems, sw);
  _tile_dpbf16ps(3, 4, 5);
}

// Calls of 1..16 rows (decoding, beams, small batches; x row-major, padded): each group's 64
// columns stream once over the whole K, 16 K pairs a step into four accumulators of `rows` rows
// x 16 columns, the next step's 4 KB prefetched into L1 (the L2 streamer stops at each 4 KiB
// page). Units are at most kMaxItemBlocks wide, as ops.cpp splits the non-blocked tiles. The
// vdpbf16ps tile spends one instruction per row per 32 products and falls behind memory from 4
// rows; here a step costs about the same for 1 row as for 16. Each row's sums are the same
// whatever the other rows of the call (a row of a beam equals that row computed alone).
void stream_tile(const GemmArgs& a, int64_t m0, int64_t m1, int64_t b0, int64_t b1) {
  const int64_t rows = m1 - m0;
  alignas(64) float c[kAmxStreamRows * kMaxItemBlocks * kBlockN];
  const int64_t ldc = (b1 - b0 + kGroupBlocks - 1) / kGroupBlocks * kGroupBlocks * kBlockN;
  TileConfig config;
  for (int t = 0; t < 5; ++t) config.rows[t] = static_cast<uint8_t>(rows), config.colsb[t] = 64;
  for (int t = 5; t < 8; ++t) config.rows[t] = 16, config.colsb[t] = 64;
  _tile_loadconfig(&config);
  const int64_t full = a.K2 / kStepPairs, tail = a.K2 - full * kStepPairs, sx = a.ldx * 2;
  const uint16_t* x = a.xb + m0 * a.ldx;
  alignas(64) uint16_t tail_w[kStepPairs * kGroupRow];
  for (int64_t g = b0; g < b1; g += kGroupBlocks) {
    const uint16_t* w = a.w + g / kGroupBlocks * a.K2 * kGroupRow;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t s = 0; s < full; ++s) {
      const uint16_t* ws = w + s * kStepPairs * kGroupRow;
      const char* ahead = reinterpret_cast<const char*>(ws + kStreamAhead * kStepPairs * kGroupRow);
      for (int l = 0; l < 64; ++l) _mm_prefetch(ahead + 64 * l, _MM_HINT_T0);
      stream_step(x + s * 2 * kStepPairs, sx, ws);
    }
    if (tail) {
      partial_step(tail_w, w, full, tail);
      stream_step(x + full * 2 * kStepPairs, sx, tail_w);
    }
    float* cg = c + (g - b0) * kBlockN;
    _tile_stored(0, cg, ldc * 4);
    _tile_stored(1, cg + kBlockN, ldc * 4);
    _tile_stored(2, cg + 2 * kBlockN, ldc * 4);
    _tile_stored(3, cg + 3 * kBlockN, ldc * 4);
  }
  _tile_release();
  store_rows(c, ldc, m0, m1, b0 * kBlockN, std::min(a.N, b1 * kBlockN), a.bias, a.out, a.ldo, a.out_bf16);
}

void bf16x_tile(const GemmArgs& a, int64_t m0, int64_t m1, int64_t b0, int64_t b1) {
  if (a.M <= kAmxStreamRows) return stream_tile(a, m0, m1, b0, b1);
  thread_local std::vector<float> buffer;  // the unit's fp32 sums: up to 256 KB, so not on the stack
  buffer.resize(kUnitRows * kUnitBlocks * kBlockN);
  float* c = buffer.data();
  // whole groups and whole passes of 32 rows: c holds them all; store_rows keeps what is real
  const int64_t ldc = (b1 - b0 + kGroupBlocks - 1) / kGroupBlocks * kGroupBlocks * kBlockN;
  const int64_t full_steps = a.K2 / kStepPairs, tail = a.K2 - full_steps * kStepPairs;
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.rows[t] = 16, config.colsb[t] = 64;
  _tile_loadconfig(&config);  // every call: other code on this thread (oneDNN) may have its own
  // the last, partial step's weights, zero-padded to 16 pairs (past K2 lies the next group)
  alignas(64) uint16_t tail_w[kStepPairs * kGroupRow];
  for (int64_t s0 = 0; s0 < full_steps + (tail ? 1 : 0); s0 += kChunkSteps) {
    const int64_t s1 = std::min(s0 + kChunkSteps, full_steps);
    for (int64_t g = b0; g < b1; g += kGroupBlocks) {
      const uint16_t* w = a.w + g / kGroupBlocks * a.K2 * kGroupRow;
      const bool with_tail = tail && s0 + kChunkSteps > full_steps;
      if (with_tail) partial_step(tail_w, w, full_steps, tail);
      auto one = [&](int64_t j, int64_t m) {
        float* cm = c + (m - m0) * ldc + (g - b0 + j) * kBlockN;
        const uint16_t* xm = a.xb + m * a.ldx;  // m is a multiple of 32: a block's start
        // the first pass over this chunk fetches the weight rows of this group's next chunk
        const uint16_t* ahead = j == 0 && m == m0 ? w + s1 * kStepPairs * kGroupRow : nullptr;
        if (s1 > s0)
          pass(xm + s0 * 16 * 2 * kStepPairs, a.ldx, w + j * kRowElems + s0 * kStepPairs * kGroupRow, s1 - s0, cm, ldc,
               s0 > 0, ahead);
        if (with_tail)  // one more step: x's columns past K are zero, and so are tail_w's pairs past K2
          pass(xm + full_steps * 16 * 2 * kStepPairs, a.ldx, tail_w + j * kRowElems, 1, cm, ldc, s0 > 0 || s1 > s0, nullptr);
      };
      for (int64_t j = 0; j < kGroupBlocks; j += 2)  // a chunk of two column blocks, reused by every row pass
        for (int64_t m = m0; m < m1; m += kSubRows) one(j, m);
    }
  }
  _tile_release();
  store_rows(c, ldc, m0, m1, b0 * kBlockN, std::min(a.N, b1 * kBlockN), a.bias, a.out, a.ldo, a.out_bf16);
}

// ---- INT8 (AMX-INT8: tdpbssd, tdpbusd) ----
//
// The packed INT8 layout (kernel_table.h) holds a group's weights as pair rows: 128 bytes, each
// column's two K values side by side. A tile of weights is 16 such rows' first or second 64
// bytes as they lie (stride 128): to tdpbssd, tile row r is a quad of K per 4 bytes, and 4
// bytes here are columns 2n and 2n + 1 of K pair r. So each activation row takes two tile rows:
// its "even" row holds (X[2p], X[2p + 1], 0, 0) for pair p and gives columns 2n, its "odd" row
// (0, 0, X[2p], X[2p + 1]) gives columns 2n + 1. Half the multiplies are by zero, and no weight
// is moved (a copy regrouped into K quads for whole 16-row tiles measured no faster at 256 rows:
// the per-segment epilogue and the activations' bytes cost as much). The int16 activations X are
// a signed high byte and an unsigned low byte, X = 256 H + L: tdpbssd (signed x signed) sums
// H * Q, tdpbusd (unsigned x signed) L * Q, and 256 * the first + the second is the exact int32
// sum of X * Q that every path computes (the spec; int32 arithmetic wraps, so the parts may
// wrap where the whole does not). With 8-bit activations (|X| <= 127) X is its own low byte as
// a signed one: tdpbssd alone. The sums are scaled per segment as everywhere (the same fp32
// operations as AVX512-VNNI: bit for bit its results).
constexpr int64_t kInt8StepK = 32;                      // K per tile step: 16 pair rows, 2 KB of a group
constexpr int64_t kInt8StepBytes = kInt8StepK / 2 * kInt8PairRow;
constexpr int64_t kInt8TileRows = 8;                    // activation rows per pass (two tile rows each)
constexpr int64_t kInt8Ahead = 1;                       // steps of weights prefetched into L1 ahead (2 KB)
constexpr int64_t kInt8AheadL2 = 8;                     // and into L2 (16 KB ahead)
// Calls of 16 rows or fewer go to AVX512-VNNI. Measured on a Xeon with AMX, side by side: with
// 2 ranks at once, each running its share of a llama-1b step's INT8 GEMMs (363 MB per rank;
// tools/bench_tables.py), this tile took 1.10x vpdpwssd's time at 8 rows, 1.16x at 12, 1.00x
// at 16, 0.86x at 24, 0.81x at 32 and 0.60x at 256 (a prompt); with 1 thread and one 45056 x
// 2048 GEMM (92 MB) from memory, 1.08-1.21x at 1 row and 1.06-1.24x at 4 (it streams 2 KB a
// step, half a bf16 step, and no prefetch distance tried, 2-16 KB into L1 or L2, closed that).
constexpr int64_t kAmxInt8MinRows = 17;

bool amx_int8() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("amx-int8") != 0;
  }();
  return yes;
}

// The activation tiles of rows [m, m + mt) for the steps of 32 K that segment [ks, ke) touches,
// one after the other: per step `parts` tiles (the high then the low bytes, or the signed bytes
// alone) of 2 mt rows x 64 bytes, X outside the segment 0. At most kInt8SegmentSteps steps (18
// KB for 8 rows): built per segment, they stay in L1 while every group of the unit uses them.
constexpr int64_t kInt8SegmentSteps = kInt8SegmentK / kInt8StepK + 1;

void build_x_tiles(const Int8GemmArgs& a, int64_t m, int64_t mt, int parts, int64_t ks, int64_t ke, int8_t* dst) {
  const int64_t tile = 2 * mt * 64;
  const __m512i low = _mm512_set1_epi16(0xFF);
  for (int64_t s = ks / kInt8StepK; s * kInt8StepK < ke; ++s, dst += parts * tile) {
    const int64_t k0 = s * kInt8StepK, lo = std::max(ks, k0) - k0, hi = std::min(ke, k0 + kInt8StepK) - k0;
    const __mmask32 mask = static_cast<__mmask32>(((1ull << hi) - 1) & ~((1ull << lo) - 1));  // K in [ks, ke)
    for (int64_t i = 0; i < mt; ++i) {
      const __m512i x = _mm512_maskz_loadu_epi16(mask, a.xq + (m + i) * a.ldq + k0);  // no read past the mask
      // a part's two bytes of each K pair as one 16-bit word, zero-extended: the even row's dwords
      const auto put = [&](int part, __m512i words) __attribute__((always_inline)) {
        const __m512i even = _mm512_cvtepu16_epi32(_mm512_cvtepi16_epi8(words));
        int8_t* t = dst + part * tile;
        _mm512_storeu_si512(t + i * 64, even);
        _mm512_storeu_si512(t + (mt + i) * 64, _mm512_slli_epi32(even, 16));
      };
      if (parts == 2) {
        put(0, _mm512_srai_epi16(x, 8));
        put(1, _mm512_and_si512(x, low));
      } else {
        put(0, x);
      }
    }
  }
}

// Units of any rows: passes of up to 8 rows; in each, the segments in K order, each one's
// activation tiles built once and then every group of the unit over it (tiles 0, 1: the high or
// signed bytes by the weights' two halves; 2, 3: the low bytes), its sums stored and scaled into
// c. A group's segments come one after another in its stream: the next steps are prefetched
// into L1 whichever group comes between.
template <int kParts>
void int8_amx_tile(const Int8GemmArgs& a, int64_t m0, int64_t m1, int64_t g0, int64_t g1) {
  alignas(64) float c[kInt8BlockM * kInt8MaxItemGroups * kInt8Group];
  alignas(64) int32_t sums[4][16 * 16];
  alignas(64) int8_t tail_w[kInt8StepBytes];
  alignas(64) int8_t xt[kInt8SegmentSteps * 2 * 16 * 64];
  const int64_t ldc = (g1 - g0) * kInt8Group, pairs = (a.K + 1) / 2, full = pairs / (kInt8StepK / 2);
  const __m512i first_half = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second_half = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t m = m0; m < m1; m += kInt8TileRows) {
    const int64_t mt = std::min(kInt8TileRows, m1 - m), tile = 2 * mt * 64;
    TileConfig config;
    for (int t = 0; t < 6; ++t) config.rows[t] = static_cast<uint8_t>(2 * mt), config.colsb[t] = 64;
    for (int t = 6; t < 8; ++t) config.rows[t] = 16, config.colsb[t] = 64;
    _tile_loadconfig(&config);
    int64_t e = 0;
    int8_segments(0, a.K, a.G, a.O, [&](int64_t ks, int64_t ke, int64_t t) {
      build_x_tiles(a, m, mt, kParts, ks, ke, xt);
      const int64_t s0 = ks / kInt8StepK, s1 = (ke - 1) / kInt8StepK + 1;
      for (int64_t g = g0; g < g1; ++g) {
        const int8_t* q = a.q + g * pairs * kInt8PairRow;
        if (s1 > full && full * (kInt8StepK / 2) < pairs) {  // the last step zero-padded: past it lies the next group
          const int64_t have = (pairs - full * (kInt8StepK / 2)) * kInt8PairRow;
          std::memcpy(tail_w, q + full * kInt8StepBytes, have);
          std::memset(tail_w + have, 0, kInt8StepBytes - have);
        }
        _tile_zero(0);
        _tile_zero(1);
        if constexpr (kParts == 2) {
          _tile_zero(2);
          _tile_zero(3);
        }
        const int8_t* x = xt;
        for (int64_t s = s0; s < s1; ++s, x += kParts * tile) {
          const int8_t* ws = s < full ? q + s * kInt8StepBytes : tail_w;
          if (m == m0) {  // the unit's first pass streams the weights; the later ones find them in L2
            const char* near = reinterpret_cast<const char*>(q + (s + kInt8Ahead) * kInt8StepBytes);
            const char* far = reinterpret_cast<const char*>(q + (s + kInt8AheadL2) * kInt8StepBytes);
            for (int l = 0; l < kInt8StepBytes / 64; ++l) _mm_prefetch(near + 64 * l, _MM_HINT_T0);
            for (int l = 0; l < kInt8StepBytes / 64; ++l) _mm_prefetch(far + 64 * l, _MM_HINT_T1);
          }
          _tile_loadd(6, ws, kInt8PairRow);
          _tile_loadd(7, ws + 64, kInt8PairRow);
          _tile_loadd(4, x, 64);
          _tile_dpbssd(0, 4, 6);
          _tile_dpbssd(1, 4, 7);
          if constexpr (kParts == 2) {
            _tile_loadd(5, x + tile, 64);
            _tile_dpbusd(2, 5, 6);
            _tile_dpbusd(3, 5, 7);
          }
        }
        _tile_stored(0, sums[0], 64);
        _tile_stored(1, sums[1], 64);
        if constexpr (kParts == 2) {
          _tile_stored(2, sums[2], 64);
          _tile_stored(3, sums[3], 64);
        }
        const float* st = a.s + (g * a.KG + t) * kInt8Group;
        float* cg = c + (g - g0) * kInt8Group + (m - m0) * ldc;
        for (int64_t i = 0; i < mt; ++i) {
          const float xsi = a.xs[(m + i) * a.segs + e];
          for (int h = 0; h < 2; ++h) {
            __m512i even = _mm512_load_si512(sums[h] + i * 16), odd = _mm512_load_si512(sums[h] + (mt + i) * 16);
            if constexpr (kParts == 2) {  // 256 H + L, wrapping as int32 does
              even = _mm512_add_epi32(_mm512_slli_epi32(even, 8), _mm512_load_si512(sums[2 + h] + i * 16));
              odd = _mm512_add_epi32(_mm512_slli_epi32(odd, 8), _mm512_load_si512(sums[2 + h] + (mt + i) * 16));
            }
            // columns back in order: unpack gives 8L + 0..3 (lo) and 8L + 4..7 (hi) per 128-bit lane L
            const __m512i lo = _mm512_unpacklo_epi32(even, odd), hi = _mm512_unpackhi_epi32(even, odd);
            const __m512i cols[2] = {_mm512_permutex2var_epi32(lo, first_half, hi),
                                     _mm512_permutex2var_epi32(lo, second_half, hi)};
            for (int j = 0; j < 2; ++j) {  // int8_segment's epilogue, the same operations
              float* out = cg + i * ldc + 32 * h + 16 * j;
              const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(xsi), _mm512_loadu_ps(st + 32 * h + 16 * j));
              _mm512_storeu_ps(out, _mm512_fmadd_ps(_mm512_cvtepi32_ps(cols[j]), scale,
                                                    ks == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(out)));
            }
          }
        }
      }
      ++e;
    });
  }
  _tile_release();
  store_rows(c, ldc, m0, m1, g0 * kInt8Group, std::min(a.N, g1 * kInt8Group), a.bias, a.out, a.ldo, a.out_bf16);
}

void int8_tile(const Int8GemmArgs& a, int64_t m0, int64_t m1, int64_t g0, int64_t g1) {
  int8_amx_tile<2>(a, m0, m1, g0, g1);
}

// 8-bit activations: X (|X| <= 127) read from a.xq (its low byte, signed), not from a.xb8
void int8_u8_tile(const Int8GemmArgs& a, int64_t m0, int64_t m1, int64_t g0, int64_t g1) {
  int8_amx_tile<1>(a, m0, m1, g0, g1);
}

#pragma GCC pop_options

}  // namespace

const KernelTable& amx_table() {
  const KernelTable& below = avx512_bf16_table();
  const KernelTable& avx512 = avx512_table();  // INT8's activations: the AVX-512 copy
  static const KernelTable table{"amx", supported, nullptr, bf16x_tile, kMinRows, kUnitRows, kAmxStreamRows, kUnitBlocks,
                                 int8_tile, nullptr, nullptr, below.sum_bf16, below.sum_f32, below.stream_read,
                                 amx_attend_bf16(),
                                 avx512.int8_x_bf16, avx512.int8_x_f32, int8_u8_tile,
                                 amx_int8() ? kAmxInt8MinRows : LLONG_MAX};  // no AMX-INT8: no INT8 call
  return table;
}

}  // namespace autotp

#endif  // AUTOTP_X86_TABLES
