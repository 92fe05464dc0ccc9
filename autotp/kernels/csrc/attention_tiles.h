// Decode attention over a bf16 KV cache, written once over the vector type V (gemm_tiles.h
// lists what V provides; this adds hsum(F), the sum of a register's lanes, and hsums(const F*
// v), the register whose lane i is hsum(v[i]) for kWidth registers, and kAttnAccumulators, the
// registers the value sums may hold). Include it after
// gemm_tiles.h, in the same region.
//
// One query position, per (batch row, KV head): the G query heads that share the KV head read
// each cached key and value row once. Scores are fp32 dot products of the fp32 query with the
// bf16 keys widened exactly (each product rounded once, summed in lanes then across them;
// kWidth positions at a time, whose lane sums one hsums reduces),
// times scale plus the additive bias (0 or -inf for a boolean mask); softmax in fp32; the
// output the fp32 sum over positions of probability times value. A position whose bias is
// -inf for every head is not read at all (the unfilled end of a static cache, left padding).

// e^x for x <= 0 (softmax's shifted scores), 0 for -inf, NaN for NaN: 2^n * 2^f with n = round(x log2 e) and
// a degree-6 polynomial for 2^f, f in [-1/2, 1/2] (relative error about 2e-7, a couple of fp32
// ulps); plain arithmetic, so the compiler vectorizes the loop for the file's instruction set.
inline void exp_nonpositive(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float t = x[i] * 1.44269504088896341f;
    const float y = t > -126.0f ? t : -126.0f;  // (NaN too: the conversion to int below stays defined)
    const float r = (y + 12582912.0f) - 12582912.0f;  // round to nearest
    const float f = y - r;
    float p = 1.5403530393381606e-4f;
    p = p * f + 1.3333558146428443e-3f;
    p = p * f + 9.6181291076284772e-3f;
    p = p * f + 5.5504108664821580e-2f;
    p = p * f + 2.4022650695910072e-1f;
    p = p * f + 6.9314718055994531e-1f;
    p = p * f + 1.0f;
    const int32_t bits = (static_cast<int32_t>(r) + 127) << 23;
    float scale;
    __builtin_memcpy(&scale, &bits, sizeof(scale));
    x[i] = x[i] == -INFINITY ? 0.0f : x[i] != x[i] ? x[i] : p * scale;
  }
}

// Softmax's max and sum over a row of scores, in 16 partial lanes (x[l] goes to lane l % 16, the
// lanes then folded in order): loops the compiler vectorizes for the file's instruction set,
// where one running value is a chain of L dependent operations; the same order on every path.
constexpr int kSoftmaxLanes = 16;

inline float lanes_max(const float* x, int64_t n) {
  float part[kSoftmaxLanes];
  for (int i = 0; i < kSoftmaxLanes; ++i) part[i] = -INFINITY;
  int64_t l = 0;
  for (; l + kSoftmaxLanes <= n; l += kSoftmaxLanes)
    for (int i = 0; i < kSoftmaxLanes; ++i) part[i] = x[l + i] > part[i] ? x[l + i] : part[i];
  for (int i = 0; l < n; ++l, ++i) part[i] = x[l] > part[i] ? x[l] : part[i];
  float top = part[0];
  for (int i = 1; i < kSoftmaxLanes; ++i) top = part[i] > top ? part[i] : top;
  return top;
}

inline float lanes_sum(const float* x, int64_t n) {
  float part[kSoftmaxLanes] = {};
  int64_t l = 0;
  for (; l + kSoftmaxLanes <= n; l += kSoftmaxLanes)
    for (int i = 0; i < kSoftmaxLanes; ++i) part[i] += x[l + i];
  for (int i = 0; l < n; ++l, ++i) part[i] += x[l];
  float total = 0.0f;
  for (int i = 0; i < kSoftmaxLanes; ++i) total += part[i];
  return total;
}

