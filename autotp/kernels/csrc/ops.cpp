// The torch.ops.autotp operators: the library's definition, the GEMMs and the collectives.
//
//   prepack_bf16(weight[N, K]) -> packed[NG, K2, 128]     (layouts and the INT8 spec: kernel_table.h)
//   unpack_bf16(packed, N, K) -> weight[N, K]              (inverse, for tests and state dicts)
//   linear_bf16(x[..., K], packed, bias?, N, out_dtype?, isa) -> y[..., N] = x W^T + bias
//   linear_int8(x[..., K], qpacked, spacked, bias?, N, G, O, out_dtype?, isa, activation_bits)
//     -> y[..., N] = x (Q S)^T + bias (x as int16 per segment, or int8 with activation_bits = 8)
//   class ShmComm(name, rank, size, slot_bytes, create, timeout_s, isa): all_reduce(t), unlink(), name()
//   (the KV-cache ops of a decoding step, reorder_rows_ and decode_attention: decode_ops.cpp; the
//   ops that describe, measure and switch the machine's kernels, read_probe, cpu_isas, serving_isa,
//   weight_prefetch and op_clock: machine_ops.cpp)
// `isa` names the kernel table to start from ("" = the best this CPU runs; an ISA it cannot run
// is an error); the call runs on the first table from there down that serves it (a table may
// serve only bf16 activations, or only from some number of rows: kernel_table.h). The Python
// side picks `isa` from the Runtime.
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>

#include "kernel_table.h"
#include "ops.h"
#include "op_clock.h"
#include "scratch.h"
#include "shm_comm.h"

namespace autotp {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runs tile(m0, m1, c0, c1) over the units of work of an [M, columns] output, in parallel:
// blocks of `rows` rows x runs of column units. Runs are long (better reuse of x) unless that
// leaves fewer than 8 units per thread; they halve from max_run down to min_run.
template <typename Tile>
void for_each_unit(int64_t M, int64_t rows, int64_t columns, int64_t max_run, int64_t min_run, const Tile& tile) {
  const int64_t mcount = ceil_div(M, rows);
  int64_t run = max_run;
  while (run > min_run && mcount * ceil_div(columns, run) < 8 * at::get_num_threads()) run /= 2;
  const int64_t runs = ceil_div(columns, run);
  at::parallel_for(0, runs * mcount, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t m0 = item % mcount * rows, c0 = item / mcount * run;
      tile(m0, std::min(M, m0 + rows), c0, std::min(columns, c0 + run));
    }
  });
}

// bf16 activations x [M, K] into the blocked layout of kernel_table.h (bf16x_unit_rows): blocks of
// 16 rows, each the 32-column slices of its rows one after the other ([ldx / 32, 16, 32]),
// zero past column K and past row M up to a multiple of 32 rows. One pass, in parallel.
void pack_row_blocks(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, uint16_t* out) {
  const int64_t slices = ldx / kXbPadCols, blocks = ceil_div(M, 32) * 2;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk)
      for (int64_t s = 0; s < slices; ++s)
        for (int64_t r = 0; r < 16; ++r) {
          uint16_t* dst = out + ((blk * slices + s) * 16 + r) * kXbPadCols;
          const int64_t m = blk * 16 + r, k0 = s * kXbPadCols;
          const int64_t n = m < M ? std::max<int64_t>(0, std::min(kXbPadCols, K - k0)) : 0;
          if (n > 0) std::memcpy(dst, x + m * K + k0, n * sizeof(uint16_t));
          if (n < kXbPadCols) std::memset(dst + n, 0, (kXbPadCols - n) * sizeof(uint16_t));
        }
  });
}

at::Tensor prepack_bf16(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "autotp::prepack_bf16: weight must be 2-D [out, in], got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.device().is_cpu(),
              "autotp::prepack_bf16: weight must be a bfloat16 CPU tensor, got ",
              weight.scalar_type(), " on ", weight.device());
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t group = kGroupBlocks * kBlockN, NG = ceil_div(N, group), K2 = ceil_div(K, 2);
  at::Tensor w = weight;
  if (NG * group != N || 2 * K2 != K)
    w = at::constant_pad_nd(weight, {0, 2 * K2 - K, 0, NG * group - N}, 0);
  // [NG, 64, K2, 2] -> [NG, K2, 64, 2]: each 256-byte row is one K pair of a group's 64 columns.
  return w.reshape({NG, group, K2, 2}).permute({0, 2, 1, 3}).contiguous().view({NG, K2, kGroupRow});
}

