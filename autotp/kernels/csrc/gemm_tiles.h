// The GEMM tiles of every instruction set, written once over a vector type V that the ISA's
// file supplies. Include it inside that file's `#pragma GCC target` region and inside an
// anonymous namespace: each ISA then compiles its own copy, for its own instructions, with
// nothing shared at link time. It includes only epilogue.h (likewise compiled per ISA);
// kernel_table.h and <algorithm> come first, outside the region.
//
// V provides, for F a register of kWidth fp32 lanes:
//   zero(), load(const float*), store(float*, F), set1(float), fma(a, b, c) = a * b + c
//   even(p), odd(p): the 2 * kWidth bf16 at p are kWidth (even K, odd K) pairs of kWidth
//     columns; even gives the even-K values as fp32, odd the odd-K ones (bf16 is the top
//     half of an fp32: a shift or a mask)
//   mul(a, b), to_float(A): int32 lanes as fp32
//   INT8's integer products, for W (kWidth columns of a pair of K rows, as int16 pairs), X (an
//   activation pair broadcast) and A (kWidth int32 sums): wpair(p) (the 2 * kWidth int8 at p,
//   kWidth columns' pairs as the packed layout holds them, widened), xpair(p) (the int16 pair
//   p[0], p[1]), xone(v) (the pair (v, 0)), xsecond(v) (the pair (0, v)), madd(x, w, acc) = acc +
//   x0 * w0 + x1 * w1 per column, izero()
//   prefetch(p)
//   kTileM (rows per bf16 micro-kernel call, <= 6) and kTileBlocks(mt) (16-column blocks per
//   call, 1..4), kDirectRows / kDirectCols(mt) (INT8, few rows) and kPanelRows / kPanelCols
//   (INT8 many rows; INT4 many rows, from a panel of dequantised weights); column counts are
//   multiples of kWidth that divide 64.
// bf16 accumulation is fp32 in K order everywhere, so every ISA computes the same sums up to the
// association of the K loop's FMAs with the products (each product is rounded once); INT8's
// sums are exact integers, scaled once per segment (int8_segments, kernel_table.h).

#include "epilogue.h"

constexpr int64_t kPrefetchPairs = 16;  // bf16 rows (256 B each) ahead: 4 KB (at most kStreamRows rows: weight_prefetch_pairs())
constexpr int64_t kPrefetchPairs8 = 16; // INT8 pair rows (128 B each) ahead: 2 KB
constexpr int64_t kPanelK = 256;        // K per dequantised INT4 panel (64 KB of fp32)

// bf16_micro for scalar lanes (the generic path; the compiler vectorises each row's pass over
// the weights): acc[i][.] (+)= sum over `pairs` K pairs of x[i, 2p + s] * W[block j, p, s], for MT rows of x
// (row stride ldx) and NB blocks of the packed group rows at w (row stride kGroupRow).
template <class V, int MT, int NB>
void bf16_micro_lanes(const float* x, int64_t ldx, const uint16_t* w, int64_t pairs, float* c, int64_t ldc,
                bool accumulate) {
  constexpr int R = kBlockN / V::kWidth;  // registers per block
  typename V::F acc[MT][NB * R];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NB * R; ++j) acc[i][j] = accumulate ? V::load(c + i * ldc + j * V::kWidth) : V::zero();
  const bool ahead = prefetch_for_rows(MT);
  const int64_t distance = (MT <= kStreamRows ? weight_prefetch_pairs() : kPrefetchPairs) * kGroupRow;
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* row = w + p * kGroupRow;
    if (ahead)
      for (int j = 0; j < NB; ++j) V::prefetch(row + distance + j * kRowElems);
    // even K first, then odd: only NB * R weight registers live beside the accumulators
    typename V::F wv[NB * R];
    for (int j = 0; j < NB; ++j)
      for (int r = 0; r < R; ++r) wv[j * R + r] = V::even(row + j * kRowElems + 2 * V::kWidth * r);
    for (int i = 0; i < MT; ++i) {
      const typename V::F xv = V::set1(x[i * ldx + 2 * p]);
      for (int j = 0; j < NB * R; ++j) acc[i][j] = V::fma(xv, wv[j], acc[i][j]);
    }
    for (int j = 0; j < NB; ++j)
      for (int r = 0; r < R; ++r) wv[j * R + r] = V::odd(row + j * kRowElems + 2 * V::kWidth * r);
    for (int i = 0; i < MT; ++i) {
      const typename V::F xv = V::set1(x[i * ldx + 2 * p + 1]);
      for (int j = 0; j < NB * R; ++j) acc[i][j] = V::fma(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NB * R; ++j) V::store(c + i * ldc + j * V::kWidth, acc[i][j]);
}

