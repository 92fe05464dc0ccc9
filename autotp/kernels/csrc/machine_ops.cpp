// The torch.ops.autotp operators that describe, measure and switch the machine's kernels, for
// tools, tests and benchmarks (the library itself is defined in ops.cpp):
//
//   read_probe(buffer, isa) -> checksum                   (read bandwidth, for benchmarks)
//   cpu_isas() -> the instruction sets this build holds that this CPU runs, best first
//   serving_isa(isa, weight, x_dtype, M) -> the table that serves such a call started at `isa`
//   weight_prefetch(on) -> whether the bf16 / INT8 tiles prefetch their weights (on: -1 keeps, 0 / 1 sets;
//   the process-wide switch and its per-CPU default: kernel_table.h)
//   weight_prefetch_pairs(pairs) -> how many K pairs ahead the AVX2 / AVX-512 tiles prefetch (-1 keeps)
//   op_clock(on) -> [ns, calls] of the GEMM, collective and attention ops since the last read, which
//   it resets (on: -1 keeps the clock as it is, 0 / 1 stops / starts it: op_clock.h)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "kernel_table.h"
#include "op_clock.h"

namespace autotp {
namespace {

// Reads every byte of `buffer` once, split over the threads: a benchmark's measure of the read
// bandwidth the GEMM's weight streaming can be compared with. Returns a checksum (the XOR of
// every 8-byte word, the same on every ISA).
int64_t read_probe(const at::Tensor& buffer, const std::string& isa) {
  TORCH_CHECK(buffer.device().is_cpu() && buffer.is_contiguous(), "autotp::read_probe: needs a contiguous CPU tensor");
  const auto read = kernel_table(isa).stream_read;
  const auto* data = static_cast<const uint8_t*>(buffer.data_ptr());
  const int64_t bytes = buffer.numel() * buffer.element_size(), piece = 1 << 20;
  std::atomic<uint64_t> sum{0};
  at::parallel_for(0, (bytes + piece - 1) / piece, 1, [&](int64_t begin, int64_t end) {
    const int64_t start = begin * piece, stop = std::min(bytes, end * piece);
    sum.fetch_xor(read(data + start, stop - start));
  });
  return static_cast<int64_t>(sum.load());
}

// The table that serves a GEMM call started at `isa` (see serving_table), or with weight
// "attention" a decode_attention call, for tests and benchmarks.
std::string serving_isa(const std::string& isa, const std::string& weight, at::ScalarType x_dtype, int64_t M) {
  TORCH_CHECK(weight == "bf16" || weight == "int8" || weight == "int4" || weight == "attention",
              "autotp::serving_isa: weight must be bf16, int8, int4 or attention, got ", weight);
  const CallKind kind = weight == "attention" ? CallKind::kAttention
                        : weight == "int8"   ? CallKind::kInt8
                        : weight == "int4" ? (x_dtype == at::kBFloat16 ? CallKind::kInt4Bf16X : CallKind::kInt4)
                        : x_dtype == at::kBFloat16 ? CallKind::kBf16Bf16X : CallKind::kBf16Fp32X;
  return serving_table(kernel_table(isa), kind, M).name;
}

std::vector<int64_t> op_clock_op(int64_t on) {
  TORCH_CHECK(on >= -1 && on <= 1, "autotp::op_clock: on is -1 (keep), 0 (stop) or 1 (start), got ", on);
  OpClockTotals& t = op_clock_totals;
  std::vector<int64_t> read;
  for (int k = 0; k < kOpKinds; ++k) {
    read.push_back(t.ns[k].exchange(0));
    read.push_back(t.calls[k].exchange(0));
  }
  if (on >= 0) t.on.store(on == 1);
  return read;
}

int64_t weight_prefetch_pairs_op(int64_t pairs) {
  TORCH_CHECK(pairs >= -1 && pairs <= 256, "autotp::weight_prefetch_pairs: pairs is -1 (keep) or 0..256, got ", pairs);
  if (pairs >= 0) set_weight_prefetch_pairs(pairs);
  return weight_prefetch_pairs();
}

bool weight_prefetch_op(int64_t on) {
  TORCH_CHECK(on >= -1 && on <= 1, "autotp::weight_prefetch: on is -1 (keep), 0 (off) or 1 (on), got ", on);
  if (on >= 0) set_weight_prefetch(on == 1);
  return weight_prefetch();
}

std::vector<std::string> cpu_isas() {
  std::vector<std::string> names;
  for (const KernelTable* t : runnable_tables()) names.emplace_back(t->name);
  return names;
}

}  // namespace
}  // namespace autotp

TORCH_LIBRARY_FRAGMENT(autotp, m) {
  m.def("read_probe(Tensor buffer, str isa=\"\") -> int");
  m.def("cpu_isas() -> str[]", &autotp::cpu_isas);
  m.def("weight_prefetch(int on=-1) -> bool", &autotp::weight_prefetch_op);
  m.def("weight_prefetch_pairs(int pairs=-1) -> int", &autotp::weight_prefetch_pairs_op);
  m.def("op_clock(int on=-1) -> int[]", &autotp::op_clock_op);
  m.def("serving_isa(str isa, str weight, ScalarType x_dtype, int rows) -> str", &autotp::serving_isa);
}

TORCH_LIBRARY_IMPL(autotp, CPU, m) {
  m.impl("read_probe", &autotp::read_probe);
}