// The G heads' scores of kWidth positions from l0 on (all held), written to scores[g * L + l]:
// each key row read whole, in memory order, into a sum of its own (the rows' sums are
// independent, so the CPU overlaps them), the kWidth sums then reduced at once (V::hsums). The
// hardware prefetchers follow such a stream; reading a line of every row of the block in turn
// (as this did before) they did not, and a software prefetch of the next block only partly
// made up for it (AMD EPYC Zen 4, one thread, tools/bench_attention.py, one of 2 ranks' cache at
// 4 beams over 288 positions: GPT-J-1B's 75 MB 4.65 -> 3.81 ms, Llama-1B's 9.4 MB 2.43 -> 2.03).
template <class V>
void score_block(const float* qs, const uint16_t* k, int64_t l0, int64_t G, int64_t L, int64_t D, int64_t Dv,
                 float scale, const float* const* bias, float* scores) {
  constexpr int W = V::kWidth, P = 2 * V::kWidth;
  const int64_t half = Dv / 2;
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = qs + g * D;
    typename V::F sum[W];
    constexpr int R = W % 4 == 0 ? 4 : 1;  // rows whose sums advance together: independent chains of FMAs
    for (int t = 0; t < W; t += R) {
      const uint16_t* row = k + (l0 + t) * D;
      typename V::F acc[R];
      for (int r = 0; r < R; ++r) acc[r] = V::zero();
      for (int64_t j = 0; j < Dv; j += P) {
        const typename V::F qe = V::load(qg + j / 2), qo = V::load(qg + half + j / 2);
        for (int r = 0; r < R; ++r) acc[r] = V::fma(qo, V::odd(row + r * D + j), V::fma(qe, V::even(row + r * D + j), acc[r]));
      }
      for (int r = 0; r < R; ++r) sum[t + r] = acc[r];
    }
    // no scalar tail: the W scores scaled and biased at once, in one fma each (the loop of
    // scalar stores this replaces took a quarter of the block's time: AMD EPYC Zen 4, one thread,
    // 16 layers of a 4-beam Llama-1B cache in cache, 8 query heads per KV head, 1.78-1.96 -> 1.34
    // ms with AVX-512, 2.60-2.75 -> 2.33-2.40 with AVX2)
    if (Dv == D) {
      const typename V::F b = bias[g] ? V::load(bias[g] + l0) : V::zero();
      V::store(scores + g * L + l0, V::fma(V::hsums(sum), V::set1(scale), b));
      continue;
    }
    alignas(64) float s[W];
    V::store(s, V::hsums(sum));
    for (int t = 0; t < W; ++t) {
      const uint16_t* row = k + (l0 + t) * D;
      for (int64_t d = Dv; d < D; ++d) s[t] += qg[d] * bf16_to_float(row[d]);
      scores[g * L + l0 + t] = s[t] * scale + (bias[g] ? bias[g][l0 + t] : 0.0f);
    }
  }
}

// Whether V can score keys across lanes (score_block_across): it transposes 32-bit words in
// registers (V::transpose_words) and multiplies bf16 pairs (V::dot_pairs(acc, keys, pair): acc
// plus the two products of each lane's key pair with the query pair; AVX512-BF16's vdpbf16ps)
template <class V, class = void>
struct ScoresAcross : std::false_type {};
template <class V>
struct ScoresAcross<V, std::void_t<decltype(V::transpose_words(static_cast<typename V::I*>(nullptr))),
                                   decltype((void)V::dot_pairs(V::zero(), typename V::I(), 0u))>>
    : std::true_type {};

// Whether V scores a block of kWidth positions for all G heads at once on matrix tiles
// (V::tile_scores, with V::tile_begin(G) / V::tile_end() around one call's blocks; AMX,
// isa_amx_attention.cpp): where score_block_across would serve (a bf16 query of kAcrossHeads
// heads or more) and G <= V::kTileHeads, the query laid out by across_query for all G heads as
// one group.
template <class V, class = void>
struct ScoresTile : std::false_type {};
template <class V>
struct ScoresTile<V, std::void_t<decltype(V::tile_scores(nullptr, nullptr, nullptr, 0, 0, 0, 0, 0, 0.0f, nullptr,
                                                         nullptr))>> : std::true_type {};

// Query heads per KV head from which score_block_across serves the blocks of positions (its
// transposes are shared by the heads), and the blocks ahead whose keys it prefetches
constexpr int64_t kAcrossHeads = 4;
constexpr int64_t kAcrossAhead = 2;