void check_packed(const at::Tensor& packed, int64_t N, int64_t K, const char* op) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kGroupRow && packed.scalar_type() == at::kBFloat16,
              op, ": packed weight must be bfloat16 [ceil(N/64), ceil(K/2), 128] from prepack_bf16, got ",
              packed.scalar_type(), " ", packed.sizes());
  TORCH_CHECK(packed.size(0) == ceil_div(N, kGroupBlocks * kBlockN) && packed.size(1) == ceil_div(K, 2), op,
              ": packed weight ", packed.sizes(), " does not hold a [", N, ", ", K, "] weight");
}

// The optional bias as a contiguous fp32 [N] tensor (undefined when absent).
at::Tensor float_bias(const std::optional<at::Tensor>& bias, int64_t N, const char* op) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must be [", N, "], got ", bias->sizes());
  return bias->to(at::kFloat).contiguous();
}

at::Tensor unpack_bf16(const at::Tensor& packed, int64_t N, int64_t K) {
  check_packed(packed, N, K, "autotp::unpack_bf16");
  const int64_t NG = packed.size(0), K2 = packed.size(1), group = kGroupBlocks * kBlockN;
  return packed.view({NG, K2, group, 2}).permute({0, 2, 1, 3}).reshape({NG * group, 2 * K2})
      .narrow(0, 0, N).narrow(1, 0, K).contiguous();
}

// What both GEMMs check and set up alike: x's dtype and rank, out_dtype, the bias as fp32, the
// kernel table, the output [..., N] and M. `finished` when there is nothing to multiply (M, N or
// K zero; the output is then empty or the bias).
struct LinearCall {
  int64_t K, M;
  at::Tensor out, bias;
  bool finished;
  const KernelTable* table;
};