// acc[i][.] (+)= sum over `pairs` K pairs of x[i, 2p + s] * W[block j, p, s], for MT rows of x
// (row stride ldx) and NB blocks of the packed group rows at w (row stride kGroupRow). Even K
// first, then odd, one weight register live at a time beside the accumulators and the MT
// activations; the prefetch settings read before the accumulators load (the calls clobber every
// vector register). As bf16_micro_lanes did it for vectors (all NB * R weights loaded first, the
// settings read after), AVX2's 16 registers fell short and GCC kept accumulators on the stack,
// stored and reloaded every pair: 1 row from cache 36.7 -> 48.3 GB/s (1024 x 1024, AMD EPYC Zen
// 3). Each accumulator's FMAs come in the same order either way: the same bits.
template <class V, int MT, int NB>
void bf16_micro(const float* x, int64_t ldx, const uint16_t* w, int64_t pairs, float* c, int64_t ldc,
                bool accumulate) {
  if constexpr (V::kWidth == 1) {
    bf16_micro_lanes<V, MT, NB>(x, ldx, w, pairs, c, ldc, accumulate);
  } else {
    constexpr int R = kBlockN / V::kWidth;  // registers per block
    const bool ahead = prefetch_for_rows(MT);
    const int64_t distance = (MT <= kStreamRows ? weight_prefetch_pairs() : kPrefetchPairs) * kGroupRow;
    typename V::F acc[MT][NB * R];
    if (accumulate) {
      for (int i = 0; i < MT; ++i)
        for (int j = 0; j < NB * R; ++j) acc[i][j] = V::load(c + i * ldc + j * V::kWidth);
    } else {
      for (int i = 0; i < MT; ++i)
        for (int j = 0; j < NB * R; ++j) acc[i][j] = V::zero();
    }
    for (int64_t p = 0; p < pairs; ++p) {
      const uint16_t* row = w + p * kGroupRow;
      if (ahead)
        for (int j = 0; j < NB; ++j) V::prefetch(row + distance + j * kRowElems);
      for (int s = 0; s < 2; ++s) {
        typename V::F xv[MT];
        for (int i = 0; i < MT; ++i) xv[i] = V::set1(x[i * ldx + 2 * p + s]);
        for (int j = 0; j < NB * R; ++j) {
          const uint16_t* at = row + (j / R) * kRowElems + 2 * V::kWidth * (j % R);
          const typename V::F wv = s == 0 ? V::even(at) : V::odd(at);
          for (int i = 0; i < MT; ++i) acc[i][j] = V::fma(xv[i], wv, acc[i][j]);
        }
      }
    }
    for (int i = 0; i < MT; ++i)
      for (int j = 0; j < NB * R; ++j) V::store(c + i * ldc + j * V::kWidth, acc[i][j]);
  }
}

using Bf16MicroFn = void (*)(const float*, int64_t, const uint16_t*, int64_t, float*, int64_t, bool);

template <class V, int MT>
Bf16MicroFn bf16_pick_nb(int64_t nb) {
  switch (nb) {
    case 1: return bf16_micro<V, MT, 1>;
    case 2: return bf16_micro<V, MT, 2>;
    case 3: return bf16_micro<V, MT, 3>;
    default: return bf16_micro<V, MT, 4>;
  }
}

template <class V>
Bf16MicroFn bf16_pick(int64_t mt, int64_t nb) {
  switch (mt) {
    case 1: return bf16_pick_nb<V, 1>(nb);
    case 2: return bf16_pick_nb<V, 2>(nb);
    case 3: return bf16_pick_nb<V, 3>(nb);
    case 4: return bf16_pick_nb<V, 4>(nb);
    case 5: return bf16_pick_nb<V, 5>(nb);
    default: return bf16_pick_nb<V, 6>(nb);
  }
}

