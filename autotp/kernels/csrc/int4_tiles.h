// The INT4 GEMM tile of the vector instruction sets for fp32 activations (AVX2: 8 lanes,
// AVX-512: 16), written once over a vector type V that the ISA's file supplies; included as
// gemm_tiles.h is (inside the file's target region and anonymous namespace, after it).
//
// The packed weight (kernel_table.h): per group of 64 columns and pair p of K rows, two blocks
// h of 32 bytes, byte 32 h + 2 i + r holding columns 32 h + i (low nibble) and 32 h + 16 + i
// (high) of row 2p + r. Read as 32-bit words, word l' of block h holds in nibble j (bits 4j ..)
// column 32 h + 16 (j % 2) + 2 l' + j / 4 of row 2 p + (j / 2) % 2. A load of kWidth words is
// R = kWidth / 8 blocks (AVX2: one, AVX-512: both), and nibble j of every word is one register
// of weights (a fixed set of columns, one row of the pair).
//
// A nibble becomes a float without a conversion: OR-ing it into the mantissa of 2^23 gives the
// float 2^23 + u * m_j exactly, and subtracting 2^23 + z * m_j (z the zero point) leaves
// (u - z) * m_j, exact. Nibbles 0..4 are read in place (m_j = 16^j), 5..7 after one shift by 20
// bits (m_j = 16^(j - 5); a nibble must stay below the exponent's bit 23). So each register of
// weights costs one mask-and-OR, one subtraction and its FMAs.
//
// Few rows: per group t and row i, part_j = sum over the group's k of x[i, k] * (u - z) m_j,
// then acc_j += part_j * (S / m_j) (the power of two is exact); the columns are put in order at
// the end. Many rows: a chunk of K is dequantised into an fp32 panel as (u - z) * S, each weight
// rounded once (the spec), and multiplied by the INT8 path's panel micro-kernels.
//
// V provides, besides what gemm_tiles.h asks for: I (kWidth int32 lanes), load_words(p),
// srli(I, n), and_i(I, n), to_float(I), magic(v, mask) = the float whose bits are
// (v & mask) | 0x4B000000, sub(a, b), mul(a, b), widen_pairs(p) (the kWidth bytes at p as int32
// lanes, even bytes first, then odd), bcast_half(p) (kWidth / 2 floats, twice) and
// store_halves(row0, row1, v) (the first half of the lanes to row0, the second to row1, where
// not null).

constexpr int64_t kInt4PairBytes = 64;  // one pair of K rows of a 64-column group
constexpr float kMagic = 8388608.0f;    // 2^23
constexpr float kNibbleScale[8] = {1.0f, 16.0f, 256.0f, 4096.0f, 65536.0f, 1.0f, 16.0f, 256.0f};
constexpr int kNibbleShift[8] = {0, 4, 8, 12, 16, 0, 4, 8};  // within the word, or within the word >> 20

// The column (of 64) that lane `lane` of nibble register j holds, for blocks from h0.
inline int64_t int4_column(int j, int64_t lane, int64_t h0) {
  return 32 * (h0 + lane / 8) + 16 * (j % 2) + 2 * (lane % 8) + j / 4;
}

// For group t: zf[j] = 2^23 + z m_j and sv[j] = S / m_j, lane by lane (symmetric: z = 8).
template <class V>
void int4_group_constants(const float* s, const uint8_t* z, int64_t h0, float (*zf)[V::kWidth],
                          float (*sv)[V::kWidth]) {
  for (int j = 0; j < 8; ++j)
    for (int64_t lane = 0; lane < V::kWidth; ++lane) {
      const int64_t col = int4_column(j, lane, h0);
      zf[j][lane] = kMagic + kNibbleScale[j] * (z ? static_cast<float>(z[col]) : 8.0f);
      sv[j][lane] = s[col] * (1.0f / kNibbleScale[j]);
    }
}

// out[i, 0..63] (row stride ldo) += the products of MT rows of x (row stride ldx) with the
// blocks from h0 of one group's packed weight q (scales s, zero points z or null, [KG, 64]).
template <class V, int MT>
void int4_direct(const float* x, int64_t ldx, const uint8_t* q, const float* s, const uint8_t* z, int64_t h0,
                 int64_t K, int64_t G, int64_t O, float* out, int64_t ldo) {
  alignas(64) float zf[8][V::kWidth], sv[8][V::kWidth], acc[MT][8][V::kWidth];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < 8; ++j) V::store(acc[i][j], V::zero());
  for (int64_t kg = 0; kg < K;) {
    const int64_t t = (kg + O) / G, kend = std::min(K, (t + 1) * G - O);
    int4_group_constants<V>(s + t * 64, z ? z + t * 64 : nullptr, h0, zf, sv);
    typename V::F part[MT][8];
    for (int i = 0; i < MT; ++i)
      for (int j = 0; j < 8; ++j) part[i][j] = V::zero();
    for (int64_t p = kg / 2; 2 * p < kend; ++p) {
      const uint8_t* w = q + p * kInt4PairBytes + 32 * h0;
      V::prefetch(w + 32 * kInt4PairBytes);
      const typename V::I v = V::load_words(w), high = V::srli(v, 20);
      typename V::F wv[8];
      for (int j = 0; j < 5; ++j) wv[j] = V::sub(V::magic(v, 15u << kNibbleShift[j]), V::load(zf[j]));
      for (int j = 5; j < 8; ++j) wv[j] = V::sub(V::magic(high, 15u << kNibbleShift[j]), V::load(zf[j]));
      const bool whole = 2 * p >= kg && 2 * p + 2 <= kend;
      for (int i = 0; i < MT; ++i) {
        const float* xi = x + i * ldx;
        const float even = whole || 2 * p >= kg ? xi[2 * p] : 0.0f;
        const float odd = whole || 2 * p + 1 < kend ? xi[2 * p + 1] : 0.0f;
        const typename V::F xe = V::set1(even), xo = V::set1(odd);
        for (int j = 0; j < 8; ++j) part[i][j] = V::fma((j / 2) % 2 ? xo : xe, wv[j], part[i][j]);
      }
    }
    for (int i = 0; i < MT; ++i)
      for (int j = 0; j < 8; ++j) V::store(acc[i][j], V::fma(part[i][j], V::load(sv[j]), V::load(acc[i][j])));
    kg = kend;
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < 8; ++j)
      for (int64_t lane = 0; lane < V::kWidth; ++lane) out[i * ldo + int4_column(j, lane, h0)] += acc[i][j][lane];
}