LinearCall begin_linear(const at::Tensor& x, const std::optional<at::Tensor>& bias, int64_t N,
                        std::optional<at::ScalarType> out_dtype, const std::string& isa, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              op, ": x must be a bfloat16 or float32 CPU tensor, got ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  const int64_t K = x.size(-1);
  const at::ScalarType odt = out_dtype.value_or(x.scalar_type());
  TORCH_CHECK(odt == at::kBFloat16 || odt == at::kFloat, op, ": out_dtype must be bfloat16 or float32, got ", odt);
  at::Tensor b = float_bias(bias, N, op);
  const KernelTable& table = kernel_table(isa);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  const int64_t M = x.numel() / std::max<int64_t>(K, 1);
  // (at::detail::empty_cpu: the allocation without the dispatcher's round trip, whose code a
  // decode step's weight stream evicts between calls)
  at::Tensor out = at::detail::empty_cpu(out_shape, odt);
  if (M > 0 && N > 0 && K == 0) out.zero_().add_(b.defined() ? b.to(odt) : at::zeros({N}, out.options()));
  return {K, M, out, b, M == 0 || N == 0 || K == 0, &table};
}

}  // namespace

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                       int64_t N, std::optional<at::ScalarType> out_dtype, const std::string& isa) {
  OpTimer timer(kOpGemm);
  LinearCall call = begin_linear(x, bias, N, out_dtype, isa, "autotp::linear_bf16");
  const int64_t K = call.K, M = call.M;
  check_packed(packed, N, K, "autotp::linear_bf16");
  TORCH_CHECK(packed.is_contiguous(), "autotp::linear_bf16: packed weight must be contiguous");
  at::Tensor out = call.out, b = call.bias;
  if (call.finished) return out;
  const bool to_bf16 = out.scalar_type() == at::kBFloat16, x_bf16 = x.scalar_type() == at::kBFloat16;
  const int64_t K2 = packed.size(1);
  const KernelTable& table = serving_table(*call.table, x_bf16 ? CallKind::kBf16Bf16X : CallKind::kBf16Fp32X, M);
  const bool bf16x = x_bf16 && takes_bf16x(table, M);
  const bool blocks = bf16x && table.bf16x_unit_rows > 0 && M > table.bf16x_stream_rows;  // activations in 16-row blocks (kernel_table.h)
  // the activations as the tile reads them (kernel_table.h): fp32 [M, 2 * K2], or bf16 padded
  at::Tensor xs;
  Regions<1> rows_copy;  // a few bf16 rows' padded copy (the non-blocked bf16 tiles)
  const uint16_t* xb = nullptr;  // bf16 activations as the tile reads them
  int64_t ldx = 2 * K2;
  if (bf16x) {
    ldx = ceil_div(2 * K2, kXbPadCols) * kXbPadCols;
    if (ldx % 2048 == 0) ldx += kXbPadCols;  // rows 4 KB apart would share L1 sets
    const at::Tensor xc = x.is_contiguous() ? x : x.contiguous();  // read as [M, K]
    if (blocks) {
      xs = at::empty({ceil_div(M, 32) * 32, ldx}, x.options());
      auto* dst = reinterpret_cast<uint16_t*>(xs.data_ptr<at::BFloat16>());
      pack_row_blocks(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()), M, K, ldx, dst);
      xb = dst;
    } else {  // rows copied and padded in plain loops: at decode sizes the aten calls cost more
      rows_copy = Scratch::of_this_thread().take<1>({static_cast<size_t>(M * ldx) * sizeof(uint16_t)});
      auto* dst = reinterpret_cast<uint16_t*>(rows_copy.ptr[0]);
      xb = dst;
      const auto* src = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
      for (int64_t m = 0; m < M; ++m) {
        std::memcpy(dst + m * ldx, src + m * K, K * sizeof(uint16_t));
        std::memset(dst + m * ldx + K, 0, (ldx - K) * sizeof(uint16_t));
      }
    }
  } else if (2 * K2 == K) {
    xs = x.reshape({M, K}).to(at::kFloat).contiguous();
  } else {
    xs = at::zeros({M, 2 * K2}, x.options().dtype(at::kFloat));
    xs.narrow(1, 0, K).copy_(x.reshape({M, K}));
  }
  GemmArgs args{bf16x ? nullptr : xs.data_ptr<float>(), xb,
                reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>()),
                b.defined() ? b.data_ptr<float>() : nullptr,
                out.data_ptr(), M, N, K2, N, to_bf16, ldx};
  const int64_t NB = ceil_div(N, kBlockN);  // blocks of 16 columns that hold outputs
  const int64_t row_tile = blocks ? 32 : kRowTile, block_m = blocks ? table.bf16x_unit_rows : kBlockM;
  const int64_t rows = std::min(block_m, ceil_div(ceil_div(M, ceil_div(M, block_m)), row_tile) * row_tile);
  const auto tile = bf16x ? table.bf16x_tile : table.bf16_tile;
  for_each_unit(M, rows, NB, blocks ? table.bf16x_unit_blocks : kMaxItemBlocks, kGroupBlocks,
                [&](int64_t m0, int64_t m1, int64_t b0, int64_t b1) { tile(args, m0, m1, b0, b1); });
  return out;
}

