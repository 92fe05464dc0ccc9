// The kernel layer's one contract: what every instruction set provides, and the ISA-neutral
// layouts and arguments they share.
//
// An instruction set is one file (isa_generic.cpp, isa_avx2.cpp, isa_avx512.cpp,
// isa_avx512_vnni.cpp, isa_avx512_bf16.cpp, isa_amx.cpp) that fills a KernelTable;
// kernel_list.cpp lists the tables this architecture compiles, best first. The registration
// code (ops.cpp) checks arguments, splits the work and picks a table by name, then per call the
// first table from there down that serves the call (serving_table); the epilogue (epilogue.h)
// is shared by all.
//
// BF16 packed weight: W [N, K] -> [NG, K2, 128] bf16, NG = ceil(N / 64), K2 = ceil(K / 2),
//   element (g, p, 32 j + 2 i + s) = W[64 g + 16 j + i, 2 p + s], zero past N or K. A group of
//   64 output columns is one contiguous stream; each 256-byte row holds one K pair for the
//   group's four blocks of 16 columns, each block's 64 bytes in the "VNNI pair" order.
// INT8 packed weight: Q [N, K] int8 -> [NG, K2, 128], element (g, p, 2 c + r) = Q[64 g + c, 2 p + r],
//   zero past N or K: per group and pair of K rows one 128-byte row, each column's two weights
//   side by side (widened to int16, 16 bytes are 8 columns' pairs, what vpmaddwd multiplies);
//   scales S [N, KG] fp32 -> [NG, KG, 64]; KG = ceil((K + O) / G). The product (the spec): K is cut into
//   segments e at scale-group and kInt8SegmentK boundaries (int8_segments); per row m and segment
//   e the activations are quantised to int16 (int8_activations.h, each table's own copy, the same bits):
//   xs[m, e] = a / 32767 in fp32 (a = max |x[m, k]| over e), X[m, k] = round-half-even(x[m, k] /
//   xs[m, e]) (X and xs 0 when xs underflows to 0; X 0 and xs NaN when e holds a NaN or infinity,
//   so the NaN shows). Then
//   y[m, n] = bias[n] + sum over e, in K order, of float(sum over k in e of X[m, k] * Q[n, k])
//   * (xs[m, e] * S[n, t_e]): integer products and sums, exact in int32 (|sum| <= 256 * 32767 *
//   128 < 2^31) and so the same on every path in any order; the fp32 parts are one product of
//   scales and one multiply-add per segment (a path may fuse that add). x[m, k] is replaced by
//   X * xs, within xs / 2 = a / 65534 of it: finer than bf16's rounding of the segment's largest
//   activation. The vector paths multiply pairs of K (vpmaddwd: 16 exact products per
//   instruction, where fp32 products of the widened weight took three instructions per 8).
//   With 8-bit activations (a call's activation_bits = 8, the Runtime's int8_activations =
//   "int8") the same with 127 for 32767: xs = a / 127, |X| <= 127, x within a / 254; every path
//   computes the same integers, and a table with an int8_u8_tile multiplies them as bytes
//   (vpdpbusd: 64 products per instruction, twice vpdpwssd's) from X as int8 (xb8 [M, ldu], ldu a
//   multiple of 4 at least K) and the rows' sums of X per segment (xsum [M, segs], int32).
// INT4 packed weight: U [N, K] of 4-bit values 0..15 -> [NG, ceil(K/2), 64] uint8: per group g
//   of 64 columns and pair p of K rows, two blocks h of 32 bytes, byte 32 h + 2 i + r =
//   U[64 g + 32 h + i, 2 p + r] | U[64 g + 32 h + 16 + i, 2 p + r] << 4 (i < 16, r < 2), zero past
//   N or K: widened to 16-bit words, a block's low nibbles are the (k even, k odd) pairs of
//   columns 32 h .. +15 and its high nibbles those of the next 16 (what a bf16 dot product of
//   pairs wants). Scales as INT8's; zero points Z [N, KG] uint8 -> [NG, KG, 64] (or none: 8 for
//   every group, the symmetric scheme). The product (the spec): y[m, n] = bias[n] + sum over k
//   of x[m, k] * (float(U[n, k] - Z[n, g]) * S[n, g]), g = (k + O) / G, each dequantised weight
//   rounded to fp32 once, summed in K order; the vector paths apply S once per group to fp32
//   sums of x * (U - Z) (int4_tiles.h).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace autotp {

