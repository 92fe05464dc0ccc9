// The AMX path (AMX-BF16 tiles: Sapphire Rapids and later Xeons), for bf16 activations. Eight tile
// registers of 16 rows x 64 bytes: four fp32 accumulators (32 rows x 32 columns), two of
// activations (16 rows x 16 K pairs each) and two of weights (16 K pairs x 16 columns each);
// one tdpbf16ps is 16 x 16 x 32 multiply-adds. The packed group rows of kernel_table.h are the
// tile layout the weights need as they lie: a block's 16 K pairs are 16 rows of 64 bytes at a
// stride of 256. Units are 96 rows x 256 columns; K is walked in chunks of 128 pairs so that a
// chunk of both stays in L2 (two weight blocks' chunk in L1 across the row passes); partial
// sums wait in an fp32 buffer. It reaches 0.7-0.9x oneDNN's own AMX matmul (see the README).
// Calls of up to 16 rows stream the weights instead (stream_tile). fp32 activations go to the
// tables below (AVX-512; AVX512-BF16 serves only bf16 ones).
#include "kernel_table.h"

#if AUTOTP_X86_TABLES

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
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
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512dq,avx512vl")

#include "epilogue.h"

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

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

#pragma GCC pop_options

}  // namespace

const KernelTable& amx_table() {
  const KernelTable& below = avx512_bf16_table();
  static const KernelTable table{"amx", supported, nullptr, bf16x_tile, kMinRows, kUnitRows, kAmxStreamRows, kUnitBlocks, nullptr, nullptr, nullptr, below.sum_bf16,
                                 below.sum_f32, below.stream_read};
  return table;
}

}  // namespace autotp

#endif  // AUTOTP_X86_TABLES