namespace {

void check_int8_packed(const at::Tensor& qpacked, const at::Tensor& spacked, int64_t N, int64_t K, int64_t G,
                       int64_t O, const char* op) {
  const int64_t NG = ceil_div(N, kInt8Group);
  TORCH_CHECK(G >= 1, op, ": group_size must be at least 1, got ", G);
  TORCH_CHECK(O >= 0 && O < G, op, ": group_offset must be in [0, group_size), got ", O, " for group size ", G);
  TORCH_CHECK(qpacked.dim() == 3 && qpacked.scalar_type() == at::kChar && qpacked.size(0) == NG &&
                  qpacked.size(1) == ceil_div(K, 2) && qpacked.size(2) == kInt8PairRow && qpacked.is_contiguous(),
              op, ": packed weight must be contiguous int8 [", NG, ", ", ceil_div(K, 2), ", 128] (prepack_int8 of an [",
              N, ", ", K, "] weight), got ", qpacked.scalar_type(), " ", qpacked.sizes());
  TORCH_CHECK(spacked.dim() == 3 && spacked.scalar_type() == at::kFloat && spacked.size(0) == NG &&
                  spacked.size(1) == ceil_div(K + O, G) && spacked.size(2) == kInt8Group &&
                  spacked.is_contiguous(),
              op, ": packed scales must be contiguous float32 [", NG, ", ", ceil_div(K + O, G),
              ", 64] for group size ", G, " and offset ", O, ", got ", spacked.scalar_type(), " ", spacked.sizes());
}

// The INT8 spec's activations (kernel_table.h), made once per call for every tile, by the
// serving table's own copy (int8_activations.h: forcing a lower ISA runs and tests its copy), rows
// split over threads. x is read as it is (fp32, or bf16 widened on the fly: no fp32 copy on the
// decode path).
template <typename T>
void int8_activations(Int8ActivationRows<T> rows, const T* x, int64_t M, int64_t K, int64_t G, int64_t O,
                      int16_t* xq, int64_t ldq, float* xs, int64_t segs, int16_t x_max) {
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
    rows(x, m0, m1, K, G, O, xq, ldq, xs, segs, x_max);
  });
}

// 8-bit activations as the byte tiles read them (kernel_table.h): X as bytes, xb8 [M, ldu] (zero
// past K), and their sums per row and segment, xsum [M, segs]
void int8_bytes(const int16_t* xq, int64_t ldq, int64_t M, int64_t K, int64_t G, int64_t O, int8_t* xb8,
                int64_t ldu, int32_t* xsum, int64_t segs) {
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const int16_t* in = xq + m * ldq;
      int8_t* out = xb8 + m * ldu;
      int64_t e = 0;
      int8_segments(0, K, G, O, [&](int64_t ks, int64_t ke, int64_t) {
        int32_t sum = 0;
        for (int64_t k = ks; k < ke; ++k) {
          out[k] = static_cast<int8_t>(in[k]);
          sum += in[k];
        }
        xsum[m * segs + e++] = sum;
      });
      std::memset(out + K, 0, ldu - K);
    }
  });
}

}  // namespace

