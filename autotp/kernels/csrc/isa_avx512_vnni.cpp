// The AVX512-VNNI path (Cascade Lake, Ice Lake, Sapphire Rapids and later Xeons, AMD Zen 4 and
// later): INT8 only. vpdpwssd multiplies the int16 pairs of the activations by the weights'
// and adds both products to the int32 sums in one instruction, where AVX-512 issues vpmaddwd
// then vpaddd. The products and sums are the same exact integers (the spec, kernel_table.h:
// |sum| < 2^31, and vpdpwssd does not saturate), so results are identical to the AVX-512 path
// bit for bit. Everything else is left to the AVX-512 table below it.
#include "kernel_table.h"

#if AUTOTP_X86_TABLES

#include <immintrin.h>

#include <algorithm>

namespace autotp {
namespace {

bool supported() {
  __builtin_cpu_init();
  return avx512_table().supported() && __builtin_cpu_supports("avx512vnni");
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma")

#include "avx512_vector.h"

struct Avx512Vnni : Avx512 {
  // (inline assembly: with the intrinsic, GCC 12 copied each accumulator to another register and
  // back around every vpdpwssd of the 6-row panel tile, and spilled some, which made it 1.4x
  // slower than vpmaddwd + vpaddd; the "+v" operand keeps the accumulator in its register)
  static A madd(X x, W w, A acc) {
    asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w));
    return acc;
  }
};

#include "gemm_tiles.h"

#pragma GCC pop_options

}  // namespace

const KernelTable& avx512_vnni_table() {
  const KernelTable& below = avx512_table();
  static const KernelTable table{"avx512_vnni", supported, nullptr, nullptr, 0, 0, 0, int8_tile<Avx512Vnni>, nullptr,
                                 nullptr, below.sum_bf16, below.sum_f32, below.stream_read, nullptr, below.int8_x_bf16,
                                 below.int8_x_f32};
  return table;
}

}  // namespace autotp

#endif  // AUTOTP_X86_TABLES
