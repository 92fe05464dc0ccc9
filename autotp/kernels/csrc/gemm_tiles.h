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
//   widen8(q): the kWidth int8 at q, as fp32 (exact)
//   prefetch(p)
//   kTileM (rows per bf16 micro-kernel call, <= 6) and kTileBlocks(mt) (16-column blocks per
//   call, 1..4), kDirectRows / kDirectCols(mt) (INT8, few rows: weights used in registers) and
//   kPanelRows / kPanelCols (INT8, many rows: from a dequantised fp32 panel); column counts are
//   multiples of kWidth that divide 64.
// Accumulation is fp32 in K order everywhere, so every ISA computes the same sums up to the
// association of the K loop's FMAs with the products (each product is rounded once); INT8
// scales each segment's sum once (int8_segments).

#include "epilogue.h"

constexpr int64_t kPrefetchPairs = 16;  // bf16 rows (256 B each) ahead: 4 KB
constexpr int64_t kPrefetchK = 32;      // INT8 rows (64 B each) ahead: 2 KB
constexpr int64_t kPanelK = 256;        // K per dequantised INT8 panel (64 KB of fp32)

// acc[i][.] (+)= sum over `pairs` K pairs of x[i, 2p + s] * W[block j, p, s], for MT rows of x
// (row stride ldx) and NB blocks of the packed group rows at w (row stride kGroupRow).
template <class V, int MT, int NB>
void bf16_micro(const float* x, int64_t ldx, const uint16_t* w, int64_t pairs, float* c, int64_t ldc,
                bool accumulate) {
  constexpr int R = kBlockN / V::kWidth;  // registers per block
  typename V::F acc[MT][NB * R];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NB * R; ++j) acc[i][j] = accumulate ? V::load(c + i * ldc + j * V::kWidth) : V::zero();
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* row = w + p * kGroupRow;
    for (int j = 0; j < NB; ++j) V::prefetch(row + kPrefetchPairs * kGroupRow + j * kRowElems);
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

// The INT8 sums (the vector spec, kernel_table.h): K is cut into segments, each within one
// scale group and one kPanelK chunk; a segment's fp32 sum of x[i, k] * float(Q[n, k]) (products
// in K order, from zero) is scaled once, c = sum * S (the first segment) or c = sum * S + c (the
// rest, in K order). Both INT8 paths walk the same segments in the same order, so a row's
// result does not depend on how many rows the call has.
template <class F>
void int8_segments(int64_t k0, int64_t k1, int64_t G, int64_t O, F&& segment) {
  for (int64_t ks = k0; ks < k1;) {
    const int64_t t = (ks + O) / G, ke = std::min({k1, (t + 1) * G - O, (ks / kPanelK + 1) * kPanelK});
    segment(ks, ke, t);
    ks = ke;
  }
}

// One segment [ks, ke) for MT rows of x (row stride ldx, indexed by absolute k) and CR registers
// of columns, weights widened in registers from q (row stride 64, kPanel false) or read from
// an fp32 panel of float(Q) whose row 0 is K k0 (kPanel true); scaled by s (this group's
// scales of the columns) into c (row stride ldc).
template <class V, int MT, int CR, bool kPanel>
void int8_segment(const float* x, int64_t ldx, const int8_t* q, const float* panel, int64_t k0, int64_t ks,
                  int64_t ke, const float* s, float* c, int64_t ldc, bool first) {
  typename V::F acc[MT][CR];
  for (int i = 0; i < MT; ++i)
    for (int r = 0; r < CR; ++r) acc[i][r] = V::zero();
  for (int64_t k = ks; k < ke; ++k) {
    typename V::F wv[CR];
    if constexpr (kPanel) {
      for (int r = 0; r < CR; ++r) wv[r] = V::load(panel + (k - k0) * kInt8Group + r * V::kWidth);
    } else {
      const int8_t* row = q + k * kInt8Group;
      V::prefetch(row + kPrefetchK * kInt8Group);
      for (int r = 0; r < CR; ++r) wv[r] = V::widen8(row + r * V::kWidth);
    }
    for (int i = 0; i < MT; ++i) {
      const typename V::F xv = V::set1(x[i * ldx + k]);
      for (int r = 0; r < CR; ++r) acc[i][r] = V::fma(xv, wv[r], acc[i][r]);
    }
  }
  for (int r = 0; r < CR; ++r) {
    const typename V::F sv = V::load(s + r * V::kWidth);
    for (int i = 0; i < MT; ++i) {
      float* out = c + i * ldc + r * V::kWidth;
      V::store(out, V::fma(acc[i][r], sv, first ? V::zero() : V::load(out)));
    }
  }
}