// The micro-kernels of the fp32-activation tile, as bf16_drive takes them.
template <class V>
struct WidenMicro {
  using X = float;
  static constexpr int kTileM = V::kTileM;
  static constexpr int64_t kChunkPairs = autotp::kChunkPairs;
  static constexpr int64_t kTileBlocks(int64_t mt) { return V::kTileBlocks(mt); }
  static Bf16MicroFn pick(int64_t mt, int64_t nb) { return bf16_pick<V>(mt, nb); }
};

// The bf16 tile's loops over a Micro: X (the activations' element type), kTileM (rows per
// call, <= 6), kChunkPairs (K pairs per pass at most), kTileBlocks(mt) (blocks per call) and
// pick(mt, nb), a micro-kernel of the signature of bf16_micro with x of type X. When one call
// per group covers the unit the weight streams once over the whole K; else K is walked in
// chunks (kFewChunkPairs for units of at most kTileM rows) so that each chunk of x and of the
// weight stays in cache while every call of the unit uses it.
template <class Micro>
void bf16_drive(const GemmArgs& a, const typename Micro::X* x, int64_t m0, int64_t m1, int64_t b0, int64_t b1) {
  static_assert(Micro::kTileM >= 1 && Micro::kTileM <= 6, "the pickers cover 1..6 rows");
  alignas(64) float c[kBlockM * kMaxItemBlocks * kBlockN];
  const int64_t ldx = a.ldx, ldc = (b1 - b0) * kBlockN, rows = m1 - m0;
  const bool few = rows <= Micro::kTileM, one_walk = few && Micro::kTileBlocks(rows) >= kGroupBlocks;
  const int64_t most = few ? kFewChunkPairs : Micro::kChunkPairs;
  // passes of equal length, none over `most` (a short last pass would reload the
  // accumulators for little work)
  const int64_t passes = one_walk ? 1 : (a.K2 + most - 1) / most;
  const int64_t chunk = (a.K2 + passes - 1) / passes;
  // every call of the unit on K pairs [p0, p0 + pairs) of group g
  const auto chunk_calls = [&](int64_t g, int64_t p0) {
    const int64_t pairs = std::min(chunk, a.K2 - p0), blocks = std::min(kGroupBlocks, b1 - g);
    const uint16_t* w = a.w + (g / kGroupBlocks * a.K2 + p0) * kGroupRow;
    for (int64_t m = m0; m < m1; m += Micro::kTileM) {
      const int64_t mt = std::min<int64_t>(Micro::kTileM, m1 - m), per_call = Micro::kTileBlocks(mt);
      for (int64_t j = 0; j < blocks; j += per_call)
        Micro::pick(mt, std::min(per_call, blocks - j))(x + m * ldx + 2 * p0, ldx, w + j * kRowElems, pairs,
                                                        c + (m - m0) * ldc + (g - b0 + j) * kBlockN, ldc, p0 > 0);
    }
  };
  if (few) {  // x is a few rows: each group's strip streams in order, one after another
    for (int64_t g = b0; g < b1; g += kGroupBlocks)
      for (int64_t p0 = 0; p0 < a.K2; p0 += chunk) chunk_calls(g, p0);
  } else {  // a chunk of x stays in cache across the unit's groups
    for (int64_t p0 = 0; p0 < a.K2; p0 += chunk)
      for (int64_t g = b0; g < b1; g += kGroupBlocks) chunk_calls(g, p0);
  }
  store_rows(c, ldc, m0, m1, b0 * kBlockN, std::min(a.N, b1 * kBlockN), a.bias, a.out, a.ldo, a.out_bf16);
}

template <class V>
void bf16_tile(const GemmArgs& a, int64_t m0, int64_t m1, int64_t b0, int64_t b1) {
  bf16_drive<WidenMicro<V>>(a, a.x, m0, m1, b0, b1);
}