constexpr int64_t kBlockN = 16;     // output columns per block
constexpr int64_t kRowElems = 32;   // bf16 elements of one block's K pair
constexpr int64_t kGroupBlocks = 4; // blocks per packed group (64 columns)
constexpr int64_t kGroupRow = 128;  // bf16 elements of one group's K pair
constexpr int64_t kBlockM = 96;     // activation rows per unit of work (bf16)
constexpr int64_t kMaxItemBlocks = 16;  // blocks (256 columns) per unit of work (bf16)
constexpr int64_t kChunkPairs = 256;    // K pairs per pass of the fp32-activation tiles (each Micro says its own)
// K pairs per pass when a unit of few rows needs several micro-kernel calls per group (AVX2's
// 2-4 rows): 8 KB of the group, in L1 for its later calls (measured on Zen 3: isa_avx2.cpp).
constexpr int64_t kFewChunkPairs = 32;
constexpr int64_t kRowTile = 6;         // activation rows the work splitter rounds to

constexpr int64_t kInt8Group = 64;        // output columns per packed INT8 group
constexpr int64_t kInt8PairRow = 128;     // bytes of one packed INT8 pair row (a group's pair of K)
constexpr int64_t kInt8MaxItemGroups = 4; // groups (256 columns) per unit of work
constexpr int64_t kInt8BlockM = 96;       // activation rows per unit of work
constexpr int64_t kInt8DirectM = 4;       // up to this many rows, weights widened in registers
constexpr int64_t kInt8SegmentK = 256;    // K per INT8 segment at most (int32 sums stay exact)
constexpr int16_t kInt8XMax = 32767;      // |X| at most: the int16 activations' scale is max |x| / this
constexpr int16_t kInt8XMax8 = 127;       // the same for 8-bit activations

// The INT8 segments of K [k0, k1) (the spec above), in K order: segment(ks, ke, t) for each
// [ks, ke) within one scale group t and one kInt8SegmentK chunk.
template <class F>
void int8_segments(int64_t k0, int64_t k1, int64_t G, int64_t O, F&& segment) {
  for (int64_t ks = k0; ks < k1;) {
    const int64_t t = (ks + O) / G;
    const int64_t ke = std::min(std::min(k1, (t + 1) * G - O), (ks / kInt8SegmentK + 1) * kInt8SegmentK);
    segment(ks, ke, t);
    ks = ke;
  }
}

struct GemmArgs {
  const float* x;     // activations as fp32, [M, ldx = 2 * K2] (zero in the padding column), for bf16_tile
  const uint16_t* xb; // or as bf16, for bf16x_tile (x is then null): rows of ldx elements, ldx a multiple
                      // of kXbPadCols >= 2 * K2, zero past column K; row-major [M, ldx], or, for a
                      // table with bf16x_unit_rows, in blocks of 16 rows (see below)
  const uint16_t* w;  // packed weight, [NG, K2, 128]
  const float* bias;  // [N] or nullptr
  void* out;          // [M, N] with row stride ldo, bf16 or fp32
  int64_t M, N, K2, ldo;
  bool out_bf16;
  int64_t ldx;
};

constexpr int64_t kXbPadCols = 32;  // bf16 activations: zero columns up to a multiple of 32 (AMX reads K 32 at a time)

struct Int8GemmArgs {  // INT8 and INT4 calls
  const float* x;     // INT4: activations as fp32, [M, K]
  const int16_t* xq;  // INT8: activations X as int16, [M, ldq], ldq > K (X[m, K] readable, any value)
  const float* xs;    // INT8: their scales, [M, segs] (segment e of row m: xs[m * segs + e])
  const int8_t* q;    // INT8: packed weight, [NG, K2, 128]
  const uint8_t* q4;  // INT4: packed weight, [NG, K, 32]
  const uint8_t* z;   // INT4: packed zero points, [NG, KG, 64], or null (8)
  const uint16_t* xb; // INT4, for int4x_tile: activations as bf16, [M, K] (x is then null)
  const float* s;     // packed scales, [NG, KG, 64]
  const float* bias;  // [N] or nullptr
  void* out;          // [M, N] with row stride ldo, bf16 or fp32
  int64_t M, N, K, G, O, KG, ldo;
  bool out_bf16;
  int64_t ldq, segs;  // INT8
  const int8_t* xb8;    // INT8, 8-bit activations, for int8_u8_tile: X as bytes, [M, ldu]
  const int32_t* xsum;  // and the sums of X per row and segment, [M, segs]
  int64_t ldu;
};

// INT8's activations (the spec above) of rows [m0, m1) of x [M, K] into xq [M, ldq] and xs [M, segs],
// |X| at most x_max (kInt8XMax, or kInt8XMax8 for 8-bit activations)
template <typename T>
using Int8ActivationRows = void (*)(const T* x, int64_t m0, int64_t m1, int64_t K, int64_t G, int64_t O,
                                    int16_t* xq, int64_t ldq, float* xs, int64_t segs, int16_t x_max);