// panel[k - k0][0..63] = the dequantised weight (u - z) * S of rows [k0, k1), each rounded once.
// kWidth bytes of a block (bytes 2i + r: column i of row r) widened to int32 lanes with the even
// bytes first (widen_pairs) are kWidth / 2 columns of both rows of the pair: their low nibbles
// one set of columns, their high nibbles the set 16 further on.
template <class V>
void int4_panel(const uint8_t* q, const float* s, const uint8_t* z, int64_t G, int64_t O, int64_t k0, int64_t k1,
                float* panel) {
  alignas(64) float zf[64];
  for (int64_t kg = k0; kg < k1;) {
    const int64_t t = (kg + O) / G, kend = std::min(k1, (t + 1) * G - O);
    const float* st = s + t * 64;
    for (int64_t c = 0; c < 64; ++c) zf[c] = z ? static_cast<float>(z[t * 64 + c]) : 8.0f;
    for (int64_t p = kg / 2; 2 * p < kend; ++p) {
      const uint8_t* pair = q + p * kInt4PairBytes;
      float* row0 = 2 * p >= kg ? panel + (2 * p - k0) * 64 : nullptr;
      float* row1 = 2 * p + 1 < kend ? panel + (2 * p + 1 - k0) * 64 : nullptr;
      for (int64_t h = 0; h < 2; ++h)
        for (int64_t b = 0; b < 32; b += V::kWidth) {
          const typename V::I v = V::widen_pairs(pair + 32 * h + b);
          const int64_t lo = 32 * h + b / 2, hi = lo + 16;
          const typename V::F ulo = V::to_float(V::and_i(v, 15)), uhi = V::to_float(V::srli(v, 4));
          V::store_halves(row0 ? row0 + lo : nullptr, row1 ? row1 + lo : nullptr,
                          V::mul(V::sub(ulo, V::bcast_half(zf + lo)), V::bcast_half(st + lo)));
          V::store_halves(row0 ? row0 + hi : nullptr, row1 ? row1 + hi : nullptr,
                          V::mul(V::sub(uhi, V::bcast_half(zf + hi)), V::bcast_half(st + hi)));
        }
    }
    kg = kend;
  }
}

template <class V>
void int4_tile(const Int8GemmArgs& a, int64_t m0, int64_t m1, int64_t g0, int64_t g1) {
  constexpr int64_t R = V::kWidth / 8;  // blocks per load
  alignas(64) float c[kInt8BlockM * kInt8MaxItemGroups * kInt8Group];
  alignas(64) float panel[kPanelK * kInt8Group];
  const int64_t ldc = (g1 - g0) * kInt8Group, rows = m1 - m0;
  const int64_t pairs = (a.K + 1) / 2;
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* q = a.q4 + g * pairs * kInt4PairBytes;
    const float* s = a.s + g * a.KG * kInt8Group;
    const uint8_t* z = a.z ? a.z + g * a.KG * kInt8Group : nullptr;
    float* cg = c + (g - g0) * kInt8Group;
    if (rows <= kInt8DirectM) {
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t n = 0; n < kInt8Group; ++n) cg[(m - m0) * ldc + n] = 0.0f;
      for (int64_t m = m0; m < m1; m += 2)
        for (int64_t h0 = 0; h0 < 2; h0 += R) {
          if (m1 - m >= 2)
            int4_direct<V, 2>(a.x + m * a.K, a.K, q, s, z, h0, a.K, a.G, a.O, cg + (m - m0) * ldc, ldc);
          else
            int4_direct<V, 1>(a.x + m * a.K, a.K, q, s, z, h0, a.K, a.G, a.O, cg + (m - m0) * ldc, ldc);
        }
      continue;
    }
    for (int64_t k0 = 0; k0 < a.K; k0 += kPanelK) {
      const int64_t k1 = std::min(a.K, k0 + kPanelK);
      int4_panel<V>(q, s, z, a.G, a.O, k0, k1, panel);
      for (int64_t m = m0; m < m1; m += V::kPanelRows)
        for (int64_t col = 0; col < kInt8Group; col += V::kPanelCols)
          int8_pick_panel<V>(std::min<int64_t>(V::kPanelRows, m1 - m))(
              a.x + m * a.K + k0, a.K, panel + col, k1 - k0, cg + (m - m0) * ldc + col, ldc, k0 > 0);
    }
  }
  store_rows(c, ldc, m0, m1, g0 * kInt8Group, std::min(a.N, g1 * kInt8Group), a.bias, a.out, a.ldo, a.out_bf16);
}