// One INT8 segment [ks, ke) (the spec, kernel_table.h) for MT rows of the int16 activations xq
// (row stride ldq, indexed by absolute k) and CR registers of columns: int32 sums over the
// packed pair rows at q (kInt8PairRow bytes each, q at the call's first column), each register's
// weights widened from the pair row as they lie. A segment that starts at an odd k takes that
// k's pair with the activation pair (0, X[k]); one that ends at an even k, its last pair with
// (X[k], 0). The sums are scaled by xs[i * ldxs] * s (this group's scales of the columns) into c
// (row stride ldc).
template <class V, int MT, int CR>
void int8_segment(const int16_t* xq, int64_t ldq, const int8_t* q, int64_t ks, int64_t ke, const float* xs,
                  int64_t ldxs, const float* s, float* c, int64_t ldc, bool first) {
  typename V::A acc[MT][CR];
  for (int i = 0; i < MT; ++i)
    for (int r = 0; r < CR; ++r) acc[i][r] = V::izero();
  // pair row p of K with, per row i, the activations (X[2p], X[2p + 1]) (part 0), (0, X[2p + 1])
  // (part 1) or (X[2p], 0) (part 2). Inlined at each call, so that acc stays in registers and
  // `part` folds away.
  const auto pair = [&](int64_t p, int part) __attribute__((always_inline)) {
    const int8_t* row = q + p * kInt8PairRow;
    typename V::W wv[CR];
    for (int r = 0; r < CR; ++r) wv[r] = V::wpair(row + 2 * r * V::kWidth);
    for (int i = 0; i < MT; ++i) {
      const int16_t* x = xq + i * ldq + 2 * p;
      const typename V::X xv = part == 0 ? V::xpair(x) : part == 1 ? V::xsecond(x[1]) : V::xone(x[0]);
      for (int r = 0; r < CR; ++r) acc[i][r] = V::madd(xv, wv[r], acc[i][r]);
    }
  };
  int64_t k = ks;
  if (k % 2) pair(k++ / 2, 1);
  const bool ahead = prefetch_for_rows(MT);
  for (; k + 2 <= ke; k += 2) {
    if (ahead) {  // (here, not in the lambda: GCC drops _mm_prefetch there)
      V::prefetch(q + (k / 2 + kPrefetchPairs8) * kInt8PairRow);
      V::prefetch(q + (k / 2 + kPrefetchPairs8) * kInt8PairRow + 64);
    }
    pair(k / 2, 0);
  }
  if (k < ke) pair(k / 2, 2);
  for (int r = 0; r < CR; ++r) {
    const typename V::F sv = V::load(s + r * V::kWidth);
    for (int i = 0; i < MT; ++i) {
      float* out = c + i * ldc + r * V::kWidth;
      const typename V::F scale = V::mul(V::set1(xs[i * ldxs]), sv);
      V::store(out, V::fma(V::to_float(acc[i][r]), scale, first ? V::zero() : V::load(out)));
    }
  }
}

using Int8SegmentFn = void (*)(const int16_t*, int64_t, const int8_t*, int64_t, int64_t, const float*, int64_t,
                               const float*, float*, int64_t, bool);

// Registers of columns per call for MT rows: the many-row tile's fixed width (kPanelCols), or
// the few-row one's, which may widen as rows get fewer (kDirectCols(MT): its accumulators fill
// the registers).
template <class V, bool kMany, int MT>
constexpr int int8_cr() {
  return (kMany ? V::kPanelCols : V::kDirectCols(MT)) / V::kWidth;
}

template <class V, bool kMany>
Int8SegmentFn int8_pick(int64_t mt) {
  switch (mt) {
    case 1: return int8_segment<V, 1, int8_cr<V, kMany, 1>()>;
    case 2: return int8_segment<V, 2, int8_cr<V, kMany, 2>()>;
    case 3: return int8_segment<V, 3, int8_cr<V, kMany, 3>()>;
    case 4: return int8_segment<V, 4, int8_cr<V, kMany, 4>()>;
    case 5: return int8_segment<V, 5, int8_cr<V, kMany, 5>()>;
    default: return int8_segment<V, 6, int8_cr<V, kMany, 6>()>;
  }
}