// score_block's scores for the heads [g0, g0 + NH) (NH <= 8) of a query that is exactly bf16
// (a bf16 model's; exact_normal_bf16), with the keys across lanes: the kWidth key rows, 2 *
// kWidth dims at a time, transposed as bf16 pairs (V::transpose_words: register p then holds
// pair p of every position), and head h's kWidth scores accumulated in one register, one
// V::dot_pairs per pair of dims with the query's pair broadcast. Where score_block widens each
// key row and issues two FMAs per pair and head, then reduces kWidth sums across lanes for
// every head, this issues one instruction per pair and head, widens nothing and reduces
// nothing. The products are exact and summed in fp32 as the FMAs would, pair after pair (only
// a bf16 denormal key, read as 0, can differ). The query comes as qt, its pairs laid out by
// across_query so that each broadcast is at a fixed offset; 8 heads take 8 accumulators and the
// 16 transposed words. The rows are read a line apart and then the lines between, which the
// hardware prefetchers do not follow: each chunk of dims of the block kAcrossAhead ahead is
// prefetched into L2 as the same chunk of this block is read.
template <class V, int NH>
void score_block_across(const uint32_t* qt, const float* q, const uint16_t* k, int64_t l0, int64_t g0, int64_t L,
                        int64_t D, int64_t Dv, float scale, const float* const* bias, float* scores) {
  constexpr int W = V::kWidth, P = 2 * V::kWidth;
  typename V::F acc[NH];
  for (int h = 0; h < NH; ++h) acc[h] = V::zero();
  const bool fetch = g0 == 0 && l0 + (kAcrossAhead + 1) * W <= L;
  const uint16_t* ahead = fetch ? k + (l0 + kAcrossAhead * W) * D : k;  // (only ever a row of the cache)
  for (int64_t j = 0; j < Dv; j += P) {
    if (fetch) {
      // one pointer stepped by the row stride, opaque to the compiler: else it keeps the kWidth
      // row addresses as loop invariants, which (with 8 accumulators and 16 transposed words
      // live) go to the stack and are reloaded for every prefetch
      const uint16_t* row = ahead + j;
      for (int r = 0; r < W; ++r) {
        __builtin_prefetch(row, 0, 2);
        row += D;
        asm("" : "+r"(row));
      }
    }
    typename V::I t[W];
    for (int r = 0; r < W; ++r) t[r] = V::load_words(reinterpret_cast<const uint8_t*>(k + (l0 + r) * D + j));
    V::transpose_words(t);
    const uint32_t* qp = qt + g0 * Dv / 2 + j / 2 * NH;
#pragma GCC unroll 16
    for (int p = 0; p < W; ++p)
      for (int h = 0; h < NH; ++h) acc[h] = V::dot_pairs(acc[h], t[p], qp[p * NH + h]);
  }
  for (int h = 0; h < NH; ++h) {
    const int64_t g = g0 + h;
    if (Dv == D) {
      const typename V::F b = bias[g] ? V::load(bias[g] + l0) : V::zero();
      V::store(scores + g * L + l0, V::fma(acc[h], V::set1(scale), b));
      continue;
    }
    alignas(64) float s[W];
    V::store(s, acc[h]);
    for (int t = 0; t < W; ++t) {
      const uint16_t* row = k + (l0 + t) * D;
      for (int64_t d = Dv; d < D; ++d) s[t] += q[g * D + d] * bf16_to_float(row[d]);
      scores[g * L + l0 + t] = s[t] * scale + (bias[g] ? bias[g][l0 + t] : 0.0f);
    }
  }
}

// Whether each of the n values is exactly a bf16 value and none a bf16 denormal (which
// vdpbf16ps would read as 0): then the bf16 pairs of across_query are the query itself
inline bool exact_normal_bf16(const float* x, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    __builtin_memcpy(&bits, x + i, sizeof(bits));
    ok &= (bits & 0xFFFFu) == 0 && ((bits & 0x7F800000u) != 0 || (bits & 0x7FFFFFFFu) == 0);
  }
  return ok;
}

// The query [G, D] for score_block_across: for each group of `per` heads from g0 (nh of them),
// the bf16 pairs of the first Dv dims as 32-bit words, word g0 * Dv / 2 + i * nh + h holding
// (q[g0 + h, 2i], q[g0 + h, 2i + 1]) as the keys' words hold a pair (the even dim in the low
// half). Groups of 8 for score_block_across; V::tile_scores takes all G heads as one group.
inline void across_query(const float* q, int64_t G, int64_t D, int64_t Dv, uint32_t* qt, int64_t per = 8) {
  for (int64_t g0 = 0; g0 < G; g0 += per) {
    const int64_t nh = std::min<int64_t>(per, G - g0);
    for (int64_t h = 0; h < nh; ++h)
      for (int64_t i = 0; i < Dv / 2; ++i) {
        uint32_t even, odd;
        __builtin_memcpy(&even, q + (g0 + h) * D + 2 * i, sizeof(even));
        __builtin_memcpy(&odd, q + (g0 + h) * D + 2 * i + 1, sizeof(odd));
        qt[g0 * Dv / 2 + i * nh + h] = (even >> 16) | (odd & 0xFFFF0000u);
      }
  }
}

