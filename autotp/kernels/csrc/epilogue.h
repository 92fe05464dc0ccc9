// The epilogue every GEMM path shares: bias, then fp32 or bf16 (round to nearest even, NaN kept
// quiet) store. Include it inside an ISA file's `#pragma GCC target` region and anonymous
// namespace, as gemm_tiles.h is: each path then gets a copy vectorised for its own registers
// (at prefill sizes a scalar epilogue costs as much as the AMX multiply). Plain C++, the loops
// written so that the compiler vectorises them.

// Rows [m0, m1), columns [n0, n1) of the fp32 tile c (row stride ldc, column n0 first) plus
// bias (if any) to out[m, n] (row stride ldo), as bf16 or fp32.
inline void store_rows(const float* c, int64_t ldc, int64_t m0, int64_t m1, int64_t n0, int64_t n1, const float* bias,
                       void* out, int64_t ldo, bool out_bf16) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* crow = c + (m - m0) * ldc - n0;
    if (out_bf16) {
      uint16_t* orow = static_cast<uint16_t*>(out) + m * ldo;
      for (int64_t n = n0; n < n1; ++n) {
        const float v = bias ? crow[n] + bias[n] : crow[n];
        uint32_t bits;
        __builtin_memcpy(&bits, &v, sizeof(bits));
        const uint16_t rounded = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
        orow[n] = v != v ? static_cast<uint16_t>(0x7FC0) : rounded;
      }
    } else {
      float* orow = static_cast<float*>(out) + m * ldo;
      for (int64_t n = n0; n < n1; ++n) orow[n] = bias ? crow[n] + bias[n] : crow[n];
    }
  }
}
