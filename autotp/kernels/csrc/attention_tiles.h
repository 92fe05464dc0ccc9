// Decode attention over a bf16 KV cache, written once over the vector type V (gemm_tiles.h
// lists what V provides; this adds hsum(F), the sum of a register's lanes). Include it after
// gemm_tiles.h, in the same region.
//
// One query position, per (batch row, KV head): the G query heads that share the KV head read
// each cached key and value row once. Scores are fp32 dot products of the fp32 query with the
// bf16 keys widened exactly (each product rounded once, summed in lanes then across them),
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

// q [G, D] fp32, k / v [L, D] bf16 (row stride D), bias[g] a row of L fp32 or null,
// out [G, D] fp32; scratch: G * L + G * D floats.
template <class V>
void attend_bf16_rows(const float* q, const uint16_t* k, const uint16_t* v, const float* const* bias, float scale,
                      float* out, float* scratch, int64_t G, int64_t L, int64_t D) {
  constexpr int64_t W = V::kWidth, P = 2 * V::kWidth;  // bf16 values per even / odd load pair
  const int64_t Dv = D / P * P, half = Dv / 2;
  float* scores = scratch;      // [G, L]
  float* acc = scratch + G * L; // [G, D]: even K values of the vector part in [0, half), odd in [half, Dv), tail after
  float* qs = out;              // the query deinterleaved the same way (out is written last)
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t i = 0; i < half; ++i) {
      qs[g * D + i] = q[g * D + 2 * i];
      qs[g * D + half + i] = q[g * D + 2 * i + 1];
    }
    for (int64_t d = Dv; d < D; ++d) qs[g * D + d] = q[g * D + d];
  }
  for (int64_t l = 0; l < L; ++l) {
    bool masked = true;
    for (int64_t g = 0; g < G && masked; ++g) masked = bias[g] && bias[g][l] == -INFINITY;
    const uint16_t* row = k + l * D;
    for (int64_t g = 0; g < G; ++g) {
      if (masked) {
        scores[g * L + l] = -INFINITY;
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
      scores[g * L + l] = s * scale + (bias[g] ? bias[g][l] : 0.0f);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * L;
    float top = -INFINITY, total = 0.0f;
    for (int64_t l = 0; l < L; ++l) top = std::max(top, sg[l]);
    for (int64_t l = 0; l < L; ++l) sg[l] -= top;
    exp_nonpositive(sg, L);
    for (int64_t l = 0; l < L; ++l) total += sg[l];
    const float inv = 1.0f / total;
    for (int64_t l = 0; l < L; ++l) sg[l] *= inv;
    for (int64_t d = 0; d < D; ++d) acc[g * D + d] = 0.0f;
  }
  for (int64_t l = 0; l < L; ++l) {
    bool zero = true;
    for (int64_t g = 0; g < G && zero; ++g) zero = scores[g * L + l] == 0.0f;
    if (zero) continue;  // masked (or too small to matter at all): the row is not read
    const uint16_t* row = v + l * D;
    for (int64_t g = 0; g < G; ++g) {
      const float p = scores[g * L + l];
      const typename V::F pv = V::set1(p);
      float* ag = acc + g * D;
      for (int64_t j = 0; j < Dv; j += P) {
        V::store(ag + j / 2, V::fma(pv, V::even(row + j), V::load(ag + j / 2)));
        V::store(ag + half + j / 2, V::fma(pv, V::odd(row + j), V::load(ag + half + j / 2)));
      }
      for (int64_t d = Dv; d < D; ++d) ag[d] += p * bf16_to_float(row[d]);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const float* ag = acc + g * D;
    for (int64_t i = 0; i < half; ++i) {
      out[g * D + 2 * i] = ag[i];
      out[g * D + 2 * i + 1] = ag[half + i];
    }
    for (int64_t d = Dv; d < D; ++d) out[g * D + d] = ag[d];
  }
  (void)W;
}