// score_block_across for all G heads, 8 at a time
template <class V>
void score_heads_across(const uint32_t* qt, const float* q, const uint16_t* k, int64_t l0, int64_t G, int64_t L,
                        int64_t D, int64_t Dv, float scale, const float* const* bias, float* scores) {
  for (int64_t g0 = 0; g0 < G; g0 += 8) {
    const auto block = [&](auto nh) {
      score_block_across<V, decltype(nh)::value>(qt, q, k, l0, g0, L, D, Dv, scale, bias, scores);
    };
    switch (std::min<int64_t>(8, G - g0)) {
      case 1: block(std::integral_constant<int, 1>()); break;
      case 2: block(std::integral_constant<int, 2>()); break;
      case 3: block(std::integral_constant<int, 3>()); break;
      case 4: block(std::integral_constant<int, 4>()); break;
      case 5: block(std::integral_constant<int, 5>()); break;
      case 6: block(std::integral_constant<int, 6>()); break;
      case 7: block(std::integral_constant<int, 7>()); break;
      default: block(std::integral_constant<int, 8>()); break;
    }
  }
}

#include "attention_read_ahead.h"

// acc[g0 + h, chunks c] = sum over the positions read of scores[g0 + h, l] * v[l, chunk c], for
// HB heads and C chunks of 2 * kWidth dims from j: 2 * HB * C accumulators in registers, each
// value row's C chunks (contiguous) widened once for all HB heads.
template <class V, int HB, int C>
void value_chunks(const float* scores, const uint16_t* v, const uint8_t* skip, int64_t g0, int64_t L, int64_t D,
                  int64_t j, int64_t half, float* acc, ReadAhead* reads, int64_t ahead) {
  constexpr int64_t P = 2 * V::kWidth;
  typename V::F ae[HB][C], ao[HB][C];
  for (int h = 0; h < HB; ++h)
    for (int c = 0; c < C; ++c) ae[h][c] = ao[h][c] = V::zero();
  for (int64_t l = 0; l < L; ++l) {
    if (reads) reads->fetch_to((L + l + 1) * D * 2 + ahead);
    if (skip[l]) continue;
    const uint16_t* row = v + l * D + j;  // rows in memory order: the hardware prefetchers keep ahead
    typename V::F e[C], o[C];
    for (int c = 0; c < C; ++c) {
      e[c] = V::even(row + c * P);
      o[c] = V::odd(row + c * P);
    }
    for (int h = 0; h < HB; ++h) {
      const typename V::F p = V::set1(scores[(g0 + h) * L + l]);
      for (int c = 0; c < C; ++c) {
        ae[h][c] = V::fma(p, e[c], ae[h][c]);
        ao[h][c] = V::fma(p, o[c], ao[h][c]);
      }
    }
  }
  for (int h = 0; h < HB; ++h)
    for (int c = 0; c < C; ++c) {
      V::store(acc + (g0 + h) * D + (j + c * P) / 2, ae[h][c]);
      V::store(acc + (g0 + h) * D + half + (j + c * P) / 2, ao[h][c]);
    }
}

constexpr int pow2_floor(int n) { return n >= 2 ? 2 * pow2_floor(n / 2) : 1; }

// value_chunks over `chunks` chunks (a power of two, at most C) from j
template <class V, int HB, int C = pow2_floor(V::kAttnAccumulators / 2 / HB)>
void value_pass(int64_t chunks, const float* scores, const uint16_t* v, const uint8_t* skip, int64_t g0, int64_t L,
                int64_t D, int64_t j, int64_t half, float* acc, ReadAhead* reads, int64_t ahead) {
  if constexpr (C > 1) {
    if (chunks < C) return value_pass<V, HB, C / 2>(chunks, scores, v, skip, g0, L, D, j, half, acc, reads, ahead);
  }
  value_chunks<V, HB, C>(scores, v, skip, g0, L, D, j, half, acc, reads, ahead);
}

