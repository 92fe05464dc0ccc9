// INT8's activations (the spec in kernel_table.h: int16 X, |X| at most 32767 or, for 8-bit
// activations, 127, and its scales xs per row and segment), written once over the element type
// of x (bf16 as uint16_t, or float). Include it
// inside an ISA file's `#pragma GCC target` region and anonymous namespace, as gemm_tiles.h:
// each table then holds its own copy, compiled for its instruction set (the vector ones do 8 or
// 16 divisions at once). Each loop is exact (an integer max, a division, adds, compares and
// conversions, nothing reassociated), so every copy gives the same bits.

// max |x| over n values as the bits of a float: the bits of |v| order as the values do, and a
// NaN's are above every number's (0x7F800000, infinity)
template <typename T>
uint32_t abs_max_bits(const T* x, int64_t n) {
  uint32_t top = 0;
  for (int64_t k = 0; k < n; ++k) {
    uint32_t bits;
    if constexpr (std::is_same_v<T, float>) __builtin_memcpy(&bits, x + k, sizeof(bits));
    else bits = static_cast<uint32_t>(x[k]) << 16;
    top = std::max(top, bits & 0x7FFFFFFFu);
  }
  return top;
}

// out[k] = round-half-even(x[k] / step) clamped to +-x_max: the quotient in double, rounded by
// adding and subtracting 1.5 * 2^52
template <typename T>
void round_to_int16(const T* x, int64_t n, double step, int16_t* out, int16_t limit) {
  const double round = 6755399441055744.0, x_max = limit;
  for (int64_t k = 0; k < n; ++k) {
    double v;
    if constexpr (std::is_same_v<T, float>) v = x[k];
    else v = bf16_to_float(x[k]);
    v = (v / step + round) - round;
    v = v < -x_max ? -x_max : v;
    v = v > x_max ? x_max : v;
    out[k] = static_cast<int16_t>(static_cast<int32_t>(v));
  }
}

// Rows [m0, m1) of x [M, K]: per segment xs = a / x_max in fp32 (a = max |x|; x_max 32767, or
// 127 for 8-bit activations) and X = round-half-even(x / xs), the quotient in double, into xq
// (row stride ldq; the columns past K zero) and xs [M, segs]. X and xs are 0 when xs is (a below
// x_max times the least denormal); X is 0 and xs NaN when the segment holds a NaN or an infinity.
template <typename T>
void int8_activation_rows(const T* x, int64_t m0, int64_t m1, int64_t K, int64_t G, int64_t O, int16_t* xq,
                          int64_t ldq, float* xs, int64_t segs, int16_t x_max) {
  for (int64_t m = m0; m < m1; ++m) {
    const T* row = x + m * K;
    int16_t* out = xq + m * ldq;
    int64_t e = 0;
    int8_segments(0, K, G, O, [&](int64_t ks, int64_t ke, int64_t) {
      const uint32_t top = abs_max_bits(row + ks, ke - ks);
      float a;
      __builtin_memcpy(&a, &top, sizeof(a));
      float& scale = xs[m * segs + e++];
      scale = a / static_cast<float>(x_max);
      if (top >= 0x7F800000u || scale == 0.0f) {  // a NaN or an infinity; or all (nearly) zero
        scale = scale == 0.0f ? 0.0f : __builtin_nanf("");
        std::fill(out + ks, out + ke, int16_t{0});
        return;
      }
      round_to_int16(row + ks, ke - ks, static_cast<double>(scale), out + ks, x_max);
    });
    std::fill(out + K, out + ldq, int16_t{0});
  }
}