// decode attention over a bf16 KV cache for one (batch row, KV head) (KernelTable::attend_bf16);
// next_k: the keys the caller's next call reads (prefetched as this one ends), or null
using AttendBf16Fn = void (*)(const float* q, const uint16_t* k, const uint16_t* v, const float* const* bias,
                              float scale, float* out, float* scratch, int64_t G, int64_t L, int64_t D,
                              const uint16_t* next_k);

// What one instruction set provides. Tiles compute rows [m0, m1) (at most kBlockM) and blocks
// of 16 columns [b0, b1) (b0 a multiple of 4, at most kMaxItemBlocks; a bf16x tile may ask for
// other limits) of the bf16 GEMM, or
// groups [g0, g1) (at most kInt8MaxItemGroups) of the INT8 one, epilogue included.
// A tile may be null: the table then does not serve that kind of call, which goes to the next
// table down the list (an ISA that adds only a bf16-activation tile, such as AVX512-BF16 or
// AMX, leaves the rest to the one below it).
struct KernelTable {
  const char* name;
  bool (*supported)();  // the CPU and the OS can run it
  // bf16 weights, fp32 activations (a.x): exact products of the given fp32 inputs
  void (*bf16_tile)(const GemmArgs& a, int64_t m0, int64_t m1, int64_t b0, int64_t b1);
  // bf16 weights, bf16 activations (a.xb), for calls of at least bf16x_min_rows rows
  void (*bf16x_tile)(const GemmArgs& a, int64_t m0, int64_t m1, int64_t b0, int64_t b1);
  int64_t bf16x_min_rows;
  // 0: its bf16x tile reads xb row-major, in units of at most kBlockM rows. Else it reads xb in
  // blocks of 16 rows, each [ldx / 32, 16, 32] (the 32-column slices of its rows one after the
  // other: each AMX tile of activations is 1 KB in one piece), rows zero past M up to a
  // multiple of 32, in units of at most this many rows (a multiple of 32), cut at multiples of 32
  int64_t bf16x_unit_rows;
  // with bf16x_unit_rows: calls of at most this many rows get xb row-major instead (as a table
  // without blocks reads it)
  int64_t bf16x_stream_rows;
  int64_t bf16x_unit_blocks;  // with bf16x_unit_rows: blocks of 16 columns per unit at most (a multiple of 4)
  void (*int8_tile)(const Int8GemmArgs& a, int64_t m0, int64_t m1, int64_t g0, int64_t g1);
  void (*int4_tile)(const Int8GemmArgs& a, int64_t m0, int64_t m1, int64_t g0, int64_t g1);  // as int8_tile
  // INT4 weights, bf16 activations (a.xb); tables without one give such calls to int4_tile
  void (*int4x_tile)(const Int8GemmArgs& a, int64_t m0, int64_t m1, int64_t g0, int64_t g1);
  // out[i] = sum over s of srcs[s][i] in fp32, in the order of srcs; bf16 rounded once
  void (*sum_bf16)(const uint16_t* const* srcs, int64_t count, uint16_t* out, int64_t n);
  void (*sum_f32)(const float* const* srcs, int64_t count, float* out, int64_t n);
  // the XOR of every 8-byte word of [data, data + bytes), the bytes past the last 32 one by one
  uint64_t (*stream_read)(const uint8_t* data, int64_t bytes);
  // decode attention over a bf16 KV cache for one (batch row, KV head), attention_tiles.h (scratch:
  // G * L + 2 * G * D + L floats); null:
  // the next table down serves it
  AttendBf16Fn attend_bf16;
  // INT8's activations from bf16 or fp32 x (int8_activations.h), compiled for this table's
  // instruction set; every table with an int8_tile has them
  Int8ActivationRows<uint16_t> int8_x_bf16;
  Int8ActivationRows<float> int8_x_f32;
  // INT8 with 8-bit activations as bytes (a.xb8 and a.xsum, the spec above), as int8_tile; null:
  // int8_tile serves such calls from a.xq (the same integers)
  void (*int8_u8_tile)(const Int8GemmArgs& a, int64_t m0, int64_t m1, int64_t g0, int64_t g1);
  // the table's INT8 tiles serve calls of at least this many rows (0: all); fewer go to the next
  // table down that serves INT8 (AMX: isa_amx.cpp)
  int64_t int8_min_rows;
};

// The x86 tables are compiled on x86-64 unless the build asks for portable code only
// (-DAUTOTP_PORTABLE_ONLY: what a CPU architecture without them gets, built and tested on x86
// too, under its own extension name).
#if defined(__x86_64__) && !defined(AUTOTP_PORTABLE_ONLY)
#define AUTOTP_X86_TABLES 1
#else
#define AUTOTP_X86_TABLES 0
#endif