// chunks per pass for `heads` heads with `left` chunks to go: the largest power of two that
// fits both
template <class V>
int64_t chunks_per_pass(int64_t heads, int64_t left) {
  int64_t c = 1;
  while (c * 2 <= left && 2 * heads * c * 2 <= V::kAttnAccumulators) c *= 2;
  return c;
}

// skip[l] = 1 where every head's bias is -inf at l (no head reads position l), else 0; all 0
// when a head has no bias. Loops over whole rows of positions (vectorised), a mask that heads
// share (the same row) taken once.
inline void unread_positions(const float* const* bias, int64_t G, int64_t L, uint8_t* skip) {
  for (int64_t l = 0; l < L; ++l) skip[l] = 1;
  for (int64_t g = 0; g < G; ++g) {
    if (!bias[g]) {
      for (int64_t l = 0; l < L; ++l) skip[l] = 0;
      return;
    }
    if (g > 0 && bias[g] == bias[g - 1]) continue;
    const float* b = bias[g];
    for (int64_t l = 0; l < L; ++l) skip[l] &= b[l] == -INFINITY;
  }
}

// The positions [0, n) past which no head reads (skip, unread_positions): a static cache's rows
// not written yet (it is allocated for the whole generation, and a step attends over all of
// it, masked). Nothing after n is read, so the step's work follows the tokens so far, not the
// cache's size. L when no position is read at all (the full computation then says what such
// a row gives). Eight positions at a time while they are all unread.
inline int64_t live_positions(const uint8_t* skip, int64_t L) {
  int64_t n = L;
  constexpr uint64_t kAllUnread = 0x0101010101010101ull;
  while (n >= 8) {
    uint64_t word;
    __builtin_memcpy(&word, skip + n - 8, sizeof(word));
    if (word != kAllUnread) break;
    n -= 8;
  }
  while (n > 0 && skip[n - 1]) --n;
  return n > 0 ? n : L;
}