// x: [..., K] bf16/fp32   qpacked: [ceil(N/64), ceil(K/2), 128] int8   spacked: [ceil(N/64), ceil(K/G), 64] fp32
// y: [..., N] = x (Q * S)^T + bias with x as int16 per segment, or int8 with activation_bits = 8
// (spec in kernel_table.h); any ISA's table.
at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& qpacked, const at::Tensor& spacked,
                       const std::optional<at::Tensor>& bias, int64_t N, int64_t group_size, int64_t group_offset,
                       std::optional<at::ScalarType> out_dtype, const std::string& isa, int64_t activation_bits) {
  OpTimer timer(kOpGemm);
  TORCH_CHECK(activation_bits == 16 || activation_bits == 8,
              "autotp::linear_int8: activation_bits must be 16 or 8 (Runtime int8_activations \"int16\" or "
              "\"int8\"), got ", activation_bits);
  const int16_t x_max = activation_bits == 8 ? kInt8XMax8 : kInt8XMax;
  LinearCall call = begin_linear(x, bias, N, out_dtype, isa, "autotp::linear_int8");
  const int64_t K = call.K, M = call.M;
  check_int8_packed(qpacked, spacked, N, K, group_size, group_offset, "autotp::linear_int8");
  at::Tensor out = call.out, b = call.bias;
  if (call.finished) return out;
  int64_t segs = 0;
  int8_segments(0, K, group_size, group_offset, [&](int64_t, int64_t, int64_t) { ++segs; });
  const int64_t ldq = K + 2;  // even, and X[m, K] (an odd tail's unused partner) readable
  const KernelTable& table = serving_table(*call.table, CallKind::kInt8, M);
  const bool bytes = activation_bits == 8 && table.int8_u8_tile != nullptr;
  const int64_t ldu = bytes ? ceil_div(K, 4) * 4 : 0;
  const Regions<4> temps = Scratch::of_this_thread().take<4>(
      {static_cast<size_t>(M * ldq) * sizeof(int16_t), static_cast<size_t>(M * segs) * sizeof(float),
       static_cast<size_t>(bytes ? M * ldu : 0), static_cast<size_t>(bytes ? M * segs : 0) * sizeof(int32_t)});
  auto* xq = reinterpret_cast<int16_t*>(temps.ptr[0]);
  auto* xs = reinterpret_cast<float*>(temps.ptr[1]);
  auto* xb8 = reinterpret_cast<int8_t*>(temps.ptr[2]);
  auto* xsum = reinterpret_cast<int32_t*>(temps.ptr[3]);
  if (x.scalar_type() == at::kBFloat16) {
    const at::Tensor xc = x.is_contiguous() ? x : x.contiguous();
    const auto* xb = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
    int8_activations(table.int8_x_bf16, xb, M, K, group_size, group_offset, xq, ldq, xs, segs, x_max);
  } else {
    const at::Tensor xf = x.reshape({M, K}).to(at::kFloat).contiguous();
    int8_activations(table.int8_x_f32, xf.data_ptr<float>(), M, K, group_size, group_offset, xq, ldq, xs, segs,
                     x_max);
  }
  if (bytes) int8_bytes(xq, ldq, M, K, group_size, group_offset, xb8, ldu, xsum, segs);
  Int8GemmArgs args{nullptr, xq, xs, qpacked.data_ptr<int8_t>(), nullptr,
                    nullptr, nullptr, spacked.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr,
                    out.data_ptr(), M, N, K, group_size, group_offset, spacked.size(1), N,
                    out.scalar_type() == at::kBFloat16, ldq, segs, bytes ? xb8 : nullptr,
                    bytes ? xsum : nullptr, ldu};
  const int64_t rows = M <= kInt8DirectM
      ? M  // few rows: one tile, so each weight row is read once
      : std::min(kInt8BlockM, ceil_div(ceil_div(M, ceil_div(M, kInt8BlockM)), kRowTile) * kRowTile);
  const auto tile = bytes ? table.int8_u8_tile : table.int8_tile;
  for_each_unit(M, rows, qpacked.size(0), kInt8MaxItemGroups, 1,
                [&](int64_t m0, int64_t m1, int64_t g0, int64_t g1) { tile(args, m0, m1, g0, g1); });
  return out;
}

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& qpacked, const at::Tensor& spacked,
                       const std::optional<at::Tensor>& zpacked, const std::optional<at::Tensor>& bias, int64_t N,
                       int64_t group_size, int64_t group_offset, std::optional<at::ScalarType> out_dtype,
                       const std::string& isa) {
  OpTimer timer(kOpGemm);
  const char* op = "autotp::linear_int4";
  LinearCall call = begin_linear(x, bias, N, out_dtype, isa, op);
  const int64_t K = call.K, M = call.M, G = group_size, O = group_offset;
  const int64_t NG = ceil_div(N, kInt8Group), KG = ceil_div(K + O, std::max<int64_t>(G, 1));
  TORCH_CHECK(G >= 1, op, ": group_size must be at least 1, got ", G);
  TORCH_CHECK(O >= 0 && O < G, op, ": group_offset must be in [0, group_size), got ", O, " for group size ", G);
  TORCH_CHECK(qpacked.dim() == 3 && qpacked.scalar_type() == at::kByte && qpacked.size(0) == NG &&
                  qpacked.size(1) == ceil_div(K, 2) && qpacked.size(2) == kInt8Group && qpacked.is_contiguous(),
              op, ": packed weight must be contiguous uint8 [", NG, ", ", ceil_div(K, 2), ", 64] (prepack_int4 of an [",
              N, ", ", K, "] weight), got ", qpacked.scalar_type(), " ", qpacked.sizes());
  TORCH_CHECK(spacked.dim() == 3 && spacked.scalar_type() == at::kFloat && spacked.size(0) == NG &&
                  spacked.size(1) == KG && spacked.size(2) == kInt8Group && spacked.is_contiguous(),
              op, ": packed scales must be contiguous float32 [", NG, ", ", KG, ", 64] for group size ", G,
              " and offset ", O, ", got ", spacked.scalar_type(), " ", spacked.sizes());
  const bool zeros = zpacked.has_value() && zpacked->defined();
  if (zeros)
    TORCH_CHECK(zpacked->scalar_type() == at::kByte && zpacked->sizes() == spacked.sizes() &&
                    zpacked->is_contiguous(),
                op, ": packed zero points must be contiguous uint8 of the scales' shape ", spacked.sizes(), ", got ",
                zpacked->scalar_type(), " ", zpacked->sizes());
  at::Tensor out = call.out, b = call.bias;
  if (call.finished) return out;
  const bool x_bf16 = x.scalar_type() == at::kBFloat16;
  const KernelTable& table = serving_table(*call.table, x_bf16 ? CallKind::kInt4Bf16X : CallKind::kInt4, M);
  const bool int4x = x_bf16 && table.int4x_tile != nullptr;  // bf16 activations as they are
  const at::Tensor xs = int4x ? x.reshape({M, K}).contiguous() : x.reshape({M, K}).to(at::kFloat).contiguous();
  Int8GemmArgs args{int4x ? nullptr : xs.data_ptr<float>(), nullptr, nullptr, nullptr, qpacked.data_ptr<uint8_t>(),
                    zeros ? zpacked->data_ptr<uint8_t>() : nullptr,
                    int4x ? reinterpret_cast<const uint16_t*>(xs.data_ptr<at::BFloat16>()) : nullptr,
                    spacked.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr, out.data_ptr(), M, N, K,
                    G, O, KG, N, out.scalar_type() == at::kBFloat16, 0, 0, nullptr, nullptr, 0};
  const int64_t rows = M <= kInt8DirectM
      ? M  // few rows: one tile, so each weight row is widened once
      : std::min(kInt8BlockM, ceil_div(ceil_div(M, ceil_div(M, kInt8BlockM)), kRowTile) * kRowTile);
  const auto tile = int4x ? table.int4x_tile : table.int4_tile;
  for_each_unit(M, rows, NG, kInt8MaxItemGroups, 1,
                [&](int64_t m0, int64_t m1, int64_t g0, int64_t g1) { tile(args, m0, m1, g0, g1); });
  return out;
}

}  // namespace autotp