// INT4's many-row path (int4_tiles.h), over a panel of dequantised weights: acc[i][.] (+)= sum over
// the panel's rows of x[i, k] * panel[k, columns], MT rows of x.
template <class V, int MT, int CR>
void int8_from_panel(const float* x, int64_t ldx, const float* panel, int64_t rows, float* c, int64_t ldc,
                     bool accumulate) {
  typename V::F acc[MT][CR];
  for (int i = 0; i < MT; ++i)
    for (int r = 0; r < CR; ++r) acc[i][r] = accumulate ? V::load(c + i * ldc + r * V::kWidth) : V::zero();
  for (int64_t k = 0; k < rows; ++k) {
    typename V::F wv[CR];
    for (int r = 0; r < CR; ++r) wv[r] = V::load(panel + k * kInt8Group + r * V::kWidth);
    for (int i = 0; i < MT; ++i) {
      const typename V::F xv = V::set1(x[i * ldx + k]);
      for (int r = 0; r < CR; ++r) acc[i][r] = V::fma(xv, wv[r], acc[i][r]);
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int r = 0; r < CR; ++r) V::store(c + i * ldc + r * V::kWidth, acc[i][r]);
}

using Int8PanelFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, bool);

template <class V>
Int8PanelFn int8_pick_panel(int64_t mt) {
  constexpr int CR = V::kPanelCols / V::kWidth;
  switch (mt) {
    case 1: return int8_from_panel<V, 1, CR>;
    case 2: return int8_from_panel<V, 2, CR>;
    case 3: return int8_from_panel<V, 3, CR>;
    case 4: return int8_from_panel<V, 4, CR>;
    case 5: return int8_from_panel<V, 5, CR>;
    default: return int8_from_panel<V, 6, CR>;
  }
}

// Up to kInt8DirectM rows take the few-row tiles (kDirectRows rows, kDirectCols columns: one
// pass over the group's stream); more rows take kPanelRows x kPanelCols tiles, every tile of
// the unit over one segment (at most 32 KB of the group's pair rows, in L1 or L2) before the
// next. The same integer sums either way.
template <class V>
void int8_tile(const Int8GemmArgs& a, int64_t m0, int64_t m1, int64_t g0, int64_t g1) {
  static_assert(V::kDirectRows >= 1 && V::kDirectRows <= 6 && V::kPanelRows >= 1 && V::kPanelRows <= 6,
                "int8_pick covers 1..6 rows");
  alignas(64) float c[kInt8BlockM * kInt8MaxItemGroups * kInt8Group];
  const int64_t ldc = (g1 - g0) * kInt8Group, rows = m1 - m0, pairs = (a.K + 1) / 2;
  const bool few = rows <= kInt8DirectM;
  for (int64_t g = g0; g < g1; ++g) {
    const int8_t* q = a.q + g * pairs * kInt8PairRow;
    const float* s = a.s + g * a.KG * kInt8Group;
    float* cg = c + (g - g0) * kInt8Group;
    int64_t e = 0;
    // a segment (at most 32 KB of the group) at a time, every call over its columns and rows
    // while it is in cache (a pass per column run over the whole K would fetch each line again)
    int8_segments(0, a.K, a.G, a.O, [&](int64_t ks, int64_t ke, int64_t t) {
      const int64_t tile_rows = few ? V::kDirectRows : V::kPanelRows;
      for (int64_t m = m0; m < m1; m += tile_rows) {
        const int64_t mt = std::min<int64_t>(tile_rows, m1 - m);
        const int64_t cols = few ? V::kDirectCols(static_cast<int>(mt)) : V::kPanelCols;
        const Int8SegmentFn fn = few ? int8_pick<V, false>(mt) : int8_pick<V, true>(mt);
        for (int64_t col = 0; col < kInt8Group; col += cols)
          fn(a.xq + m * a.ldq, a.ldq, q + 2 * col, ks, ke, a.xs + m * a.segs + e, a.segs, s + t * kInt8Group + col,
             cg + (m - m0) * ldc + col, ldc, ks == 0);
      }
      ++e;
    });
  }
  store_rows(c, ldc, m0, m1, g0 * kInt8Group, std::min(a.N, g1 * kInt8Group), a.bias, a.out, a.ldo, a.out_bf16);
}
