// The INT4 GEMM tile of the vector instruction sets (AVX2: 8 lanes, AVX-512: 16), written once
// over a vector type V that the ISA's file supplies; included as gemm_tiles.h is (inside the
// file's target region and anonymous namespace, after gemm_tiles.h).
//
// The packed weight (kernel_table.h): per group of 64 columns and pair of K rows, 16 words of
// 32 bits; word l's nibble j holds column 8 j + l % 8 of row 2p + l / 8. A load of kWidth words
// is R = kWidth / 8 rows of 64 columns (AVX2: one row, AVX-512: both rows of the pair), and
// nibble j of every word is the register of columns 8j .. 8j + 7 of each of those rows.
//
// A nibble becomes a float without a conversion: OR-ing it into the mantissa of 2^23 gives the
// float 2^23 + u * 16^j exactly, and subtracting 2^23 + z * 16^j (z the zero point) leaves
// (u - z) * 16^j, exact. Nibbles 0..4 are read in place, 5..7 after one shift by 20 bits (a
// nibble must stay below the exponent's bit 23): m_j = 16^j or 16^(j - 5). So each register of
// weights costs one mask-and-OR, one subtraction and its FMAs.
//
// Few rows: per group t and row i, part_j = sum over the group's k of x[i, k] * (u - z) m_j,
// then out += part_j * (S / m_j) (the power of two is exact); the R rows of a register are
// summed at the end of the group. Many rows: a chunk of K is dequantised into the fp32 panel as
// ((u - z) m_j) * (S / m_j) = (u - z) * S, each weight rounded once (the spec), and multiplied
// by the INT8 path's panel micro-kernels.
//
// V provides, besides what gemm_tiles.h asks for: I (kWidth int32 lanes), load_words(p),
// srli(I, n), magic(v, mask) = the float whose bits are (v & mask) | 0x4B000000, sub(a, b),
// mul(a, b), bcast8(const float*) and bcast8_u8(const uint8_t*) (8 values repeated R times),
// xrows(a, b) (a in the first 8 lanes, b in the next 8 where R = 2), add8(out, v) (out[0..7] +=
// the sum of v's R groups of 8 lanes), store8(row0, row1, v) (lanes 0..7 to row0, 8..15 to row1
// where R = 2 and row1 is not null).

constexpr int64_t kInt4PairBytes = 64;  // one pair of K rows of a 64-column group
constexpr float kMagic = 8388608.0f;    // 2^23
constexpr float kNibbleScale[8] = {1.0f, 16.0f, 256.0f, 4096.0f, 65536.0f, 1.0f, 16.0f, 256.0f};
constexpr int kNibbleShift[8] = {0, 4, 8, 12, 16, 0, 4, 8};  // within the word, or within the word >> 20

// 2^23 + z m_j for the group's 8 registers (symmetric: z = 8).
template <class V>
void int4_zeros(const uint8_t* z, typename V::F* zf) {
  for (int j = 0; j < 8; ++j)
    zf[j] = z ? V::fma(V::bcast8_u8(z + 8 * j), V::set1(kNibbleScale[j]), V::set1(kMagic))
              : V::set1(kMagic + 8.0f * kNibbleScale[j]);
}

// (u - z) m_j of the 8 registers of the word vector at w.
template <class V>
void int4_centred(const uint8_t* w, const typename V::F* zf, typename V::F* wv) {
  const typename V::I v = V::load_words(w), high = V::srli(v, 20);
  for (int j = 0; j < 5; ++j) wv[j] = V::sub(V::magic(v, 15u << kNibbleShift[j]), zf[j]);
  for (int j = 5; j < 8; ++j) wv[j] = V::sub(V::magic(high, 15u << kNibbleShift[j]), zf[j]);
}

