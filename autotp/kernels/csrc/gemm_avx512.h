// BF16 GEMM with prepacked weights for CPUs with AVX-512 (F, BW, DQ, VL).
//
// Packed weight layout (shared with the registration code and the Python fake functions):
//   a weight W of shape [N, K] becomes [NG, K2, 128] bf16, NG = ceil(N / 64), K2 = ceil(K / 2),
//   element (g, p, 32 * j + 2 * i + s) = W[64 * g + 16 * j + i, 2 * p + s], zero past N or K.
// A group of 64 output columns is one contiguous stream (a decoding GEMV reads the weight
// front to back); each 256-byte row of it holds one K pair for the group's four blocks of 16
// columns, each block's 64 bytes in the "VNNI pair" order AMX and AVX512-BF16 also consume.
#pragma once

#include <cstdint>

namespace autotp::avx512 {

constexpr int64_t kBlockN = 16;     // output columns per block (one zmm register of fp32)
constexpr int64_t kRowElems = 32;   // bf16 elements of one block's K pair
constexpr int64_t kGroupRow = 128;  // bf16 elements of one group's K pair (4 blocks)
constexpr int64_t kTileM = 6;       // activation rows per micro-kernel call
constexpr int64_t kGroupBlocks = 4; // packed blocks (64 columns) per micro-kernel call
constexpr int64_t kBlockM = 96;     // activation rows per unit of work
constexpr int64_t kMaxItemBlocks = 16;  // packed blocks (256 columns) per unit of work
constexpr int64_t kChunkPairs = 256;  // K pairs per pass when several row tiles reuse the panel

// True when the CPU and the OS support the instructions the kernel uses.
bool cpu_supported();

struct GemmArgs {
  const float* x;        // activations as fp32, [M, 2 * K2] (zero in the padding column)
  const uint16_t* w;     // packed weight, [NG, K2, 128]
  const float* bias;     // [N] or nullptr
  void* out;             // [M, N] with row stride ldo, bf16 or fp32
  int64_t M, N, K2, ldo;
  bool out_bf16;
};

// Computes rows [m0, m1) (at most kBlockM) and blocks of 16 columns [b0, b1) (b0 a multiple of
// kGroupBlocks, at most kMaxItemBlocks blocks, b1 <= ceil(N / 16))
// of the output. With one row tile the weight streams once over the whole K; with several, K is
// walked in chunks so that each chunk of x and of the weight stays in cache while every
// (row tile, 64-column group) pair of the unit uses it.
void gemm_tile(const GemmArgs& a, int64_t m0, int64_t m1, int64_t b0, int64_t b1);

// The epilogue of both GEMMs: rows [m0, m1) and columns [n0, n1) of the fp32 tile c (row
// stride ldc, column n0 first) plus bias (if any) to out[m, n] (row stride ldo), rounded to
// bf16 (nearest even) or stored as fp32.
void store_rows(const float* c, int64_t ldc, int64_t m0, int64_t m1, int64_t n0, int64_t n1, const float* bias,
                void* out, int64_t ldo, bool out_bf16);

// Reads [data, data + bytes) with 64-byte loads and returns the XOR of its 8-byte words (so the
// loads are not optimised away; the bytes past the last 256-byte block are XORed one by one):
// the read bandwidth a streaming kernel can reach, for benchmarks.
uint64_t stream_read(const uint8_t* data, int64_t bytes);

// out[i] = sum over s of srcs[s][i], summed in fp32 in the order of srcs (the shared-memory
// all-reduce's reduction); bf16 results rounded once, to nearest even.
void sum_bf16(const uint16_t* const* srcs, int64_t count, uint16_t* out, int64_t n);
void sum_f32(const float* const* srcs, int64_t count, float* out, int64_t n);

}  // namespace autotp::avx512