const KernelTable& generic_table();
#if AUTOTP_X86_TABLES
const KernelTable& avx2_table();
const KernelTable& avx512_table();
const KernelTable& avx512_vnni_table();
const KernelTable& avx512_bf16_table();
const KernelTable& amx_table();
AttendBf16Fn amx_attend_bf16();  // AMX's decode attention (isa_amx_attention.cpp)
#endif

// The tables this build holds, best first (generic last), and those this CPU runs.
const std::vector<const KernelTable*>& kernel_tables();
const std::vector<const KernelTable*>& runnable_tables();
// The table called `name` if this CPU runs it; "" is the best this CPU runs. Raises otherwise.
const KernelTable& kernel_table(const std::string& name);
// What kind of GEMM call a table is asked to serve.
enum class CallKind { kBf16Fp32X, kBf16Bf16X, kInt8, kInt4, kInt4Bf16X, kAttention /* decode_attention, M unused */ };
// The first runnable table from `start` down the list that serves a call of this kind and M
// (bf16 activations go to a bf16x tile where one serves M, else to an fp32-activation tile).
const KernelTable& serving_table(const KernelTable& start, CallKind kind, int64_t M);
// Whether table t takes a bf16-activation call of M rows with its bf16x tile.
inline bool takes_bf16x(const KernelTable& t, int64_t M) { return t.bf16x_tile != nullptr && M >= t.bf16x_min_rows; }

// Software prefetch of the weight stream the GEMM tiles read (each tile names its distance):
// weight_prefetch() is the process-wide switch, on by default except on AMD CPUs with AVX-512. It turns
// off the prefetch of the tiles that only stream: the AVX512-BF16 bf16 tile (any rows) and
// the INT8 and fp32-activation bf16 tiles of at most kStreamRows rows, and VNNI's INT8 byte tile
// in units of at most kInt8DirectM rows (isa_avx512_vnni.cpp); tiles of more rows
// (compute takes longer than the stream there), INT4's and AMX's always prefetch. The values
// computed are the same either way. Measured on an AMD EPYC Zen 4 with tools/bench_prefetch.py
// (2 ranks streaming llama-1b's and gptj-1b's per-rank weights at once, on and off alternated,
// medians over rounds of off / on time per rank): AVX512-BF16 bf16 1 row 0.92-1.04, 2 rows
// 0.96-0.98, 4 rows 0.80-0.89, 32 rows 0.98; INT8 (VNNI) 1-2 rows 0.85-1.00, 4 rows 0.95-1.05,
// 32 rows 1.08; AVX-512 bf16 1-2 rows 0.95-0.98, 4 rows 1.01-1.02; AVX2 bf16 1 row 0.97-0.98,
// 4 rows 1.30-1.33, INT8 1 row 0.89-0.94, 4 rows 1.31-1.34; INT4 1-4 rows 1.00-1.18. Where a
// tile only streams, the hardware prefetchers keep ahead and the prefetch instructions only
// take load slots; where it computes, prefetching overlaps the next lines with the work.
// Intel CPUs keep it on (not measured against it since; their L2 streamer stops at each 4 KiB
// page).
//
// How far ahead the fp32-activation bf16 tile of gemm_tiles.h (AVX2, AVX-512 without BF16)
// prefetches at most kStreamRows rows: weight_prefetch_pairs() K pairs of packed weight (256-byte
// rows), 16 (4 KB) except on AMD CPUs without AVX-512 (Zen 1-3), where the switch is also on:
// measured on an AMD EPYC Zen 3 (AVX2) with tools/bench_prefetch.py --ahead 2 4 8 16 (2 ranks,
// llama-1b, off / on time per rank): bf16 1 row 1.01-1.05 at 2 pairs, 1.06-1.07 at 4, 1.01-1.04
// at 8, 0.94-0.97 at 16; 4 rows 0.91-0.95, 0.99, 1.09-1.12, 1.23 (so more rows keep 16); INT8
// 1 row 1.01-1.02, 1.07, 1.14-1.15, 1.08-1.14 (INT8 keeps 16 pairs, 2 KB).
constexpr int kStreamRows = 2;
bool weight_prefetch();
void set_weight_prefetch(bool on);
int64_t weight_prefetch_pairs();
void set_weight_prefetch_pairs(int64_t pairs);
// Whether an INT8 or fp32-activation bf16 tile of `rows` rows prefetches (the rule above).
inline bool prefetch_for_rows(int rows) { return rows > kStreamRows || weight_prefetch(); }

// The shared epilogue, store_rows, is in epilogue.h (each ISA file compiles its own copy).

inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  __builtin_memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  __builtin_memcpy(&bits, &f, sizeof(bits));
  if (f != f) return 0x7FC0;  // NaN: quiet
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

}  // namespace autotp