// out[i, 0..63] = the products of MT rows of x (row stride ldx) with one group's packed weight
// q (scales s, zero points z or null, both [KG, 64]) over K columns: the few-rows path.
template <class V, int MT>
void int4_direct(const float* x, int64_t ldx, const uint8_t* q, const float* s, const uint8_t* z, int64_t K,
                 int64_t G, int64_t O, float* out, int64_t ldo) {
  constexpr int R = V::kWidth / 8;
  for (int i = 0; i < MT; ++i)
    for (int64_t n = 0; n < 64; ++n) out[i * ldo + n] = 0.0f;
  for (int64_t kg = 0; kg < K;) {
    const int64_t t = (kg + O) / G, kend = std::min(K, (t + 1) * G - O);
    typename V::F zf[8], part[MT][8];
    int4_zeros<V>(z ? z + t * 64 : nullptr, zf);
    for (int i = 0; i < MT; ++i)
      for (int j = 0; j < 8; ++j) part[i][j] = V::zero();
    for (int64_t k = kg - kg % R; k < kend; k += R) {
      const uint8_t* w = q + (k / 2) * kInt4PairBytes + (k % 2) * (kInt4PairBytes / 2);
      V::prefetch(w + 32 * kInt4PairBytes);
      typename V::F wv[8];
      int4_centred<V>(w, zf, wv);
      const bool whole = k >= kg && k + R <= kend;
      for (int i = 0; i < MT; ++i) {
        const float* xi = x + i * ldx;
        const typename V::F xv = whole ? V::xrows(xi[k], R > 1 ? xi[k + R - 1] : 0.0f)
                                       : V::xrows(k >= kg ? xi[k] : 0.0f, R > 1 && k + 1 < kend ? xi[k + 1] : 0.0f);
        for (int j = 0; j < 8; ++j) part[i][j] = V::fma(xv, wv[j], part[i][j]);
      }
    }
    for (int j = 0; j < 8; ++j) {
      const typename V::F sv = V::mul(V::bcast8(s + t * 64 + 8 * j), V::set1(1.0f / kNibbleScale[j]));
      for (int i = 0; i < MT; ++i) V::add8(out + i * ldo + 8 * j, V::mul(part[i][j], sv));
    }
    kg = kend;
  }
}

// panel[k - k0][0..63] = the dequantised weight (u - z) * S of rows [k0, k1), each rounded once.
template <class V>
void int4_panel(const uint8_t* q, const float* s, const uint8_t* z, int64_t G, int64_t O, int64_t k0, int64_t k1,
                float* panel) {
  constexpr int R = V::kWidth / 8;
  for (int64_t kg = k0; kg < k1;) {
    const int64_t t = (kg + O) / G, kend = std::min(k1, (t + 1) * G - O);
    typename V::F zf[8], sv[8];
    int4_zeros<V>(z ? z + t * 64 : nullptr, zf);
    for (int j = 0; j < 8; ++j) sv[j] = V::mul(V::bcast8(s + t * 64 + 8 * j), V::set1(1.0f / kNibbleScale[j]));
    for (int64_t k = kg - kg % R; k < kend; k += R) {
      typename V::F wv[8];
      int4_centred<V>(q + (k / 2) * kInt4PairBytes + (k % 2) * (kInt4PairBytes / 2), zf, wv);
      float* row0 = k >= kg ? panel + (k - k0) * 64 : nullptr;
      float* row1 = R > 1 && k + 1 < kend ? panel + (k + 1 - k0) * 64 : nullptr;
      for (int j = 0; j < 8; ++j) V::store8(row0, row1, V::mul(wv[j], sv[j]), 8 * j);
    }
    kg = kend;
  }
}

template <class V>
void int4_tile(const Int8GemmArgs& a, int64_t m0, int64_t m1, int64_t g0, int64_t g1) {
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
      for (int64_t m = m0; m < m1; m += 2) {
        if (m1 - m >= 2)
          int4_direct<V, 2>(a.x + m * a.K, a.K, q, s, z, a.K, a.G, a.O, cg + (m - m0) * ldc, ldc);
        else
          int4_direct<V, 1>(a.x + m * a.K, a.K, q, s, z, a.K, a.G, a.O, cg + (m - m0) * ldc, ldc);
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
