// The AVX512-BF16 path (Cooper Lake, Sapphire Rapids and later Xeons, AMD Zen 4 and later):
// vdpbf16ps multiplies a register of 16 bf16 pairs by a broadcast activation pair and adds both
// products to 16 fp32 lanes in one instruction, where the AVX-512 path widens the weights and
// issues two FMAs. The packed group rows are already the pairs it reads (kernel_table.h), so the
// weight streams as it is; the activations must be bf16 (an fp32 activation has no exact bf16
// pair), so this table has only the bf16-activation tile and leaves fp32 activations and INT8
// to the AVX-512 table below it. vdpbf16ps treats denormal inputs as zero and flushes denormal
// sums (below 1.2e-38): the only way it can differ from the generic path beyond summation order.
#include "kernel_table.h"

#if AUTOTP_X86_TABLES

#include <immintrin.h>

#include <algorithm>
#include <cstring>

namespace autotp {
namespace {

bool supported() {
  __builtin_cpu_init();
  return avx512_table().supported() && __builtin_cpu_supports("avx512bf16");
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma")

// acc[i][j] (+)= sum over `pairs` K pairs of x[i, 2p + s] * W[block j, p, s]: MT rows of bf16
// x (row stride ldx), NB blocks of the group rows at w. 6 x 4 accumulators, 4 weights, 1 pair.
template <int MT, int NB>
void dot_micro(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t pairs, float* c, int64_t ldc,
               bool accumulate) {
  __m512 acc[MT][NB];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = accumulate ? _mm512_loadu_ps(c + i * ldc + j * kBlockN) : _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* row = w + p * kGroupRow;
    __m512bh wv[NB];
    for (int j = 0; j < NB; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(row + 16 * kGroupRow + j * kRowElems), _MM_HINT_T0);
      wv[j] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(row + j * kRowElems));
    }
    for (int i = 0; i < MT; ++i) {
      int32_t pair;
      std::memcpy(&pair, x + i * ldx + 2 * p, sizeof(pair));
      const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NB; ++j) _mm512_storeu_ps(c + i * ldc + j * kBlockN, acc[i][j]);
}

using DotFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, float*, int64_t, bool);

template <int MT>
DotFn pick_nb(int64_t nb) {
  switch (nb) {
    case 1: return dot_micro<MT, 1>;
    case 2: return dot_micro<MT, 2>;
    case 3: return dot_micro<MT, 3>;
    default: return dot_micro<MT, 4>;
  }
}

struct DotMicro {
  using X = uint16_t;
  static constexpr int kTileM = 6;
  // Whole K (up to 2048 pairs: a 512 KB group panel, in L2) per pass: the 24 accumulators stay
  // in registers, and vdpbf16ps is fed fast enough from L2. Measured on Zen 4 (1 thread, 4096 x
  // 4096 and 11008, M 16-256): chunks of 64-256 pairs 0.83-0.97x oneDNN, 1024-8192 0.96-1.15x.
  static constexpr int64_t kChunkPairs = 2048;
  static constexpr int64_t kTileBlocks(int64_t) { return 4; }
  static DotFn pick(int64_t mt, int64_t nb) {
    switch (mt) {
      case 1: return pick_nb<1>(nb);
      case 2: return pick_nb<2>(nb);
      case 3: return pick_nb<3>(nb);
      case 4: return pick_nb<4>(nb);
      case 5: return pick_nb<5>(nb);
      default: return pick_nb<6>(nb);
    }
  }
};

#include "gemm_tiles.h"

void bf16x_tile(const GemmArgs& a, int64_t m0, int64_t m1, int64_t b0, int64_t b1) {
  bf16_drive<DotMicro>(a, a.xb, m0, m1, b0, b1);
}

#pragma GCC pop_options

}  // namespace

const KernelTable& avx512_bf16_table() {
  const KernelTable& below = avx512_table();
  static const KernelTable table{"avx512_bf16", supported, nullptr, bf16x_tile, 1, 0, 0, nullptr, nullptr, below.sum_bf16,
                                 below.sum_f32, below.stream_read};
  return table;
}

}  // namespace autotp

#endif  // AUTOTP_X86_TABLES