TORCH_LIBRARY(autotp, m) {
  m.class_<autotp::ShmComm>("ShmComm")
      .def(torch::init<std::string, int64_t, int64_t, int64_t, bool, double, std::string>())
      .def("all_reduce", &autotp::ShmComm::all_reduce)
      .def("unlink", &autotp::ShmComm::unlink)
      .def("name", &autotp::ShmComm::name)
      .def("id", &autotp::ShmComm::id);
  m.def("shm_all_reduce(Tensor tensor, int comm) -> Tensor");
  m.def("shm_all_reduce_(Tensor(a!) tensor, int comm) -> Tensor(a!)");
  m.def("shm_all_gather_last_dim(Tensor tensor, int comm, int[] sizes) -> Tensor");
  m.def("prepack_bf16(Tensor weight) -> Tensor");
  m.def("unpack_bf16(Tensor packed, int out_features, int in_features) -> Tensor");
  m.def("linear_bf16(Tensor x, Tensor packed, Tensor? bias, int out_features, ScalarType? out_dtype=None, "
        "str isa=\"\") -> Tensor");
  m.def("linear_int8(Tensor x, Tensor qpacked, Tensor spacked, Tensor? bias, int out_features, int group_size, "
        "int group_offset=0, ScalarType? out_dtype=None, str isa=\"\", int activation_bits=16) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor qpacked, Tensor spacked, Tensor? zpacked, Tensor? bias, int out_features, "
        "int group_size, int group_offset=0, ScalarType? out_dtype=None, str isa=\"\") -> Tensor");
}

TORCH_LIBRARY_IMPL(autotp, CPU, m) {
  m.impl("prepack_bf16", &autotp::prepack_bf16);
  m.impl("unpack_bf16", &autotp::unpack_bf16);
  m.impl("linear_bf16", &autotp::linear_bf16);
  m.impl("linear_int8", &autotp::linear_int8);
  m.impl("linear_int4", &autotp::linear_int4);
  m.impl("shm_all_reduce", &autotp::shm_all_reduce);
  m.impl("shm_all_reduce_", &autotp::shm_all_reduce_);
  m.impl("shm_all_gather_last_dim", &autotp::shm_all_gather_last_dim);
}