// q [G, D] fp32, k / v [L, D] bf16 (row stride D), bias[g] a row of L fp32 or null,
// out [G, D] fp32; scratch: G * L + 2 * G * D + L floats; next_k as AttendBf16Fn (kernel_table.h).
template <class V>
void attend_bf16_rows(const float* q, const uint16_t* k, const uint16_t* v, const float* const* bias, float scale,
                      float* out, float* scratch, int64_t G, int64_t L, int64_t D, const uint16_t* next_k) {
  constexpr int64_t W = V::kWidth, P = 2 * V::kWidth;  // bf16 values per even / odd load pair
  uint8_t* skip = reinterpret_cast<uint8_t*>(scratch + G * L + 2 * G * D);  // [L]: a position no head reads
  unread_positions(bias, G, L, skip);
  L = live_positions(skip, L);  // (scores and acc below then have this row stride)
  const int64_t Dv = D / P * P, half = Dv / 2;
  float* scores = scratch;      // [G, L]
  uint32_t* qt = reinterpret_cast<uint32_t*>(scratch + G * L);  // [G, D / 2]: score_block_across's query
  float* acc = scratch + G * L + G * D; // [G, D]: even K values of the vector part in [0, half), odd in [half, Dv), tail after
  bool across = false;  // scores with the keys across lanes (score_block_across)
  if constexpr (ScoresAcross<V>::value)
    across = G >= kAcrossHeads && exact_normal_bf16(q, G * D);
  bool tile = false;  // or on matrix tiles (V::tile_scores)
  if constexpr (ScoresTile<V>::value)
    tile = across && G <= V::kTileHeads && Dv > 0;
  if (across) across_query(q, G, D, Dv, qt, tile ? G : 8);
  float* qs = out;              // the query deinterleaved the same way (out is written last)
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t i = 0; i < half; ++i) {
      qs[g * D + i] = q[g * D + 2 * i];
      qs[g * D + half + i] = q[g * D + 2 * i + 1];
    }
    for (int64_t d = Dv; d < D; ++d) qs[g * D + d] = q[g * D + d];
  }
  if constexpr (ScoresTile<V>::value)
    if (tile) V::tile_begin(G);
  const int64_t ahead = attention_read_ahead(), row_bytes = D * 2;
  ReadAhead reads(k, v, next_k, L * row_bytes);
  if (ahead > 0) reads.fetch_to(ahead);
  for (int64_t l0 = 0; l0 < L;) {
    if (ahead > 0) reads.fetch_to((l0 + W) * row_bytes + ahead);
    bool any = false;  // a block of kWidth positions at once where one of them is read, else one
    for (int64_t l = l0; l < std::min(L, l0 + W) && !any; ++l) any = !skip[l];
    if (any && l0 + W <= L) {
      if constexpr (ScoresTile<V>::value)
        if (tile) V::tile_scores(qt, q, k, l0, G, L, D, Dv, scale, bias, scores);
      if constexpr (ScoresAcross<V>::value)
        if (across && !tile) score_heads_across<V>(qt, q, k, l0, G, L, D, Dv, scale, bias, scores);
      if (!across) score_block<V>(qs, k, l0, G, L, D, Dv, scale, bias, scores);
      for (int64_t l = l0; l < l0 + W; ++l)
        if (skip[l])
          for (int64_t g = 0; g < G; ++g) scores[g * L + l] = -INFINITY;  // not read: whatever its row holds
      l0 += W;
      continue;
    }
    const uint16_t* row = k + l0 * D;
    for (int64_t g = 0; g < G; ++g) {
      if (skip[l0]) {
        scores[g * L + l0] = -INFINITY;
        continue;
      }
      const float* qg = qs + g * D;
      typename V::F sum = V::zero();
      for (int64_t j = 0; j < Dv; j += P) {
        sum = V::fma(V::load(qg + j / 2), V::even(row + j), sum);
        sum = V::fma(V::load(qg + half + j / 2), V::odd(row + j), sum);
      }
      float s = V::hsum(sum);
      for (int64_t d = Dv; d < D; ++d) s += qg[d] * bf16_to_float(row[d]);
      scores[g * L + l0] = s * scale + (bias[g] ? bias[g][l0] : 0.0f);
    }
    ++l0;
  }
  if constexpr (ScoresTile<V>::value)
    if (tile) V::tile_end();
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * L;
    const float top = lanes_max(sg, L);
    for (int64_t l = 0; l < L; ++l) sg[l] -= top;
    exp_nonpositive(sg, L);
    const float inv = 1.0f / lanes_sum(sg, L);
    for (int64_t l = 0; l < L; ++l) sg[l] *= inv;
  }
  for (int64_t l = 0; l < L; ++l) skip[l] = 1;  // masked (or too small to matter at all): the row is not read
  for (int64_t g = 0; g < G; ++g)
    for (int64_t l = 0; l < L; ++l) skip[l] &= scores[g * L + l] == 0.0f;
  for (int64_t g0 = 0; g0 < G; g0 += 4) {  // blocks of up to 4 heads, passes over up to 8 chunks of dims
    const int64_t heads = std::min<int64_t>(4, G - g0);
    for (int64_t j = 0; j < Dv;) {
      const int64_t chunks = chunks_per_pass<V>(heads, (Dv - j) / P);
      ReadAhead* r = ahead > 0 && g0 == 0 && j == 0 ? &reads : nullptr;  // the first pass streams the values
      switch (heads) {
        case 1: value_pass<V, 1>(chunks, scores, v, skip, g0, L, D, j, half, acc, r, ahead); break;
        case 2: value_pass<V, 2>(chunks, scores, v, skip, g0, L, D, j, half, acc, r, ahead); break;
        case 3: value_pass<V, 3>(chunks, scores, v, skip, g0, L, D, j, half, acc, r, ahead); break;
        default: value_pass<V, 4>(chunks, scores, v, skip, g0, L, D, j, half, acc, r, ahead); break;
      }
      j += chunks * P;
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = Dv; d < D; ++d) {
      float a = 0.0f;
      for (int64_t l = 0; l < L; ++l)
        if (!skip[l]) a += scores[g * L + l] * bf16_to_float(v[l * D + d]);
      acc[g * D + d] = a;
    }
  for (int64_t g = 0; g < G; ++g) {
    const float* ag = acc + g * D;
    for (int64_t i = 0; i < half; ++i) {
      out[g * D + 2 * i] = ag[i];
      out[g * D + 2 * i + 1] = ag[half + i];
    }
    for (int64_t d = Dv; d < D; ++d) out[g * D + d] = ag[d];
  }
}
