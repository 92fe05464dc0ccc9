// The epilogue every GEMM path shares: bias, then fp32 or bf16 (round to nearest even) store.
// Portable code; it touches each output once, against K multiply-adds per output in the tiles.
#include "kernel_table.h"

namespace autotp {

void store_rows(const float* c, int64_t ldc, int64_t m0, int64_t m1, int64_t n0, int64_t n1, const float* bias,
                void* out, int64_t ldo, bool out_bf16) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* crow = c + (m - m0) * ldc - n0;
    if (out_bf16) {
      uint16_t* orow = static_cast<uint16_t*>(out) + m * ldo;
      for (int64_t n = n0; n < n1; ++n) orow[n] = float_to_bf16(bias ? crow[n] + bias[n] : crow[n]);
    } else {
      float* orow = static_cast<float*>(out) + m * ldo;
      for (int64_t n = n0; n < n1; ++n) orow[n] = bias ? crow[n] + bias[n] : crow[n];
    }
  }
}

}  // namespace autotp