// float(Q) of K [k0, k1) for one group, as fp32 rows of 64: panel[k - k0][col].
template <class V>
void int8_panel(const int8_t* q, int64_t k0, int64_t k1, float* panel) {
  constexpr int CR = kInt8Group / V::kWidth;
  for (int64_t k = k0; k < k1; ++k)
    for (int r = 0; r < CR; ++r)
      V::store(panel + (k - k0) * kInt8Group + r * V::kWidth, V::widen8(q + k * kInt8Group + r * V::kWidth));
}

using Int8SegmentFn = void (*)(const float*, int64_t, const int8_t*, const float*, int64_t, int64_t, int64_t,
                               const float*, float*, int64_t, bool);

// Registers of columns per call for MT rows: the panel's fixed width, or the direct path's,
// which may widen as rows get fewer (kDirectCols(MT): its accumulators fill the registers).
template <class V, bool kPanel, int MT>
constexpr int int8_cr() {
  return (kPanel ? V::kPanelCols : V::kDirectCols(MT)) / V::kWidth;
}

template <class V, bool kPanel>
Int8SegmentFn int8_pick(int64_t mt) {
  switch (mt) {
    case 1: return int8_segment<V, 1, int8_cr<V, kPanel, 1>(), kPanel>;
    case 2: return int8_segment<V, 2, int8_cr<V, kPanel, 2>(), kPanel>;
    case 3: return int8_segment<V, 3, int8_cr<V, kPanel, 3>(), kPanel>;
    case 4: return int8_segment<V, 4, int8_cr<V, kPanel, 4>(), kPanel>;
    case 5: return int8_segment<V, 5, int8_cr<V, kPanel, 5>(), kPanel>;
    default: return int8_segment<V, 6, int8_cr<V, kPanel, 6>(), kPanel>;
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

// Up to kInt8DirectM rows each weight row is widened and used in registers (one pass over the
// group's stream); with more, a chunk of K is widened once into an fp32 panel in cache that
// every row tile then reads (the same segments, the same sums).
template <class V>
void int8_tile(const Int8GemmArgs& a, int64_t m0, int64_t m1, int64_t g0, int64_t g1) {
  static_assert(V::kDirectRows >= 1 && V::kDirectRows <= 6 && V::kPanelRows >= 1 && V::kPanelRows <= 6,
                "int8_pick covers 1..6 rows");
  alignas(64) float c[kInt8BlockM * kInt8MaxItemGroups * kInt8Group];
  alignas(64) float panel[kPanelK * kInt8Group];
  const int64_t ldc = (g1 - g0) * kInt8Group, rows = m1 - m0;
  for (int64_t g = g0; g < g1; ++g) {
    const int8_t* q = a.q + g * a.K * kInt8Group;
    const float* s = a.s + g * a.KG * kInt8Group;
    float* cg = c + (g - g0) * kInt8Group;
    if (rows <= kInt8DirectM) {
      for (int64_t m = m0; m < m1; m += V::kDirectRows) {
        const int64_t mt = std::min<int64_t>(V::kDirectRows, m1 - m);
        const Int8SegmentFn fn = int8_pick<V, false>(mt);
        for (int64_t col = 0; col < kInt8Group; col += V::kDirectCols(static_cast<int>(mt)))
          int8_segments(0, a.K, a.G, a.O, [&](int64_t ks, int64_t ke, int64_t t) {
            fn(a.x + m * a.K, a.K, q + col, nullptr, 0, ks, ke, s + t * kInt8Group + col, cg + (m - m0) * ldc + col,
               ldc, ks == 0);
          });
      }
      continue;
    }
    for (int64_t k0 = 0; k0 < a.K; k0 += kPanelK) {
      const int64_t k1 = std::min(a.K, k0 + kPanelK);
      int8_panel<V>(q, k0, k1, panel);
      for (int64_t m = m0; m < m1; m += V::kPanelRows) {
        const Int8SegmentFn fn = int8_pick<V, true>(std::min<int64_t>(V::kPanelRows, m1 - m));
        for (int64_t col = 0; col < kInt8Group; col += V::kPanelCols)
          int8_segments(k0, k1, a.G, a.O, [&](int64_t ks, int64_t ke, int64_t t) {
            fn(a.x + m * a.K, a.K, nullptr, panel + col, k0, ks, ke, s + t * kInt8Group + col,
               cg + (m - m0) * ldc + col, ldc, ks == 0);
          });
      }
    }
  }
  store_rows(c, ldc, m0, m1, g0 * kInt8Group, std::min(a.N, g1 * kInt8Group), a.bias, a.out, a.ldo, a.out_bf16);
}
